"""PNG decoding for the CLIP readers: ISA-L inflates, Wuffs unfilters, and the pixels are
exactly PIL's ``convert("RGB")``.

Why: on a GPU box the readers' PNG decoding bounds encoding any set with PNGs in it (issue
17: 14 readers decoded ~1,100 photo PNGs/s with libpng against a model taking ~7,500
images/s). Inflating the compressed stream is nearly all of it: Wuffs takes 4.4 ms for a
640x480 photo PNG and 0.4 ms for the same image stored uncompressed. ISA-L (the `isal`
package) inflates about twice as fast as Wuffs, so the scanlines are inflated by ISA-L and
handed to Wuffs as stored deflate blocks, which leaves Wuffs only the unfiltering and the
conversion to RGB (`benchmarks/bench_png_decode.py`).

Anything unusual goes back to the caller as None and PIL decodes it, as on the CPU path:
transparency (Wuffs blends it where PIL drops it), more than 8 bits per sample,
interlacing, more pixels than PIL allows, a wrong checksum, a stream that is not exactly
the image's scanlines, and any error.
"""

from __future__ import annotations

import threading

import torch
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# samples per pixel of the colour types decoded here (grey, RGB, palette); 4 and 6 carry alpha
_SAMPLES = {0: 1, 2: 3, 3: 1}
_STORED_BLOCK = 65535  # the most bytes a stored deflate block holds


def wuffs_png_decoder(verify_checksums: bool) -> object:
    """A Wuffs decoder of PNGs to RGB (pywuffs turns checksums off by default)."""
    from pywuffs import ImageDecoderQuirks, ImageDecoderType, PixelFormat
    from pywuffs.aux import ImageDecoder, ImageDecoderConfig

    config = ImageDecoderConfig()
    config.enabled_decoders = [ImageDecoderType.PNG]
    config.pixel_format = PixelFormat.RGB
    config.quirks = {ImageDecoderQuirks.IGNORE_CHECKSUM: int(not verify_checksums)}
    return ImageDecoder(config)


class _Decoders(threading.local):
    """One Wuffs decoder per thread (a decoder is not thread-safe); the checksums of the
    stored copy it decodes are zero: `_scanlines` checked the file's."""

    def __init__(self) -> None:
        self.decoder = wuffs_png_decoder(verify_checksums=False)


_decoders = _Decoders()


def decode_png(data: bytes | bytearray) -> torch.Tensor | None:
    """An opaque PNG of up to 8 bits per sample decoded to uint8 [3, H, W], exactly as
    PIL's ``convert("RGB")`` gives it; None for anything PIL must decode (see the module
    docstring)."""
    header = png_header(data)
    if header is None:
        return None
    width, height, bit_depth, colour_type, interlaced = header
    too_large = width * height > (Image.MAX_IMAGE_PIXELS or 2**62)
    if bit_depth > 8 or colour_type not in _SAMPLES or interlaced or too_large:
        return None
    row = 1 + (width * _SAMPLES[colour_type] * bit_depth + 7) // 8  # filter byte + samples
    found = _scanlines(memoryview(data), row * height)
    if found is None:
        return None
    result = _decoders.decoder.decode(_stored_png(*found))
    if result.error_message:
        return None
    return torch.from_numpy(result.pixbuf).permute(2, 0, 1)  # pixbuf is a fresh copy


def png_header(data: bytes | bytearray) -> tuple[int, int, int, int, int] | None:
    """(width, height, bit depth, colour type, interlace method) from a PNG's IHDR, which
    is the first chunk; None for bytes that do not start as a PNG does."""
    if not data.startswith(PNG_SIGNATURE) or len(data) < 29 or data[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return width, height, data[24], data[25], data[28]


def _scanlines(data: memoryview, size: int) -> tuple[list[memoryview], list[bytes]] | None:
    """(the chunks the pixels need: IHDR and PLTE; the inflated scanlines, in pieces) of
    a PNG whose chunk checksums are right, which has no tRNS chunk, and whose image data
    inflates to exactly `size` bytes (never more are inflated); None otherwise."""
    from isal import isal_zlib

    keep: list[memoryview] = []
    pieces: list[bytes] = []
    stream = isal_zlib.decompressobj()
    left = size + 1  # one byte more than the image holds tells a longer stream
    pos = len(PNG_SIGNATURE)
    while True:
        if pos + 12 > len(data):
            return None  # cut off before IEND
        end = pos + 12 + int.from_bytes(data[pos : pos + 4], "big")
        if end > len(data):
            return None
        kind = bytes(data[pos + 4 : pos + 8])
        if isal_zlib.crc32(data[pos + 4 : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            return None
        if kind == b"IEND":
            break
        if kind == b"tRNS":
            return None
        if kind == b"IDAT":  # the stream goes on across IDAT chunks: no need to join them
            try:
                pieces.append(stream.decompress(data[pos + 8 : end - 4], left))
            except isal_zlib.error:
                return None  # damaged: PIL says how
            left -= len(pieces[-1])
            if left == 0 or stream.unconsumed_tail:
                return None  # inflates to more than the image holds
        elif kind in (b"IHDR", b"PLTE"):
            keep.append(data[pos:end])
        pos = end
    if left != 1 or not stream.eof or stream.unused_data:
        return None
    return keep, pieces


def _stored_png(keep: list[memoryview], pieces: list[bytes]) -> bytes:
    """A PNG of the `keep` chunks whose image data is `pieces` in stored (uncompressed)
    deflate blocks; its checksums are zero, which the decoder is told to ignore."""
    blocks = [
        memoryview(piece)[start : start + _STORED_BLOCK]
        for piece in pieces
        for start in range(0, len(piece), _STORED_BLOCK)
    ]
    zlib_size = 2 + sum(5 + len(block) for block in blocks) + 4  # header, blocks, Adler-32
    parts: list[bytes | memoryview] = [PNG_SIGNATURE, *keep]
    parts += [zlib_size.to_bytes(4, "big"), b"IDAT", b"\x78\x01"]
    for n, block in enumerate(blocks):
        final, size = n == len(blocks) - 1, len(block)
        lengths = size.to_bytes(2, "little") + (size ^ 0xFFFF).to_bytes(2, "little")
        parts += [bytes((final,)) + lengths, block]
    parts += [bytes(8), b"\x00\x00\x00\x00IEND", bytes(4)]  # Adler-32, IDAT's CRC; IEND
    return b"".join(parts)
