"""The generative group: the diffusion base model, a subject's training set and adapter,
its generated images and their quality. Each asset calls one driver of pipeline/."""

from typing import Any

import dagster as dg

from mm_pipelines.defs.common import GPU_STEP, RETRY, no_retry_on_bad_input
from mm_pipelines.defs.metadata import (
    interval_table,
    markdown_gallery,
    previews,
    served_image,
)
from mm_pipelines.defs.partitions import subject_partitions
from mm_pipelines.defs.resources import (
    CatalogResource,
    ComputeResource,
    MediaStoreResource,
    MLflowResource,
    ModelsResource,
    services,
)
from mm_pipelines.pipeline import generation, lora, quality
from mm_pipelines.pipeline.progress import counter


def _run_link(url: str | None) -> dict[str, Any]:
    return {"mlflow_run": dg.MetadataValue.url(url)} if url else {}


class BaseModelConfig(dg.Config):
    vae_steps: int = 500
    unet_steps: int = 300
    seed: int = 0


@dg.asset(
    deps=["raw_media"],
    group_name="generative",
    kinds={"pytorch", "diffusers", "mlflow"},
    **GPU_STEP,
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
    svc = services(catalog_db, media_store, models, compute, mlflow_tracking)
    result = lora.build_base_model(
        svc,
        mlflow_tracking.run_spec(context),
        config.vae_steps,
        config.unet_steps,
        config.seed,
        log=context.log.info,
    )
    metadata = {k: v for k, v in vars(result).items() if v is not None and k != "run_url"}
    return dg.MaterializeResult(metadata={**metadata, **_run_link(result.run_url)})


@dg.asset(
    partitions_def=subject_partitions,
    deps=["raw_media", lora_base_model],
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
    with no_retry_on_bad_input():
        result = lora.build_training_set(
            services(catalog_db, media_store, models, compute), context.partition_key
        )
    return dg.MaterializeResult(
        metadata={
            "images": result.images,
            "training_set_version": result.version,
            "resolution": result.resolution,
            "subject_fingerprint": result.subject_fingerprint,
            "skipped": dg.MetadataValue.json([{"hash": h, "reason": r} for h, r in result.skipped]),
            # curation: flagged items, near-duplicates, images under the subject's min_aesthetic
            "left_out": dg.MetadataValue.json(
                [{"hash": h, "reason": r} for h, r in result.left_out]
            ),
            "caption_sources": dg.MetadataValue.json(result.caption_sources),
            "preview": dg.MetadataValue.md(markdown_gallery(result.thumbnails)),
        }
    )


class LoraAdapterConfig(dg.Config):
    steps: int | None = None  # None: the subject's setting
    resume: bool = True  # continue from the latest checkpoint of the same settings


@dg.asset(
    partitions_def=subject_partitions,
    deps=[lora_training_set, lora_base_model],
    group_name="generative",
    kinds={"pytorch", "diffusers", "mlflow"},
    retry_policy=RETRY,
    **GPU_STEP,
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
    svc = services(models=models, compute=compute, mlflow_tracking=mlflow_tracking)
    with no_retry_on_bad_input():  # bad settings fail once, not three times
        result = lora.train_adapter(
            svc,
            context.partition_key,
            mlflow_tracking.run_spec(context),
            config.steps,
            config.resume,
            log=context.log.info,
        )
    record = result.record
    metadata: dict[str, Any] = {
        "adapter_version": record.adapter_version,
        "registered": f"{record.registered_model} v{record.registered_version}",
        "reused": result.reused,  # trained before from the same inputs: not trained again
        "steps_done": record.steps_done,
        "resumed_from_step": result.resumed_from_step,
        "first_loss": result.first_loss,
        "final_loss": result.final_loss,
        "stopped_early": result.stopped_early,
        "best_step": record.best_step,
        "best_validation": result.best_validation,
        "train_seconds": result.train_seconds,
        **_run_link(result.run_url),
    }
    if result.validation_png:
        metadata.update(previews("validation_grid", result.validation_png))
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    partitions_def=subject_partitions,
    deps=[lora_adapter],
    group_name="generative",
    kinds={"diffusers", "postgres"},
    retry_policy=RETRY,
    **GPU_STEP,
    description="The subject's prompts x seeds generated with its adapter, stored in the "
    "media store and catalogued with lineage (adapter and base versions, prompt, seed, "
    "sampler settings). Deterministic for a given seed.",
)
def generated_images(
    context: dg.AssetExecutionContext,
    catalog_db: CatalogResource,
    media_store: MediaStoreResource,
    models: ModelsResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    svc = services(catalog_db, media_store, models, compute)
    with no_retry_on_bad_input():
        result = generation.generate_subject_images(
            svc,
            context.partition_key,
            context.run_id,
            counter("generating images", context.log.info),
        )
    return dg.MaterializeResult(
        metadata={
            "images": result.images,
            "adapter_version": result.record.adapter_version,
            "base_model_version": result.record.base_model_version,
            "images_per_second": result.images_per_second,
            "grid": dg.MetadataValue.md(markdown_gallery([("generated", result.grid_png)], 512)),
        }
    )


@dg.asset(
    partitions_def=subject_partitions,
    deps=[generated_images],
    group_name="generative",
    kinds={"pytorch", "mlflow"},
    **GPU_STEP,
    description="CLIP score (towards the subject's description), FID and KID against the "
    "subject's images, for the adapter's generations and the base model's on the same "
    "prompts and seeds; sample sizes recorded. Logged to MLflow (also on the adapter's run).",
)
def generation_quality(
    context: dg.AssetExecutionContext,
    catalog_db: CatalogResource,
    media_store: MediaStoreResource,
    models: ModelsResource,
    compute: ComputeResource,
    mlflow_tracking: MLflowResource,
) -> dg.MaterializeResult:
    svc = services(catalog_db, media_store, models, compute, mlflow_tracking)
    result = quality.evaluate_subject(svc, context.partition_key, mlflow_tracking.run_spec(context))
    report = result.report
    return dg.MaterializeResult(
        metadata={
            **{k: dg.FloatMetadataValue(v) for k, v in result.flat.items()},
            "intervals": dg.MetadataValue.json(interval_table(report["intervals"])),
            "sample_sizes": dg.MetadataValue.json(report["sample_sizes"]),
            "feature_extractor": report["adapter"]["feature_extractor"],
            "score_prompt": report["score_prompt"],
            "adapter_version": report["adapter_version"],
            **_run_link(result.run_url),
            "mlflow_compare": dg.MetadataValue.url(result.compare_url),
            **previews("base_vs_adapter", result.preview_png, result.comparison_png),
            "base_vs_adapter_mlflow": served_image("base | adapter", result.comparison_url),
        }
    )
