"""The subjects sensor and the nightly quality review."""

import json

import dagster as dg

from mm_pipelines.defs import automation
from mm_pipelines.defs.generative.jobs import reevaluate_quality_job, subject_pipeline
from mm_pipelines.defs.partitions import subject_partitions
from mm_pipelines.pipeline import subjects


@dg.sensor(
    job=subject_pipeline,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches the subjects file (MM_SUBJECTS): a new subject becomes a `subject` "
    "partition, and a subject whose declaration differs from the one its last training set "
    "was built from gets one run of subject_pipeline (runs launched by mm demo or the UI "
    "count).",
)
def subjects_sensor(context: dg.SensorEvaluationContext):
    # cursor: subject name -> fingerprint of the declaration last requested
    requested = json.loads(context.cursor) if context.cursor else {}
    try:
        declared = subjects.load_subjects()
    except subjects.SubjectConfigError as err:
        return dg.SkipReason(f"subjects file not usable: {err}")
    states = automation.subject_states(
        context.instance, {n: s.fingerprint() for n, s in declared.items()}
    )
    changed = {
        s.name: s.fingerprint
        for s in states
        if s.needs_run and requested.get(s.name) != s.fingerprint
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
