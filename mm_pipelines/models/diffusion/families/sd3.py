"""SD3 / SD3.5: two projected CLIP encoders (penultimate states side by side, padded to the
T5 width, then T5's sequence appended; both pooled embeddings concatenated), a joint
transformer predicting the flow velocity, preconditioned outputs (as diffusers' SD3
LoRA script trains by default: the loss is taken on the predicted clean latent)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mm_pipelines.models.common import autocast
from mm_pipelines.models.diffusion.families.base import Cond, penultimate_clip
from mm_pipelines.models.diffusion.families.flow import FlowFamily


class SD3(FlowFamily):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    trainable_text_encoder_names = ("text_encoder", "text_encoder_2")
    t5_name = "text_encoder_3"
    default_weighting = "logit_normal"
    precondition_outputs = True
    pipeline_max_sequence_length = 256

    def run_encoder(self, pipe: Any, name: str, ids: torch.Tensor) -> Cond:
        encoder = getattr(pipe, name)
        if name == self.t5_name:
            return {"hidden": encoder(ids.to(encoder.device))[0]}
        return penultimate_clip(encoder, ids)

    def combine(self, pipe: Any, outputs: dict[str, Cond], batch: int) -> Cond:
        clip = torch.cat([outputs[n]["hidden"] for n in self.text_encoder_names[:2]], dim=-1)
        if self.t5_name in outputs:
            t5 = outputs[self.t5_name]["hidden"]
        else:  # SD3 runs without T5: zeros in its place, as the pipeline does
            width = pipe.transformer.config.joint_attention_dim
            t5 = clip.new_zeros(batch, self.t5_length(pipe), width)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip, t5.to(clip.device, clip.dtype)], dim=-2),
            "pooled_projections": torch.cat(
                [outputs[n]["pooled"] for n in self.text_encoder_names[:2]], dim=-1
            ),
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
        with autocast(noisy.device, weight_dtype):
            return pipe.transformer(
                hidden_states=noisy.to(weight_dtype),
                timestep=timesteps,
                encoder_hidden_states=cond["encoder_hidden_states"].to(weight_dtype),
                pooled_projections=cond["pooled_projections"].to(weight_dtype),
                return_dict=False,
            )[0]
