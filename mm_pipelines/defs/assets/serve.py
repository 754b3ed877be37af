"""The serve group: `online_model`, the verified serving bundle of an approved LoRA version
with the CLIP towers and the unified projector, published atomically to the serving store.

torch/diffusers/mlflow are imported inside the body (see embed.py for why)."""

import tempfile
from typing import Any

import dagster as dg

from mm_pipelines.defs.assets.embed import clip_model, unified_projector
from mm_pipelines.defs.assets.generate import generation_quality
from mm_pipelines.defs.assets.lora import lora_base_model
from mm_pipelines.defs.resources import (
    MLflowResource,
    ModelsResource,
    ServingResource,
)


class OnlineModelConfig(dg.Config):
    lora_model: str = ""  # registered model name; empty: the newest approved candidate
    lora_version: str = ""


def _latest_version(client: Any, name: str) -> dict[str, str]:
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        return {}
    mv = max(versions, key=lambda v: int(v.version))
    return {
        "registered_name": name,
        "registered_version": str(mv.version),
        "mlflow_run_id": mv.run_id,
    }


@dg.asset(
    deps=[generation_quality, clip_model, unified_projector, lora_base_model],
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
    from mm_pipelines.models.common import weights_version
    from mm_pipelines.pipeline import registry
    from mm_pipelines.serving.export import export_bundle
    from mm_pipelines.serving.store import publish_bundle

    client = mlflow_tracking.client()
    if config.lora_model:
        candidate = registry.get_candidate(client, config.lora_model, config.lora_version)
    else:
        approved = registry.approved_candidates(client)
        if not approved:
            raise dg.Failure("no approved LoRA version (none passed its quality gates yet)")
        candidate = approved[-1]
    base_dir = models.diffusion_base_dir()
    base_version = weights_version(base_dir, "sd")
    wanted = candidate.tags.get("base_model_version")
    if wanted and wanted != base_version:
        raise dg.Failure(
            f"{candidate.key} was trained on base model {wanted}, but {base_dir} is "
            f"{base_version}: point MM_DIFFUSION_BASE at the right one",
            allow_retries=False,
        )
    architecture, checkpoint = models.clip_source()
    work = models.root() / "exports"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        adapter_dir = client.download_artifacts(candidate.run_id, "adapter", tmp)
        context.log.info(f"exporting {candidate.key} with base {base_version}")
        result = export_bundle(
            f"{tmp}/bundle",
            clip_architecture=architecture,
            clip_checkpoint=checkpoint,
            projector_dir=models.projector_path(),
            diffusion_base_dir=base_dir,
            lora_adapter_dir=adapter_dir,
            whisper_model_dir=models.whisper_model,
            models_info={
                "clip": _latest_version(client, "mm-clip"),
                "projector": _latest_version(client, "mm-unified-projector"),
                "diffusion": {
                    "registered_name": candidate.name,
                    "registered_version": candidate.version,
                    "mlflow_run_id": candidate.run_id,
                    "base_model_version": base_version,
                },
            },
            source_hashes={
                "lora_training_set": candidate.tags.get("training_set_version"),
                "lora_adapter": candidate.tags.get("adapter_version"),
            },
            dagster_run_id=context.run_id,
        )
        store = serving.get_store()
        published = publish_bundle(store, result.bundle_dir)
    replaced = registry.promote(client, candidate.name, candidate.version, published.bundle_version)
    checks = result.manifest["verification"]["checks"]
    return dg.MaterializeResult(
        metadata={
            "bundle_version": published.bundle_version,
            "bundle_uri": published.uri,
            "replaced_bundle": published.replaced or "",
            "lora": candidate.key,
            "replaced_champion": f"{candidate.name}/{replaced}" if replaced else "",
            "max_abs_diff": dg.MetadataValue.json(
                {name: c["max_abs_diff"] for name, c in checks.items()}
            ),
            "files": len(result.manifest["files"]),
        }
    )
