"""What the LoRA and quality drivers log for the people who review a model in MLflow:
dataset inputs with content hashes, labelled image series, a training run's whole loss
curve after a resume, and the adapter as a logged model with a signature."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from mm_pipelines.pipeline import model_store as ms
from mm_pipelines.pipeline import subjects
from mm_pipelines.pipeline.review_images import Labelled, labelled_grid
from mm_pipelines.pipeline.tracking import TrackedRun


def labelled(images: list[Any]) -> list[Labelled]:
    """GeneratedImage list -> images labelled with their prompt and seed."""
    return [Labelled(g.image, g.params.prompt, g.params.seed) for g in images]


def labelled_grid_of(images: list[Any]) -> Image.Image:
    return labelled_grid(labelled(images))


def log_dataset(
    tracked: TrackedRun, store: ms.ModelStore, kind: str, name: str, ts: Any, context: str
) -> Any:
    """A subject's training set (`ts`, stored as `kind`/`name`) as an MLflow dataset input:
    its content hash (the training set version) and where the model store keeps it."""
    return tracked.dataset(
        f"{kind}/{name}",
        ts.version,
        store.uri(kind, name, ts.version),
        context,
        profile={
            "images": len(ts.images),
            "resolution": ts.resolution,
            "source_hashes": list(ts.source_hashes),
        },
    )


def log_restored_history(tracked: TrackedRun, result: Any, val_key: str) -> None:
    """A resumed run trains only the remaining steps; the steps before come from the
    checkpoint's history, so the run still shows the whole curve (the param
    `resumed_from_step` says where this run took over)."""
    resumed = result.resumed_from_step or 0
    for step, loss in enumerate(result.losses[:resumed], start=1):
        tracked.step("loss", loss, step)
    for step, value in result.validation_history:
        if step <= resumed and value is not None:
            tracked.step(val_key, value, step)
    tracked.flush()


def log_adapter_model(
    tracked: TrackedRun,
    subject: subjects.Subject,
    adapter_dir: Path,
    base_dir: Path,
    base_version: str,
    base_store_version: str | None,
) -> str:
    """The adapter as an MLflow logged model with a signature ((prompt, seed) -> PNG)."""
    from mm_pipelines.pipeline import adapter_model

    g = subject.generation
    return tracked.log_model(
        "adapter",
        adapter_model.CODE_PATH,
        artifacts={"adapter": str(adapter_dir)},
        signature=adapter_model.signature(g.num_inference_steps, g.guidance_scale),
        # MLflow also logs the model config as run params: names of their own, so they
        # never collide with the run's settings
        model_config={
            adapter_model.BASE_DIR: str(base_dir),
            adapter_model.BASE_VERSION: base_version,
            adapter_model.BASE_STORE_VERSION: base_store_version or "",
        },
        params={"subject": subject.name, "base_model_version": base_version},
    )
