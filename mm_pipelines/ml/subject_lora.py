"""A subject's LoRA workflow: training set on disk, versions, validation metrics, quality report.

Plain Python (no Dagster, no MLflow). The subject assets call these functions in order:
`build_training_set` -> `lora.train_lora` -> `generate.generate_images` ->
`quality_report` -> `gate_failures`.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mm_pipelines.ml.diffusion_base import resize_center_crop
from mm_pipelines.ml.metrics import (
    ClipImageFeatures,
    clip_score,
    distribution_metrics,
    extract_features,
    mean_color_distance,
)

TRAINING_SET_MANIFEST = "training_set.json"


# --------------------------------------------------------------------------- training set


@dataclass
class TrainingSet:
    images: list[Image.Image]  # resized and centre-cropped to the model's resolution
    captions: list[str]  # what the adapter is trained with (the instance prompt by default)
    source_hashes: list[str]  # content hash of each catalog image
    source_captions: list[str | None]
    resolution: int

    @property
    def version(self) -> str:
        """Changes when any source image, caption or the resolution changes."""
        blob = json.dumps([self.source_hashes, self.captions, self.resolution])
        return "ts-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_training_set(
    items: Sequence[tuple[bytes, str, str | None]],
    resolution: int,
    instance_prompt: str,
) -> tuple[TrainingSet, list[tuple[str, str]]]:
    """`items` are (image bytes, content hash, catalog caption). Returns the set and the
    (content hash, reason) of images that could not be used (they are left out, not fatal)."""
    ts = TrainingSet([], [], [], [], resolution)
    skipped: list[tuple[str, str]] = []
    for data, content_hash, caption in items:
        try:
            with Image.open(io.BytesIO(data)) as im:
                image = resize_center_crop(im.convert("RGB"), resolution)
        except (OSError, ValueError) as err:
            skipped.append((content_hash, f"does not decode: {err}"))
            continue
        ts.images.append(image)
        ts.captions.append(instance_prompt)
        ts.source_hashes.append(content_hash)
        ts.source_captions.append(caption)
    return ts, skipped


def save_training_set(ts: TrainingSet, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (image, content_hash) in enumerate(zip(ts.images, ts.source_hashes, strict=True)):
        name = f"{i:04d}_{content_hash[:12]}.png"
        image.save(folder / name)
        files.append(name)
    manifest = {
        "version": ts.version,
        "resolution": ts.resolution,
        "files": files,
        "captions": ts.captions,
        "source_hashes": ts.source_hashes,
        "source_captions": ts.source_captions,
    }
    (folder / TRAINING_SET_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder


def load_training_set(folder: str | Path) -> TrainingSet:
    folder = Path(folder)
    manifest_path = folder / TRAINING_SET_MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no training set at {folder}: materialize lora_training_set first")
    m = json.loads(manifest_path.read_text())
    images = []
    for name in m["files"]:
        with Image.open(folder / name) as im:
            images.append(im.convert("RGB"))
    return TrainingSet(
        images, m["captions"], m["source_hashes"], m["source_captions"], m["resolution"]
    )


# --------------------------------------------------------------------------- versions


def weights_version(folder: str | Path, prefix: str) -> str:
    """Content-derived version of a model folder: sha256 over its weight files (sorted)."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(folder).rglob("*.safetensors") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no .safetensors weights under {folder}")
    for p in files:
        h.update(p.relative_to(folder).as_posix().encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return f"{prefix}-{h.hexdigest()[:12]}"


@dataclass
class AdapterRecord:
    """What `lora_adapter` leaves next to the adapter for the assets downstream."""

    subject: str
    adapter_version: str
    adapter_dir: str
    base_model_version: str
    base_model_dir: str
    training_set_version: str
    registered_model: str | None = None
    registered_version: str | None = None
    mlflow_run_id: str | None = None
    steps_done: int = 0
    best_step: int | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2, default=str))

    @classmethod
    def load(cls, path: str | Path) -> AdapterRecord:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no adapter record at {path}: materialize lora_adapter")
        return cls(**json.loads(path.read_text()))


# --------------------------------------------------------------------------- metrics


def clip_features(bundle: Any) -> ClipImageFeatures:
    """The CLIP image tower of a ClipBundle as the FID/KID/validation feature extractor."""
    size = bundle.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return ClipImageFeatures(bundle.model, image_size=int(size), name=bundle.model_version)


def validation_metric(
    kind: str, references: Sequence[Image.Image], features: torch.nn.Module | None = None
) -> Callable[[list[Any]], float]:
    """Lower-is-better metric of validation images (GeneratedImage list) for early stopping.

    "clip_distance": 1 - cosine of each image's CLIP embedding to the references' centroid
    (general purpose); "color_distance": mean-colour distance (model-free, colour subjects).
    """
    if kind == "color_distance":
        return lambda gens: mean_color_distance([g.image for g in gens], references)
    if kind != "clip_distance":
        raise ValueError(f"unknown validation metric {kind!r} (clip_distance | color_distance)")
    if features is None:
        raise ValueError("clip_distance needs the CLIP feature extractor")
    centroid = F.normalize(extract_features(references, features).float().mean(0), dim=0)

    def metric(gens: list[Any]) -> float:
        emb = F.normalize(extract_features([g.image for g in gens], features).float(), dim=-1)
        return float((1.0 - emb @ centroid).mean())

    return metric


def quality_report(
    references: Sequence[Image.Image],
    adapted: Sequence[Image.Image],
    base: Sequence[Image.Image],
    score_prompt: str,
    clip_bundle: Any,
    feature: torch.nn.Module,
    *,
    kid_subset_size: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """CLIP score (towards `score_prompt`), FID and KID against the references, for the
    adapted pipeline's images and the base pipeline's images on the same prompts and seeds.
    Sample sizes and the feature extractor are recorded next to the numbers."""
    report: dict[str, Any] = {"score_prompt": score_prompt}
    for name, images in (("adapter", adapted), ("base", base)):
        cs = clip_score(
            list(images),
            [score_prompt] * len(images),
            clip_bundle.model,
            clip_bundle.tokenizer,
            clip_bundle.preprocess,
            context_length=clip_bundle.context_length,
            device=device,
        )
        # subjects have few images: the largest subsets KID allows (torchmetrics' default
        # 1000 at most) keep its variance down; half the set (the generic default) gave
        # KID std 4x its mean on the demo's 5 references
        subset = kid_subset_size or min(1000, len(references) - 1, len(images) - 1)
        dist = distribution_metrics(
            list(references), list(images), feature, kid_subset_size=subset, device=device
        )
        report[name] = {
            "clip_score": cs.score,
            "clip_prompts_chunked": cs.n_chunked,
            **dist.as_dict(),
        }
    report["fid_ratio_to_base"] = _ratio(report["adapter"]["fid"], report["base"]["fid"])
    report["kid_ratio_to_base"] = _ratio(report["adapter"]["kid_mean"], report["base"]["kid_mean"])
    report["clip_score_delta"] = report["adapter"]["clip_score"] - report["base"]["clip_score"]
    return report


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else float("inf") if a > 0 else 1.0


def gate_failures(report: dict[str, Any], gates: Any) -> list[str]:
    """Human-readable reasons the report fails `gates` (subjects.QualityGates); [] = pass."""
    adapter = report["adapter"]
    failures = []
    checks = [
        ("fid", adapter["fid"], gates.max_fid, "<="),
        ("kid_mean", adapter["kid_mean"], gates.max_kid, "<="),
        ("clip_score", adapter["clip_score"], gates.min_clip_score, ">="),
        ("fid_ratio_to_base", report["fid_ratio_to_base"], gates.max_fid_ratio_to_base, "<="),
    ]
    for name, value, limit, op in checks:
        if limit is None:
            continue
        ok = bool(np.isfinite(value)) and (value <= limit if op == "<=" else value >= limit)
        if not ok:
            failures.append(f"{name} {value:.4g} is not {op} {limit:g}")
    return failures
