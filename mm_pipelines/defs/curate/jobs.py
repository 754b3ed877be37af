"""The curate group's unpartitioned job."""

import dagster as dg

train_content_heads_job = dg.define_asset_job(
    "train_content_heads",
    selection=dg.AssetSelection.assets("content_heads"),
    description="(Re)train the scoring heads from the catalog's labelled items.",
)
