"""Catalog rows of the `understand` group: sampled video frames and transcripts.

Rows are keyed by the source content hash and the version that derived them; a
`(hash, version)` pair present in `frame_samplings` / `transcriptions` is done, which is
how a re-run skips work (including sources that failed: they are not retried until the
version changes).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields
from typing import Any

import psycopg
from psycopg.rows import dict_row


@dataclass(frozen=True)
class FrameRow:
    video_hash: str
    strategy_version: str
    strategy: str
    frame_index: int
    timestamp_s: float
    frame_hash: str
    storage_uri: str
    width: int
    height: int


@dataclass(frozen=True)
class SegmentRow:
    content_hash: str
    model_version: str
    segment_index: int
    start_s: float
    end_s: float
    text: str
    avg_logprob: float | None
    words: list[dict[str, Any]]


@dataclass(frozen=True)
class Outcome:
    status: str = "ok"  # ok | quarantined
    error_category: str | None = None
    error_message: str | None = None


def _missing(
    conn: psycopg.Connection,
    table: str,
    key: str,
    hashes: Sequence[str],
    version_col: str,
    version: str,
) -> list[str]:
    done = {
        r[0]
        for r in conn.execute(
            f"SELECT {key} FROM {table} WHERE {key} = ANY(%s) AND {version_col} = %s",
            (list(hashes), version),
        )
    }
    return [h for h in hashes if h not in done]


def pending_samplings(
    conn: psycopg.Connection, video_hashes: Sequence[str], version: str
) -> list[str]:
    return _missing(
        conn, "frame_samplings", "video_hash", video_hashes, "strategy_version", version
    )


def save_sampling(
    conn: psycopg.Connection,
    video_hash: str,
    version: str,
    outcome: Outcome,
    frames: Sequence[FrameRow],
    decoder: str | None = None,
) -> None:
    """Replace the frames of one (video, strategy version) atomically."""
    with conn.transaction():
        conn.execute(
            "DELETE FROM frame_samplings WHERE video_hash = %s AND strategy_version = %s",
            (video_hash, version),
        )
        conn.execute(
            "INSERT INTO frame_samplings (video_hash, strategy_version, status, error_category, "
            "error_message, frame_count, decoder) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (
                video_hash,
                version,
                outcome.status,
                outcome.error_category,
                outcome.error_message,
                len(frames),
                decoder,
            ),
        )
        cols = ", ".join(f.name for f in fields(FrameRow))
        with conn.cursor().copy(f"COPY video_frames ({cols}) FROM STDIN") as copy:
            for frame in frames:
                copy.write_row(astuple(frame))


def batch_frames(conn: psycopg.Connection, batch: str) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT f.* FROM video_frames f WHERE f.video_hash IN (SELECT content_hash FROM "
            "media_sources WHERE batch = %s AND status = 'ok') "
            "ORDER BY f.video_hash, f.strategy_version, f.frame_index",
            (batch,),
        )
        return cur.fetchall()


def batch_samplings(conn: psycopg.Connection, batch: str) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT * FROM frame_samplings WHERE video_hash IN (SELECT content_hash FROM "
            "media_sources WHERE batch = %s AND status = 'ok') ORDER BY 1, 2",
            (batch,),
        )
        return cur.fetchall()


def pending_transcriptions(
    conn: psycopg.Connection, hashes: Sequence[str], model_version: str
) -> list[str]:
    return _missing(conn, "transcriptions", "content_hash", hashes, "model_version", model_version)


def save_transcription(
    conn: psycopg.Connection,
    content_hash: str,
    model_version: str,
    outcome: Outcome,
    segments: Sequence[SegmentRow],
    language: str | None = None,
    language_probability: float | None = None,
    audio_duration_s: float | None = None,
) -> None:
    with conn.transaction():
        conn.execute(
            "DELETE FROM transcriptions WHERE content_hash = %s AND model_version = %s",
            (content_hash, model_version),
        )
        conn.execute(
            "INSERT INTO transcriptions (content_hash, model_version, status, error_category, "
            "error_message, language, language_probability, audio_duration_s) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (
                content_hash,
                model_version,
                outcome.status,
                outcome.error_category,
                outcome.error_message,
                language,
                language_probability,
                audio_duration_s,
            ),
        )
        cols = ", ".join(f.name for f in fields(SegmentRow))
        with conn.cursor().copy(f"COPY transcript_segments ({cols}) FROM STDIN") as copy:
            for seg in segments:
                row = astuple(seg)
                copy.write_row((*row[:-1], json.dumps(seg.words)))


def batch_transcripts(
    conn: psycopg.Connection, batch: str, model_version: str | None = None
) -> list[dict[str, Any]]:
    """Transcriptions of the batch's audio and video objects, each with its segments."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT t.*, coalesce(json_agg(s ORDER BY s.segment_index) "
            "FILTER (WHERE s.text IS NOT NULL), '[]') AS segments "
            "FROM transcriptions t LEFT JOIN transcript_segments s "
            "USING (content_hash, model_version) WHERE t.content_hash IN (SELECT content_hash FROM "
            "media_sources WHERE batch = %s AND status = 'ok') AND (%s::text IS NULL OR "
            "t.model_version = %s) GROUP BY t.content_hash, t.model_version ORDER BY 1, 2",
            (batch, model_version, model_version),
        )
        return cur.fetchall()
