"""Catalog side of the generative assets: selecting a subject's images, recording generations."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row

GENERATED_PROBE_VERSION = "generated"


@dataclass(frozen=True)
class CatalogImage:
    content_hash: str
    caption: str | None
    source_uri: str
    batch: str
    tenant: str


def select_images(
    conn: psycopg.Connection,
    *,
    batches: Sequence[str] = (),
    tenant: str | None = None,
    caption_contains: str | None = None,
    content_hashes: Sequence[str] = (),
    limit: int = 32,
) -> list[CatalogImage]:
    """Ingested (ok) images matching every given filter, one per content, oldest source first."""
    where, args = ["status = 'ok'", "modality = 'image'"], []
    if batches:
        where.append("batch = ANY(%s)")
        args.append(list(batches))
    if tenant:
        where.append("tenant = %s")
        args.append(tenant)
    if caption_contains:
        where.append("caption ILIKE %s")
        args.append(f"%{caption_contains}%")
    if content_hashes:
        where.append("content_hash = ANY(%s)")
        args.append(list(content_hashes))
    sql = (
        "SELECT DISTINCT ON (content_hash) content_hash, caption, source_uri, batch, tenant "
        f"FROM media_catalog WHERE {' AND '.join(where)} ORDER BY content_hash, batch, source_uri"
    )
    rows = conn.execute(sql, args).fetchall()
    images = sorted((CatalogImage(*r) for r in rows), key=lambda i: (i.batch, i.source_uri))
    return images[:limit]


@dataclass(frozen=True)
class GeneratedRow:
    content_hash: str
    prompt: str
    seed: int
    params: dict[str, Any]
    size_bytes: int
    width: int
    height: int
    storage_uri: str


def replace_generated(
    conn: psycopg.Connection,
    subject: str,
    adapter_version: str,
    base_model: str,
    registered_model: str | None,
    dagster_run_id: str | None,
    rows: Sequence[GeneratedRow],
) -> None:
    """Make `rows` the generations of (subject, adapter version), atomically."""
    with conn.transaction():
        for r in sorted(rows, key=lambda r: r.content_hash):
            conn.execute(
                "INSERT INTO media_objects (content_hash, modality, mime, size_bytes, width, "
                "height, storage_uri, probe_version) VALUES (%s, 'image', 'image/png', %s, %s, "
                "%s, %s, %s) ON CONFLICT DO NOTHING",
                (
                    r.content_hash,
                    r.size_bytes,
                    r.width,
                    r.height,
                    r.storage_uri,
                    GENERATED_PROBE_VERSION,
                ),
            )
        conn.execute(
            "DELETE FROM generated_media WHERE subject = %s AND adapter_version = %s",
            (subject, adapter_version),
        )
        for r in rows:
            conn.execute(
                "INSERT INTO generated_media (subject, adapter_version, content_hash, base_model, "
                "registered_model, prompt, seed, params, dagster_run_id) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    subject,
                    adapter_version,
                    r.content_hash,
                    base_model,
                    registered_model,
                    r.prompt,
                    r.seed,
                    json.dumps(r.params, sort_keys=True),
                    dagster_run_id,
                ),
            )


def generated_images(
    conn: psycopg.Connection, subject: str, adapter_version: str
) -> list[dict[str, Any]]:
    """The generations of one adapter version, in prompt then seed order."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT * FROM generated_media WHERE subject = %s AND adapter_version = %s "
            "ORDER BY prompt, seed",
            (subject, adapter_version),
        )
        return cur.fetchall()
