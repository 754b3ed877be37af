"""Procedurally drawn captioned shapes: the offline demo's image/text data.

Every image is a pure function of (colour, shape, background, size_px, seed), so the demo
data, the training set and the held-out set can all be re-drawn anywhere without files.
Seeds split the data: held-out and demo images use seeds below ``TRAIN_SEED_BASE``,
training images use seeds at or above it, so no training image is a held-out image
(the same caption combos do appear in both, as they should).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (140, 40, 170),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
BACKGROUNDS: tuple[str, ...] = tuple(COLOURS)

# Seeds >= this are reserved for training images; everything else (held-out sets, the
# demo's sample data) draws below it, which is what keeps the splits disjoint.
TRAIN_SEED_BASE = 1_000_000_000
# Drawing at this multiple of the output size and downsampling gives anti-aliased edges
# that look the same at every size_px.
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return caption_for(self.colour, self.shape, self.background)


@dataclass(frozen=True)
class ShapeSample:
    image: Image.Image
    caption: str
    spec: ShapeSpec
    seed: int


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(colour: str, shape: str, background: str) -> str:
    return f"{_article(colour)} {colour} {shape} on {_article(background)} {background} background"


def all_specs(
    colours: Sequence[str] = tuple(COLOURS),
    shapes: Sequence[str] = SHAPES,
    backgrounds: Sequence[str] = BACKGROUNDS,
) -> list[ShapeSpec]:
    """Every caption combo; the shape never has its background's colour (it would vanish)."""
    return [
        ShapeSpec(c, s, b) for c, s, b in itertools.product(colours, shapes, backgrounds) if c != b
    ]


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple]:
    if shape == "square":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * r * 0.85, y * r * 0.85) for x, y in corners]
    elif shape == "triangle":
        pts = [
            (r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    elif shape == "cross":
        a, b = r, r * 0.36
        pts = [
            (-b, -a),
            (b, -a),
            (b, -b),
            (a, -b),
            (a, b),
            (b, b),
            (b, a),
            (-b, a),
            (-b, b),
            (-a, b),
            (-a, -b),
            (-b, -b),
        ]
    else:
        raise ValueError(f"unknown polygon shape {shape!r}")
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    return [(cx + x * cos_a - y * sin_a, cy + x * sin_a + y * cos_a) for x, y in pts]


def draw_shape(
    colour: str, shape: str, background: str, size_px: int = 64, seed: int = 0
) -> tuple[Image.Image, str]:
    """Draw one captioned image; the seed picks the jitter (size, position, small rotation).

    Jitter is relative to the canvas, so the same seed at two sizes is the same picture.
    """
    if colour not in COLOURS or background not in COLOURS:
        raise ValueError(f"unknown colour {colour!r} or background {background!r}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    rng = random.Random(f"{colour}|{shape}|{background}|{seed}")
    # Small jitter on purpose: the demo model is tiny (32 px input, 8 px patches) and must
    # learn shapes in a few CPU minutes; the split, not the jitter, makes held-out honest.
    radius = rng.uniform(0.30, 0.38)  # fraction of the canvas
    cx, cy = 0.5 + rng.uniform(-0.08, 0.08), 0.5 + rng.uniform(-0.08, 0.08)
    angle = math.radians(rng.uniform(-8, 8))

    big = size_px * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), COLOURS[background])
    draw = ImageDraw.Draw(img)
    px, py, pr = cx * big, cy * big, radius * big
    if shape == "circle":
        draw.ellipse((px - pr, py - pr, px + pr, py + pr), fill=COLOURS[colour])
    else:
        draw.polygon(_shape_points(shape, px, py, pr, angle), fill=COLOURS[colour])
    img = img.resize((size_px, size_px), Image.Resampling.LANCZOS)
    return img, caption_for(colour, shape, background)


def _split_seed(split: str, seed: int, index: int) -> int:
    # Stable 32-bit-ish hash so split seeds never depend on Python's hash randomisation.
    digest = hashlib.sha256(f"{split}|{seed}|{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (TRAIN_SEED_BASE // 4)


def sample_seed(split: str, seed: int, index: int) -> int:
    """The image seed for the index-th image of a split; 'train' lands above TRAIN_SEED_BASE."""
    base = _split_seed(split, seed, index)
    return TRAIN_SEED_BASE + base if split == "train" else base


def iter_samples(
    split: str,
    n: int,
    seed: int = 0,
    size_px: int = 64,
    specs: Sequence[ShapeSpec] | None = None,
) -> Iterator[ShapeSample]:
    """n samples of a split, cycling through the combos in a seeded order.

    Cycling (rather than sampling combos at random) keeps every combo equally present,
    which is what a caption-match recall over all combos wants.
    """
    specs = list(specs or all_specs())
    order_rng = random.Random(f"order|{split}|{seed}")
    order: list[ShapeSpec] = []
    for i in range(n):
        if i % len(specs) == 0:
            block = specs[:]
            order_rng.shuffle(block)
            order.extend(block)
        spec = order[i]
        img_seed = sample_seed(split, seed, i)
        image, caption = draw_shape(spec.colour, spec.shape, spec.background, size_px, img_seed)
        yield ShapeSample(image=image, caption=caption, spec=spec, seed=img_seed)


def make_split(
    split: str,
    n: int,
    seed: int = 0,
    size_px: int = 64,
    specs: Sequence[ShapeSpec] | None = None,
) -> tuple[list[Image.Image], list[str]]:
    """(images, captions) of a split: 'train' for training, any other name is held out."""
    samples = list(iter_samples(split, n, seed=seed, size_px=size_px, specs=specs))
    return [s.image for s in samples], [s.caption for s in samples]


def heldout_split(
    n: int | None = None, seed: int = 0, size_px: int = 64
) -> tuple[list[Image.Image], list[str]]:
    """The evaluation set: by default one image of every combo, none of them seen in training."""
    n = n if n is not None else len(all_specs())
    return make_split("heldout", n, seed=seed, size_px=size_px)
