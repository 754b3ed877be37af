"""Our MLflow resource opens one run per asset partition and always closes it."""

import dagster as dg
import mlflow
import pytest

from mm_pipelines.defs.resources import MLflowResource

parts = dg.StaticPartitionsDefinition(["p1"])


@pytest.fixture
def tracking(tmp_path) -> MLflowResource:
    return MLflowResource(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifact_root=(tmp_path / "artifacts").as_uri(),
        experiment="test",
        ui_url="http://mlflow.example:5000",
    )


@dg.asset(partitions_def=parts)
def tracked(
    context: dg.AssetExecutionContext, mlflow_tracking: MLflowResource
) -> dg.MaterializeResult:
    with mlflow_tracking.start_run(context) as run:
        mlflow.log_metric("answer", 42)
        if context.run.tags.get("fail") == "yes":
            raise RuntimeError("boom")
    return dg.MaterializeResult(
        metadata={"mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_url(run))}
    )


def runs(tracking: MLflowResource):
    client = mlflow.MlflowClient(tracking.tracking_uri)
    exp = client.get_experiment_by_name("test")
    return client.search_runs([exp.experiment_id])


def test_run_is_finished_tagged_and_linked(tracking):
    result = dg.materialize([tracked], partition_key="p1", resources={"mlflow_tracking": tracking})
    (run,) = runs(tracking)
    assert run.info.status == "FINISHED" and run.data.metrics["answer"] == 42
    assert run.data.tags["dagster.partition"] == "p1"
    assert run.data.tags["dagster.run_id"] == result.run_id
    url = result.asset_materializations_for_node("tracked")[0].metadata["mlflow_run"].value
    assert url.startswith("http://mlflow.example:5000/#/experiments/") and run.info.run_id in url


def test_run_is_marked_failed_when_the_asset_raises(tracking):
    result = dg.materialize(
        [tracked],
        partition_key="p1",
        resources={"mlflow_tracking": tracking},
        tags={"fail": "yes"},
        raise_on_error=False,
    )
    assert not result.success
    (run,) = runs(tracking)
    assert run.info.status == "FAILED"
    assert mlflow.active_run() is None


def test_experiments_under_the_servers_artifact_proxy_get_a_hostless_location(tmp_path):
    """MM_MLFLOW_ARTIFACTS=mlflow-artifacts:/ (upload through the tracking server): the
    experiment's location must not read as a host ("mlflow-artifacts://name"), which the
    server refuses."""
    from mm_pipelines.pipeline.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "mlflow-artifacts:/", "exp")
    experiment = mlflow.MlflowClient(tracker.tracking_uri).get_experiment(tracker.setup())
    assert experiment.artifact_location == "mlflow-artifacts:/exp"
