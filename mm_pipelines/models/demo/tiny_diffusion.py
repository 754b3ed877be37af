"""The demo's tiny StableDiffusion-compatible base model: built from configs, trained
from scratch on the caller's images.

No machine here can download weights, so the demo base model is built from configs
(the same way diffusers' own test suite builds tiny components) and trained briefly
on the caller's images. At 32 px it learns coloured blobs in a few CPU minutes, not
prompt following; that is enough for a LoRA to measurably move its output.
Plain Python: progress is reported through callbacks so the caller decides where numbers go.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image

from mm_pipelines.models.common import autocast, resolve_device, resolve_dtype
from mm_pipelines.models.demo.tokenizers import build_clip_tokenizer
from mm_pipelines.models.diffusion.pipeline import save_pipeline
from mm_pipelines.models.diffusion.training import (
    crop_sizes,
    encode_latent_dist,
    images_to_tensor,
    make_optimizer,
)

ProgressFn = Callable[[int, float], None]


@dataclass(frozen=True)
class TinyDiffusionConfig:
    """Architecture of the tiny pipeline. Defaults give ~2M UNet params at 32 px."""

    resolution: int = 32
    # UNet (latent space is resolution / 2 ** (len(vae_block_out_channels) - 1))
    unet_block_out_channels: tuple[int, ...] = (32, 64)
    unet_layers_per_block: int = 1
    unet_down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    unet_up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    unet_attention_head_dim: int = 8
    unet_norm_num_groups: int = 8
    # VAE
    vae_block_out_channels: tuple[int, ...] = (16, 32, 32)
    vae_layers_per_block: int = 1
    vae_norm_num_groups: int = 8
    latent_channels: int = 4
    # text encoder (vocabulary is open_clip's bundled BPE, 49408 tokens)
    text_hidden_size: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate_size: int = 64
    text_max_length: int = 77
    # noise schedule; inference uses DDIM with the same betas
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    inference_scheduler: Literal["ddim", "ddpm"] = "ddim"


@dataclass(frozen=True)
class BaseTrainConfig:
    """How long and how the tiny base model is trained."""

    vae_steps: int = 600
    unet_steps: int = 600
    batch_size: int = 16  # UNet
    vae_batch_size: int = 8  # measured: more, smaller steps beat fewer large ones here
    vae_learning_rate: float = 1e-3
    unet_learning_rate: float = 1e-3
    kl_weight: float = 1e-4
    # per-channel gain/offset jitter for the VAE only: a tiny training set has a tiny
    # palette, and an autoencoder that never saw a colour cannot decode it later (a LoRA
    # subject on a new background colour would be invisible through it)
    vae_color_jitter: float = 0.5
    # empty captions part of the time so classifier-free guidance has an unconditional mode
    caption_dropout: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0


@dataclass
class BaseTrainResult:
    pipeline: Any  # StableDiffusionPipeline (kept Any to keep diffusers import lazy)
    output_dir: Path | None
    vae_losses: list[float] = field(default_factory=list)
    unet_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)


def _build_unet(cfg: TinyDiffusionConfig) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=cfg.resolution // 2 ** (len(cfg.vae_block_out_channels) - 1),
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=cfg.unet_block_out_channels,
        layers_per_block=cfg.unet_layers_per_block,
        down_block_types=cfg.unet_down_block_types,
        up_block_types=cfg.unet_up_block_types,
        cross_attention_dim=cfg.text_hidden_size,
        attention_head_dim=cfg.unet_attention_head_dim,
        norm_num_groups=cfg.unet_norm_num_groups,
    )


def _build_vae(cfg: TinyDiffusionConfig) -> Any:
    from diffusers import AutoencoderKL

    n = len(cfg.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_block_out_channels,
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_norm_num_groups,
        sample_size=cfg.resolution,
    )


def _build_text_encoder(cfg: TinyDiffusionConfig, tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_hidden_size,
            intermediate_size=cfg.text_intermediate_size,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.text_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=cfg.text_hidden_size,
        )
    )


def _scheduler_config(cfg: TinyDiffusionConfig) -> dict[str, Any]:
    # SD 1.x conventions: steps_offset=1, no sample clipping, alphas_cumprod[0] for t=-1
    return {
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_schedule": cfg.beta_schedule,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
    }


def build_tiny_pipeline(cfg: TinyDiffusionConfig | None = None, seed: int = 0) -> Any:
    """An untrained StableDiffusionPipeline with tiny components (fp32, on CPU)."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

    cfg = cfg or TinyDiffusionConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # init weights deterministically without touching caller RNG
        tokenizer = build_clip_tokenizer(cfg.text_max_length)
        unet = _build_unet(cfg)
        vae = _build_vae(cfg)
        text_encoder = _build_text_encoder(cfg, tokenizer)
    sched_cls = DDIMScheduler if cfg.inference_scheduler == "ddim" else DDPMScheduler
    scheduler = sched_cls(**_scheduler_config(cfg))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless random index batches (with replacement: tiny sets, any batch size)."""
    while True:
        yield torch.randint(0, n, (batch_size,), generator=generator)


def train_base_pipeline(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    *,
    family: str = "sd",
    model_config: TinyDiffusionConfig | None = None,
    train_config: BaseTrainConfig | None = None,
    vae: Any | None = None,
    device: str | torch.device = "cpu",
    output_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
    vae_progress: ProgressFn | None = None,
) -> BaseTrainResult:
    """Build the tiny pipeline of `family` and train it from scratch on `images` + `captions`.

    Two phases: the VAE (reconstruction + small KL; skipped when a trained `vae` is given,
    e.g. the tiny SD base's), then the denoiser on frozen VAE latents with the (frozen,
    random) text encoders' caption embeddings and the family's own loss (epsilon for
    SD/SDXL, rectified flow for SD3/FLUX). The latent scaling factor is measured (1 / std
    of latents) so the diffusion sees unit-variance latents, as SD's 0.18215 does for its
    VAE; SD3/FLUX also get the latent mean as their VAE shift factor. Deterministic for a
    given seed on a given device. `progress(step, loss)` is called after each denoiser
    step, `vae_progress` after each VAE step. Saved with `save_pretrained` when
    `output_dir` is given. `train_config.unet_steps` is the denoiser's step count.
    """
    from mm_pipelines.models.demo.tiny_families import TinyFamilyConfig, build_tiny_family_pipeline
    from mm_pipelines.models.diffusion.families import family_of

    if len(images) != len(captions) or not images:
        raise ValueError("need the same, non-zero number of images and captions")
    mcfg = model_config or TinyDiffusionConfig()
    tcfg = train_config or BaseTrainConfig()
    device = resolve_device(device)
    t0 = time.perf_counter()

    if family == "sd":
        pipe = build_tiny_pipeline(mcfg, seed=tcfg.seed)
        if vae is not None:
            pipe.vae = copy.deepcopy(vae)
    else:
        fcfg = TinyFamilyConfig(resolution=mcfg.resolution, latent_channels=mcfg.latent_channels)
        pipe = build_tiny_family_pipeline(family, vae=vae, config=fcfg, seed=tcfg.seed)
    fam = family_of(pipe)
    pipe.to(device)  # fp32 master weights; autocast does mixed precision on CUDA
    amp_dtype = resolve_dtype(device, "auto")
    pixels = images_to_tensor(images, mcfg.resolution)
    gen = torch.Generator().manual_seed(tcfg.seed)

    vae_losses: list[float] = []
    if vae is None:
        vae_losses = _train_vae(pipe.vae, pixels, tcfg, device, amp_dtype, gen, vae_progress)
    mean, std = encode_latent_dist(pipe.vae, pixels)
    scaling = 1.0 / float(mean.std().clamp_min(1e-6))
    shift = float(mean.mean()) if fam.flow_matching else None
    pipe.vae.register_to_config(scaling_factor=scaling, shift_factor=shift)

    cond, uncond = _caption_conditioning(pipe, fam, images, list(captions), mcfg.resolution)
    unet_losses = _train_denoiser(
        pipe, fam, mean, std, cond, uncond, tcfg, device, amp_dtype, gen, progress
    )
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.eval().requires_grad_(False)

    out = None
    if output_dir is not None:
        out = save_pipeline(pipe, output_dir)
    params = {
        "family": fam.name,
        **{f"model.{k}": v for k, v in asdict(mcfg).items()},
        **{f"train.{k}": v for k, v in asdict(tcfg).items()},
        "vae.scaling_factor": scaling,
        "vae.shift_factor": shift,
        "vae.trained_here": vae is None,
        "device": str(device),
    }
    return BaseTrainResult(pipe, out, vae_losses, unet_losses, time.perf_counter() - t0, params)


@torch.no_grad()
def _caption_conditioning(
    pipe: Any, fam: Any, images: Sequence[Image.Image], captions: list[str], resolution: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Caption conditioning of every image, and the unconditional one (batch of 1) that
    classifier-free guidance will use at inference: the empty prompt's, or zeros where
    the pipeline zeroes it (SDXL's force_zeros_for_empty_prompt)."""
    device = fam.denoiser(pipe).device

    def encode(prompts: list[str]) -> dict[str, torch.Tensor]:
        ids = fam.tokenize(pipe, prompts)
        outs = {n: fam.run_encoder(pipe, n, i) for n, i in ids.items()}
        return {k: v.to(device) for k, v in fam.combine(pipe, outs, len(prompts)).items()}

    cond = encode(captions)
    cond.update(
        {
            k: v.to(device)
            for k, v in fam.image_conditioning(
                pipe, crop_sizes(images, resolution), resolution
            ).items()
        }
    )
    uncond = encode([""])
    if getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        uncond = {k: torch.zeros_like(v) for k, v in uncond.items()}
    return cond, uncond


def _train_vae(
    vae: Any,
    pixels: torch.Tensor,
    tcfg: BaseTrainConfig,
    device: torch.device,
    amp_dtype: torch.dtype,
    gen: torch.Generator,
    progress: ProgressFn | None,
) -> list[float]:
    vae.train().requires_grad_(True)
    opt = make_optimizer(vae.parameters(), tcfg.vae_learning_rate, weight_decay=0.0)
    losses: list[float] = []
    batches = _batches(len(pixels), tcfg.vae_batch_size, gen)
    for step in range(1, tcfg.vae_steps + 1):
        x = _color_jitter(pixels[next(batches)], tcfg.vae_color_jitter, gen).to(device)
        with autocast(device, amp_dtype):
            dist = vae.encode(x).latent_dist
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(device)
            recon = vae.decode(z).sample
        kl = dist.kl().float().mean() / dist.mean[0].numel()  # per latent element
        loss = F.mse_loss(recon.float(), x) + tcfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), tcfg.max_grad_norm)
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    vae.eval().requires_grad_(False)
    return losses


def _color_jitter(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    if strength <= 0:
        return x
    shape = (x.shape[0], x.shape[1], 1, 1)
    gain = 1 + strength * (2 * torch.rand(shape, generator=gen) - 1)
    offset = strength * (2 * torch.rand(shape, generator=gen) - 1)
    return (x * gain + offset).clamp(-1, 1)


def _train_denoiser(
    pipe: Any,
    fam: Any,
    mean: torch.Tensor,
    std: torch.Tensor,
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor],
    tcfg: BaseTrainConfig,
    device: torch.device,
    amp_dtype: torch.dtype,
    gen: torch.Generator,
    progress: ProgressFn | None,
) -> list[float]:
    from mm_pipelines.models.diffusion.lora import LoraTrainConfig

    loss_settings = LoraTrainConfig()  # the families' loss defaults (no offset, no Min-SNR)
    noise_scheduler = fam.training_scheduler(pipe)
    denoiser = fam.denoiser(pipe).train().requires_grad_(True)
    opt = make_optimizer(denoiser.parameters(), tcfg.unet_learning_rate, weight_decay=1e-2)
    losses: list[float] = []
    batches = _batches(len(mean), tcfg.batch_size, gen)
    for step in range(1, tcfg.unet_steps + 1):
        idx = next(batches)
        eps = torch.randn(mean[idx].shape, generator=gen).to(mean.device)
        latents = fam.scale_latents(pipe, mean[idx] + std[idx] * eps)
        drop = (torch.rand(len(idx), generator=gen) < tcfg.caption_dropout).to(device)
        batch = {}
        for key, value in cond.items():  # empty captions: the unconditional mode for CFG
            picked = value[idx.to(device)]
            if key in uncond:
                mask = drop.view(-1, *[1] * (picked.dim() - 1))
                picked = torch.where(mask, uncond[key].expand_as(picked), picked)
            batch[key] = picked
        # fp32 master weights; amp_dtype only switches on autocast (CUDA)
        loss = fam.loss(pipe, noise_scheduler, latents, batch, gen, loss_settings, amp_dtype)
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), tcfg.max_grad_norm)
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    denoiser.eval().requires_grad_(False)
    return losses
