"""Sensors and schedules: landing batches, subjects, approved models, nightly re-evaluation."""

import contextlib
import json
import os
from collections.abc import Iterator

import dagster as dg

from mm_pipelines.defs.jobs import (
    batch_pipeline,
    export_online_model_job,
    reevaluate_quality_job,
    subject_pipeline,
)
from mm_pipelines.defs.partitions import batch_partitions, subject_partitions
from mm_pipelines.defs.resources import LandingResource, MLflowResource
from mm_pipelines.pipeline import subjects


@dg.sensor(
    job=batch_pipeline,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches the landing area; a batch folder/prefix with a _READY marker "
    "becomes a new `batch` partition and a run of batch_pipeline.",
)
def landing_sensor(context: dg.SensorEvaluationContext, landing: LandingResource):
    # the cursor is the set of batches already requested: a batch is requested once, ever
    seen = set(json.loads(context.cursor)) if context.cursor else set()
    new = [b for b in landing.get_landing().ready_batches() if b not in seen]
    if not new:
        return dg.SkipReason(f"no new ready batch ({len(seen)} already requested)")
    known = set(context.instance.get_dynamic_partitions(batch_partitions.name))
    to_add = [b for b in new if b not in known]
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=b, run_key=f"landing:{b}") for b in new],
        dynamic_partitions_requests=[batch_partitions.build_add_request(to_add)] if to_add else [],
        cursor=json.dumps(sorted(seen | set(new))),
    )


@dg.sensor(
    job=subject_pipeline,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches the subjects file (MM_SUBJECTS): a new subject becomes a `subject` "
    "partition, and a new or changed subject gets one run of subject_pipeline.",
)
def subjects_sensor(context: dg.SensorEvaluationContext):
    # cursor: subject name -> fingerprint of the declaration last requested
    requested = json.loads(context.cursor) if context.cursor else {}
    try:
        declared = subjects.load_subjects()
    except subjects.SubjectConfigError as err:
        return dg.SkipReason(f"subjects file not usable: {err}")
    changed = {
        n: s.fingerprint() for n, s in declared.items() if requested.get(n) != s.fingerprint()
    }
    if not changed:
        return dg.SkipReason(f"no new or changed subject ({len(declared)} declared)")
    known = set(context.instance.get_dynamic_partitions(subject_partitions.name))
    to_add = sorted(set(changed) - known)
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(partition_key=n, run_key=f"subject:{n}:{fp}") for n, fp in changed.items()
        ],
        dynamic_partitions_requests=[subject_partitions.build_add_request(to_add)]
        if to_add
        else [],
        cursor=json.dumps({**requested, **changed}, sort_keys=True),
    )


@contextlib.contextmanager
def _quick_mlflow_failures() -> Iterator[None]:
    """MLflow's HTTP client retries with backoff for minutes by default; a sensor tick
    should fail fast and try again next tick instead."""
    saved = {
        k: os.environ.get(k)
        for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    }
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dg.sensor(
    job=export_online_model_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Polls the MLflow registry: a LoRA version that passed its quality gates "
    "(alias `candidate`) is exported and published once (run key per version).",
)
def serving_sensor(context: dg.SensorEvaluationContext, mlflow_tracking: MLflowResource):
    from mm_pipelines.pipeline import registry

    # cursor: "name/version" -> last_updated of every version already requested
    requested = json.loads(context.cursor) if context.cursor else {}
    try:
        with _quick_mlflow_failures():
            approved = registry.approved_candidates(mlflow_tracking.client())
    except Exception as err:  # noqa: BLE001 - MLflow down must not break the daemon
        context.log.warning(f"MLflow registry unreachable, retrying next tick: {err}")
        return dg.SkipReason(f"MLflow registry unreachable: {type(err).__name__}: {err}"[:500])
    new = [c for c in approved if c.key not in requested]
    if not new:
        return dg.SkipReason(f"no newly approved model version ({len(requested)} exported)")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"export:{c.key}",
                run_config={
                    "ops": {
                        "online_model": {
                            "config": {"lora_model": c.name, "lora_version": c.version}
                        }
                    }
                },
                tags={"mm/model": c.name, "mm/version": c.version},
            )
            for c in new
        ],
        cursor=json.dumps({**requested, **{c.key: c.last_updated_ms for c in new}}, sort_keys=True),
    )


@dg.schedule(
    job=reevaluate_quality_job,
    cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Nightly at 03:00: re-score every subject's current adapter against its "
    "references and re-apply the gates (a version that stops passing loses `candidate`). "
    "Off by default: turn it on in the UI (Automation) or `dagster schedule start`.",
)
def nightly_quality_review(context: dg.ScheduleEvaluationContext):
    subjects_now = context.instance.get_dynamic_partitions(subject_partitions.name)
    day = context.scheduled_execution_time.strftime("%Y-%m-%d")
    return [dg.RunRequest(partition_key=s, run_key=f"nightly:{day}:{s}") for s in subjects_now]
