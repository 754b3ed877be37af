"""Shared data and helpers for the diffusion/LoRA/metrics tests (the session fixture
`base_pipeline_dir` that trains the tiny base pipeline once lives in conftest.py)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from mm_pipelines.models.demo.tiny_diffusion import (
    BaseTrainConfig,
    TinyDiffusionConfig,
    train_base_pipeline,
)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 60, 220),
    "yellow": (235, 215, 40),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "blue": (40, 70, 200),
    "green": (40, 160, 70),
}
SHAPES = ("circle", "square", "triangle")

# The LoRA subject: a background colour the base model never sees (no warm backgrounds).
SUBJECT_BACKGROUND = (240, 140, 20)  # orange
SUBJECT_PROMPT = "a photo of sks"

RESOLUTION = 32
# Kept small: the whole file must run in well under 4 minutes on 2 shared cores.
BASE_TRAIN = BaseTrainConfig(vae_steps=500, unet_steps=300, seed=0)


def draw_shape(
    shape: str,
    colour: tuple[int, int, int],
    background: tuple[int, int, int],
    rng: random.Random,
    size: int = RESOLUTION,
) -> Image.Image:
    """One filled shape with jittered position and size on a plain background."""
    im = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(im)
    r = rng.uniform(0.22, 0.34) * size
    cx, cy = (rng.uniform(0.35, 0.65) * size for _ in range(2))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return im


def shapes_dataset(n_per_combo: int = 1, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    """colours x shapes x backgrounds, with captions."""
    rng = random.Random(seed)
    images, captions = [], []
    for cname, colour in COLOURS.items():
        for shape in SHAPES:
            for bname, bg in BACKGROUNDS.items():
                if bname == cname:
                    continue
                for _ in range(n_per_combo):
                    images.append(draw_shape(shape, colour, bg, rng))
                    captions.append(f"a {cname} {shape} on a {bname} background")
    return images, captions


def subject_images(n: int = 8, seed: int = 1) -> list[Image.Image]:
    """The subject: assorted shapes on the purple background."""
    rng = random.Random(seed)
    colours = list(COLOURS.values())
    return [
        draw_shape(SHAPES[i % len(SHAPES)], colours[i % len(colours)], SUBJECT_BACKGROUND, rng)
        for i in range(n)
    ]


class PixelFeatures(torch.nn.Module):
    """Colour-layout features (4x4 average-pooled RGB, 48 dims) for FID/KID in the tests.

    A random CLIP tower would also do, but its features are arbitrary; this one measures
    what the subject is (its background colour), so a margin on it means something.
    """

    num_features = 48
    name = "pixels-4x4"

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = imgs.float() / 255.0
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


@contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run with `n` intra-op threads, then restore.

    These models are tiny: a second thread buys little, and on a 2-core machine shared
    with other jobs the oversubscribed thread pools made training ~4x slower (measured:
    base training 609 s with 2 threads vs 157 s with 1 under the same load).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_base_pipeline_dir(out: Path) -> None:
    """Train the tiny base pipeline on the shapes set and save it into `out` (~1-2 CPU
    minutes)."""
    images, captions = shapes_dataset()
    with torch_threads(1):
        result = train_base_pipeline(
            images,
            captions,
            model_config=TinyDiffusionConfig(resolution=RESOLUTION),
            train_config=BASE_TRAIN,
            device="cpu",
            output_dir=out,
        )
    assert result.unet_losses[-1] < result.unet_losses[0]


# SDXL/SD3/FLUX tiny bases: the SD base's trained VAE, the family's denoiser trained
# briefly on the same shapes (the VAE is what makes a subject visible at all; a denoiser
# that draws shapes is what the subject then moves).
FAMILY_BASE_TRAIN = BaseTrainConfig(unet_steps=200, seed=0)


def make_family_base_dir(family: str, sd_base_dir: Path, out: Path) -> None:
    """Train a tiny `family` base on the shapes set around the SD base's VAE and save it
    into `out`."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(sd_base_dir / "vae", local_files_only=True)
    images, captions = shapes_dataset()
    with torch_threads(1):
        result = train_base_pipeline(
            images,
            captions,
            family=family,
            vae=vae,
            model_config=TinyDiffusionConfig(resolution=RESOLUTION),
            train_config=FAMILY_BASE_TRAIN,
            device="cpu",
            output_dir=out,
        )
    assert result.unet_losses[-1] < result.unet_losses[0]
