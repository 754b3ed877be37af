"""The generation side of the generative group: a subject's generated images, their
quality report and the gates that mark a version for serving. torch/diffusers/mlflow are
imported inside the bodies (see embed.py)."""

import dataclasses
import io
import json
import os
import time
from typing import Any

import dagster as dg

from mm_pipelines.defs.assets.embed import load_clip
from mm_pipelines.defs.assets.lora import (
    RETRY,
    adapter_record,
    load_base_pipeline,
    lora_adapter,
    no_retry_on_bad_input,
    subject_of,
)
from mm_pipelines.defs.k8s import gpu_op_tags
from mm_pipelines.defs.metadata import markdown_gallery
from mm_pipelines.defs.partitions import subject_partitions
from mm_pipelines.defs.resources import (
    CatalogResource,
    ComputeResource,
    MediaStoreResource,
    MLflowResource,
    ModelsResource,
)
from mm_pipelines.models.common import encode_image
from mm_pipelines.pipeline import subjects
from mm_pipelines.pipeline.registry import CANDIDATE as CANDIDATE_ALIAS
from mm_pipelines.pipeline.registry import GATE_TAG, alias_version
from mm_pipelines.storage import generated

# --------------------------------------------------------------------------- generation


def _generate(pipe: Any, subject: subjects.Subject, progress=None) -> list:
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
    )


@dg.asset(
    partitions_def=subject_partitions,
    deps=[lora_adapter],
    group_name="generative",
    kinds={"diffusers", "postgres"},
    pool="gpu",
    op_tags=gpu_op_tags(),
    retry_policy=RETRY,
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
    from mm_pipelines.models.common import image_grid
    from mm_pipelines.models.diffusion.lora import load_adapter

    with no_retry_on_bad_input():
        subject = subject_of(context)
        record = adapter_record(models, subject.name)
        pipe = load_adapter(load_base_pipeline(models, compute), record.adapter_dir)
    t0 = time.perf_counter()
    images = _generate(pipe, subject, lambda done, total: context.log.info(f"{done}/{total}"))
    seconds = time.perf_counter() - t0
    store = media_store.get_store()
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
    with catalog_db.connect() as conn:
        generated.replace_generated(
            conn,
            subject.name,
            record.adapter_version,
            record.base_model_version,
            f"{record.registered_model}:{record.registered_version}",
            context.run_id,
            rows,
        )
    grid = image_grid([g.image for g in images])
    return dg.MaterializeResult(
        metadata={
            "images": len(rows),
            "adapter_version": record.adapter_version,
            "base_model_version": record.base_model_version,
            "images_per_second": round(len(rows) / seconds, 2),
            "grid": dg.MetadataValue.md(
                markdown_gallery([("generated", encode_image(grid, "png"))], 512)
            ),
        }
    )


# --------------------------------------------------------------------------- quality


@dg.asset(
    partitions_def=subject_partitions,
    deps=[generated_images],
    group_name="generative",
    kinds={"pytorch", "mlflow"},
    pool="gpu",
    op_tags=gpu_op_tags(),
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
    import mlflow
    from PIL import Image

    from mm_pipelines.models.common import image_grid
    from mm_pipelines.models.diffusion.evaluation import clip_features, quality_report
    from mm_pipelines.models.diffusion.metrics import inception_feature_extractor
    from mm_pipelines.models.diffusion.training_set import load_training_set

    subject = subject_of(context)
    record = adapter_record(models, subject.name)
    folder = models.subject_dir(subject.name)
    references = load_training_set(folder / "training_set").images
    store = media_store.get_store()
    with catalog_db.connect() as conn:
        rows = generated.generated_images(conn, subject.name, record.adapter_version)
    if not rows:
        raise ValueError(f"no generated images of adapter {record.adapter_version}")
    adapted = []
    for r in rows:
        with Image.open(io.BytesIO(store.read_bytes(r["content_hash"]))) as im:
            adapted.append(im.convert("RGB"))
    base = [g.image for g in _generate(load_base_pipeline(models, compute), subject)]
    bundle = load_clip(models, compute)
    feature = (
        inception_feature_extractor(models.fid_inception_weights)
        if models.fid_inception_weights
        else clip_features(bundle)
    )
    report = quality_report(
        references,
        adapted,
        base,
        subject.score_prompt,
        bundle,
        feature,
        device=compute.torch_device(),
    )
    report.update(
        subject=subject.name,
        adapter_version=record.adapter_version,
        registered_model=record.registered_model,
        registered_version=record.registered_version,
        adapter_run_id=record.mlflow_run_id,
    )
    flat = {
        f"{side}_{k}": float(v)
        for side in ("adapter", "base")
        for k, v in report[side].items()
        if isinstance(v, (int, float))
    }
    flat.update({k: float(report[k]) for k in ("fid_ratio_to_base", "kid_ratio_to_base")})
    tags = {"subject": subject.name, "adapter_run_id": str(record.mlflow_run_id)}
    with mlflow_tracking.start_run(context, tags=tags) as run:
        mlflow.log_metrics(flat)
        mlflow.log_dict(report, "quality_report.json")
        mlflow.log_image(image_grid(adapted), artifact_file="samples/adapter.png")
        mlflow.log_image(image_grid(base), artifact_file="samples/base.png")
    client = mlflow_tracking.client()
    for k, v in flat.items():  # the adapter's own run carries its quality too
        client.log_metric(record.mlflow_run_id, f"quality_{k}", v)
    tmp = folder / "quality.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, folder / "quality.json")
    return dg.MaterializeResult(
        metadata={
            **{k: dg.FloatMetadataValue(v) for k, v in flat.items()},
            "feature_extractor": report["adapter"]["feature_extractor"],
            "score_prompt": subject.score_prompt,
            "adapter_version": record.adapter_version,
            "mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_url(run)),
            "base_vs_adapter": dg.MetadataValue.md(
                markdown_gallery(
                    [
                        ("base", encode_image(image_grid(base), "png")),
                        ("adapter", encode_image(image_grid(adapted), "png")),
                    ],
                    384,
                )
            ),
        }
    )


@dg.asset_check(
    asset=generation_quality,
    partitions_def=subject_partitions,
    blocking=True,
    description="The subject's quality gates (subjects.yaml `gates:`). On pass the adapter's "
    f"model version gets the `{CANDIDATE_ALIAS}` alias (what the serving sensor watches) and "
    f"the `{GATE_TAG}=passed` tag; on fail it is tagged failed and never candidate.",
)
def quality_gates(
    context: dg.AssetCheckExecutionContext,
    models: ModelsResource,
    mlflow_tracking: MLflowResource,
) -> dg.AssetCheckResult:
    from mm_pipelines.models.diffusion.evaluation import gate_failures

    subject = subjects.get_subject(context.partition_key)
    report = json.loads((models.subject_dir(subject.name) / "quality.json").read_text())
    failures = gate_failures(report, subject.gates)
    name, version = report["registered_model"], report["registered_version"]
    client = mlflow_tracking.client()
    client.set_model_version_tag(name, version, GATE_TAG, "failed" if failures else "passed")
    if failures:
        client.set_model_version_tag(name, version, "mm.gate_failures", "; ".join(failures))
        current = alias_version(client, name, CANDIDATE_ALIAS)
        if current == str(version):
            client.delete_registered_model_alias(name, CANDIDATE_ALIAS)
    else:
        client.set_registered_model_alias(name, CANDIDATE_ALIAS, version)
    return dg.AssetCheckResult(
        passed=not failures,
        metadata={
            "failures": dg.MetadataValue.json(failures),
            "gates": dg.MetadataValue.json(dataclasses.asdict(subject.gates)),
            "model_version": f"{name} v{version}",
            "fid_ratio_to_base": report["fid_ratio_to_base"],
        },
    )
