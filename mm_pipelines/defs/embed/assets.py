"""The embed group: encoders, the unified space and the pgvector index.

torch, open_clip and mlflow are imported inside the drivers' functions: every Dagster
process (webserver, daemon, each run worker, each k8s step pod) loads this module, and
importing them at module level added ~20 s to each of those starts. pandas likewise
(~1.6 s): Dagster resolves these functions' annotations when the definitions load, so the
batch's frame is typed `Any` here (a pandas DataFrame, `embed.UnifiedResult.frame`)."""

from typing import Any

import dagster as dg

from mm_pipelines.defs.common import GPU_STEP, RETRY, stop_on_interrupt
from mm_pipelines.defs.partitions import batch_partitions
from mm_pipelines.defs.resources import (
    CatalogResource,
    ComputeResource,
    MediaStoreResource,
    MLflowResource,
    ModelsResource,
    services,
)
from mm_pipelines.pipeline import embed


class ClipModelConfig(dg.Config):
    steps: int | None = None  # None: the demo setting (tiny_clip.DEMO_TRAIN_CONFIG)
    seed: int = 0


@dg.asset(
    group_name="embed",
    kinds={"pytorch", "mlflow"},
    **GPU_STEP,
    description="The CLIP model everything is embedded with. With MM_CLIP_CHECKPOINT set it "
    "is that model, checked to load; otherwise the demo's tiny CLIP, trained here on drawn, "
    "captioned shapes, logged to MLflow and registered as `mm-clip`.",
)
def clip_model(
    context: dg.AssetExecutionContext,
    config: ClipModelConfig,
    models: ModelsResource,
    compute: ComputeResource,
    mlflow_tracking: MLflowResource,
) -> dg.MaterializeResult:
    svc = services(models=models, compute=compute, mlflow_tracking=mlflow_tracking)
    result = embed.build_clip_model(
        svc, mlflow_tracking.run_spec(context), config.steps, config.seed, log=context.log.info
    )
    metadata = {k: v for k, v in vars(result).items() if v is not None and k != "run_url"}
    if result.run_url:
        metadata["mlflow_run"] = dg.MetadataValue.url(result.run_url)
    return dg.MaterializeResult(metadata=metadata)


class EmbedConfig(dg.Config):
    batch_size: int = 64


@dg.asset(
    partitions_def=batch_partitions,
    deps=["raw_media", "video_frames", "transcripts", "clip_model"],
    group_name="embed",
    kinds={"pytorch", "postgres"},
    retry_policy=RETRY,
    **GPU_STEP,
    description="CLIP vectors of the batch's images, video frames, captions, text documents "
    "(chunked, never truncated) and transcript segments.",
)
def clip_embeddings(
    context: dg.AssetExecutionContext,
    config: EmbedConfig,
    catalog_db: CatalogResource,
    media_store: MediaStoreResource,
    models: ModelsResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    with stop_on_interrupt():
        svc = services(catalog_db, media_store, models, compute)
        result = embed.embed_clip_batch(
            svc, context.partition_key, config.batch_size, log=context.log.info
        )
    return dg.MaterializeResult(
        metadata={"model_version": result.model_version, **vars(result.stats)}
    )


@dg.asset(
    partitions_def=batch_partitions,
    deps=["raw_media"],
    group_name="embed",
    kinds={"pytorch", "postgres"},
    retry_policy=RETRY,
    **GPU_STEP,
    description="Acoustic vectors (Whisper encoder, mean-pooled) of the batch's audio files "
    "and video sound tracks: one per file and one per 2 s window.",
)
def audio_embeddings(
    context: dg.AssetExecutionContext,
    catalog_db: CatalogResource,
    media_store: MediaStoreResource,
    models: ModelsResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    with stop_on_interrupt():
        svc = services(catalog_db, media_store, models, compute)
        result = embed.embed_audio_batch(svc, context.partition_key, log=context.log.info)
    return dg.MaterializeResult(
        metadata={"model_version": result.model_version, **vars(result.stats)}
    )


@dg.asset(
    deps=[clip_embeddings, audio_embeddings],
    group_name="embed",
    kinds={"pytorch", "mlflow"},
    **GPU_STEP,
    description="Projection heads into one space (CLIP's): identity for images and text, a "
    "learned head for audio, trained on speech<->transcript and sound<->frame pairs from all "
    "batches. Logged to MLflow and registered as `mm-unified-projector`.",
)
def unified_projector(
    context: dg.AssetExecutionContext,
    catalog_db: CatalogResource,
    models: ModelsResource,
    compute: ComputeResource,
    mlflow_tracking: MLflowResource,
) -> dg.MaterializeResult:
    svc = services(catalog_db, models=models, compute=compute, mlflow_tracking=mlflow_tracking)
    result = embed.train_unified_projector(
        svc, mlflow_tracking.run_spec(context), log=context.log.info
    )
    return dg.MaterializeResult(
        metadata={
            "projector_version": result.projector_version,
            "pairs": result.pairs,
            **{k: dg.FloatMetadataValue(v) for k, v in result.metrics.items()},
            "registered_version": result.registered_version,
            "mlflow_run": dg.MetadataValue.url(result.run_url),
        }
    )


@dg.asset(
    partitions_def=batch_partitions,
    deps=[clip_embeddings, audio_embeddings, unified_projector],
    group_name="embed",
    kinds={"pytorch", "pandas"},
    description="Every item of the batch in the unified space, with lineage (kind, content "
    "hash, parent, timestamps, tenant, encoder and projector versions).",
)
def unified_embeddings(
    context: dg.AssetExecutionContext,
    catalog_db: CatalogResource,
    models: ModelsResource,
    compute: ComputeResource,
) -> dg.Output[Any]:
    result = embed.unified_batch(services(catalog_db, models=models, compute=compute),
                                 context.partition_key)  # fmt: skip
    return dg.Output(
        result.frame,
        metadata={
            "vectors": len(result.frame),
            "by_kind": dg.MetadataValue.json(result.by_kind),
            "projector_version": result.projector_version,
            "dim": result.dim,
        },
    )


@dg.asset(
    partitions_def=batch_partitions,
    group_name="embed",
    kinds={"postgres"},
    description="The batch's unified vectors in pgvector (HNSW, cosine), replaced atomically.",
)
def vector_index(
    context: dg.AssetExecutionContext, unified_embeddings: Any, catalog_db: CatalogResource
) -> dg.MaterializeResult:
    written, total = embed.index_batch(
        services(catalog_db), context.partition_key, unified_embeddings
    )
    return dg.MaterializeResult(metadata={"vectors_written": written, "index_total": total})
