"""The serving store: published bundles plus a pointer to the online one.

Layout (a local folder, or ``s3://bucket/prefix``)::

    bundles/<bundle_version>/...      immutable once its manifest.json exists
    CURRENT                           the online bundle version (one line)
    history.jsonl                     one record per switch: publish or rollback

Atomic publication: every file of a bundle is written first and its manifest.json last,
then CURRENT is switched in one step (``os.replace`` locally, a single small PUT on S3,
which S3 makes visible whole). A reader resolves CURRENT, whose bundle therefore always
has its manifest, and verifies the manifest's checksums before using the bundle.

The store assumes one publisher at a time (the export job); readers are unlimited.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mm_pipelines.serving.manifest import (
    MANIFEST,
    BundleIntegrityError,
    read_manifest,
    verify_bundle,
)

CURRENT = "CURRENT"
HISTORY = "history.jsonl"
BUNDLES = "bundles"


class ServingStore(ABC):
    """Keys are relative POSIX paths ("CURRENT", "bundles/<v>/manifest.json")."""

    @abstractmethod
    def uri(self, key: str = "") -> str: ...

    @abstractmethod
    def read_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Replace the object whole: a reader sees the old or the new bytes, never a mix."""

    @abstractmethod
    def upload_file(self, path: Path, key: str) -> None: ...

    @abstractmethod
    def download_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def list_bundles(self) -> list[str]: ...

    def local_bundle_dir(self, bundle_version: str) -> Path | None:
        """The bundle's folder when the store is a local one (read in place), else None."""
        return None


class LocalServingStore(ServingStore):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def uri(self, key: str = "") -> str:
        return str(self.root / key) if key else str(self.root)

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # the rename must not land before the bytes do
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def upload_file(self, path: Path, key: str) -> None:
        dest = self.root / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)

    def download_file(self, key: str, path: Path) -> None:
        shutil.copyfile(self.root / key, path)

    def list_bundles(self) -> list[str]:
        folder = self.root / BUNDLES
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def local_bundle_dir(self, bundle_version: str) -> Path | None:
        return self.root / BUNDLES / bundle_version


class S3ServingStore(ServingStore):
    """Any S3-compatible endpoint; the boto3 client is injected (as the media store's is)."""

    def __init__(self, client: Any, bucket: str, prefix: str = "serving") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    def key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self.key(key)}".rstrip("/")

    def read_bytes(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key(key))
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return obj["Body"].read()

    def write_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key(key), Body=data)

    def upload_file(self, path: Path, key: str) -> None:
        self.client.upload_file(str(path), self.bucket, self.key(key))

    def download_file(self, key: str, path: Path) -> None:
        self.client.download_file(self.bucket, self.key(key), str(path))

    def list_bundles(self) -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        found = set()
        for page in paginator.paginate(
            Bucket=self.bucket, Prefix=self.key(f"{BUNDLES}/"), Delimiter="/"
        ):
            for p in page.get("CommonPrefixes", []):
                found.add(p["Prefix"].rstrip("/").rsplit("/", 1)[-1])
        return sorted(found)


def open_store(location: str | Path, client: Any = None) -> ServingStore:
    """``s3://bucket/prefix`` (``client`` or a default boto3 client) or a local folder."""
    text = os.fspath(location)
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"no bucket in {text!r}")
        if client is None:  # the same timeouts and retries as every S3 client of ours
            from mm_pipelines.storage import s3

            client = s3.client()
        return S3ServingStore(client, bucket, prefix)
    return LocalServingStore(text)


# ----------------------------------------------------------------------------- pointer


def current_version(store: ServingStore) -> str | None:
    """The online bundle version, or None before the first publication."""
    data = store.read_bytes(CURRENT)
    text = data.decode().strip() if data else ""
    return text or None


def read_history(store: ServingStore) -> list[dict[str, Any]]:
    data = store.read_bytes(HISTORY) or b""
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def replaced_at(store: ServingStore, bundle_version: str) -> str | None:
    """When ``bundle_version`` last stopped being the online bundle (None: never, or is)."""
    times = [r["at"] for r in read_history(store) if r.get("replaced") == bundle_version]
    return times[-1] if times else None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _switch(store: ServingStore, bundle_version: str, event: str, **extra: Any) -> dict:
    previous = current_version(store)
    record = {
        "event": event,
        "bundle_version": bundle_version,
        "at": _now(),
        "replaced": previous if previous != bundle_version else None,
        **extra,
    }
    store.write_bytes(CURRENT, f"{bundle_version}\n".encode())  # the one atomic switch
    # the history is a record, not the source of truth: written after the switch
    history = store.read_bytes(HISTORY) or b""
    store.write_bytes(HISTORY, history + (json.dumps(record) + "\n").encode())
    return record


# ----------------------------------------------------------------------------- publish


@dataclass(frozen=True)
class Publication:
    bundle_version: str
    uri: str  # where the bundle lies in the store
    replaced: str | None  # the previously online version
    published_at: str


def bundle_key(bundle_version: str, rel: str = "") -> str:
    return f"{BUNDLES}/{bundle_version}/{rel}" if rel else f"{BUNDLES}/{bundle_version}"


def publish_bundle(
    store: ServingStore, bundle_dir: str | Path, make_current: bool = True
) -> Publication:
    """Copy a verified local bundle into the store (manifest last), then switch CURRENT.

    Re-publishing a version already in the store is allowed only with identical content
    (a retried export job); different content under the same version is refused.
    """
    bundle_dir = Path(bundle_dir)
    manifest = verify_bundle(bundle_dir)  # never publish what a reader would refuse
    version = manifest["bundle_version"]
    existing = store.read_bytes(bundle_key(version, MANIFEST))
    if existing is None:
        for rel in sorted(manifest["files"]):
            store.upload_file(bundle_dir / rel, bundle_key(version, rel))
        store.upload_file(bundle_dir / MANIFEST, bundle_key(version, MANIFEST))
    elif json.loads(existing)["files"] != manifest["files"]:
        raise BundleIntegrityError(f"{store.uri(bundle_key(version))} exists with other content")
    if not make_current:
        return Publication(version, store.uri(bundle_key(version)), None, "")
    record = _switch(
        store,
        version,
        "publish",
        dagster_run_id=manifest.get("dagster_run_id"),
        models=_models(manifest),
    )
    return Publication(version, store.uri(bundle_key(version)), record["replaced"], record["at"])


def _models(manifest: dict[str, Any]) -> dict[str, str | None]:
    return {name: m.get("version") for name, m in manifest.get("models", {}).items()}


def rollback(store: ServingStore, bundle_version: str) -> dict[str, Any]:
    """Point CURRENT back at an already published bundle; returns the history record."""
    manifest_bytes = store.read_bytes(bundle_key(bundle_version, MANIFEST))
    if manifest_bytes is None:
        raise BundleIntegrityError(
            f"{store.uri(bundle_key(bundle_version))}: no such published bundle "
            f"(published: {', '.join(store.list_bundles()) or 'none'})"
        )
    return _switch(store, bundle_version, "rollback")


# ----------------------------------------------------------------------------- read


def fetch_bundle(store: ServingStore, bundle_version: str, cache_dir: str | Path) -> Path:
    """A verified local folder with the bundle: in place for a local store, else a
    download into ``cache_dir/<version>`` (downloaded to a private name, verified, then
    renamed, so a crash never leaves a folder that looks complete)."""
    local = store.local_bundle_dir(bundle_version)
    if local is not None:
        verify_bundle(local)
        return local
    dest = Path(cache_dir).expanduser().resolve() / bundle_version
    if dest.is_dir():
        try:
            verify_bundle(dest)
            return dest
        except BundleIntegrityError:
            shutil.rmtree(dest, ignore_errors=True)
    partial = dest.with_name(f".{bundle_version}.{uuid.uuid4().hex[:8]}")
    partial.mkdir(parents=True)
    try:
        # the manifest first: it says which files make the bundle (and proves it complete)
        manifest_key = bundle_key(bundle_version, MANIFEST)
        if store.read_bytes(manifest_key) is None:
            raise BundleIntegrityError(f"{store.uri(bundle_key(bundle_version))}: no manifest")
        store.download_file(manifest_key, partial / MANIFEST)
        for rel in sorted(read_manifest(partial)["files"]):
            (partial / rel).parent.mkdir(parents=True, exist_ok=True)
            store.download_file(bundle_key(bundle_version, rel), partial / rel)
        verify_bundle(partial)
        try:
            os.replace(partial, dest)
        except OSError:
            if not dest.is_dir():  # else: another process fetched the same bundle first
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dest


def fetch_current(store: ServingStore, cache_dir: str | Path) -> tuple[str, Path]:
    version = current_version(store)
    if version is None:
        raise BundleIntegrityError(f"{store.uri(CURRENT)}: no bundle has been published")
    return version, fetch_bundle(store, version, cache_dir)


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m mm_pipelines.serving.store [--store S] current|history|rollback V``."""
    import argparse
    import sys

    from mm_pipelines import settings

    parser = argparse.ArgumentParser(prog="python -m mm_pipelines.serving.store")
    parser.add_argument(
        "--store",
        default=settings.serving_store(),
    )
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("current", help="print the online bundle version")
    sub.add_parser("history", help="print every publish / rollback record (JSON lines)")
    sub.add_parser("list", help="print the published bundle versions")
    back = sub.add_parser("rollback", help="point CURRENT back at a published bundle")
    back.add_argument("bundle_version")
    args = parser.parse_args(argv)
    store = open_store(args.store)
    if args.action == "current":
        print(current_version(store) or "none")
    elif args.action == "history":
        for record in read_history(store):
            print(json.dumps(record))
    elif args.action == "list":
        print("\n".join(store.list_bundles()))
    else:
        try:
            print(json.dumps(rollback(store, args.bundle_version)))
        except BundleIntegrityError as err:
            print(f"rollback refused: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
