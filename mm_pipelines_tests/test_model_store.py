"""The model store on both backends (a folder, and S3 on the session's moto server): what a
step hands the next one must come back whole, verified, and never half-written or altered."""

from __future__ import annotations

import hashlib
import multiprocessing
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest

from mm_pipelines.pipeline import model_store as ms

KIND, NAME = ms.CLIP, "demo"


def _s3_client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _new_bucket(endpoint: str) -> str:
    bucket = f"models-{uuid.uuid4().hex[:10]}"
    _s3_client(endpoint).create_bucket(Bucket=bucket)
    return bucket


class Backend:
    """One backend of the store, with a way to reach behind the store's back."""

    def __init__(self, kind: str, root: Path, endpoint: str | None) -> None:
        self.kind, self.root, self.endpoint = kind, root, endpoint
        self.bucket = _new_bucket(endpoint) if endpoint else ""

    def store(self, cache: str = "cache") -> ms.ModelStore:
        """A store as one process sees it: its own local cache."""
        if self.kind == "folder":
            return ms.ModelStore(ms.FolderBackend(self.root / "store"), self.root / cache)
        backend = ms.S3Backend(_s3_client(self.endpoint), self.bucket, "models")
        return ms.ModelStore(backend, self.root / cache)

    def flip_one_byte(self, key: str) -> None:
        if self.kind == "folder":
            path = self.root / "store" / key
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01
            path.write_bytes(bytes(data))
            return
        client = _s3_client(self.endpoint)
        data = bytearray(client.get_object(Bucket=self.bucket, Key=f"models/{key}")["Body"].read())
        data[len(data) // 2] ^= 0x01
        client.put_object(Bucket=self.bucket, Key=f"models/{key}", Body=bytes(data))


@pytest.fixture(params=["folder", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    endpoint = request.getfixturevalue("s3_env") if request.param == "s3" else None
    return Backend(request.param, tmp_path, endpoint)


def _artifact(folder: Path, seed: int = 0, files: int = 3) -> Path:
    """A small trained-model-like folder: weights, a config, a nested file."""
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(hashlib.sha256(str(seed).encode()).digest() * 4096)
    (folder / "config.json").write_text(f'{{"seed": {seed}}}')
    (folder / "tokenizer").mkdir()
    for i in range(files):
        (folder / "tokenizer" / f"part-{i}.txt").write_text(f"part {i} of seed {seed}\n" * 50)
    return folder


def _contents(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name not in (ms.MANIFEST, ms.STAMP)
    }


def test_put_then_get_current_round_trips_files_and_metadata(
    backend: Backend, tmp_path: Path
) -> None:
    source = _artifact(tmp_path / "trained")
    stored = backend.store("writer-cache").put(
        KIND, NAME, source, metadata={"weights": "weights.bin"}, make_current=True
    )

    reader = backend.store("reader-cache")  # another process: nothing cached yet
    got = reader.get(KIND, NAME)
    assert got.version == stored.version == ms.manifest_digest(got.manifest)[:16]
    assert reader.current(KIND, NAME) == got.version
    assert reader.versions(KIND, NAME) == [got.version]
    assert _contents(got.path) == _contents(source)
    assert got.metadata == {"weights": "weights.bin"}
    assert got.uri == reader.uri(KIND, NAME, got.version)
    assert got.uri.startswith("s3://" if backend.kind == "s3" else "file://")


def test_a_version_is_immutable(backend: Backend, tmp_path: Path) -> None:
    store = backend.store()
    first = store.put(KIND, NAME, _artifact(tmp_path / "a", seed=1), version="v1")
    with pytest.raises(ms.ArtifactIntegrityError, match="immutable"):
        store.put(KIND, NAME, _artifact(tmp_path / "b", seed=2), version="v1")

    again = store.put(KIND, NAME, _artifact(tmp_path / "c", seed=1), version="v1")  # same bytes
    assert again.digest == first.digest
    assert _contents(backend.store("fresh").get(KIND, NAME, "v1").path) == _contents(tmp_path / "a")


def test_a_corrupted_file_is_refused_with_the_artifact_and_its_expected_hash(
    backend: Backend, tmp_path: Path
) -> None:
    source = _artifact(tmp_path / "trained")
    stored = backend.store("writer-cache").put(KIND, NAME, source, make_current=True)
    expected = stored.manifest["files"]["weights.bin"]["sha256"]
    backend.flip_one_byte(f"{KIND}/{NAME}/{stored.version}/weights.bin")

    reader = backend.store("reader-cache")
    for _ in range(2):  # refused every time: no stamp or cache entry made it acceptable
        with pytest.raises(ms.ArtifactIntegrityError) as refused:
            reader.get(KIND, NAME)
        message = str(refused.value)
        assert stored.uri in message and "weights.bin" in message
        assert f"expected {expected}" in message
    cache = tmp_path / "reader-cache"
    assert not [p for p in cache.rglob("*") if p.is_file()], "a refused artifact left files"


def test_a_version_without_its_manifest_is_incomplete_and_refused(
    backend: Backend, tmp_path: Path
) -> None:
    store = backend.store()
    good = store.put(KIND, NAME, _artifact(tmp_path / "good", seed=1), make_current=True)
    # a writer that died after its files and before its manifest
    half = _artifact(tmp_path / "half", seed=2)
    for rel in _contents(half):
        store.backend.upload(f"{KIND}/{NAME}/half/{rel}", half / rel)

    with pytest.raises(ms.ArtifactNotFound, match=r"half is missing or incomplete"):
        store.get(KIND, NAME, "half")
    with pytest.raises(ms.ArtifactNotFound, match="no complete artifact"):
        store.set_current(KIND, NAME, "half")
    assert store.current(KIND, NAME) == good.version
    assert _contents(backend.store("fresh").get(KIND, NAME).path) == _contents(tmp_path / "good")


def _get_in_another_process(
    endpoint: str, bucket: str, cache: str, start: Any, results: Any
) -> None:
    store = ms.ModelStore(ms.S3Backend(_s3_client(endpoint), bucket, "models"), cache)
    start.wait(timeout=60)  # both processes ask at the same moment
    try:
        got = store.get(KIND, NAME)
        results.put(("ok", str(got.path), _contents(got.path)))
    except Exception as err:  # noqa: BLE001 - reported to the test, which fails on it
        results.put(("error", repr(err), {}))


def test_two_processes_filling_one_cache_at_once_both_get_a_whole_verified_folder(
    s3_env: str, tmp_path: Path
) -> None:
    backend = Backend("s3", tmp_path, s3_env)
    # many files, so that the two downloads overlap
    source = _artifact(tmp_path / "trained", files=60)
    backend.store("writer-cache").put(KIND, NAME, source, make_current=True)

    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(2), ctx.Queue()
    cache = str(tmp_path / "shared-cache")
    procs = [
        ctx.Process(
            target=_get_in_another_process, args=(s3_env, backend.bucket, cache, start, results)
        )
        for _ in range(2)
    ]
    for proc in procs:
        proc.start()
    answers = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)

    assert [a[0] for a in answers] == ["ok", "ok"], answers
    assert answers[0][1] == answers[1][1]  # one artifact folder in the cache
    assert answers[0][2] == answers[1][2] == _contents(source)
    leftovers = [
        p.name for p in Path(cache).rglob("*") if ".tmp" in p.name or ".incoming" in p.name
    ]
    assert leftovers == []


def test_the_media_stores_s3_cache_refuses_a_corrupted_object(s3_env: str, tmp_path: Path) -> None:
    """Media objects are keyed by their sha256: the S3 store's local cache checks it too."""
    from mm_pipelines.storage.media_store import MediaIntegrityError, S3MediaStore

    bucket = _new_bucket(s3_env)
    store = S3MediaStore(_s3_client(s3_env), bucket, "media", tmp_path / "cache")
    content_hash, _ = store.put_bytes(b"a frame of a video" * 1000)
    key = store.key(content_hash)
    store.client.put_object(Bucket=bucket, Key=key, Body=b"a frame of a vidEo" * 1000)

    with pytest.raises(MediaIntegrityError, match=f"expected {content_hash}"):
        store.local_path(content_hash)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
