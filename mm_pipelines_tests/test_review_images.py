"""Images made for reviewers: labelled, paired by prompt and seed, enlarged without adding
detail; and the Dagster preview that fits the UI's inline limit."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from mm_pipelines.defs.metadata import INLINE_MARKDOWN_CHARS, inline_markdown
from mm_pipelines.pipeline.review_images import Labelled, comparison_sheet, upscale

RNG = np.random.default_rng(0)


def noise(size: int = 32) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_upscaling_repeats_each_pixel_and_adds_no_new_colour():
    small = noise()
    big = np.asarray(upscale(small, 4))
    assert big.shape == (128, 128, 3)
    assert (big[::4, ::4] == np.asarray(small)).all() and (big[3::4, 3::4] == big[::4, ::4]).all()


def test_the_comparison_sheet_pairs_base_and_adapter_by_prompt_and_seed():
    base = [Labelled(Image.new("RGB", (32, 32), (0, 0, 255)), "a photo of sks", s) for s in (1, 2)]
    adapter = [
        Labelled(Image.new("RGB", (32, 32), (255, 0, 0)), "a photo of sks", s) for s in (2, 3)
    ]
    sheet = np.asarray(comparison_sheet(base, adapter))
    # one pair (seed 2) survives: a 128 px blue cell, then a 128 px red one beside it
    is_blue = (sheet == (0, 0, 255)).all(-1)
    is_red = (sheet == (255, 0, 0)).all(-1)
    assert is_blue.sum() == is_red.sum() == 128 * 128
    assert np.argwhere(is_blue)[:, 1].max() < np.argwhere(is_red)[:, 1].min()


def blob(colour: tuple[int, int, int]) -> Image.Image:
    """A small generation-like image: a soft shape on a flat background."""
    yy, xx = np.mgrid[0:32, 0:32]
    mask = np.exp(-((xx - 16) ** 2 + (yy - 16) ** 2) / 60.0)[..., None]
    image = (1 - mask) * np.array([240, 140, 30]) + mask * np.array(colour)
    return Image.fromarray(image.astype(np.uint8))


def test_the_inline_preview_keeps_the_generated_size_and_fits_dagsters_limit():
    strip = Image.new("RGB", (128, 64))  # base over adapter, four pairs
    for i in range(8):
        strip.paste(blob((40 * i, 60, 200 - 20 * i)), ((i % 4) * 32, (i // 4) * 32))
    buf = io.BytesIO()
    strip.save(buf, "PNG")
    markdown = inline_markdown(buf.getvalue(), "base_vs_adapter")
    assert markdown is not None and len(markdown) < INLINE_MARKDOWN_CHARS
    assert markdown.startswith("![base_vs_adapter](data:image/png;base64,")
    png = base64.b64decode(markdown.split("base64,", 1)[1].rstrip(")"))
    width, height = Image.open(io.BytesIO(png)).size
    assert height == 64 and width in (32, 64, 128)  # whole leading pairs, not shrunk
