"""SD 1.x / 2.x: one CLIP text encoder (last hidden states), epsilon/v-prediction UNet."""

from __future__ import annotations

from typing import Any

import torch

from mm_pipelines.models.diffusion.families.base import Cond, Family
from mm_pipelines.models.diffusion.training import diffusion_loss


class DDPMFamily(Family):
    """The UNet families: DDPM noise schedule, noise offset and Min-SNR apply."""

    def training_scheduler(self, pipe: Any) -> Any:
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(pipe.scheduler.config)

    def added_cond(self, cond: Cond, weight_dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        return None

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
        return diffusion_loss(
            pipe.unet,
            scheduler,
            latents,
            cond["encoder_hidden_states"],
            generator,
            weight_dtype,
            cfg.noise_offset,
            cfg.snr_gamma,
            added_cond_kwargs=self.added_cond(cond, weight_dtype),
        )


class SD(DDPMFamily):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"

    def run_encoder(self, pipe: Any, name: str, ids: torch.Tensor) -> Cond:
        encoder = getattr(pipe, name)
        return {"hidden": encoder(ids.to(encoder.device))[0]}

    def combine(self, pipe: Any, outputs: dict[str, Cond], batch: int) -> Cond:
        return {"encoder_hidden_states": outputs["text_encoder"]["hidden"]}
