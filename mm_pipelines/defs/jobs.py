import dagster as dg

from mm_pipelines.defs.assets.embed import (
    audio_embeddings,
    clip_embeddings,
    clip_model,
    unified_embeddings,
    unified_projector,
    vector_index,
)
from mm_pipelines.defs.assets.generate import generated_images, generation_quality
from mm_pipelines.defs.assets.ingest import raw_media
from mm_pipelines.defs.assets.lora import lora_adapter, lora_base_model, lora_training_set
from mm_pipelines.defs.assets.serve import online_model
from mm_pipelines.defs.assets.understand import transcripts, video_frames
from mm_pipelines.defs.partitions import batch_partitions, subject_partitions

BATCH_ASSETS = [
    raw_media,
    video_frames,
    transcripts,
    clip_embeddings,
    audio_embeddings,
    unified_embeddings,
    vector_index,
]

# Everything a new landing batch goes through (the landing sensor runs this).
batch_pipeline = dg.define_asset_job(
    "batch_pipeline",
    selection=dg.AssetSelection.assets(*BATCH_ASSETS),
    partitions_def=batch_partitions,
    description="Process one landing batch end to end: ingest, understand, embed, index.",
)

train_clip_job = dg.define_asset_job(
    "train_clip",
    selection=dg.AssetSelection.assets(clip_model),
    description="(Re)build the CLIP model every batch is embedded with.",
)

train_projector_job = dg.define_asset_job(
    "train_projector",
    selection=dg.AssetSelection.assets(unified_projector),
    description="(Re)train the unified projector on every embedded batch.",
)

SUBJECT_ASSETS = [lora_training_set, lora_adapter, generated_images, generation_quality]

# One subject from selection to quality report (the subjects sensor runs this).
subject_pipeline = dg.define_asset_job(
    "subject_pipeline",
    selection=dg.AssetSelection.assets(*SUBJECT_ASSETS),
    partitions_def=subject_partitions,
    description="Train, generate and evaluate one subject's LoRA adapter.",
)

train_diffusion_base_job = dg.define_asset_job(
    "train_diffusion_base",
    selection=dg.AssetSelection.assets(lora_base_model),
    description="(Re)build the diffusion base model the subjects' adapters are trained on.",
)

export_online_model_job = dg.define_asset_job(
    "export_online_model",
    selection=dg.AssetSelection.assets(online_model),
    description="Export an approved LoRA version (with CLIP and projector) as the online "
    "serving bundle (the serving sensor runs this).",
)

reevaluate_quality_job = dg.define_asset_job(
    "reevaluate_quality",
    selection=dg.AssetSelection.assets(generation_quality),
    partitions_def=subject_partitions,
    description="Re-score a subject's current adapter and re-apply its quality gates.",
)
