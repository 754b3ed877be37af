"""What SD3 and FLUX share: a transformer trained with the rectified-flow loss, CLIP and
T5 text encoders (T5 never trained: only CLIP gets a LoRA with train_text_encoder)."""

from __future__ import annotations

from typing import Any

import torch

from mm_pipelines.models.diffusion.families.base import Cond, Family
from mm_pipelines.models.diffusion.training import flow_matching_loss

# the attention projections of both streams, as diffusers' SD3 LoRA script targets them
JOINT_ATTENTION = (
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)


class FlowFamily(Family):
    denoiser_name = "transformer"
    flow_matching = True
    default_target_modules = JOINT_ATTENTION
    t5_name = "text_encoder_3"
    default_weighting = "logit_normal"
    precondition_outputs = False
    pipeline_max_sequence_length = 256  # the pipeline call's default

    def max_length(self, pipe: Any, encoder_name: str) -> int:
        tok_max = super().max_length(pipe, encoder_name)
        if encoder_name == self.t5_name:  # pipelines pad T5 prompts to max_sequence_length
            return min(tok_max, self.pipeline_max_sequence_length)
        return tok_max

    def t5_length(self, pipe: Any) -> int:
        if getattr(pipe, self.t5_name, None) is None:
            return self.pipeline_max_sequence_length
        return self.max_length(pipe, self.t5_name)

    def training_scheduler(self, pipe: Any) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def check_config(self, cfg: Any) -> None:
        for key in ("noise_offset", "snr_gamma"):
            if getattr(cfg, key):
                raise ValueError(
                    f"{key} applies to the DDPM families (sd, sdxl); {self.name} is trained "
                    "with the flow-matching loss (set weighting_scheme instead)"
                )

    def predict(
        self,
        pipe: Any,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Cond,
        cfg: Any,
        weight_dtype: torch.dtype,
    ) -> torch.Tensor:
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
        return flow_matching_loss(
            lambda noisy, t: self.predict(pipe, noisy, t, cond, cfg, weight_dtype),
            scheduler,
            latents,
            generator,
            weighting_scheme=cfg.weighting_scheme or self.default_weighting,
            logit_mean=cfg.logit_mean,
            logit_std=cfg.logit_std,
            mode_scale=cfg.mode_scale,
            precondition_outputs=self.precondition_outputs,
        )

    def call_kwargs(
        self,
        pipe: Any,
        guidance_scale: float,
        negative_prompt: str | None,
        batch: int,
        true_cfg_scale: float | None = None,
    ) -> dict[str, Any]:
        kwargs = super().call_kwargs(pipe, guidance_scale, negative_prompt, batch, true_cfg_scale)
        kwargs["max_sequence_length"] = self.t5_length(pipe)  # what training padded T5 to
        return kwargs
