"""SDXL: two CLIP text encoders (penultimate states side by side, pooled embedding of the
second) and the "text_time" micro-conditioning on original size, crop and target size."""

from __future__ import annotations

from typing import Any

import torch

from mm_pipelines.models.diffusion.families.base import Cond, penultimate_clip
from mm_pipelines.models.diffusion.families.sd import DDPMFamily


class SDXL(DDPMFamily):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    trainable_text_encoder_names = ("text_encoder", "text_encoder_2")

    def run_encoder(self, pipe: Any, name: str, ids: torch.Tensor) -> Cond:
        return penultimate_clip(getattr(pipe, name), ids)

    def combine(self, pipe: Any, outputs: dict[str, Cond], batch: int) -> Cond:
        parts = [outputs[n] for n in self.text_encoder_names if n in outputs]
        pooled = [p["pooled"] for p in parts if "pooled" in p]
        if not pooled:
            raise ValueError("SDXL needs a text encoder with a projection (text_encoder_2)")
        return {
            "encoder_hidden_states": torch.cat([p["hidden"] for p in parts], dim=-1),
            "text_embeds": pooled[-1],  # the last encoder's, as the pipeline does
        }

    def image_conditioning(self, pipe: Any, sizes: torch.Tensor, resolution: int) -> Cond:
        # (original h, w) + (crop top, left) + (target h, w), one row per image
        target = torch.tensor([resolution, resolution], dtype=sizes.dtype).expand(len(sizes), 2)
        return {"time_ids": torch.cat([sizes, target], dim=1).float()}

    def added_cond(self, cond: Cond, weight_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {
            "text_embeds": cond["text_embeds"].to(weight_dtype),
            "time_ids": cond["time_ids"].to(cond["text_embeds"].device, weight_dtype),
        }
