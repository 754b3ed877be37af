"""Ingestion throughput vs the raw read+sha256 limit, and the cost of a re-run.

Run: .venv/bin/python benchmarks/bench_ingest.py [--mb-per-file 48 --files 6]
Prints one JSON object. Both measurements run in the same process on the same files,
with the page cache warmed first, so the ratio is what matters on a noisy machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from mm_pipelines.pipeline.ingest import ingest_batch
from mm_pipelines.pipeline.sample_data import write_sample_batch
from mm_pipelines.storage.landing import LocalLanding
from mm_pipelines.storage.media_store import LocalMediaStore


def noise_video(path: Path, megabytes: int, seed: int) -> None:
    """An MPEG-4 video of random pixels: large, real and quick to encode."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=25, options={"qscale": "2"})
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        written = 0
        while written < megabytes * 1_000_000:
            pixels = rng.integers(0, 255, (360, 640, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                written += packet.size
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def pcm_wav(path: Path, megabytes: int, seed: int) -> None:
    samples = megabytes * 500_000
    noise = np.random.default_rng(seed).normal(0, 3000, samples).astype("<i2").tobytes()
    header = b"RIFF" + (36 + len(noise)).to_bytes(4, "little") + b"WAVEfmt "
    header += (16).to_bytes(4, "little") + (1).to_bytes(2, "little") + (1).to_bytes(2, "little")
    header += (16000).to_bytes(4, "little") + (32000).to_bytes(4, "little")
    header += (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
    path.write_bytes(header + b"data" + len(noise).to_bytes(4, "little") + noise)


def read_and_hash(paths: list[Path]) -> float:
    started = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            hashlib.file_digest(f, "sha256")
    return time.perf_counter() - started


def measure(landing: Path, batch: str, dsn: str, store_dir: Path, workers: int) -> dict:
    files = sorted(
        p for p in (landing / batch).rglob("*") if p.is_file() and not p.name.startswith("_")
    )
    total = sum(p.stat().st_size for p in files)
    read_and_hash(files)  # warm the page cache for both sides
    limit_s = read_and_hash(files)
    store = LocalMediaStore(store_dir)
    first = ingest_batch(LocalLanding(landing), batch, store, dsn, workers=workers)
    second = ingest_batch(LocalLanding(landing), batch, store, dsn, workers=workers)
    return {
        "files": len(files),
        "megabytes": round(total / 1e6, 1),
        "limit_read_sha256_mb_s": round(total / 1e6 / limit_s, 1),
        "ingest_mb_s": round(total / 1e6 / first.elapsed_s, 1),
        "ingest_files_s": round(len(files) / first.elapsed_s, 1),
        "ratio_ingest_vs_limit": round(limit_s / first.elapsed_s, 3),
        "first_run_s": round(first.elapsed_s, 3),
        "rerun_s": round(second.elapsed_s, 3),
        "ratio_rerun_vs_first": round(second.elapsed_s / first.elapsed_s, 4),
        "ok": first.ok,
        "quarantined": first.quarantined,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb-per-file", type=int, default=48)
    parser.add_argument("--files", type=int, default=6)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()

    from mm_pipelines.storage.postgres import embedded_server

    with tempfile.TemporaryDirectory(prefix="mm-bench-") as tmp:
        root = Path(tmp)
        server = embedded_server(root / "pg", cleanup_mode="delete")
        dsn = server.get_uri()
        large = root / "landing" / "large"
        large.mkdir(parents=True)
        for i in range(args.files):
            if i % 3 == 2:
                pcm_wav(large / f"podcast_{i}.wav", args.mb_per_file, i)
            else:
                noise_video(large / f"clip_{i}.mp4", args.mb_per_file, i)
        write_sample_batch(root / "landing", "mixed")
        result = {
            "benchmark": "ingest",
            "cpu_count": os.cpu_count(),
            "workers": args.workers,
            "large_files": measure(root / "landing", "large", dsn, root / "store", args.workers),
            "demo_batch": measure(root / "landing", "mixed", dsn, root / "store2", args.workers),
            "targets": {
                "ratio_ingest_vs_limit": ">= 0.5 (large files)",
                "ratio_rerun_vs_first": "<= 0.1",
            },
        }
        server.cleanup()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
