"""Exporting an approved LoRA version (with the CLIP towers and the unified projector) as a
verified serving bundle, publishing it and making it the `champion`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm_pipelines.pipeline import model_store as ms
from mm_pipelines.pipeline import registry
from mm_pipelines.pipeline.services import DEMO, Services


class ExportRefused(ValueError):
    """The export cannot be made as asked (nothing approved, wrong base model)."""


@dataclass
class ExportOutcome:
    bundle_version: str
    bundle_uri: str
    replaced_bundle: str | None
    lora: str
    replaced_champion: str | None
    max_abs_diff: dict[str, float]
    files: int
    reused: bool = False  # the version was exported before: that bundle, not a new one


def _base_dir_for(svc: Services, candidate: registry.Candidate) -> tuple[Path, str]:
    """The base model the candidate was trained on, as a local folder, and its version."""
    from mm_pipelines.models.diffusion.pipeline import base_dir_version

    wanted = candidate.tags.get("base_model_version")
    if svc.choice.diffusion_base:
        base_dir = Path(svc.choice.diffusion_base)
        version = base_dir_version(base_dir)
        if wanted and wanted != version:
            raise ExportRefused(
                f"{candidate.key} was trained on base model {wanted}, but {base_dir} is "
                f"{version}: point MM_DIFFUSION_BASE at the right one"
            )
        return base_dir, version
    store = svc.need_models()
    artifact = store.get(ms.DIFFUSION_BASE, DEMO, wanted) if wanted else None
    if artifact is None:
        artifact = store.get(ms.DIFFUSION_BASE, DEMO)
    return artifact.path, artifact.version


def export_online_model(
    svc: Services,
    serving_store: Any,
    lora_model: str = "",
    lora_version: str = "",
    dagster_run_id: str | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> ExportOutcome:
    """Export `lora_model` v`lora_version` (or the newest approved candidate), verify the
    bundle in a fresh process, publish it (one pointer switch) and promote the version."""
    from mm_pipelines.serving.export import export_bundle
    from mm_pipelines.serving.store import publish_bundle

    client = svc.need_tracker().client()
    if lora_model:
        candidate = registry.get_candidate(client, lora_model, lora_version)
    else:
        approved = registry.approved_candidates(client)
        if not approved:
            raise ExportRefused("no approved LoRA version (none passed its quality gates yet)")
        candidate = approved[-1]
    if (done := _already_exported(client, serving_store, candidate, log)) is not None:
        return done
    base_dir, base_version = _base_dir_for(svc, candidate)
    architecture, checkpoint = svc.clip_source()
    store = svc.need_models()
    with store.staging("export") as work:
        adapter_dir = client.download_artifacts(candidate.run_id, "adapter", str(work))
        log(f"exporting {candidate.key} with base {base_version}")
        result = export_bundle(
            work / "bundle",
            clip_architecture=architecture,
            clip_checkpoint=checkpoint,
            projector_dir=svc.projector_dir(),
            diffusion_base_dir=base_dir,
            lora_adapter_dir=adapter_dir,
            whisper_model_dir=svc.choice.whisper_model,
            models_info={
                "clip": registry.latest_version(client, registry.CLIP_MODEL),
                "projector": registry.latest_version(client, registry.PROJECTOR_MODEL),
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
            dagster_run_id=dagster_run_id,
        )
        published = publish_bundle(serving_store, result.bundle_dir)
    replaced = registry.promote(client, candidate.name, candidate.version, published.bundle_version)
    checks = result.manifest["verification"]["checks"]
    return ExportOutcome(
        bundle_version=published.bundle_version,
        bundle_uri=published.uri,
        replaced_bundle=published.replaced,
        lora=candidate.key,
        replaced_champion=f"{candidate.name}/{replaced}" if replaced else None,
        max_abs_diff={name: c["max_abs_diff"] for name, c in checks.items()},
        files=len(result.manifest["files"]),
    )


def _already_exported(
    client: Any, serving_store: Any, candidate: registry.Candidate, log: Callable[[str], None]
) -> ExportOutcome | None:
    """A version exported before is not exported again: its bundle is put back online if
    another one is (a pointer switch), else nothing changes."""
    import json

    from mm_pipelines.serving.manifest import MANIFEST
    from mm_pipelines.serving.store import bundle_key, current_version, rollback

    bundle = candidate.tags.get(registry.BUNDLE_TAG)
    raw = serving_store.read_bytes(bundle_key(bundle, MANIFEST)) if bundle else None
    if raw is None:
        return None  # never exported, or its bundle is not in this store
    manifest = json.loads(raw)
    online = current_version(serving_store)
    replaced_bundle = replaced = None
    if online != bundle:
        log(f"{candidate.key} was exported as bundle {bundle}: putting it back online")
        replaced_bundle = rollback(serving_store, bundle)["replaced"]
        replaced = registry.promote(client, candidate.name, candidate.version, bundle)
    else:
        log(f"{candidate.key} is online already as bundle {bundle}: nothing to export")
    checks = manifest.get("verification", {}).get("checks", {})
    return ExportOutcome(
        bundle_version=bundle,
        bundle_uri=serving_store.uri(bundle_key(bundle)),
        replaced_bundle=replaced_bundle,
        lora=candidate.key,
        replaced_champion=f"{candidate.name}/{replaced}" if replaced else None,
        max_abs_diff={name: c["max_abs_diff"] for name, c in checks.items()},
        files=len(manifest.get("files", {})),
        reused=True,
    )
