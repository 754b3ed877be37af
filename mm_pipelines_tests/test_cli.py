"""The `mm` command as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

MM = str(Path(sys.executable).parent / "mm")


def run_mm(*args: str, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([MM, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_sample_data_writes_every_modality_and_a_ready_marker(tmp_path):
    proc = run_mm("sample-data", "--landing", str(tmp_path), "--batch", "s1", env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "s1"
    suffixes = {p.suffix for p in root.rglob("*") if p.is_file()}
    assert {".png", ".jpg", ".mp4", ".ogg", ".txt", ".md"} <= suffixes
    assert (root / "_READY").exists() and (root / "_manifest.jsonl").exists()


def test_demo_runs_the_graph_and_searches_the_sample_batch(tmp_path, demo_clip):
    # the demo CLIP of this test session stands in for the one `mm demo` would train
    env = {
        **os.environ,
        "MM_HOME": str(tmp_path / "mm"),
        "MM_CLIP_CHECKPOINT": str(demo_clip.checkpoint_path),
    }
    env.pop("DAGSTER_HOME", None)
    try:
        proc = run_mm("demo", env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        summary = json.loads(proc.stdout[proc.stdout.index("{\n") : proc.stdout.index("\n}\n") + 2])
    finally:
        run_mm("db", "stop", env=env)
    raw = summary["assets"]["raw_media"]
    assert set(raw["by_modality"]) == {"image", "video", "audio", "text"}
    assert raw["quarantined_by_reason"] == {"empty_file": 1, "truncated": 1, "unsupported_type": 1}
    assert raw["duplicates"] == 1
    assert summary["checks"] == {
        "objects_intact": True,
        "quarantine_rate": True,
        "ann_recall": True,
    }
    assert summary["assets"]["vector_index"]["vectors_written"] > 50
    first_search = proc.stdout.split("$ mm search 'a red circle on a blue background'")[1]
    top_image = next(line for line in first_search.splitlines() if line.strip().startswith("image"))
    assert "red_circle_on_blue" in top_image or "copy_of_first_photo" in top_image
    assert "mm dev" in proc.stdout
    assert (tmp_path / "mm" / "dagster" / "dagster.yaml").exists()
