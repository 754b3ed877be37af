"""The one Definitions object of the project (found through workspace.yaml)."""

import warnings

import dagster as dg

# partitioned asset checks are "preview" in Dagster 1.13; we rely on them knowingly
warnings.filterwarnings("ignore", message=".*partitions_def on an AssetCheckSpec.*")

from mm_pipelines.defs.assets.embed import (  # noqa: E402
    ann_recall,
    audio_embeddings,
    clip_embeddings,
    clip_model,
    unified_embeddings,
    unified_projector,
    vector_index,
)
from mm_pipelines.defs.assets.generate import (  # noqa: E402
    generated_images,
    generation_quality,
    quality_gates,
)
from mm_pipelines.defs.assets.ingest import objects_intact, quarantine_rate, raw_media  # noqa: E402
from mm_pipelines.defs.assets.lora import (  # noqa: E402
    enough_images,
    lora_adapter,
    lora_base_model,
    lora_training_set,
)
from mm_pipelines.defs.assets.serve import online_model  # noqa: E402
from mm_pipelines.defs.assets.understand import transcripts, video_frames  # noqa: E402
from mm_pipelines.defs.jobs import (  # noqa: E402
    batch_pipeline,
    export_online_model_job,
    reevaluate_quality_job,
    subject_pipeline,
    train_clip_job,
    train_diffusion_base_job,
    train_projector_job,
)
from mm_pipelines.defs.k8s import executor_from_env  # noqa: E402
from mm_pipelines.defs.resources import build_resources  # noqa: E402
from mm_pipelines.defs.sensors import (  # noqa: E402
    landing_sensor,
    nightly_quality_review,
    serving_sensor,
    subjects_sensor,
)

defs = dg.Definitions(
    assets=[
        raw_media,
        video_frames,
        transcripts,
        clip_model,
        clip_embeddings,
        audio_embeddings,
        unified_projector,
        unified_embeddings,
        vector_index,
        lora_base_model,
        lora_training_set,
        lora_adapter,
        generated_images,
        generation_quality,
        online_model,
    ],
    asset_checks=[quarantine_rate, objects_intact, ann_recall, enough_images, quality_gates],
    jobs=[
        batch_pipeline,
        train_clip_job,
        train_projector_job,
        train_diffusion_base_job,
        subject_pipeline,
        export_online_model_job,
        reevaluate_quality_job,
    ],
    sensors=[landing_sensor, subjects_sensor, serving_sensor],
    schedules=[nightly_quality_review],
    resources=build_resources(),
    executor=executor_from_env(),  # k8s_job_executor (one pod per step) when MM_EXECUTOR=k8s
)
