"""A small real pipeline for the curation tests: a landing folder, the embedded Postgres,
a local media and model store, the demo CLIP (session fixture `demo_clip`) and a unified
projector whose image/text path is the identity (untrained audio head: no audio here).

Batches go through the real drivers: ingest, CLIP embeddings, unified vectors, index."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance

from mm_pipelines.pipeline import embed
from mm_pipelines.pipeline.ingest import ingest_batch
from mm_pipelines.pipeline.services import Compute, ModelChoice, Services, folder_model_store
from mm_pipelines.pipeline.tracking import Tracker
from mm_pipelines.storage.landing import LocalLanding
from mm_pipelines.storage.media_store import LocalMediaStore

WHISPER_TINY_DIM = 384  # the projector's audio input; never used here


def untrained_projector(folder: Path, clip_dim: int, clip_version: str) -> Path:
    import torch

    from mm_pipelines.models.unified.projector import (
        AudioHead,
        ProjectorConfig,
        UnifiedProjector,
        save_projector,
    )

    torch.manual_seed(0)
    head = AudioHead(WHISPER_TINY_DIM, 32, clip_dim)
    config = ProjectorConfig(WHISPER_TINY_DIM, clip_dim, 32, clip_version, "none")
    save_projector(UnifiedProjector(config, head), folder)
    return folder


@dataclass
class CurationEnv:
    root: Path
    dsn: str
    clip_checkpoint: Path
    svc: Services = field(init=False)

    def __post_init__(self) -> None:
        from mm_pipelines.models.clip.loading import load_clip

        clip = load_clip("mm-tiny-clip", self.clip_checkpoint)
        projector = untrained_projector(self.root / "projector", clip.embed_dim, clip.model_version)
        self.svc = Services(
            dsn=lambda: self.dsn,
            media=LocalMediaStore(self.root / "media"),
            models=folder_model_store(self.root / "models"),
            tracker=Tracker(
                f"sqlite:///{self.root / 'mlflow.db'}", (self.root / "mlartifacts").as_uri()
            ),
            compute=Compute(device="cpu", dataloader_workers=0, io_workers=2),
            choice=ModelChoice(
                clip_checkpoint=str(self.clip_checkpoint), projector_dir=str(projector)
            ),
        )

    @property
    def landing(self) -> Path:
        return self.root / "landing"

    def land(self, batch: str, files: dict[str, tuple[Image.Image, dict]]) -> Path:
        """Write `relpath -> (image, manifest fields)` as a ready landing batch."""
        folder = self.landing / batch
        folder.mkdir(parents=True)
        manifest = []
        for rel, (image, fields) in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            if rel.endswith(".jpg"):
                image.save(folder / rel, quality=fields.pop("quality", 92))
            else:
                image.save(folder / rel)
            manifest.append({"path": rel, **fields})
        (folder / "_manifest.jsonl").write_text("\n".join(json.dumps(m) for m in manifest))
        (folder / "_READY").touch()
        return folder

    def process(self, batch: str) -> None:
        """Ingest, embed with CLIP, project and index the batch (what batch_pipeline does
        up to vector_index, without video and audio)."""
        ingest_batch(LocalLanding(self.landing), batch, self.svc.need_media(), self.dsn, workers=2)
        embed.embed_clip_batch(self.svc, batch)
        frame = embed.unified_batch(self.svc, batch).frame
        embed.index_batch(self.svc, batch, frame)


# --------------------------------------------------------------------------- edits


def jpeg(image: Image.Image, quality: int = 40) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def crop(image: Image.Image, fraction: float = 0.05) -> Image.Image:
    """5% off every side."""
    w, h = image.size
    dx, dy = round(w * fraction), round(h * fraction)
    return image.crop((dx, dy, w - dx, h - dy))


def watermark(image: Image.Image) -> Image.Image:
    out = image.copy()
    w, h = out.size
    ImageDraw.Draw(out).text((w * 0.05, h * 0.82), "(c) ACME 2025", fill=(255, 255, 255))
    return out


# the edits of the issue: each makes a near-duplicate of its input
EDITS = {
    "jpeg_q40": jpeg,
    "resize_50": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.BILINEAR),
    "crop_5": crop,
    "hflip": lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "brightness_20": lambda im: ImageEnhance.Brightness(im).enhance(1.2),
    "watermark": watermark,
}
