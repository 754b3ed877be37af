"""Memory and speed switches of LoRA training: checked up front, applied in one place.

| switch                 | what it does                                            | where |
|------------------------|---------------------------------------------------------|-------|
| gradient_checkpointing | recompute denoiser activations in backward              | any   |
| cache_latents          | VAE posteriors once; the VAE leaves the GPU meanwhile   | any   |
| cache_text_embeddings  | frozen encoders run once and leave the GPU              | any   |
| optimizer: adamw8bit   | bitsandbytes 8-bit AdamW states                         | CUDA  |
| nf4                    | denoiser linears in 4-bit NF4 (QLoRA), LoRA in fp32     | CUDA  |
| attention_backend      | default (PyTorch's pick, cuDNN left out), math: any;    |       |
|                        | flash, efficient, cudnn: that kernel only               | CUDA  |

cuDNN's fused attention is left out of "default": on an H200 it crashed on FLUX's
attention shapes ("illegal memory access" in mha_graph.execute) until it was disabled.
A CUDA-only switch on another device is a ValueError naming the switch, never a no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

ATTENTION_BACKENDS = ("default", "math", "flash", "efficient", "cudnn")
OPTIMIZERS = ("adamw", "adamw8bit")


def check_switches(cfg: Any, device: torch.device) -> None:
    """Refuse CUDA-only switches off CUDA and unknown values, before any work is done."""
    if cfg.attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention_backend {cfg.attention_backend!r} is not one of {list(ATTENTION_BACKENDS)}"
        )
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {cfg.optimizer!r} is not one of {list(OPTIMIZERS)}")
    cuda_only = {
        "optimizer=adamw8bit": cfg.optimizer == "adamw8bit",
        "nf4": cfg.nf4,
        f"attention_backend={cfg.attention_backend}": cfg.attention_backend
        in ("flash", "efficient", "cudnn"),
    }
    for name, on in cuda_only.items():
        if on and device.type != "cuda":
            raise ValueError(f"LoRA setting {name} needs a CUDA device, got {device}")
    if cfg.optimizer == "adamw8bit" or cfg.nf4:
        _bitsandbytes("optimizer=adamw8bit" if cfg.optimizer == "adamw8bit" else "nf4")


def _bitsandbytes(switch: str) -> Any:
    try:
        import bitsandbytes
    except ImportError as err:  # optional, CUDA-only dependency
        raise ImportError(
            f"LoRA setting {switch} needs the 'bitsandbytes' package (CUDA only): "
            "pip install bitsandbytes"
        ) from err
    return bitsandbytes


@contextlib.contextmanager
def attention_backend(name: str, device: torch.device) -> Iterator[None]:
    """Restrict scaled_dot_product_attention to the named kernels for the block."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {
        "math": [SDPBackend.MATH],
        "flash": [SDPBackend.FLASH_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
        "cudnn": [SDPBackend.CUDNN_ATTENTION],
        "default": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    }[name]
    if name == "default" and device.type != "cuda":
        yield  # PyTorch's own CPU choice; cuDNN does not exist there
        return
    with sdpa_kernel(chosen):
        yield


def make_lora_optimizer(params: list[torch.nn.Parameter], cfg: Any) -> torch.optim.Optimizer:
    """AdamW (foreach) or bitsandbytes' AdamW8bit with the same hyper-parameters."""
    from mm_pipelines.models.diffusion.training import make_optimizer

    if cfg.optimizer == "adamw8bit":
        bnb = _bitsandbytes("optimizer=adamw8bit")
        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=1e-2)
    return make_optimizer(params, cfg.learning_rate)


def is_nf4(module: torch.nn.Module) -> bool:
    return any(type(m).__name__ == "Linear4bit" for m in module.modules())


def quantize_nf4_(module: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace every nn.Linear under `module` with a bitsandbytes NF4 Linear4bit in place
    (QLoRA: the frozen base in 4 bits, LoRA layers added on top stay fp32); CUDA only.
    Returns the number of layers quantized. Already-quantized modules are left alone."""
    bnb = _bitsandbytes("nf4")
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            device = child.weight.device
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                quant_type="nf4",
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, quant_type="nf4", module=q
            ).to(device)  # quantized on the move to CUDA (module gets its quant_state)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, name, q)
            count += 1
        else:
            count += quantize_nf4_(child, compute_dtype)
    return count
