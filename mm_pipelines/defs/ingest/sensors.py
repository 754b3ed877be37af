"""The landing sensor: a ready batch whose content was never ingested (or changed since)
becomes a `batch` partition and a run."""

import json

import dagster as dg

from mm_pipelines.defs import automation
from mm_pipelines.defs.ingest.jobs import batch_pipeline
from mm_pipelines.defs.partitions import batch_partitions
from mm_pipelines.defs.resources import LandingResource


@dg.sensor(
    job=batch_pipeline,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches the landing area; a batch folder/prefix with a _READY marker whose "
    "files were never ingested, or changed since the last raw_media of its partition, gets "
    "a `batch` partition and one run of batch_pipeline. Runs launched elsewhere (mm demo, "
    "mm ingest, the UI) count: done work is never requested again.",
)
def landing_sensor(context: dg.SensorEvaluationContext, landing: LandingResource):
    # cursor: batch -> landing digest last requested (a failed run is not retried by itself)
    requested = json.loads(context.cursor) if context.cursor else {}
    if not isinstance(requested, dict):  # the list of an earlier version: start afresh
        requested = {}
    states = automation.landing_states(context.instance, landing.get_landing())
    new = [s for s in states if s.needs_run and requested.get(s.batch) != s.digest]
    if not new:
        done = sum(s.state == "done" for s in states)
        return dg.SkipReason(f"no new or changed ready batch ({done}/{len(states)} up to date)")
    known = set(context.instance.get_dynamic_partitions(batch_partitions.name))
    to_add = [s.batch for s in new if s.batch not in known]
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(partition_key=s.batch, run_key=f"landing:{s.batch}:{s.digest[7:23]}")
            for s in new
        ],
        dynamic_partitions_requests=[batch_partitions.build_add_request(to_add)] if to_add else [],
        cursor=json.dumps({**requested, **{s.batch: s.digest for s in new}}, sort_keys=True),
    )
