"""Ingest one landing batch: list, hash, probe, store once, catalogue every source.

A bad file becomes a quarantined row with a reason; it never stops the batch. Files whose
fingerprint (size + mtime, or ETag) and probe version are unchanged since the last run of
the batch are not read again, which makes a re-run of an unchanged batch cheap.

A failure of our own infrastructure (full or read-only store, S3 or landing unreachable)
is not a file's fault: it raises `InfrastructureError`, and nothing of the batch is
recorded, so the re-run after the fix ingests every file.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

from mm_pipelines.pipeline.faults import InfrastructureError, classify
from mm_pipelines.pipeline.probe import PROBE_VERSION, Limits, Quarantine, probe
from mm_pipelines.storage import catalog
from mm_pipelines.storage.catalog import ObjectRow, SourceRow
from mm_pipelines.storage.landing import (
    MANIFEST,
    READY_MARKER,
    Landing,
    LandingFile,
    ManifestEntry,
)
from mm_pipelines.storage.media_store import MediaStore, sha256_file
from mm_pipelines.storage.postgres import connect
from mm_pipelines.storage.text import storable_text_problem

_log = logging.getLogger(__name__)


class BatchNotReady(ValueError):
    """The batch has no `_READY` marker and ingestion was not forced."""


@dataclass
class IngestReport:
    batch: str
    rows: list[SourceRow]
    new_objects: int = 0
    reused_rows: int = 0
    bytes_read: int = 0
    elapsed_s: float = 0.0
    landing_digest: str = ""  # what the batch held when listed (Landing.digest)
    by_modality: Counter = field(default_factory=Counter)
    quarantined_by_reason: Counter = field(default_factory=Counter)

    @property
    def files_seen(self) -> int:
        return len(self.rows)

    @property
    def ok(self) -> int:
        return sum(r.status == "ok" for r in self.rows)

    @property
    def quarantined(self) -> int:
        return self.files_seen - self.ok

    @property
    def unique_objects(self) -> int:
        return len({r.content_hash for r in self.rows if r.status == "ok"})

    @property
    def duplicates(self) -> int:
        """Ok sources whose content another source of the batch also has."""
        return self.ok - self.unique_objects

    @property
    def bytes_total(self) -> int:
        return sum(r.size_bytes or 0 for r in self.rows)

    def summary(self) -> dict[str, object]:
        return {
            "batch": self.batch,
            "files_seen": self.files_seen,
            "ok": self.ok,
            "quarantined": self.quarantined,
            "quarantined_by_reason": dict(sorted(self.quarantined_by_reason.items())),
            "by_modality": dict(sorted(self.by_modality.items())),
            "duplicates": self.duplicates,
            "unique_objects": self.unique_objects,
            "new_objects_stored": self.new_objects,
            "unchanged_files_skipped": self.reused_rows,
            "bytes": self.bytes_total,
            "seconds": round(self.elapsed_s, 3),
            "landing_digest": self.landing_digest,
        }


ProgressFn = Callable[[int, int, int], None]  # files done, files total, bytes read


def ingest_batch(
    landing: Landing,
    batch: str,
    store: MediaStore,
    dsn: str,
    *,
    limits: Limits | None = None,
    tenant: str = "default",
    workers: int = 4,
    progress: ProgressFn | None = None,
    require_ready: bool = False,
) -> IngestReport:
    """`require_ready`: refuse a batch without its `_READY` marker (it may still be
    uploading): what a materialization does unless forced."""
    started = time.perf_counter()
    limits = limits or Limits()
    if problem := storable_text_problem(tenant):
        raise ValueError(f"the default tenant {tenant!r} {problem}")
    if require_ready and not landing.is_ready(batch):
        raise BatchNotReady(
            f"batch {batch!r} has no {READY_MARKER} marker: it may still be uploading. Add the "
            f"marker when it is complete, or force the ingestion (raw_media config force: true)"
        )
    files, refused = landing.list_batch(batch)
    manifest, manifest_error = _read_manifest(landing, batch)
    with connect(dsn) as conn:
        previous = catalog.previous_sources(conn, batch)

    report = IngestReport(batch, rows=[], landing_digest=landing.digest(batch, (files, refused)))
    objects: dict[str, ObjectRow] = {}
    todo: list[LandingFile] = []
    for item in files:
        entry = manifest.get(item.relpath, ManifestEntry())
        old = previous.get(item.uri)
        if _unchanged(old, item) and (old.status != "ok" or store.exists(old.content_hash)):
            report.rows.append(_with_manifest(old, entry, tenant))
            report.reused_rows += 1
        else:
            todo.append(item)

    done = len(report.rows)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(_ingest_one, landing, item, store, limits): item for item in todo}
        for future in as_completed(futures):
            item = futures[future]
            entry = manifest.get(item.relpath, ManifestEntry())
            try:
                source, obj, stored = future.result()
            except InfrastructureError as err:
                pool.shutdown(wait=True, cancel_futures=True)  # the rest would fail alike
                raise InfrastructureError(
                    f"batch {batch!r} not ingested, nothing recorded: {err}. Fix it and "
                    "re-run: every file is picked up again",
                    retriable=err.retriable,
                ) from err
            report.rows.append(_with_manifest(source, entry, tenant))
            report.bytes_read += item.size
            if obj is not None:
                objects[obj.content_hash] = obj
                report.new_objects += stored
            done += 1
            if progress is not None:
                progress(done, len(files), report.bytes_read)

    report.rows.extend(_refused_row(r.batch, r.uri, r.reason, tenant) for r in refused)
    if manifest_error:
        report.rows.append(manifest_error)
    report.rows.sort(key=lambda r: r.source_uri)
    for row in report.rows:
        if row.status == "ok":
            report.by_modality[row.modality] += 1
        else:
            report.quarantined_by_reason[row.error_category] += 1

    with connect(dsn) as conn:
        catalog.replace_batch(conn, batch, report.rows, objects.values())
    report.elapsed_s = time.perf_counter() - started
    return report


def _with_manifest(row: SourceRow, entry: ManifestEntry, tenant: str) -> SourceRow:
    return replace(row, tenant=entry.tenant or tenant, caption=entry.caption, labels=entry.labels)


def _unchanged(old: SourceRow | None, item: LandingFile) -> bool:
    return (
        old is not None
        and old.fingerprint == item.fingerprint
        and old.probe_version == PROBE_VERSION
        and old.content_hash is not None
    )


def _read_manifest(
    landing: Landing, batch: str
) -> tuple[dict[str, ManifestEntry], SourceRow | None]:
    """The manifest's good lines; its bad lines (or an unreadable manifest) become one
    `bad_manifest` row naming each of them."""
    try:
        entries, problems = landing.read_manifest(batch)
    except (ValueError, UnicodeDecodeError) as err:
        entries, problems = {}, [f"manifest ignored: {err}"]
    if not problems:
        return entries, None
    message = "; ".join(problems)
    _log.warning("manifest of batch %s: %s", batch, message)
    return entries, _refused_row(batch, MANIFEST, message, "default", "bad_manifest")


def _refused_row(
    batch: str, uri: str, reason: str, tenant: str, category: str = "path_refused"
) -> SourceRow:
    return SourceRow(
        batch,
        uri,
        tenant,
        None,
        "quarantined",
        category,
        reason,
        None,
        None,
        None,
        None,
        None,
        None,
        PROBE_VERSION,
    )


def _ingest_one(
    landing: Landing, item: LandingFile, store: MediaStore, limits: Limits
) -> tuple[SourceRow, ObjectRow | None, bool]:
    """Hash, probe and store one file. A file's failure becomes a quarantined row; a
    failure of ours (store, landing, disk) raises InfrastructureError."""
    content_hash: str | None = None
    try:
        with landing.local_file(item) as path:
            content_hash = sha256_file(path)
            found = probe(path, item.relpath, limits)
            stored = _store(store, path, content_hash, item)
    except InfrastructureError:
        raise
    except Quarantine as q:
        return _quarantined(item, content_hash, q.category, q.message), None, False
    except PermissionError as err:  # the landing file is unreadable to us: re-tried each run
        return _quarantined(item, content_hash, "path_refused", str(err), False), None, False
    except Exception as err:  # one bad file must not take the batch down
        infra = classify(err, f"reading {item.uri} from the landing area")
        if infra is not None:
            raise infra from err
        _log.exception("unexpected error ingesting %s", item.uri)
        # no fingerprint: a bug of ours is not remembered as the file's fault
        return _quarantined(item, content_hash, "internal_error", repr(err), False), None, False
    source = SourceRow(
        item.batch,
        item.uri,
        "",
        content_hash,
        "ok",
        None,
        None,
        found.note,
        found.modality,
        found.mime,
        item.size,
        None,
        item.fingerprint,
        PROBE_VERSION,
    )
    obj = ObjectRow(
        content_hash,
        found.modality,
        found.mime,
        item.size,
        found.width,
        found.height,
        found.duration_s,
        found.fps,
        found.has_audio,
        found.text_encoding,
        store.uri(content_hash),
        PROBE_VERSION,
    )
    return source, obj, stored


def _store(store: MediaStore, path: Path, content_hash: str, item: LandingFile) -> bool:
    """Put one object; any failure here is the store's, never the file's."""
    try:
        return store.put_file(path, content_hash)
    except Exception as err:
        where = f"the media store {store.location} could not take {item.relpath}"
        infra = classify(err, where)
        raise infra or InfrastructureError(f"{where}: {err!r}", retriable=True) from err


def _quarantined(
    item: LandingFile,
    content_hash: str | None,
    category: str,
    message: str,
    remember: bool = True,
) -> SourceRow:
    """`remember`: keep the fingerprint so an unchanged file is not read again; False for
    reasons that are not the content's (a re-run examines the file again)."""
    return SourceRow(
        item.batch,
        item.uri,
        "",
        content_hash,
        "quarantined",
        category,
        message,
        None,
        None,
        None,
        item.size,
        None,
        item.fingerprint if remember else None,
        PROBE_VERSION,
    )
