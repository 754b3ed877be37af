"""Blocking checks of the generative group: enough training images, and the quality gates
that decide whether a registered version becomes a serving candidate."""

import dagster as dg

from mm_pipelines.defs.generative.assets import generation_quality, lora_training_set
from mm_pipelines.defs.metadata import interval_table
from mm_pipelines.defs.partitions import subject_partitions
from mm_pipelines.defs.resources import MLflowResource, ModelsResource, services
from mm_pipelines.pipeline import lora, quality, subjects
from mm_pipelines.pipeline.registry import CANDIDATE, GATE_TAG


@dg.asset_check(
    asset=lora_training_set,
    partitions_def=subject_partitions,
    blocking=True,
    description="The subject has at least `min_images` usable images.",
)
def enough_images(
    context: dg.AssetCheckExecutionContext, models: ModelsResource
) -> dg.AssetCheckResult:
    subject = subjects.get_subject(context.partition_key)
    n = len(lora.load_training_set(services(models=models), subject.name).images)
    return dg.AssetCheckResult(
        passed=n >= subject.min_images, metadata={"images": n, "min_images": subject.min_images}
    )


@dg.asset_check(
    asset=generation_quality,
    partitions_def=subject_partitions,
    blocking=True,
    description="The subject's quality gates (subjects.yaml `gates:`): thresholds on the "
    "numbers or on their bootstrap interval's bound, and minimum sample sizes below which "
    "nothing passes. On pass the adapter's "
    f"model version gets the `{CANDIDATE}` alias (what the serving sensor watches) and "
    f"the `{GATE_TAG}=passed` tag; on fail it is tagged failed and never candidate.",
)
def quality_gates(
    context: dg.AssetCheckExecutionContext,
    models: ModelsResource,
    mlflow_tracking: MLflowResource,
) -> dg.AssetCheckResult:
    svc = services(models=models, mlflow_tracking=mlflow_tracking)
    result = quality.apply_gates(svc, context.partition_key)
    return dg.AssetCheckResult(
        passed=result.passed,
        metadata={
            "failures": dg.MetadataValue.json(result.failures),
            "gates": dg.MetadataValue.json(result.gates),
            "model_version": f"{result.model} v{result.version}",
            "fid_ratio_to_base": result.fid_ratio_to_base,
            "intervals": dg.MetadataValue.json(interval_table(result.intervals)),
            "sample_sizes": dg.MetadataValue.json(result.sample_sizes),
            "mlflow_version": dg.MetadataValue.url(result.version_url),
        },
    )
