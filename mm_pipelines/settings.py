"""Where the embedded defaults live, read from the environment once at load time.

Everything here has an offline default under `MM_HOME` (default `.mm/` in the working
directory) so `mm demo`, `dagster dev` and the tests need no set-up; production points
the same variables at real services.
"""

from __future__ import annotations

import os
from pathlib import Path


def mm_home() -> Path:
    return Path(os.environ.get("MM_HOME", ".mm")).expanduser().resolve()


def env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def landing_uri() -> str:
    return env("MM_LANDING", str(mm_home() / "landing"))  # type: ignore[return-value]


def media_dir() -> str:
    return str(mm_home() / "media")


def pg_dsn() -> str | None:
    return env("MM_PG_DSN")


def embedded_pg_dir() -> str:
    return str(mm_home() / "pgdata")


def mlflow_tracking_uri() -> str:
    return env("MLFLOW_TRACKING_URI", f"sqlite:///{mm_home() / 'mlflow.db'}")  # type: ignore[return-value]


def mlflow_artifact_root() -> str:
    return env("MM_MLFLOW_ARTIFACTS", (mm_home() / "mlartifacts").as_uri())  # type: ignore[return-value]


def dagster_home() -> Path:
    return Path(env("DAGSTER_HOME", str(mm_home() / "dagster"))).expanduser().resolve()  # type: ignore[arg-type]


def prepare_dagster_home() -> Path:
    """Create DAGSTER_HOME with the repo's dagster.yaml and export it for Dagster."""
    home = dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    template = Path(__file__).resolve().parents[1] / "dagster.yaml"
    target = home / "dagster.yaml"
    if template.is_file() and (not target.exists() or target.read_text() != template.read_text()):
        target.write_text(template.read_text())
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def models_dir() -> Path:
    return Path(env("MM_MODELS_DIR", str(mm_home() / "models"))).expanduser().resolve()  # type: ignore[arg-type]


def serving_store() -> str:
    """Where serving bundles are published: a folder or `s3://bucket/prefix`."""
    return env("MM_SERVING_STORE", str(mm_home() / "serving"))  # type: ignore[return-value]
