"""Encoding efficiency: images/s end to end through clip_encode vs the raw model forward.

End to end = read JPEG/PNG files from disk, decode, preprocess, forward, collect
normalised float32 vectors. Raw = the same model's forward on tensors that were decoded
and preprocessed beforehand (PIL, full-size decode), run before, between and after the
end-to-end runs (medians compared). Same model (ViT-B-32, random weights:
throughput does not depend on the weights), same batch size, same run.

    .venv/bin/python benchmarks/bench_clip_encode.py [--device cpu|cuda] [--images 160]
        [--batch-size 32] [--workers N] [--decode auto|pil|device] [--rounds 2]
        [--formats mixed|jpeg]

On CUDA the default input path decodes JPEGs with nvJPEG and resizes on the GPU; on CPU
it is PIL in worker processes with JPEG draft decoding. The vectors of the end-to-end
run are compared with the raw run's (PIL, no draft): `max_cosine_distance_vs_full_decode`
measures what draft decoding (CPU) or nvJPEG + the device resize (CUDA) change.

Prints one JSON object. Targets: ratio >= 0.9 on CPU, >= 0.7 on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mm_pipelines.models.clip.encode import encode_images, open_image
from mm_pipelines.models.clip.loading import load_clip


def make_photos(folder: Path, n: int, seed: int = 0, formats: str = "mixed") -> list[str]:
    """Photo-like 640x480 files (smooth colour fields + shapes + grain); ``formats``
    "mixed": 3 JPEG : 1 PNG, "jpeg": JPEG only. Made in parallel (PNG encoding of grain
    is slow)."""
    jobs = [(folder, i, seed, formats) for i in range(n)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(_make_photo, jobs, chunksize=16))


def _make_photo(job: tuple[Path, int, int, str]) -> str:
    folder, i, seed, formats = job
    rng = np.random.default_rng((seed, i))
    low = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    base = Image.fromarray(low).resize((640, 480), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(4):
        x, y, r = rng.integers(0, 640), rng.integers(0, 480), rng.integers(20, 120)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.integers(0, 255, 3).tolist()))
    pixels = np.asarray(base, np.float32) + rng.normal(0, 8, (480, 640, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    png = formats == "mixed" and i % 4 == 3
    path = folder / (f"{i:04d}.png" if png else f"{i:04d}.jpg")
    img.save(path) if png else img.save(path, quality=90)
    return str(path)


def raw_forward(bundle, tensors: torch.Tensor, batch_size: int) -> tuple[float, np.ndarray]:
    """Seconds for the model alone over pre-decoded, pre-processed tensors (+ its vectors)."""
    out = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for k in range(0, len(tensors), batch_size):
            x = tensors[k : k + batch_size].to(bundle.device, dtype=bundle.input_dtype)
            with bundle.autocast():
                feats = bundle.model.encode_image(x)
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
    if bundle.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, np.concatenate(out)


def _max_cosine_distance(a: np.ndarray, b: np.ndarray) -> float | None:
    return float((1 - (a * b).sum(axis=1)).max()) if len(a) else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--decode", default="auto", choices=["auto", "pil", "device"])
    parser.add_argument("--rounds", type=int, default=2, help="end-to-end runs")
    parser.add_argument("--formats", default="mixed", choices=["mixed", "jpeg"])
    args = parser.parse_args()

    bundle = load_clip("ViT-B-32", None, device=args.device)
    with tempfile.TemporaryDirectory(prefix="bench_clip_") as tmp:
        paths = make_photos(Path(tmp), args.images, formats=args.formats)
        disk_bytes = sum(os.path.getsize(p) for p in paths)
        # Warm-up: first-call allocations and kernel selection, for both paths alike; on
        # CUDA the first call also starts the reader processes the process keeps
        warm = paths[: 2 * args.batch_size]
        first = encode_images(
            bundle, warm, args.batch_size, num_workers=args.workers, decode=args.decode
        )
        pre = torch.stack([bundle.preprocess(open_image(p)) for p in paths])
        raw_forward(bundle, pre[: args.batch_size], args.batch_size)

        # raw, e2e, raw, e2e, ..., raw: medians of each, so load drift hits both alike
        raw_runs, e2e_runs = [], []
        raw_s, reference = raw_forward(bundle, pre, args.batch_size)
        raw_runs.append(raw_s)
        for _ in range(args.rounds):
            e2e = encode_images(
                bundle, paths, args.batch_size, num_workers=args.workers, decode=args.decode
            )
            e2e_runs.append(e2e.stats["seconds"])
            raw_runs.append(raw_forward(bundle, pre, args.batch_size)[0])

    raw_ips = args.images / statistics.median(raw_runs)
    e2e_ips = len(e2e.indices) / statistics.median(e2e_runs)
    ref = reference[e2e.indices]
    is_jpeg = np.array([paths[i].endswith(".jpg") for i in e2e.indices])
    print(
        json.dumps(
            {
                "benchmark": "clip_encode_images",
                "model": "ViT-B-32 (random weights)",
                "device": str(bundle.device),
                "gpu": torch.cuda.get_device_name(bundle.device)
                if bundle.device.type == "cuda"
                else None,
                "precision": bundle.precision,
                "decode": "device" if e2e.stats["decode_on_device"] else "pil",
                "images": args.images,
                "image_files": "640x480, "
                + ("3 JPEG : 1 PNG" if args.formats == "mixed" else "JPEG only"),
                "disk_mb": round(disk_bytes / 1e6, 1),
                "batch_size": args.batch_size,
                "workers": int(e2e.stats["workers"]),
                "torch_threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(),
                "raw_forward_images_per_s": round(raw_ips, 2),
                "raw_forward_runs_s": [round(t, 2) for t in raw_runs],
                "end_to_end_runs_s": [round(t, 2) for t in e2e_runs],
                "end_to_end_images_per_s": round(e2e_ips, 2),
                "warm_up_call": {"images": len(warm), "seconds": round(first.stats["seconds"], 2)},
                "end_to_end_loader_wait_s": round(e2e.stats["loader_wait_s"], 2),
                "end_to_end_model_s": round(e2e.stats["model_s"], 2),
                "jpegs_decoded_on_device": int(e2e.stats.get("device_decoded", 0)),
                "cpu_fallbacks": int(e2e.stats.get("cpu_fallback", 0)),
                "decode_errors": len(e2e.errors),
                "ratio": round(e2e_ips / raw_ips, 3),
                "target_ratio": 0.7 if bundle.device.type == "cuda" else 0.9,
                "max_cosine_distance_vs_full_decode": {
                    "jpeg": _max_cosine_distance(e2e.vectors[is_jpeg], ref[is_jpeg]),
                    "png": _max_cosine_distance(e2e.vectors[~is_jpeg], ref[~is_jpeg]),
                },
                "python": platform.python_version(),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
