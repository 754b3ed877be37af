"""Detect a file's real type from its bytes and validate it.

`probe` either returns what the file is (modality, mime, dimensions, duration) or raises
`Quarantine` with an error category and a message a person can act on. It never trusts
the extension: the first bytes decide, and the file must decode.
"""

from __future__ import annotations

import mimetypes
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import filetype

# v2: whitespace-only text is quarantined (empty_text)
PROBE_VERSION = "probe-v2"


class Quarantine(Exception):
    """The file is unusable; `category` is a stable machine-readable reason."""

    def __init__(self, category: str, message: str):
        super().__init__(f"{category}: {message}")
        self.category = category
        self.message = message


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 4 << 30
    max_pixels: int = 64_000_000  # a 8k x 8k photo; decompression bombs declare far more
    max_video_pixels: int = 3840 * 2160
    max_duration_s: float = 4 * 3600
    max_text_bytes: int = 20 << 20
    silence_dbfs: float = -60.0  # audio whose peak never reaches this is quarantined


@dataclass(frozen=True)
class Probe:
    modality: str  # image | video | audio | text
    mime: str
    width: int | None = None
    height: int | None = None
    duration_s: float | None = None
    fps: float | None = None
    has_audio: bool | None = None
    text_encoding: str | None = None
    note: str | None = None


def probe(path: Path, display_name: str, limits: Limits) -> Probe:
    size = path.stat().st_size
    if size == 0:
        raise Quarantine("empty_file", "the file has zero bytes")
    if size > limits.max_bytes:
        raise Quarantine("too_large", f"{size} bytes exceeds the limit of {limits.max_bytes}")
    with open(path, "rb") as f:
        head = f.read(8192)
    kind = filetype.guess(head)
    if kind is None:
        result = _probe_text(path, size, limits)
    elif kind.mime.startswith("image/"):
        result = _probe_image(path, kind.mime, limits)
    elif kind.mime.startswith("video/"):
        result = _probe_video(path, kind.mime, limits)
    elif kind.mime.startswith("audio/"):
        result = _probe_audio(path, kind.mime, limits)
    else:
        raise Quarantine(
            "unsupported_type", f"content is {kind.mime}, not image, video, audio or text"
        )
    return _with_extension_note(result, display_name)


def _with_extension_note(result: Probe, display_name: str) -> Probe:
    claimed, _ = mimetypes.guess_type(display_name, strict=False)
    if claimed is None or result.modality == "text":
        return result
    if claimed.split("/")[0] != result.mime.split("/")[0] or _mime_family(claimed) != _mime_family(
        result.mime
    ):
        note = f"extension says {claimed} but the content is {result.mime}; the content wins"
        return Probe(**{**result.__dict__, "note": note})
    return result


def _mime_family(mime: str) -> str:
    aliases = {
        "image/jpg": "image/jpeg",
        "audio/x-wav": "audio/wav",
        "audio/vnd.wave": "audio/wav",
        "audio/mp4": "video/mp4",
        "audio/x-m4a": "video/mp4",
        "audio/m4a": "video/mp4",
    }
    return aliases.get(mime, mime)


def _probe_image(path: Path, mime: str, limits: Limits) -> Probe:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # we apply our own, stricter pixel limit below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            width, height = img.size
            # the header is read without decoding: refuse huge canvases before load()
            if width * height > limits.max_pixels:
                raise Quarantine(
                    "decompression_bomb",
                    f"declares {width}x{height} = {width * height} pixels, above the limit "
                    f"of {limits.max_pixels}",
                )
            img.load()
            fmt = Image.MIME.get(img.format or "", mime)
    except Quarantine:
        raise
    except Image.DecompressionBombError as err:
        # Pillow refuses far beyond its own limit before we see the size: quote ours
        declared = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{declared.group(1)} pixels" if declared else "more pixels than Pillow opens"
        raise Quarantine(
            "decompression_bomb", f"declares {size}, above the limit of {limits.max_pixels}"
        ) from err
    except UnidentifiedImageError as err:
        raise Quarantine("undecodable", f"not a readable image: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:
        category = "truncated" if "truncated" in str(err).lower() else "undecodable"
        raise Quarantine(category, f"image does not decode: {err}") from err
    return Probe("image", fmt, width=width, height=height)


def _open_av(path: Path):
    import av

    try:
        return av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, ValueError, OSError) as err:
        if _mp4_without_index(path):
            raise Quarantine(
                "truncated", "the MP4 has media data but no index (moov box): it was cut off"
            ) from err
        raise Quarantine("undecodable", f"container does not open: {err}") from err


def _mp4_without_index(path: Path) -> bool:
    """True for an ISO-BMFF file whose top-level boxes include `mdat` but no `moov`."""
    boxes = set()
    size = path.stat().st_size
    with open(path, "rb") as f:
        offset = 0
        while offset + 8 <= size:
            f.seek(offset)
            header = f.read(16)
            length, kind = int.from_bytes(header[:4], "big"), header[4:8]
            if length == 1 and len(header) == 16:
                length = int.from_bytes(header[8:16], "big")
            boxes.add(kind)
            if length < 8:
                break
            offset += length
    return b"ftyp" in boxes and b"mdat" in boxes and b"moov" not in boxes


def _probe_video(path: Path, mime: str, limits: Limits) -> Probe:
    import av

    with _open_av(path) as container:
        if not container.streams.video:
            if container.streams.audio and mime in ("video/mp4", "video/quicktime"):
                raise Quarantine("no_video_stream", f"{mime} file has sound but no video stream")
            raise Quarantine("no_video_stream", f"{mime} file has no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > limits.max_video_pixels:
            raise Quarantine("too_large", f"video frame {width}x{height} exceeds the pixel limit")
        duration = _duration(container, stream)
        if duration is not None and duration > limits.max_duration_s:
            raise Quarantine("too_long", f"{duration:.0f} s exceeds {limits.max_duration_s:.0f} s")
        fps = float(stream.average_rate) if stream.average_rate else None
        declared_frames = stream.frames
        has_audio = bool(container.streams.audio)
        try:
            _decode_first_frame(container, stream)
            container.seek(0)
            # demuxing (no decoding) reads every packet: a cut-off file has fewer than its
            # index promises, or errors out part-way
            packets = sum(1 for p in container.demux(stream) if p.size)
        except av.error.FFmpegError as err:
            raise Quarantine("truncated", f"video stream is damaged: {err}") from err
        if declared_frames and packets < declared_frames:
            raise Quarantine(
                "truncated",
                f"only {packets} of the {declared_frames} frames its index declares are present",
            )
    return Probe(
        "video", mime, width=width, height=height, duration_s=duration, fps=fps, has_audio=has_audio
    )


def _decode_first_frame(container, stream) -> None:
    for frame in container.decode(stream):
        if frame is not None:
            return
    raise Quarantine("undecodable", "the video stream has no decodable frame")


def _duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


def _probe_audio(path: Path, mime: str, limits: Limits) -> Probe:
    import av
    import numpy as np

    with _open_av(path) as container:
        if not container.streams.audio:
            raise Quarantine("no_audio_stream", f"{mime} file has no audio stream")
        if container.streams.video and container.streams.video[0].frames > 1:
            return _probe_video(path, "video/mp4" if mime == "audio/mp4" else mime, limits)
        stream = container.streams.audio[0]
        duration = _duration(container, stream)
        if duration is not None and duration > limits.max_duration_s:
            raise Quarantine("too_long", f"{duration:.0f} s exceeds {limits.max_duration_s:.0f} s")
        threshold = 10 ** (limits.silence_dbfs / 20)
        peak, samples = 0.0, 0
        try:
            packets = container.demux(stream)
            # decode only until the sound is proven audible; demux the rest (no decoding)
            # so that a cut-off or damaged container still surfaces as an error
            for packet in packets:
                for frame in packet.decode():
                    samples += frame.samples
                    data = frame.to_ndarray()
                    if data.size:
                        peak = max(peak, float(np.abs(_as_float(data)).max()))
                if peak > threshold:
                    break
            for _ in packets:
                pass
        except av.error.FFmpegError as err:
            raise Quarantine("undecodable", f"audio stream does not decode: {err}") from err
        if samples == 0:
            raise Quarantine("undecodable", "the audio stream has no decodable samples")
        decoded_s = samples / (stream.rate or stream.codec_context.sample_rate or 1)
        if peak <= threshold:
            raise Quarantine(
                "silent_audio",
                f"{decoded_s:.1f} s of audio whose peak never reaches {limits.silence_dbfs} dBFS",
            )
    return Probe("audio", mime, duration_s=duration or decoded_s, has_audio=True)


def _as_float(data):
    import numpy as np

    if np.issubdtype(data.dtype, np.integer):
        return data.astype(np.float32) / float(np.iinfo(data.dtype).max)
    return data


def _probe_text(path: Path, size: int, limits: Limits) -> Probe:
    if size > limits.max_text_bytes:
        raise Quarantine("too_large", f"text of {size} bytes exceeds {limits.max_text_bytes}")
    raw = path.read_bytes()
    try:
        _require_words(raw.decode("utf-8"))
        return Probe("text", "text/plain", text_encoding="utf-8")
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    matches = list(from_bytes(raw))
    if not matches or (b"\x00" in raw and not matches[0].encoding.startswith("utf_")):
        raise Quarantine("unsupported_type", "content is neither a known media type nor text")
    best = matches[0]
    if best.chaos > 0.2:
        raise Quarantine(
            "unknown_text_encoding",
            f"not UTF-8, and the best guess ({best.encoding}) leaves the text garbled",
        )
    # short texts fit several single-byte encodings about equally well; among those,
    # Windows-1252 is by far the most common in practice
    close = [m for m in matches if m.chaos <= best.chaos + 0.1]
    chosen = next((m for m in close if m.encoding == "cp1252"), best)
    _require_words(str(chosen))
    return Probe(
        "text",
        "text/plain",
        text_encoding=chosen.encoding,
        note=f"not UTF-8: decoded as {chosen.encoding}",
    )


def _require_words(text: str) -> None:
    """A text with nothing but whitespace (or a byte-order mark) yields no embedding."""
    if not text.replace("\ufeff", "").strip():
        raise Quarantine("empty_text", "the text has nothing but whitespace")
