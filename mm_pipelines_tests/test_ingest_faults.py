"""Ingestion under faults and hostile input: our infrastructure failing is never blamed on a
file, and one odd file (a symlink loop, a manifest value Postgres cannot store, a
whitespace-only text, a `..` key) never takes its batch down."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import boto3
import psycopg
import pytest

from mm_pipelines.pipeline.faults import InfrastructureError
from mm_pipelines.pipeline.ingest import IngestReport, ingest_batch
from mm_pipelines.pipeline.probe import Limits
from mm_pipelines.storage.landing import LocalLanding, S3Landing
from mm_pipelines.storage.media_store import LocalMediaStore, sha256_bytes
from mm_pipelines_tests import bad_media
from mm_pipelines_tests.ports import free_port
from mm_pipelines_tests.small_disk import SmallDisk, small_disk_at


def make_batch(landing: Path, name: str, files: dict[str, bytes]) -> Path:
    root = landing / name
    root.mkdir(parents=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "_READY").touch()
    return root


def rows(dsn: str, batch: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT source_uri, tenant, content_hash, status, error_category, error_message, "
            "caption FROM media_sources WHERE batch = %s ORDER BY source_uri",
            (batch,),
        ).fetchall()


def by_name(report: IngestReport) -> dict[str, object]:
    return {unquote(r.source_uri).rsplit("/", 1)[-1]: r for r in report.rows}


def ten_images() -> dict[str, bytes]:
    """About 1.3 MB of distinct JPEGs: more than a 1 MB file system holds."""
    return {f"img{i}.jpg": bad_media.jpeg_bytes(size=384, seed=i) for i in range(10)}


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SmallDisk]:
    yield from small_disk_at(tmp_path / "disk", monkeypatch)


def test_a_full_store_fails_the_batch_and_records_nothing(tmp_path, pg_dsn, small_disk):
    make_batch(tmp_path / "in", "b1", ten_images())
    landing = LocalLanding(tmp_path / "in")
    store = LocalMediaStore(small_disk.root / "media")
    with pytest.raises(InfrastructureError) as failure:
        ingest_batch(landing, "b1", store, pg_dsn, workers=2)
    message = str(failure.value)
    assert "No space left on device" in message and str(small_disk.root) in message
    assert "b1" in message and not failure.value.retriable
    assert rows(pg_dsn, "b1") == []  # not one file blamed


def test_after_the_disk_is_fixed_a_rerun_ingests_every_file(tmp_path, pg_dsn, small_disk):
    make_batch(tmp_path / "in", "b1", ten_images())
    landing = LocalLanding(tmp_path / "in")
    store = LocalMediaStore(small_disk.root / "media")
    with pytest.raises(InfrastructureError):
        ingest_batch(landing, "b1", store, pg_dsn, workers=2)
    small_disk.grow()
    report = ingest_batch(landing, "b1", store, pg_dsn, workers=2)
    assert (report.ok, report.quarantined) == (10, 0)
    assert all(store.verify(r.content_hash) is None for r in report.rows)


def test_a_read_only_store_fails_the_batch_and_records_nothing(tmp_path, pg_dsn, small_disk):
    small_disk.grow()
    store = LocalMediaStore(small_disk.root / "media")
    small_disk.read_only()
    make_batch(tmp_path / "in", "b1", {"a.png": bad_media.png_bytes()})
    try:
        with pytest.raises(InfrastructureError, match="Read-only file system"):
            ingest_batch(LocalLanding(tmp_path / "in"), "b1", store, pg_dsn)
    finally:
        small_disk.writable()
    assert rows(pg_dsn, "b1") == []


def test_an_unreachable_s3_store_is_not_the_files_fault(tmp_path, pg_dsn):
    from botocore.config import Config

    from mm_pipelines.storage.media_store import S3MediaStore

    closed = f"http://127.0.0.1:{free_port()}"
    client = boto3.client(
        "s3",
        endpoint_url=closed,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=Config(retries={"max_attempts": 1}, connect_timeout=2),
    )
    make_batch(tmp_path / "in", "b1", {"a.png": bad_media.png_bytes()})
    store = S3MediaStore(client, "media-bucket", "media", tmp_path / "cache")
    with pytest.raises(InfrastructureError, match="127.0.0.1") as failure:
        ingest_batch(LocalLanding(tmp_path / "in"), "b1", store, pg_dsn)
    assert failure.value.retriable  # a network blip may pass: Dagster's retry policy applies
    assert rows(pg_dsn, "b1") == []


# --------------------------------------------------------------------------- odd files


def test_a_symlink_loop_is_refused_and_the_rest_lands(tmp_path, pg_dsn):
    root = make_batch(tmp_path / "in", "b1", {"a.png": bad_media.png_bytes()})
    os.symlink("loop_b", root / "loop_a")
    os.symlink("loop_a", root / "loop_b")
    report = ingest_batch(
        LocalLanding(tmp_path / "in"), "b1", LocalMediaStore(tmp_path / "s"), pg_dsn
    )
    named = by_name(report)
    assert named["a.png"].status == "ok"
    for name in ("loop_a", "loop_b"):
        assert named[name].error_category == "path_refused"
        assert "symlink loop" in named[name].error_message


def test_a_manifest_value_postgres_cannot_store_is_a_bad_manifest_row(tmp_path, pg_dsn):
    root = make_batch(
        tmp_path / "in",
        "b1",
        {f"{n}.png": bad_media.png_bytes((i * 40, 0, 0)) for i, n in enumerate("abcd")},
    )
    lines = [
        {"path": "a.png", "tenant": "acme\u0000evil", "caption": "nul in the tenant"},
        {"path": "b.png", "tenant": "acme", "caption": "a lone surrogate \ud800"},
        {"path": "c.png", "tenant": "acme", "caption": "a red square"},
        {"path": "d.png", "tenant": ["not", "text"]},
    ]
    text = "\n".join(json.dumps(line) for line in lines)  # ensure_ascii: \u0000, \ud800
    (root / "_manifest.jsonl").write_text(text)
    report = ingest_batch(
        LocalLanding(tmp_path / "in"), "b1", LocalMediaStore(tmp_path / "s"), pg_dsn
    )
    named = by_name(report)
    bad = named["_manifest.jsonl"]
    assert bad.error_category == "bad_manifest"
    assert "line 1" in bad.error_message and "NUL" in bad.error_message
    assert "line 2" in bad.error_message and "surrogate" in bad.error_message
    assert "line 4" in bad.error_message and "line 3" not in bad.error_message
    assert [named[f"{n}.png"].status for n in "abcd"] == ["ok"] * 4  # the batch lands
    assert (named["c.png"].tenant, named["c.png"].caption) == ("acme", "a red square")
    assert (named["a.png"].tenant, named["a.png"].caption) == ("default", None)
    assert len(rows(pg_dsn, "b1")) == 5


def test_whitespace_only_text_is_quarantined(tmp_path, pg_dsn):
    make_batch(
        tmp_path / "in",
        "b1",
        {"blank.txt": b" \n\t \r\n  ", "bom.txt": "\ufeff  \n".encode(), "note.txt": b"hello"},
    )
    report = ingest_batch(
        LocalLanding(tmp_path / "in"), "b1", LocalMediaStore(tmp_path / "s"), pg_dsn
    )
    named = by_name(report)
    assert named["blank.txt"].error_category == "empty_text"
    assert named["bom.txt"].error_category == "empty_text"
    assert named["note.txt"].status == "ok"


def test_a_dotdot_key_on_s3_landing_is_refused_with_a_row(tmp_path, pg_dsn, s3_env):
    client = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    client.create_bucket(Bucket="landing-dots")
    png = bad_media.png_bytes()
    for key in ("in/b1/ok.png", "in/b1/../escape.png", "in/b1/sub/../../up.png", "in/b1/_READY"):
        client.put_object(Bucket="landing-dots", Key=key, Body=png if key[-3:] == "png" else b"")
    report = ingest_batch(
        S3Landing(client, "landing-dots", "in"), "b1", LocalMediaStore(tmp_path / "s"), pg_dsn
    )
    refused = {r.source_uri: r for r in report.rows if r.error_category == "path_refused"}
    assert set(refused) == {
        "s3://landing-dots/in/b1/../escape.png",
        "s3://landing-dots/in/b1/sub/../../up.png",
    }
    assert all("'..'" in r.error_message for r in refused.values())
    assert by_name(report)["ok.png"].status == "ok"


def test_the_pixel_bomb_message_quotes_the_configured_limit(tmp_path, pg_dsn):
    # 20k x 20k declares more than Pillow's own refusal size (2 x 89.5 Mpx)
    make_batch(tmp_path / "in", "b1", {"huge.png": bad_media.png_header_only(20_000, 20_000)})
    limits = Limits(max_pixels=1_000_000)
    report = ingest_batch(
        LocalLanding(tmp_path / "in"), "b1", LocalMediaStore(tmp_path / "s"), pg_dsn, limits=limits
    )
    row = by_name(report)["huge.png"]
    assert row.error_category == "decompression_bomb"
    assert "400000000 pixels" in row.error_message and "1000000" in row.error_message
    assert "178956970" not in row.error_message  # Pillow's limit is not ours


def test_concurrent_writers_of_the_same_content_count_one_new_object(tmp_path):
    store = LocalMediaStore(tmp_path / "store")
    sources = []
    for i in range(40):
        path = tmp_path / f"src{i}.bin"
        path.write_bytes(os.urandom(64 << 10))
        sources.append((path, sha256_bytes(path.read_bytes())))
    results: list[list[bool]] = [[] for _ in range(6)]
    barrier = threading.Barrier(len(results))

    def writer(out: list[bool]) -> None:
        barrier.wait()
        out.extend(store.put_file(path, digest) for path, digest in sources)

    threads = [threading.Thread(target=writer, args=(out,)) for out in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    new_per_object = [sum(out[i] for out in results) for i in range(len(sources))]
    assert new_per_object == [1] * len(sources)
    assert all(store.verify(digest) is None for _, digest in sources)
