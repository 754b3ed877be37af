"""The job a landing batch goes through."""

import dagster as dg

from mm_pipelines.defs.partitions import batch_partitions

# by key: the job spans the ingest, understand and embed groups
BATCH_ASSETS = [
    "raw_media",
    "video_frames",
    "transcripts",
    "clip_embeddings",
    "audio_embeddings",
    "unified_embeddings",
    "vector_index",
]

batch_pipeline = dg.define_asset_job(
    "batch_pipeline",
    selection=dg.AssetSelection.assets(*BATCH_ASSETS),
    partitions_def=batch_partitions,
    description="Process one landing batch end to end: ingest, understand, embed, index.",
)
