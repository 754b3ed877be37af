"""Where a batch's files are when they are not under the landing area, and its tenant."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg


@dataclass(frozen=True)
class BatchSource:
    batch: str
    source_uri: str | None  # None: `<landing>/<batch>`
    tenant: str | None


def register(conn: psycopg.Connection, source: BatchSource) -> None:
    conn.execute(
        "INSERT INTO landing_sources (batch, source_uri, tenant) VALUES (%s, %s, %s) "
        "ON CONFLICT (batch) DO UPDATE SET source_uri = EXCLUDED.source_uri, "
        "tenant = EXCLUDED.tenant, registered_at = now()",
        (source.batch, source.source_uri, source.tenant),
    )


def lookup(conn: psycopg.Connection, batch: str) -> BatchSource | None:
    row = conn.execute(
        "SELECT batch, source_uri, tenant FROM landing_sources WHERE batch = %s", (batch,)
    ).fetchone()
    return BatchSource(*row) if row else None
