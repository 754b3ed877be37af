"""The serve group: `online_model`, the verified serving bundle of an approved LoRA version
with the CLIP towers and the unified projector, published atomically to the serving store."""

import dagster as dg

from mm_pipelines.defs.resources import MLflowResource, ModelsResource, ServingResource, services
from mm_pipelines.pipeline.export import ExportRefused, export_online_model


class OnlineModelConfig(dg.Config):
    lora_model: str = ""  # registered model name; empty: the newest approved candidate
    lora_version: str = ""


@dg.asset(
    deps=["generation_quality", "clip_model", "unified_projector", "lora_base_model"],
    group_name="serve",
    kinds={"pytorch", "mlflow", "s3"},
    pool="serving_publish",  # one publisher at a time: CURRENT and history.jsonl are shared
    description="A self-contained serving bundle: CLIP towers and unified projector "
    "(TorchScript + safetensors), the approved LoRA (diffusers safetensors, and fused into "
    "the base UNet), a manifest with versions, MLflow run ids, source hashes, checksums and "
    "the fresh-process verification. Published to the serving store by switching one "
    "pointer; the LoRA version then carries the `champion` alias.",
)
def online_model(
    context: dg.AssetExecutionContext,
    config: OnlineModelConfig,
    models: ModelsResource,
    mlflow_tracking: MLflowResource,
    serving: ServingResource,
) -> dg.MaterializeResult:
    svc = services(models=models, mlflow_tracking=mlflow_tracking)
    try:
        result = export_online_model(
            svc,
            serving.get_store(),
            config.lora_model,
            config.lora_version,
            context.run_id,
            log=context.log.info,
        )
    except ExportRefused as err:
        raise dg.Failure(str(err), allow_retries=False) from err
    return dg.MaterializeResult(
        metadata={
            "bundle_version": result.bundle_version,
            "bundle_uri": result.bundle_uri,
            "replaced_bundle": result.replaced_bundle or "",
            "lora": result.lora,
            "replaced_champion": result.replaced_champion or "",
            "max_abs_diff": dg.MetadataValue.json(result.max_abs_diff),
            "files": result.files,
            "reused": result.reused,  # exported before: no new bundle
        }
    )
