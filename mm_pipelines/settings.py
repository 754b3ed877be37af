"""The only reader of the environment.

Everything has an offline default under `MM_HOME` (default `.mm/` in the working
directory) so `mm demo`, `dagster dev` and the tests need no set-up; production points
the same variables at real services. Values are read on every call (tests and `mm`
sub-commands change the environment between calls), never cached at import.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _true(value: str | None) -> bool:
    return (value or "0").strip().lower() in ("1", "true", "yes", "on")


def _json_env(name: str, default: Any, kind: type) -> Any:
    raw = (env(name) or "").strip()
    if not raw:
        return default
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{name} must be JSON ({kind.__name__}): {err}") from err
    if not isinstance(value, kind):
        raise ValueError(f"{name} must be a JSON {kind.__name__}, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- local state


def mm_home() -> Path:
    return Path(env("MM_HOME", ".mm")).expanduser().resolve()  # type: ignore[arg-type]


def landing_uri() -> str:
    return env("MM_LANDING", str(mm_home() / "landing"))  # type: ignore[return-value]


def media_dir() -> str:
    return str(mm_home() / "media")


def models_dir() -> Path:
    return Path(env("MM_MODELS_DIR", str(mm_home() / "models"))).expanduser().resolve()  # type: ignore[arg-type]


def cache_dir() -> Path:
    """Local, disposable copies of remote objects (media, verified model artifacts)."""
    return mm_home() / "cache"


def serving_store() -> str:
    """Where serving bundles are published: a folder or `s3://bucket/prefix`."""
    return env("MM_SERVING_STORE", str(mm_home() / "serving"))  # type: ignore[return-value]


def subjects_file() -> Path:
    return Path(env("MM_SUBJECTS", str(mm_home() / "subjects.yaml")))  # type: ignore[arg-type]


def serve_url() -> str | None:
    """A running `mm serve` that `mm search` asks instead of loading the models itself."""
    return env("MM_SERVE_URL")


def api_key() -> str | None:
    """The API key `mm search` sends to `MM_SERVE_URL` (`mm keys create`)."""
    return env("MM_API_KEY")


def default_tenant() -> str | None:
    """The tenant `mm search` / `mm ingest` use when none is given."""
    return env("MM_TENANT")


def quiet_libraries() -> None:
    """No progress bars from tqdm-based libraries (diffusers, huggingface_hub, ...) in this
    process and its children: `mm` prints its own progress lines."""
    os.environ["TQDM_DISABLE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


# libraries that configure their own loggers on import read these (children inherit them)
QUIET_LOG_LEVELS = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    "CT2_VERBOSE": "-1",  # ctranslate2 (Whisper): errors only
    "PYTHONWARNINGS": "ignore",
}


def quiet_logs() -> None:
    """Library log chatter and warnings off for this process and its children (`mm demo`
    without -v); a value the user set wins."""
    for key, value in QUIET_LOG_LEVELS.items():
        os.environ.setdefault(key, value)


# --------------------------------------------------------------------------- services


def pg_dsn() -> str | None:
    return env("MM_PG_DSN")


def embedded_pg_dir() -> str:
    return str(mm_home() / "pgdata")


def s3_bucket() -> str | None:
    return env("MM_S3_BUCKET")


def s3_prefix() -> str:
    return env("MM_S3_PREFIX", "media")  # type: ignore[return-value]


def s3_models_prefix() -> str:
    return env("MM_S3_MODELS_PREFIX", "models")  # type: ignore[return-value]


def s3_io_prefix() -> str:
    return env("MM_S3_IO_PREFIX", "dagster-io")  # type: ignore[return-value]


def s3_endpoint_url() -> str | None:
    return env("MM_S3_ENDPOINT_URL")


# botocore waits 60 s to connect and 60 s per read, 5 times over: a step facing an unreachable
# S3 endpoint would hang for minutes before saying so. These fail it within seconds instead.
def s3_connect_timeout() -> float:
    return float(env("MM_S3_CONNECT_TIMEOUT", "5"))  # type: ignore[arg-type]


def s3_read_timeout() -> float:
    """Seconds without a byte from S3 before an attempt is given up (not a whole transfer)."""
    return float(env("MM_S3_READ_TIMEOUT", "30"))  # type: ignore[arg-type]


def s3_max_attempts() -> int:
    """Attempts per S3 request, the first one included."""
    return int(env("MM_S3_MAX_ATTEMPTS", "3"))  # type: ignore[arg-type]


def aws_region() -> str:
    return env("AWS_REGION", env("AWS_DEFAULT_REGION", "us-east-1"))  # type: ignore[return-value]


def mlflow_tracking_uri() -> str:
    return env("MLFLOW_TRACKING_URI", f"sqlite:///{mm_home() / 'mlflow.db'}")  # type: ignore[return-value]


def mlflow_artifact_root() -> str:
    return env("MM_MLFLOW_ARTIFACTS", (mm_home() / "mlartifacts").as_uri())  # type: ignore[return-value]


def mlflow_ui_url() -> str:
    return env("MM_MLFLOW_UI", "http://127.0.0.1:5000")  # type: ignore[return-value]


def mlflow_system_metrics() -> bool:
    """Training runs record CPU/memory/GPU use (MLflow system metrics); `0` turns it off."""
    return _true(env("MM_MLFLOW_SYSTEM_METRICS", "1"))


# MLflow's HTTP client retries with backoff for minutes by default: a step or sensor tick
# should fail within seconds with the tracking URI in the message instead
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def apply_mlflow_http_defaults() -> None:
    """Shorten MLflow's HTTP retries for this process unless the user set them."""
    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


# MLflow 3's server also starts a job runner (eight huey consumer processes) for GenAI jobs
# this project never submits: ~1.3 GiB and ~40 CPU seconds more per start (measured:
# benchmarks/bench_mlflow_server.py)
MLFLOW_SERVER_DEFAULTS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def mlflow_server_environ() -> dict[str, str]:
    """The environment for an `mlflow server` we start: this one, with the server defaults
    where the user set nothing."""
    return {**MLFLOW_SERVER_DEFAULTS, **os.environ}


def mlflow_http_settings() -> str:
    """The retry settings MLflow's HTTP client uses in this process, for error messages."""
    return ", ".join(f"{key}={env(key, 'unset')}" for key in MLFLOW_HTTP_DEFAULTS)


# --------------------------------------------------------------------------- models


def device() -> str:
    return env("MM_DEVICE", "auto")  # type: ignore[return-value]


def precision() -> str:
    return env("MM_PRECISION", "auto")  # type: ignore[return-value]


def clip_architecture() -> str:
    return env("MM_CLIP_ARCH", "mm-tiny-clip")  # type: ignore[return-value]


def clip_checkpoint() -> str:
    return env("MM_CLIP_CHECKPOINT", "")  # type: ignore[return-value]


def whisper_model() -> str | None:
    return env("MM_WHISPER_MODEL")


def projector_dir() -> str:
    return env("MM_PROJECTOR_DIR", "")  # type: ignore[return-value]


def diffusion_base() -> str:
    return env("MM_DIFFUSION_BASE", "")  # type: ignore[return-value]


def diffusion_cpu_offload() -> bool:
    return _true(env("MM_DIFFUSION_CPU_OFFLOAD"))


def diffusion_nf4() -> bool:
    return _true(env("MM_DIFFUSION_NF4"))


def fid_inception_weights() -> str:
    return env("MM_FID_INCEPTION_WEIGHTS", "")  # type: ignore[return-value]


# --------------------------------------------------------------------------- curation


def aesthetic_head() -> str:
    """Weights of the aesthetic head (our format or a LAION-style state dict); empty: the
    head `content_heads` trains from labelled catalog items, if any."""
    return env("MM_AESTHETIC_HEAD", "")  # type: ignore[return-value]


def safety_head() -> str:
    """Weights of the image safety (NSFW) head; empty: the trained one, if any."""
    return env("MM_SAFETY_HEAD", "")  # type: ignore[return-value]


def text_safety_head() -> str:
    """Weights of the text safety head (CLIP text vectors); empty: the trained one, if any."""
    return env("MM_TEXT_SAFETY_HEAD", "")  # type: ignore[return-value]


def curation_policy() -> str:
    """Per-tenant flagging thresholds: JSON, or the path of a JSON/YAML file (see
    pipeline/curate/config.py); empty: the default policy."""
    return env("MM_CURATION_POLICY", "")  # type: ignore[return-value]


def captioner() -> str:
    """A transformers image-to-text model directory; empty: the CLIP zero-shot tagger."""
    return env("MM_CAPTIONER", "")  # type: ignore[return-value]


def caption_vocabulary() -> str:
    """The tagger's vocabulary file (JSON/YAML); empty: the demo's shapes vocabulary."""
    return env("MM_CAPTION_VOCAB", "")  # type: ignore[return-value]


# --------------------------------------------------------------------------- Dagster / k8s


def dagster_home() -> Path:
    return Path(env("DAGSTER_HOME", str(mm_home() / "dagster"))).expanduser().resolve()  # type: ignore[arg-type]


def prepare_dagster_home() -> Path:
    """Create DAGSTER_HOME with the repo's dagster.yaml and export it for Dagster."""
    home = dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    template = REPO_ROOT / "dagster.yaml"
    target = home / "dagster.yaml"
    if template.is_file() and (not target.exists() or target.read_text() != template.read_text()):
        target.write_text(template.read_text())
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def executor() -> str:
    """`k8s` = one pod per step (dagster-k8s); anything else = Dagster's default."""
    return (env("MM_EXECUTOR", "") or "").strip().lower()


# GKE, AKS and the NVIDIA GPU operator taint GPU nodes with this key; tolerating it by default
# means a node selector alone is enough to land on them
DEFAULT_GPU_TOLERATIONS: list[dict[str, str]] = [
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
]


def k8s_gpu() -> dict[str, Any]:
    """What one GPU step asks of Kubernetes (see defs/k8s.py): `MM_K8S_GPUS`,
    `MM_K8S_GPU_NODE_SELECTOR` (JSON object), `MM_K8S_GPU_TOLERATIONS` (JSON list),
    `MM_K8S_GPU_{CPU,MEMORY}_{REQUEST,LIMIT}` (Kubernetes quantities)."""
    return {
        "gpus": int(env("MM_K8S_GPUS", "0") or 0),
        "node_selector": _json_env("MM_K8S_GPU_NODE_SELECTOR", {}, dict),
        "tolerations": _json_env("MM_K8S_GPU_TOLERATIONS", list(DEFAULT_GPU_TOLERATIONS), list),
        "cpu_request": env("MM_K8S_GPU_CPU_REQUEST"),
        "cpu_limit": env("MM_K8S_GPU_CPU_LIMIT"),
        "memory_request": env("MM_K8S_GPU_MEMORY_REQUEST"),
        "memory_limit": env("MM_K8S_GPU_MEMORY_LIMIT"),
    }
