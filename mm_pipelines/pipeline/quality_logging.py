"""The MLflow record of a quality evaluation: one parent run per evaluation with a child
run per model (base, adapter) carrying the same metric names, so MLflow's "compare runs"
puts them side by side; sample sizes and settings as params; per-image scores as an
evaluation table; the adapter's metrics linked to its logged model and the reference
dataset; and links from the adapter's run and registered version to the evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mm_pipelines.pipeline import model_store as ms
from mm_pipelines.pipeline import review_logging as review
from mm_pipelines.pipeline import subjects
from mm_pipelines.pipeline.review_images import Labelled, comparison_sheet, labelled_grid
from mm_pipelines.pipeline.services import Services
from mm_pipelines.pipeline.tracking import RunSpec

# numbers that are results (MLflow metrics); the rest of a side's report are sample sizes
# and settings (MLflow params)
RESULT_KEYS = ("clip_score", "fid", "kid_mean", "kid_std")
SIDES = ("base", "adapter")
COMPARISONS = ("fid_ratio_to_base", "kid_ratio_to_base", "clip_score_delta")
COMPARISON_FILE = "base_vs_adapter.png"


@dataclass
class Logged:
    parent_run_id: str
    run_url: str
    compare_url: str
    comparison_url: str  # the labelled base | adapter sheet, served by the MLflow UI


def side_metrics(report: dict[str, Any], side: str) -> dict[str, float]:
    """A child run's metrics: the same names for base and adapter (MLflow's compare view)."""
    intervals = report["intervals"]
    values = {k: float(report[side][k]) for k in RESULT_KEYS}
    for name, key in (("clip_score", "clip_score"), ("fid", "fid"), ("kid", "kid")):
        interval = intervals[f"{side}_{key}"]
        values[f"{name}_ci_low"], values[f"{name}_ci_high"] = interval["low"], interval["high"]
    return values


def parent_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The comparison numbers, each with its interval."""
    values = {}
    for key in COMPARISONS:
        interval = report["intervals"][key]
        values[key] = float(report[key])
        values[f"{key}_ci_low"], values[f"{key}_ci_high"] = interval["low"], interval["high"]
    return values


def log_evaluation(
    svc: Services,
    run: RunSpec,
    subject: subjects.Subject,
    record: Any,
    ts: Any,
    report: dict[str, Any],
    evidence: Any,
    pairs: tuple[list[Labelled], list[Labelled]],
    hashes: dict[tuple[str, int], str],
) -> Logged:
    """Log the evaluation; `pairs` = (base, adapter) images in the same (prompt, seed) order."""
    base, adapted = pairs
    tracker = svc.need_tracker()
    store = svc.need_models()
    model_id = record.params.get("logged_model_id")
    sizes, boot = report["sample_sizes"], report["bootstrap"]
    spec = run.with_tags(
        subject=subject.name,
        **{
            "mm.adapter_run_id": str(record.mlflow_run_id),
            "mm.registered_model": str(record.registered_model),
            "mm.registered_version": str(record.registered_version),
        },
    )
    children: dict[str, str] = {}
    with tracker.run(spec) as parent:
        parent.params(
            {
                "score_prompt": report["score_prompt"],
                "feature_extractor": report["adapter"]["feature_extractor"],
                "num_features": report["adapter"]["num_features"],
                "adapter_version": record.adapter_version,
                **sizes,
                **{f"bootstrap_{k}": v for k, v in boot.items()},
            }
        )
        if model_id:
            parent.used_model(model_id)
        review.log_dataset(parent, store, ms.TRAINING_SET, subject.name, ts, "reference")
        scores = {"adapter": evidence.adapter_clip, "base": evidence.base_clip}
        for side, images in (("base", base), ("adapter", adapted)):
            child_spec = RunSpec(side, {**spec.tags, "mm.model_side": side})
            with parent.child(child_spec) as child:
                side_report = report[side]
                child.params(
                    {
                        "model": side,
                        **{k: v for k, v in side_report.items() if k not in RESULT_KEYS},
                    }
                )
                dataset = review.log_dataset(
                    child, store, ms.TRAINING_SET, subject.name, ts, "reference"
                )
                is_adapter = side == "adapter" and model_id
                child.metrics(
                    side_metrics(report, side),
                    model_id=model_id if is_adapter else None,
                    dataset=dataset if is_adapter else None,
                )
                child.table(
                    {
                        "prompt": [i.prompt for i in images],
                        "seed": [i.seed for i in images],
                        "clip_score": scores[side],
                        "content_hash": [
                            hashes.get((i.prompt, i.seed), "") if side == "adapter" else ""
                            for i in images
                        ],
                    },
                    "eval_results_table.json",
                )
                child.image(labelled_grid(images), "samples.png")
                children[side] = child.run_id
        parent.metrics(parent_metrics(report))
        parent.image(comparison_sheet(base, adapted), COMPARISON_FILE)
        parent.json(report, "quality_report.json")
    compare = tracker.compare_url(parent.experiment_id, [children["base"], children["adapter"]])
    _link_to_adapter(tracker, record, report, parent, compare)
    sheet = tracker.artifact_url(parent.run_id, COMPARISON_FILE)
    return Logged(parent.run_id, parent.url, compare, sheet)


def _link_to_adapter(
    tracker: Any, record: Any, report: dict[str, Any], parent: Any, compare: str
) -> None:
    """The adapter's run and registered version point at their latest evaluation; the
    adapter's run also carries the result numbers (`quality_*`)."""
    client = tracker.client()
    for side in SIDES:
        for k in RESULT_KEYS:
            client.log_metric(record.mlflow_run_id, f"quality_{side}_{k}", float(report[side][k]))
    for k in COMPARISONS:
        client.log_metric(record.mlflow_run_id, f"quality_{k}", float(report[k]))
    links = {"mm.quality_run_id": parent.run_id, "mm.quality_run_url": parent.url}
    for key, value in {**links, "mm.quality_compare_url": compare}.items():
        client.set_tag(record.mlflow_run_id, key, value)
    if record.registered_model and record.registered_version:
        for key, value in links.items():
            client.set_model_version_tag(
                record.registered_model, str(record.registered_version), key, value
            )
