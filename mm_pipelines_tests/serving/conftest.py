"""Serving fixtures: untrained tiny models (no training needed to prove an export) and
the bundles exported from them, built once per test session.

Two model sets, A and B (different random CLIP weights and audio heads), so that a
bundle switch is visible in every vector. Set A also has a tiny diffusion pipeline and a
LoRA whose up-projections are random (a fresh LoRA is zero-initialised on one side and
would change nothing, which would hide a lost adapter).
"""

from __future__ import annotations

import io
import os
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch


@dataclass(frozen=True)
class ModelSet:
    clip_checkpoint: Path
    clip_version: str
    projector_dir: Path
    diffusion_base_dir: Path | None = None
    lora_adapter_dir: Path | None = None


def _clip_and_projector(root: Path, name: str, seed: int, audio_dim: int, audio_version: str):
    from mm_pipelines.models.clip.loading import load_clip, save_checkpoint
    from mm_pipelines.models.unified.projector import (
        AudioHead,
        ProjectorConfig,
        UnifiedProjector,
        save_projector,
    )

    ckpt = root / f"clip_{name}.safetensors"
    save_checkpoint(load_clip(checkpoint=None, seed=seed).model, ckpt)
    clip = load_clip(checkpoint=ckpt)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AudioHead(audio_dim, 64, clip.embed_dim)
    head.in_mean.copy_(torch.randn(audio_dim, generator=gen) * 0.01)
    head.in_std.copy_(torch.rand(audio_dim, generator=gen) + 0.5)
    config = ProjectorConfig(audio_dim, clip.embed_dim, 64, clip.model_version, audio_version)
    save_projector(UnifiedProjector(config, head), root / f"projector_{name}")
    return ckpt, clip.model_version, root / f"projector_{name}"


def _diffusion(root: Path) -> tuple[Path, Path]:
    from mm_pipelines.models.demo.tiny_diffusion import build_tiny_pipeline
    from mm_pipelines.models.diffusion.lora import LoraTrainConfig, add_lora_adapters, save_adapter
    from mm_pipelines.models.diffusion.pipeline import save_pipeline

    pipe = build_tiny_pipeline(seed=0)
    save_pipeline(pipe, root / "diffusion_base")
    add_lora_adapters(pipe, LoraTrainConfig(seed=0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    save_adapter(pipe, root / "lora")
    return root / "diffusion_base", root / "lora"


@pytest.fixture(scope="session")
def whisper_info() -> tuple[int, str]:
    from mm_pipelines.models.speech.audio_encoder import load_whisper_encoder

    enc = load_whisper_encoder(device="cpu")
    return enc.dim, enc.model_version


@pytest.fixture(scope="session")
def model_sets(tmp_path_factory, whisper_info) -> dict[str, ModelSet]:
    root = tmp_path_factory.mktemp("serving_sources")
    dim, version = whisper_info
    a = _clip_and_projector(root, "a", 0, dim, version)
    b = _clip_and_projector(root, "b", 1, dim, version)
    base, lora = _diffusion(root)
    return {"a": ModelSet(*a, base, lora), "b": ModelSet(*b)}


def export(models: ModelSet, out: Path, **kwargs):
    from mm_pipelines.serving.export import export_bundle

    return export_bundle(
        out,
        clip_architecture="mm-tiny-clip",
        clip_checkpoint=models.clip_checkpoint,
        projector_dir=models.projector_dir,
        diffusion_base_dir=models.diffusion_base_dir,
        lora_adapter_dir=models.lora_adapter_dir,
        **kwargs,
    )


@pytest.fixture(scope="session")
def bundle_a(tmp_path_factory, model_sets):
    """Bundle A: CLIP + projector + Whisper reference + fused LoRA pipeline."""
    return export(
        model_sets["a"],
        tmp_path_factory.mktemp("bundles") / "a",
        clip_model_version=model_sets["a"].clip_version,
        models_info={
            "clip": {
                "registered_name": "mm-clip",
                "registered_version": "3",
                "mlflow_run_id": "r1",
            },
            "diffusion": {"registered_name": "mm-lora-acme", "mlflow_run_id": "r2"},
        },
        source_hashes={"clip_training_set": "sha256:abc", "lora_training_set": "sha256:def"},
        dagster_run_id="dagster-run-a",
        bundle_version="bundle-a",
    )


@pytest.fixture(scope="session")
def bundle_b(tmp_path_factory, model_sets):
    """Bundle B: other CLIP weights and head, no generator."""
    return export(
        model_sets["b"],
        tmp_path_factory.mktemp("bundles") / "b",
        dagster_run_id="dagster-run-b",
        bundle_version="bundle-b",
    )


def wav_bytes(seconds: float, freq: float = 440.0, rate: int = 16_000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def png_bytes(width: int, height: int, colour=(200, 30, 30)) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (20, 40, 200))
    ImageDraw.Draw(img).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def child_env() -> dict[str, str]:
    """Environment for subprocesses: one thread each (the machine is shared)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
