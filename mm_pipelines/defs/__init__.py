"""The one Definitions object of the project (found through workspace.yaml), assembled from
the groups: ingest, understand, embed, curate, generative, serve."""

import warnings

import dagster as dg

# partitioned asset checks are "preview" in Dagster 1.13; we rely on them knowingly
warnings.filterwarnings("ignore", message=".*partitions_def on an AssetCheckSpec.*")

from mm_pipelines.defs.curate import assets as curate_assets  # noqa: E402
from mm_pipelines.defs.curate import checks as curate_checks  # noqa: E402
from mm_pipelines.defs.curate.jobs import train_content_heads_job  # noqa: E402
from mm_pipelines.defs.embed import assets as embed_assets  # noqa: E402
from mm_pipelines.defs.embed import checks as embed_checks  # noqa: E402
from mm_pipelines.defs.embed.jobs import train_clip_job, train_projector_job  # noqa: E402
from mm_pipelines.defs.generative import assets as generative_assets  # noqa: E402
from mm_pipelines.defs.generative import checks as generative_checks  # noqa: E402
from mm_pipelines.defs.generative.jobs import (  # noqa: E402
    reevaluate_quality_job,
    subject_pipeline,
    train_diffusion_base_job,
)
from mm_pipelines.defs.generative.sensors import (  # noqa: E402
    nightly_quality_review,
    subjects_sensor,
)
from mm_pipelines.defs.ingest import assets as ingest_assets  # noqa: E402
from mm_pipelines.defs.ingest import checks as ingest_checks  # noqa: E402
from mm_pipelines.defs.ingest.jobs import batch_pipeline  # noqa: E402
from mm_pipelines.defs.ingest.sensors import landing_sensor  # noqa: E402
from mm_pipelines.defs.k8s import executor_from_env  # noqa: E402
from mm_pipelines.defs.recovery import dead_run_sensor  # noqa: E402
from mm_pipelines.defs.resources import build_resources  # noqa: E402
from mm_pipelines.defs.serve import assets as serve_assets  # noqa: E402
from mm_pipelines.defs.serve.jobs import export_online_model_job  # noqa: E402
from mm_pipelines.defs.serve.sensors import serving_sensor  # noqa: E402
from mm_pipelines.defs.understand import assets as understand_assets  # noqa: E402

GROUPS = [
    ingest_assets,
    understand_assets,
    embed_assets,
    curate_assets,
    generative_assets,
    serve_assets,
]
CHECKS = [ingest_checks, embed_checks, curate_checks, generative_checks]


def make_definitions() -> dg.Definitions:
    """The Definitions with resources and executor read from the settings now: what a
    process that changed its environment since the import (`mm`, tests) runs jobs with."""
    return dg.Definitions(
        assets=dg.load_assets_from_modules(GROUPS),
        asset_checks=dg.load_asset_checks_from_modules(CHECKS),
        jobs=[
            batch_pipeline,
            train_clip_job,
            train_projector_job,
            train_content_heads_job,
            train_diffusion_base_job,
            subject_pipeline,
            export_online_model_job,
            reevaluate_quality_job,
        ],
        sensors=[landing_sensor, subjects_sensor, serving_sensor, dead_run_sensor],
        schedules=[nightly_quality_review],
        resources=build_resources(),
        executor=executor_from_env(),  # k8s_job_executor (one pod per step) when MM_EXECUTOR=k8s
    )


defs = make_definitions()
