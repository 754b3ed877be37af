"""benchmarks/gpu_check.py runs on a bare GPU box: torch and a few wheels, no Dagster, no
Postgres driver, no MLflow. Everything it imports must stay that way."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# what the GPU check's parts import (benchmarks/GPU_CHECK.md)
MODULES = (
    "mm_pipelines.models.clip.device_input",
    "mm_pipelines.models.clip.encode",
    "mm_pipelines.models.demo.tiny_clip",
    "mm_pipelines.models.demo.tiny_diffusion",
    "mm_pipelines.models.diffusion.evaluation",
    "mm_pipelines.models.diffusion.generate",
    "mm_pipelines.models.diffusion.lora",
    "mm_pipelines.models.diffusion.pipeline",
    "mm_pipelines.models.speech.audio_encoder",
    "mm_pipelines.models.speech.whisper",
    "mm_pipelines.models.unified.projector",
    "mm_pipelines.serving.export",
)
NOT_ON_THE_BOX = {"dagster", "psycopg", "psycopg2", "mlflow", "boto3", "sqlalchemy", "pgvector"}


def test_gpu_check_imports_need_no_dagster_postgres_or_mlflow() -> None:
    code = (
        "import json, sys\n"
        f"for name in {MODULES!r}: __import__(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert "torch" in loaded and "open_clip" in loaded  # the imports really ran
    assert loaded & NOT_ON_THE_BOX == set()
