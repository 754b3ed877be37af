"""Dagster resources: thin configuration shells that hand the stage drivers their plain
objects (`pipeline.services.Services`).

`build_resources()` takes every value from `settings` (the one reader of the environment)
when the code location loads, so each deployment is configured by environment variables
and runs offline on embedded defaults when none is set.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
from dagster_aws.s3 import S3Resource
from pydantic import Field

from mm_pipelines import settings
from mm_pipelines.pipeline import model_store as ms
from mm_pipelines.pipeline.services import DEMO, Compute, ModelChoice, Services, folder_model_store
from mm_pipelines.pipeline.tracking import RunSpec, TrackedRun, Tracker
from mm_pipelines.storage.landing import Landing, LocalLanding, S3Landing
from mm_pipelines.storage.media_store import LocalMediaStore, MediaStore, S3MediaStore
from mm_pipelines.storage.postgres import connect, embedded_dsn, ensure_schema


class S3(S3Resource):
    """dagster-aws's S3Resource with connect/read timeouts (it only has `max_attempts`), so a
    step facing an unreachable endpoint fails within seconds with the endpoint in the error.
    Defaults come from settings (MM_S3_CONNECT_TIMEOUT, MM_S3_READ_TIMEOUT, MM_S3_MAX_ATTEMPTS)
    when the code location loads; see storage/s3.py for the same client outside Dagster."""

    connect_timeout: float = Field(default=5.0, description="seconds to connect")
    read_timeout: float = Field(default=30.0, description="seconds without a byte per attempt")

    def get_client(self) -> Any:
        import boto3
        from botocore.config import Config
        from dagster_aws.utils import construct_boto_client_retry_config

        # what dagster_aws.s3.utils.construct_s3_client builds, plus the timeouts
        config = construct_boto_client_retry_config(self.max_attempts).merge(
            Config(connect_timeout=self.connect_timeout, read_timeout=self.read_timeout)
        )
        client = (
            boto3.session.Session(profile_name=self.profile_name)
            .resource(
                "s3",
                region_name=self.region_name,
                use_ssl=self.use_ssl,
                verify=self.verify,
                endpoint_url=self.endpoint_url,
                aws_access_key_id=self.aws_access_key_id,
                aws_secret_access_key=self.aws_secret_access_key,
                aws_session_token=self.aws_session_token,
                config=config,
            )
            .meta.client
        )
        if self.use_unsigned_session:
            from botocore.handlers import disable_signing

            client.meta.events.register("choose-signer.s3.*", disable_signing)
        return client


def s3_from_settings() -> S3:
    return S3(
        endpoint_url=settings.s3_endpoint_url(),
        region_name=settings.aws_region(),
        # dagster-aws counts retries after the first attempt
        max_attempts=max(0, settings.s3_max_attempts() - 1),
        connect_timeout=settings.s3_connect_timeout(),
        read_timeout=settings.s3_read_timeout(),
    )


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
            cache = settings.cache_dir() / "media"
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

    def for_batch(self, batch: str, dsn: str) -> tuple[Landing, str | None]:
        """Where the batch's files are (the landing area, or the folder `mm ingest` was
        given) and the tenant it was registered with (None: not registered)."""
        from mm_pipelines.storage import landing_sources
        from mm_pipelines.storage.landing import open_batch_source

        with connect(dsn) as conn:
            source = landing_sources.lookup(conn, batch)
        if source is None:
            return self.get_landing(), None
        if not source.source_uri:
            return self.get_landing(), source.tenant
        client = self.s3.get_client() if source.source_uri.startswith("s3://") else None
        return open_batch_source(source.source_uri, batch, client), source.tenant


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

    def get_compute(self) -> Compute:
        return Compute(
            self.device, self.precision, self.batch_size, self.dataloader_workers, self.io_workers
        )

    def torch_device(self) -> str:
        return self.get_compute().torch_device()


class ModelsResource(dg.ConfigurableResource):
    """Which models the pipeline uses, and the model store trained ones go through (a folder
    under `models_dir`, or S3 when `s3_bucket` is set). Empty model values mean the demo
    models the `clip_model` / `unified_projector` / `lora_base_model` assets train."""

    models_dir: str = ""
    s3_bucket: str | None = Field(default=None, description="model store bucket (MM_S3_BUCKET)")
    s3_prefix: str = "models"
    s3_endpoint_url: str | None = None
    s3: S3 | None = None  # the deployment's S3 settings; None: defaults for s3_endpoint_url
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

    def get_store(self) -> ms.ModelStore:
        if self.s3_bucket:
            s3 = self.s3 or S3(endpoint_url=self.s3_endpoint_url, region_name=settings.aws_region())
            client = s3.get_client()
            backend = ms.S3Backend(client, self.s3_bucket, self.s3_prefix)
            return ms.ModelStore(backend, settings.cache_dir() / "models")
        return folder_model_store(self.root())

    def get_choice(self) -> ModelChoice:
        return ModelChoice(
            self.clip_architecture,
            self.clip_checkpoint,
            self.whisper_model,
            self.projector_dir,
            self.diffusion_base,
            self.diffusion_cpu_offload,
            self.diffusion_nf4,
            self.fid_inception_weights,
        )

    def services(self) -> Services:
        return Services(models=self.get_store(), choice=self.get_choice())

    # where the models are, for callers outside a step (tests, notebooks)
    def clip_source(self) -> tuple[str, str]:
        return self.services().clip_source()

    def demo_clip_path(self) -> Path:
        return Path(self.clip_source()[1])

    def projector_path(self) -> Path:
        return self.services().projector_dir()

    def diffusion_base_dir(self) -> Path:
        return self.services().diffusion_base_dir()

    def has_demo_model(self, kind: str) -> bool:
        return self.get_store().current(kind, DEMO) is not None


class MLflowResource(dg.ConfigurableResource):
    """MLflow tracking: one MLflow run per asset partition materialization."""

    tracking_uri: str = ""
    artifact_root: str = ""
    experiment: str = "mm_pipelines"
    ui_url: str = Field(default="", description="base URL of the MLflow UI, for links")

    def get_tracker(self) -> Tracker:
        return Tracker(self.tracking_uri, self.artifact_root, self.experiment, self.ui_url)

    def _client_setup(self) -> str:
        return self.get_tracker().setup()

    def client(self) -> Any:
        return self.get_tracker().client()

    def run_spec(self, context: dg.AssetExecutionContext) -> RunSpec:
        """A run named after the asset (and partition), tagged with the Dagster run."""
        asset = context.asset_key.to_user_string()
        partition = context.partition_key if context.has_partition_key else None
        tags = {"dagster.run_id": context.run_id, "dagster.asset_key": asset}
        if partition is not None:
            tags["dagster.partition"] = partition
        return RunSpec(f"{asset}[{partition}]" if partition else asset, tags)

    @contextmanager
    def start_run(
        self, context: dg.AssetExecutionContext, tags: dict[str, str] | None = None
    ) -> Iterator[TrackedRun]:
        """Open a run tagged with the Dagster run, asset and partition; always close it."""
        with self.get_tracker().run(self.run_spec(context).with_tags(**(tags or {}))) as run:
            yield run

    def run_url(self, run: Any) -> str:
        return self.get_tracker().run_url(run.info.experiment_id, run.info.run_id)


def services(
    catalog_db: CatalogResource | None = None,
    media_store: MediaStoreResource | None = None,
    models: ModelsResource | None = None,
    compute: ComputeResource | None = None,
    mlflow_tracking: MLflowResource | None = None,
) -> Services:
    """The plain objects a stage driver gets, from whichever resources the asset has."""
    base = models.services() if models is not None else Services()
    base.dsn = catalog_db.get_dsn if catalog_db is not None else None
    base.media = media_store.get_store() if media_store is not None else None
    base.tracker = mlflow_tracking.get_tracker() if mlflow_tracking is not None else None
    if compute is not None:
        base.compute = compute.get_compute()
    return base


def build_resources() -> dict[str, Any]:
    s3 = s3_from_settings()
    bucket = settings.s3_bucket()
    resources: dict[str, Any] = {
        "catalog_db": CatalogResource(
            dsn=settings.pg_dsn(), embedded_dir=settings.embedded_pg_dir()
        ),
        "media_store": MediaStoreResource(
            local_dir=settings.media_dir(), s3_bucket=bucket, s3_prefix=settings.s3_prefix(), s3=s3
        ),
        "landing": LandingResource(uri=settings.landing_uri(), s3=s3),
        "serving": ServingResource(location=settings.serving_store(), s3=s3),
        "compute": ComputeResource(device=settings.device(), precision=settings.precision()),
        "models": ModelsResource(
            models_dir=str(settings.models_dir()),
            s3_bucket=bucket,
            s3_prefix=settings.s3_models_prefix(),
            s3_endpoint_url=settings.s3_endpoint_url(),
            s3=s3,
            **{
                k: v
                for k, v in vars(ModelChoice.from_settings()).items()
                if k in ModelsResource.model_fields
            },
        ),
        "mlflow_tracking": MLflowResource(
            tracking_uri=settings.mlflow_tracking_uri(),
            artifact_root=settings.mlflow_artifact_root(),
            ui_url=settings.mlflow_ui_url(),
        ),
    }
    from mm_pipelines.defs.curate.resources import CurationResource

    resources["curation"] = CurationResource.from_settings()
    if bucket:  # step outputs must be shared between pods in production
        from dagster_aws.s3 import S3PickleIOManager

        resources["io_manager"] = S3PickleIOManager(
            s3_resource=s3, s3_bucket=bucket, s3_prefix=settings.s3_io_prefix()
        )
    return resources
