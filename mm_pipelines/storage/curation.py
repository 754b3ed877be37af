"""Curation rows in Postgres: perceptual hashes, near-duplicate pairs and groups, content
scores and flags, captions, and what search and training sets leave out (the view
`curation_hidden`, see migrations/0006_curation.sql)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import psycopg
from psycopg.rows import dict_row

from mm_pipelines.storage.vectors import to_array

PICTURE_KINDS = ("image", "video_frame")


def _copy_upsert(
    conn: psycopg.Connection,
    table: str,
    columns: Sequence[str],
    rows: Sequence[tuple],
    key: Sequence[str],
    update: Sequence[str],
) -> int:
    """Many rows in one COPY into a temporary table, then one INSERT .. ON CONFLICT
    (an INSERT per row was a third of the scoring driver's time)."""
    if not rows:
        return 0
    cols = ", ".join(columns)
    sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in update)
    with conn.transaction(), conn.cursor() as cur:
        # dropped here, not on commit: callers may hold an outer transaction open
        cur.execute("DROP TABLE IF EXISTS _upsert")
        cur.execute(f"CREATE TEMP TABLE _upsert AS SELECT {cols} FROM {table} LIMIT 0")
        with cur.copy(f"COPY _upsert ({cols}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        cur.execute(
            f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _upsert "
            f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {sets}"
        )
        cur.execute("DROP TABLE _upsert")
    return len(rows)


def _values(row: Any) -> tuple:
    """A flat dataclass as a tuple, in field order (`dataclasses.astuple` deep-copies every
    value: 10x slower on the scoring driver's rows)."""
    return tuple(row.__dict__.values())


def _dicts(conn: psycopg.Connection, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql, args)
        return cur.fetchall()


# --------------------------------------------------------------------------- pictures


def batch_pictures(conn: psycopg.Connection, batch: str) -> list[dict[str, Any]]:
    """The batch's images and sampled video frames, per tenant, with their storage facts."""
    return _dicts(
        conn,
        "SELECT DISTINCT p.tenant, p.content_hash, p.item_kind, p.parent_hash, p.width, "
        "p.height, p.first_seen FROM tenant_pictures p JOIN media_sources s ON "
        "s.tenant = p.tenant AND s.status = 'ok' AND s.batch = %s "
        "AND s.content_hash = COALESCE(p.parent_hash, p.content_hash) "
        "ORDER BY p.tenant, p.content_hash",
        (batch,),
    )


def picture_facts(
    conn: psycopg.Connection, tenant: str, hashes: Sequence[str]
) -> list[dict[str, Any]]:
    return _dicts(
        conn,
        "SELECT content_hash, min(item_kind) AS item_kind, max(width) AS width, "
        "max(height) AS height, min(first_seen) AS first_seen FROM tenant_pictures "
        "WHERE tenant = %s AND content_hash = ANY(%s) GROUP BY content_hash",
        (tenant, list(hashes)),
    )


def batch_picture_vectors(
    conn: psycopg.Connection, batch: str, encoder_version: str
) -> list[dict[str, Any]]:
    """The batch's image and frame vectors from the index, one per (tenant, content)."""
    rows = _dicts(
        conn,
        "SELECT DISTINCT ON (tenant, content_hash) tenant, content_hash, parent_hash, "
        "item_kind, embedding FROM unified_vectors WHERE batch = %s AND encoder_version = %s "
        "AND item_kind = ANY(%s) ORDER BY tenant, content_hash, id",
        (batch, encoder_version, list(PICTURE_KINDS)),
    )
    for r in rows:
        r["embedding"] = to_array(r["embedding"])
    return rows


def batch_encoder_versions(conn: psycopg.Connection, batch: str) -> list[str]:
    rows = conn.execute(
        "SELECT DISTINCT encoder_version FROM unified_vectors WHERE batch = %s "
        "AND item_kind = ANY(%s) ORDER BY 1",
        (batch, list(PICTURE_KINDS)),
    )
    return [r[0] for r in rows]


# --------------------------------------------------------------------------- near-duplicates


def known_signatures(
    conn: psycopg.Connection, hashes: Sequence[str], signature_version: str
) -> set[str]:
    rows = conn.execute(
        "SELECT content_hash FROM perceptual_hashes "
        "WHERE content_hash = ANY(%s) AND signature_version = %s",
        (list(hashes), signature_version),
    )
    return {r[0] for r in rows}


def save_signatures(
    conn: psycopg.Connection,
    signatures: dict[str, tuple[str, np.ndarray]],
    signature_version: str,
) -> int:
    """content hash -> (64 pHash bits as '0'/'1', colour signature)."""
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO perceptual_hashes (content_hash, signature_version, hash, colour) "
            "VALUES (%s, %s, %s::bit(64), %s) ON CONFLICT DO NOTHING",
            [
                (h, signature_version, bits, np.asarray(colour, np.float32))
                for h, (bits, colour) in sorted(signatures.items())
            ],
        )
    return len(signatures)


def phash_matches(
    conn: psycopg.Connection,
    tenant: str,
    queries: Sequence[str],
    signature_version: str,
    max_distance: int,
    max_colour_distance: float,
) -> list[dict[str, Any]]:
    """For each query picture, the tenant's pictures within `max_distance` pHash bits
    (pgvector's Hamming distance `<~>`) whose colour signatures are within
    `max_colour_distance` (mean absolute difference: pgvector's L1 `<+>` / dimensions)."""
    if not queries:
        return []
    return _dicts(
        conn,
        "WITH q AS (SELECT content_hash AS h, hash AS b, colour AS c FROM perceptual_hashes "
        "WHERE content_hash = ANY(%s) AND signature_version = %s), "
        "pool AS (SELECT DISTINCT content_hash, item_kind, parent_hash FROM tenant_pictures "
        "WHERE tenant = %s) "
        "SELECT q.h AS query_hash, pool.content_hash, pool.item_kind, pool.parent_hash, "
        "(ph.hash <~> q.b)::int AS distance, (ph.colour <+> q.c) / vector_dims(q.c) AS colour "
        "FROM q JOIN perceptual_hashes ph ON ph.signature_version = %s "
        "AND ph.content_hash <> q.h AND (ph.hash <~> q.b) <= %s "
        "AND (ph.colour <+> q.c) / vector_dims(q.c) <= %s "
        "JOIN pool ON pool.content_hash = ph.content_hash",
        (
            list(queries),
            signature_version,
            tenant,
            signature_version,
            max_distance,
            max_colour_distance,
        ),
    )


def checked(
    conn: psycopg.Connection, tenant: str, hashes: Sequence[str], method_version: str
) -> set[str]:
    rows = conn.execute(
        "SELECT content_hash FROM near_duplicate_checks WHERE tenant = %s "
        "AND content_hash = ANY(%s) AND method_version = %s",
        (tenant, list(hashes), method_version),
    )
    return {r[0] for r in rows}


@dataclass(frozen=True)
class DuplicatePair:
    tenant: str
    item_hash: str
    duplicate_of: str
    item_kind: str
    duplicate_kind: str
    similarity: float
    method: str  # phash | clip
    method_version: str
    batch: str


def save_pairs(
    conn: psycopg.Connection,
    pairs: Iterable[DuplicatePair],
    tenant: str,
    checked_hashes: Sequence[str],
    method_version: str,
    batch: str,
) -> int:
    """Record pairs and mark the checked pictures, in one transaction (a crash leaves
    neither, so the next run checks them again)."""
    pairs = list(pairs)
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO near_duplicates (tenant, item_hash, duplicate_of, item_kind, "
            "duplicate_kind, similarity, method, method_version, batch) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            [_values(p) for p in pairs],
        )
        cur.executemany(
            "INSERT INTO near_duplicate_checks (tenant, content_hash, method_version, batch) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
            [(tenant, h, method_version, batch) for h in sorted(set(checked_hashes))],
        )
    return len(pairs)


def tenant_pairs(
    conn: psycopg.Connection, tenant: str, method_versions: Sequence[str]
) -> list[dict[str, Any]]:
    return _dicts(
        conn,
        "SELECT item_hash, duplicate_of, item_kind, duplicate_kind, similarity, method, "
        "method_version, batch FROM near_duplicates WHERE tenant = %s "
        "AND method_version = ANY(%s) ORDER BY item_hash, duplicate_of",
        (tenant, list(method_versions)),
    )


def replace_groups(
    conn: psycopg.Connection,
    tenant: str,
    members: dict[str, tuple[str, int]],
    policy_version: str,
) -> None:
    """Make `members` (content hash -> (keeper hash, group size)) the tenant's groups."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("DELETE FROM duplicate_groups WHERE tenant = %s", (tenant,))
        cur.executemany(
            "INSERT INTO duplicate_groups (tenant, content_hash, keeper_hash, group_size, "
            "policy_version) VALUES (%s, %s, %s, %s, %s)",
            [(tenant, h, k, n, policy_version) for h, (k, n) in sorted(members.items())],
        )


def groups_of(conn: psycopg.Connection, tenant: str, hashes: Sequence[str]) -> list[dict]:
    """Every member of the tenant's duplicate groups that include one of `hashes`."""
    return _dicts(
        conn,
        "SELECT g.content_hash, g.keeper_hash, g.group_size FROM duplicate_groups g "
        "WHERE g.tenant = %s AND g.keeper_hash IN (SELECT keeper_hash FROM duplicate_groups "
        "WHERE tenant = %s AND content_hash = ANY(%s)) ORDER BY g.keeper_hash, "
        "g.content_hash <> g.keeper_hash, g.content_hash",
        (tenant, tenant, list(hashes)),
    )


def pairs_among(conn: psycopg.Connection, hashes: Sequence[str]) -> list[tuple[str, str]]:
    """Near-duplicate pairs (any tenant, method and version) between members of `hashes`."""
    rows = conn.execute(
        "SELECT DISTINCT item_hash, duplicate_of FROM near_duplicates "
        "WHERE item_hash = ANY(%s) AND duplicate_of = ANY(%s)",
        (list(hashes), list(hashes)),
    )
    return [(a, b) for a, b in rows]


# --------------------------------------------------------------------------- labels


def labelled_vectors(
    conn: psycopg.Connection, encoder_version: str, item_kinds: Sequence[str]
) -> list[dict[str, Any]]:
    """Encoder vectors of labelled catalog items (`labels` from the manifest): an image's
    own vector, a caption's, a document's chunks, a transcript's segments."""
    rows = _dicts(
        conn,
        "SELECT DISTINCT ON (e.item_key) e.item_key, e.item_kind, e.content_hash, "
        "s.content_hash AS source_hash, s.labels, e.embedding FROM media_sources s "
        "JOIN item_embeddings e ON e.encoder_version = %s AND e.item_kind = ANY(%s) AND "
        "(e.content_hash = s.content_hash OR e.parent_hash = s.content_hash) "
        "WHERE s.status = 'ok' AND cardinality(s.labels) > 0 ORDER BY e.item_key, s.batch",
        (encoder_version, list(item_kinds)),
    )
    for r in rows:
        r["embedding"] = to_array(r["embedding"])
    return rows


# --------------------------------------------------------------------------- scores, flags


@dataclass(frozen=True)
class ScoreRow:
    item_key: str
    score_name: str
    head_version: str
    encoder_version: str
    item_kind: str
    content_hash: str
    source_hash: str
    score: float


def scored_keys(
    conn: psycopg.Connection, keys: Sequence[str], score_name: str, head_version: str
) -> set[str]:
    rows = conn.execute(
        "SELECT item_key FROM content_scores WHERE item_key = ANY(%s) AND score_name = %s "
        "AND head_version = %s",
        (list(keys), score_name, head_version),
    )
    return {r[0] for r in rows}


def save_scores(conn: psycopg.Connection, rows: Sequence[ScoreRow]) -> int:
    return _copy_upsert(
        conn,
        "content_scores",
        [f.name for f in fields(ScoreRow)],
        [_values(r) for r in rows],
        ("item_key", "score_name", "head_version"),
        ("score",),
    )


def source_scores(
    conn: psycopg.Connection, sources: Sequence[str], heads: dict[str, str]
) -> list[dict[str, Any]]:
    """Per catalog item and score: max and min over its scored parts, with the part that
    holds the max (what a flag's reason names)."""
    return _dicts(
        conn,
        "SELECT DISTINCT ON (source_hash, score_name) source_hash, score_name, head_version, "
        "item_key AS worst_key, item_kind AS worst_kind, score AS max_score, "
        "min(score) OVER w AS min_score, count(*) OVER w AS parts FROM content_scores "
        "WHERE source_hash = ANY(%s) AND (score_name, head_version) IN "
        "(SELECT * FROM unnest(%s::text[], %s::text[])) "
        "WINDOW w AS (PARTITION BY source_hash, score_name) "
        "ORDER BY source_hash, score_name, score DESC",
        (list(sources), list(heads), list(heads.values())),
    )


@dataclass(frozen=True)
class FlagRow:
    tenant: str
    content_hash: str
    score_name: str
    score: float
    threshold: float
    reason: str
    head_version: str
    policy: dict[str, Any]
    batch: str


def replace_flags(
    conn: psycopg.Connection,
    batch: str,
    items: Sequence[tuple[str, str]],
    flags: Sequence[FlagRow],
) -> None:
    """Make `flags` the flags of the (tenant, content hash) `items`, atomically."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            "DELETE FROM content_flags WHERE (tenant, content_hash) IN "
            "(SELECT * FROM unnest(%s::text[], %s::text[]))",
            ([t for t, _ in items], [h for _, h in items]),
        )
        names = [f.name for f in fields(FlagRow)]
        with cur.copy(f"COPY content_flags ({', '.join(names)}) FROM STDIN") as copy:
            for f in flags:
                copy.write_row((*_values(f)[:-2], json.dumps(f.policy, sort_keys=True), batch))


def batch_items(conn: psycopg.Connection, batch: str) -> list[tuple[str, str]]:
    """(tenant, content hash) of the batch's ok sources."""
    rows = conn.execute(
        "SELECT DISTINCT tenant, content_hash FROM media_sources WHERE batch = %s "
        "AND status = 'ok' ORDER BY 1, 2",
        (batch,),
    )
    return [(t, h) for t, h in rows]


def flags_of(conn: psycopg.Connection, items: Sequence[tuple[str, str]]) -> list[dict]:
    return _dicts(
        conn,
        "SELECT tenant, content_hash, score_name, score, threshold, reason, head_version "
        "FROM content_flags WHERE (tenant, content_hash) IN "
        "(SELECT * FROM unnest(%s::text[], %s::text[])) ORDER BY 1, 2, 3",
        ([t for t, _ in items], [h for _, h in items]),
    )


def safety_scored(conn: psycopg.Connection, sources: Sequence[str], names: Sequence[str]) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM content_scores WHERE source_hash = ANY(%s) "
        "AND score_name = ANY(%s))",
        (list(sources), list(names)),
    ).fetchone()
    return bool(row[0])


# --------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class CaptionRow:
    content_hash: str
    source: str  # manifest | model:<version>
    caption: str
    confidence: float | None
    item_kind: str


def captioned(conn: psycopg.Connection, hashes: Sequence[str], source: str) -> set[str]:
    rows = conn.execute(
        "SELECT content_hash FROM captions WHERE content_hash = ANY(%s) AND source = %s",
        (list(hashes), source),
    )
    return {r[0] for r in rows}


def save_captions(conn: psycopg.Connection, rows: Sequence[CaptionRow]) -> int:
    return _copy_upsert(
        conn,
        "captions",
        [f.name for f in fields(CaptionRow)],
        [_values(r) for r in rows],
        ("content_hash", "source"),
        ("caption", "confidence"),
    )


def manifest_captions(conn: psycopg.Connection, batch: str) -> dict[str, str]:
    rows = conn.execute(
        "SELECT DISTINCT ON (content_hash) content_hash, caption FROM media_sources "
        "WHERE batch = %s AND status = 'ok' AND modality = 'image' AND caption IS NOT NULL "
        "ORDER BY content_hash, source_uri",
        (batch,),
    )
    return {h: c for h, c in rows}


def effective_captions(conn: psycopg.Connection, hashes: Sequence[str]) -> dict[str, dict]:
    rows = _dicts(
        conn,
        "SELECT content_hash, caption, source, confidence FROM effective_captions "
        "WHERE content_hash = ANY(%s)",
        (list(hashes),),
    )
    return {r["content_hash"]: r for r in rows}


def caption_rows(conn: psycopg.Connection, hashes: Sequence[str]) -> list[dict[str, Any]]:
    return _dicts(
        conn,
        "SELECT content_hash, source, caption, confidence, item_kind FROM captions "
        "WHERE content_hash = ANY(%s) ORDER BY content_hash, source",
        (list(hashes),),
    )


# --------------------------------------------------------------------------- selection


def hidden_reasons(
    conn: psycopg.Connection, hashes: Sequence[str], tenant: str | None = None
) -> dict[str, list[str]]:
    """Why each of `hashes` is left out of search and training sets (nothing: not hidden)."""
    rows = conn.execute(
        "SELECT content_hash, cause || ': ' || reason FROM curation_hidden "
        "WHERE content_hash = ANY(%s) AND (%s::text IS NULL OR tenant = %s) ORDER BY 1, 2",
        (list(hashes), tenant, tenant),
    )
    out: dict[str, list[str]] = {}
    for h, reason in rows:
        out.setdefault(h, []).append(reason)
    return out


def latest_scores(
    conn: psycopg.Connection, hashes: Sequence[str], score_name: str
) -> dict[str, float]:
    """The newest score of each image's own vector (item kind image)."""
    rows = conn.execute(
        "SELECT DISTINCT ON (content_hash) content_hash, score FROM content_scores "
        "WHERE content_hash = ANY(%s) AND score_name = %s AND item_kind = 'image' "
        "ORDER BY content_hash, created_at DESC",
        (list(hashes), score_name),
    )
    return {h: float(s) for h, s in rows}


def as_matrix(rows: Sequence[dict[str, Any]], dim: int) -> np.ndarray:
    return np.stack([r["embedding"] for r in rows]) if rows else np.zeros((0, dim), np.float32)
