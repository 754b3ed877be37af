"""The `mm` command as a user runs it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from mm_pipelines_tests.conftest import run_mm

REPO = Path(__file__).resolve().parents[1]


def test_sample_data_writes_every_modality_and_a_ready_marker(tmp_path):
    proc = run_mm("sample-data", "--landing", str(tmp_path), "--batch", "s1", env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "s1"
    suffixes = {p.suffix for p in root.rglob("*") if p.is_file()}
    assert {".png", ".jpg", ".mp4", ".ogg", ".txt", ".md"} <= suffixes
    assert (root / "_READY").exists() and (root / "_manifest.jsonl").exists()


def demo_summary(env: dict[str, str]) -> dict:
    """Everything the demo's steps recorded (no markdown), as the demo wrote it."""
    return json.loads((Path(env["MM_HOME"]) / "demo-summary.json").read_text())


def test_mm_mlflow_with_a_tracking_server_points_there_instead_of_starting_one():
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://mlflow.example:5000"}
    proc = run_mm("mlflow", env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "runs are tracked on the MLflow server http://mlflow.example:5000" in proc.stdout


def test_demo_runs_the_graph_and_searches_the_sample_batch(demo):
    proc, env = demo
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = demo_summary(env)
    raw = summary["assets"]["raw_media"]
    assert set(raw["by_modality"]) == {"image", "video", "audio", "text"}
    assert raw["quarantined_by_reason"] == {"empty_file": 1, "truncated": 1, "unsupported_type": 1}
    assert raw["duplicates"] == 1
    assert summary["checks"] == {
        "objects_intact": True,
        "quarantine_rate": True,
        "ann_recall": True,
        "flagged_share": True,
        "enough_images": True,
        "quality_gates": True,
    }
    assert summary["assets"]["vector_index"]["vectors_written"] > 50
    first_search = proc.stdout.split("$ mm search 'a red circle on a blue background'")[1]
    top_image = next(line for line in first_search.splitlines() if line.strip().startswith("image"))
    # the duplicated photo is shown under the name it was first seen as, not the copy's
    assert "red_circle_on_blue.png" in top_image
    assert "mm dev" in proc.stdout
    assert (Path(env["MM_HOME"]) / "dagster" / "dagster.yaml").exists()


def test_the_demo_subject_goes_from_selection_to_a_quality_report(demo):
    proc, env = demo
    assert proc.returncode == 0
    summary = demo_summary(env)
    assert summary["assets"]["lora_training_set"]["images"] == 5
    quality = summary["assets"]["generation_quality"]
    assert quality["adapter_fid"] < 0.9 * quality["base_fid"]  # the demo subject's gate
    assert "quality gates: passed" in proc.stdout


def test_the_demo_ends_with_an_approved_exported_and_served_model(demo):
    import mlflow

    proc, env = demo
    assert proc.returncode == 0
    served = proc.stdout.split("Served by `mm serve` at ")[1].splitlines()
    assert "red_circle_on_blue.png" in "\n".join(served[2:5])  # in the top 3, through HTTP
    home = Path(env["MM_HOME"])
    version = (home / "serving" / "CURRENT").read_text().strip()
    manifest = json.loads((home / "serving" / "bundles" / version / "manifest.json").read_text())
    assert set(manifest["models"]) >= {"clip", "projector", "diffusion", "whisper"}
    checks = manifest["verification"]["checks"]
    assert all(c["ok"] and c["max_abs_diff"] <= c["bound"] for c in checks.values()), checks
    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("mm-lora-orange-backdrop", "champion")
    assert str(champion.version) == str(manifest["models"]["diffusion"]["registered_version"])
    assert champion.tags["mm.bundle_version"] == version


NOISE = ["DEBUG", " - dagster - ", "it/s]", "Warning", "WARNING", "|---", "![", "Traceback"]


def test_the_demo_is_quiet_and_says_how_far_its_long_steps_are(demo):
    proc, _ = demo
    assert proc.returncode == 0
    assert proc.stderr.strip() == "", proc.stderr[-2000:]  # no library logs or warnings
    found = [n for n in NOISE if n in proc.stdout]
    assert found == [], found
    lines = proc.stdout.splitlines()
    progress = [line for line in lines if re.search(r" \d+/\d+ \(\d+%\)", line)]
    lora = [line for line in progress if "LoRA" in line]
    assert any("left" in line for line in lora), lora  # an estimate while it trains
    assert lora[-1].strip().startswith("LoRA orange-backdrop, step 300/300 (100%), done in")
    others = [line for line in lines if line not in progress]
    # a line per step with its numbers, the summary, the sample searches: 67 when written
    assert len(others) < 80, others
    # progress comes at each quarter and at most every 10 s in between: how many lines a
    # counter prints follows how long its step took (slower under load), not noise
    for what, bar in _counters(progress).items():
        took = sum(
            _seconds(m) for m in re.findall(r"done in ([\d a-z]+?)(?:$| \()", "\n".join(bar), re.M)
        )
        ends = sum("done in" in line for line in bar)
        assert len(bar) <= 6 * max(1, ends) + took / 10, (what, took, bar)
    summary = proc.stdout[proc.stdout.index("Done in") :].split("\n\n")[0].splitlines()
    assert 4 <= len(summary) <= 10, summary  # read in ten seconds


def _counters(progress: list[str]) -> dict[str, list[str]]:
    """Progress lines by what they count (the words before `done/total`)."""
    bars: dict[str, list[str]] = {}
    for line in progress:
        bars.setdefault(re.split(r" \d+/\d+ \(", line.strip())[0], []).append(line)
    return bars


def _seconds(text: str) -> float:
    """`42 s`, `3 min 05 s`, `1 h 02 min` (pipeline/progress.duration) in seconds."""
    unit = {"h": 3600, "min": 60, "s": 1}
    return sum(int(n) * unit[u] for n, u in re.findall(r"(\d+) (h|min|s)\b", text))


def test_a_second_demo_redoes_nothing(demo):
    """`mm demo` again: every step is up to date (the same reading of the instance the
    sensors use), nothing is trained, registered or exported again."""
    proc, env = demo
    assert proc.returncode == 0
    again = run_mm("demo", env=env, timeout=900)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    steps = [line for line in again.stdout.splitlines() if re.match(r"\[\d+/\d+\]", line)]
    assert steps and all(line.endswith(")") and "up to date" in line for line in steps), steps
    assert "✓" not in again.stdout  # no step ran


def test_rollback_to_an_unknown_bundle_is_a_clear_error(demo):
    _, env = demo
    proc = run_mm("rollback", "no-such-bundle", env=env)
    assert proc.returncode == 2 and "no such published bundle" in proc.stderr


def _run_notebook(name: str, env: dict, monkeypatch) -> list[dict]:
    import nbformat
    from nbclient import NotebookClient

    for key in ("MM_HOME", "MM_CLIP_CHECKPOINT", "MM_DIFFUSION_BASE"):
        monkeypatch.setenv(key, env[key])  # the kernel inherits this environment
    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    ).execute()
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]


def test_the_quality_notebook_runs_top_to_bottom_on_the_demo_state(demo, monkeypatch):
    proc, env = demo
    assert proc.returncode == 0
    outputs = _run_notebook("02_quality_review.ipynb", env, monkeypatch)
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss plot
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert html.count("data:image/png;base64,") >= 3  # validation grids + base/adapter
    text = "".join(o.get("text", "") for o in outputs)
    assert "FID ratio to base" in text
    assert "candidate, champion" in html  # the aliases column (get_model_version has them)


def test_the_search_notebook_runs_top_to_bottom_on_the_demo_state(demo, monkeypatch):
    proc, env = demo
    assert proc.returncode == 0
    outputs = _run_notebook("01_catalog_and_search.ipynb", env, monkeypatch)
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "data:image/png;base64," in html and "a red circle on a blue background" in html
