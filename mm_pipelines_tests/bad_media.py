"""Makers of the bad (and good) files the ingestion tests feed in."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import av
import numpy as np
from PIL import Image

from mm_pipelines.pipeline.sample_data import write_video


def png_bytes(colour: tuple[int, int, int] = (200, 30, 30), size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(size: int = 256, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def decompression_bomb_png(side: int = 12_000) -> bytes:
    """A valid, small PNG that declares side x side grey pixels (all zero): 144 Mpx by
    default, above our limit but below the size at which Pillow itself refuses it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    compressor = zlib.compressobj(1)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    parts = [compressor.compress(row) for _ in range(side)]
    idat = b"".join(parts) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds almost no data: Pillow refuses it
    at open() when it declares more than twice Pillow's MAX_IMAGE_PIXELS."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))  # one row; the rest is missing
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def write_mp4(
    path: Path, seconds: float = 2.0, with_audio: bool = True, faststart: bool = False
) -> None:
    fps = 10
    frames = (np.full((48, 64, 3), (i * 20) % 255, np.uint8) for i in range(int(seconds * fps)))
    audio = (
        0.3 * np.sin(np.linspace(0, 440 * 2 * np.pi * seconds, int(16000 * seconds)))
        if with_audio
        else None
    )
    if not faststart:
        write_video(path, frames, fps=fps, audio=audio)
        return
    plain = path.with_suffix(".tmp.mp4")
    write_video(plain, frames, fps=fps, audio=audio)
    # remux with the index in front, as streaming-friendly encoders write it
    with (
        av.open(str(plain)) as src,
        av.open(str(path), "w", options={"movflags": "faststart"}) as dst,
    ):
        streams = {s.index: dst.add_stream_from_template(s) for s in src.streams}
        for packet in src.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                dst.mux(packet)
    plain.unlink()


def write_audio_only_mp4(path: Path, seconds: float = 1.0) -> None:
    tone = 0.3 * np.sin(np.linspace(0, 440 * 2 * np.pi * seconds, int(16000 * seconds)))
    write_video(path, iter(()), audio=tone)


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> None:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    header = b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVE"
    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    path.write_bytes(header + fmt + b"data" + struct.pack("<I", len(pcm)) + pcm)
