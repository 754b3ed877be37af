"""What every diffusion training loop shares: pixels to tensors, cached VAE posteriors,
the noise-prediction loss and the optimizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mm_pipelines.models.common import autocast, resize_center_crop


def images_to_tensor(images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
    """PIL images -> float tensor [N, 3, R, R] in [-1, 1] (resize shorter side, centre crop)."""
    arrays = [np.asarray(resize_center_crop(im.convert("RGB"), resolution)) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x.contiguous()


@torch.no_grad()
def encode_latent_dist(
    vae: Any, pixels: torch.Tensor, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and std (unscaled), computed once so training steps skip the VAE."""
    means, stds = [], []
    dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    for chunk in pixels.split(batch_size):
        dist = vae.encode(chunk.to(device, dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def sample_latents(
    mean: torch.Tensor, std: torch.Tensor, scaling_factor: float, generator: torch.Generator
) -> torch.Tensor:
    """Reparameterised sample from cached posteriors; noise from a CPU generator (device-stable)."""
    eps = torch.randn(mean.shape, generator=generator).to(mean.device)
    return (mean + std * eps) * scaling_factor


def diffusion_loss(
    unet: Any,
    noise_scheduler: Any,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    generator: torch.Generator,
    weight_dtype: torch.dtype,
    noise_offset: float = 0.0,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """Per-sample epsilon/v-prediction MSE [B]. All randomness from `generator` (resumable).

    noise_offset: per-channel constant added to the noise (diffusers' option); without it a
    model can hardly change an image's overall colour/brightness, which is exactly what a
    background-colour subject needs. snr_gamma: Min-SNR loss weighting (diffusers' option).
    """
    bsz = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(
            (bsz, latents.shape[1], 1, 1), generator=generator
        )
    noise = noise.to(latents.device)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator
    ).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    v_pred = noise_scheduler.config.prediction_type == "v_prediction"
    target = noise_scheduler.get_velocity(latents, noise, timesteps) if v_pred else noise
    with autocast(latents.device, weight_dtype):
        pred = unet(
            noisy.to(weight_dtype), timesteps, text_embeddings.to(weight_dtype), return_dict=False
        )[0]
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps)
        weight = torch.clamp(snr, max=snr_gamma) / (snr + 1 if v_pred else snr)
        loss = loss * weight
    return loss


def make_optimizer(params: Any, lr: float, weight_decay: float = 1e-2) -> torch.optim.Optimizer:
    """AdamW; `foreach` explicitly, because on CPU the default is a per-tensor Python loop."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
