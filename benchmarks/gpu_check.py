"""GPU check: every model path end to end on one device with the automatic precision,
and ONE JSON object out with the timings and the numbers each part computed.

    python benchmarks/gpu_check.py [--device cuda] [--quick] [--parts torch|whisper|all|a,b]
        [--no-cudnn-sdp] [--whisper-model-dir DIR] [--speech speech16k.npz] [--workdir DIR]

Runs on a bare GPU box (torch, transformers, peft, torchmetrics, accelerate, safetensors,
tokenizers, numpy, pillow) plus the few wheels of benchmarks/GPU_CHECK.md: it imports
only mm_pipelines.models and mm_pipelines.serving.export (no Dagster, Postgres, MLflow).
Every part runs in its own try/except: a failure is reported with its traceback and the
next part still runs (a part whose input failed reports that). `--device cpu --quick` is
the same code at toy sizes, for a machine without a GPU.

Parts (in order; later ones reuse earlier results):
  env                  versions, GPU, precision, attention backends
  clip_train           demo CLIP training (bf16 autocast on CUDA), held-out recall@1
  clip_encode          demo CLIP: photos + stored video frames, device vs PIL input path,
                       nvJPEG pixels vs PIL's; text chunks encoded
  clip_encode_vitb32   ViT-B-32 (random weights): end to end vs raw forward (issue 17 target)
  clip_score           demo CLIP score of matching vs shuffled captions
  fid_kid              FID/KID with the CLIP tower on the device
  projector            unified-space audio head trained on the device (synthetic pairs)
  diffusion_base       tiny diffusion base model trained on the device
  lora                 LoRA: checkpoints + resume (losses vs an uninterrupted run),
                       clip_distance validation, early stopping
  generation           batched generation with the adapter; seed determinism
  quality_report       CLIP score + FID/KID of adapter vs base (the path issue 17 found broken)
  attention            SDPA backends (default / cuDNN off / flash / efficient / math):
                       time and max difference of the UNet and a CLIP tower
  export               serving bundle export + fresh-process verification (CPU by design)
  whisper_transcribe   faster-whisper (CTranslate2) on the device and on the CPU: WER, RTF
  audio_embeddings     Whisper-encoder vectors on the device and the CPU: RTF, agreement
  whisper_cublas_shim  only when CTranslate2 (built for CUDA 12) misses libcublas.so.12:
                       the two Whisper parts again with torch's cuBLAS 13 under that name
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SPEECH_DIR = ROOT / "mm_pipelines" / "pipeline" / "samples" / "speech"
TORCH_PARTS = (
    "env",
    "clip_train",
    "clip_encode",
    "clip_encode_vitb32",
    "clip_score",
    "fid_kid",
    "projector",
    "diffusion_base",
    "lora",
    "generation",
    "quality_report",
    "attention",
    "export",
)
WHISPER_PARTS = ("whisper_transcribe", "audio_embeddings", "whisper_cublas_shim")


class Skip(Exception):
    """A part that cannot run because an earlier part it needs did not."""


class Check:
    """Shared state: the options, the device, and what earlier parts produced."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="mm_gpu_check_"))
        self.state: dict[str, Any] = {}
        self.whisper_cuda_errors: list[str] = []

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def need(self, key: str) -> Any:
        if key not in self.state:
            raise Skip(f"needs '{key}' from an earlier part, which failed or did not run")
        return self.state[key]

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def timed(check: Check, fn: Callable[[], Any]) -> tuple[Any, float]:
    check.sync()
    t0 = time.perf_counter()
    out = fn()
    check.sync()
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------- env


def part_env(c: Check) -> dict[str, Any]:
    import importlib.metadata as md

    from mm_pipelines.models.common import resolve_dtype

    versions = {}
    for pkg in (
        "torch",
        "torchvision",
        "open_clip_torch",
        "diffusers",
        "transformers",
        "peft",
        "accelerate",
        "torchmetrics",
        "ctranslate2",
        "faster-whisper",
        "numpy",
        "pillow",
    ):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "versions": versions,
        "device": str(c.device),
        "cpu_count": os.cpu_count(),
        "auto_dtype": str(resolve_dtype(c.device, "auto")),
        "quick": c.quick,
    }
    if c.cuda:
        props = torch.cuda.get_device_properties(c.device)
        out.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            bf16=torch.cuda.is_bf16_supported(),
            sdp_enabled={
                "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "math": torch.backends.cuda.math_sdp_enabled(),
            },
        )
    return out


# ----------------------------------------------------------------------------- CLIP


def part_clip_train(c: Check) -> dict[str, Any]:
    from mm_pipelines.models.clip.loading import save_local_dir
    from mm_pipelines.models.demo.tiny_clip import TrainConfig, evaluate_on_heldout, train_clip

    cfg = TrainConfig(
        steps=c.size(400, 20),
        images_per_combo=c.size(16, 2),
        warmup_steps=c.size(50, 5),
        log_every=c.size(25, 5),
    )
    ckpt = c.work / "clip" / "tiny.safetensors"
    result = train_clip(cfg, device=c.device, precision=None, checkpoint_path=ckpt)
    bundle = result.bundle
    c.state["clip"] = bundle
    c.state["clip_checkpoint"] = str(ckpt)
    save_local_dir(bundle.model, bundle.architecture, c.work / "clip" / "local")
    recall, eval_s = timed(c, lambda: evaluate_on_heldout(bundle))
    return {
        "steps": result.steps_done,
        "seconds": round(result.seconds, 2),
        "steps_per_s": round(result.steps_done / result.seconds, 1),
        "precision": bundle.precision,
        "first_loss": result.losses[0][1],
        "final_loss": result.final_loss,
        "heldout_recall_at_1": recall,
        "heldout_eval_s": round(eval_s, 2),
    }


def _photos(c: Check) -> list[str]:
    """640x480 photo-like files, 3 JPEG : 1 PNG (the benchmark's generator)."""
    if "photos" not in c.state:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_clip_encode import make_photos

        folder = c.work / "photos"
        folder.mkdir(parents=True, exist_ok=True)
        c.state["photos"] = make_photos(folder, c.size(1024, 24))
    return c.state["photos"]


def _stored_frames(c: Check, n: int) -> list[Path]:
    """Video frames as the understand stage stores them: JPEG in the media store layout."""
    import hashlib

    from mm_pipelines.models.common import encode_image
    from mm_pipelines.models.demo.shapes import heldout_split

    images, _ = heldout_split(n, seed=3, size_px=256)
    paths = []
    for image in images:
        data = encode_image(image, "jpeg", quality=90)
        digest = hashlib.sha256(data).hexdigest()
        path = c.work / "media" / digest[:2] / digest[2:4] / digest
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths.append(path)
    return paths


def _max_cos_dist(a: np.ndarray, b: np.ndarray) -> float:
    return float((1 - (a * b).sum(axis=1)).max()) if len(a) else 0.0


def part_clip_encode(c: Check) -> dict[str, Any]:
    from mm_pipelines.models.clip.device_input import decode_jpegs, pil_pixels, read_jpeg
    from mm_pipelines.models.clip.encode import encode_images, encode_texts
    from mm_pipelines.models.demo.shapes import all_specs

    bundle = c.need("clip")
    sources = [*_photos(c), *_stored_frames(c, c.size(256, 8))]
    workers = min(8, max(1, (os.cpu_count() or 2) - 2))
    out: dict[str, Any] = {"images": len(sources), "workers": workers}
    results = {}
    for decode in ("auto", "pil"):
        encode_images(bundle, sources[:64], 64, 0, decode=decode)  # warm-up
        res, secs = timed(c, lambda d=decode: encode_images(bundle, sources, 256, workers, d))
        results[decode] = res
        out[f"{decode}_images_per_s"] = round(len(res.indices) / secs, 1)
        out[f"{decode}_stats"] = {k: round(v, 3) for k, v in res.stats.items()}
    auto, pil = results["auto"], results["pil"]
    out["errors"] = len(auto.errors) + len(pil.errors)
    out["max_cosine_distance_auto_vs_pil"] = _max_cos_dist(auto.vectors, pil.vectors)
    # nvJPEG (CUDA) or libjpeg-turbo (CPU) against PIL, pixel by pixel
    jpegs = [s for s in sources if read_jpeg(s) is not None][:32]
    data = [torch.frombuffer(bytearray(read_jpeg(s)), dtype=torch.uint8) for s in jpegs]
    decoded = decode_jpegs(data, c.device)
    diffs = [
        (d.cpu().int() - pil_pixels(s).int()).abs() for d, s in zip(decoded, jpegs, strict=True)
    ]
    out["jpeg_decoder_vs_pil_uint8"] = {
        "max": int(max(int(d.max()) for d in diffs)),
        "mean": float(np.mean([float(d.float().mean()) for d in diffs])),
        "files": len(diffs),
    }
    captions = [s.caption for s in all_specs()] * c.size(8, 1)
    texts, secs = timed(c, lambda: encode_texts(bundle, captions))
    out["texts"] = len(captions)
    out["texts_per_s"] = round(len(captions) / secs, 1)
    out["text_vectors_finite"] = bool(np.isfinite(texts.vectors).all())
    return out


def part_clip_encode_vitb32(c: Check) -> dict[str, Any]:
    """Issue 17's measurement: end to end (files -> vectors) against the raw forward on
    pre-decoded tensors, same model, batch and run. The files are read `repeat` times
    (page cache) so that a run lasts seconds on a GPU, not worker start-up."""
    from bench_clip_encode import raw_forward

    from mm_pipelines.models.clip.encode import encode_images, open_image
    from mm_pipelines.models.clip.loading import load_clip

    bundle = load_clip("ViT-B-32", None, device=c.device)
    files = _photos(c)
    repeat = c.size(8, 1)
    paths = files * repeat
    batch = c.size(256, 8)
    workers = min(14, max(1, (os.cpu_count() or 2) - 2))
    pre = torch.stack([bundle.preprocess(open_image(p)) for p in files])

    def raw() -> float:
        return sum(raw_forward(bundle, pre, batch)[0] for _ in range(repeat))

    encode_images(bundle, files[: 2 * batch], batch, 0)  # warm-up, both paths alike
    raw_forward(bundle, pre[: 2 * batch], batch)
    raw_runs, e2e_runs = [raw()], []
    # the process's first call also starts its reader processes (kept for later calls)
    cold = encode_images(bundle, paths, batch, workers)
    for _ in range(2):
        res = encode_images(bundle, paths, batch, workers)
        e2e_runs.append(res.stats["seconds"])
        raw_runs.append(raw())
    raw_ips = len(paths) / statistics.median(raw_runs)
    e2e_ips = len(res.indices) / statistics.median(e2e_runs)
    # the same, JPEG files only (what nvJPEG takes; PNGs are decoded by the CPU workers),
    # and 4x as many files (worker start-up, ~0.5 s for 14 workers on an H100 box, spread)
    variants = {}
    for name, items in (
        ("jpeg_files_only", [p for p in paths if not p.endswith(".png")]),
        ("four_times_the_files", paths * 4),
    ):
        secs = min(encode_images(bundle, items, batch, workers).stats["seconds"] for _ in range(2))
        variants[name] = {
            "images": len(items),
            "end_to_end_images_per_s": round(len(items) / secs, 1),
            "ratio": round(len(items) / secs / raw_ips, 3),
        }
    stages = _input_stages(c, bundle, files, paths, batch, workers)
    return {
        "images": len(paths),
        "distinct_files": len(files),
        "batch_size": batch,
        "workers": workers,
        "precision": bundle.precision,
        "decode_on_device": bool(res.stats["decode_on_device"]),
        "raw_forward_images_per_s": round(raw_ips, 1),
        "end_to_end_images_per_s": round(e2e_ips, 1),
        "ratio": round(e2e_ips / raw_ips, 3),
        "target_ratio": 0.7 if c.cuda else 0.9,
        "first_call": {
            "end_to_end_images_per_s": round(len(paths) / cold.stats["seconds"], 1),
            "ratio": round(len(paths) / cold.stats["seconds"] / raw_ips, 3),
            "loader_wait_s": round(cold.stats["loader_wait_s"], 2),
        },
        "raw_runs_s": [round(t, 2) for t in raw_runs],
        "end_to_end_runs_s": [round(t, 2) for t in e2e_runs],
        "loader_wait_s": round(res.stats["loader_wait_s"], 2),
        "jpegs_decoded_on_device": int(res.stats.get("device_decoded", 0)),
        "cpu_fallbacks": int(res.stats.get("cpu_fallback", 0)),
        "errors": len(res.errors),
        "same_model_other_inputs": variants,
        "input_stages_images_per_s": stages,
    }


def _input_stages(c: Check, bundle, files, paths, batch: int, workers: int) -> dict[str, float]:
    """Each stage of the device input path alone, in images/s: where the time goes when
    the end-to-end run falls short."""
    from bench_png_decode import libpng, wuffs

    from mm_pipelines.models.clip.device_input import (
        DevicePreprocess,
        decode_jpegs,
        iter_raw_batches,
        pil_pixels,
        prepare_batch,
        read_png,
    )
    from mm_pipelines.models.clip.encode import lower_priority

    out: dict[str, float] = {}

    def batches(items: list, pin: bool, keep: bool = True) -> Iterator[list]:
        # the encoder's readers (kept), or readers started for this call
        return iter_raw_batches(
            items, batch, workers, pin=pin, worker_init_fn=lower_priority, keep_workers=keep
        )

    def read_rate(items: list, pin: bool, keep: bool = True) -> float:
        t0 = time.perf_counter()
        first = None
        for _ in batches(items, pin, keep):
            first = first or time.perf_counter() - t0
        out.setdefault("first_batch_s", round(first or 0.0, 3))
        return round(len(items) / (time.perf_counter() - t0), 1)

    # readers started for this call alone: their start-up is in `first_batch_s`
    out["read_workers_started_for_the_call"] = read_rate(paths, c.cuda, keep=False)
    out["read_workers"] = read_rate(paths, c.cuda)
    out["read_workers_unpinned"] = read_rate(paths, False, keep=False)
    out["read_jpeg_files_only"] = read_rate([p for p in paths if p.endswith(".jpg")], c.cuda)
    out["read_png_files_only"] = read_rate([p for p in paths if p.endswith(".png")], c.cuda)
    pngs = [p for p in files if p.endswith(".png")][:64]
    decoders = (
        ("png_decode_ms_one_process", read_png),  # the readers' (ISA-L inflates, Wuffs unfilters)
        ("png_wuffs_ms", lambda p: wuffs(bytearray(Path(p).read_bytes()))),  # the one before
        ("png_libpng_ms", lambda p: libpng(bytearray(Path(p).read_bytes()))),  # H100 runs 1-5
        ("png_pil_ms", pil_pixels),
    )
    for name, decode in decoders:
        t0 = time.perf_counter()
        for p in pngs:
            decode(p)
        out[name] = round(1e3 * (time.perf_counter() - t0) / len(pngs), 2)
    raw = list(batches(files, c.cuda))
    jpegs = [p for b in raw for _, kind, p, _ in b if kind == "jpeg"]
    _, secs = timed(
        c,
        lambda: [decode_jpegs(jpegs[k : k + batch], c.device) for k in range(0, len(jpegs), batch)],
    )
    out["jpeg_decode_only"] = round(len(jpegs) / secs, 1)
    preprocess = DevicePreprocess.from_transform(bundle.preprocess)
    _, secs = timed(
        c, lambda: [prepare_batch(b, files, preprocess, c.device, bundle.input_dtype) for b in raw]
    )
    out["decode_and_preprocess"] = round(len(files) / secs, 1)
    return out


def part_clip_score(c: Check) -> dict[str, Any]:
    from mm_pipelines.models.demo.shapes import heldout_split
    from mm_pipelines.models.diffusion.metrics import clip_score

    bundle = c.need("clip")
    images, captions = heldout_split(c.size(128, 8), seed=5, size_px=64)
    shuffled = captions[1:] + captions[:1]

    def score(prompts: list[str]) -> Any:
        return clip_score(
            images,
            prompts,
            bundle.model,
            bundle.tokenizer,
            bundle.preprocess,
            context_length=bundle.context_length,
        )

    matched, secs = timed(c, lambda: score(captions))
    return {
        "pairs": matched.n,
        "matched": matched.score,
        "shuffled": score(shuffled).score,
        "seconds": round(secs, 3),
    }


def part_fid_kid(c: Check) -> dict[str, Any]:
    from PIL import Image

    from mm_pipelines.models.demo.shapes import heldout_split
    from mm_pipelines.models.diffusion.evaluation import clip_features
    from mm_pipelines.models.diffusion.metrics import distribution_metrics

    feature = clip_features(c.need("clip"))
    n = c.size(256, 12)
    real, _ = heldout_split(n, seed=6, size_px=64)
    same, _ = heldout_split(n, seed=7, size_px=64)
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]
    same_m, secs = timed(c, lambda: distribution_metrics(real, same, feature))
    noise_m = distribution_metrics(real, noise, feature)
    return {
        "n": n,
        "feature_device": str(next(feature.model.parameters()).device),
        "fid_same_distribution": same_m.fid.fid,
        "fid_noise": noise_m.fid.fid,
        "kid_same_distribution": same_m.kid.kid_mean,
        "kid_noise": noise_m.kid.kid_mean,
        "seconds": round(secs, 3),
    }


# ----------------------------------------------------------------------------- projector


def part_projector(c: Check) -> dict[str, Any]:
    from mm_pipelines.models.demo.shapes import all_specs
    from mm_pipelines.models.unified.projector import (
        ProjectorTrainConfig,
        mean_text_vectors,
        save_projector,
        train_projector,
    )

    bundle = c.need("clip")
    captions = [s.caption for s in all_specs()]
    targets = mean_text_vectors(bundle, captions)
    # synthetic "audio" vectors: a fixed random mixing of the targets plus noise, several
    # noisy takes per caption (a learnable, held-out-checkable mapping)
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(targets.shape[1], 384)).astype(np.float32)
    takes = 4
    audio = np.concatenate(
        [targets @ mix + rng.normal(0, 0.5, (len(targets), 384)) for _ in range(takes)]
    )
    pairs_t = np.concatenate([targets] * takes)
    groups = [str(i) for _ in range(takes) for i in range(len(captions))]
    cfg = ProjectorTrainConfig(steps=c.size(400, 40))
    result, secs = timed(
        c,
        lambda: train_projector(audio.astype(np.float32), pairs_t, groups, cfg, device=c.device),
    )
    folder = c.work / "projector"
    result.projector.config.clip_model_version = bundle.model_version
    save_projector(result.projector, folder)
    c.state["projector_dir"] = str(folder)
    m = result.metrics
    return {
        "pairs": len(audio),
        "steps": cfg.steps,
        "seconds": round(secs, 2),
        "heldout_recall_at_1_untrained": m.get("untrained_recall_at_1"),
        "heldout_recall_at_1": m.get("heldout_recall_at_1"),
        "final_loss": m.get("final_loss"),
    }


# ----------------------------------------------------------------------------- diffusion


SUBJECT_BACKGROUND = (240, 140, 20)  # orange: a background the base model never sees
SUBJECT_PROMPT = "a photo of sks"


def _subject_images(n: int, size: int, seed: int = 1) -> list[Any]:
    from PIL import Image

    from mm_pipelines.models.demo.shapes import heldout_split

    shapes, _ = heldout_split(n, seed=seed, size_px=size)
    out = []
    for im in shapes:  # keep each shape, paint its background orange
        arr = np.asarray(im).copy()
        corner = arr[0, 0].astype(int)
        mask = np.abs(arr.astype(int) - corner).sum(-1) < 40
        arr[mask] = SUBJECT_BACKGROUND
        out.append(Image.fromarray(arr))
    return out


def part_diffusion_base(c: Check) -> dict[str, Any]:
    from mm_pipelines.models.demo.shapes import iter_samples
    from mm_pipelines.models.demo.tiny_diffusion import (
        BaseTrainConfig,
        TinyDiffusionConfig,
        train_base_pipeline,
    )

    samples = list(iter_samples("train", c.size(512, 16), seed=0, size_px=32))
    cfg = BaseTrainConfig(vae_steps=c.size(600, 10), unet_steps=c.size(600, 10))
    out_dir = c.work / "diffusion_base"
    result, secs = timed(
        c,
        lambda: train_base_pipeline(
            [s.image for s in samples],
            [s.caption for s in samples],
            model_config=TinyDiffusionConfig(resolution=32),
            train_config=cfg,
            device=c.device,
            output_dir=out_dir,
        ),
    )
    c.state["base_dir"] = str(out_dir)
    return {
        "images": len(samples),
        "seconds": round(secs, 2),
        "vae_steps": cfg.vae_steps,
        "unet_steps": cfg.unet_steps,
        "vae_loss_first_last": [result.vae_losses[0], result.vae_losses[-1]],
        "unet_loss_first_last": [result.unet_losses[0], result.unet_losses[-1]],
    }


def _load_base(c: Check) -> Any:
    from mm_pipelines.models.diffusion.pipeline import load_pipeline

    return load_pipeline(c.need("base_dir"), device=c.device, precision="auto")


def part_lora(c: Check) -> dict[str, Any]:
    import dataclasses

    from mm_pipelines.models.diffusion.evaluation import clip_features, validation_metric
    from mm_pipelines.models.diffusion.lora import LoraTrainConfig, train_lora

    images = _subject_images(c.size(8, 4), 32)
    references = _subject_images(8, 32, seed=2)
    n = c.size(50, 3)
    metric = validation_metric("clip_distance", references, clip_features(c.need("clip")))
    cfg = LoraTrainConfig(
        rank=4,
        alpha=4.0,
        learning_rate=1e-3,
        steps=2 * n,
        batch_size=4,
        checkpoint_every=n,
        validation_every=n,
        validation_prompts=(SUBJECT_PROMPT,),
        validation_seeds=(0, 1),
        validation_inference_steps=c.size(10, 2),
        noise_offset=0.1,
    )

    def run(config: LoraTrainConfig, out: Path, metric_fn=metric) -> Any:
        return train_lora(
            _load_base(c),
            images,
            SUBJECT_PROMPT,
            out,
            config,
            device=c.device,
            validation_metric=metric_fn,
        )

    whole, secs = timed(c, lambda: run(cfg, c.work / "lora_whole"))
    c.state["adapter_dir"] = str(whole.adapter_dir)
    first = run(dataclasses.replace(cfg, steps=n), c.work / "lora_resumed")
    resumed = run(cfg, c.work / "lora_resumed")
    tail = np.abs(np.array(resumed.losses[n:]) - np.array(whole.losses[n:]))
    early = run(
        dataclasses.replace(
            cfg,
            steps=4 * n,
            validation_every=max(1, n // 2),
            early_stopping_patience=1,
            early_stopping_min_delta=1e9,  # nothing counts as better: stop at validation 2
            checkpoint_every=0,
        ),
        c.work / "lora_early",
    )
    return {
        "dtype": whole.params["dtype"],
        "steps": whole.steps_done,
        "seconds": round(secs, 2),
        "ms_per_step_with_validation": round(1000 * secs / whole.steps_done, 1),
        "loss_first_last": [whole.losses[0], whole.losses[-1]],
        "validation_history": whole.validation_history,
        "best_step": whole.best_step,
        "resume": {
            "first_run_steps": first.steps_done,
            "resumed_from_step": resumed.resumed_from_step,
            "steps_after_resume": resumed.steps_done,
            "max_abs_loss_diff_vs_uninterrupted": float(tail.max()) if len(tail) else None,
        },
        "early_stopping": {
            "stopped_early": early.stopped_early,
            "steps_done": early.steps_done,
            "best_step": early.best_step,
            "validations": len(early.validation_history),
        },
    }


def part_generation(c: Check) -> dict[str, Any]:
    from mm_pipelines.models.diffusion.generate import generate_images
    from mm_pipelines.models.diffusion.lora import load_adapter

    pipe = load_adapter(_load_base(c), c.need("adapter_dir"))
    steps = c.size(25, 3)
    seeds = list(range(c.size(16, 4)))  # KID needs >= 3 images a side
    prompts = [SUBJECT_PROMPT, "a red circle on a white background"]
    generate_images(pipe, prompts[:1], seeds[:1], num_inference_steps=2)  # warm-up
    gens, secs = timed(
        c, lambda: generate_images(pipe, prompts, seeds, batch_size=8, num_inference_steps=steps)
    )
    alone = generate_images(pipe, prompts[:1], [seeds[-1]], num_inference_steps=steps)[0]
    in_batch = gens[len(seeds) - 1]
    diff = np.abs(np.asarray(alone.image, int) - np.asarray(in_batch.image, int)).max()
    c.state["adapted_images"] = [g.image for g in gens if g.params.prompt == SUBJECT_PROMPT]
    return {
        "images": len(gens),
        "steps": steps,
        "seconds": round(secs, 2),
        "images_per_s": round(len(gens) / secs, 2),
        "same_seed_alone_vs_in_batch_max_abs_diff": int(diff),
    }


def part_quality_report(c: Check) -> dict[str, Any]:
    from mm_pipelines.models.diffusion.evaluation import clip_features, quality_report
    from mm_pipelines.models.diffusion.generate import generate_images

    bundle = c.need("clip")
    adapted = c.need("adapted_images")
    base = [
        g.image
        for g in generate_images(
            _load_base(c),
            [SUBJECT_PROMPT],
            list(range(len(adapted))),
            num_inference_steps=c.size(25, 3),
        )
    ]
    references = _subject_images(c.size(16, 4), 32, seed=2)
    report, secs = timed(
        c,
        lambda: quality_report(
            references, adapted, base, "an orange background", bundle, clip_features(bundle)
        ),
    )
    keep = ("clip_score", "fid", "kid_mean", "n_real", "n_fake")
    return {
        "seconds": round(secs, 2),
        "adapter": {k: report["adapter"][k] for k in keep},
        "base": {k: report["base"][k] for k in keep},
        "fid_ratio_to_base": report["fid_ratio_to_base"],
        "clip_score_delta": report["clip_score_delta"],
    }


# ----------------------------------------------------------------------------- attention


def part_attention(c: Check) -> dict[str, Any]:
    """The same UNet and CLIP-tower inputs under each SDPA backend choice: time and the
    largest difference to the math backend. `cudnn_off` is what issue 18's switch does."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mm_pipelines.models.clip.loading import load_clip
    from mm_pipelines.models.common import autocast, resolve_dtype

    pipe = _load_base(c)
    dtype = resolve_dtype(c.device, "auto")
    clip = load_clip("ViT-B-32", None, device=c.device)
    gen = torch.Generator().manual_seed(0)
    b = c.size(32, 2)
    latents = torch.randn((b, 4, 8, 8), generator=gen).to(c.device, pipe.unet.dtype)
    text = torch.randn((b, 77, pipe.text_encoder.config.hidden_size), generator=gen)
    text = text.to(c.device, pipe.unet.dtype)
    t = torch.full((b,), 500, device=c.device)
    pixels = torch.randn((c.size(64, 2), 3, 224, 224), generator=gen).to(c.device)

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            unet = pipe.unet(latents, t, text, return_dict=False)[0].float()
            with autocast(c.device, dtype):
                tower = clip.model.encode_image(pixels).float()
        return unet, tower

    choices: dict[str, Callable[[], Any]] = {"math": lambda: sdpa_kernel([SDPBackend.MATH])}
    choices["default"] = contextlib.nullcontext
    if c.cuda:
        choices["cudnn_off"] = _cudnn_sdp_off
        choices["flash"] = lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])
        choices["efficient"] = lambda: sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])
        choices["cudnn"] = lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
    out: dict[str, Any] = {"dtype": str(pipe.unet.dtype)}
    reference = None
    for name, ctx in choices.items():
        try:
            with ctx():
                forward()  # warm-up / kernel selection
                runs = []
                for _ in range(3):
                    (unet, tower), secs = timed(c, forward)
                    runs.append(secs)
            if reference is None:
                reference = (unet, tower)
            out[name] = {
                "ms": round(1000 * statistics.median(runs), 2),
                "unet_max_abs_diff_vs_math": float((unet - reference[0]).abs().max()),
                "clip_max_abs_diff_vs_math": float((tower - reference[1]).abs().max()),
            }
        except Exception as exc:  # noqa: BLE001 - a backend the inputs do not support
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return out


@contextlib.contextmanager
def _cudnn_sdp_off() -> Iterator[None]:
    """torch.backends.cuda.enable_cudnn_sdp(False) for the block, restored after."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


# ----------------------------------------------------------------------------- export


def part_export(c: Check) -> dict[str, Any]:
    from mm_pipelines.models.clip.loading import TINY_ARCH
    from mm_pipelines.serving.export import export_bundle

    result, secs = timed(
        c,
        lambda: export_bundle(
            c.work / "bundle",
            clip_architecture=TINY_ARCH,
            clip_checkpoint=c.need("clip_checkpoint"),
            projector_dir=c.need("projector_dir"),
            diffusion_base_dir=c.need("base_dir"),
            lora_adapter_dir=c.need("adapter_dir"),
            include_audio=False,  # Whisper is the other run's; its check is in its parts
        ),
    )
    checks = result.manifest["verification"]["checks"]
    return {
        "seconds": round(secs, 2),
        "runs_on": "cpu (serving bundles are CPU TorchScript by design)",
        "bundle_version": result.bundle_version,
        "max_abs_diff": {k: v["max_abs_diff"] for k, v in checks.items()},
        "all_within_bounds": all(v["ok"] for v in checks.values()),
    }


# ----------------------------------------------------------------------------- Whisper


def _stub_av() -> None:
    """faster-whisper imports PyAV at module level but uses it only to decode files; the
    check hands it decoded arrays, so on a box without the 34 MiB PyAV wheel an empty
    module stands in (only when PyAV is really missing)."""
    try:
        import av  # noqa: F401
    except ImportError:
        sys.modules["av"] = types.ModuleType("av")


def _speech(c: Check) -> tuple[list[np.ndarray], list[str], list[str]]:
    """The shipped speech clips as 16 kHz float32 (from --speech, else decoded here)."""
    if "speech" not in c.state:
        refs = json.loads((SPEECH_DIR / "transcripts.json").read_text())
        names = sorted(refs)
        if c.args.speech:
            data = np.load(c.args.speech)
            clips = [data[n].astype(np.float32) / 32768.0 for n in names]
        else:
            from mm_pipelines.models.speech.whisper import load_audio

            clips = [load_audio(SPEECH_DIR / n) for n in names]
        c.state["speech"] = (clips, [refs[n] for n in names], names)
    return c.state["speech"]


def _words(text: str) -> list[str]:
    import re

    return re.sub(r"[^a-z' ]", " ", text.lower()).split()


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Word-level edit distance over all clips / reference words (jiwer's WER)."""
    errors = total = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        r, h = _words(ref), _words(hyp)
        row = list(range(len(h) + 1))
        for i, rw in enumerate(r, 1):
            prev, row[0] = row[0], i
            for j, hw in enumerate(h, 1):
                prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (rw != hw))
        errors += row[-1]
        total += len(r)
    return errors / max(1, total)


def _whisper_devices(c: Check) -> list[str]:
    if c.args.whisper_devices:
        return c.args.whisper_devices.split(",")
    return [c.args.device] if c.args.device == "cpu" else [c.args.device, "cpu"]


def _model_dir(c: Check) -> str:
    if c.args.whisper_model_dir:
        return str(c.args.whisper_model_dir)
    from mm_pipelines.models.speech.audio_encoder import default_model_dir

    return default_model_dir()


def _per_device(c: Check, fn: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for device in _whisper_devices(c):
        try:
            out[device] = fn(device)
        except Exception as exc:  # noqa: BLE001 - reported; the CPU run still happens
            error = f"{type(exc).__name__}: {str(exc)[:400]}"
            out[device] = {"error": error}
            if device.startswith("cuda"):
                c.whisper_cuda_errors.append(error)
    return out


def part_whisper_transcribe(c: Check) -> dict[str, Any]:
    _stub_av()
    from mm_pipelines.models.speech.whisper import load_model, transcribe_many

    clips, refs, _ = _speech(c)
    model_dir = _model_dir(c)
    audio_s = sum(len(x) for x in clips) / 16_000
    repeat = c.size(8, 1)

    def run(device: str) -> dict[str, Any]:
        model, load_s = timed(c, lambda: load_model(model_dir, device))
        transcribe_many(clips[:1], model=model)  # warm-up
        results, secs = timed(c, lambda: transcribe_many(clips, model=model))
        many, many_s = timed(c, lambda: transcribe_many(clips * repeat, model=model))
        assert all(not isinstance(r, Exception) for r in [*results, *many])
        return {
            "compute_type": model.device.compute_type,
            "load_s": round(load_s, 2),
            "wer": round(word_error_rate(refs, [r.text for r in results]), 4),
            "audio_s": round(audio_s, 1),
            "rtf": round(secs / audio_s, 4),
            "rtf_batched_many": round(many_s / (audio_s * repeat), 4),
            "files_many": len(many),
        }

    return _per_device(c, run)


def part_audio_embeddings(c: Check) -> dict[str, Any]:
    _stub_av()
    from mm_pipelines.models.speech.audio_encoder import embed_audio_batch, load_whisper_encoder

    clips, _, _ = _speech(c)
    model_dir = _model_dir(c)
    audio_s = sum(len(x) for x in clips) / 16_000
    vectors: dict[str, np.ndarray] = {}

    def run(device: str) -> dict[str, Any]:
        encoder = load_whisper_encoder(model_dir, device=device)
        embed_audio_batch(encoder, clips[:1])  # warm-up
        vecs, secs = timed(c, lambda: embed_audio_batch(encoder, clips))
        vectors[device] = vecs
        return {
            "version": encoder.model_version,
            "dim": encoder.dim,
            "rtf": round(secs / audio_s, 5),
            "norms_ok": bool(np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-3)),
        }

    out = _per_device(c, run)
    if len(vectors) == 2:
        a, b = vectors.values()
        out["min_cosine_between_devices"] = float((a * b).sum(axis=1).min())
    return out


def _cublas13_shim() -> str | None:
    """A folder where libcublas(Lt).so.12 name torch's cuBLAS 13 (found in this process's
    memory map after a matmul), for CTranslate2's dlopen("libcublas.so.12")."""
    a = torch.ones(8, 8, device="cuda")
    (a @ a).sum().item()
    libs: dict[str, str] = {}
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            name = os.path.basename(path)
            if name.startswith("libcublasLt.so"):
                libs["libcublasLt"] = path
            elif name.startswith("libcublas.so"):
                libs["libcublas"] = path
    if len(libs) != 2:
        return None
    shim = Path(tempfile.mkdtemp(prefix="mm_cublas_shim_"))
    for stem, path in libs.items():
        for version in ("12", "13"):
            (shim / f"{stem}.so.{version}").symlink_to(path)
    return str(shim)


def part_whisper_cublas_shim(c: Check) -> dict[str, Any]:
    if not c.cuda or not any("libcublas" in e for e in c.whisper_cuda_errors):
        return {"skipped": "CTranslate2 did not miss libcublas.so.12 (or no CUDA run)"}
    shim = _cublas13_shim()
    if shim is None:
        return {"error": "torch's cuBLAS libraries were not found in the memory map"}
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{shim}:{env.get('LD_LIBRARY_PATH', '')}"
    cmd = [
        sys.executable,
        __file__,
        "--device",
        c.args.device,
        "--parts",
        "whisper_transcribe,audio_embeddings",
        "--whisper-devices",
        c.args.device,
        "--workdir",
        str(c.work / "shim"),
    ]
    for flag in ("whisper_model_dir", "speech"):
        if getattr(c.args, flag):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(c.args, flag))]
    if c.quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    try:
        child = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": f"exit {proc.returncode}", "stderr": proc.stderr[-2000:]}
    return {"shim": shim, **{k: child["parts"].get(k) for k in WHISPER_PARTS[:2]}}


# ----------------------------------------------------------------------------- main


PARTS: dict[str, Callable[[Check], dict[str, Any]]] = {
    name: globals()[f"part_{name}"] for name in (*TORCH_PARTS, *WHISPER_PARTS)
}


def _selected(spec: str) -> list[str]:
    groups = {"torch": TORCH_PARTS, "whisper": WHISPER_PARTS, "all": tuple(PARTS)}
    names: list[str] = []
    for item in spec.split(","):
        for name in groups.get(item, (item,)):
            if name not in PARTS:
                raise SystemExit(f"unknown part {name!r}; known: {', '.join(PARTS)}")
            if name not in names:
                names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="toy sizes (CPU smoke run)")
    parser.add_argument("--parts", default="all", help="torch | whisper | all | a,b,c")
    parser.add_argument("--no-cudnn-sdp", action="store_true", help="cuDNN SDPA off for all")
    parser.add_argument("--whisper-model-dir", default=None)
    parser.add_argument("--whisper-devices", default=None, help="default: DEVICE,cpu")
    parser.add_argument("--speech", default=None, help="speech16k.npz (gpu_wheels.sh)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None, help="also write the JSON here, after each part")
    args = parser.parse_args()

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU (use --device cpu --quick)")
    if args.no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    check = Check(args)
    report: dict[str, Any] = {
        "benchmark": "gpu_check",
        "device": args.device,
        "no_cudnn_sdp": args.no_cudnn_sdp,
        "parts": {},
    }
    t_all = time.perf_counter()
    for name in _selected(args.parts):
        t0 = time.perf_counter()
        try:
            result: dict[str, Any] = {"ok": True, **PARTS[name](check)}
        except Skip as skip:
            result = {"ok": False, "skipped": str(skip)}
        except Exception as exc:  # noqa: BLE001 - one part's failure must not stop the rest
            result = {
                "ok": False,
                "error": f"{type(exc).__name__}: {str(exc)[:1000]}",
                "traceback": traceback.format_exc()[-3000:],
            }
        result["wall_s"] = round(time.perf_counter() - t0, 2)
        report["parts"][name] = result
        print(f"[gpu_check] {name}: ok={result['ok']} {result['wall_s']} s", file=sys.stderr)
        if args.out:  # a native crash later (CTranslate2, a driver) keeps what was measured
            Path(args.out).write_text(json.dumps(report, default=str))
    report["wall_s"] = round(time.perf_counter() - t_all, 1)
    report["failed"] = [k for k, v in report["parts"].items() if not v["ok"]]
    if check.cuda:
        report["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if args.out:
        Path(args.out).write_text(json.dumps(report, default=str))
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
