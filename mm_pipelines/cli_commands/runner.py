"""Running a job of the Definitions in this process, on the persistent local instance (as
the UI would run it), and telling a person what happens while it runs.

Dagster's own console log (a DEBUG line per engine event) is off unless `-vv`; instead a
watcher thread reads the run's events from the instance as they are written and prints a
line per finished step (with a few of its numbers), the `progress:` lines long steps log
(done/total and an estimate), warnings, failures and failed checks. `-v` adds every INFO
message of the steps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from mm_pipelines import settings
from mm_pipelines.pipeline.progress import PREFIX, duration

Echo = Callable[[str], None]

# the numbers worth a glance when a step finishes (metadata keys, in this order)
STEP_NUMBERS: dict[str, tuple[str, ...]] = {
    "raw_media": ("files_seen", "ok", "quarantined", "duplicates"),
    "video_frames": ("videos", "frames"),
    "transcripts": ("sources", "transcribed_now", "segments"),
    "clip_embeddings": ("items", "encoded_now", "already_done"),
    "audio_embeddings": ("items", "encoded_now", "already_done"),
    "unified_embeddings": ("vectors",),
    "vector_index": ("vectors_written", "index_total"),
    "clip_model": ("heldout_recall_at_1", "train_seconds"),
    "unified_projector": ("pairs",),
    "lora_base_model": ("images", "train_seconds"),
    "lora_training_set": ("images",),
    "lora_adapter": ("registered", "reused", "final_loss", "train_seconds"),
    "generated_images": ("images",),
    "generation_quality": ("adapter_fid", "base_fid", "adapter_clip_score"),
    "online_model": ("bundle_version", "reused"),
}


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


def step_numbers(asset: str, metadata: dict[str, Any]) -> str:
    keys = STEP_NUMBERS.get(asset)
    if keys is None:
        keys = tuple(k for k, v in metadata.items() if isinstance(v, int | float))[:3]
    shown = [f"{k.replace('_', ' ')} {_short(metadata[k])}" for k in keys if k in metadata]
    return ", ".join(shown)


class RunWatcher:
    """Polls one run's event records in a thread and echoes what a person wants to see."""

    def __init__(self, instance: Any, run_id: str, echo: Echo, verbosity: int = 0) -> None:
        self.instance, self.run_id, self.echo, self.verbosity = instance, run_id, echo, verbosity
        self._cursor: str | None = None
        self._stop = threading.Event()
        self._started: dict[str, float] = {}
        self._metadata: dict[str, dict[str, Any]] = {}
        self._thread = threading.Thread(target=self._loop, name="run-watcher", daemon=True)

    def __enter__(self) -> RunWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.poll()  # whatever arrived after the last look

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a display hiccup must not stop the run
                continue

    def poll(self) -> None:
        while True:
            conn = self.instance.get_records_for_run(self.run_id, cursor=self._cursor, limit=200)
            for record in conn.records:
                self._show(record.event_log_entry)
            self._cursor = conn.cursor
            if not conn.has_more:
                return

    def _show(self, entry: Any) -> None:
        event = entry.dagster_event
        if event is None:
            self._message(entry)
            return
        kind = event.event_type_value
        step = entry.step_key or ""
        if kind == "STEP_START":
            self._started[step] = entry.timestamp
            if self.verbosity:
                self.echo(f"  {step} ...")
        elif kind == "ASSET_MATERIALIZATION":
            mat = event.event_specific_data.materialization
            self._metadata[step] = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
        elif kind == "STEP_SUCCESS":
            if step not in self._metadata:
                return  # an asset check's own step: its verdict is the check line
            took = entry.timestamp - self._started.get(step, entry.timestamp)
            numbers = step_numbers(step, self._metadata.get(step, {}))
            self.echo(f"  ✓ {step} ({duration(took)}){': ' + numbers if numbers else ''}")
        elif kind == "STEP_FAILURE":
            error = event.event_specific_data.error
            why = (error.message if error else entry.user_message).strip().splitlines()
            self.echo(f"  ✗ {step} failed: {why[0] if why else 'see the run log'}")
        elif kind == "STEP_UP_FOR_RETRY":
            self.echo(f"  ↻ {step} will be retried: {entry.user_message.splitlines()[0]}")
        elif kind == "ASSET_CHECK_EVALUATION":
            data = event.event_specific_data
            if not data.passed or self.verbosity:
                verdict = "passed" if data.passed else "FAILED"
                self.echo(f"    check {data.check_name}: {verdict}")

    def _message(self, entry: Any) -> None:
        import logging

        text = entry.user_message or ""
        if text.startswith(PREFIX):
            self.echo(f"    {text[len(PREFIX) :]}")
        elif entry.level >= logging.WARNING:
            self.echo(f"    warning ({entry.step_key or 'run'}): {text.splitlines()[0]}")
        elif self.verbosity and entry.level >= logging.INFO:
            self.echo(f"    {entry.step_key or 'run'}: {text}")


def run_job(
    job: str,
    partition: str | None = None,
    assets: list[str] | None = None,
    run_config: dict | None = None,
    *,
    echo: Echo | None = None,
    verbosity: int = 0,
) -> dict:
    """Run a job (optionally a subset of its assets) on the persistent local instance;
    return its metadata, check results and failures. With `echo`, report while it runs.
    Dead runs of earlier `mm` processes are recovered first (their pool slots freed); an
    interrupted run raises KeyboardInterrupt once it has stopped."""
    import socket

    import dagster as dg
    from dagster._core.utils import make_new_run_id

    settings.prepare_dagster_home()
    from mm_pipelines.defs import make_definitions
    from mm_pipelines.defs.common import was_interrupted
    from mm_pipelines.defs.partitions import check_partition_key
    from mm_pipelines.defs.recovery import HOST_TAG, recover_dead_runs

    instance = dg.DagsterInstance.get()
    recover_dead_runs(
        instance, _tracker_or_none(), log=lambda line: print(f"mm: {line}", flush=True)
    )
    job_def = make_definitions().resolve_job_def(job)  # resources from the settings now
    pdef = job_def.partitions_def
    if (
        partition
        and isinstance(pdef, dg.DynamicPartitionsDefinition)
        and not instance.has_dynamic_partition(pdef.name, partition)
    ):
        check_partition_key(pdef.name, partition)
        instance.add_dynamic_partitions(pdef.name, [partition])
    config = dict(run_config or {})
    if echo is not None:  # the watcher reports; Dagster's DEBUG stream only with -vv
        level = "DEBUG" if verbosity >= 2 else "CRITICAL"
        config.setdefault("loggers", {"console": {"config": {"log_level": level}}})
    run_id = make_new_run_id()
    started = time.monotonic()
    watcher = RunWatcher(instance, run_id, echo, verbosity) if echo is not None else None
    if watcher is not None:
        watcher.__enter__()
    try:
        result = job_def.execute_in_process(
            partition_key=partition,
            instance=instance,
            raise_on_error=False,
            asset_selection=[dg.AssetKey(a) for a in assets] if assets else None,
            run_config=config or None,
            run_id=run_id,
            tags={HOST_TAG: socket.gethostname()},  # lets a later `mm` judge if it died
        )
    finally:
        if watcher is not None:
            watcher.__exit__(None, None, None)
    if was_interrupted(result.all_events):
        raise KeyboardInterrupt(f"run {result.run_id} of {job} was interrupted and stopped")
    metadata: dict = {}
    for event in result.get_asset_materialization_events():
        mat = event.materialization
        metadata[mat.asset_key.to_user_string()] = {k: v.value for k, v in mat.metadata.items()}
    checks = {
        e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data.passed
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }
    failures = [e.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    step_seconds = {
        e.step_key: round(e.event_specific_data.duration_ms / 1000, 2)
        for e in result.all_events
        if e.event_type_value == "STEP_SUCCESS"
    }
    return {
        "success": result.success,
        "run_id": result.run_id,
        "assets": metadata,
        "checks": checks,
        "failures": failures,
        "step_seconds": step_seconds,
        "seconds": round(time.monotonic() - started, 1),
    }


def _tracker_or_none() -> Any:
    """The MLflow tracker, to close runs a dead run left RUNNING (None: not configured)."""
    from mm_pipelines.pipeline.services import Services

    try:
        return Services.from_settings().tracker
    except Exception:  # noqa: BLE001 - recovery must not depend on it
        return None
