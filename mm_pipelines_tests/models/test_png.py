"""The readers' PNG decoder (models.clip.png): ISA-L inflates, Wuffs unfilters, and the
pixels are PIL's; whatever is not exactly an image's scanlines is left to PIL (None).
The colour types and damaged files are covered with the readers in test_clip_input.py."""

from __future__ import annotations

import io
import zlib

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from mm_pipelines.models.clip.device_input import pil_pixels
from mm_pipelines.models.clip.png import PNG_SIGNATURE, decode_png


def _photo(seed: int, width: int = 48, height: int = 36) -> np.ndarray:
    """Colour fields plus grain, height-width-RGB uint8."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8))
    base = np.asarray(low.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


def _pil_png(pixels: np.ndarray, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", **options)
    return out.getvalue()


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, body) of every chunk, in order."""
    chunks, pos = [], len(PNG_SIGNATURE)
    while pos < len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + size]))
        pos += 12 + size
    return chunks


def _png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG of the chunks, with right checksums."""
    parts = [PNG_SIGNATURE]
    for kind, body in chunks:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        parts += [len(body).to_bytes(4, "big"), kind, body, crc]
    return b"".join(parts)


def _with_image_data(data: bytes, compressed: bytes, pieces: int = 1) -> bytes:
    """`data` with its IDAT chunks replaced by `compressed` cut into `pieces` chunks."""
    chunks = _chunks(data)
    first = next(i for i, (kind, _) in enumerate(chunks) if kind == b"IDAT")
    rest = [chunk for chunk in chunks[first:] if chunk[0] != b"IDAT"]
    cuts = np.linspace(0, len(compressed), pieces + 1).astype(int)
    idat = [(b"IDAT", compressed[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    return _png(chunks[:first] + idat + rest)


def _scanlines(data: bytes) -> bytes:
    return zlib.decompress(b"".join(body for kind, body in _chunks(data) if kind == b"IDAT"))


def test_every_row_filter_decodes_to_pils_pixels() -> None:
    """PNG rows are filtered five ways (None, Sub, Up, Average, Paeth), chosen by the
    encoder row by row; PNGs from PIL's encoder and from OpenCV's (libpng) with each
    filter alone and all of them adaptively decode to PIL's pixels exactly."""
    pixels = _photo(1)
    encoded = {"pil": _pil_png(pixels), "pil_optimize": _pil_png(pixels, optimize=True)}
    for name in ("NONE", "SUB", "UP", "AVG", "PAETH", "ALL_FILTERS"):
        flag = getattr(cv2, "IMWRITE_PNG_" + ("" if name == "ALL_FILTERS" else "FILTER_") + name)
        options = [cv2.IMWRITE_PNG_FILTER, flag]
        encoded[f"opencv_{name}"] = cv2.imencode(".png", pixels[..., ::-1], options)[1].tobytes()
    filters: set[int] = set()
    for name, data in encoded.items():
        row = 1 + pixels.shape[1] * 3
        filters |= set(np.frombuffer(_scanlines(data), np.uint8)[::row].tolist())
        decoded = decode_png(data)
        assert decoded is not None, name
        assert torch.equal(decoded, pil_pixels(data)), name
    assert filters == {0, 1, 2, 3, 4}


def test_image_data_split_over_many_chunks_decodes_the_same() -> None:
    """Encoders cut the compressed stream into IDAT chunks of any size."""
    data = _pil_png(_photo(2))
    compressed = zlib.compress(_scanlines(data))
    split = _with_image_data(data, compressed, pieces=7)
    assert sum(kind == b"IDAT" for kind, _ in _chunks(split)) == 7
    decoded = decode_png(split)
    assert decoded is not None and torch.equal(decoded, pil_pixels(data))


@pytest.mark.parametrize("change", ["one_byte_more", "one_row_less", "data_after_the_stream"])
def test_image_data_that_is_not_exactly_the_scanlines_goes_to_pil(change: str) -> None:
    """A stream that inflates to more or fewer bytes than the image's rows, or carries
    bytes after its end, is not decoded here (None): PIL decides what it means, as on the
    CPU path."""
    pixels = _photo(3)
    data = _pil_png(pixels)
    scanlines = _scanlines(data)
    row = 1 + pixels.shape[1] * 3
    compressed = {
        "one_byte_more": zlib.compress(scanlines + b"\x00"),
        "one_row_less": zlib.compress(scanlines[:-row]),
        "data_after_the_stream": zlib.compress(scanlines) + b"\x00\x00",
    }[change]
    assert decode_png(_with_image_data(data, compressed)) is None


def test_a_wrong_checksum_in_any_chunk_goes_to_pil() -> None:
    """Checksums are checked on every chunk, not only the image data's (Wuffs checked
    them all before; the stored copy it now gets has none)."""
    data = _pil_png(_photo(4))
    chunks = _chunks(data)
    with_text = _png([chunks[0], (b"tEXt", b"Comment\x00made by a test"), *chunks[1:]])
    assert decode_png(with_text) is not None
    at = with_text.index(b"tEXt") + 4 + len(b"Comment\x00made by a test")
    damaged = bytearray(with_text)
    damaged[at] ^= 0x01  # the tEXt chunk's checksum
    assert decode_png(damaged) is None
