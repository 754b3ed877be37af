"""The index check: approximate search agrees with exact search."""

import dagster as dg

from mm_pipelines.defs.embed.assets import vector_index
from mm_pipelines.defs.partitions import batch_partitions
from mm_pipelines.defs.resources import CatalogResource, services
from mm_pipelines.pipeline import embed


class RecallCheckConfig(dg.Config):
    min_recall_at_10: float = 0.95
    sample_queries: int = 50


@dg.asset_check(
    asset=vector_index,
    partitions_def=batch_partitions,
    blocking=True,
    description="ANN (HNSW) top-10 agrees with exact search on a sample of the batch's vectors.",
)
def ann_recall(
    context: dg.AssetCheckExecutionContext, config: RecallCheckConfig, catalog_db: CatalogResource
) -> dg.AssetCheckResult:
    recalls = embed.index_recall(services(catalog_db), context.partition_key, config.sample_queries)
    worst = min(recalls.values(), default=1.0)
    return dg.AssetCheckResult(
        passed=worst >= config.min_recall_at_10,
        metadata={
            "recall_at_10": worst,
            "by_dim": dg.MetadataValue.json({str(k): round(v, 4) for k, v in recalls.items()}),
            "threshold": config.min_recall_at_10,
        },
    )
