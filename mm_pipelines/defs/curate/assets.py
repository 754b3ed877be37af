"""The curate group: near-duplicates, scoring heads and content scores, captions.

What these assets write decides what is searchable (flagged items and non-kept
near-duplicates leave search results) and what a LoRA learns from (training-set selection
honours all three; see pipeline/curate/)."""

import dagster as dg

from mm_pipelines.defs.common import GPU_STEP, RETRY, no_retry_on_bad_input
from mm_pipelines.defs.curate.resources import CurationResource
from mm_pipelines.defs.metadata import markdown_gallery
from mm_pipelines.defs.partitions import batch_partitions
from mm_pipelines.defs.resources import (
    CatalogResource,
    ComputeResource,
    MediaStoreResource,
    MLflowResource,
    ModelsResource,
    services,
)
from mm_pipelines.pipeline.curate import captions as curate_captions
from mm_pipelines.pipeline.curate import dedup, scores


class NearDuplicatesConfig(dg.Config):
    clip_threshold: float = dedup.DedupConfig.clip_threshold
    phash_max_distance: int = dedup.DedupConfig.phash_max_distance
    colour_max_distance: float = dedup.DedupConfig.colour_max_distance
    neighbours: int = dedup.DedupConfig.neighbours


@dg.asset(
    partitions_def=batch_partitions,
    deps=["vector_index"],
    group_name="curate",
    kinds={"postgres"},
    retry_policy=RETRY,
    description="Near-duplicates of the batch's images and frames across the tenant's whole "
    "catalog: perceptual hash (near-exact copies) and CLIP vectors through the HNSW index "
    "(semantic duplicates); keep-one per group (largest, then oldest).",
)
def near_duplicates(
    context: dg.AssetExecutionContext,
    config: NearDuplicatesConfig,
    catalog_db: CatalogResource,
    media_store: MediaStoreResource,
) -> dg.MaterializeResult:
    cfg = dedup.DedupConfig(**config.model_dump())
    with no_retry_on_bad_input():
        result = dedup.find_near_duplicates(
            services(catalog_db, media_store), context.partition_key, cfg, log=context.log.info
        )
    rows = "\n\n".join(markdown_gallery(g, max_px=64) for g in result.galleries)
    return dg.MaterializeResult(
        metadata={
            "pictures": result.pictures,
            "checked_now": result.checked_now,
            "already_checked": result.already_checked,
            "phashes_computed": result.phashes_computed,
            "pairs_found": dg.MetadataValue.json(result.pairs_found),
            "groups_with_batch_images": result.groups_in_batch,
            "hidden_in_batch": result.hidden_in_batch,
            "method_versions": dg.MetadataValue.json(result.method_versions),
            "duplicate_groups": dg.MetadataValue.md(rows or "no near-duplicates"),
        }
    )


@dg.asset(
    deps=["clip_embeddings"],
    group_name="curate",
    kinds={"pytorch", "mlflow"},
    description="Scoring heads (unsafe, aesthetic on image vectors; text_unsafe on text "
    "vectors) trained on catalog items labelled in their manifest; MLflow run, registered "
    "as `mm-content-heads`. Configured weight files (MM_SAFETY_HEAD, ...) take precedence.",
)
def content_heads(
    context: dg.AssetExecutionContext,
    catalog_db: CatalogResource,
    models: ModelsResource,
    compute: ComputeResource,
    mlflow_tracking: MLflowResource,
) -> dg.MaterializeResult:
    svc = services(catalog_db, models=models, compute=compute, mlflow_tracking=mlflow_tracking)
    with no_retry_on_bad_input():
        result = scores.train_content_heads(
            svc, mlflow_tracking.run_spec(context), log=context.log.info
        )
    return dg.MaterializeResult(
        metadata={
            "heads": dg.MetadataValue.json(result.heads),
            "skipped": dg.MetadataValue.json(result.skipped),
            "encoder_version": result.encoder_version,
            "store_version": result.store_version,
            "registered_version": result.registered_version,
            "mlflow_run": dg.MetadataValue.url(result.run_url),
        }
    )


@dg.asset(
    partitions_def=batch_partitions,
    deps=["clip_embeddings", content_heads],
    group_name="curate",
    kinds={"pytorch", "postgres"},
    retry_policy=RETRY,
    description="Aesthetic and safety scores of the batch's images, frames, captions, "
    "document chunks and transcript segments; the tenant's policy flags items (they stay "
    "in the catalog with the reason and leave search results and training sets).",
)
def content_scores(
    context: dg.AssetExecutionContext,
    catalog_db: CatalogResource,
    models: ModelsResource,
    compute: ComputeResource,
    curation: CurationResource,
) -> dg.MaterializeResult:
    svc = services(catalog_db, models=models, compute=compute)
    with no_retry_on_bad_input():
        result = scores.score_batch(
            svc, curation.get_choice(), context.partition_key, log=context.log.info
        )
    flagged = [
        {"tenant": t, "content_hash": h, "reasons": reasons}
        for (t, h), reasons in result.flagged_items.items()
    ]
    return dg.MaterializeResult(
        metadata={
            "heads": dg.MetadataValue.json(result.heads),
            "missing_heads": dg.MetadataValue.json(result.missing_heads),
            "scored_now": dg.MetadataValue.json(result.scored_now),
            "already_scored": result.already_scored,
            "items": result.items,
            "flagged": len(flagged),
            "flagged_share": round(result.flagged_share, 4),
            "flagged_items": dg.MetadataValue.json(flagged[:50]),
        }
    )


@dg.asset(
    partitions_def=batch_partitions,
    deps=["clip_embeddings"],
    group_name="curate",
    kinds={"pytorch", "postgres"},
    retry_policy=RETRY,
    **GPU_STEP,
    description="A caption for every image and frame: the manifest's (always wins) and a "
    "model's with its version and confidence (MM_CAPTIONER, a transformers image-to-text "
    "model; else a CLIP zero-shot tagger over a vocabulary).",
)
def captions(
    context: dg.AssetExecutionContext,
    catalog_db: CatalogResource,
    media_store: MediaStoreResource,
    models: ModelsResource,
    compute: ComputeResource,
    curation: CurationResource,
) -> dg.MaterializeResult:
    svc = services(catalog_db, media_store, models, compute)
    with no_retry_on_bad_input():
        result = curate_captions.caption_batch(
            svc, curation.get_choice(), context.partition_key, log=context.log.info
        )
    metadata = {k: v for k, v in vars(result).items() if k != "samples" and v is not None}
    metadata["samples"] = dg.MetadataValue.md(
        "\n".join(f"- `{h[:10]}` {c} ({p:.2f})" for h, c, p in result.samples) or "none"
    )
    return dg.MaterializeResult(metadata=metadata)
