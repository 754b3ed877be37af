"""Catalogue semantics: dedup, idempotent re-runs, concurrent batches, migrations."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from mm_pipelines.pipeline.ingest import ingest_batch
from mm_pipelines.storage import postgres
from mm_pipelines.storage.landing import LocalLanding
from mm_pipelines.storage.media_store import LocalMediaStore
from mm_pipelines.storage.migrations import apply_migrations, migration_files
from mm_pipelines_tests import bad_media


def make_batch(landing: Path, name: str, files: dict[str, bytes]) -> None:
    root = landing / name
    root.mkdir(parents=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "_READY").touch()


def stored_objects(store_dir: Path) -> list[Path]:
    return [p for p in store_dir.rglob("*") if p.is_file() and ".incoming" not in p.parts]


def catalog_rows(dsn: str, batch: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT source_uri, content_hash, status, error_category, modality FROM media_sources "
            "WHERE batch = %s ORDER BY source_uri",
            (batch,),
        ).fetchall()


def test_identical_content_is_stored_once_and_every_source_recorded(tmp_path, pg_dsn):
    png = bad_media.png_bytes()
    make_batch(
        tmp_path / "in", "b1", {"a.png": png, "sub/b.png": png, "c.jpg": bad_media.jpeg_bytes()}
    )
    store = LocalMediaStore(tmp_path / "store")
    report = ingest_batch(LocalLanding(tmp_path / "in"), "b1", store, pg_dsn)
    assert (report.ok, report.duplicates, report.unique_objects) == (3, 1, 2)
    assert len(stored_objects(tmp_path / "store")) == 2
    hashes = [r[1] for r in catalog_rows(pg_dsn, "b1")]
    assert len(hashes) == 3 and len(set(hashes)) == 2


def test_rematerializing_a_batch_gives_the_same_rows_and_copies_nothing(tmp_path, pg_dsn):
    make_batch(tmp_path / "in", "b1", {"a.png": bad_media.png_bytes(), "bad.jpg": b""})
    store = LocalMediaStore(tmp_path / "store")
    first = ingest_batch(LocalLanding(tmp_path / "in"), "b1", store, pg_dsn)
    rows_before = catalog_rows(pg_dsn, "b1")
    mtimes = {p: p.stat().st_mtime_ns for p in stored_objects(tmp_path / "store")}
    second = ingest_batch(LocalLanding(tmp_path / "in"), "b1", store, pg_dsn)
    assert catalog_rows(pg_dsn, "b1") == rows_before
    assert (first.new_objects, second.new_objects, second.reused_rows) == (1, 0, 2)
    assert {p: p.stat().st_mtime_ns for p in stored_objects(tmp_path / "store")} == mtimes


def test_a_changed_file_is_ingested_again(tmp_path, pg_dsn):
    make_batch(tmp_path / "in", "b1", {"a.png": bad_media.png_bytes()})
    store = LocalMediaStore(tmp_path / "store")
    ingest_batch(LocalLanding(tmp_path / "in"), "b1", store, pg_dsn)
    (tmp_path / "in/b1/a.png").write_bytes(bad_media.png_bytes((0, 0, 255)))
    again = ingest_batch(LocalLanding(tmp_path / "in"), "b1", store, pg_dsn)
    assert (again.reused_rows, again.new_objects) == (0, 1)
    assert len(catalog_rows(pg_dsn, "b1")) == 1


def test_a_file_removed_from_the_batch_loses_its_row(tmp_path, pg_dsn):
    make_batch(
        tmp_path / "in", "b1", {"a.png": bad_media.png_bytes(), "b.jpg": bad_media.jpeg_bytes()}
    )
    store = LocalMediaStore(tmp_path / "store")
    ingest_batch(LocalLanding(tmp_path / "in"), "b1", store, pg_dsn)
    (tmp_path / "in/b1/b.jpg").unlink()
    ingest_batch(LocalLanding(tmp_path / "in"), "b1", store, pg_dsn)
    assert [r[0].rsplit("/", 1)[-1] for r in catalog_rows(pg_dsn, "b1")] == ["a.png"]


def test_two_batches_sharing_content_ingest_at_the_same_time(tmp_path, pg_dsn):
    shared = {f"img{i}.jpg": bad_media.jpeg_bytes(seed=i) for i in range(6)}
    make_batch(tmp_path / "in", "left", shared)
    make_batch(tmp_path / "in", "right", {**shared, "own.png": bad_media.png_bytes()})
    store = LocalMediaStore(tmp_path / "store")
    landing = LocalLanding(tmp_path / "in")
    with ThreadPoolExecutor(2) as pool:
        reports = list(
            pool.map(lambda b: ingest_batch(landing, b, store, pg_dsn), ["left", "right"])
        )
    assert [r.ok for r in reports] == [6, 7]
    assert len(stored_objects(tmp_path / "store")) == 7
    assert sum(r.new_objects for r in reports) == 7  # each stored object counted once
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM media_objects").fetchone()[0] == 7


def test_migrations_apply_once(pg_dsn):
    postgres.ensure_schema(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert apply_migrations(conn) == []
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    assert versions == [v for v, _ in migration_files()]


def test_embedded_pgvector_is_new_enough(pg_dsn):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        assert postgres.pgvector_version(conn) >= postgres.MIN_PGVECTOR


def test_too_old_pgvector_fails_clearly(pg_dsn, monkeypatch):
    monkeypatch.setattr(postgres, "pgvector_version", lambda conn: (0, 6, 2))
    with pytest.raises(postgres.PgvectorVersionError, match="0.6.2 is too old"):
        postgres.ensure_schema(pg_dsn)


def test_a_deleted_store_object_is_ingested_again(tmp_path, pg_dsn):
    make_batch(tmp_path / "in", "b1", {"a.png": bad_media.png_bytes()})
    store = LocalMediaStore(tmp_path / "store")
    ingest_batch(LocalLanding(tmp_path / "in"), "b1", store, pg_dsn)
    shutil.rmtree(tmp_path / "store")
    store = LocalMediaStore(tmp_path / "store")
    again = ingest_batch(LocalLanding(tmp_path / "in"), "b1", store, pg_dsn)
    assert again.new_objects == 1 and len(stored_objects(tmp_path / "store")) == 1
