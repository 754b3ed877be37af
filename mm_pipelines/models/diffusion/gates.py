"""Quality gates on a quality report: thresholds on the numbers, decided on the estimate or
on the bound of its bootstrap interval, and minimum sample sizes below which no gate
passes. Plain Python (the gates object is `pipeline.subjects.QualityGates`)."""

from __future__ import annotations

from typing import Any

import numpy as np

ESTIMATE = "estimate"
INTERVAL = "interval"
DECIDE_ON = (ESTIMATE, INTERVAL)

# gate field -> (report number, interval key, comparison)
THRESHOLDS = (
    ("max_fid", "fid", "adapter_fid", "<="),
    ("max_kid", "kid_mean", "adapter_kid", "<="),
    ("min_clip_score", "clip_score", "adapter_clip_score", ">="),
    ("max_fid_ratio_to_base", "fid_ratio_to_base", "fid_ratio_to_base", "<="),
)


def report_value(report: dict[str, Any], name: str) -> float:
    """A number of the report: the adapter's own, or a report-level ratio."""
    return float(report["adapter"][name] if name in report["adapter"] else report[name])


def sample_sizes(report: dict[str, Any]) -> dict[str, int]:
    """Reference images and generated images (the smaller of adapter and base)."""
    if "sample_sizes" in report:
        return {k: int(v) for k, v in report["sample_sizes"].items()}
    adapter, base = report["adapter"], report.get("base", report["adapter"])
    return {
        "n_real": int(adapter["n_real"]),
        "n_generated": int(min(adapter["n_fake"], base["n_fake"])),
    }


def sample_failures(report: dict[str, Any], gates: Any) -> list[str]:
    sizes = sample_sizes(report)
    failures = []
    for field, key, what in (
        ("min_references", "n_real", "reference images"),
        ("min_generated", "n_generated", "generated images per model"),
    ):
        floor = getattr(gates, field, None)
        if floor is not None and sizes[key] < floor:
            failures.append(
                f"{key} {sizes[key]} is below {field} {floor:g}: too few {what} for the "
                "quality numbers to support a decision"
            )
    return failures


def _described(report: dict[str, Any], interval_key: str) -> str:
    interval = report.get("intervals", {}).get(interval_key)
    if not interval:
        return ""
    sizes = ", ".join(f"{k}={v}" for k, v in interval["n"].items())
    return (
        f" [{interval['low']:.4g}, {interval['high']:.4g}] "
        f"({interval['confidence']:.0%} CI, {sizes})"
    )


def gate_failures(report: dict[str, Any], gates: Any) -> list[str]:
    """Human-readable reasons the report fails `gates`; [] = pass.

    With `gates.decide_on == "interval"` a maximum is checked against the interval's upper
    bound and a minimum against its lower bound: the gate passes only when the whole
    interval is on the good side. Too small a sample fails whatever the numbers say."""
    failures = sample_failures(report, gates)
    decide_on = getattr(gates, "decide_on", ESTIMATE)
    for field, name, interval_key, op in THRESHOLDS:
        limit = getattr(gates, field)
        if limit is None:
            continue
        value = report_value(report, name)
        shown = f"{name} {value:.4g}{_described(report, interval_key)}"
        if decide_on == INTERVAL:
            interval = report.get("intervals", {}).get(interval_key)
            if not interval:
                failures.append(f"{shown}: no interval in the report (re-run generation_quality)")
                continue
            bound_name = "upper bound" if op == "<=" else "lower bound"
            value = float(interval["high"] if op == "<=" else interval["low"])
            shown = f"{shown}: {bound_name} {value:.4g}"
        ok = bool(np.isfinite(value)) and (value <= limit if op == "<=" else value >= limit)
        if not ok:
            failures.append(f"{shown} is not {op} {limit:g}")
    return failures
