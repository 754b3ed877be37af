"""Checks of `raw_media`: the quarantine rate (a warning) and that every stored object is
intact (blocking)."""

import dagster as dg

from mm_pipelines.defs.ingest.assets import raw_media
from mm_pipelines.defs.partitions import batch_partitions
from mm_pipelines.defs.resources import CatalogResource, MediaStoreResource
from mm_pipelines.storage import catalog


class QuarantineRateConfig(dg.Config):
    max_quarantine_rate: float = 0.25


@dg.asset_check(
    asset=raw_media,
    partitions_def=batch_partitions,
    description="The share of quarantined files in the batch is at most the threshold.",
)
def quarantine_rate(
    context: dg.AssetCheckExecutionContext,
    config: QuarantineRateConfig,
    catalog_db: CatalogResource,
) -> dg.AssetCheckResult:
    with catalog_db.connect() as conn:
        rows = catalog.batch_catalog(conn, context.partition_key)
    bad = sum(r["status"] != "ok" for r in rows)
    rate = bad / len(rows) if rows else 0.0
    return dg.AssetCheckResult(
        passed=rate <= config.max_quarantine_rate,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "quarantine_rate": round(rate, 4),
            "files": len(rows),
            "quarantined": bad,
            "threshold": config.max_quarantine_rate,
        },
    )


@dg.asset_check(
    asset=raw_media,
    partitions_def=batch_partitions,
    blocking=True,
    description="Every ok row's object exists in the media store and hashes to its key.",
)
def objects_intact(
    context: dg.AssetCheckExecutionContext,
    catalog_db: CatalogResource,
    media_store: MediaStoreResource,
) -> dg.AssetCheckResult:
    store = media_store.get_store()
    with catalog_db.connect() as conn:
        objects = catalog.ok_objects(conn, context.partition_key)
    problems = {h: reason for h, _, _ in objects if (reason := store.verify(h))}
    return dg.AssetCheckResult(
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "objects_checked": len(objects),
            "problems": len(problems),
            "first_problems": dg.MetadataValue.json(dict(list(problems.items())[:20])),
        },
    )
