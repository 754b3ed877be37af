"""The serving store: atomic publication behind CURRENT, history, rollback, local and S3.

These tests use small synthetic bundles (a manifest over a few files): the store moves
files and never looks inside them.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from mm_pipelines.serving.manifest import (
    FORMAT,
    MANIFEST,
    BundleIntegrityError,
    list_files,
    verify_bundle,
    write_manifest,
)
from mm_pipelines.serving.store import (
    LocalServingStore,
    current_version,
    fetch_bundle,
    open_store,
    publish_bundle,
    read_history,
    replaced_at,
    rollback,
)


def make_bundle(root: Path, version: str, n_files: int = 3) -> Path:
    folder = root / version
    for i in range(n_files):
        path = folder / "part" / f"f{i}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"{version}:{i}".encode() * 100)
    manifest = {"format": FORMAT, "bundle_version": version, "models": {}}
    write_manifest(folder, {**manifest, "files": list_files(folder)})
    return folder


def test_publish_switches_current_and_history_records_the_replacement(tmp_path):
    store = open_store(tmp_path / "store")
    assert current_version(store) is None
    first = publish_bundle(store, make_bundle(tmp_path, "v1"))
    second = publish_bundle(store, make_bundle(tmp_path, "v2"))
    assert current_version(store) == "v2"
    assert (first.replaced, second.replaced) == (None, "v1")
    assert replaced_at(store, "v1") == second.published_at
    assert replaced_at(store, "v2") is None
    assert [(r["event"], r["bundle_version"]) for r in read_history(store)] == [
        ("publish", "v1"),
        ("publish", "v2"),
    ]


def test_rollback_repoints_current_and_refuses_unknown_versions(tmp_path):
    store = open_store(tmp_path / "store")
    publish_bundle(store, make_bundle(tmp_path, "v1"))
    publish_bundle(store, make_bundle(tmp_path, "v2"))
    record = rollback(store, "v1")
    assert current_version(store) == "v1"
    assert record["event"] == "rollback" and record["replaced"] == "v2"
    assert replaced_at(store, "v2") == record["at"]
    with pytest.raises(BundleIntegrityError, match="no such published bundle"):
        rollback(store, "v9")
    assert current_version(store) == "v1"


def test_republishing_a_version_with_other_content_is_refused(tmp_path):
    store = open_store(tmp_path / "store")
    publish_bundle(store, make_bundle(tmp_path / "a", "v1"))
    publish_bundle(store, make_bundle(tmp_path / "a", "v1"))  # a retried job: fine
    other = make_bundle(tmp_path / "b", "v1", n_files=4)
    with pytest.raises(BundleIntegrityError, match="exists with other content"):
        publish_bundle(store, other)


class SlowLocalStore(LocalServingStore):
    """Widens the window in which a bundle is half written (to make the test bite)."""

    def upload_file(self, path: Path, key: str) -> None:
        time.sleep(0.01)
        super().upload_file(path, key)


def test_reader_never_sees_a_bundle_without_its_manifest(tmp_path):
    store = SlowLocalStore(tmp_path / "store")
    bundles = [make_bundle(tmp_path / "src", f"v{i}", n_files=8) for i in range(6)]
    seen, half_written, errors = set(), 0, []
    done = threading.Event()

    def reader() -> None:
        nonlocal half_written
        while not done.is_set():
            version = current_version(store)
            for v in store.list_bundles():
                if not (store.root / "bundles" / v / MANIFEST).exists():
                    half_written += 1  # in the store, but not reachable through CURRENT
            if version is None:
                continue
            try:
                verify_bundle(fetch_bundle(store, version, tmp_path / "cache"))
                seen.add(version)
            except Exception as err:  # noqa: BLE001 - collected and asserted below
                errors.append(f"{version}: {err}")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for folder in bundles:
            publish_bundle(store, folder)
    finally:
        done.set()
        thread.join()
    assert errors == []
    assert half_written > 0  # the reader did look while bundles were being written
    assert seen and seen <= {f"v{i}" for i in range(6)}
    assert current_version(store) == "v5"


@pytest.fixture
def s3_client(s3_env):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env)
    client.create_bucket(Bucket="serving")
    return client


def test_s3_store_publishes_fetches_verified_and_rolls_back(s3_client, tmp_path):
    store = open_store("s3://serving/online", client=s3_client)
    publish_bundle(store, make_bundle(tmp_path / "src", "v1"))
    publish_bundle(store, make_bundle(tmp_path / "src", "v2"))
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket="serving")["Contents"]}
    assert {"online/CURRENT", "online/history.jsonl", "online/bundles/v2/manifest.json"} <= keys
    assert current_version(store) == "v2" and store.list_bundles() == ["v1", "v2"]
    local = fetch_bundle(store, "v2", tmp_path / "cache")
    assert verify_bundle(local)["bundle_version"] == "v2"
    rollback(store, "v1")
    assert current_version(store) == "v1"
    assert [r["event"] for r in read_history(store)] == ["publish", "publish", "rollback"]


def test_s3_corrupted_object_is_refused_naming_the_file(s3_client, tmp_path):
    store = open_store("s3://serving/online", client=s3_client)
    publish_bundle(store, make_bundle(tmp_path / "src", "v1"))
    key = "online/bundles/v1/part/f1.bin"
    body = s3_client.get_object(Bucket="serving", Key=key)["Body"].read()
    s3_client.put_object(Bucket="serving", Key=key, Body=body[:-1] + b"X")
    with pytest.raises(BundleIntegrityError, match="part/f1.bin"):
        fetch_bundle(store, "v1", tmp_path / "cache")
    assert not (tmp_path / "cache" / "v1").exists()  # nothing left that looks complete
    assert current_version(store) == "v1"  # a failed read changes nothing


def test_rollback_one_liner(tmp_path, capsys):
    from mm_pipelines.serving.store import main

    store = open_store(tmp_path / "store")
    publish_bundle(store, make_bundle(tmp_path, "v1"))
    publish_bundle(store, make_bundle(tmp_path, "v2"))
    assert main(["--store", str(tmp_path / "store"), "rollback", "v1"]) == 0
    assert current_version(store) == "v1"
    assert main(["--store", str(tmp_path / "store"), "rollback", "v7"]) == 1
    assert "no such published bundle" in capsys.readouterr().err
