"""The export job (the serving sensor runs it)."""

import dagster as dg

export_online_model_job = dg.define_asset_job(
    "export_online_model",
    selection=dg.AssetSelection.assets("online_model"),
    description="Export an approved LoRA version (with CLIP and projector) as the online "
    "serving bundle (the serving sensor runs this).",
)
