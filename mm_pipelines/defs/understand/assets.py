"""`video_frames` and `transcripts`: what is seen and said in a batch's videos and audio."""

import dagster as dg

from mm_pipelines.defs.common import GPU_STEP, RETRY, stop_on_interrupt
from mm_pipelines.defs.metadata import png_markdown
from mm_pipelines.defs.partitions import batch_partitions
from mm_pipelines.defs.resources import (
    CatalogResource,
    ComputeResource,
    MediaStoreResource,
    ModelsResource,
    services,
)
from mm_pipelines.pipeline import understand


class VideoFramesConfig(dg.Config):
    strategies: list[str] = ["uniform:n=8", "fps:fps=1,max=120", "scene:threshold=0.3"]
    image_format: str = "jpeg"  # jpeg | webp | png
    quality: int = 85
    decode_batch: int = 8


@dg.asset(
    partitions_def=batch_partitions,
    deps=["raw_media"],
    group_name="understand",
    kinds={"python", "postgres"},
    retry_policy=RETRY,
    description="Sampled frames of every video of the batch (uniform / fps / keyframes / "
    "scene), stored content-addressed, with timestamps; one decoding pass per video.",
)
def video_frames(
    context: dg.AssetExecutionContext,
    config: VideoFramesConfig,
    catalog_db: CatalogResource,
    media_store: MediaStoreResource,
) -> dg.MaterializeResult:
    with stop_on_interrupt():
        result = understand.sample_video_frames(
            services(catalog_db, media_store),
            context.partition_key,
            config.strategies,
            config.image_format,
            config.quality,
            config.decode_batch,
            log=context.log.info,
        )
    metadata: dict[str, object] = {
        "videos": result.videos,
        "videos_sampled_now": result.sampled_now,
        "videos_skipped_already_done": result.skipped_already_done,
        "videos_undecodable": result.undecodable,
        "frames": result.frames,
        "frames_by_strategy": dg.MetadataValue.json(result.frames_by_strategy),
    }
    if result.sheet_png:
        metadata["contact_sheet"] = dg.MetadataValue.md(
            png_markdown(result.sheet_title, result.sheet_png, "contact sheet")
        )
    return dg.MaterializeResult(metadata=metadata)


class TranscriptsConfig(dg.Config):
    model: str | None = None  # a faster-whisper model dir or name; default: MM_WHISPER_MODEL
    batch_size: int = 8
    language: str | None = None  # None: detect


@dg.asset(
    partitions_def=batch_partitions,
    deps=["raw_media"],
    group_name="understand",
    kinds={"python", "pytorch"},
    retry_policy=RETRY,
    **GPU_STEP,
    description="Whisper transcripts (segments, words, language) of the batch's audio files "
    "and video sound tracks, keyed by content hash + model version.",
)
def transcripts(
    context: dg.AssetExecutionContext,
    config: TranscriptsConfig,
    catalog_db: CatalogResource,
    media_store: MediaStoreResource,
    compute: ComputeResource,
    models: ModelsResource,
) -> dg.MaterializeResult:
    with stop_on_interrupt():
        svc = services(catalog_db, media_store, models, compute)
        result = understand.transcribe_batch(
            svc,
            context.partition_key,
            config.model or svc.choice.whisper_model,
            config.batch_size,
            config.language,
            log=context.log.info,
        )
    sample_md = "no speech found"
    if result.sample:
        lines = [
            f"- `{s['start_s']:.1f}-{s['end_s']:.1f}s` {s['text']}"
            for s in result.sample["segments"][:8]
        ]
        head = f"`{result.sample['content_hash'][:12]}` ({result.sample['language']})"
        sample_md = head + "\n\n" + "\n".join(lines)
    metadata = {k: v for k, v in vars(result).items() if k != "sample"}
    return dg.MaterializeResult(
        metadata={**metadata, "sample_transcript": dg.MetadataValue.md(sample_md)}
    )
