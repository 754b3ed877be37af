"""The serving sensor: a newly approved LoRA version is exported once."""

import json

import dagster as dg

from mm_pipelines.defs import automation
from mm_pipelines.defs.resources import MLflowResource
from mm_pipelines.defs.serve.jobs import export_online_model_job


@dg.sensor(
    job=export_online_model_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Polls the MLflow registry: a LoRA version that passed its quality gates "
    "(alias `candidate`) and was never exported (no `mm.bundle_version` tag, whoever ran "
    "the export) is exported and published once (run key per version).",
)
def serving_sensor(context: dg.SensorEvaluationContext, mlflow_tracking: MLflowResource):
    # cursor: "name/version" -> last_updated of every version already requested
    requested = json.loads(context.cursor) if context.cursor else {}
    try:
        pending = automation.exports_needed(context.instance, mlflow_tracking.client())
    except Exception as err:  # noqa: BLE001 - MLflow down must not break the daemon
        context.log.warning(f"MLflow registry unreachable, retrying next tick: {err}")
        return dg.SkipReason(f"MLflow registry unreachable: {type(err).__name__}: {err}"[:500])
    new = [c for c in pending if c.key not in requested]
    if not new:
        return dg.SkipReason("no approved model version waiting to be exported")
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
