"""The demo model asset: trained, evaluated, logged to MLflow and registered."""

import dagster as dg
import mlflow

from mm_pipelines.defs.embed.assets import clip_model
from mm_pipelines.defs.resources import ComputeResource, MLflowResource, ModelsResource


def test_clip_model_is_trained_tracked_and_registered(tmp_path):
    tracking = MLflowResource(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifact_root=(tmp_path / "artifacts").as_uri(),
    )
    models = ModelsResource(models_dir=str(tmp_path / "models"))
    result = dg.materialize(
        [clip_model],
        resources={
            "models": models,
            "compute": ComputeResource(device="cpu"),
            "mlflow_tracking": tracking,
        },
        run_config={"ops": {"clip_model": {"config": {"steps": 30}}}},
    )
    meta = result.asset_materializations_for_node("clip_model")[0].metadata
    assert models.demo_clip_path().is_file()
    assert meta["model_version"].value.startswith("mm-tiny-clip@sha256:")
    assert 0.0 <= meta["heldout_recall_at_1"].value <= 1.0
    client = mlflow.MlflowClient(tracking.tracking_uri)
    (version,) = client.search_model_versions("name = 'mm-clip'")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.params["steps"] == "30"
    assert version.tags["model_version"] == meta["model_version"].value
    assert client.list_artifacts(run.info.run_id, "clip")
