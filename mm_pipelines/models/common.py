"""Helpers every model domain shares: CPUs, device and precision, autocast, image encoding and
grids, content hashes of weight files. Torch level only (no psycopg, Dagster or MLflow).

torch is imported inside the functions that use it: the image and hash helpers are used
by drivers that Dagster imports with the definitions, and a step that never touches a
model should not pay torch's import (seconds per step process)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    import torch

# --------------------------------------------------------------------------- CPUs

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cpus(cpu_max: Path | None = None) -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a
    Kubernetes pod's CPU limit; `os.cpu_count()` there reports the node's cores, and 16
    reader processes in a 4-CPU pod would be throttled, not faster)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = (cpu_max or CGROUP_CPU_MAX).read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    return cpus


# --------------------------------------------------------------------------- device / dtype

Precision = Literal["auto", "fp32", "fp16", "bf16"]

_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None`/"auto" -> CUDA when available, else CPU."""
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(device: str | torch.device, precision: Precision = "auto") -> torch.dtype:
    """bf16 (or fp16 on pre-Ampere) on CUDA, fp32 on CPU.

    Half precision on CPU is refused rather than silently changed: CPU half kernels are
    slow or missing, and a config that asks for it is almost certainly a mistake.
    """
    import torch

    device = torch.device(device)
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if precision not in _DTYPE_NAMES:
        raise ValueError(f"precision must be one of auto/fp32/fp16/bf16, got {precision!r}")
    dtype = getattr(torch, _DTYPE_NAMES[precision])
    if device.type == "cpu" and dtype != torch.float32:
        raise ValueError(f"precision {precision!r} needs CUDA; use 'fp32' or 'auto' on CPU")
    return dtype


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's weights live (its first parameter or buffer); CPU when it has none.

    Inputs a function builds for a model go here, never to a default device: that is what
    makes the same code run on CPU, CUDA and (in the device tests) PyTorch's meta device.
    """
    import torch

    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The floating dtype of a module's weights (float32 when it has none)."""
    import torch

    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA only; a no-op on CPU (fp32 there)."""
    import torch

    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- images


def _to_pil(image: np.ndarray | Image.Image) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))


def encode_image(
    image: np.ndarray | Image.Image, fmt: Literal["jpeg", "webp", "png"] = "jpeg", quality: int = 90
) -> bytes:
    """Encode a frame to JPEG / WebP (lossy, `quality` 1-100) or PNG bytes."""
    buffer = io.BytesIO()
    pil = _to_pil(image).convert("RGB")
    if fmt == "png":
        pil.save(buffer, format="PNG", optimize=True)
    else:
        pil.save(buffer, format=fmt.upper(), quality=quality)
    return buffer.getvalue()


def thumbnail(image: np.ndarray | Image.Image, width: int = 160) -> Image.Image:
    """A copy `width` px wide, aspect kept (keep these, not full frames, for a sheet)."""
    pil = _to_pil(image).convert("RGB")
    height = max(1, round(pil.height * width / pil.width))
    return pil.resize((width, height), Image.Resampling.BILINEAR)


def contact_sheet(
    images: Sequence[np.ndarray | Image.Image],
    *,
    labels: Sequence[str] | None = None,
    columns: int = 4,
    thumb_width: int = 160,
    gap: int = 4,
) -> bytes:
    """A grid of thumbnails (optionally captioned, e.g. with timestamps) as PNG bytes,
    small enough to inline as a data URI in Dagster markdown metadata."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    thumbs = [thumbnail(im, thumb_width) for im in images]
    cell_h = max(t.height for t in thumbs) + (14 if labels else 0)
    columns = max(1, min(columns, len(thumbs)))
    rows = math.ceil(len(thumbs) / columns)
    sheet = Image.new(
        "RGB",
        (columns * (thumb_width + gap) + gap, rows * (cell_h + gap) + gap),
        (24, 24, 24),
    )
    draw = ImageDraw.Draw(sheet)
    for i, thumb in enumerate(thumbs):
        x = gap + (i % columns) * (thumb_width + gap)
        y = gap + (i // columns) * (cell_h + gap)
        sheet.paste(thumb, (x, y))
        if labels:
            draw.text((x + 2, y + thumb.height + 1), str(labels[i]), fill=(230, 230, 230))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def image_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile images into one grid (sample grids for MLflow / Dagster metadata)."""
    if not images:
        raise ValueError("no images")
    cols = cols or min(len(images), 8)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    scale = size / min(w, h)
    if (w, h) != (size, size):
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


# --------------------------------------------------------------------------- versions


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_version(folder: str | Path, prefix: str) -> str:
    """Content-derived version of a model folder: sha256 over its weight files (sorted)."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(folder).rglob("*.safetensors") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no .safetensors weights under {folder}")
    for p in files:
        h.update(p.relative_to(folder).as_posix().encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return f"{prefix}-{h.hexdigest()[:12]}"
