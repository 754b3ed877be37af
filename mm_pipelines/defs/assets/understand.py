"""`video_frames` and `transcripts`: what is seen and said in a batch's videos and audio."""

import base64
import io
import time
from collections import defaultdict

import dagster as dg
from PIL import Image

from mm_pipelines.defs.assets.ingest import raw_media
from mm_pipelines.defs.k8s import gpu_op_tags
from mm_pipelines.defs.partitions import batch_partitions
from mm_pipelines.defs.resources import CatalogResource, ComputeResource, MediaStoreResource
from mm_pipelines.models.common import contact_sheet, encode_image
from mm_pipelines.models.speech import whisper as speech
from mm_pipelines.models.video import frames as fr
from mm_pipelines.storage import catalog, understand
from mm_pipelines.storage.understand import FrameRow, Outcome, SegmentRow

_RETRY = dg.RetryPolicy(max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL)


class VideoFramesConfig(dg.Config):
    strategies: list[str] = ["uniform:n=8", "fps:fps=1,max=120", "scene:threshold=0.3"]
    image_format: str = "jpeg"  # jpeg | webp | png
    quality: int = 85
    decode_batch: int = 8


@dg.asset(
    partitions_def=batch_partitions,
    deps=[raw_media],
    group_name="understand",
    kinds={"python", "postgres"},
    retry_policy=_RETRY,
    description="Sampled frames of every video of the batch (uniform / fps / keyframes / "
    "scene), stored content-addressed, with timestamps; one decoding pass per video.",
)
def video_frames(
    context: dg.AssetExecutionContext,
    config: VideoFramesConfig,
    catalog_db: CatalogResource,
    media_store: MediaStoreResource,
) -> dg.MaterializeResult:
    strategies = [fr.parse_strategy(s) for s in config.strategies]
    store = media_store.get_store()
    with catalog_db.connect() as conn:
        videos = [
            v["content_hash"] for v in catalog.batch_media(conn, context.partition_key, ["video"])
        ]
        todo = {
            s.version: set(understand.pending_samplings(conn, videos, s.version))
            for s in strategies
        }
    sampled = failed = 0
    for number, video in enumerate(videos, start=1):
        wanted = [s for s in strategies if video in todo[s.version]]
        if not wanted:
            continue
        report = fr.SamplingReport()
        rows: dict[str, list[FrameRow]] = defaultdict(list)
        try:
            for frame in fr.iter_frames(
                store.local_path(video), wanted, batch_size=config.decode_batch, report=report
            ):
                data = encode_image(frame.image, config.image_format, config.quality)
                frame_hash, _ = store.put_bytes(data)
                height, width = frame.image.shape[:2]
                rows[frame.version].append(
                    FrameRow(
                        video,
                        frame.version,
                        frame.strategy,
                        frame.frame_index,
                        frame.timestamp_s,
                        frame_hash,
                        store.uri(frame_hash),
                        width,
                        height,
                    )
                )
            outcome = Outcome()
            sampled += 1
        except fr.VideoDecodeError as err:
            context.log.warning(f"video {video}: {err}")
            outcome = Outcome("quarantined", "undecodable_video", str(err.reason))
            rows.clear()
            failed += 1
        with catalog_db.connect() as conn:
            for strategy in wanted:
                understand.save_sampling(
                    conn,
                    video,
                    strategy.version,
                    outcome,
                    rows.get(strategy.version, []),
                    report.decoder,
                )
        context.log.info(
            f"video {number}/{len(videos)}: {dict(report.counts)} via {report.decoder}"
        )

    with catalog_db.connect() as conn:
        all_frames = understand.batch_frames(conn, context.partition_key)
    metadata: dict[str, object] = {
        "videos": len(videos),
        "videos_sampled_now": sampled,
        "videos_skipped_already_done": len(videos) - sampled - failed,
        "videos_undecodable": failed,
        "frames": len(all_frames),
        "frames_by_strategy": dg.MetadataValue.json(
            {
                s.name: sum(f["strategy_version"] == s.version for f in all_frames)
                for s in strategies
            }
        ),
    }
    sheet = [f for f in all_frames if f["strategy_version"] == strategies[0].version]
    sheet = [f for f in sheet if f["video_hash"] == sheet[0]["video_hash"]][:12] if sheet else []
    if sheet:
        png = contact_sheet(
            [Image.open(io.BytesIO(store.read_bytes(f["frame_hash"]))) for f in sheet],
            labels=[f"{f['timestamp_s']:.1f}s" for f in sheet],
        )
        metadata["contact_sheet"] = dg.MetadataValue.md(
            f"{strategies[0].name} frames of video `{sheet[0]['video_hash'][:12]}`\n\n"
            f"![contact sheet](data:image/png;base64,{base64.b64encode(png).decode()})"
        )
    return dg.MaterializeResult(metadata=metadata)


class TranscriptsConfig(dg.Config):
    model: str | None = None  # a faster-whisper model dir or name; default: shipped tiny.en
    batch_size: int = 8
    language: str | None = None  # None: detect


@dg.asset(
    partitions_def=batch_partitions,
    deps=[raw_media],
    group_name="understand",
    kinds={"python", "pytorch"},
    pool="gpu",
    op_tags=gpu_op_tags(),
    retry_policy=_RETRY,
    description="Whisper transcripts (segments, words, language) of the batch's audio files "
    "and video sound tracks, keyed by content hash + model version.",
)
def transcripts(
    context: dg.AssetExecutionContext,
    config: TranscriptsConfig,
    catalog_db: CatalogResource,
    media_store: MediaStoreResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    store = media_store.get_store()
    version = speech.model_version(config.model)
    with catalog_db.connect() as conn:
        items = catalog.batch_media(conn, context.partition_key, ["audio", "video"])
        sources = [i["content_hash"] for i in items if i["modality"] == "audio" or i["has_audio"]]
        pending = understand.pending_transcriptions(conn, sources, version)
    started = time.perf_counter()
    audio_s = 0.0
    failed = 0
    if pending:
        model = speech.load_model(config.model, device=compute.torch_device())
        paths = [store.local_path(h) for h in pending]
        results = speech.iter_transcripts(
            paths, model=model, batch_size=config.batch_size, language=config.language
        )
        for done, (index, result) in enumerate(results, start=1):
            content_hash = pending[index]
            with catalog_db.connect() as conn:
                if isinstance(result, speech.AudioDecodeError):
                    failed += 1
                    understand.save_transcription(
                        conn,
                        content_hash,
                        version,
                        Outcome("quarantined", "undecodable_audio", result.reason),
                        [],
                    )
                    continue
                audio_s += result.duration_s
                understand.save_transcription(
                    conn,
                    content_hash,
                    version,
                    Outcome(),
                    _segments(content_hash, result),
                    result.language,
                    result.language_probability,
                    result.duration_s,
                )
            context.log.info(f"transcribed {done}/{len(pending)}: {content_hash[:12]}")
    elapsed = time.perf_counter() - started

    with catalog_db.connect() as conn:
        rows = understand.batch_transcripts(conn, context.partition_key, version)
    sample = next((r for r in rows if r["segments"]), None)
    sample_md = "no speech found"
    if sample:
        lines = [
            f"- `{s['start_s']:.1f}-{s['end_s']:.1f}s` {s['text']}" for s in sample["segments"][:8]
        ]
        sample_md = f"`{sample['content_hash'][:12]}` ({sample['language']})\n\n" + "\n".join(lines)
    return dg.MaterializeResult(
        metadata={
            "model_version": version,
            "sources": len(sources),
            "transcribed_now": len(pending) - failed,
            "skipped_already_done": len(sources) - len(pending),
            "undecodable": failed,
            "segments": sum(len(r["segments"]) for r in rows),
            "audio_seconds_now": round(audio_s, 1),
            "real_time_factor_now": round(elapsed / audio_s, 4) if audio_s else 0.0,
            "sample_transcript": dg.MetadataValue.md(sample_md),
        }
    )


def _segments(content_hash: str, result: "speech.Transcript") -> list[SegmentRow]:
    return [
        SegmentRow(
            content_hash,
            result.model_version,
            i,
            s.start,
            s.end,
            s.text,
            s.avg_logprob,
            [
                {"word": w.word, "start": w.start, "end": w.end, "probability": w.probability}
                for w in s.words
            ],
        )
        for i, s in enumerate(result.segments)
    ]
