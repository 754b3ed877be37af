"""Batch generation with a subject's adapter: prompts x seeds, stored in the media store and
catalogued with their lineage (adapter, base, registered version, prompt, seed, sampler)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mm_pipelines.models.common import encode_image, image_grid
from mm_pipelines.pipeline import subjects
from mm_pipelines.pipeline.lora import AdapterRecord, adapter_record
from mm_pipelines.pipeline.services import Services
from mm_pipelines.storage import generated
from mm_pipelines.storage.postgres import connect

Progress = Callable[[int, int], None]


def generate_for_subject(
    pipe: Any, subject: subjects.Subject, progress: Progress | None = None
) -> list[Any]:
    """The subject's prompts x seeds with its generation settings (GeneratedImage list)."""
    from mm_pipelines.models.diffusion.generate import generate_images

    g = subject.generation
    return generate_images(
        pipe,
        list(subject.generation_prompts),
        list(subject.seeds),
        batch_size=g.batch_size,
        num_inference_steps=g.num_inference_steps,
        guidance_scale=g.guidance_scale,
        negative_prompt=g.negative_prompt,
        scheduler=g.scheduler,
        progress=progress,
        true_cfg_scale=g.true_cfg_scale,
    )


def adapted_pipeline(svc: Services, record: AdapterRecord) -> Any:
    from pathlib import Path

    from mm_pipelines.models.diffusion.lora import load_adapter

    return load_adapter(svc.load_base_pipeline(Path(record.base_model_dir)), record.adapter_dir)


@dataclass
class GenerationResult:
    record: AdapterRecord
    images: int
    images_per_second: float
    grid_png: bytes


def generate_subject_images(
    svc: Services, subject_name: str, dagster_run_id: str, progress: Progress | None = None
) -> GenerationResult:
    subject = subjects.get_subject(subject_name)
    record = adapter_record(svc, subject.name)
    pipe = adapted_pipeline(svc, record)
    t0 = time.perf_counter()
    images = generate_for_subject(pipe, subject, progress)
    seconds = time.perf_counter() - t0
    store = svc.need_media()
    rows = []
    for g in images:
        data = encode_image(g.image, "png")
        content_hash, _ = store.put_bytes(data)
        rows.append(
            generated.GeneratedRow(
                content_hash=content_hash,
                prompt=g.params.prompt,
                seed=g.params.seed,
                params=g.params.to_dict(),
                size_bytes=len(data),
                width=g.image.width,
                height=g.image.height,
                storage_uri=store.uri(content_hash),
            )
        )
    with connect(svc.need_dsn()) as conn:
        generated.replace_generated(
            conn,
            subject.name,
            record.adapter_version,
            record.base_model_version,
            f"{record.registered_model}:{record.registered_version}",
            dagster_run_id,
            rows,
        )
    grid = encode_image(image_grid([g.image for g in images]), "png")
    return GenerationResult(record, len(rows), round(len(rows) / seconds, 2), grid)
