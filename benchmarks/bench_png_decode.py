"""PNG decoding for the CLIP readers: ours (`decode_png`: ISA-L inflates, Wuffs
unfilters) vs Wuffs alone (the readers' decoder before) vs libpng through torchvision (the
one before that, in the H100 runs of issue 17) vs PIL (the CPU path's), on the photo PNGs
of bench_clip_encode (640x480, grain). On a GPU box the readers' PNG decoding bounds
encoding of a 3 JPEG : 1 PNG set (issue 17), so this is the stage that moves that ratio.

Two measurements, each decoder in the same run, best of `--rounds` passes with the
decoders taking turns within a round (this machine's speed drifts):
- one process: ms per file;
- the readers: files/s through `iter_raw_batches` with `--workers` processes, with
  `decode_png` swapped for the decoder under test before the workers fork; and the
  readers of the H100 runs (libpng, each task's buffer copied into shared memory by
  the DataLoader) as the baseline of `readers_vs_h100_run_readers`.

Every decoder's pixels are checked equal to PIL's before timing.

    .venv/bin/python benchmarks/bench_png_decode.py [--pngs 128] [--workers 2] [--rounds 3]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_clip_encode import make_photos

from mm_pipelines.models.clip import device_input
from mm_pipelines.models.clip.device_input import (
    decode_png,
    iter_raw_batches,
    pack,
    pil_pixels,
    read_signed,
)
from mm_pipelines.models.clip.png import PNG_SIGNATURE, png_header, wuffs_png_decoder


@functools.cache
def _wuffs_decoder() -> object:
    return wuffs_png_decoder(verify_checksums=True)


def wuffs(data: bytearray) -> torch.Tensor | None:
    """Wuffs alone on the file's bytes, checksums on: the readers' decoder before ours
    (the photos are opaque RGB: no transparency check needed)."""
    if png_header(data) is None:
        return None
    result = _wuffs_decoder().decode(bytes(data))
    return None if result.error_message else torch.from_numpy(result.pixbuf).permute(2, 0, 1)


def libpng(data: bytearray) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_png as torchvision_decode_png

    return torchvision_decode_png(torch.frombuffer(data, dtype=torch.uint8), ImageReadMode.RGB)


def pil(data: bytearray) -> torch.Tensor | None:
    return None  # read_raw then decodes with PIL, as for any PNG the fast decoder leaves


DECODERS: dict[str, Callable[[bytearray], torch.Tensor | None]] = {
    "ours": decode_png,
    "wuffs": wuffs,
    "libpng": libpng,
    "pil": pil,
}


def one_process_ms(paths: list[str], rounds: int) -> dict[str, float]:
    """Best pass of each decoder, the decoders taking turns within every round (this
    machine's speed drifts)."""
    best = dict.fromkeys(DECODERS, float("inf"))
    for _ in range(rounds):
        for name, decode in DECODERS.items():
            t0 = time.perf_counter()
            for path in paths:
                if decode(read_signed(path, (PNG_SIGNATURE,))) is None:
                    pil_pixels(path)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: round(1e3 * secs / len(paths), 3) for name, secs in best.items()}


def readers_seconds(paths: list[str], decode: Callable, workers: int, shared: bool) -> float:
    """One pass of fresh readers (forked after the swap, so the swap reaches them);
    `shared=False` packs a task's buffer in private memory, as before (the DataLoader
    then copies it into shared memory)."""
    device_input.decode_png = decode
    device_input.pack = pack if shared else lambda items, shared=False: pack(items)
    try:
        t0 = time.perf_counter()
        for batch in iter_raw_batches(paths, batch_size=64, workers=workers):
            assert all(kind == "pixels" for _, kind, _, _ in batch)
        return time.perf_counter() - t0
    finally:
        device_input.decode_png, device_input.pack = decode_png, pack


def readers_files_per_s(paths: list[str], workers: int, rounds: int) -> dict[str, float]:
    """Best pass of each reader variant, taking turns within every round; the readers of
    the H100 runs (libpng, private buffers) are one baseline, Wuffs alone the other."""
    variants = {name: (decode, True) for name, decode in DECODERS.items()}
    variants["libpng_private_buffers"] = (libpng, False)
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(rounds):
        for name, (decode, shared) in variants.items():
            best[name] = min(best[name], readers_seconds(paths, decode, workers, shared))
    return {name: round(len(paths) / secs, 1) for name, secs in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pngs", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        made = make_photos(Path(tmp), 4 * args.pngs)  # 3 JPEG : 1 PNG, as in the encoder's
        paths = [p for p in made if p.endswith(".png")]
        for name, decode in DECODERS.items():
            for path in paths[:8]:
                out = decode(read_signed(path, (PNG_SIGNATURE,)))
                assert out is None or torch.equal(out, pil_pixels(path)), (name, path)
        ms = one_process_ms(paths, args.rounds)
        rate = readers_files_per_s(paths, args.workers, args.rounds)
        size_kib = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024
    result = {
        "benchmark": "png_decode",
        "pngs": len(paths),
        "png_kib_mean": round(size_kib, 1),
        "size": "640x480",
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "one_process_ms_per_file": ms,
        "readers_files_per_s": rate,
        "ours_time_vs_wuffs": round(ms["ours"] / ms["wuffs"], 3),
        "ours_time_vs_libpng": round(ms["ours"] / ms["libpng"], 3),
        "ours_time_vs_pil": round(ms["ours"] / ms["pil"], 3),
        "readers_ours_vs_wuffs": round(rate["ours"] / rate["wuffs"], 3),
        "readers_ours_vs_libpng": round(rate["ours"] / rate["libpng"], 3),
        "readers_ours_vs_pil": round(rate["ours"] / rate["pil"], 3),
        "readers_vs_h100_run_readers": round(rate["ours"] / rate["libpng_private_buffers"], 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
