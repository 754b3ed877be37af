"""The landing sensor: a ready batch folder/prefix becomes a `batch` partition and a run."""

import json

import dagster as dg

from mm_pipelines.defs.ingest.jobs import batch_pipeline
from mm_pipelines.defs.partitions import batch_partitions
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
