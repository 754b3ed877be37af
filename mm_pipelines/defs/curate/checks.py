"""The curate group's check: the share of a batch's items its tenants' policies flag."""

import dagster as dg

from mm_pipelines.defs.curate.assets import content_scores
from mm_pipelines.defs.partitions import batch_partitions
from mm_pipelines.defs.resources import CatalogResource, services
from mm_pipelines.pipeline.curate import scores


class FlaggedShareConfig(dg.Config):
    max_flagged_share: float = 0.25


@dg.asset_check(
    asset=content_scores,
    partitions_def=batch_partitions,
    description="The share of the batch's items flagged by the curation policy is at most the "
    "threshold, and a safety head scored the batch (a warning: flagged items are already "
    "out of search and training sets).",
)
def flagged_share(
    context: dg.AssetCheckExecutionContext, config: FlaggedShareConfig, catalog_db: CatalogResource
) -> dg.AssetCheckResult:
    share = scores.flagged_share(services(catalog_db), context.partition_key)
    return dg.AssetCheckResult(
        passed=share.scored and share.share <= config.max_flagged_share,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "flagged_share": round(share.share, 4),
            "flagged": share.flagged,
            "items": share.items,
            "by_score": dg.MetadataValue.json(share.by_score),
            "safety_scored": share.scored,
            "threshold": config.max_flagged_share,
        },
    )
