"""Reading a subject's MLflow record back for a review (the quality notebook): its training
and evaluation runs, registered versions with their aliases, curves and image series.

Works on any state the pipeline can reach: no runs yet, a run that resumed with no new
steps, an evaluation without children (made before they existed), a version without
aliases. Whatever is missing comes back empty, never as an exception."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ADAPTER_ASSET = "lora_adapter"
QUALITY_ASSET = "generation_quality"
PARENT_TAG = "mlflow.parentRunId"
_IMAGE_FILE = re.compile(r"^(?P<key>.+?)[+%]step[+%](?P<step>\d+)[+%].*(?<!compressed)\.png$")


@dataclass
class SubjectRuns:
    adapters: list[Any] = field(default_factory=list)  # oldest first
    evaluations: list[Any] = field(default_factory=list)  # parent runs, oldest first

    @property
    def latest_adapter(self) -> Any | None:
        return self.adapters[-1] if self.adapters else None

    @property
    def latest_evaluation(self) -> Any | None:
        return self.evaluations[-1] if self.evaluations else None


def subject_runs(client: Any, experiment_id: str, subject: str) -> SubjectRuns:
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.subject = '{subject}'", order_by=["start_time ASC"]
    )
    out = SubjectRuns()
    for run in runs:
        tags = run.data.tags
        if tags.get("dagster.asset_key") == ADAPTER_ASSET:
            out.adapters.append(run)
        elif tags.get("dagster.asset_key") == QUALITY_ASSET and PARENT_TAG not in tags:
            out.evaluations.append(run)
    return out


def adapter_rows(runs: list[Any]) -> list[dict[str, Any]]:
    """One row per training run: settings (params), how it went, its quality."""
    rows = []
    for run in runs:
        p, m = run.data.params, run.data.metrics
        rows.append(
            {
                "run_id": run.info.run_id,
                "status": run.info.status,
                "learning_rate": p.get("learning_rate"),
                "steps": p.get("steps"),
                "steps_done": p.get("steps_done"),
                "resumed_from_step": p.get("resumed_from_step"),
                "training_set": p.get("training_set_version"),
                "final_loss": m.get("final_loss"),
                "adapter_fid": m.get("quality_adapter_fid"),
                "base_fid": m.get("quality_base_fid"),
                "fid_ratio_to_base": m.get("quality_fid_ratio_to_base"),
            }
        )
    return rows


def version_rows(client: Any, name: str) -> list[dict[str, Any]]:
    """Registered versions with their gate and aliases (`search_model_versions` leaves
    aliases out; `get_model_version` has them)."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return []
    rows = []
    for v in sorted(found, key=lambda v: int(v.version)):
        full = client.get_model_version(name, v.version)
        tags = full.tags or {}
        rows.append(
            {
                "version": full.version,
                "aliases": ", ".join(sorted(full.aliases or [])),
                "gate": tags.get("mm.quality_gate", ""),
                "failures": tags.get("mm.gate_failures", ""),
                "adapter": tags.get("adapter_version", ""),
                "run_id": full.run_id,
                "evaluation": tags.get("mm.quality_run_id", ""),
            }
        )
    return rows


def history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of a metric, in step order; [] when the run has none."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def validation_key(run: Any) -> str | None:
    """The run's validation metric (`val_<metric>`), from its params or metrics."""
    metric = run.data.params.get("validation_metric")
    if metric:
        return f"val_{metric}"
    return next((k for k in run.data.metrics if k.startswith("val_")), None)


def image_series(client: Any, run_id: str, key: str) -> list[tuple[int, Path]]:
    """The full-size images MLflow logged under `key` (log_image(key=, step=)), as
    (step, local file) in step order; [] when there are none."""
    found = []
    for art in client.list_artifacts(run_id, "images"):
        match = _IMAGE_FILE.match(Path(art.path).name)
        if match and match["key"].replace("~", "/") == key:
            found.append((int(match["step"]), art.path))
    return [(step, Path(client.download_artifacts(run_id, path))) for step, path in sorted(found)]


def evaluation_children(client: Any, parent: Any) -> dict[str, Any]:
    """The base and adapter child runs of an evaluation ({} for an older flat run)."""
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
    )
    return {r.data.tags.get("mm.model_side", r.info.run_name): r for r in runs}


def comparison_rows(children: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric with the base and adapter values side by side."""
    names = sorted({k for run in children.values() for k in run.data.metrics})
    return [
        {"metric": k, **{side: run.data.metrics.get(k) for side, run in sorted(children.items())}}
        for k in names
    ]


def data_uri(path: str | Path) -> str:
    """An image file as a data URI (notebook HTML that needs nothing to fetch)."""
    data = Path(path).read_bytes()
    kind = "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "webp"
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"
