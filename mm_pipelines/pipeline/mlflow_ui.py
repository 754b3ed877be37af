"""The MLflow UI on the project's tracking store (`mm mlflow`), on the address the run links
point at (`MM_MLFLOW_UI`, default http://127.0.0.1:5000)."""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import urlsplit

from mm_pipelines import settings


def ui_address(url: str | None = None) -> tuple[str, int]:
    """(host, port) of the MLflow UI base URL the links use."""
    parts = urlsplit(url or settings.mlflow_ui_url())
    default = 443 if parts.scheme == "https" else 80
    return parts.hostname or "127.0.0.1", parts.port or default


def is_remote(tracking_uri: str) -> bool:
    """An MLflow tracking server elsewhere (nothing to start here: it has its own UI)."""
    return tracking_uri.startswith(("http://", "https://", "databricks"))


def server_command(host: str, port: int, tracking_uri: str, artifact_root: str) -> list[str]:
    """`mlflow server` on our store: the UI and the REST API, one worker (a laptop, a
    review), artifacts read from where the runs wrote them."""
    mlflow = Path(sys.executable).with_name("mlflow")
    return [
        str(mlflow),
        "server",
        "--backend-store-uri",
        tracking_uri,
        "--default-artifact-root",
        artifact_root,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
