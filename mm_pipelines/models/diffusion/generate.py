"""Batch generation: prompts x seeds, batched, deterministic per seed, with lineage params.

Plain Python (no Dagster, no MLflow). Every image gets its own `torch.Generator` seeded
with its seed, created on the CPU: the same seed gives the same initial noise whatever
the batch it lands in and whatever the device, so an image can be regenerated from its
recorded params alone.

Every family (SD 1.x, SDXL, SD3/3.5, FLUX.1) goes through the same call; the family
adapter adds what its pipeline needs: SD3/FLUX the T5 length training used, FLUX its
guidance embedding value and, only with `true_cfg_scale`, a negative prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image

from mm_pipelines.models.diffusion.pipeline import pipeline_resolution


@dataclass(frozen=True)
class GenerationParams:
    """Everything needed to regenerate one image (stored next to it as lineage)."""

    prompt: str
    seed: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: str
    height: int
    width: int
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None  # FLUX.1 only: real CFG with the negative prompt

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image
    params: GenerationParams


def set_scheduler(pipeline: Any, name: str) -> None:
    """Swap the sampler by class name (e.g. "DDIMScheduler", "EulerDiscreteScheduler")."""
    import diffusers

    if type(pipeline.scheduler).__name__ == name:
        return
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"unknown diffusers scheduler {name!r}")
    pipeline.scheduler = cls.from_config(pipeline.scheduler.config)


def pipeline_call_kwargs(
    pipeline: Any,
    guidance_scale: float,
    negative_prompt: str | None = None,
    batch: int = 1,
    true_cfg_scale: float | None = None,
) -> dict[str, Any]:
    """Keyword arguments for calling any family's pipeline directly, besides prompt,
    generator and steps: its native size (FLUX.1's default is 1024 px whatever the
    model) and the family's own (T5 length, FLUX guidance, negative prompt rules)."""
    from mm_pipelines.models.diffusion.families import family_of

    size = pipeline_resolution(pipeline)
    kwargs = family_of(pipeline).call_kwargs(
        pipeline, guidance_scale, negative_prompt, batch, true_cfg_scale
    )
    return {"height": size, "width": size, **kwargs}


def seed_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image (device-independent noise for a given seed)."""
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def prompt_seed_pairs(prompts: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, int]]:
    """The cross product, prompt-major: every prompt with every seed."""
    return [(p, int(s)) for p in prompts for s in seeds]


@torch.no_grad()
def generate_images(
    pipeline: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    batch_size: int = 8,
    num_inference_steps: int = 25,
    guidance_scale: float = 5.0,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    scheduler: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    true_cfg_scale: float | None = None,
) -> list[GeneratedImage]:
    """Generate `len(prompts) * len(seeds)` images in batches of `batch_size`.

    Returns images in prompt-major order, each with its `GenerationParams`.
    `progress(done, total)` is called after each batch. `scheduler` swaps the sampler
    (class name) before generating; the name actually used is recorded either way.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    from mm_pipelines.models.diffusion.families import family_of

    family = family_of(pipeline)
    family.call_kwargs(pipeline, guidance_scale, negative_prompt, 1, true_cfg_scale)  # checks
    if scheduler is not None:
        set_scheduler(pipeline, scheduler)
    size = pipeline_resolution(pipeline)
    height, width = height or size, width or size
    pairs = prompt_seed_pairs(prompts, seeds)
    sched_name = type(pipeline.scheduler).__name__
    out: list[GeneratedImage] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        kwargs = family.call_kwargs(
            pipeline, guidance_scale, negative_prompt, len(chunk), true_cfg_scale
        )
        images = _run_batch(pipeline, chunk, num_inference_steps, height, width, kwargs)
        for (prompt, seed), image in zip(chunk, images, strict=True):
            params = GenerationParams(
                prompt=prompt,
                seed=seed,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                scheduler=sched_name,
                height=height,
                width=width,
                negative_prompt=negative_prompt,
                true_cfg_scale=true_cfg_scale,
            )
            out.append(GeneratedImage(image, params))
        if progress is not None:
            progress(len(out), len(pairs))
    return out


def _run_batch(
    pipeline: Any,
    chunk: list[tuple[str, int]],
    steps: int,
    height: int,
    width: int,
    kwargs: dict[str, Any],
) -> list[Image.Image]:
    result = pipeline(
        prompt=[p for p, _ in chunk],
        generator=seed_generators([s for _, s in chunk]),
        num_inference_steps=steps,
        height=height,
        width=width,
        output_type="pil",
        **kwargs,
    )
    return list(result.images)
