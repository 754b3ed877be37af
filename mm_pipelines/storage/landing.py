"""The landing area: a folder (local or an S3 prefix) of batch folders.

A batch is complete when its `_READY` marker exists; files whose names start with `_` or
`.` are control files (the marker, an optional `_manifest.jsonl`) and are not ingested.
Listing refuses anything that would reach outside the batch (symlinks, `..`) or cannot be
followed (symlink loops) as a refused path; it never fails the listing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from mm_pipelines.storage.text import storable_text_problem

READY_MARKER = "_READY"
MANIFEST = "_manifest.jsonl"
BATCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class LandingFile:
    batch: str
    relpath: str  # POSIX path inside the batch
    uri: str
    size: int
    fingerprint: str  # changes when the file changes: size+mtime locally, ETag on S3


@dataclass(frozen=True)
class RefusedPath:
    batch: str
    relpath: str
    uri: str
    reason: str


@dataclass(frozen=True)
class ManifestEntry:
    caption: str | None = None
    tenant: str | None = None
    labels: tuple[str, ...] = ()  # `"label": "unsafe"` or a list: examples for the curation heads


def _labels(row: dict[str, Any]) -> tuple[str, ...]:
    raw = row.get("label", row.get("labels"))
    if raw is None:
        return ()
    values = [raw] if isinstance(raw, str) else raw
    if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
        raise TypeError(f"label must be a non-empty string or a list of them, got {raw!r}")
    return tuple(sorted({v.strip() for v in values}))


def is_control_name(relpath: str) -> bool:
    return any(part.startswith(("_", ".")) for part in PurePosixPath(relpath).parts)


def _manifest_value(row: dict, name: str) -> str | None:
    value = row.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name!r} must be a string, not {type(value).__name__}")
    if problem := storable_text_problem(value):
        raise ValueError(f"{name!r} {problem}")
    return value


class Landing(ABC):
    @abstractmethod
    def ready_batches(self) -> list[str]: ...

    @abstractmethod
    def is_ready(self, batch: str) -> bool:
        """Whether the batch's `_READY` marker exists."""

    @abstractmethod
    def list_batch(self, batch: str) -> tuple[list[LandingFile], list[RefusedPath]]: ...

    @abstractmethod
    @contextmanager
    def local_file(self, item: LandingFile) -> Iterator[Path]:
        """A local path holding the file's bytes for as long as the context is open."""

    @abstractmethod
    def _read_control(self, batch: str, name: str) -> bytes | None: ...

    def manifest(self, batch: str) -> dict[str, ManifestEntry]:
        """The manifest's entries; ValueError naming the first bad line."""
        entries, problems = self.read_manifest(batch)
        if problems:
            raise ValueError(problems[0])
        return entries

    def read_manifest(self, batch: str) -> tuple[dict[str, ManifestEntry], list[str]]:
        """Optional per-file captions, tenants and labels: one JSON object per line with `path`.
        Returns the good lines' entries and one problem per bad line (which is skipped):
        a value Postgres cannot store (NUL, a lone surrogate) is a bad line, not a crash."""
        raw = self._read_control(batch, MANIFEST)
        if raw is None:
            return {}, []
        entries: dict[str, ManifestEntry] = {}
        problems: list[str] = []
        for lineno, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                path = row["path"]
                if not isinstance(path, str):
                    raise ValueError(f"'path' must be a string, not {type(path).__name__}")
                entries[path] = ManifestEntry(
                    _manifest_value(row, "caption"), _manifest_value(row, "tenant"), _labels(row)
                )
            except (ValueError, KeyError, TypeError) as err:
                problems.append(f"{MANIFEST} of batch {batch!r}, line {lineno}: {err}")
        return entries, problems

    def digest(
        self,
        batch: str,
        listing: tuple[list[LandingFile], list[RefusedPath]] | None = None,
    ) -> str:
        """What the batch holds right now, as one hash: every file's path and fingerprint,
        every refused path, and the manifest's bytes. Equal digests mean an ingest would
        find nothing new (the sensors and `mm status` compare it with the last ingest)."""
        files, refused = listing if listing is not None else self.list_batch(batch)
        manifest = self._read_control(batch, MANIFEST)
        parts = {
            "files": sorted((f.relpath, f.fingerprint) for f in files),
            "refused": sorted(r.relpath for r in refused),
            "manifest": hashlib.sha256(manifest).hexdigest() if manifest is not None else None,
        }
        blob = json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()


class LocalLanding(Landing):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def ready_batches(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            d.name
            for d in self.root.iterdir()
            if d.is_dir() and BATCH_NAME.match(d.name) and (d / READY_MARKER).exists()
        )

    def is_ready(self, batch: str) -> bool:
        return (self.batch_dir(batch) / READY_MARKER).is_file()

    def batch_dir(self, batch: str) -> Path:
        if not BATCH_NAME.match(batch):
            raise ValueError(f"invalid batch name {batch!r}")
        return self.root / batch

    def list_batch(self, batch: str) -> tuple[list[LandingFile], list[RefusedPath]]:
        base = self.batch_dir(batch)
        if not base.is_dir():
            raise FileNotFoundError(f"batch folder {base} does not exist")
        real_base = base.resolve()
        files: list[LandingFile] = []
        refused: list[RefusedPath] = []
        for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
            for name in sorted(filenames) + sorted(
                d for d in dirnames if Path(dirpath, d).is_symlink()
            ):
                path = Path(dirpath, name)
                rel = path.relative_to(base).as_posix()
                if is_control_name(rel):
                    continue
                try:
                    real = path.resolve()
                    is_file = real.is_file()
                except (RuntimeError, OSError) as err:  # RuntimeError: 3.11's "Symlink loop"
                    reason = "symlink loop" if _is_loop(err) else f"cannot be resolved ({err})"
                    refused.append(RefusedPath(batch, rel, path.as_uri(), reason))
                    continue
                if path.is_symlink() and not real.is_relative_to(real_base):
                    refused.append(
                        RefusedPath(
                            batch,
                            rel,
                            path.as_uri(),
                            f"symlink points outside the batch folder, to {real}",
                        )
                    )
                    continue
                if not is_file:
                    refused.append(RefusedPath(batch, rel, path.as_uri(), "not a regular file"))
                    continue
                st = real.stat()
                files.append(
                    LandingFile(
                        batch, rel, path.as_uri(), st.st_size, f"{st.st_size}:{st.st_mtime_ns}"
                    )
                )
            dirnames[:] = sorted(d for d in dirnames if not Path(dirpath, d).is_symlink())
        return files, refused

    def resolve_inside(self, batch: str, relpath: str) -> Path:
        """The path of `relpath` in the batch, refusing anything that escapes it."""
        base = self.batch_dir(batch).resolve()
        target = (base / relpath).resolve()
        if not target.is_relative_to(base):
            raise PermissionError(f"{relpath!r} resolves outside batch {batch!r}")
        return target

    @contextmanager
    def local_file(self, item: LandingFile) -> Iterator[Path]:
        yield self.resolve_inside(item.batch, item.relpath)

    def _read_control(self, batch: str, name: str) -> bytes | None:
        path = self.batch_dir(batch) / name
        return path.read_bytes() if path.is_file() else None

    def mark_ready(self, batch: str) -> None:
        (self.batch_dir(batch) / READY_MARKER).touch()


def _is_loop(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) or getattr(err, "errno", None) == errno.ELOOP


class S3Landing(Landing):
    """Batches are prefixes `s3://bucket/prefix/<batch>/`, complete when `<batch>/_READY` exists."""

    def __init__(self, client: Any, bucket: str, prefix: str = ""):
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _pages(self, **kwargs: Any) -> Iterator[dict]:
        yield from self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, **kwargs
        )

    def ready_batches(self) -> list[str]:
        root = self._key() + "/" if self.prefix else ""
        batches = []
        for page in self._pages(Prefix=root, Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                name = common["Prefix"][len(root) :].rstrip("/")
                if BATCH_NAME.match(name) and self._exists(self._key(name, READY_MARKER)):
                    batches.append(name)
        return sorted(batches)

    def is_ready(self, batch: str) -> bool:
        if not BATCH_NAME.match(batch):
            raise ValueError(f"invalid batch name {batch!r}")
        return self._exists(self._key(batch, READY_MARKER))

    def _exists(self, key: str) -> bool:
        resp = self.client.list_objects_v2(Bucket=self.bucket, Prefix=key, MaxKeys=1)
        return any(obj["Key"] == key for obj in resp.get("Contents", []))

    def list_batch(self, batch: str) -> tuple[list[LandingFile], list[RefusedPath]]:
        if not BATCH_NAME.match(batch):
            raise ValueError(f"invalid batch name {batch!r}")
        base = self._key(batch) + "/"
        files: list[LandingFile] = []
        refused: list[RefusedPath] = []
        for page in self._pages(Prefix=base):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(base) :]
                if not rel or rel.endswith("/"):
                    continue
                uri = f"s3://{self.bucket}/{obj['Key']}"
                # before the control-name rule: '..' starts with '.' and was skipped silently
                if why := _odd_key(rel):
                    refused.append(RefusedPath(batch, rel, uri, why))
                    continue
                if is_control_name(rel):
                    continue
                etag = str(obj.get("ETag", "")).strip('"')
                files.append(
                    LandingFile(batch, rel, uri, int(obj["Size"]), f"{obj['Size']}:{etag}")
                )
        return sorted(files, key=lambda f: f.relpath), refused

    @contextmanager
    def local_file(self, item: LandingFile) -> Iterator[Path]:
        # a private temp name: the key's characters never reach the local file system
        fd, tmp = tempfile.mkstemp(prefix="mm-landing-")
        try:
            with os.fdopen(fd, "wb") as f:
                self.client.download_fileobj(self.bucket, self._key(item.batch, item.relpath), f)
            yield Path(tmp)
        finally:
            os.unlink(tmp)

    def _read_control(self, batch: str, name: str) -> bytes | None:
        key = self._key(batch, name)
        if not self._exists(key):
            return None
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()


def _odd_key(rel: str) -> str | None:
    """Why an S3 key (relative to its batch) is refused: a path that a local copy or a
    person would read differently from what S3 stores."""
    parts = rel.split("/")
    if ".." in parts:
        return "key has a '..' segment: it would point outside the batch"
    if "" in parts or "." in parts:
        return "key has an empty or '.' segment"
    return None


class BatchFolder(Landing):
    """One batch folder (or S3 prefix) outside the landing area, seen under a batch name:
    what `mm ingest PATH --batch NAME` ingests. Ready by being asked for: no marker needed."""

    def __init__(self, parent: Landing, folder: str, batch: str) -> None:
        self.parent = parent
        self.folder = folder
        self.batch = batch

    def _check(self, batch: str) -> None:
        if batch != self.batch:
            raise ValueError(f"this source holds batch {self.batch!r}, not {batch!r}")

    def ready_batches(self) -> list[str]:
        return [self.batch]

    def is_ready(self, batch: str) -> bool:
        self._check(batch)
        return True

    def list_batch(self, batch: str) -> tuple[list[LandingFile], list[RefusedPath]]:
        self._check(batch)
        files, refused = self.parent.list_batch(self.folder)
        return (
            [replace(f, batch=batch) for f in files],
            [replace(r, batch=batch) for r in refused],
        )

    @contextmanager
    def local_file(self, item: LandingFile) -> Iterator[Path]:
        self._check(item.batch)
        with self.parent.local_file(replace(item, batch=self.folder)) as path:
            yield path

    def _read_control(self, batch: str, name: str) -> bytes | None:
        self._check(batch)
        return self.parent._read_control(self.folder, name)


def split_source(uri: str) -> tuple[str, str]:
    """`/data/drop-7` -> (`/data`, `drop-7`); `s3://b/in/drop-7/` -> (`s3://b/in`, `drop-7`)."""
    if uri.startswith("s3://"):
        parent, _, name = uri.rstrip("/").rpartition("/")
        if parent in ("s3:/", "s3:"):
            raise ValueError(f"{uri}: give a prefix inside the bucket (s3://bucket/folder)")
        return parent, name
    path = Path(uri.removeprefix("file://")).expanduser().resolve()
    return str(path.parent), path.name


def open_landing(uri: str, s3_client: Any = None) -> Landing:
    """A landing area: a local folder, or `s3://bucket/prefix` (needs an S3 client)."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if s3_client is None:
            raise ValueError(f"{uri}: an S3 landing needs an S3 client")
        return S3Landing(s3_client, bucket, prefix)
    return LocalLanding(uri)


def open_batch_source(uri: str, batch: str, s3_client: Any = None) -> Landing:
    """The batch folder at `uri` as a landing that holds exactly `batch`."""
    parent, folder = split_source(uri)
    landing = open_landing(parent, s3_client)
    if folder == batch:
        return landing
    return BatchFolder(landing, folder, batch)
