"""`pool="gpu"` really limits: two GPU-pool steps of different runs never overlap when the
pool's limit is 1, and do overlap when it is 2 (so the test can fail).

In Dagster 1.13 op-level pools are enforced by the executor: before a step starts it claims a
slot of its pool in the instance's concurrency table (`InstanceConcurrencyContext`), and the
instance's `concurrency.pools.default_limit` sizes a pool on first use. Two runs launched at
once in two processes against the same (real, sqlite-backed) instance therefore contend
exactly as two run workers launched by the daemon would; the step events' timestamps show
who waited.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from typing import Any

import dagster as dg
import pytest
from dagster._core.instance.ref import InstanceRef

SLEEP_S = 3.0
# The control's steps last longer: how late a run's step starts follows the machine's load
# (1.8 s after a 1 s stagger was seen under a full suite), and the control must still see the
# two steps overlap then.
CONTROL_SLEEP_S = 8.0
step_sleep_s = SLEEP_S  # set in each run worker's process before it materializes
parts = dg.StaticPartitionsDefinition(["p1", "p2"])


@dg.asset(partitions_def=parts, pool="gpu")
def gpu_asset_a() -> None:
    time.sleep(step_sleep_s)


@dg.asset(partitions_def=parts, pool="gpu")
def gpu_asset_b() -> None:
    time.sleep(step_sleep_s)


defs = dg.Definitions(assets=[gpu_asset_a, gpu_asset_b])


def _materialize_child(
    ref: InstanceRef,
    asset_name: str,
    partition: str,
    delay_s: float,
    sleep_s: float,
    barrier: Any,
    results: Any,
) -> None:
    """One run worker: its own process and instance handle, like a launched run."""
    global step_sleep_s
    step_sleep_s = sleep_s
    try:
        with dg.DagsterInstance.from_ref(ref) as instance:
            barrier.wait(timeout=120)  # both processes are imported and ready: go together
            time.sleep(delay_s)
            asset = {"gpu_asset_a": gpu_asset_a, "gpu_asset_b": gpu_asset_b}[asset_name]
            result = dg.materialize([asset], partition_key=partition, instance=instance)
            results.put((asset_name, result.run_id if result.success else "failed"))
    except BaseException as err:  # reported to the test instead of dying silently
        results.put((asset_name, f"error: {err!r}"))


def _run_both_at_once(
    instance: dg.DagsterInstance, stagger_s: float = 0.0, sleep_s: float = SLEEP_S
) -> list[str]:
    """Materialize gpu_asset_a[p1] and gpu_asset_b[p2] as two runs in two processes started
    together (the second `stagger_s` later), each step sleeping `sleep_s`. Not threads:
    Dagster reconfigures `logging` per run, which deadlocks threads."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    launches = (("gpu_asset_a", "p1", 0.0), ("gpu_asset_b", "p2", stagger_s))
    procs = [
        ctx.Process(
            target=_materialize_child,
            args=(instance.get_ref(), name, part, delay, sleep_s, barrier, results),
        )
        for name, part, delay in launches
    ]
    for proc in procs:
        proc.start()
    try:
        outcome = dict(results.get(timeout=180) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    run_ids = list(outcome.values())
    assert all(not r.startswith(("error", "failed")) for r in run_ids), outcome
    return run_ids


def _step_interval(instance: dg.DagsterInstance, run_id: str) -> tuple[float, float]:
    """(STEP_START, STEP_SUCCESS) timestamps of the run's single step."""
    events = instance.all_logs(
        run_id, of_type={dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS}
    )
    stamps = {e.dagster_event.event_type: e.timestamp for e in events}
    return stamps[dg.DagsterEventType.STEP_START], stamps[dg.DagsterEventType.STEP_SUCCESS]


def _overlap_s(a: tuple[float, float], b: tuple[float, float]) -> float:
    return min(a[1], b[1]) - max(a[0], b[0])


def _sqlalchemy_url(conninfo: str) -> str:
    """dagster-postgres wants a psycopg2 URL (its NOTIFY breaks on psycopg 3); the test server
    hands out a libpq conninfo (unix socket)."""
    from psycopg.conninfo import conninfo_to_dict

    c = conninfo_to_dict(conninfo)
    auth = c.get("user", "postgres") + (f":{c['password']}" if c.get("password") else "")
    host = str(c.get("host", ""))
    if host.startswith("/"):
        return f"postgresql+psycopg2://{auth}@/{c['dbname']}?host={host}&port={c.get('port', 5432)}"
    return f"postgresql+psycopg2://{auth}@{host}:{c.get('port', 5432)}/{c['dbname']}"


@pytest.fixture
def pool_instance(request: pytest.FixtureRequest) -> Iterator[dg.DagsterInstance]:
    storage, limit = request.param
    overrides: dict[str, Any] = {"concurrency": {"pools": {"default_limit": limit}}}
    if storage == "postgres":  # production's instance storage (dagster-postgres)
        pytest.importorskip("dagster_postgres")
        url = _sqlalchemy_url(request.getfixturevalue("pg_dsn"))
        overrides["storage"] = {"postgres": {"postgres_url": url}}
    with dg.instance_for_test(overrides=overrides) as instance:
        # Size the pool before the runs, as a deployment does (`dagster instance concurrency
        # set gpu N`, or any earlier GPU step). Why: when two runs are the very first users of
        # a pool, both can size it at once (count-then-insert, no lock) and get a slot each.
        instance.event_log_storage.initialize_concurrency_limit_to_default("gpu")
        yield instance


@pytest.mark.parametrize("pool_instance", [("postgres", 1)], indirect=True)
def test_gpu_pool_of_one_serializes_steps_on_postgres(pool_instance: dg.DagsterInstance) -> None:
    """Production storage (dagster-postgres). Not exact for claims in the same instant:
    its event-log connections are AUTOCOMMIT, so the slot claim's `SELECT ... FOR UPDATE
    SKIP LOCKED` holds its row lock only for that statement, and two claimers can pick the
    same free slot before either UPDATEs it (seen once in this project's full-suite runs, both
    runs released by one barrier). Seconds apart, as run workers start, the second waits."""
    runs = _run_both_at_once(pool_instance, stagger_s=1.0)
    a, b = (_step_interval(pool_instance, r) for r in runs)
    assert _overlap_s(a, b) <= 0, f"GPU steps overlapped: {a} {b}"
    assert b[0] >= a[1] - 0.05  # b waited for a's slot, it did not just start late
    assert pool_instance.event_log_storage.get_concurrency_info("gpu").slot_count == 1


@pytest.mark.parametrize("pool_instance", [("sqlite", 1)], indirect=True)
def test_gpu_pool_of_one_serializes_steps_on_sqlite(pool_instance: dg.DagsterInstance) -> None:
    """The local `dagster dev` storage. The second run starts a second later: on SQLite the
    claim is a plain SELECT then UPDATE (FOR UPDATE is a no-op there), so two claims in the
    same instant can both take the one free slot; seconds apart, the second one waits."""
    runs = _run_both_at_once(pool_instance, stagger_s=1.0)
    a, b = (_step_interval(pool_instance, r) for r in runs)
    assert _overlap_s(a, b) <= 0, f"GPU steps overlapped: {a} {b}"
    assert b[0] >= a[1] - 0.05  # b waited for a's slot, it did not just start late
    assert pool_instance.event_log_storage.get_concurrency_info("gpu").slot_count == 1


@pytest.mark.parametrize("pool_instance", [("sqlite", 2)], indirect=True)
def test_gpu_pool_of_two_lets_steps_overlap(pool_instance: dg.DagsterInstance) -> None:
    """The control: the same runs with room for both run side by side: the second step starts
    while the first still runs (with a pool of one it starts only after the first ends)."""
    runs = _run_both_at_once(pool_instance, stagger_s=1.0, sleep_s=CONTROL_SLEEP_S)
    a, b = (_step_interval(pool_instance, r) for r in runs)
    assert _overlap_s(a, b) > 1.0, f"expected overlap: {a} {b}"
