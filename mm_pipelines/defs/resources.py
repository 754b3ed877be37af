"""Dagster resources: thin configuration shells over the storage and ML layers.

`build_resources()` reads the environment once at load time, so every deployment is
configured by environment variables and runs offline on embedded defaults when none is set.
"""

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
from dagster_aws.s3 import S3Resource
from pydantic import Field

from mm_pipelines import settings
from mm_pipelines.storage.landing import Landing, LocalLanding, S3Landing
from mm_pipelines.storage.media_store import LocalMediaStore, MediaStore, S3MediaStore
from mm_pipelines.storage.postgres import connect, embedded_dsn, ensure_schema


class CatalogResource(dg.ConfigurableResource):
    """The catalog database: `dsn` (MM_PG_DSN), else the embedded Postgres in `embedded_dir`."""

    dsn: str | None = Field(default=None, description="libpq DSN of a Postgres with pgvector")
    embedded_dir: str = Field(default="", description="data directory of the embedded server")

    def get_dsn(self) -> str:
        dsn = self.dsn or embedded_dsn(self.embedded_dir or settings.embedded_pg_dir())
        ensure_schema(dsn)
        return dsn

    @contextmanager
    def connect(self) -> Iterator[psycopg.Connection]:
        with connect(self.get_dsn()) as conn:
            yield conn


def _split_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix


class MediaStoreResource(dg.ConfigurableResource):
    """Content-addressed media: a local folder, or S3 through dagster-aws when a bucket is set."""

    local_dir: str = ""
    s3_bucket: str | None = None
    s3_prefix: str = "media"
    s3: S3Resource

    def get_store(self) -> MediaStore:
        if self.s3_bucket:
            cache = os.path.join(settings.mm_home(), "cache", "media")
            return S3MediaStore(self.s3.get_client(), self.s3_bucket, self.s3_prefix, cache)
        return LocalMediaStore(self.local_dir or settings.media_dir())


class LandingResource(dg.ConfigurableResource):
    """Where new batches land: a local folder of batch folders or `s3://bucket/prefix`."""

    uri: str = ""
    s3: S3Resource

    def get_landing(self) -> Landing:
        uri = self.uri or settings.landing_uri()
        if uri.startswith("s3://"):
            bucket, prefix = _split_s3_uri(uri)
            return S3Landing(self.s3.get_client(), bucket, prefix)
        return LocalLanding(uri)


class ServingResource(dg.ConfigurableResource):
    """Where serving bundles are published: a local folder, or `s3://bucket/prefix`
    through dagster-aws."""

    location: str = ""
    s3: S3Resource

    def get_store(self) -> Any:
        from mm_pipelines.serving.store import open_store

        location = self.location or settings.serving_store()
        client = self.s3.get_client() if location.startswith("s3://") else None
        return open_store(location, client=client)


class ComputeResource(dg.ConfigurableResource):
    """Where and how models run. `device="auto"` picks CUDA when present."""

    device: str = "auto"
    precision: str = Field(default="auto", description="auto | fp32 | bf16 | fp16")
    batch_size: int = 32
    dataloader_workers: int = 2
    io_workers: int = Field(default=4, description="threads for hashing/copying files")

    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def torch_dtype(self) -> Any:
        import torch

        on_cuda = self.torch_device().startswith("cuda")
        choice = self.precision if self.precision != "auto" else ("bf16" if on_cuda else "fp32")
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


class ModelsResource(dg.ConfigurableResource):
    """Which models the pipeline uses. Empty values mean the demo models that the
    `clip_model` / `unified_projector` assets train into `models_dir`."""

    models_dir: str = ""
    clip_architecture: str = Field(default="mm-tiny-clip", description="open_clip model name")
    clip_checkpoint: str = Field(
        default="", description="weights file, 'local-dir:<dir>' or a hub tag; empty: demo model"
    )
    whisper_model: str | None = Field(default=None, description="faster-whisper dir or name")
    projector_dir: str = Field(default="", description="empty: the latest trained projector")
    diffusion_base: str = Field(
        default="", description="diffusers pipeline directory; empty: the demo's tiny model"
    )
    diffusion_cpu_offload: bool = Field(default=False, description="CUDA: model CPU offload")
    diffusion_nf4: bool = Field(default=False, description="CUDA: NF4-quantized denoiser")
    fid_inception_weights: str = Field(
        default="", description="local Inception weights for FID/KID; empty: CLIP image tower"
    )

    def root(self) -> Path:
        return Path(self.models_dir or settings.models_dir())

    def demo_clip_path(self) -> Path:
        return self.root() / "clip-demo" / "open_clip_model.safetensors"

    def clip_source(self) -> tuple[str, str]:
        """(architecture, checkpoint) to load; fails clearly when nothing is there yet."""
        checkpoint = self.clip_checkpoint or str(self.demo_clip_path())
        if not self.clip_checkpoint and not Path(checkpoint).is_file():
            raise FileNotFoundError(
                f"no CLIP checkpoint at {checkpoint}: materialize the clip_model asset first "
                "(or set MM_CLIP_CHECKPOINT)"
            )
        return self.clip_architecture, checkpoint

    def projector_path(self) -> Path:
        if self.projector_dir:
            return Path(self.projector_dir)
        pointer = self.root() / "projector" / "CURRENT"
        if not pointer.is_file():
            raise FileNotFoundError(
                f"no unified projector at {pointer.parent}: materialize unified_projector first"
            )
        return pointer.parent / pointer.read_text().strip()

    def diffusion_base_dir(self) -> Path:
        if self.diffusion_base:
            return Path(self.diffusion_base)
        pointer = self.root() / "diffusion-base" / "CURRENT"
        if not pointer.is_file():
            raise FileNotFoundError(
                f"no diffusion base model at {pointer.parent}: materialize lora_base_model "
                "first (or set MM_DIFFUSION_BASE to a diffusers pipeline directory)"
            )
        return pointer.parent / pointer.read_text().strip()

    def subject_dir(self, subject: str) -> Path:
        return self.root() / "lora" / subject


class MLflowResource(dg.ConfigurableResource):
    """MLflow tracking: one MLflow run per asset partition materialization."""

    tracking_uri: str = ""
    artifact_root: str = ""
    experiment: str = "mm_pipelines"
    ui_url: str = Field(default="", description="base URL of the MLflow UI, for links")

    def _client_setup(self) -> str:
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri or settings.mlflow_tracking_uri())
        existing = mlflow.get_experiment_by_name(self.experiment)
        if existing is not None:
            return existing.experiment_id
        root = self.artifact_root or settings.mlflow_artifact_root()
        try:
            return mlflow.create_experiment(
                self.experiment, artifact_location=f"{root}/{self.experiment}"
            )
        except mlflow.exceptions.MlflowException:  # created by a concurrent process
            return mlflow.get_experiment_by_name(self.experiment).experiment_id

    @contextmanager
    def start_run(
        self, context: dg.AssetExecutionContext, tags: dict[str, str] | None = None
    ) -> Iterator[Any]:
        """Open a run tagged with the Dagster run, asset and partition; always close it,
        FINISHED on success and FAILED on error."""
        import mlflow

        experiment_id = self._client_setup()
        asset = context.asset_key.to_user_string()
        partition = context.partition_key if context.has_partition_key else None
        run_tags = {"dagster.run_id": context.run_id, "dagster.asset_key": asset}
        if partition is not None:
            run_tags["dagster.partition"] = partition
        name = f"{asset}[{partition}]" if partition else asset
        run = mlflow.start_run(
            experiment_id=experiment_id, run_name=name, tags={**run_tags, **(tags or {})}
        )
        try:
            yield run
        except BaseException:
            mlflow.end_run(status="FAILED")
            raise
        mlflow.end_run(status="FINISHED")

    def client(self) -> Any:
        """An MlflowClient on our tracking server (for the registry: aliases, tags)."""
        import mlflow

        self._client_setup()
        return mlflow.MlflowClient()

    def register(self, run: Any, artifact_path: str, name: str, tags: dict | None = None) -> str:
        """Register the run's artifact folder as a new version of model `name`."""
        import mlflow

        client = mlflow.MlflowClient()
        if not client.search_registered_models(filter_string=f"name = '{name}'"):
            with contextlib.suppress(mlflow.exceptions.MlflowException):  # made concurrently
                client.create_registered_model(name)
        version = client.create_model_version(
            name, f"{run.info.artifact_uri}/{artifact_path}", run_id=run.info.run_id, tags=tags
        )
        return str(version.version)

    def run_url(self, run: Any) -> str:
        base = (self.ui_url or settings.env("MM_MLFLOW_UI", "http://127.0.0.1:5000")).rstrip("/")
        return f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


@contextmanager
def step_metrics(run: Any, every: int = 50) -> Iterator[Any]:
    """`log(key, value, step)` for per-step training metrics, written to MLflow in one
    batch every `every` calls (and on exit), each with its own step and timestamp.

    One MLflow write per step (sqlite transaction or HTTP request) cost ~25% of a 50 ms
    LoRA step here, even queued asynchronously; batched it is noise (bench_lora.py)."""
    import time

    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    pending: list[Metric] = []

    def flush() -> None:
        if pending:
            client.log_batch(run.info.run_id, metrics=list(pending))
            pending.clear()

    def log(key: str, value: float, step: int) -> None:
        pending.append(Metric(key, float(value), int(time.time() * 1000), int(step)))
        if len(pending) >= every:
            flush()

    try:
        yield log
    finally:
        flush()


def build_resources() -> dict[str, Any]:
    s3 = S3Resource(
        endpoint_url=settings.env("MM_S3_ENDPOINT_URL"),
        region_name=settings.env("AWS_REGION", settings.env("AWS_DEFAULT_REGION", "us-east-1")),
    )
    resources: dict[str, Any] = {
        "catalog_db": CatalogResource(
            dsn=settings.pg_dsn(), embedded_dir=settings.embedded_pg_dir()
        ),
        "media_store": MediaStoreResource(
            local_dir=settings.media_dir(),
            s3_bucket=settings.env("MM_S3_BUCKET"),
            s3_prefix=settings.env("MM_S3_PREFIX", "media"),
            s3=s3,
        ),
        "landing": LandingResource(uri=settings.landing_uri(), s3=s3),
        "serving": ServingResource(location=settings.serving_store(), s3=s3),
        "compute": ComputeResource(
            device=settings.env("MM_DEVICE", "auto"),
            precision=settings.env("MM_PRECISION", "auto"),
        ),
        "models": ModelsResource(
            models_dir=str(settings.models_dir()),
            clip_architecture=settings.env("MM_CLIP_ARCH", "mm-tiny-clip"),
            clip_checkpoint=settings.env("MM_CLIP_CHECKPOINT", ""),
            whisper_model=settings.env("MM_WHISPER_MODEL"),
            projector_dir=settings.env("MM_PROJECTOR_DIR", ""),
            diffusion_base=settings.env("MM_DIFFUSION_BASE", ""),
            diffusion_cpu_offload=settings.env("MM_DIFFUSION_CPU_OFFLOAD", "0") == "1",
            diffusion_nf4=settings.env("MM_DIFFUSION_NF4", "0") == "1",
            fid_inception_weights=settings.env("MM_FID_INCEPTION_WEIGHTS", ""),
        ),
        "mlflow_tracking": MLflowResource(
            tracking_uri=settings.mlflow_tracking_uri(),
            artifact_root=settings.mlflow_artifact_root(),
        ),
    }
    bucket = settings.env("MM_S3_BUCKET")
    if bucket:  # step outputs must be shared between pods in production
        from dagster_aws.s3 import S3PickleIOManager

        resources["io_manager"] = S3PickleIOManager(
            s3_resource=s3,
            s3_bucket=bucket,
            s3_prefix=settings.env("MM_S3_IO_PREFIX", "dagster-io"),
        )
    return resources
