"""The serving sensor over real MLflow registry states, and the champion bookkeeping."""

from __future__ import annotations

import json

import dagster as dg
import mlflow
import pytest

from mm_pipelines.defs.resources import MLflowResource
from mm_pipelines.defs.serve.sensors import serving_sensor
from mm_pipelines.pipeline import registry
from mm_pipelines_tests.ports import free_port

NAME = "mm-lora-acme"


@pytest.fixture
def tracking(tmp_path) -> MLflowResource:
    return MLflowResource(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifact_root=(tmp_path / "artifacts").as_uri(),
    )


def new_version(client: mlflow.MlflowClient, gate: str | None, candidate: bool) -> str:
    """A registered LoRA version as the quality gates leave it."""
    if not client.search_registered_models(filter_string=f"name = '{NAME}'"):
        client.create_registered_model(NAME)
    with mlflow.start_run() as run:
        mlflow.log_dict({"adapter": True}, "adapter/weights.json")
    mv = client.create_model_version(NAME, f"{run.info.artifact_uri}/adapter", run.info.run_id)
    if gate is not None:
        client.set_model_version_tag(NAME, mv.version, registry.GATE_TAG, gate)
    if candidate:
        client.set_registered_model_alias(NAME, registry.CANDIDATE, mv.version)
    return str(mv.version)


def tick(tracking: MLflowResource, cursor: str | None):
    with (
        dg.instance_for_test() as instance,
        dg.build_sensor_context(
            instance=instance, cursor=cursor, resources={"mlflow_tracking": tracking}
        ) as ctx,
    ):
        return serving_sensor(ctx)


def test_the_sensor_exports_each_approved_version_exactly_once(tracking):
    client = tracking.client()
    mlflow.set_experiment(tracking.experiment)
    assert isinstance(tick(tracking, None), dg.SkipReason)  # nothing registered

    new_version(client, gate="failed", candidate=False)  # registered, not approved
    assert isinstance(tick(tracking, None), dg.SkipReason)

    v2 = new_version(client, gate="passed", candidate=True)
    first = tick(tracking, None)
    (request,) = first.run_requests
    assert request.run_key == f"export:{NAME}/{v2}"
    assert request.run_config["ops"]["online_model"]["config"] == {
        "lora_model": NAME,
        "lora_version": v2,
    }
    assert isinstance(tick(tracking, first.cursor), dg.SkipReason)  # the same version again

    v3 = new_version(client, gate="passed", candidate=True)
    second = tick(tracking, first.cursor)
    assert [r.run_key for r in second.run_requests] == [f"export:{NAME}/{v3}"]
    assert set(json.loads(second.cursor)) == {f"{NAME}/{v2}", f"{NAME}/{v3}"}


def test_mlflow_down_is_a_skipped_tick_and_the_cursor_is_kept():
    down = MLflowResource(tracking_uri=f"http://127.0.0.1:{free_port()}")
    result = tick(down, '{"mm-lora-acme/1": 1}')
    assert isinstance(result, dg.SkipReason)
    assert "MLflow registry unreachable" in result.skip_message


def test_promotion_moves_champion_and_records_when_the_old_one_was_replaced(tracking):
    client = tracking.client()
    mlflow.set_experiment(tracking.experiment)
    v1 = new_version(client, gate="passed", candidate=True)
    v2 = new_version(client, gate="passed", candidate=True)
    assert registry.promote(client, NAME, v1, "bundle-1") is None
    assert registry.promote(client, NAME, v2, "bundle-2") == v1
    assert registry.champion(client, NAME) == v2
    old = client.get_model_version(NAME, v1)
    assert old.tags["mm.replaced_by"] == v2 and old.tags["mm.replaced_at"]
    assert client.get_model_version(NAME, v2).tags["mm.bundle_version"] == "bundle-2"
    # rollback is the same call with the old version
    assert registry.promote(client, NAME, v1, "bundle-1") == v2
    assert registry.champion(client, NAME) == v1


def test_only_versions_that_passed_their_gates_can_be_exported(tracking):
    client = tracking.client()
    mlflow.set_experiment(tracking.experiment)
    failed = new_version(client, gate="failed", candidate=False)
    with pytest.raises(ValueError, match="has not passed its quality gates"):
        registry.get_candidate(client, NAME, failed)
