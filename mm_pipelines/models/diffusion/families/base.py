"""What every family adapter provides to the one LoRA trainer and to generation.

A family adapter knows its pipeline's parts (which denoiser, which text encoders), how
prompts become the denoiser's conditioning, how a noisy latent is scored (the training
loss) and which keyword arguments its diffusers pipeline takes at generation time.
Everything else (data, adapters, optimizer, checkpoints, validation) lives in lora.py
and is the same for every family.

Conditioning is a flat dict of batch-first tensors, so caching it and picking a batch out
of the cache is one line whatever the family: `{k: v[idx] for k, v in cond.items()}`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

Cond = dict[str, torch.Tensor]


class Family:
    name: str = ""
    pipeline_class: str = ""  # diffusers class name, for messages and directory detection
    denoiser_name: str = "unet"  # "unet" or "transformer"
    # every text encoder of the pipeline, in diffusers' order; what train_text_encoder adapts
    text_encoder_names: tuple[str, ...] = ("text_encoder",)
    trainable_text_encoder_names: tuple[str, ...] = ("text_encoder",)
    # LoRA targets as diffusers' dreambooth LoRA script for the family sets them
    default_target_modules: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")
    flow_matching: bool = False

    # ------------------------------------------------------------------ parts

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        return getattr(pipe, self.denoiser_name)

    def text_encoders(self, pipe: Any) -> dict[str, torch.nn.Module]:
        """The pipeline's text encoders by component name (absent ones left out)."""
        found = {n: getattr(pipe, n, None) for n in self.text_encoder_names}
        return {n: m for n, m in found.items() if m is not None}

    # ------------------------------------------------------------------ text

    def tokenizer_for(self, pipe: Any, encoder_name: str) -> Any:
        suffix = encoder_name.removeprefix("text_encoder")
        return getattr(pipe, f"tokenizer{suffix}")

    def max_length(self, pipe: Any, encoder_name: str) -> int:
        return int(self.tokenizer_for(pipe, encoder_name).model_max_length)

    def tokenize(self, pipe: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids per text encoder (CPU), padded as the pipeline pads them."""
        out = {}
        for name in self.text_encoders(pipe):
            out[name] = self.tokenizer_for(pipe, name)(
                list(prompts),
                padding="max_length",
                max_length=self.max_length(pipe, name),
                truncation=True,
                return_tensors="pt",
            ).input_ids
        return out

    def run_encoder(self, pipe: Any, name: str, ids: torch.Tensor) -> Cond:
        """One text encoder's outputs the conditioning is made of (batch-first)."""
        raise NotImplementedError

    def combine(self, pipe: Any, outputs: dict[str, Cond], batch: int) -> Cond:
        """Per-encoder outputs -> the denoiser's text conditioning."""
        raise NotImplementedError

    def image_conditioning(self, pipe: Any, sizes: torch.Tensor, resolution: int) -> Cond:
        """Per-image conditioning besides text (SDXL's size/crop ids); `sizes` is [N, 4]:
        original height, width, crop top, crop left."""
        return {}

    # ------------------------------------------------------------------ latents, loss

    def scale_latents(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents -> denoiser space: (z - shift) * scaling, as the pipeline undoes it."""
        cfg = pipe.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return (latents - shift) * float(cfg.scaling_factor)

    def training_scheduler(self, pipe: Any) -> Any:
        """A fresh noise scheduler for training (the pipeline's own keeps inference state)."""
        raise NotImplementedError

    def loss(
        self,
        pipe: Any,
        scheduler: Any,
        latents: torch.Tensor,
        cond: Cond,
        generator: torch.Generator,
        cfg: Any,
        weight_dtype: torch.dtype,
    ) -> torch.Tensor:
        """Per-sample loss [B]; every random draw comes from `generator` (resumable)."""
        raise NotImplementedError

    def check_config(self, cfg: Any) -> None:
        """Refuse settings that mean nothing for this family (clear error, never ignored)."""

    # ------------------------------------------------------------------ generation

    def call_kwargs(
        self,
        pipe: Any,
        guidance_scale: float,
        negative_prompt: str | None,
        batch: int,
        true_cfg_scale: float | None = None,
    ) -> dict[str, Any]:
        """Keyword arguments of the pipeline call besides prompts, seeds, steps and size."""
        if true_cfg_scale is not None:
            raise ValueError(f"true_cfg_scale is a FLUX.1 setting, not one of {self.name}")
        kwargs: dict[str, Any] = {"guidance_scale": guidance_scale}
        if negative_prompt is not None:
            kwargs["negative_prompt"] = [negative_prompt] * batch
        return kwargs


def penultimate_clip(encoder: torch.nn.Module, ids: torch.Tensor) -> Cond:
    """SDXL/SD3 CLIP use: penultimate hidden states, and the projected (pooled) embedding
    when the encoder has a projection (CLIPTextModelWithProjection)."""
    out = encoder(ids.to(encoder.device), output_hidden_states=True)
    result = {"hidden": out.hidden_states[-2]}
    if out[0].ndim == 2:  # text_embeds of a CLIPTextModelWithProjection
        result["pooled"] = out[0]
    return result
