"""The media catalog in Postgres: source rows per batch, object rows per content hash."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, fields
from typing import Any

import psycopg
from psycopg.rows import dict_row


@dataclass(frozen=True)
class SourceRow:
    batch: str
    source_uri: str
    tenant: str
    content_hash: str | None
    status: str  # ok | quarantined
    error_category: str | None
    error_message: str | None
    note: str | None
    modality: str | None
    mime: str | None
    size_bytes: int | None
    caption: str | None
    fingerprint: str | None
    probe_version: str
    labels: tuple[str, ...] = ()  # from the manifest (curation examples)


@dataclass(frozen=True)
class ObjectRow:
    content_hash: str
    modality: str
    mime: str
    size_bytes: int
    width: int | None
    height: int | None
    duration_s: float | None
    fps: float | None
    has_audio: bool | None
    text_encoding: str | None
    storage_uri: str
    probe_version: str


def _columns(cls: type) -> str:
    return ", ".join(f.name for f in fields(cls))


def previous_sources(conn: psycopg.Connection, batch: str) -> dict[str, SourceRow]:
    sql = f"SELECT {_columns(SourceRow)} FROM media_sources WHERE batch = %s"
    return {row[1]: SourceRow(*row[:-1], tuple(row[-1])) for row in conn.execute(sql, (batch,))}


def replace_batch(
    conn: psycopg.Connection,
    batch: str,
    sources: Sequence[SourceRow],
    objects: Iterable[ObjectRow],
) -> None:
    """Atomically make `sources` the batch's rows; add objects not catalogued yet."""
    with conn.transaction():
        # sorted inserts: two batches sharing content take row locks in the same order
        for obj in sorted(objects, key=lambda o: o.content_hash):
            conn.execute(
                f"INSERT INTO media_objects ({_columns(ObjectRow)}) VALUES "
                f"({', '.join(['%s'] * len(fields(ObjectRow)))}) ON CONFLICT DO NOTHING",
                astuple(obj),
            )
        conn.execute("DELETE FROM media_sources WHERE batch = %s", (batch,))
        with conn.cursor().copy(f"COPY media_sources ({_columns(SourceRow)}) FROM STDIN") as copy:
            for row in sources:
                copy.write_row((*astuple(row)[:-1], list(row.labels)))


def batch_catalog(conn: psycopg.Connection, batch: str) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT * FROM media_catalog WHERE batch = %s ORDER BY source_uri", (batch,))
        return cur.fetchall()


def ok_objects(conn: psycopg.Connection, batch: str) -> list[tuple[str, str, int]]:
    """(content_hash, storage_uri, size_bytes) of every distinct ok object of the batch."""
    return conn.execute(
        "SELECT DISTINCT o.content_hash, o.storage_uri, o.size_bytes FROM media_sources s "
        "JOIN media_objects o USING (content_hash) WHERE s.batch = %s AND s.status = 'ok' "
        "ORDER BY 1",
        (batch,),
    ).fetchall()


def batch_media(
    conn: psycopg.Connection, batch: str, modalities: Sequence[str]
) -> list[dict[str, Any]]:
    """Distinct ok objects of the batch with the given modalities, with their probe facts."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT DISTINCT ON (o.content_hash) o.*, s.caption, s.tenant FROM media_sources s "
            "JOIN media_objects o USING (content_hash) WHERE s.batch = %s AND s.status = 'ok' "
            "AND o.modality = ANY(%s) ORDER BY o.content_hash, s.source_uri",
            (batch, list(modalities)),
        )
        return cur.fetchall()


# --------------------------------------------------------------------------- reading back


def batch_summaries(conn: psycopg.Connection, batch: str | None = None) -> list[dict[str, Any]]:
    """Per batch: files, ok, quarantined (by reason), ok files by modality, duplicates
    (ok files whose content another ok file of the batch has), bytes, tenants, when."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT batch, count(*) AS files, count(*) FILTER (WHERE status = 'ok') AS ok, "
            "count(*) FILTER (WHERE status <> 'ok') AS quarantined, "
            "count(*) FILTER (WHERE status = 'ok') "
            "  - count(DISTINCT content_hash) FILTER (WHERE status = 'ok') AS duplicates, "
            "coalesce(sum(size_bytes), 0)::bigint AS bytes, array_agg(DISTINCT tenant) AS tenants, "
            "max(ingested_at) AS ingested_at FROM media_sources "
            "WHERE %(batch)s::text IS NULL OR batch = %(batch)s GROUP BY batch ORDER BY batch",
            {"batch": batch},
        )
        rows = cur.fetchall()
        cur.execute(
            "SELECT batch, coalesce(modality, error_category) AS what, status, count(*) AS n "
            "FROM media_sources WHERE %(batch)s::text IS NULL OR batch = %(batch)s "
            "GROUP BY 1, 2, 3 ORDER BY 1, 2",
            {"batch": batch},
        )
        counts = cur.fetchall()
    for row in rows:
        mine = [c for c in counts if c["batch"] == row["batch"]]
        row["by_modality"] = {c["what"]: c["n"] for c in mine if c["status"] == "ok"}
        row["quarantined_by_reason"] = {c["what"]: c["n"] for c in mine if c["status"] != "ok"}
        row["tenants"] = sorted(row["tenants"])
    return rows


def quarantined_sources(conn: psycopg.Connection, batch: str | None = None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT batch, source_uri, error_category, error_message FROM media_sources "
            "WHERE status <> 'ok' AND (%(batch)s::text IS NULL OR batch = %(batch)s) "
            "ORDER BY batch, source_uri",
            {"batch": batch},
        )
        return cur.fetchall()


def first_sources(
    conn: psycopg.Connection, content_hashes: Sequence[str], tenant: str | None = None
) -> dict[str, dict[str, Any]]:
    """For each content hash, the source it was first seen as (within `tenant`): earliest
    ingest, then the file's own modification time (a copy is newer than its original),
    then the name. {hash: {"source_uri", "batch"}}."""
    if not content_hashes:
        return {}
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT DISTINCT ON (content_hash) content_hash, source_uri, batch "
            "FROM media_sources WHERE content_hash = ANY(%s) AND status = 'ok' "
            "AND (%s::text IS NULL OR tenant = %s) ORDER BY content_hash, ingested_at, "
            # local fingerprints are "size:mtime_ns"; S3 ones "size:etag" sort as 0
            "CASE WHEN split_part(fingerprint, ':', 2) ~ '^[0-9]+$' "
            "THEN split_part(fingerprint, ':', 2)::numeric ELSE 0 END, source_uri",
            (list(content_hashes), tenant, tenant),
        )
        return {r.pop("content_hash"): r for r in cur.fetchall()}


FRAME = "frame"  # visible_to: a sampled video frame (JPEG, PNG or WebP: see its bytes)


def visible_to(conn: psycopg.Connection, content_hash: str, tenant: str) -> str | None:
    """The MIME type of `content_hash` when `tenant` may see it (one of its ok sources), or
    FRAME for a frame sampled from one of its videos; None otherwise."""
    row = conn.execute(
        "SELECT o.mime FROM media_sources s JOIN media_objects o USING (content_hash) "
        "WHERE s.content_hash = %s AND s.tenant = %s AND s.status = 'ok' LIMIT 1",
        (content_hash, tenant),
    ).fetchone()
    if row:
        return row[0]
    row = conn.execute(
        "SELECT 1 FROM video_frames f JOIN media_sources s ON s.content_hash = f.video_hash "
        "WHERE f.frame_hash = %s AND s.tenant = %s AND s.status = 'ok' LIMIT 1",
        (content_hash, tenant),
    ).fetchone()
    return FRAME if row else None
