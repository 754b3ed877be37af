"""CLIP model provider: an open_clip architecture + checkpoint, loaded offline.

A checkpoint is one of
- a file path (``.safetensors``/``.pt``/``.bin``) for the architecture,
- ``local-dir:/path`` (a folder with ``open_clip_config.json`` + weights; the architecture
  argument is then only a label),
- an open_clip pretrained tag or ``hf-hub:org/repo`` (only on a machine that can download),
- ``None``: random weights, seeded so the same seed always gives the same model.

Every vector derived from a model records ``ClipBundle.model_version``; it names the
architecture and the checkpoint's content hash, so a retrained model never mixes with an
old one and an unchanged one is recognised across runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from PIL import Image

from mm_pipelines.models.common import file_sha256, resolve_device

TINY_ARCH = "mm-tiny-clip"
# Small enough to train on 2 CPU cores in minutes; large enough to bind colour to role
# ("red circle on blue" vs "blue circle on red") and shape to word.
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 4},
}
LOCAL_DIR_PREFIX = "local-dir:"
HF_HUB_PREFIX = "hf-hub:"
CONFIG_FILENAME = "open_clip_config.json"
WEIGHTS_FILENAME = "open_clip_model.safetensors"
PRECISIONS = ("fp32", "amp", "amp_bf16", "amp_fp16", "fp16", "bf16")

_registered: set[str] = set()
_config_dir: Path | None = None


@dataclass
class ClipBundle:
    """Everything needed to embed with one CLIP model."""

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Any
    context_length: int
    device: torch.device
    precision: str
    architecture: str
    checkpoint: str | None
    model_version: str
    embed_dim: int

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision where the precision asks for it (CUDA), a no-op otherwise."""
        dtype = autocast_dtype(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @property
    def input_dtype(self) -> torch.dtype:
        """dtype the image tensors must have (half only for pure half-precision weights)."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision, torch.float32)


def register_architecture(name: str, config: dict[str, Any]) -> str:
    """Make an architecture config known to open_clip (``add_model_config`` wants a file)."""
    global _config_dir
    if name in _registered and name in open_clip.list_models():
        return name
    if _config_dir is None:
        _config_dir = Path(tempfile.mkdtemp(prefix="mm_open_clip_configs_"))
    path = _config_dir / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    _registered.add(name)
    return name


def register_tiny_architecture() -> str:
    return register_architecture(TINY_ARCH, TINY_CONFIG)


def resolve_precision(device: torch.device, precision: str | None) -> str:
    """Default: bf16 autocast on CUDA (fp16 where bf16 is unsupported), fp32 elsewhere."""
    if precision is None:
        if device.type != "cuda":
            return "fp32"
        return "amp_bf16" if torch.cuda.is_bf16_supported() else "amp_fp16"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"amp": torch.float16, "amp_fp16": torch.float16, "amp_bf16": torch.bfloat16}.get(
        precision
    )


def _find_weights(folder: Path) -> Path:
    for pattern in ("*.safetensors", "*.bin", "*.pth", "*.pt"):
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    raise FileNotFoundError(f"no weights file in {folder}")


def _model_version(architecture: str, checkpoint: str | None, seed: int) -> str:
    if checkpoint is None:
        return f"{architecture}@random-seed{seed}"
    if checkpoint.startswith(LOCAL_DIR_PREFIX):
        folder = Path(checkpoint[len(LOCAL_DIR_PREFIX) :])
        return f"{architecture}@sha256:{file_sha256(_find_weights(folder))[:16]}"
    if os.path.isfile(checkpoint):
        return f"{architecture}@sha256:{file_sha256(checkpoint)[:16]}"
    return f"{architecture}@{checkpoint}"  # a hub tag names its weights already


def checkpoint_version(architecture: str, checkpoint: str | os.PathLike | None) -> str:
    """The `model_version` load_clip gives, without loading the model (hashes the file)."""
    return _model_version(architecture, None if checkpoint is None else os.fspath(checkpoint), 0)


def _open_clip_args(architecture: str, checkpoint: str | None) -> tuple[str, str | None]:
    """(model_name, pretrained) as open_clip wants them."""
    if checkpoint is None:
        return architecture, None
    if checkpoint.startswith((LOCAL_DIR_PREFIX, HF_HUB_PREFIX)):
        return checkpoint, None
    return architecture, checkpoint


def load_clip(
    architecture: str = TINY_ARCH,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device | None = "cpu",
    precision: str | None = None,
    seed: int = 0,
) -> ClipBundle:
    """Load a CLIP model for inference (eval mode) on ``device``.

    ``precision`` None means: autocast bf16/fp16 on CUDA, fp32 on CPU. Mixed precision
    keeps fp32 weights and autocasts; 'fp16'/'bf16' cast the weights themselves.
    """
    register_tiny_architecture()
    dev = resolve_device(device)
    prec = resolve_precision(dev, precision)
    ckpt = None if checkpoint is None else os.fspath(checkpoint)
    if ckpt is not None and ckpt.startswith(LOCAL_DIR_PREFIX):
        ckpt = LOCAL_DIR_PREFIX + str(Path(ckpt[len(LOCAL_DIR_PREFIX) :]).resolve())
    model_name, pretrained = _open_clip_args(architecture, ckpt)
    # open_clip only knows fp32 / lp weights; autocast modes keep fp32 weights.
    weight_precision = prec if prec in ("fp16", "bf16") else "fp32"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # only matters for random init; keeps it reproducible
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, precision=weight_precision, device=dev
        )
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    context_length = int(getattr(model, "context_length", tokenizer.context_length))
    return ClipBundle(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        context_length=context_length,
        device=dev,
        precision=prec,
        architecture=architecture,
        checkpoint=ckpt,
        model_version=_model_version(architecture, ckpt, seed),
        embed_dim=_embed_dim(model),
    )


def _embed_dim(model: torch.nn.Module) -> int:
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.Tensor):
        return int(proj.shape[-1])
    return int(model.visual.output_dim)


def save_checkpoint(model: torch.nn.Module, path: str | Path) -> str:
    """Save weights loadable as ``checkpoint=path``; returns the file's sha256.

    open_clip picks the format by suffix: ``.safetensors`` is written as safetensors,
    anything else as a plain ``torch.save`` state dict (loads with weights_only=True).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return file_sha256(path)


def save_local_dir(model: torch.nn.Module, architecture: str, folder: str | Path) -> str:
    """Write a self-describing model folder; returns its ``local-dir:`` checkpoint string.

    The folder carries the architecture config, so it loads on a machine where the
    architecture was never registered (e.g. an MLflow artifact pulled elsewhere).
    """
    register_tiny_architecture()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = open_clip.get_model_config(architecture)
    if config is None:
        raise ValueError(f"architecture {architecture!r} is not registered with open_clip")
    preprocess_cfg = dict(getattr(model.visual, "preprocess_cfg", {}))
    payload = {"model_cfg": config, "preprocess_cfg": preprocess_cfg}
    (folder / CONFIG_FILENAME).write_text(json.dumps(payload, indent=2))
    save_checkpoint(model, folder / WEIGHTS_FILENAME)
    return f"{LOCAL_DIR_PREFIX}{folder.resolve()}"
