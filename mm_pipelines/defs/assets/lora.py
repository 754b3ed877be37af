"""The LoRA side of the generative group: diffusion base model, a subject's training set
and its adapter. torch/diffusers/mlflow are imported inside the bodies (see embed.py)."""

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg

from mm_pipelines.defs.assets.embed import load_clip
from mm_pipelines.defs.assets.ingest import raw_media
from mm_pipelines.defs.k8s import gpu_op_tags
from mm_pipelines.defs.metadata import markdown_gallery
from mm_pipelines.defs.partitions import subject_partitions
from mm_pipelines.defs.resources import (
    CatalogResource,
    ComputeResource,
    MediaStoreResource,
    MLflowResource,
    ModelsResource,
    step_metrics,
)
from mm_pipelines.models.common import encode_image
from mm_pipelines.pipeline import subjects
from mm_pipelines.storage import generated

RETRY = dg.RetryPolicy(max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL)


def lora_model_name(subject: str) -> str:
    return f"mm-lora-{subject}"


def write_pointer(pointer: Path, target: str) -> None:
    tmp = pointer.with_suffix(".tmp")
    tmp.write_text(target)
    os.replace(tmp, pointer)  # readers see the old or the new pointer, never half of one


def load_base_pipeline(models: ModelsResource, compute: ComputeResource) -> Any:
    from mm_pipelines.models.diffusion.pipeline import load_pipeline

    return load_pipeline(
        models.diffusion_base_dir(),
        device=compute.torch_device(),
        precision=compute.precision,  # type: ignore[arg-type]
        cpu_offload=models.diffusion_cpu_offload,
        quantize_nf4=models.diffusion_nf4,
    )


@contextlib.contextmanager
def no_retry_on_bad_input() -> Iterator[None]:
    """Errors of configuration or input fail at once: retrying (the policy is there for
    preempted pods and lost GPUs) would only repeat them, with a fresh MLflow run each."""
    try:
        yield
    except (ValueError, TypeError, KeyError, FileNotFoundError) as err:
        raise dg.Failure(description=f"{type(err).__name__}: {err}", allow_retries=False) from err


def subject_of(context: dg.AssetExecutionContext) -> subjects.Subject:
    return subjects.get_subject(context.partition_key)


# --------------------------------------------------------------------------- base model


class BaseModelConfig(dg.Config):
    vae_steps: int = 500
    unet_steps: int = 300
    seed: int = 0


@dg.asset(
    deps=[raw_media],
    group_name="generative",
    kinds={"pytorch", "diffusers", "mlflow"},
    pool="gpu",
    op_tags=gpu_op_tags(),
    description="The diffusion pipeline LoRA adapters are trained on. With MM_DIFFUSION_BASE "
    "set it is that diffusers directory, checked to load; otherwise a tiny StableDiffusion-"
    "compatible pipeline built and briefly trained here on the catalog's captioned images, "
    "logged to MLflow and registered as `mm-diffusion-base`.",
)
def lora_base_model(
    context: dg.AssetExecutionContext,
    config: BaseModelConfig,
    catalog_db: CatalogResource,
    media_store: MediaStoreResource,
    models: ModelsResource,
    compute: ComputeResource,
    mlflow_tracking: MLflowResource,
) -> dg.MaterializeResult:
    import mlflow
    from PIL import Image

    from mm_pipelines.models.common import weights_version
    from mm_pipelines.models.demo.tiny_diffusion import BaseTrainConfig, train_base_pipeline

    if models.diffusion_base:
        load_base_pipeline(models, compute)
        version = weights_version(models.diffusion_base, "sd")
        return dg.MaterializeResult(metadata={"model_version": version, "trained_here": False})
    with catalog_db.connect() as conn:
        rows = [r for r in generated.select_images(conn, limit=10_000) if r.caption]
    if not rows:
        raise ValueError("no captioned images in the catalog: ingest a batch (raw_media) first")
    store = media_store.get_store()
    images, captions = [], []
    for row in rows:
        with Image.open(io.BytesIO(store.read_bytes(row.content_hash))) as im:
            image = im.convert("RGB")
        # mirrored copies double a small set; shapes and colours read the same mirrored
        images += [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
        captions += [row.caption, row.caption]
    train_config = BaseTrainConfig(
        vae_steps=config.vae_steps, unet_steps=config.unet_steps, seed=config.seed
    )
    root = models.root() / "diffusion-base"
    work = root / f"tmp-{context.run_id}"
    with mlflow_tracking.start_run(context) as run, step_metrics(run) as log_step:
        mlflow.log_params({**dataclasses.asdict(train_config), "images": len(rows)})

        def log(name: str, every: int):
            def progress(step: int, loss: float) -> None:
                log_step(name, loss, step)
                if step % every == 0:
                    context.log.info(f"{name} step {step}: {loss:.4f}")

            return progress

        result = train_base_pipeline(
            images,
            captions,
            train_config=train_config,
            device=compute.torch_device(),
            output_dir=work,
            progress=log("unet_loss", 100),
            vae_progress=log("vae_loss", 100),
        )
        version = weights_version(work, "sd")
        target = root / version
        if target.exists():
            shutil.rmtree(work)
        else:
            os.replace(work, target)
        write_pointer(root / "CURRENT", version)
        mlflow.log_metric("train_seconds", result.seconds)
        mlflow.log_artifacts(str(target), artifact_path="pipeline")
        registered = mlflow_tracking.register(
            run, "pipeline", "mm-diffusion-base", tags={"model_version": version}
        )
    return dg.MaterializeResult(
        metadata={
            "model_version": version,
            "images": len(rows),
            "final_unet_loss": result.unet_losses[-1],
            "train_seconds": round(result.seconds, 1),
            "registered_version": registered,
            "mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_url(run)),
        }
    )


# --------------------------------------------------------------------------- training set


@dg.asset(
    partitions_def=subject_partitions,
    deps=[raw_media, lora_base_model],
    group_name="generative",
    kinds={"postgres"},
    description="The subject's images (selected from the catalog by its subjects.yaml entry), "
    "resized and centre-cropped to the base model's resolution, with their content hashes.",
)
def lora_training_set(
    context: dg.AssetExecutionContext,
    catalog_db: CatalogResource,
    media_store: MediaStoreResource,
    models: ModelsResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    from mm_pipelines.models.diffusion.pipeline import pipeline_dir_resolution
    from mm_pipelines.models.diffusion.training_set import build_training_set, save_training_set

    subject = subject_of(context)
    sel = subject.select
    with catalog_db.connect() as conn:
        rows = generated.select_images(
            conn,
            batches=sel.batches,
            tenant=sel.tenant,
            caption_contains=sel.caption_contains,
            content_hashes=sel.content_hashes,
            limit=10_000 if sel.query else sel.limit,
        )
        if sel.query:
            rows = _rank_by_query(conn, rows, sel.query, sel.limit, models, compute)
    store = media_store.get_store()
    items = [(store.read_bytes(r.content_hash), r.content_hash, r.caption) for r in rows]
    resolution = pipeline_dir_resolution(models.diffusion_base_dir())
    ts, skipped = build_training_set(items, resolution, subject.instance_prompt)
    folder = models.subject_dir(subject.name) / "training_set"
    tmp = folder.with_name(f"training_set.tmp-{context.run_id}")
    save_training_set(ts, tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    pairs = zip(ts.source_hashes, ts.images, strict=True)
    gallery = [(h[:12], encode_image(im, "png")) for h, im in pairs]
    return dg.MaterializeResult(
        metadata={
            "images": len(ts.images),
            "training_set_version": ts.version,
            "resolution": resolution,
            "subject_fingerprint": subject.fingerprint(),
            "skipped": dg.MetadataValue.json([{"hash": h, "reason": r} for h, r in skipped]),
            "preview": dg.MetadataValue.md(markdown_gallery(gallery[:24])),
        }
    )


def _rank_by_query(conn, rows, query: str, limit: int, models, compute) -> list:
    """Keep the `limit` rows whose images (or captions) score highest for `query`."""
    from mm_pipelines.pipeline.search import QueryModels, search

    architecture, checkpoint = models.clip_source()
    qm = QueryModels.load(
        architecture, checkpoint, models.projector_path(), device=compute.torch_device()
    )
    allowed = {r.content_hash: r for r in rows}
    results = search(conn, qm, query, k=max(limit * 4, 50), modalities=["image"])
    ranked = [allowed[h["content_hash"]] for h in results.images if h["content_hash"] in allowed]
    return ranked[:limit]


@dg.asset_check(
    asset=lora_training_set,
    partitions_def=subject_partitions,
    blocking=True,
    description="The subject has at least `min_images` usable images.",
)
def enough_images(
    context: dg.AssetCheckExecutionContext, models: ModelsResource
) -> dg.AssetCheckResult:
    from mm_pipelines.models.diffusion.training_set import load_training_set

    subject = subjects.get_subject(context.partition_key)
    n = len(load_training_set(models.subject_dir(subject.name) / "training_set").images)
    return dg.AssetCheckResult(
        passed=n >= subject.min_images, metadata={"images": n, "min_images": subject.min_images}
    )


# --------------------------------------------------------------------------- adapter


class LoraAdapterConfig(dg.Config):
    steps: int | None = None  # None: the subject's setting
    resume: bool = True  # continue from the latest checkpoint of the same settings


# defaults under the subject's `lora:` overrides
LORA_DEFAULTS: dict[str, Any] = {
    "checkpoint_every": 50,
    "validation_every": 50,
    "validation_seeds": tuple(range(8)),  # 4 seeds made the early-stopping metric too noisy
    "validation_inference_steps": 20,
    "validation_guidance_scale": 3.0,
}


@dg.asset(
    partitions_def=subject_partitions,
    deps=[lora_training_set, lora_base_model],
    group_name="generative",
    kinds={"pytorch", "diffusers", "mlflow"},
    pool="gpu",
    op_tags=gpu_op_tags(),
    retry_policy=RETRY,
    description="A peft LoRA adapter for the subject (diffusers safetensors format): "
    "checkpoints and resume, validation images from fixed seeds, early stopping with the "
    "best step kept. One MLflow run per materialization; registered as mm-lora-<subject>.",
)
def lora_adapter(
    context: dg.AssetExecutionContext,
    config: LoraAdapterConfig,
    models: ModelsResource,
    compute: ComputeResource,
    mlflow_tracking: MLflowResource,
) -> dg.MaterializeResult:
    import mlflow

    from mm_pipelines.models.common import image_grid, weights_version
    from mm_pipelines.models.diffusion.evaluation import (
        AdapterRecord,
        clip_features,
        validation_metric,
    )
    from mm_pipelines.models.diffusion.lora import train_lora
    from mm_pipelines.models.diffusion.training_set import load_training_set

    with no_retry_on_bad_input():  # bad settings fail once, not three times
        subject = subject_of(context)
        folder = models.subject_dir(subject.name)
        ts = load_training_set(folder / "training_set")
        base_dir = models.diffusion_base_dir()
        base_version = weights_version(base_dir, "sd")
        overrides = {"steps": config.steps} if config.steps else {}
        cfg = subjects.lora_config(
            subject,
            **LORA_DEFAULTS,
            validation_prompts=subject.generation_prompts[:2],
            resume=config.resume,
        )
        cfg = dataclasses.replace(cfg, **overrides)
        features = None
        if subject.validation_metric == "clip_distance":
            features = clip_features(load_clip(models, compute))
        metric = validation_metric(subject.validation_metric, ts.images, features)
        # checkpoints live per (training set, settings): a retry resumes, a change starts afresh
        settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "resume"}
        key = json.dumps(
            [ts.version, base_version, settings, subject.validation_metric], default=str
        )
        work = folder / "work" / hashlib.sha256(key.encode()).hexdigest()[:12]
        pipe = load_base_pipeline(models, compute)
        last_grid: dict[str, bytes] = {}
        with (
            mlflow_tracking.start_run(context, tags={"subject": subject.name}) as run,
            step_metrics(run) as log_step,
        ):
            mlflow.log_params(
                {
                    **{
                        k: v
                        for k, v in dataclasses.asdict(cfg).items()
                        if k != "validation_prompts"
                    },
                    "subject": subject.name,
                    "instance_prompt": subject.instance_prompt,
                    "training_set_version": ts.version,
                    "training_images": len(ts.images),
                    "base_model_version": base_version,
                    "validation_metric": subject.validation_metric,
                }
            )

            def on_step(step: int, loss: float) -> None:
                log_step("loss", loss, step)
                if step % 50 == 0:
                    context.log.info(f"step {step}/{cfg.steps} loss {loss:.4f}")

            def on_validation(step: int, images: list, value: float | None) -> None:
                grid = image_grid([g.image for g in images])
                mlflow.log_image(grid, artifact_file=f"validation/step_{step:06d}.png")
                if value is not None:
                    mlflow.log_metric(f"val_{subject.validation_metric}", value, step=step)
                big = grid.resize((grid.width * 2, grid.height * 2))
                last_grid["png"] = encode_image(big, "png")

            result = train_lora(
                pipe,
                ts.images,
                ts.captions,
                work,
                cfg,
                class_prompt=subject.class_prompt,
                on_step=on_step,
                on_validation=on_validation,
                validation_metric=metric,
            )
            adapter_version = weights_version(result.adapter_dir, "lora")
            target = folder / "adapters" / adapter_version
            if not target.exists():
                shutil.copytree(result.adapter_dir, target.with_suffix(".tmp"), dirs_exist_ok=True)
                os.replace(target.with_suffix(".tmp"), target)
            mlflow.log_metrics(
                {
                    "final_loss": result.losses[-1],
                    "steps_done": result.steps_done,
                    "seconds": result.seconds,
                }
            )
            mlflow.log_artifacts(str(target), artifact_path="adapter")
            name = lora_model_name(subject.name)
            registered = mlflow_tracking.register(
                run,
                "adapter",
                name,
                tags={
                    "subject": subject.name,
                    "adapter_version": adapter_version,
                    "base_model_version": base_version,
                    "training_set_version": ts.version,
                },
            )
            record = AdapterRecord(
                subject=subject.name,
                adapter_version=adapter_version,
                adapter_dir=str(target),
                base_model_version=base_version,
                base_model_dir=str(base_dir),
                training_set_version=ts.version,
                registered_model=name,
                registered_version=registered,
                mlflow_run_id=run.info.run_id,
                steps_done=result.steps_done,
                best_step=result.best_step,
                params={"resumed_from_step": result.resumed_from_step},
            )
            tmp = folder / "adapter.json.tmp"
            record.save(tmp)
            os.replace(tmp, folder / "adapter.json")
        metadata: dict[str, Any] = {
            "adapter_version": adapter_version,
            "registered": f"{name} v{registered}",
            "steps_done": result.steps_done,
            "resumed_from_step": result.resumed_from_step,
            "first_loss": result.losses[0],
            "final_loss": result.losses[-1],
            "stopped_early": result.stopped_early,
            "best_step": result.best_step,
            "best_validation": result.best_metric,
            "train_seconds": round(result.seconds, 1),
            "mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_url(run)),
        }
        if "png" in last_grid:
            metadata["validation_grid"] = dg.MetadataValue.md(
                markdown_gallery([("validation", last_grid["png"])], max_px=256)
            )
        return dg.MaterializeResult(metadata=metadata)


def adapter_record(models: ModelsResource, subject: str) -> Any:
    """What lora_adapter left for the assets downstream (versions, dirs, registry)."""
    from mm_pipelines.models.diffusion.evaluation import AdapterRecord

    return AdapterRecord.load(models.subject_dir(subject) / "adapter.json")
