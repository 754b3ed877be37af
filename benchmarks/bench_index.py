"""pgvector load and query: binary COPY vs row-by-row executemany, HNSW vs exact scan,
and a 10% tenant filter with and without iterative index scans.

Run: .venv/bin/python benchmarks/bench_index.py [--n 100000 --dim 512 --queries 50]
Prints one JSON object. Everything runs in one process against one embedded Postgres.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from mm_pipelines.storage import vectors
from mm_pipelines.storage.postgres import embedded_server, ensure_schema
from mm_pipelines.storage.vectors import Filters, VectorRow


def clustered_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Unit vectors around 200 centres, like real embeddings, so that nearest neighbours
    are meaningful (also used by bench_curation.py)."""
    centers = rng.normal(size=(200, dim)).astype(np.float32)
    x = centers[rng.integers(0, 200, n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_rows(x: np.ndarray, batch: str) -> list[VectorRow]:
    return [
        VectorRow(
            batch,
            f"tenant{i % 10}",
            "image",
            "image",
            f"h{i}",
            None,
            None,
            None,
            None,
            None,
            None,
            "bench-encoder",
            "bench-projector",
            x[i],
        )
        for i in range(len(x))
    ]


INSERT = (
    f"INSERT INTO unified_vectors ({', '.join(vectors.COLUMNS)}) "
    f"VALUES ({', '.join(['%s'] * len(vectors.COLUMNS))})"
)


def executemany_load(conn: psycopg.Connection, rows: list[VectorRow]) -> None:
    """One INSERT per row through psycopg's executemany (pipelined round trips)."""
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(INSERT, [r.values() for r in rows])


def execute_loop_load(conn: psycopg.Connection, rows: list[VectorRow]) -> None:
    """Row by row with a round trip each: what a naive loader does."""
    with conn.transaction(), conn.cursor() as cur:
        for r in rows:
            cur.execute(INSERT, r.values())


def ids(conn, queries, filters, **kwargs) -> list[set[int]]:
    return [{r["id"] for r in vectors.search(conn, q, 10, filters, **kwargs)} for q in queries]


def overlap(truth: list[set[int]], got: list[set[int]]) -> float:
    return round(
        sum(len(t & g) for t, g in zip(truth, got, strict=True))
        / max(1, sum(len(t) for t in truth)),
        4,
    )


def latencies(conn, queries, filters, **kwargs) -> tuple[float, float]:
    times = []
    for q in queries:
        t = time.perf_counter()
        vectors.search(conn, q, 10, filters, **kwargs)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000, float(np.percentile(times, 99) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[40, 100, 200, 400])
    parser.add_argument(
        "--executemany-n",
        type=int,
        default=10_000,
        help="row-by-row is timed on this many rows and scaled per row",
    )
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = clustered_vectors(rng, args.n, args.dim)
    queries = x[rng.choice(args.n, args.queries, replace=False)] + 0.05 * rng.normal(
        size=(args.queries, args.dim)
    ).astype(np.float32)
    rows = make_rows(x, "bench")

    with tempfile.TemporaryDirectory(prefix="mm-bench-idx-") as tmp:
        server = embedded_server(f"{tmp}/pg", cleanup_mode="delete")
        dsn = server.get_uri()
        ensure_schema(dsn)
        with psycopg.connect(dsn) as conn:
            register_vector(conn)
            small = rows[: args.executemany_n]
            t = time.perf_counter()
            executemany_load(conn, small)
            executemany_s = (time.perf_counter() - t) * args.n / len(small)
            conn.execute("TRUNCATE unified_vectors")
            conn.commit()
            t = time.perf_counter()
            execute_loop_load(conn, small)
            loop_s = (time.perf_counter() - t) * args.n / len(small)
            conn.execute("TRUNCATE unified_vectors")
            conn.commit()
            t = time.perf_counter()
            with conn.transaction():
                vectors.copy_rows(conn, rows)
            copy_s = time.perf_counter() - t
            t = time.perf_counter()
            vectors.ensure_index(conn, args.dim)
            index_s = time.perf_counter() - t
            conn.execute("ANALYZE unified_vectors")
            conn.commit()

            exact_p50, exact_p99 = latencies(conn, queries, None, exact=True)
            tenant = Filters(tenant="tenant3")
            fe_p50, _ = latencies(conn, queries, tenant, exact=True)
            truth = ids(conn, queries, None, exact=True)
            truth_tenant = ids(conn, queries, tenant, exact=True)
            sweep, filtered = [], []
            for ef in args.ef_search:
                p50, p99 = latencies(conn, queries, None, ef_search=ef)
                sweep.append(
                    {
                        "ef_search": ef,
                        "p50_ms": round(p50, 2),
                        "p99_ms": round(p99, 2),
                        "ratio_vs_exact": round(p50 / exact_p50, 4),
                        "recall_at_10": overlap(truth, ids(conn, queries, None, ef_search=ef)),
                    }
                )
                fi_p50, _ = latencies(conn, queries, tenant, ef_search=ef)
                filtered.append(
                    {
                        "ef_search": ef,
                        "iterative_p50_ms": round(fi_p50, 2),
                        "recall_at_10_iterative": overlap(
                            truth_tenant, ids(conn, queries, tenant, ef_search=ef)
                        ),
                        "recall_at_10_without_iterative": overlap(
                            truth_tenant, ids(conn, queries, tenant, ef_search=ef, iterative=False)
                        ),
                    }
                )
        server.cleanup()

    print(
        json.dumps(
            {
                "benchmark": "vector_index",
                "n": args.n,
                "dim": args.dim,
                "queries": args.queries,
                "load": {
                    "binary_copy_s": round(copy_s, 2),
                    "executemany_s_scaled": round(executemany_s, 2),
                    "executemany_measured_rows": args.executemany_n,
                    "ratio_copy_speedup": round(executemany_s / copy_s, 1),
                    "execute_per_row_s_scaled": round(loop_s, 2),
                    "ratio_copy_vs_execute_per_row": round(loop_s / copy_s, 1),
                    "hnsw_build_s": round(index_s, 1),
                },
                "query": {
                    "exact_p50_ms": round(exact_p50, 2),
                    "exact_p99_ms": round(exact_p99, 2),
                    "hnsw_by_ef_search": sweep,
                },
                "tenant_filter_10pct": {"exact_p50_ms": round(fe_p50, 2), "by_ef_search": filtered},
                "targets": {
                    "ratio_copy_speedup": ">= 10",
                    "recall_at_10": ">= 0.95",
                    "ratio_hnsw_vs_exact_latency": "<= 0.1",
                    "recall_at_10_iterative": ">= 0.95",
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
