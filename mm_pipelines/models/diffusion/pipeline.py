"""Loading and saving any diffusers pipeline directory, its resolution, prompt encoding.

`load_pipeline` is the general entry point for any diffusers pipeline directory (a real
SD 1.5 / SDXL / FLUX checkpoint on a GPU machine, or the demo's tiny one). Plain Python
(no Dagster, no MLflow).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mm_pipelines.models.common import Precision, resolve_device, resolve_dtype


def pipeline_resolution(pipeline: Any) -> int:
    """Pixel resolution the pipeline's denoiser was built for (any family)."""
    denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
    kind = "unet" if getattr(pipeline, "unet", None) is not None else "transformer"
    return _resolution(kind, dict(denoiser.config), dict(pipeline.vae.config))


def pipeline_dir_resolution(path: str | Path) -> int:
    """The same, read from a saved pipeline's configs (no weights loaded)."""
    kind = _denoiser_name(path)
    denoiser = json.loads((Path(path) / kind / "config.json").read_text())
    vae = json.loads((Path(path) / "vae" / "config.json").read_text())
    return _resolution(kind, denoiser, vae)


def _resolution(kind: str, denoiser: dict[str, Any], vae: dict[str, Any]) -> int:
    """UNets and SD3's transformer: latent sample size x VAE scale factor; FLUX's
    transformer has no size in its config: the VAE's sample size (1024 px for FLUX.1)."""
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    sample = denoiser.get("sample_size")
    if isinstance(sample, int):
        return sample * scale
    return int(vae.get("sample_size") or 1024)


@torch.no_grad()
def encode_prompts(pipeline: Any, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    """Text-encoder hidden states [N, L, D], padded to the tokenizer's max length."""
    tok = pipeline.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=pipeline.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return pipeline.text_encoder(tok.input_ids.to(device))[0]


# --------------------------------------------------------------------------- save / load


def save_pipeline(pipeline: Any, output_dir: str | Path) -> Path:
    """`save_pretrained` (safetensors); `StableDiffusionPipeline.from_pretrained(dir)` loads it."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(out, safe_serialization=True)
    return out


def load_pipeline(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    precision: Precision = "auto",
    cpu_offload: bool = False,
    quantize_nf4: bool = False,
    pipeline_cls: Any = None,
) -> Any:
    """Load any diffusers pipeline directory offline (SD 1.x, SDXL, FLUX ...).

    device/precision: bf16 (fp16 where bf16 is unsupported) on CUDA, fp32 on CPU.
    cpu_offload: `enable_model_cpu_offload` (components visit the GPU one at a time),
    for 24 GB cards; quantize_nf4: 4-bit NF4 (bitsandbytes) for the denoiser. Both are
    CUDA-only and raise a ValueError on CPU rather than silently doing nothing.
    """
    from diffusers import DiffusionPipeline

    device = resolve_device(device)
    dtype = resolve_dtype(device, precision)
    if (cpu_offload or quantize_nf4) and device.type != "cuda":
        switch = "cpu_offload" if cpu_offload else "quantize_nf4"
        raise ValueError(f"{switch} needs a CUDA device, got {device}")
    cls = pipeline_cls or DiffusionPipeline
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if quantize_nf4:
        kwargs["quantization_config"] = _nf4_config(path, dtype)
    pipe = cls.from_pretrained(str(path), **kwargs)
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    elif not quantize_nf4:
        pipe.to(device)
    else:
        # bnb-quantized weights are placed on the GPU at load; move the rest
        for name, comp in pipe.components.items():
            if isinstance(comp, torch.nn.Module) and name != _denoiser_name(path):
                comp.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _denoiser_name(path: str | Path) -> str:
    """'unet' for SD/SDXL, 'transformer' for DiT pipelines (SD3, FLUX)."""
    return "transformer" if (Path(path) / "transformer").is_dir() else "unet"


def _nf4_config(path: str | Path, dtype: torch.dtype) -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:  # optional, CUDA-only dependency
        raise ImportError(
            "quantize_nf4 needs the 'bitsandbytes' package (CUDA only): pip install bitsandbytes"
        ) from e
    from diffusers.quantizers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit",
        quant_kwargs={
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_compute_dtype": dtype,
        },
        components_to_quantize=[_denoiser_name(path)],
    )


def base_dir_version(path: str | Path) -> str:
    """Content version of a base pipeline directory, labelled with its family
    ("sdxl:<sha>", "flux:<sha>"); an unsupported pipeline class is refused here."""
    from mm_pipelines.models.common import weights_version
    from mm_pipelines.models.diffusion.families import family_of_dir

    return weights_version(path, family_of_dir(path).name)


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
