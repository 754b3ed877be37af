"""The landing sensor: a complete new batch becomes a `batch` partition and one run."""

import json

import dagster as dg

from mm_pipelines import subjects
from mm_pipelines.defs.jobs import batch_pipeline, subject_pipeline
from mm_pipelines.defs.partitions import batch_partitions, subject_partitions
from mm_pipelines.defs.resources import LandingResource


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
