"""Understanding a batch: sampled video frames and Whisper transcripts, keyed by content hash
and strategy/model version so a re-run only does what is new."""

from __future__ import annotations

import io
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from mm_pipelines.models.common import contact_sheet, encode_image
from mm_pipelines.models.speech import whisper as speech
from mm_pipelines.models.video import frames as fr
from mm_pipelines.pipeline.progress import Eta
from mm_pipelines.pipeline.services import Services
from mm_pipelines.storage import catalog, understand
from mm_pipelines.storage.postgres import connect
from mm_pipelines.storage.understand import FrameRow, Outcome, SegmentRow

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# --------------------------------------------------------------------------- frames


@dataclass
class FramesResult:
    videos: int
    sampled_now: int
    undecodable: int
    frames: int
    frames_by_strategy: dict[str, int]
    sheet_png: bytes | None = None  # the first strategy's frames of one video
    sheet_title: str = ""

    @property
    def skipped_already_done(self) -> int:
        return self.videos - self.sampled_now - self.undecodable


def sample_video_frames(
    svc: Services,
    batch: str,
    strategies: list[str],
    image_format: str = "jpeg",
    quality: int = 85,
    decode_batch: int = 8,
    log: Log = _quiet,
) -> FramesResult:
    """Sample every video of the batch once per pending strategy (one decoding pass each),
    store frames content-addressed and record them; undecodable videos are quarantined."""
    parsed = [fr.parse_strategy(s) for s in strategies]
    store, dsn = svc.need_media(), svc.need_dsn()
    with connect(dsn) as conn:
        videos = [v["content_hash"] for v in catalog.batch_media(conn, batch, ["video"])]
        todo = {
            s.version: set(understand.pending_samplings(conn, videos, s.version)) for s in parsed
        }
    sampled = failed = 0
    eta = Eta("sampling frames, video", len(videos), log)
    for number, video in enumerate(videos, start=1):
        wanted = [s for s in parsed if video in todo[s.version]]
        if not wanted:
            continue
        report = fr.SamplingReport()
        try:
            rows = _sample_one(store, video, wanted, image_format, quality, decode_batch, report)
            outcome = Outcome()
            sampled += 1
        except fr.VideoDecodeError as err:
            log(f"video {video}: {err}")
            outcome = Outcome("quarantined", "undecodable_video", str(err.reason))
            rows = {}
            failed += 1
        with connect(dsn) as conn:
            for strategy in wanted:
                understand.save_sampling(
                    conn, video, strategy.version, outcome, rows.get(strategy.version, []),
                    report.decoder,
                )  # fmt: skip
        eta(number, f"{sum(report.counts.values())} frames via {report.decoder}")

    with connect(dsn) as conn:
        all_frames = understand.batch_frames(conn, batch)
    by_strategy = {
        s.name: sum(f["strategy_version"] == s.version for f in all_frames) for s in parsed
    }
    result = FramesResult(len(videos), sampled, failed, len(all_frames), by_strategy)
    sheet = [f for f in all_frames if f["strategy_version"] == parsed[0].version]
    sheet = [f for f in sheet if f["video_hash"] == sheet[0]["video_hash"]][:12] if sheet else []
    if sheet:
        result.sheet_png = contact_sheet(
            [Image.open(io.BytesIO(store.read_bytes(f["frame_hash"]))) for f in sheet],
            labels=[f"{f['timestamp_s']:.1f}s" for f in sheet],
        )
        result.sheet_title = f"{parsed[0].name} frames of video `{sheet[0]['video_hash'][:12]}`"
    return result


def _sample_one(
    store: Any,
    video: str,
    wanted: list[Any],
    image_format: str,
    quality: int,
    decode_batch: int,
    report: fr.SamplingReport,
) -> dict[str, list[FrameRow]]:
    rows: dict[str, list[FrameRow]] = defaultdict(list)
    frames = fr.iter_frames(store.local_path(video), wanted, batch_size=decode_batch, report=report)
    for frame in frames:
        data = encode_image(frame.image, image_format, quality)  # type: ignore[arg-type]
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
    return rows


# --------------------------------------------------------------------------- transcripts


@dataclass
class TranscriptsResult:
    model_version: str
    sources: int
    transcribed_now: int
    skipped_already_done: int
    undecodable: int
    segments: int
    audio_seconds_now: float
    real_time_factor_now: float
    sample: dict[str, Any] | None = field(default=None)  # one transcript with segments


def transcribe_batch(
    svc: Services,
    batch: str,
    model: str | None = None,
    batch_size: int = 8,
    language: str | None = None,
    log: Log = _quiet,
) -> TranscriptsResult:
    """Whisper over the batch's audio files and video sound tracks not yet transcribed by
    this model version; undecodable streams are quarantined, silence is an empty transcript."""
    store, dsn = svc.need_media(), svc.need_dsn()
    version = speech.model_version(model)
    with connect(dsn) as conn:
        items = catalog.batch_media(conn, batch, ["audio", "video"])
        sources = [i["content_hash"] for i in items if i["modality"] == "audio" or i["has_audio"]]
        pending = understand.pending_transcriptions(conn, sources, version)
    started = time.perf_counter()
    audio_s, failed = 0.0, 0
    if pending:
        eta = Eta("transcribing, file", len(pending), log)
        whisper = speech.load_model(model, device=svc.compute.torch_device())
        paths = [store.local_path(h) for h in pending]
        results = speech.iter_transcripts(
            paths, model=whisper, batch_size=batch_size, language=language
        )
        for done, (index, result) in enumerate(results, start=1):
            content_hash = pending[index]
            with connect(dsn) as conn:
                if isinstance(result, speech.AudioDecodeError):
                    failed += 1
                    outcome = Outcome("quarantined", "undecodable_audio", result.reason)
                    understand.save_transcription(conn, content_hash, version, outcome, [])
                    continue
                audio_s += result.duration_s
                understand.save_transcription(
                    conn,
                    content_hash,
                    version,
                    Outcome(),
                    segment_rows(content_hash, result),
                    result.language,
                    result.language_probability,
                    result.duration_s,
                )
            eta(done)
    elapsed = time.perf_counter() - started
    with connect(dsn) as conn:
        rows = understand.batch_transcripts(conn, batch, version)
    return TranscriptsResult(
        model_version=version,
        sources=len(sources),
        transcribed_now=len(pending) - failed,
        skipped_already_done=len(sources) - len(pending),
        undecodable=failed,
        segments=sum(len(r["segments"]) for r in rows),
        audio_seconds_now=round(audio_s, 1),
        real_time_factor_now=round(elapsed / audio_s, 4) if audio_s else 0.0,
        sample=next((r for r in rows if r["segments"]), None),
    )


def segment_rows(content_hash: str, result: speech.Transcript) -> list[SegmentRow]:
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
