"""Write a realistic small landing batch: captioned images, videos with speech, audio,
text documents, and a few broken files the ingestion must quarantine.

Everything is drawn or encoded here, except the speech, which was synthesised once and
ships in `samples/speech/` (see `make_speech_clips.py`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from fractions import Fraction
from importlib import resources
from pathlib import Path

import av
import numpy as np
from PIL import Image

from mm_pipelines.models.demo.shapes import draw_shape
from mm_pipelines.models.speech.whisper import load_audio
from mm_pipelines.storage.landing import MANIFEST, READY_MARKER

SPEECH_DIR = resources.files("mm_pipelines.pipeline") / "samples" / "speech"

_IMAGES = [
    ("red", "circle", "blue"),
    ("yellow", "square", "purple"),
    ("green", "triangle", "white"),
    ("blue", "cross", "yellow"),
    ("white", "circle", "black"),
    ("orange", "square", "green"),
    ("purple", "triangle", "orange"),
    ("black", "cross", "white"),
    ("red", "square", "yellow"),
    ("blue", "circle", "orange"),
    ("green", "cross", "purple"),
    ("yellow", "triangle", "blue"),
    # with the two above, five product shots on the brand's orange backdrop: the demo's
    # LoRA subject (subjects.DEMO_SUBJECT)
    ("green", "circle", "orange"),
    ("white", "square", "orange"),
    ("red", "triangle", "orange"),
]
# Each video is a few scenes of shapes with a hard cut between them, and a spoken clip.
_VIDEOS = [
    ("store_tour.mp4", [("red", "circle", "blue"), ("green", "square", "white")], "clip_02.ogg"),
    (
        "launch_teaser.mp4",
        [("yellow", "cross", "black"), ("blue", "triangle", "orange")],
        "clip_08.ogg",
    ),
]
_AUDIO_CLIPS = ("clip_01.ogg", "clip_03.ogg", "clip_05.ogg")
_BROKEN = ("empty.jpg", "whole.png", "cut_off.png", "not_a_video.mp4")
# Manifest labels the curation heads learn from (`content_heads`). The shapes world has no
# NSFW content, so the demo stands one in: anything on a purple background is "unsafe"
# (two images; no video scene, demo query or LoRA subject has one); the five studio shots
# on the brand's orange backdrop are "high_quality", the other images "low_quality".
UNSAFE_BACKGROUND = "purple"
STUDIO_BACKGROUND = "orange"


def demo_labels(colour: str, shape: str, background: str) -> list[str]:
    """The demo's labelling rule for a drawn shape (tests apply it to held-out shapes)."""
    safety = "unsafe" if background == UNSAFE_BACKGROUND else "safe"
    quality = "high_quality" if background == STUDIO_BACKGROUND else "low_quality"
    return [safety, quality]


_TEXTS = {
    "docs/backpack.txt": "The trail backpack holds thirty litres, is waterproof and comes in "
    "forest green and charcoal. Its padded straps keep long hikes comfortable.",
    "docs/returns_policy.md": "# Returns\n\nEvery order can be returned within thirty days. "
    "Our warehouse in Rotterdam handles returns for European customers.",
    "docs/café menu ünïcode.txt": "Espresso, flat white and a red velvet cake: the café opens "
    "at seven every morning.",
}


def speech_clips() -> dict[str, str]:
    """Shipped speech clips: file name -> reference transcript."""
    return json.loads((SPEECH_DIR / "transcripts.json").read_text())


def write_video(
    path: Path,
    frames: Iterable[np.ndarray],
    fps: int = 10,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
    codec: str = "libx264",
) -> None:
    """Encode RGB frames (H x W x 3 uint8) and optional mono float audio into one file."""
    with av.open(str(path), "w") as out:
        vstream = None
        astream = None
        if audio is not None:
            astream = out.add_stream("aac", rate=sample_rate, layout="mono")
        for frame in frames:
            if vstream is None:
                vstream = out.add_stream(codec, rate=fps)
                vstream.height, vstream.width = frame.shape[:2]
                vstream.pix_fmt = "yuv420p"
            for packet in vstream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        if vstream is not None:
            for packet in vstream.encode():
                out.mux(packet)
        if astream is not None:
            _encode_audio(out, astream, audio, sample_rate)


def _encode_audio(out, stream, audio: np.ndarray, sample_rate: int) -> None:
    samples = audio.astype(np.float32)
    chunk = 1024  # aac frame size
    pts = 0
    for start in range(0, len(samples), chunk):
        part = samples[start : start + chunk]
        frame = av.AudioFrame.from_ndarray(part[None, :], format="fltp", layout="mono")
        frame.sample_rate = sample_rate
        frame.pts = pts
        frame.time_base = Fraction(1, sample_rate)
        pts += len(part)
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)


def scene_frames(
    scenes: Sequence[tuple[str, str, str]],
    seconds_each: float,
    fps: int,
    size: tuple[int, int] = (160, 120),
) -> Iterable[np.ndarray]:
    width, height = size
    for index, (colour, shape, background) in enumerate(scenes):
        img, _ = draw_shape(colour, shape, background, size_px=height, seed=index)
        canvas = Image.new("RGB", size, img.getpixel((0, 0)))
        canvas.paste(img, ((width - height) // 2, 0))
        frame = np.asarray(canvas)
        for _ in range(round(seconds_each * fps)):
            yield frame


def sample_files() -> set[str]:
    """Every path (relative to the batch folder) `write_sample_batch` writes."""
    files = {READY_MARKER, MANIFEST, "images/copy_of_first_photo.png"}
    for index, (colour, shape, background) in enumerate(_IMAGES):
        ext = "jpg" if index % 3 == 2 else "png"
        files.add(f"images/{colour}_{shape}_on_{background}.{ext}")
    files |= {f"video/{name}" for name, _, _ in _VIDEOS}
    files |= {f"audio/{clip}" for clip in _AUDIO_CLIPS}
    files |= set(_TEXTS)
    files |= {f"broken/{name}" for name in _BROKEN}
    return files


def write_sample_batch(
    landing_root: Path, batch: str = "demo-0001", tenant: str = "acme", overwrite: bool = False
) -> Path:
    """Write the demo batch under `landing_root/batch` and mark it ready; return its folder.

    A complete batch already there is kept as it is (a landed batch is immutable), unless
    `overwrite` is set.
    """
    root = Path(landing_root) / batch
    if (root / READY_MARKER).exists() and not overwrite:
        return root
    if root.exists():
        # never delete or overwrite what we did not write: only our own files are rewritten
        ours = sample_files()
        foreign = sorted(
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if (p.is_file() or p.is_symlink()) and p.relative_to(root).as_posix() not in ours
        )
        if foreign:
            shown = ", ".join(foreign[:5]) + (
                f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            )
            raise FileExistsError(
                f"{root} already holds files the sample batch does not write ({shown}): "
                "left untouched; choose another --batch or folder"
            )
        (root / READY_MARKER).unlink(missing_ok=True)  # not ready until rewritten whole
    for sub in ("images", "video", "audio", "docs", "broken"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    manifest: list[dict] = []

    for index, (colour, shape, background) in enumerate(_IMAGES):
        img, caption = draw_shape(colour, shape, background, size_px=128, seed=index)
        ext = "jpg" if index % 3 == 2 else "png"
        rel = f"images/{colour}_{shape}_on_{background}.{ext}"
        img.save(root / rel, quality=92) if ext == "jpg" else img.save(root / rel)
        labels = demo_labels(colour, shape, background)
        manifest.append({"path": rel, "caption": caption, "tenant": tenant, "label": labels})
    # the same product photo delivered twice under another name: stored once
    shutil.copyfile(root / manifest[0]["path"], root / "images/copy_of_first_photo.png")
    manifest.append({**manifest[0], "path": "images/copy_of_first_photo.png"})

    clips = speech_clips()
    for name, scenes, clip in _VIDEOS:
        speech = load_audio(SPEECH_DIR / clip)
        seconds = max(2.0, len(speech) / 16000 / len(scenes) + 0.5)
        write_video(
            root / "video" / name, scene_frames(scenes, seconds, fps=10), fps=10, audio=speech
        )
        manifest.append(
            {"path": f"video/{name}", "caption": clips[clip], "tenant": tenant, "label": "safe"}
        )
    for clip in _AUDIO_CLIPS:
        shutil.copyfile(SPEECH_DIR / clip, root / "audio" / clip)
        manifest.append({"path": f"audio/{clip}", "tenant": tenant, "label": "safe"})
    for rel, text in _TEXTS.items():
        (root / rel).write_text(text, encoding="utf-8")
        manifest.append({"path": rel, "tenant": tenant, "label": "safe"})

    _write_broken_files(root / "broken")
    with open(root / MANIFEST, "w", encoding="utf-8") as f:
        for row in manifest:
            f.write(json.dumps(row) + "\n")
    (root / READY_MARKER).touch()
    return root


def _write_broken_files(folder: Path) -> None:
    (folder / "empty.jpg").write_bytes(b"")
    png = folder / "whole.png"
    draw_shape("red", "circle", "white", size_px=96, seed=1)[0].save(png)
    data = png.read_bytes()
    (folder / "cut_off.png").write_bytes(data[: len(data) // 2])
    png.unlink()
    (folder / "not_a_video.mp4").write_bytes(np.random.default_rng(0).bytes(4096))


# Shapes for measuring search: caption combos that neither the sample batch's images nor
# its video scenes show, drawn with their own seeds (not training seeds either).
HELDOUT_SHAPES = [
    ("orange", "circle", "purple"),
    ("purple", "square", "yellow"),
    ("black", "triangle", "green"),
    ("white", "cross", "blue"),
    ("yellow", "circle", "red"),
    ("green", "square", "black"),
    ("red", "cross", "white"),
    ("blue", "square", "green"),
]


def write_heldout_batch(
    landing_root: Path, batch: str = "heldout-0001", tenant: str = "acme", seed: int = 500
) -> dict[str, str]:
    """Held-out shape images without captions (only their pixels can match a query), marked
    ready; returns caption -> file name."""
    root = Path(landing_root) / batch
    root.mkdir(parents=True, exist_ok=True)
    described, manifest = {}, []
    for index, spec in enumerate(HELDOUT_SHAPES):
        img, caption = draw_shape(*spec, size_px=128, seed=seed + index)
        name = f"shot_{index:02d}.png"  # names say nothing about the content
        img.save(root / name)
        described[caption] = name
        manifest.append({"path": name, "tenant": tenant})
    (root / MANIFEST).write_text("".join(json.dumps(m) + "\n" for m in manifest))
    (root / READY_MARKER).touch()
    return described
