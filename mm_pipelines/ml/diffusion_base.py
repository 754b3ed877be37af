"""Tiny StableDiffusion-compatible base model: build, train from scratch, save, load.

Plain Python (no Dagster, no MLflow): progress is reported through callbacks so the
caller decides where numbers go.

No machine here can download weights, so the demo base model is built from configs
(the same way diffusers' own test suite builds tiny components) and trained briefly
on the caller's images. At 32 px it learns coloured blobs in a few CPU minutes, not
prompt following; that is enough for a LoRA to measurably move its output.

`load_pipeline` is the general entry point for any diffusers pipeline directory (a real
SD 1.5 / SDXL / FLUX checkpoint on a GPU machine, or the tiny one here).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ProgressFn = Callable[[int, float], None]
Precision = Literal["auto", "fp32", "fp16", "bf16"]

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


# --------------------------------------------------------------------------- configs


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


# --------------------------------------------------------------------------- device / dtype


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None`/"auto" -> CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(device: str | torch.device, precision: Precision = "auto") -> torch.dtype:
    """bf16 (or fp16 on pre-Ampere) on CUDA, fp32 on CPU.

    Half precision on CPU is refused rather than silently changed: CPU half kernels are
    slow or missing, and a config that asks for it is almost certainly a mistake.
    """
    device = torch.device(device)
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of auto/fp32/fp16/bf16, got {precision!r}")
    dtype = _DTYPES[precision]
    if device.type == "cpu" and dtype != torch.float32:
        raise ValueError(f"precision {precision!r} needs CUDA; use 'fp32' or 'auto' on CPU")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA only; a no-op on CPU (fp32 there)."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- components


def build_clip_tokenizer(model_max_length: int = 77) -> Any:
    """A `transformers.CLIPTokenizer` built from open_clip's bundled BPE vocabulary.

    Same ids as OpenAI CLIP's tokenizer; no download. open_clip names its special
    tokens `<start_of_text>`/`<end_of_text>`, transformers expects the OpenAI spelling.
    """
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    vocab = dict(bpe.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)  # tuples, in rank order
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


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


# --------------------------------------------------------------------------- data helpers


def images_to_tensor(images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
    """PIL images -> float tensor [N, 3, R, R] in [-1, 1] (resize shorter side, centre crop)."""
    arrays = [np.asarray(resize_center_crop(im.convert("RGB"), resolution)) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x.contiguous()


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    scale = size / min(w, h)
    if (w, h) != (size, size):
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def pipeline_resolution(pipeline: Any) -> int:
    """Pixel resolution the pipeline's UNet was built for."""
    return int(pipeline.unet.config.sample_size) * int(pipeline.vae_scale_factor)


def pipeline_dir_resolution(path: str | Path) -> int:
    """The same, read from a saved pipeline's configs (no weights loaded)."""
    unet = json.loads((Path(path) / "unet" / "config.json").read_text())
    vae = json.loads((Path(path) / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


@torch.no_grad()
def encode_prompts(pipeline: Any, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    """Text-encoder hidden states [N, L, D], padded to the tokenizer's max length."""
    tok = pipeline.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=pipeline.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return pipeline.text_encoder(tok.input_ids.to(device))[0]


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


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless random index batches (with replacement: tiny sets, any batch size)."""
    while True:
        yield torch.randint(0, n, (batch_size,), generator=generator)


# --------------------------------------------------------------------------- base training


def train_base_pipeline(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    *,
    model_config: TinyDiffusionConfig | None = None,
    train_config: BaseTrainConfig | None = None,
    device: str | torch.device = "cpu",
    output_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
    vae_progress: ProgressFn | None = None,
) -> BaseTrainResult:
    """Build the tiny pipeline and train it from scratch on `images` + `captions`.

    Two phases: the VAE (reconstruction + small KL), then the UNet on frozen VAE latents
    with the (frozen, random) text encoder's caption embeddings. The latent scaling
    factor is measured (1 / std of latents) so the diffusion sees unit-variance latents,
    as SD's 0.18215 does for its VAE. Deterministic for a given seed on a given device.
    `progress(step, loss)` is called after each UNet step, `vae_progress` after each
    VAE step. Saved with `save_pretrained` when `output_dir` is given.
    """
    if len(images) != len(captions) or not images:
        raise ValueError("need the same, non-zero number of images and captions")
    mcfg = model_config or TinyDiffusionConfig()
    tcfg = train_config or BaseTrainConfig()
    device = resolve_device(device)
    t0 = time.perf_counter()

    pipe = build_tiny_pipeline(mcfg, seed=tcfg.seed)
    pipe.to(device)  # fp32 master weights; autocast does mixed precision on CUDA
    amp_dtype = resolve_dtype(device, "auto")
    pixels = images_to_tensor(images, mcfg.resolution)
    gen = torch.Generator().manual_seed(tcfg.seed)

    vae_losses = _train_vae(pipe.vae, pixels, tcfg, device, amp_dtype, gen, vae_progress)
    mean, std = encode_latent_dist(pipe.vae, pixels)
    scaling = 1.0 / float(mean.std().clamp_min(1e-6))
    pipe.vae.register_to_config(scaling_factor=scaling)

    unet_losses = _train_unet(
        pipe, mean, std, list(captions), tcfg, device, amp_dtype, gen, progress
    )
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval().requires_grad_(False)

    out = None
    if output_dir is not None:
        out = save_pipeline(pipe, output_dir)
    params = {
        **{f"model.{k}": v for k, v in asdict(mcfg).items()},
        **{f"train.{k}": v for k, v in asdict(tcfg).items()},
        "vae.scaling_factor": scaling,
        "device": str(device),
    }
    return BaseTrainResult(pipe, out, vae_losses, unet_losses, time.perf_counter() - t0, params)


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


def _train_unet(
    pipe: Any,
    mean: torch.Tensor,
    std: torch.Tensor,
    captions: list[str],
    tcfg: BaseTrainConfig,
    device: torch.device,
    amp_dtype: torch.dtype,
    gen: torch.Generator,
    progress: ProgressFn | None,
) -> list[float]:
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    # the text encoder stays frozen: cache caption embeddings and the empty prompt's once
    text_emb = encode_prompts(pipe, captions, device)
    empty_emb = encode_prompts(pipe, [""], device)
    unet = pipe.unet.train().requires_grad_(True)
    opt = make_optimizer(unet.parameters(), tcfg.unet_learning_rate, weight_decay=1e-2)
    scaling = float(pipe.vae.config.scaling_factor)
    losses: list[float] = []
    batches = _batches(len(mean), tcfg.batch_size, gen)
    for step in range(1, tcfg.unet_steps + 1):
        idx = next(batches)
        latents = sample_latents(mean[idx], std[idx], scaling, gen)
        drop = (torch.rand(len(idx), generator=gen) < tcfg.caption_dropout).to(device)
        emb = torch.where(drop[:, None, None], empty_emb, text_emb[idx.to(device)])
        # fp32 master weights; amp_dtype only switches on autocast (CUDA)
        loss = diffusion_loss(unet, noise_scheduler, latents, emb, gen, amp_dtype).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), tcfg.max_grad_norm)
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    unet.eval().requires_grad_(False)
    return losses


# --------------------------------------------------------------------------- save / load


def save_pipeline(pipeline: Any, output_dir: str | Path) -> Path:
    """`save_pretrained` (safetensors); `StableDiffusionPipeline.from_pretrained(dir)` loads it."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(out, safe_serialization=True)
    return out


def load_pipeline(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    precision: Precision = "auto",
    cpu_offload: bool = False,
    quantize_nf4: bool = False,
    pipeline_cls: Any = None,
) -> Any:
    """Load any diffusers pipeline directory offline (SD 1.x, SDXL, FLUX ...).

    device/precision: bf16 (fp16 where bf16 is unsupported) on CUDA, fp32 on CPU.
    cpu_offload: `enable_model_cpu_offload` (components visit the GPU one at a time),
    for 24 GB cards; quantize_nf4: 4-bit NF4 (bitsandbytes) for the denoiser. Both are
    CUDA-only and raise a ValueError on CPU rather than silently doing nothing.
    """
    from diffusers import DiffusionPipeline

    device = resolve_device(device)
    dtype = resolve_dtype(device, precision)
    if (cpu_offload or quantize_nf4) and device.type != "cuda":
        switch = "cpu_offload" if cpu_offload else "quantize_nf4"
        raise ValueError(f"{switch} needs a CUDA device, got {device}")
    cls = pipeline_cls or DiffusionPipeline
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if quantize_nf4:
        kwargs["quantization_config"] = _nf4_config(path, dtype)
    pipe = cls.from_pretrained(str(path), **kwargs)
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    elif not quantize_nf4:
        pipe.to(device)
    else:
        # bnb-quantized weights are placed on the GPU at load; move the rest
        for name, comp in pipe.components.items():
            if isinstance(comp, torch.nn.Module) and name != _denoiser_name(path):
                comp.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _denoiser_name(path: str | Path) -> str:
    """'unet' for SD/SDXL, 'transformer' for DiT pipelines (SD3, FLUX)."""
    return "transformer" if (Path(path) / "transformer").is_dir() else "unet"


def _nf4_config(path: str | Path, dtype: torch.dtype) -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:  # optional, CUDA-only dependency
        raise ImportError(
            "quantize_nf4 needs the 'bitsandbytes' package (CUDA only): pip install bitsandbytes"
        ) from e
    from diffusers.quantizers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit",
        quant_kwargs={
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_compute_dtype": dtype,
        },
        components_to_quantize=[_denoiser_name(path)],
    )


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
