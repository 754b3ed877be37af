"""The job a landing batch goes through."""

import dagster as dg

from mm_pipelines.defs.partitions import batch_partitions

# by key: the job spans the ingest, understand, embed and curate groups
BATCH_ASSETS = [
    "raw_media",
    "video_frames",
    "transcripts",
    "clip_embeddings",
    "audio_embeddings",
    "unified_embeddings",
    "vector_index",
    "near_duplicates",
    "content_scores",
    "captions",
]

batch_pipeline = dg.define_asset_job(
    "batch_pipeline",
    selection=dg.AssetSelection.assets(*BATCH_ASSETS),
    partitions_def=batch_partitions,
    description="Process one landing batch end to end: ingest, understand, embed, index, curate.",
)
