"""What a stage driver is given: the shared services as plain objects (catalog DSN, media
store, model store, tracking), where models run, and which models to use.

Dagster resources (defs/resources.py) and the `mm` command (`Services.from_settings()`) both
build one of these; drivers never read the environment or know about Dagster.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm_pipelines import settings
from mm_pipelines.pipeline import model_store as ms
from mm_pipelines.pipeline.tracking import Tracker
from mm_pipelines.storage.media_store import MediaStore

DEMO = "demo"  # the store name of the demo models the graph trains itself
UNIFIED = "unified"


@dataclass
class Compute:
    """Where and how models run. `device="auto"` picks CUDA when present."""

    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    batch_size: int = 32
    dataloader_workers: int = 2
    io_workers: int = 4  # threads for hashing/copying files

    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class ModelChoice:
    """Which models the pipeline uses. Empty values mean the demo models the graph trains
    into the model store (`clip_model`, `unified_projector`, `lora_base_model`)."""

    clip_architecture: str = "mm-tiny-clip"
    clip_checkpoint: str = ""  # weights file, 'local-dir:<dir>' or a hub tag
    whisper_model: str | None = None  # faster-whisper dir or name; None: shipped tiny.en
    projector_dir: str = ""
    diffusion_base: str = ""  # a diffusers pipeline directory
    diffusion_cpu_offload: bool = False
    diffusion_nf4: bool = False
    fid_inception_weights: str = ""

    @classmethod
    def from_settings(cls) -> ModelChoice:
        return cls(
            clip_architecture=settings.clip_architecture(),
            clip_checkpoint=settings.clip_checkpoint(),
            whisper_model=settings.whisper_model(),
            projector_dir=settings.projector_dir(),
            diffusion_base=settings.diffusion_base(),
            diffusion_cpu_offload=settings.diffusion_cpu_offload(),
            diffusion_nf4=settings.diffusion_nf4(),
            fid_inception_weights=settings.fid_inception_weights(),
        )


def folder_model_store(root: str | Path) -> ms.ModelStore:
    root = Path(root)
    return ms.ModelStore(ms.FolderBackend(root), root / ".cache")


@dataclass
class Services:
    dsn: Callable[[], str] | None = None
    media: MediaStore | None = None
    models: ms.ModelStore | None = None
    tracker: Tracker | None = None
    compute: Compute = field(default_factory=Compute)
    choice: ModelChoice = field(default_factory=ModelChoice)

    @classmethod
    def from_settings(cls) -> Services:
        """Everything from the environment (the `mm` command, notebooks)."""
        from mm_pipelines.storage import s3
        from mm_pipelines.storage.media_store import LocalMediaStore, S3MediaStore
        from mm_pipelines.storage.postgres import embedded_dsn, ensure_schema

        def dsn() -> str:
            value = settings.pg_dsn() or embedded_dsn(settings.embedded_pg_dir())
            ensure_schema(value)
            return value

        bucket = settings.s3_bucket()
        if bucket:
            client = s3.client()
            cache = settings.cache_dir()
            media: MediaStore = S3MediaStore(client, bucket, settings.s3_prefix(), cache / "media")
            models = ms.ModelStore(
                ms.S3Backend(client, bucket, settings.s3_models_prefix()), cache / "models"
            )
        else:
            media = LocalMediaStore(settings.media_dir())
            models = folder_model_store(settings.models_dir())
        return cls(
            dsn=dsn,
            media=media,
            models=models,
            tracker=Tracker(
                settings.mlflow_tracking_uri(),
                settings.mlflow_artifact_root(),
                ui_url=settings.mlflow_ui_url(),
            ),
            compute=Compute(device=settings.device(), precision=settings.precision()),
            choice=ModelChoice.from_settings(),
        )

    # ----------------------------------------------------------------- required parts

    def need_dsn(self) -> str:
        if self.dsn is None:
            raise RuntimeError("this step needs the catalog database")
        return self.dsn()

    def need_media(self) -> MediaStore:
        if self.media is None:
            raise RuntimeError("this step needs the media store")
        return self.media

    def need_models(self) -> ms.ModelStore:
        if self.models is None:
            raise RuntimeError("this step needs the model store")
        return self.models

    def need_tracker(self) -> Tracker:
        if self.tracker is None:
            raise RuntimeError("this step needs experiment tracking (MLflow)")
        return self.tracker

    # ----------------------------------------------------------------- model resolution

    def clip_source(self) -> tuple[str, str]:
        """(architecture, checkpoint file) to load; fails clearly when nothing is there yet."""
        if self.choice.clip_checkpoint:
            return self.choice.clip_architecture, self.choice.clip_checkpoint
        try:
            artifact = self.need_models().get(ms.CLIP, DEMO)
        except ms.ArtifactNotFound as err:
            raise FileNotFoundError(
                f"{err}: materialize the clip_model asset first (or set MM_CLIP_CHECKPOINT)"
            ) from err
        return self.choice.clip_architecture, str(artifact.path / artifact.metadata["weights"])

    def load_clip(self) -> Any:
        from mm_pipelines.models.clip.loading import load_clip

        architecture, checkpoint = self.clip_source()
        return load_clip(architecture, checkpoint, device=self.compute.torch_device())

    def projector_dir(self) -> Path:
        if self.choice.projector_dir:
            return Path(self.choice.projector_dir)
        try:
            return self.need_models().get(ms.PROJECTOR, UNIFIED).path
        except ms.ArtifactNotFound as err:
            raise FileNotFoundError(f"{err}: materialize unified_projector first") from err

    def diffusion_base_dir(self) -> Path:
        if self.choice.diffusion_base:
            return Path(self.choice.diffusion_base)
        try:
            return self.need_models().get(ms.DIFFUSION_BASE, DEMO).path
        except ms.ArtifactNotFound as err:
            raise FileNotFoundError(
                f"{err}: materialize lora_base_model first (or set MM_DIFFUSION_BASE to a "
                "diffusers pipeline directory)"
            ) from err

    def load_base_pipeline(self, base_dir: Path | None = None) -> Any:
        from mm_pipelines.models.diffusion.pipeline import load_pipeline

        return load_pipeline(
            base_dir or self.diffusion_base_dir(),
            device=self.compute.torch_device(),
            precision=self.compute.precision,  # type: ignore[arg-type]
            cpu_offload=self.choice.diffusion_cpu_offload,
            quantize_nf4=self.choice.diffusion_nf4,
        )
