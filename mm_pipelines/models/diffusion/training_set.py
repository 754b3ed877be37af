"""A subject's training set: catalog images cropped to the model's resolution, with the
captions they are trained with and the content hashes they came from."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mm_pipelines.models.common import resize_center_crop

TRAINING_SET_MANIFEST = "training_set.json"


@dataclass
class TrainingSet:
    images: list[Image.Image]  # resized and centre-cropped to the model's resolution
    captions: list[str]  # what the adapter is trained with (the instance prompt by default)
    source_hashes: list[str]  # content hash of each catalog image
    source_captions: list[str | None]
    resolution: int

    @property
    def version(self) -> str:
        """Changes when any source image, caption or the resolution changes."""
        blob = json.dumps([self.source_hashes, self.captions, self.resolution])
        return "ts-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_training_set(
    items: Sequence[tuple[bytes, str, str | None]],
    resolution: int,
    instance_prompt: str,
) -> tuple[TrainingSet, list[tuple[str, str]]]:
    """`items` are (image bytes, content hash, catalog caption). Returns the set and the
    (content hash, reason) of images that could not be used (they are left out, not fatal)."""
    ts = TrainingSet([], [], [], [], resolution)
    skipped: list[tuple[str, str]] = []
    for data, content_hash, caption in items:
        try:
            with Image.open(io.BytesIO(data)) as im:
                image = resize_center_crop(im.convert("RGB"), resolution)
        except (OSError, ValueError) as err:
            skipped.append((content_hash, f"does not decode: {err}"))
            continue
        ts.images.append(image)
        ts.captions.append(instance_prompt)
        ts.source_hashes.append(content_hash)
        ts.source_captions.append(caption)
    return ts, skipped


def save_training_set(ts: TrainingSet, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (image, content_hash) in enumerate(zip(ts.images, ts.source_hashes, strict=True)):
        name = f"{i:04d}_{content_hash[:12]}.png"
        image.save(folder / name)
        files.append(name)
    manifest = {
        "version": ts.version,
        "resolution": ts.resolution,
        "files": files,
        "captions": ts.captions,
        "source_hashes": ts.source_hashes,
        "source_captions": ts.source_captions,
    }
    (folder / TRAINING_SET_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder


def load_training_set(folder: str | Path) -> TrainingSet:
    folder = Path(folder)
    manifest_path = folder / TRAINING_SET_MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no training set at {folder}: materialize lora_training_set first")
    m = json.loads(manifest_path.read_text())
    images = []
    for name in m["files"]:
        with Image.open(folder / name) as im:
            images.append(im.convert("RGB"))
    return TrainingSet(
        images, m["captions"], m["source_hashes"], m["source_captions"], m["resolution"]
    )
