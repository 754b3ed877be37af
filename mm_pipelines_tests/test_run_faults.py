"""Runs under faults: a killed run never wedges the `gpu` pool, Ctrl-C and SIGTERM stop a
run instead of becoming a retry (its MLflow run closed KILLED), an unreachable MLflow
fails within seconds naming it, and raw_media refuses what it must not retry.

The runs that get killed or interrupted are real Dagster runs in their own process (spawned,
like a run worker) on a real sqlite instance shared with the test."""

import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import mlflow
import pytest
from dagster._core.instance.ref import InstanceRef

from mm_pipelines.defs.common import GPU_STEP, RETRY, no_retry_on_bad_input, stop_on_interrupt
from mm_pipelines.defs.recovery import dead_run_sensor, recover_dead_runs
from mm_pipelines.defs.resources import MLflowResource
from mm_pipelines.pipeline.tracking import RunSpec, Tracker, TrackingUnavailable
from mm_pipelines_tests.ports import free_port

TRACKING_EXPERIMENT = "faults"


def _tracking(root: Path) -> MLflowResource:
    return MLflowResource(
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        artifact_root=(root / "mlartifacts").as_uri(),
        experiment=TRACKING_EXPERIMENT,
    )


def _mark(context: dg.AssetExecutionContext) -> None:
    """Tell the test that the step's body is running (it waits for this file)."""
    Path(context.run.tags["marker"]).write_text(str(os.getpid()))


@dg.asset(pool=GPU_STEP["pool"], retry_policy=RETRY)
def gpu_hog(context: dg.AssetExecutionContext, mlflow_tracking: MLflowResource) -> None:
    """Holds the only gpu slot until it is killed; opens an MLflow run like a trainer."""
    with stop_on_interrupt(), mlflow_tracking.start_run(context):
        _mark(context)
        time.sleep(600)


@dg.asset(pool=GPU_STEP["pool"])
def gpu_after() -> None:
    """The next step of the pool."""


@dg.asset(retry_policy=dg.RetryPolicy(max_retries=2, delay=1))
def interruptible(context: dg.AssetExecutionContext, mlflow_tracking: MLflowResource) -> None:
    with no_retry_on_bad_input(), mlflow_tracking.start_run(context):
        _mark(context)
        for _ in range(600):
            time.sleep(0.1)


@dg.asset(deps=[interruptible])
def downstream() -> None:
    """Must never run after an interrupt."""


@dg.asset
def later() -> None:
    """Needs nothing of the interrupted step and comes after it in the run's order: an
    interrupted run must not go on with it."""


ROOT_VAR = "MM_FAULT_TEST_ROOT"  # how a step process of the run worker finds the test's files


def interrupt_job() -> dg.JobDefinition:
    """The interruptible assets as a job of a run worker: the multiprocess executor runs
    each step in a process of its own, as `dagster dev` and the daemon do."""
    defs = dg.Definitions(
        assets=[interruptible, downstream, later],
        jobs=[dg.define_asset_job("interrupt_job")],
        resources={"mlflow_tracking": _tracking(Path(os.environ[ROOT_VAR]))},
        executor=dg.multiprocess_executor,
    )
    return defs.resolve_job_def("interrupt_job")


def _child(ref: InstanceRef, asset: str, marker: str, root: str) -> None:
    """One run: its own process and instance handle, as a launched run. `run_worker`:
    through the multiprocess executor; otherwise in-process, as `mm` runs jobs."""
    assets = {"gpu_hog": [gpu_hog], "interruptible": [interruptible, downstream, later]}
    with dg.DagsterInstance.from_ref(ref) as instance:
        if asset == "run_worker":
            os.environ[ROOT_VAR] = root
            dg.execute_job(
                dg.reconstructable(interrupt_job),
                instance=instance,
                tags={"marker": marker},
                raise_on_error=False,
            )
            return
        dg.materialize(
            assets[asset],
            instance=instance,
            resources={"mlflow_tracking": _tracking(Path(root))},
            tags={"marker": marker},
            raise_on_error=False,
        )


@pytest.fixture(scope="module")
def mlflow_root(tmp_path_factory) -> Path:
    """One MLflow store for the module (a fresh sqlite store costs seconds of migrations)."""
    return tmp_path_factory.mktemp("run_faults")


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    """A persistent sqlite instance (children open it by reference) with a gpu pool of 1."""
    with dg.instance_for_test(overrides={"concurrency": {"pools": {"default_limit": 1}}}) as inst:
        inst.event_log_storage.initialize_concurrency_limit_to_default("gpu")
        yield inst


def _start(instance: dg.DagsterInstance, asset: str, root: Path) -> tuple[Any, str]:
    marker = root / f"{asset}-{time.monotonic_ns()}.started"
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_child, args=(instance.get_ref(), asset, str(marker), str(root)))
    proc.start()
    deadline = time.monotonic() + 600  # a run worker imports, then a step process does
    while not marker.exists():
        assert proc.is_alive(), f"the {asset} run died before its step started"
        assert time.monotonic() < deadline, f"the {asset} step never started"
        time.sleep(0.1)
    (run,) = instance.get_runs(limit=1)
    return proc, run.run_id


def _mlflow_statuses(root: Path, run_id: str) -> list[str]:
    """Statuses of the MLflow runs the Dagster run `run_id` opened."""
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(TRACKING_EXPERIMENT)
    found = client.search_runs([exp.experiment_id], f"tags.`dagster.run_id` = '{run_id}'")
    return [r.info.status for r in found]


def _events(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [e.dagster_event.event_type_value for e in instance.all_logs(run_id) if e.dagster_event]


# --------------------------------------------------------------------------- a killed run


def test_a_killed_run_no_longer_holds_the_gpu_pool(instance, mlflow_root):
    proc, run_id = _start(instance, "gpu_hog", mlflow_root)
    assert recover_dead_runs(instance) == []  # alive: left alone
    os.kill(proc.pid, signal.SIGKILL)  # as the OOM killer would
    proc.join(30)
    info = instance.event_log_storage.get_concurrency_info("gpu")
    assert info.claimed_slots and info.claimed_slots[0].run_id == run_id  # wedged
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED
    # a tick of the sensor, as the daemon runs it (`mm` calls the same recover_dead_runs)
    ctx = dg.build_sensor_context(
        instance=instance, resources={"mlflow_tracking": _tracking(mlflow_root)}
    )
    tick = dead_run_sensor(ctx)
    assert isinstance(tick, dg.SkipReason) and run_id in tick.skip_message
    assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots == []
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
    assert _mlflow_statuses(mlflow_root, run_id) == ["KILLED"]  # not RUNNING forever
    after = dg.materialize([gpu_after], instance=instance)  # would wait forever before
    assert after.success


def test_recovery_says_which_run_and_pool_it_freed(instance):
    """What `mm` prints before a run (and the sensor logs): one line per run freed; here a
    run that ended but whose worker was killed before it gave its slot back."""
    storage = instance.event_log_storage
    run_id = dg.materialize([gpu_after], instance=instance).run_id
    storage.claim_concurrency_slot("gpu", run_id, "gpu_after")  # never given back
    lines: list[str] = []
    freed = recover_dead_runs(instance, log=lines.append)
    assert [r.run_id for r in freed] == [run_id] and freed[0].pools == ("gpu",)
    assert len(lines) == 1 and run_id in lines[0] and "pool(s) gpu" in lines[0]
    assert storage.get_concurrency_info("gpu").claimed_slots == []


# --------------------------------------------------------------------------- interrupts


@pytest.mark.parametrize(
    ("sig", "how"),
    [(signal.SIGINT, "interruptible"), (signal.SIGTERM, "run_worker")],
    ids=["SIGINT-in-process", "SIGTERM-run-worker"],
)
def test_an_interrupt_stops_the_run_instead_of_retrying(instance, mlflow_root, sig, how):
    proc, run_id = _start(instance, how, mlflow_root)
    os.kill(proc.pid, sig)
    proc.join(120)
    events = _events(instance, run_id)
    assert "STEP_UP_FOR_RETRY" not in events and "STEP_RESTARTED" not in events
    succeeded = {
        e.step_key for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)
    }
    assert "downstream" not in succeeded
    if how == "interruptible":  # in-process the run also stops before `later`
        assert succeeded == set()  # (a run worker may have run it alongside)
    assert instance.get_run_by_id(run_id).status in (
        dg.DagsterRunStatus.FAILURE,
        dg.DagsterRunStatus.CANCELED,
    )
    assert _mlflow_statuses(mlflow_root, run_id) == ["KILLED"]


def test_every_retried_asset_stops_on_an_interrupt():
    """RetryPolicy turns an interrupt into a retry: each retried asset's body must be in a
    guard that turns it into a failure that is not retried."""
    import inspect

    from mm_pipelines.defs import defs

    graph = defs.resolve_asset_graph()
    retried = [
        node.assets_def for node in graph.asset_nodes if node.assets_def.op.retry_policy is not None
    ]
    assert retried
    for asset in retried:
        source = inspect.getsource(asset.op.compute_fn.decorated_fn)
        assert "no_retry_on_bad_input()" in source or "stop_on_interrupt()" in source, asset.key


# --------------------------------------------------------------------------- MLflow down


@pytest.mark.parametrize(
    "uri",
    [f"http://127.0.0.1:{free_port()}", "http://10.255.255.1:5000"],
    ids=["refused", "unroutable"],
)
def test_an_unreachable_mlflow_fails_within_seconds_naming_it(uri):
    started = time.monotonic()
    with (
        pytest.raises(TrackingUnavailable, match=uri.replace(".", r"\.")),
        Tracker(uri).run(RunSpec("never")),
    ):
        pass
    assert time.monotonic() - started < 30  # MLflow's own retries took 4.5 minutes


# --------------------------------------------------------------------------- raw_media


def _raw_media(instance: dg.DagsterInstance, root: Path, batch: str, dsn: str, **config: Any):
    from dagster_aws.s3 import S3Resource

    from mm_pipelines.defs.ingest.assets import raw_media
    from mm_pipelines.defs.partitions import batch_partitions
    from mm_pipelines.defs.resources import (
        CatalogResource,
        ComputeResource,
        LandingResource,
        MediaStoreResource,
    )

    s3 = S3Resource()
    instance.add_dynamic_partitions(batch_partitions.name, [batch])
    return dg.materialize(
        [raw_media],
        partition_key=batch,
        instance=instance,
        resources={
            "catalog_db": CatalogResource(dsn=dsn),
            "landing": LandingResource(uri=str(root / "landing"), s3=s3),
            "media_store": MediaStoreResource(local_dir=str(root / "media"), s3=s3),
            "compute": ComputeResource(io_workers=2),
        },
        run_config={"ops": {"raw_media": {"config": config}}} if config else None,
        raise_on_error=False,
    )


def _failure_message(result: dg.ExecuteInProcessResult) -> str:
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return failure.step_failure_data.user_failure_data.description or ""


def test_a_batch_without_its_ready_marker_is_refused_unless_forced(instance, tmp_path, pg_dsn):
    from mm_pipelines_tests import bad_media

    batch = tmp_path / "landing" / "uploading"
    batch.mkdir(parents=True)
    (batch / "a.png").write_bytes(bad_media.png_bytes())
    refused = _raw_media(instance, tmp_path, "uploading", pg_dsn)
    assert not refused.success
    assert "no _READY marker" in _failure_message(refused)
    assert "STEP_UP_FOR_RETRY" not in _events(instance, refused.run_id)
    forced = _raw_media(instance, tmp_path, "uploading", pg_dsn, force=True)
    assert forced.success


def test_an_invalid_batch_name_fails_once_and_is_no_partition(instance, tmp_path, pg_dsn):
    from mm_pipelines.defs.partitions import batch_partitions

    result = _raw_media(instance, tmp_path, "no such/batch!", pg_dsn)
    assert not result.success
    assert "invalid batch name" in _failure_message(result)
    assert "STEP_UP_FOR_RETRY" not in _events(instance, result.run_id)
    assert "no such/batch!" not in instance.get_dynamic_partitions(batch_partitions.name)
