"""What every diffusion training loop shares: pixels to tensors, cached VAE posteriors,
the noise-prediction (DDPM) and flow-matching losses, and the optimizer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def crop_sizes(images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
    """[N, 4] original height, width and the crop's top, left in the resized image: what
    `images_to_tensor` (via resize_center_crop) does to each image, for SDXL's size ids."""
    rows = []
    for im in images:
        w, h = im.size
        if (w, h) != (resolution, resolution):
            scale = resolution / min(w, h)
            w2, h2 = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        else:
            w2, h2 = w, h
        rows.append([h, w, (h2 - resolution) // 2, (w2 - resolution) // 2])
    return torch.tensor(rows, dtype=torch.long)


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
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-sample epsilon/v-prediction MSE [B]. All randomness from `generator` (resumable).

    added_cond_kwargs: SDXL's pooled text embeddings and size/crop ids ("text_time").

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
            noisy.to(weight_dtype),
            timesteps,
            text_embeddings.to(weight_dtype),
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )[0]
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps)
        weight = torch.clamp(snr, max=snr_gamma) / (snr + 1 if v_pred else snr)
        loss = loss * weight
    return loss


def flow_matching_loss(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler: Any,
    latents: torch.Tensor,
    generator: torch.Generator,
    *,
    weighting_scheme: str = "none",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    precondition_outputs: bool = False,
) -> torch.Tensor:
    """Per-sample rectified-flow loss [B] (SD3, FLUX), as diffusers' LoRA scripts train.

    x_t = (1 - sigma) x_0 + sigma * noise, the model predicts the velocity noise - x_0.
    Timesteps are drawn with `compute_density_for_timestep_sampling` (uniform, logit-normal
    or mode) and the loss weighted by `compute_loss_weighting_for_sd3`; sigmas are read
    from a fresh FlowMatchEulerDiscreteScheduler's training table (its shift applied).
    precondition_outputs (SD3 script default): compare the implied x_0 with x_0.
    `predict(noisy, timesteps)` runs the transformer. All randomness from `generator`.
    """
    from diffusers.training_utils import (
        compute_density_for_timestep_sampling,
        compute_loss_weighting_for_sd3,
    )

    bsz = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    u = compute_density_for_timestep_sampling(
        weighting_scheme=weighting_scheme,
        batch_size=bsz,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        generator=generator,
    )
    n = scheduler.config.num_train_timesteps
    indices = (u * n).long().clamp(0, n - 1)
    timesteps = scheduler.timesteps[indices].to(latents.device)
    sigmas = scheduler.sigmas[indices].to(latents.device, torch.float32).view(bsz, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    pred = predict(noisy, timesteps).float()
    if precondition_outputs:
        pred, target = pred * (-sigmas) + noisy, latents
    else:
        target = noise - latents
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
    return (weighting.float() * (pred - target.float()) ** 2).reshape(bsz, -1).mean(dim=1)


def make_optimizer(params: Any, lr: float, weight_decay: float = 1e-2) -> torch.optim.Optimizer:
    """AdamW; `foreach` explicitly, because on CPU the default is a per-tensor Python loop."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
