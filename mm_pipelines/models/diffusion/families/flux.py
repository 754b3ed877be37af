"""FLUX.1: CLIP gives only the pooled embedding, T5 the token sequence; latents are packed
into 2x2 patches with (0, row, col) position ids; [dev] has a guidance embedding, fed a
fixed guidance value during training as diffusers' FLUX LoRA script does."""

from __future__ import annotations

from typing import Any

import torch

from mm_pipelines.models.common import autocast
from mm_pipelines.models.diffusion.families.base import Cond
from mm_pipelines.models.diffusion.families.flow import JOINT_ATTENTION, FlowFamily


class Flux(FlowFamily):
    name = "flux"
    pipeline_class = "FluxPipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    trainable_text_encoder_names = ("text_encoder",)
    t5_name = "text_encoder_2"
    # attention of both streams plus the feed-forwards (diffusers' FLUX LoRA script)
    default_target_modules = JOINT_ATTENTION + (
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    )
    default_weighting = "none"
    precondition_outputs = False
    pipeline_max_sequence_length = 512

    def run_encoder(self, pipe: Any, name: str, ids: torch.Tensor) -> Cond:
        encoder = getattr(pipe, name)
        if name == self.t5_name:
            return {"hidden": encoder(ids.to(encoder.device))[0]}
        return {"pooled": encoder(ids.to(encoder.device)).pooler_output}

    def combine(self, pipe: Any, outputs: dict[str, Cond], batch: int) -> Cond:
        return {
            "encoder_hidden_states": outputs[self.t5_name]["hidden"],
            "pooled_projections": outputs["text_encoder"]["pooled"],
        }

    def predict(
        self,
        pipe: Any,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Cond,
        cfg: Any,
        weight_dtype: torch.dtype,
    ) -> torch.Tensor:
        from diffusers import FluxPipeline

        transformer = pipe.transformer
        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(
            b, h // 2, w // 2, noisy.device, weight_dtype
        )
        text = cond["encoder_hidden_states"]
        txt_ids = torch.zeros(text.shape[1], 3, device=noisy.device, dtype=weight_dtype)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((b,), float(cfg.train_guidance_scale), device=noisy.device)
        with autocast(noisy.device, weight_dtype):
            out = transformer(
                hidden_states=packed.to(weight_dtype),
                timestep=timesteps / 1000,  # the transformer scales it back by 1000
                guidance=guidance,
                pooled_projections=cond["pooled_projections"].to(weight_dtype),
                encoder_hidden_states=text.to(weight_dtype),
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
        scale = pipe.vae_scale_factor
        return FluxPipeline._unpack_latents(out, h * scale, w * scale, scale)

    def call_kwargs(
        self,
        pipe: Any,
        guidance_scale: float,
        negative_prompt: str | None,
        batch: int,
        true_cfg_scale: float | None = None,
    ) -> dict[str, Any]:
        # FLUX.1's guidance_scale feeds the guidance embedding ([dev]); a negative prompt only
        # acts through true classifier-free guidance (true_cfg_scale > 1, twice the compute)
        if negative_prompt is not None and not (true_cfg_scale and true_cfg_scale > 1):
            raise ValueError(
                "FLUX.1 ignores a negative prompt unless true_cfg_scale > 1 is set as well"
            )
        kwargs: dict[str, Any] = {
            "guidance_scale": guidance_scale,
            "max_sequence_length": self.t5_length(pipe),
        }
        if negative_prompt is not None:
            kwargs["negative_prompt"] = [negative_prompt] * batch
            kwargs["true_cfg_scale"] = true_cfg_scale
        return kwargs
