"""Frame sampling benchmark: our sampler vs the naive OpenCV baseline, same video, same run.

    .venv/bin/python benchmarks/bench_frames.py [--seconds 60] [--repeats 3]

Writes a 60 s 1280x720 30 fps H.264 video (libx264 preset veryfast, x264's default
GOP: keyint 250 with scene-cut keyframes; 8 shots of panning texture), then times, each
`repeats` times in interleaved order (median reported):

* opencv_seek: the seed design's baseline: one `cap.set(CAP_PROP_POS_FRAMES, i)` +
  `read()` per frame for the 16 uniform frames (slice centres);
* ours: `iter_frames(Uniform(n=16))` with the default decoder (PyAV) and the default
  keyframe snap (a keyframe within half a slice of its centre is taken instead of the
  centre frame); also exact centres (snap=0, the same frames as the baseline) and
  decord alone;
* fps=1: sampled frames per second of wall time for `Fps(1)`;
* scene: decoded frames per second of the full scan (`Scene()`).

Prints one JSON object. The machine is shared: `loadavg_1m` says how busy it was.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mm_pipelines.models.video import frames as F  # noqa: E402

WIDTH, HEIGHT, FPS = 1280, 720, 30
SHOTS = 8


def write_video(path: Path, seconds: int) -> None:
    """8 shots, each a different blocky texture panning 4 px per frame."""
    rng = np.random.default_rng(0)
    per_shot = seconds * FPS // SHOTS
    span = WIDTH + per_shot * 4
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": "veryfast"}
        for shot in range(SHOTS):
            # Texture made directly in YUV 4:2:0 (cheap to generate, no RGB conversion);
            # each shot has its own brightness band and tint.
            low = 16 + 16 * shot
            y = rng.integers(low, low + 96, (HEIGHT // 8, span // 8 + 1), dtype=np.uint8)
            y = np.repeat(np.repeat(y, 8, 0), 8, 1)
            u = np.full((HEIGHT // 2, span // 2 + 8), rng.integers(60, 200), np.uint8)
            v = np.full((HEIGHT // 2, span // 2 + 8), rng.integers(60, 200), np.uint8)
            for k in range(per_shot):
                o = 4 * k
                plane_u = u[:, o // 2 : o // 2 + WIDTH // 2].reshape(HEIGHT // 4, WIDTH)
                plane_v = v[:, o // 2 : o // 2 + WIDTH // 2].reshape(HEIGHT // 4, WIDTH)
                buf = np.concatenate([y[:, o : o + WIDTH], plane_u, plane_v])
                frame = av.VideoFrame.from_ndarray(buf, format="yuv420p")
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def opencv_seek(path: Path, indices: list[int]) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    for i in indices:
        cap.set(cv2.CAP_PROP_POS_FRAMES, i)
        ok, bgr = cap.read()
        if not ok:
            raise RuntimeError(f"opencv could not read frame {i}")
        frames.append(bgr[..., ::-1])
    cap.release()
    return frames


def ours(path: Path, strategy, decoders=None) -> list[F.SampledFrame]:
    return list(F.iter_frames(path, [strategy], decoders=decoders))


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.mp4"
        encode_s, _ = timed(lambda: write_video(path, args.seconds))
        info = F.probe_video(path)
        exact = F.plan_frames(F.Uniform(n=16, keyframe_snap=0), info)
        snapped = F.plan_frames(F.Uniform(n=16), info)

        cases = {
            "opencv_seek": lambda: opencv_seek(path, exact),
            "ours": lambda: ours(path, F.Uniform(n=16)),
            "ours_exact": lambda: ours(path, F.Uniform(n=16, keyframe_snap=0)),
            "ours_decord": lambda: ours(path, F.Uniform(n=16), ["decord"]),
            "ours_decord_exact": lambda: ours(path, F.Uniform(n=16, keyframe_snap=0), ["decord"]),
            "fps1": lambda: ours(path, F.Fps(fps=1)),
            "fps1_decord": lambda: ours(path, F.Fps(fps=1), ["decord"]),
            "scene": lambda: ours(path, F.Scene()),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        results: dict[str, object] = {}
        for _ in range(args.repeats):
            for name, fn in cases.items():
                elapsed, results[name] = timed(fn)
                times[name].append(elapsed)
        median = {name: statistics.median(t) for name, t in times.items()}

        # Same frames as the baseline? (exact mode must match OpenCV's pixels closely)
        diffs = [
            float(np.abs(a.astype(int) - b.image.astype(int)).mean())
            for a, b in zip(results["opencv_seek"], results["ours_exact"], strict=True)
        ]
        base = median["opencv_seek"]
        report = {
            "video": {
                "seconds": args.seconds,
                "size": f"{WIDTH}x{HEIGHT}",
                "fps": FPS,
                "frames": info.num_frames,
                "keyframes": len(info.keyframes),
                "mean_gop_frames": round(info.num_frames / max(1, len(info.keyframes)), 1),
                "codec": "h264 (libx264 veryfast, default keyint 250 + scenecut)",
                "encode_s": round(encode_s, 2),
            },
            "machine": {"cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)},
            "repeats": args.repeats,
            "uniform16": {
                "opencv_seek_s": round(base, 3),
                "ours_s": round(median["ours"], 3),
                "speedup": round(base / median["ours"], 2),
                "ours_exact_s": round(median["ours_exact"], 3),
                "speedup_exact": round(base / median["ours_exact"], 2),
                "ours_decord_s": round(median["ours_decord"], 3),
                "speedup_decord": round(base / median["ours_decord"], 2),
                "ours_decord_exact_s": round(median["ours_decord_exact"], 3),
                "speedup_decord_exact": round(base / median["ours_decord_exact"], 2),
                "frames_snapped_to_keyframes": len(set(snapped) - set(exact)),
                "exact_vs_opencv_max_mean_abs_pixel_diff": round(max(diffs), 2),
            },
            "fps1": {
                "frames": len(results["fps1"]),
                "seconds": round(median["fps1"], 3),
                "frames_per_s": round(len(results["fps1"]) / median["fps1"], 1),
                "decord_frames_per_s": round(
                    len(results["fps1_decord"]) / median["fps1_decord"], 1
                ),
            },
            "scene": {
                "shots": SHOTS,
                "shot_starts_found": len(results["scene"]),
                "seconds": round(median["scene"], 3),
                "decoded_frames_per_s": round(info.num_frames / median["scene"], 1),
            },
            "times_s": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
