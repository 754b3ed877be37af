"""Dead runs: a run whose process was killed (kill -9, the OOM killer, a lost machine)
stays STARTED and keeps its concurrency slots, so with the `gpu` pool of 1 every later GPU
step waits forever ("Step blocked by limit for pool gpu"). Marking it failed does not free
the slots; only `free_concurrency_slots_for_run` does.

`recover_dead_runs` finds runs in progress whose process is gone (or runs that ended but
still hold slots), marks them failed, frees their slots, closes the MLflow runs they left
RUNNING and logs one line each. It runs where runs start: `mm` (cli.run_job) before each
run, and `dead_run_sensor` where a Dagster daemon runs. Runs launched into pods or
containers (run launchers that can check their workers' health, such as the
K8sRunLauncher) are the daemon's run monitoring's (dagster.yaml `run_monitoring`); this
module judges only processes of this machine.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

import dagster as dg
import psutil
from dagster._core.storage.dagster_run import RunsFilter

from mm_pipelines.defs.resources import MLflowResource
from mm_pipelines.pipeline.tracking import Tracker

_log = logging.getLogger(__name__)

HOST_TAG = "mm/host"  # set by cli.run_job: the machine whose process runs the run
IN_PROGRESS = [
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


@dataclass(frozen=True)
class Recovered:
    run_id: str
    job: str
    reason: str
    pools: tuple[str, ...]  # pools it held slots of
    mlflow_runs_closed: int = 0


def recover_dead_runs(
    instance: dg.DagsterInstance,
    tracker: Tracker | None = None,
    log: Callable[[str], None] = _log.warning,
) -> list[Recovered]:
    """Fail and free every run of this machine whose process is gone; return them."""
    storage = instance.event_log_storage
    slots = storage.supports_global_concurrency_limits
    holders = _slot_holders(instance) if slots else {}
    runs = {r.run_id: r for r in instance.get_runs(filters=RunsFilter(statuses=IN_PROGRESS))}
    for run_id in set(holders) - set(runs):
        run = instance.get_run_by_id(run_id)
        if run is not None:
            runs[run_id] = run
    recovered = []
    for run in runs.values():
        if run.is_finished:
            reason = f"ended {run.status.value} but still held concurrency slots"
        else:
            pid = _run_pid(instance, run)
            if pid is None or not _judged_here(instance, run) or _alive(instance, run, pid):
                continue
            reason = f"its process (pid {pid}) is gone: killed, or out of memory"
            instance.report_run_failed(run, f"Run marked failed by mm: {reason}.")
        if slots:
            storage.free_concurrency_slots_for_run(run.run_id)
        closed = _close_mlflow_runs(tracker, run.run_id, log)
        pools = tuple(sorted(holders.get(run.run_id, ())))
        held = f", freed its slots of pool(s) {', '.join(pools)}" if pools else ""
        log(f"dead run {run.run_id} ({run.job_name}): {reason}; marked failed{held}")
        recovered.append(Recovered(run.run_id, run.job_name, reason, pools, closed))
    return recovered


def _slot_holders(instance: dg.DagsterInstance) -> dict[str, set[str]]:
    """run id -> pools of which it holds (or waits for) a slot."""
    storage = instance.event_log_storage
    holders: dict[str, set[str]] = {run_id: set() for run_id in storage.get_concurrency_run_ids()}
    for pool in storage.get_concurrency_keys():
        for slot in storage.get_concurrency_info(pool).claimed_slots:
            holders.setdefault(slot.run_id, set()).add(pool)
    return holders


def _run_pid(instance: dg.DagsterInstance, run: dg.DagsterRun) -> int | None:
    """The process that executes the run: the first engine event that names a pid (the
    run worker's "Started process for run", or "Executing steps in process")."""
    records = instance.get_records_for_run(
        run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT, limit=20
    ).records
    for record in records:
        event = record.event_log_entry.dagster_event
        data = event.engine_event_data if event else None
        pid = data.metadata.get("pid") if data else None
        if pid is not None and str(pid.value).isdigit():
            return int(pid.value)
    return None


def _judged_here(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    """Whether the run's process would be on this machine."""
    host = run.tags.get(HOST_TAG)
    if host is not None:
        return host == socket.gethostname()
    # launchers that start workers elsewhere can check their health: the daemon's job
    return not instance.run_launcher.supports_check_run_worker_health


def _alive(instance: dg.DagsterInstance, run: dg.DagsterRun, pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        started = proc.create_time()
    except psutil.NoSuchProcess:
        return False
    record = instance.get_run_record_by_id(run.run_id)
    begun = record.start_time if record is not None else None
    # a pid reused by a process born after the run started is not the run's
    return begun is None or started <= begun + 1.0


def _close_mlflow_runs(tracker: Tracker | None, run_id: str, log: Callable[[str], None]) -> int:
    if tracker is None:
        return 0
    try:
        return len(tracker.close_running({"dagster.run_id": run_id}))
    except Exception as err:  # tracking down must not keep the pool wedged
        log(f"could not close the MLflow runs of dead run {run_id}: {err}")
        return 0


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Finds runs whose process died (kill -9, out of memory) and would keep their "
    "`gpu` pool slot forever: marks them failed, frees their slots, closes their MLflow runs.",
)
def dead_run_sensor(
    context: dg.SensorEvaluationContext, mlflow_tracking: MLflowResource
) -> dg.SkipReason:
    recovered = recover_dead_runs(context.instance, mlflow_tracking.get_tracker(), context.log.info)
    if not recovered:
        return dg.SkipReason("no dead run")
    return dg.SkipReason("recovered dead runs: " + ", ".join(r.run_id for r in recovered))
