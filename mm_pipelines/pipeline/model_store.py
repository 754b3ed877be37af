"""The model store: every trained artifact steps hand each other (CLIP checkpoint, projector,
diffusion base, training sets, adapters, LoRA checkpoints, quality reports).

An artifact is a folder, stored immutably under `<kind>/<name>/<version>/` with a manifest
(`.mm-manifest.json`: sha256 and size of every file, plus metadata) written after its files;
`<kind>/<name>/CURRENT` names the current version and is written last, as one small object.
So a reader sees the old artifact or the new one, never half of one: on a folder the version
folder appears by one rename, on S3 (no rename) a version without its manifest is refused as
incomplete and the pointer is switched only after the manifest is there.

Readers get a verified local folder: every file is checked against its sha256 before it is
handed out (a corrupted or truncated file is refused with the artifact and the expected hash
in the message). On S3 files land in a local cache keyed by sha256 and the artifact folder
is made of hard links to the cached files. The missing files of an artifact are downloaded
and checked in a private folder first and enter the cache only when all of them match, so a
corrupted artifact leaves nothing behind; every move is a rename, so two processes filling
the cache at once do not trip over each other (the first complete artifact folder wins).
On a folder store the folder itself is handed out; a stamp of file sizes and mtimes spares
re-hashing unchanged files on every read.

MLflow stays the registry reviewers look at: a registered version carries the store URI and
the manifest digest of the artifact it was made from (see pipeline/tracking.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = ".mm-manifest.json"
STAMP = ".mm-verified"
CURRENT = "CURRENT"
_CHUNK = 1 << 20

# what the pipeline keeps in the store (the kinds are part of the store's layout)
CLIP = "clip"
PROJECTOR = "projector"
DIFFUSION_BASE = "diffusion-base"
TRAINING_SET = "training-set"
ADAPTER = "lora-adapter"
LORA_CHECKPOINT = "lora-checkpoint"
QUALITY_REPORT = "quality-report"
CONTENT_HEADS = "content-heads"  # curation's scoring heads (pipeline/curate/scores.py)


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete or does not match its manifest."""


class ArtifactNotFound(ArtifactError, FileNotFoundError):
    pass


class ArtifactIntegrityError(ArtifactError):
    pass


class StoreUnavailable(ArtifactError):
    """The store cannot be reached or refused the request (endpoint, bucket, credentials).
    Not bad input: a retry may succeed, so steps do retry on it."""


_TRANSFER_THREADS = 8  # files of one artifact move in parallel (S3 round trips dominate)


def _parallel(func: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    if len(items) <= 1:
        return [func(i) for i in items]
    with ThreadPoolExecutor(min(_TRANSFER_THREADS, len(items))) as pool:
        return list(pool.map(func, items))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, STAMP))


def build_manifest(folder: Path, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    files = {
        p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in _files(folder)
    }
    return {"format": "mm-model-store/1", "files": files, "metadata": metadata or {}}


def manifest_digest(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Artifact:
    kind: str
    name: str
    version: str
    path: Path  # a verified local folder; treat it as read-only
    uri: str
    manifest: dict[str, Any] = field(repr=False)

    @property
    def metadata(self) -> dict[str, Any]:
        return self.manifest.get("metadata", {})

    @property
    def digest(self) -> str:
        return manifest_digest(self.manifest)


# --------------------------------------------------------------------------- backends


class Backend(ABC):
    """Where artifacts live: keys are '/'-separated paths under the store's root."""

    @abstractmethod
    def uri(self, key: str) -> str: ...

    @abstractmethod
    def read_bytes(self, key: str) -> bytes | None: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def upload(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def download(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]: ...

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None: ...


class FolderBackend(Backend):
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def uri(self, key: str) -> str:
        return self.path(key).as_uri()

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            return None

    def write_bytes(self, key: str, data: bytes) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)  # readers see the old or the new bytes, never half

    def upload(self, key: str, path: Path) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)

    def download(self, key: str, path: Path) -> None:
        shutil.copyfile(self.path(key), path)

    def list(self, prefix: str) -> list[str]:
        base = self.path(prefix)
        if not base.is_dir():
            return []
        return [p.relative_to(self.root).as_posix() for p in base.iterdir()]

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix), ignore_errors=True)


class S3Backend(Backend):
    """Objects under `s3://bucket/prefix/`; any S3-compatible endpoint (a boto3 client, e.g.
    from dagster-aws's S3Resource). Errors name the object and the endpoint: a missing object
    is ArtifactNotFound, anything else (unreachable endpoint, no bucket, no access)
    StoreUnavailable."""

    def __init__(self, client: Any, bucket: str, prefix: str = "models"):
        self.client, self.bucket, self.prefix = client, bucket, prefix.strip("/")

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._k(key)}"

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        endpoint = getattr(self.client.meta, "endpoint_url", "")
        try:
            yield
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                raise ArtifactNotFound(f"{self.uri(key)} does not exist") from err
            raise StoreUnavailable(
                f"{self.uri(key)} at {endpoint}: S3 refused ({code}): {err}"
            ) from err
        except BotoCoreError as err:
            raise StoreUnavailable(
                f"{self.uri(key)}: the S3 endpoint {endpoint} is unreachable: {err}"
            ) from err

    def read_bytes(self, key: str) -> bytes | None:
        try:
            with self._errors(key):
                return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except ArtifactNotFound:
            return None

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._errors(key):
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)

    def upload(self, key: str, path: Path) -> None:
        with self._errors(key):
            self.client.upload_file(str(path), self.bucket, self._k(key))

    def download(self, key: str, path: Path) -> None:
        with self._errors(key):
            self.client.download_file(self.bucket, self._k(key), str(path))

    def list(self, prefix: str) -> list[str]:
        base = self._k(prefix).rstrip("/") + "/"
        keys = []
        with self._errors(prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base, Delimiter="/"
            )
            for page in pages:
                keys += [p["Prefix"].rstrip("/") for p in page.get("CommonPrefixes", [])]
                keys += [o["Key"] for o in page.get("Contents", [])]
        strip = len(self.prefix) + 1 if self.prefix else 0
        return [k[strip:] for k in keys]

    def delete_prefix(self, prefix: str) -> None:
        base = self._k(prefix).rstrip("/") + "/"
        with self._errors(prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base
            ):
                objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if objects:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects})


# --------------------------------------------------------------------------- the store


class ModelStore:
    """`put` / `get` / `set_current` / `current` over a backend, with a verified local cache."""

    def __init__(self, backend: Backend, cache_dir: str | Path):
        self.backend = backend
        self.cache_dir = Path(cache_dir)

    # ----------------------------------------------------------------- keys

    @staticmethod
    def _check(kind: str, name: str) -> None:
        for part in (kind, *name.split("/")):
            if not part or part.startswith(".") or part in ("..", CURRENT):
                raise ValueError(f"bad model store key {kind}/{name}")

    def _key(self, kind: str, name: str, *rest: str) -> str:
        self._check(kind, name)
        return "/".join((kind, name, *rest))

    def uri(self, kind: str, name: str, version: str | None = None) -> str:
        return self.backend.uri(self._key(kind, name, *([version] if version else [])))

    # ----------------------------------------------------------------- writing

    def put(
        self,
        kind: str,
        name: str,
        folder: str | Path,
        *,
        version: str | None = None,
        metadata: dict[str, Any] | None = None,
        make_current: bool = False,
    ) -> Artifact:
        """Store `folder` as an immutable version (by default named by its content digest)
        and return it. Storing the same content again is a no-op."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ArtifactNotFound(f"cannot store {kind}/{name}: {folder} is not a folder")
        manifest = build_manifest(folder, metadata)
        version = version or manifest_digest(manifest)[:16]
        existing = self._read_manifest(kind, name, version)
        if existing is None:
            self._write_version(kind, name, version, folder, manifest)
        elif existing["files"] != manifest["files"]:
            raise ArtifactIntegrityError(
                f"{self.uri(kind, name, version)} exists with other content: versions are "
                "immutable, store the new content under a new version"
            )
        if make_current:
            self.set_current(kind, name, version)
        if not isinstance(self.backend, FolderBackend):
            self._seed_cache(folder, manifest)  # the writer has the bytes: no download back
        return self.get(kind, name, version)

    def _seed_cache(self, folder: Path, manifest: dict[str, Any]) -> None:
        """Copy the files just stored into the cache (they hashed to the manifest a moment
        ago); a file changed since then is simply left out and downloaded on `get`."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for rel, info in manifest["files"].items():
            blob = self._blob(info)
            if blob.is_file():
                continue
            blob.parent.mkdir(parents=True, exist_ok=True)
            tmp = blob.with_name(f".{blob.name}.{uuid.uuid4().hex}.tmp")
            shutil.copyfile(folder / rel, tmp)
            if sha256_file(tmp) == info["sha256"]:
                os.replace(tmp, blob)
            else:
                tmp.unlink()

    def _write_version(
        self, kind: str, name: str, version: str, folder: Path, manifest: dict[str, Any]
    ) -> None:
        if isinstance(self.backend, FolderBackend):
            # build beside the final folder, then one rename makes it appear whole
            final = self.backend.path(self._key(kind, name, version))
            tmp = final.with_name(f".{version}.{uuid.uuid4().hex}.tmp")
            shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns(MANIFEST, STAMP))
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            try:
                os.rename(tmp, final)
            except OSError:  # a concurrent writer stored the same version first
                shutil.rmtree(tmp, ignore_errors=True)
            return
        _parallel(
            lambda rel: self.backend.upload(self._key(kind, name, version, rel), folder / rel),
            list(manifest["files"]),
        )
        # the manifest goes last: without it the version is incomplete and refused
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        self.backend.write_bytes(self._key(kind, name, version, MANIFEST), data)

    def set_current(self, kind: str, name: str, version: str) -> None:
        if self._read_manifest(kind, name, version) is None:
            raise ArtifactNotFound(f"no complete artifact {self.uri(kind, name, version)}")
        self.backend.write_bytes(self._key(kind, name, CURRENT), version.encode())

    # ----------------------------------------------------------------- reading

    def current(self, kind: str, name: str) -> str | None:
        data = self.backend.read_bytes(self._key(kind, name, CURRENT))
        return data.decode().strip() if data else None

    def versions(self, kind: str, name: str) -> list[str]:
        keys = self.backend.list(self._key(kind, name))
        names = [k.rsplit("/", 1)[-1] for k in keys]
        return sorted(n for n in names if n != CURRENT and not n.startswith("."))

    def _read_manifest(self, kind: str, name: str, version: str) -> dict[str, Any] | None:
        data = self.backend.read_bytes(self._key(kind, name, version, MANIFEST))
        return json.loads(data) if data else None

    def get(self, kind: str, name: str, version: str = "current") -> Artifact:
        """A verified local folder of the artifact ("current" follows the pointer)."""
        if version == "current":
            found = self.current(kind, name)
            if found is None:
                raise ArtifactNotFound(f"no current {kind} {name!r} in {self.uri(kind, name)}")
            version = found
        manifest = self._read_manifest(kind, name, version)
        uri = self.uri(kind, name, version)
        if manifest is None:
            raise ArtifactNotFound(
                f"{uri} is missing or incomplete (no {MANIFEST}: its writer did not finish)"
            )
        if isinstance(self.backend, FolderBackend):
            path = self.backend.path(self._key(kind, name, version))
            _verify_in_place(path, manifest, uri)
        else:
            path = self._materialize(kind, name, version, manifest, uri)
        return Artifact(kind, name, version, path, uri, manifest)

    def _materialize(
        self, kind: str, name: str, version: str, manifest: dict[str, Any], uri: str
    ) -> Path:
        final = self.cache_dir / "artifacts" / kind / name / version
        if (final / MANIFEST).is_file():
            return final
        files = manifest["files"]
        # one download per distinct content: identical files share a blob
        wanted = {info["sha256"]: rel for rel, info in sorted(files.items())}
        missing = [(d, rel) for d, rel in wanted.items() if not self._blob({"sha256": d}).is_file()]
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.cache_dir))
        try:
            # all or nothing: every missing file is checked before any enters the cache
            def fetch(item: tuple[str, str]) -> tuple[str, Path]:
                digest, rel = item
                tmp = incoming / digest
                try:
                    self.backend.download(self._key(kind, name, version, rel), tmp)
                except ArtifactNotFound as err:
                    raise ArtifactIntegrityError(
                        f"{uri}: {rel} is missing from the store (expected sha256 {digest})"
                    ) from err
                actual = sha256_file(tmp)
                if actual != digest:
                    raise ArtifactIntegrityError(
                        f"{uri}: {rel} has sha256 {actual}, expected {digest}: the stored "
                        "artifact is corrupted or was overwritten; refusing to use it"
                    )
                return digest, tmp

            for digest, tmp in _parallel(fetch, missing):
                blob = self._blob({"sha256": digest})
                blob.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, blob)  # same content whoever wins
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp_dir = final.with_name(f".{version}.{uuid.uuid4().hex}.tmp")
            for rel, info in files.items():
                target = tmp_dir / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(self._blob(info), target)
                except OSError:  # another file system: a copy will do
                    shutil.copyfile(self._blob(info), target)
            (tmp_dir / MANIFEST).write_text(json.dumps(manifest, sort_keys=True))
            try:
                os.rename(tmp_dir, final)
            except OSError:  # another process made the same folder first
                shutil.rmtree(tmp_dir, ignore_errors=True)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
        if not (final / MANIFEST).is_file():
            raise ArtifactError(f"{uri}: could not build its local copy under {final}")
        return final

    def _blob(self, info: dict[str, Any]) -> Path:
        digest = info["sha256"]
        return self.cache_dir / "blobs" / digest[:2] / digest

    # ----------------------------------------------------------------- housekeeping

    def prune(self, kind: str, name: str, keep: list[str]) -> None:
        """Delete every version of kind/name except `keep` (and the current one)."""
        current = self.current(kind, name)
        for version in self.versions(kind, name):
            if version not in keep and version != current:
                self.backend.delete_prefix(self._key(kind, name, version))

    @contextlib.contextmanager
    def staging(self, label: str) -> Iterator[Path]:
        """A scratch folder under the cache for building an artifact before `put`."""
        path = self.cache_dir / "staging" / f"{label}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


def _stat_stamp(folder: Path, files: dict[str, Any]) -> dict[str, list[int]]:
    stamp = {}
    for rel in files:
        st = (folder / rel).stat()
        stamp[rel] = [st.st_size, st.st_mtime_ns]
    return stamp


def _verify_in_place(folder: Path, manifest: dict[str, Any], uri: str) -> None:
    files = manifest["files"]
    stamp_path = folder / STAMP
    try:
        if json.loads(stamp_path.read_text()) == _stat_stamp(folder, files):
            return  # unchanged since the last full check
    except (OSError, ValueError):
        pass
    for rel, info in files.items():
        path = folder / rel
        if not path.is_file():
            raise ArtifactIntegrityError(f"{uri}: {rel} is missing")
        actual = sha256_file(path)
        if actual != info["sha256"]:
            raise ArtifactIntegrityError(
                f"{uri}: {rel} has sha256 {actual}, expected {info['sha256']}: the stored "
                "artifact is corrupted; refusing to use it"
            )
    with contextlib.suppress(OSError):  # a read-only store still verifies, just every time
        tmp = stamp_path.with_name(f".{STAMP}.{uuid.uuid4().hex}")
        tmp.write_text(json.dumps(_stat_stamp(folder, files)))
        os.replace(tmp, stamp_path)
