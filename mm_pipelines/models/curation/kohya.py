"""kohya-ss sd-scripts' caption conventions for LoRA training: the whole caption dropped
with a probability (`caption_dropout_rate`: the sample trains unconditionally), and the
comma-separated tokens shuffled (`shuffle_caption`) after the first N (`keep_tokens`, so a
trigger token stays first)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any


def kohya_caption(
    caption: str, rng: random.Random, dropout: float, shuffle: bool, keep_tokens: int
) -> str:
    """One draw of kohya's caption augmentation: the whole caption dropped with
    probability `dropout` (an unconditional sample), else its comma-separated tokens
    shuffled after the first `keep_tokens` (the trigger stays first)."""
    if dropout and rng.random() < dropout:
        return ""
    if not shuffle:
        return caption
    tokens = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tokens[:keep_tokens], tokens[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def caption_variants(
    images: Sequence[Any],
    captions: Sequence[str],
    variants: int,
    dropout: float,
    shuffle: bool,
    keep_tokens: int,
    seed: int = 0,
) -> tuple[list[Any], list[str]]:
    """kohya draws a new augmentation every epoch; the trainer here encodes each caption
    once, so each image is given `variants` pre-drawn augmentations instead (uniform
    sampling over them is the same distribution)."""
    if not dropout and not shuffle:
        return list(images), list(captions)
    rng = random.Random(seed)
    out_images, out_captions = [], []
    for image, caption in zip(images, captions, strict=True):
        for _ in range(max(1, variants)):
            out_images.append(image)
            out_captions.append(kohya_caption(caption, rng, dropout, shuffle, keep_tokens))
    return out_images, out_captions
