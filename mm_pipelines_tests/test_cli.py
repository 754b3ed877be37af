"""The `mm` command as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MM = str(Path(sys.executable).parent / "mm")
REPO = Path(__file__).resolve().parents[1]


def run_mm(*args: str, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([MM, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_sample_data_writes_every_modality_and_a_ready_marker(tmp_path):
    proc = run_mm("sample-data", "--landing", str(tmp_path), "--batch", "s1", env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "s1"
    suffixes = {p.suffix for p in root.rglob("*") if p.is_file()}
    assert {".png", ".jpg", ".mp4", ".ogg", ".txt", ".md"} <= suffixes
    assert (root / "_READY").exists() and (root / "_manifest.jsonl").exists()


def test_mm_mlflow_with_a_tracking_server_points_there_instead_of_starting_one():
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://mlflow.example:5000"}
    proc = run_mm("mlflow", env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "runs are tracked on the MLflow server http://mlflow.example:5000" in proc.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory, demo_clip, base_pipeline_dir):
    """`mm demo` run once in a fresh MM_HOME; (finished process, its environment)."""
    home = tmp_path_factory.mktemp("demo") / "mm"
    # the demo CLIP and the tiny diffusion base of this test session stand in for the ones
    # `mm demo` would train (their training assets are tested on their own)
    env = {
        **os.environ,
        "MM_HOME": str(home),
        "MM_CLIP_CHECKPOINT": str(demo_clip.checkpoint_path),
        "MM_DIFFUSION_BASE": str(base_pipeline_dir),
    }
    env.pop("DAGSTER_HOME", None)
    env.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri exports it in-process
    proc = run_mm("demo", env=env, timeout=1500)
    yield proc, env
    run_mm("db", "stop", env=env)


def test_demo_runs_the_graph_and_searches_the_sample_batch(demo):
    proc, env = demo
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{\n") : proc.stdout.index("\n}\n") + 2])
    raw = summary["assets"]["raw_media"]
    assert set(raw["by_modality"]) == {"image", "video", "audio", "text"}
    assert raw["quarantined_by_reason"] == {"empty_file": 1, "truncated": 1, "unsupported_type": 1}
    assert raw["duplicates"] == 1
    assert summary["checks"] == {
        "objects_intact": True,
        "quarantine_rate": True,
        "ann_recall": True,
        "enough_images": True,
        "quality_gates": True,
    }
    assert summary["assets"]["vector_index"]["vectors_written"] > 50
    first_search = proc.stdout.split("$ mm search 'a red circle on a blue background'")[1]
    top_image = next(line for line in first_search.splitlines() if line.strip().startswith("image"))
    assert "red_circle_on_blue" in top_image or "copy_of_first_photo" in top_image
    assert "mm dev" in proc.stdout
    assert (Path(env["MM_HOME"]) / "dagster" / "dagster.yaml").exists()


def test_the_demo_subject_goes_from_selection_to_a_quality_report(demo):
    proc, _ = demo
    assert proc.returncode == 0
    summary = json.loads(proc.stdout[proc.stdout.index("{\n") : proc.stdout.index("\n}\n") + 2])
    assert summary["assets"]["lora_training_set"]["images"] == 5
    quality = summary["assets"]["generation_quality"]
    assert quality["adapter_fid"] < 0.9 * quality["base_fid"]  # the demo subject's gate
    assert "quality gates: passed" in proc.stdout


def test_the_demo_ends_with_an_approved_exported_and_served_model(demo):
    import mlflow

    proc, env = demo
    assert proc.returncode == 0
    served = proc.stdout.split("Served by `mm serve` at ")[1]
    assert "copy_of_first_photo.png" in served.splitlines()[2]  # the top hit, through HTTP
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
