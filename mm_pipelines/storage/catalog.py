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
