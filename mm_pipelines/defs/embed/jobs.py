"""Jobs of the embed group's unpartitioned models."""

import dagster as dg

train_clip_job = dg.define_asset_job(
    "train_clip",
    selection=dg.AssetSelection.assets("clip_model"),
    description="(Re)build the CLIP model every batch is embedded with.",
)

train_projector_job = dg.define_asset_job(
    "train_projector",
    selection=dg.AssetSelection.assets("unified_projector"),
    description="(Re)train the unified projector on every embedded batch.",
)
