"""`raw_media`: one landing batch, validated, content-addressed and catalogued."""

import time

import dagster as dg

from mm_pipelines.defs.common import RETRY, no_retry_on_bad_input
from mm_pipelines.defs.metadata import markdown_gallery
from mm_pipelines.defs.partitions import batch_partitions, check_partition_key
from mm_pipelines.defs.resources import (
    CatalogResource,
    ComputeResource,
    LandingResource,
    MediaStoreResource,
)
from mm_pipelines.pipeline.ingest import IngestReport, ingest_batch
from mm_pipelines.pipeline.probe import Limits
from mm_pipelines.storage.media_store import MediaStore

_DEFAULT_LIMITS = Limits()


class RawMediaConfig(dg.Config):
    tenant: str = ""  # empty: the tenant `mm ingest` registered, else "default"
    force: bool = False  # ingest a batch without its _READY marker (it may be incomplete)
    max_bytes: int = _DEFAULT_LIMITS.max_bytes
    max_pixels: int = _DEFAULT_LIMITS.max_pixels
    max_video_pixels: int = _DEFAULT_LIMITS.max_video_pixels
    max_duration_s: float = _DEFAULT_LIMITS.max_duration_s
    max_text_bytes: int = _DEFAULT_LIMITS.max_text_bytes
    silence_dbfs: float = _DEFAULT_LIMITS.silence_dbfs

    def limits(self) -> Limits:
        return Limits(
            self.max_bytes,
            self.max_pixels,
            self.max_video_pixels,
            self.max_duration_s,
            self.max_text_bytes,
            self.silence_dbfs,
        )


@dg.asset(
    partitions_def=batch_partitions,
    group_name="ingest",
    kinds={"python", "postgres"},
    retry_policy=RETRY,
    description="Validated, content-addressed media of one landing batch, one catalog row "
    "per source file (ok, or quarantined with an error category).",
)
def raw_media(
    context: dg.AssetExecutionContext,
    config: RawMediaConfig,
    catalog_db: CatalogResource,
    media_store: MediaStoreResource,
    landing: LandingResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    batch = context.partition_key
    store = media_store.get_store()
    last_log = [0.0]

    def progress(done: int, total: int, nbytes: int) -> None:
        if time.monotonic() - last_log[0] > 5 or done == total:
            last_log[0] = time.monotonic()
            context.log.info(f"{batch}: {done}/{total} files, {nbytes / 1e6:.1f} MB read")

    with no_retry_on_bad_input():  # bad names, no _READY, a full store: fail once
        _drop_invalid_partition(context, batch)
        source, registered_tenant = landing.for_batch(batch, catalog_db.get_dsn())
        report = ingest_batch(
            source,
            batch,
            store,
            catalog_db.get_dsn(),
            limits=config.limits(),
            tenant=config.tenant or registered_tenant or "default",
            workers=compute.io_workers,
            progress=progress,
            require_ready=not config.force,
        )
    context.log.info(f"ingested batch {batch}: {report.summary()}")
    return dg.MaterializeResult(metadata=_metadata(report, store))


def _drop_invalid_partition(context: dg.AssetExecutionContext, batch: str) -> None:
    """A batch name the landing area refuses (added by hand in the UI) is removed from the
    partitions, then refused."""
    try:
        check_partition_key(batch_partitions.name, batch)
    except ValueError:
        context.instance.delete_dynamic_partition(batch_partitions.name, batch)
        raise


def _metadata(report: IngestReport, store: MediaStore) -> dict[str, object]:
    summary = report.summary()
    quarantined = [r for r in report.rows if r.status != "ok"]
    table = "\n".join(
        f"| `{r.source_uri.rsplit('/', 1)[-1]}` | {r.error_category} | {r.error_message} |"
        for r in quarantined
    )
    images = [r for r in report.rows if r.status == "ok" and r.modality == "image"][:6]
    gallery = markdown_gallery(
        [
            (r.caption or r.source_uri.rsplit("/", 1)[-1], store.read_bytes(r.content_hash))
            for r in images
        ]
    )
    return {
        "files_seen": report.files_seen,
        "ok": report.ok,
        "quarantined": report.quarantined,
        "duplicates": report.duplicates,
        "dedup_ratio": dg.FloatMetadataValue(
            round(report.unique_objects / report.ok, 3) if report.ok else 1.0
        ),
        "bytes": report.bytes_total,
        "new_objects_stored": report.new_objects,
        "unchanged_files_skipped": report.reused_rows,
        "landing_digest": report.landing_digest,
        "seconds": dg.FloatMetadataValue(summary["seconds"]),
        "by_modality": dg.MetadataValue.json(summary["by_modality"]),
        "quarantined_by_reason": dg.MetadataValue.json(summary["quarantined_by_reason"]),
        "quarantined_files": dg.MetadataValue.md(
            "| file | reason | message |\n|---|---|---|\n" + table if table else "none"
        ),
        "thumbnails": dg.MetadataValue.md(gallery or "no images"),
    }
