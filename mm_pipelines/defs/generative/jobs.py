"""Jobs of the generative group."""

import dagster as dg

from mm_pipelines.defs.partitions import subject_partitions

SUBJECT_ASSETS = ["lora_training_set", "lora_adapter", "generated_images", "generation_quality"]

# one subject from selection to quality report (the subjects sensor runs this)
subject_pipeline = dg.define_asset_job(
    "subject_pipeline",
    selection=dg.AssetSelection.assets(*SUBJECT_ASSETS),
    partitions_def=subject_partitions,
    description="Train, generate and evaluate one subject's LoRA adapter.",
)

train_diffusion_base_job = dg.define_asset_job(
    "train_diffusion_base",
    selection=dg.AssetSelection.assets("lora_base_model"),
    description="(Re)build the diffusion base model the subjects' adapters are trained on.",
)

reevaluate_quality_job = dg.define_asset_job(
    "reevaluate_quality",
    selection=dg.AssetSelection.assets("generation_quality"),
    partitions_def=subject_partitions,
    description="Re-score a subject's current adapter and re-apply its quality gates.",
)
