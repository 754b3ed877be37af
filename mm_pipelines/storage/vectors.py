"""pgvector storage and search for the unified space.

- Bulk load with binary COPY (numpy arrays go over the wire as pgvector's binary format).
- A batch is replaced in one transaction: a re-run or a crash never leaves half a batch.
- HNSW with cosine distance, one partial expression index per dimension.
- Filtered queries turn on `hnsw.iterative_scan` (pgvector >= 0.8): without it the index
  returns `ef_search` candidates and the filter runs afterwards, silently dropping results.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.rows import dict_row

COLUMNS = (
    "batch",
    "tenant",
    "item_kind",
    "modality",
    "content_hash",
    "parent_hash",
    "source_uri",
    "start_s",
    "end_s",
    "chunk_index",
    "text",
    "encoder_version",
    "projector_version",
    "embedding",
)
_TYPES = ["text"] * 7 + ["float8", "float8", "int4", "text", "text", "text", "vector"]


def to_array(value: Any) -> np.ndarray:
    """A pgvector value as read back (a `Vector`, or text) as float32 numpy."""
    if hasattr(value, "to_numpy"):
        return value.to_numpy().astype(np.float32)
    return np.asarray(value, dtype=np.float32)


@dataclass(frozen=True)
class VectorRow:
    batch: str
    tenant: str
    item_kind: str
    modality: str
    content_hash: str
    parent_hash: str | None
    source_uri: str | None
    start_s: float | None
    end_s: float | None
    chunk_index: int | None
    text: str | None
    encoder_version: str
    projector_version: str
    embedding: np.ndarray

    def values(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))


def _index_name(dim: int) -> str:
    return f"unified_vectors_hnsw_d{int(dim)}"


def _vec(dim: int) -> sql.Composable:
    return sql.SQL("embedding::vector({})").format(sql.Literal(int(dim)))


def ensure_index(
    conn: psycopg.Connection, dim: int, m: int = 16, ef_construction: int = 64
) -> None:
    with conn.transaction():
        conn.execute("SET LOCAL maintenance_work_mem = '512MB'")  # index builds need room
        conn.execute(
            sql.SQL(
                "CREATE INDEX IF NOT EXISTS {} ON unified_vectors "
                "USING hnsw (({}) vector_cosine_ops) WITH (m = {}, ef_construction = {}) "
                "WHERE vector_dims(embedding) = {}"
            ).format(
                sql.Identifier(_index_name(dim)),
                _vec(dim),
                sql.Literal(m),
                sql.Literal(ef_construction),
                sql.Literal(int(dim)),
            )
        )


def copy_rows(conn: psycopg.Connection, rows: Iterable[VectorRow]) -> int:
    """Binary COPY of rows into unified_vectors (inside the caller's transaction)."""
    n = 0
    cols = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
    with (
        conn.cursor() as cur,
        cur.copy(
            sql.SQL("COPY unified_vectors ({}) FROM STDIN WITH (FORMAT BINARY)").format(cols)
        ) as copy,
    ):
        copy.set_types(_TYPES)
        for row in rows:
            values = row.values()
            copy.write_row((*values[:-1], np.asarray(values[-1], dtype=np.float32)))
            n += 1
    return n


def replace_batch(conn: psycopg.Connection, batch: str, rows: Sequence[VectorRow]) -> int:
    """Make `rows` the batch's vectors in one transaction; return how many were written."""
    for dim in {len(r.embedding) for r in rows}:
        ensure_index(conn, dim)
    with conn.transaction():
        conn.execute("DELETE FROM unified_vectors WHERE batch = %s", (batch,))
        return copy_rows(conn, rows)


@dataclass(frozen=True)
class Filters:
    tenant: str | None = None
    batches: Sequence[str] | None = None
    modalities: Sequence[str] | None = None
    item_kinds: Sequence[str] | None = None
    projector_version: str | None = None
    encoder_version: str | None = None
    # leave out what curation hides (flagged items, near-duplicates that are not their
    # group's keeper): inside the scan, so k results still come back
    hide_curated: bool = True
    parent_hashes: Sequence[str] | None = None


# a row is hidden when its own content or its parent (the image of a caption, the video of a
# frame, the document of a chunk) is in the tenant's curation_hidden view
_NOT_HIDDEN = sql.SQL(
    "NOT EXISTS (SELECT 1 FROM curation_hidden h WHERE h.tenant = unified_vectors.tenant "
    "AND (h.content_hash = unified_vectors.content_hash "
    "OR h.content_hash = unified_vectors.parent_hash))"
)


def _where(dim: int, filters: Filters) -> tuple[sql.Composable, list[Any]]:
    clauses = [sql.SQL("vector_dims(embedding) = {}").format(sql.Literal(int(dim)))]
    if filters.hide_curated:
        clauses.append(_NOT_HIDDEN)
    params: list[Any] = []
    for column, value, many in (
        ("tenant", filters.tenant, False),
        ("projector_version", filters.projector_version, False),
        ("encoder_version", filters.encoder_version, False),
        ("batch", filters.batches, True),
        ("modality", filters.modalities, True),
        ("item_kind", filters.item_kinds, True),
        ("parent_hash", filters.parent_hashes, True),
    ):
        if value is None:
            continue
        op = "= ANY(%s)" if many else "= %s"
        clauses.append(sql.SQL("{} " + op).format(sql.Identifier(column)))
        params.append(list(value) if many else value)
    return sql.SQL(" AND ").join(clauses), params


def search(
    conn: psycopg.Connection,
    query: np.ndarray,
    k: int = 10,
    filters: Filters | None = None,
    *,
    exact: bool = False,
    iterative: bool = True,
    ef_search: int = 400,  # recall@10 0.976 at 100k x 512 (benchmarks/bench_index.py); 100: 0.87
) -> list[dict[str, Any]]:
    """Nearest rows by cosine distance, best first, with `score` = cosine similarity."""
    filters = filters or Filters()
    q = np.asarray(query, dtype=np.float32)
    dim = len(q)
    where, params = _where(dim, filters)
    names = sql.SQL(", ").join(sql.Identifier(c) for c in COLUMNS if c != "embedding")
    inner = sql.SQL(
        "SELECT id, {names}, {vec} <=> %s::vector({dim}) AS distance FROM unified_vectors "
        "WHERE {where} ORDER BY {vec} <=> %s::vector({dim}) LIMIT {k}"
    ).format(names=names, vec=_vec(dim), dim=sql.Literal(dim), where=where, k=sql.Literal(int(k)))
    # relaxed iterative scans may return rows slightly out of order: sort the final k
    stmt = sql.SQL("SELECT *, 1 - distance AS score FROM ({}) AS hits ORDER BY distance").format(
        inner
    )
    if exact:
        mode = {"enable_indexscan": "off", "enable_bitmapscan": "off"}
    else:
        mode = {
            "hnsw.ef_search": str(int(ef_search)),
            "hnsw.iterative_scan": "relaxed_order" if iterative else "off",
        }
    # SET LOCAL lasts to the end of the caller's transaction, not of our savepoint:
    # restore the defaults afterwards so that one query's mode never leaks into the next
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        _set_local(cur, mode)
        # never a cached plan: one planned under the other mode would ignore these settings
        cur.execute(stmt, [q, *params, q], prepare=False)
        rows = cur.fetchall()
        _set_local(cur, _SEARCH_DEFAULTS)
    return rows


def search_many(
    conn: psycopg.Connection,
    queries: np.ndarray,
    k: int = 10,
    filters: Filters | None = None,
    *,
    ef_search: int = 400,
) -> list[list[dict[str, Any]]]:
    """`search` for many queries in one statement (a LATERAL index scan per query): one
    round trip and one settings change instead of a dozen per query. Best first per query."""
    filters = filters or Filters()
    q = np.asarray(queries, dtype=np.float32)
    if len(q) == 0:
        return []
    dim = q.shape[1]
    where, params = _where(dim, filters)
    names = sql.SQL(", ").join(sql.Identifier(c) for c in COLUMNS if c != "embedding")
    stmt = sql.SQL(
        "SELECT q.i AS query_index, hits.*, 1 - hits.distance AS score "
        "FROM unnest(%s::int[], %s::text[]) AS q(i, v) CROSS JOIN LATERAL ("
        "SELECT id, {names}, {vec} <=> q.v::vector({dim}) AS distance FROM unified_vectors "
        "WHERE {where} ORDER BY {vec} <=> q.v::vector({dim}) LIMIT {k}) AS hits "
        "ORDER BY q.i, hits.distance"
    ).format(names=names, vec=_vec(dim), dim=sql.Literal(dim), where=where, k=sql.Literal(int(k)))
    texts = ["[" + ",".join(f"{x:.8g}" for x in row) + "]" for row in q]
    mode = {"hnsw.ef_search": str(int(ef_search)), "hnsw.iterative_scan": "relaxed_order"}
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        _set_local(cur, mode)
        cur.execute(stmt, [list(range(len(q))), texts, *params], prepare=False)
        rows = cur.fetchall()
        _set_local(cur, _SEARCH_DEFAULTS)
    out: list[list[dict[str, Any]]] = [[] for _ in range(len(q))]
    for r in rows:
        out[r.pop("query_index")].append(r)
    return out


_SEARCH_DEFAULTS = {
    "enable_indexscan": "on",
    "enable_bitmapscan": "on",
    "hnsw.ef_search": "40",
    "hnsw.iterative_scan": "off",
}


def _set_local(cur: psycopg.Cursor, settings: dict[str, str]) -> None:
    for name, value in settings.items():
        cur.execute("SELECT set_config(%s, %s, true)", (name, value))


def recall_at_k(
    conn: psycopg.Connection,
    queries: np.ndarray,
    k: int = 10,
    filters: Filters | None = None,
    **kwargs: Any,
) -> float:
    """Mean share of the exact top-k that ANN top-k finds over the queries. Ties count: a
    row as close as the exact k-th is as good as it (identical vectors, e.g. the same frame
    sampled twice, would otherwise make an exact answer look like a miss)."""
    hits = total = 0
    for q in queries:
        truth = search(conn, q, k, filters, exact=True)
        if not truth:
            continue
        kth = float(truth[-1]["score"]) - 1e-6
        got = search(conn, q, k, filters, **kwargs)
        hits += min(len(truth), sum(float(r["score"]) >= kth for r in got))
        total += len(truth)
    return hits / total if total else 1.0


def batch_dims(conn: psycopg.Connection, batch: str) -> list[int]:
    """The vector dimensions present in a batch (one HNSW index per dimension)."""
    rows = conn.execute(
        "SELECT DISTINCT vector_dims(embedding) FROM unified_vectors WHERE batch = %s", (batch,)
    )
    return [r[0] for r in rows]


def count(conn: psycopg.Connection, batch: str | None = None) -> int:
    if batch is None:
        return conn.execute("SELECT count(*) FROM unified_vectors").fetchone()[0]
    return conn.execute(
        "SELECT count(*) FROM unified_vectors WHERE batch = %s", (batch,)
    ).fetchone()[0]


def sample_embeddings(
    conn: psycopg.Connection, n: int, dim: int, batch: str | None = None
) -> np.ndarray:
    rows = conn.execute(
        sql.SQL(
            "SELECT {} FROM unified_vectors WHERE vector_dims(embedding) = {} "
            "AND (%s::text IS NULL OR batch = %s) ORDER BY random() LIMIT {}"
        ).format(_vec(dim), sql.Literal(dim), sql.Literal(int(n))),
        (batch, batch),
    ).fetchall()
    return np.stack([to_array(r[0]) for r in rows]) if rows else np.zeros((0, dim))


def sample_by_kind(
    conn: psycopg.Connection, projector_version: str, per_kind: int = 256
) -> dict[str, np.ndarray]:
    """Up to `per_kind` vectors of each item kind of one projector version, the same ones on
    every call (ordered by a hash of the row id, not at random): what score calibration is
    fitted on."""
    kinds = [
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT item_kind FROM unified_vectors WHERE projector_version = %s",
            (projector_version,),
        )
    ]
    out: dict[str, np.ndarray] = {}
    for kind in sorted(kinds):
        rows = conn.execute(
            sql.SQL(
                "SELECT embedding FROM unified_vectors WHERE projector_version = %s "
                "AND item_kind = %s ORDER BY md5(id::text) LIMIT {}"
            ).format(sql.Literal(int(per_kind))),
            (projector_version, kind),
        ).fetchall()
        out[kind] = np.stack([to_array(r[0]) for r in rows])
    return out


def index_signature(conn: psycopg.Connection, projector_version: str) -> tuple[int, int]:
    """(rows, largest id) of a projector version: changes whenever a batch is (re)indexed."""
    row = conn.execute(
        "SELECT count(*), coalesce(max(id), 0) FROM unified_vectors WHERE projector_version = %s",
        (projector_version,),
    ).fetchone()
    return int(row[0]), int(row[1])


def kind_counts(conn: psycopg.Connection, projector_version: str) -> dict[str, int]:
    rows = conn.execute(
        "SELECT item_kind, count(*) FROM unified_vectors WHERE projector_version = %s "
        "GROUP BY item_kind",
        (projector_version,),
    )
    return {kind: int(n) for kind, n in rows}
