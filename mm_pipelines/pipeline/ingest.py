"""Ingest one landing batch: list, hash, probe, store once, catalogue every source.

A bad file becomes a quarantined row with a reason; it never stops the batch. Files whose
fingerprint (size + mtime, or ETag) and probe version are unchanged since the last run of
the batch are not read again, which makes a re-run of an unchanged batch cheap.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace

from mm_pipelines.pipeline.probe import PROBE_VERSION, Limits, Quarantine, probe
from mm_pipelines.storage import catalog
from mm_pipelines.storage.catalog import ObjectRow, SourceRow
from mm_pipelines.storage.landing import MANIFEST, Landing, LandingFile, ManifestEntry
from mm_pipelines.storage.media_store import MediaStore, sha256_file
from mm_pipelines.storage.postgres import connect

_log = logging.getLogger(__name__)


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
) -> IngestReport:
    started = time.perf_counter()
    limits = limits or Limits()
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
            report.rows.append(replace(old, tenant=entry.tenant or tenant, caption=entry.caption))
            report.reused_rows += 1
        else:
            todo.append(item)

    done = len(report.rows)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(_ingest_one, landing, item, store, limits): item for item in todo}
        for future in as_completed(futures):
            item = futures[future]
            entry = manifest.get(item.relpath, ManifestEntry())
            source, obj, stored = future.result()
            report.rows.append(
                replace(source, tenant=entry.tenant or tenant, caption=entry.caption)
            )
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
    try:
        return landing.manifest(batch), None
    except (ValueError, UnicodeDecodeError) as err:
        _log.warning("ignoring the manifest of batch %s: %s", batch, err)
        return {}, _refused_row(
            batch, MANIFEST, f"manifest ignored: {err}", "default", "bad_manifest"
        )


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
    """Hash, probe and store one file. Never raises: failures become quarantined rows."""
    content_hash: str | None = None
    try:
        with landing.local_file(item) as path:
            content_hash = sha256_file(path)
            found = probe(path, item.relpath, limits)
            stored = store.put_file(path, content_hash)
    except Quarantine as q:
        return _quarantined(item, content_hash, q.category, q.message), None, False
    except PermissionError as err:
        return _quarantined(item, content_hash, "path_refused", str(err)), None, False
    except Exception as err:  # one bad file must not take the batch down
        _log.exception("unexpected error ingesting %s", item.uri)
        return _quarantined(item, content_hash, "internal_error", repr(err)), None, False
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


def _quarantined(
    item: LandingFile, content_hash: str | None, category: str, message: str
) -> SourceRow:
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
        item.fingerprint,
        PROBE_VERSION,
    )
