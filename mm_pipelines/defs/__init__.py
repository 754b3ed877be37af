"""The one Definitions object of the project (found through workspace.yaml)."""

import warnings

import dagster as dg

# partitioned asset checks are "preview" in Dagster 1.13; we rely on them knowingly
warnings.filterwarnings("ignore", message=".*partitions_def on an AssetCheckSpec.*")

from mm_pipelines.defs.assets.ingest import objects_intact, quarantine_rate, raw_media  # noqa: E402
from mm_pipelines.defs.assets.understand import transcripts, video_frames  # noqa: E402
from mm_pipelines.defs.jobs import batch_pipeline  # noqa: E402
from mm_pipelines.defs.resources import build_resources  # noqa: E402
from mm_pipelines.defs.sensors import landing_sensor  # noqa: E402

defs = dg.Definitions(
    assets=[raw_media, video_frames, transcripts],
    asset_checks=[quarantine_rate, objects_intact],
    jobs=[batch_pipeline],
    sensors=[landing_sensor],
    resources=build_resources(),
)
