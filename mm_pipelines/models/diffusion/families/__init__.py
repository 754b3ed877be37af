"""One small adapter per diffusion family; `family_of(pipeline)` picks it by class.

| family | pipeline class              | denoiser    | text encoders              | loss          |
|--------|-----------------------------|-------------|----------------------------|---------------|
| sd     | StableDiffusionPipeline     | UNet        | CLIP                       | epsilon / v   |
| sdxl   | StableDiffusionXLPipeline   | UNet (text_time) | CLIP-L + CLIP-G       | epsilon / v   |
| sd3    | StableDiffusion3Pipeline    | SD3 MMDiT   | CLIP-L + CLIP-G + T5       | flow matching |
| flux   | FluxPipeline                | FLUX MMDiT  | CLIP-L (pooled) + T5       | flow matching |
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mm_pipelines.models.diffusion.families.base import Cond, Family
from mm_pipelines.models.diffusion.families.flux import Flux
from mm_pipelines.models.diffusion.families.sd import SD
from mm_pipelines.models.diffusion.families.sd3 import SD3
from mm_pipelines.models.diffusion.families.sdxl import SDXL

FAMILIES: dict[str, Family] = {f.name: f for f in (SD(), SDXL(), SD3(), Flux())}
_BY_CLASS = {f.pipeline_class: f for f in FAMILIES.values()}

__all__ = ["FAMILIES", "Cond", "Family", "family_of", "family_of_dir", "get_family"]


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown diffusion family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of(pipeline: Any) -> Family:
    """The adapter for a loaded pipeline, by its class (or the nearest known base class)."""
    for cls in type(pipeline).__mro__:
        if cls.__name__ in _BY_CLASS:
            return _BY_CLASS[cls.__name__]
    known = ", ".join(sorted(_BY_CLASS))
    raise ValueError(
        f"{type(pipeline).__name__} is not a supported text-to-image pipeline for LoRA "
        f"training and generation (supported: {known})"
    )


def family_of_dir(path: str | Path) -> Family:
    """The adapter for a saved pipeline directory, from its model_index.json (no weights)."""
    index = Path(path) / "model_index.json"
    try:
        name = json.loads(index.read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{index}: not a readable diffusers pipeline index ({err})") from err
    if name not in _BY_CLASS:
        raise ValueError(f"{index}: pipeline class {name} is not one of {sorted(_BY_CLASS)}")
    return _BY_CLASS[name]
