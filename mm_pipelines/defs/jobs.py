import dagster as dg

from mm_pipelines.defs.assets.ingest import raw_media
from mm_pipelines.defs.assets.understand import transcripts, video_frames
from mm_pipelines.defs.partitions import batch_partitions

# Everything a new landing batch goes through; later stages join this selection.
batch_pipeline = dg.define_asset_job(
    "batch_pipeline",
    selection=dg.AssetSelection.assets(raw_media, video_frames, transcripts),
    partitions_def=batch_partitions,
    description="Process one landing batch end to end.",
)
