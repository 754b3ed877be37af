"""The embed group: encoders, the unified space and the pgvector index.

torch, open_clip and mlflow are imported inside the asset bodies: every Dagster process
(webserver, daemon, each run worker, each k8s step pod) loads this module, and importing
them at module level added ~20 s to each of those starts."""

import dataclasses
import shutil
import tempfile
from typing import TYPE_CHECKING

import dagster as dg
import pandas as pd

from mm_pipelines.defs.assets.ingest import raw_media
from mm_pipelines.defs.assets.understand import transcripts, video_frames
from mm_pipelines.defs.k8s import gpu_op_tags
from mm_pipelines.defs.partitions import batch_partitions
from mm_pipelines.defs.resources import (
    CatalogResource,
    ComputeResource,
    MediaStoreResource,
    MLflowResource,
    ModelsResource,
    step_metrics,
)
from mm_pipelines.models.speech import whisper as speech
from mm_pipelines.storage import embeddings, vectors

if TYPE_CHECKING:
    from mm_pipelines.models.clip import loading as clip_models

_RETRY = dg.RetryPolicy(max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL)


def load_clip(models: ModelsResource, compute: ComputeResource) -> "clip_models.ClipBundle":
    from mm_pipelines.models.clip import loading as clip_models

    architecture, checkpoint = models.clip_source()
    return clip_models.load_clip(architecture, checkpoint, device=compute.torch_device())


class ClipModelConfig(dg.Config):
    steps: int | None = None  # None: the demo setting (clip_train.DEMO_TRAIN_CONFIG)
    seed: int = 0


@dg.asset(
    group_name="embed",
    kinds={"pytorch", "mlflow"},
    pool="gpu",
    op_tags=gpu_op_tags(),
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
    import mlflow

    from mm_pipelines.models.clip import loading as clip_models
    from mm_pipelines.models.demo import tiny_clip as clip_train

    if models.clip_checkpoint:
        bundle = load_clip(models, compute)
        return dg.MaterializeResult(
            metadata={"model_version": bundle.model_version, "trained_here": False}
        )
    train_config = dataclasses.replace(
        clip_train.DEMO_TRAIN_CONFIG,
        steps=config.steps or clip_train.DEMO_TRAIN_CONFIG.steps,
        seed=config.seed,
    )
    target = models.demo_clip_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with mlflow_tracking.start_run(context) as run, step_metrics(run) as log_step:
        mlflow.log_params(train_config.to_dict())

        def progress(step: int, loss: float) -> None:
            log_step("loss", loss, step)
            if step % 250 == 0:
                context.log.info(f"step {step}/{train_config.steps} loss {loss:.3f}")

        result = clip_train.train_clip(
            train_config, device=compute.torch_device(), progress=progress, checkpoint_path=target
        )
        bundle = clip_models.load_clip(
            train_config.architecture, target, device=compute.torch_device()
        )
        recall = clip_train.evaluate_on_heldout(bundle)
        mlflow.log_metrics({"heldout_recall_at_1": recall, "train_seconds": result.seconds})
        mlflow.log_artifact(str(target), artifact_path="clip")
        version = mlflow_tracking.register(
            run, "clip", "mm-clip", tags={"model_version": bundle.model_version}
        )
    return dg.MaterializeResult(
        metadata={
            "model_version": bundle.model_version,
            "heldout_recall_at_1": recall,
            "steps": result.steps_done,
            "train_seconds": round(result.seconds, 1),
            "registered_version": version,
            "mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_url(run)),
        }
    )


class EmbedConfig(dg.Config):
    batch_size: int = 64


@dg.asset(
    partitions_def=batch_partitions,
    deps=[raw_media, video_frames, transcripts, clip_model],
    group_name="embed",
    kinds={"pytorch", "postgres"},
    pool="gpu",
    op_tags=gpu_op_tags(),
    retry_policy=_RETRY,
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
    from mm_pipelines.pipeline import embed as batch_embedding

    bundle = load_clip(models, compute)
    with catalog_db.connect() as conn:
        items = embeddings.batch_items(
            conn, context.partition_key, speech.model_version(models.whisper_model)
        )
        stats = batch_embedding.embed_clip_items(
            conn,
            media_store.get_store(),
            bundle,
            items,
            config.batch_size,
            compute.dataloader_workers,
            progress=context.log.info,
        )
    return dg.MaterializeResult(metadata={"model_version": bundle.model_version, **vars(stats)})


@dg.asset(
    partitions_def=batch_partitions,
    deps=[raw_media],
    group_name="embed",
    kinds={"pytorch", "postgres"},
    pool="gpu",
    op_tags=gpu_op_tags(),
    retry_policy=_RETRY,
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
    from mm_pipelines.models.speech import audio_encoder as audio_embed
    from mm_pipelines.pipeline import embed as batch_embedding

    encoder = audio_embed.load_whisper_encoder(models.whisper_model, device=compute.torch_device())
    with catalog_db.connect() as conn:
        items = embeddings.batch_items(conn, context.partition_key, None)
        stats = batch_embedding.embed_audio_items(
            conn, media_store.get_store(), encoder, items, progress=context.log.info
        )
    return dg.MaterializeResult(metadata={"model_version": encoder.model_version, **vars(stats)})


@dg.asset(
    deps=[clip_embeddings, audio_embeddings],
    group_name="embed",
    kinds={"pytorch", "mlflow"},
    pool="gpu",
    op_tags=gpu_op_tags(),
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
    import mlflow

    from mm_pipelines.models.speech import audio_encoder as audio_embed
    from mm_pipelines.models.unified import projector as proj
    from mm_pipelines.pipeline import embed as batch_embedding

    bundle = load_clip(models, compute)
    audio_version = audio_embed.load_whisper_encoder(models.whisper_model).model_version
    with catalog_db.connect() as conn:
        audio, targets, groups = batch_embedding.projector_pairs(
            conn, bundle, audio_version, speech.model_version(models.whisper_model)
        )
    context.log.info(f"training the audio head on {len(audio)} pairs")
    with mlflow_tracking.start_run(context) as run, step_metrics(run) as log_step:
        train_config = proj.ProjectorTrainConfig()
        mlflow.log_params({**vars(train_config), "pairs": len(audio)})
        result = proj.train_projector(
            audio,
            targets,
            groups,
            train_config,
            bundle.model_version,
            audio_version,
            device=compute.torch_device(),
            progress=lambda step, loss: log_step("loss", loss, step),
        )
        with tempfile.TemporaryDirectory() as tmp:
            version = proj.save_projector(result.projector, tmp)
            folder = models.root() / "projector" / version.replace(":", "_").replace("@", "_")
            if not folder.exists():
                shutil.copytree(tmp, folder)
        (folder.parent / "CURRENT").write_text(folder.name)
        mlflow.log_metrics({k: float(v) for k, v in result.metrics.items()})
        mlflow.log_artifacts(str(folder), artifact_path="projector")
        registered = mlflow_tracking.register(
            run, "projector", "mm-unified-projector", tags={"projector_version": version}
        )
    return dg.MaterializeResult(
        metadata={
            "projector_version": version,
            "pairs": len(audio),
            **{k: dg.FloatMetadataValue(float(v)) for k, v in result.metrics.items()},
            "registered_version": registered,
            "mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_url(run)),
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
) -> dg.Output[pd.DataFrame]:
    from mm_pipelines.models.unified import projector as proj
    from mm_pipelines.pipeline import embed as batch_embedding

    projector = proj.load_projector(models.projector_path(), device=compute.torch_device())
    with catalog_db.connect() as conn:
        items = embeddings.batch_items(
            conn, context.partition_key, speech.model_version(models.whisper_model)
        )
        frame = batch_embedding.unified_frame(
            conn,
            context.partition_key,
            items,
            projector.config.clip_model_version,
            projector.config.audio_model_version,
            projector,
        )
    counts = frame["item_kind"].value_counts().to_dict() if len(frame) else {}
    return dg.Output(
        frame,
        metadata={
            "vectors": len(frame),
            "by_kind": dg.MetadataValue.json(counts),
            "projector_version": projector.version,
            "dim": int(len(frame["embedding"].iloc[0])) if len(frame) else 0,
        },
    )


@dg.asset(
    partitions_def=batch_partitions,
    group_name="embed",
    kinds={"postgres"},
    description="The batch's unified vectors in pgvector (HNSW, cosine), replaced atomically.",
)
def vector_index(
    context: dg.AssetExecutionContext, unified_embeddings: pd.DataFrame, catalog_db: CatalogResource
) -> dg.MaterializeResult:
    from mm_pipelines.pipeline import embed as batch_embedding

    rows = batch_embedding.vector_rows(unified_embeddings)
    with catalog_db.connect() as conn:
        written = vectors.replace_batch(conn, context.partition_key, rows)
        total = vectors.count(conn)
    return dg.MaterializeResult(metadata={"vectors_written": written, "index_total": total})


class RecallCheckConfig(dg.Config):
    min_recall_at_10: float = 0.95
    sample_queries: int = 50


@dg.asset_check(
    asset=vector_index,
    partitions_def=batch_partitions,
    blocking=True,
    description="ANN (HNSW) top-10 agrees with exact search on a sample of the batch's vectors.",
)
def ann_recall(
    context: dg.AssetCheckExecutionContext, config: RecallCheckConfig, catalog_db: CatalogResource
) -> dg.AssetCheckResult:
    with catalog_db.connect() as conn:
        dims = [
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT vector_dims(embedding) FROM unified_vectors WHERE batch = %s",
                (context.partition_key,),
            )
        ]
        recalls = {}
        for dim in dims:
            queries = vectors.sample_embeddings(
                conn, config.sample_queries, dim, context.partition_key
            )
            recalls[dim] = vectors.recall_at_k(conn, queries, 10)
    worst = min(recalls.values(), default=1.0)
    return dg.AssetCheckResult(
        passed=worst >= config.min_recall_at_10,
        metadata={
            "recall_at_10": worst,
            "by_dim": dg.MetadataValue.json({str(k): round(v, 4) for k, v in recalls.items()}),
            "threshold": config.min_recall_at_10,
        },
    )
