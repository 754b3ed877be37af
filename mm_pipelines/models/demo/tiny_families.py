"""Tiny SDXL, SD3.5 and FLUX.1 pipelines built from configs (no downloads).

Built the way diffusers' own test suite builds each family small: a `UNet2DConditionModel`
with `addition_embed_type="text_time"` and two CLIP text encoders (SDXL), an
`SD3Transformer2DModel` with two projected CLIP encoders and a T5 encoder (SD3.5: RMS
q/k norm, one dual-attention layer), a `FluxTransformer2DModel` with guidance embedding,
CLIP (pooled) and T5 (sequence). The tokenizers are made in-process (CLIP from
open_clip's BPE, T5 from a Unigram word list).

The denoisers and text encoders are random. The VAE can be passed in: a random VAE
does not reconstruct, so nothing drawn through it could look like a subject. The demo
and the tests pass the tiny SD base's trained VAE (same latent channels, scale 4); the
denoiser then starts from random weights and a LoRA must do all the moving.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mm_pipelines.models.demo.tokenizers import build_clip_tokenizer, build_t5_tokenizer

FAMILIES = ("sd", "sdxl", "sd3", "flux")


@dataclass(frozen=True)
class TinyFamilyConfig:
    resolution: int = 32
    latent_channels: int = 4
    vae_block_out_channels: tuple[int, ...] = (16, 32, 32)  # scale factor 4: latents 8x8
    # CLIP text encoders (each); SDXL concatenates two, SD3 pads the pair to the T5 width
    clip_hidden_size: int = 32
    clip_layers: int = 2
    clip_max_length: int = 77
    # T5 (SD3, FLUX): d_model is the transformer's joint_attention_dim
    t5_d_model: int = 64
    t5_layers: int = 2
    t5_max_length: int = 16  # what the pipelines pad T5 prompts to (tokenizer max length)
    # denoisers
    unet_block_out_channels: tuple[int, ...] = (32, 64)
    transformer_heads: int = 2
    transformer_head_dim: int = 16
    transformer_layers: int = 2  # SD3 joint blocks / FLUX double-stream blocks
    flux_single_layers: int = 2
    flux_guidance_embeds: bool = True  # FLUX.1 [dev] is guidance-distilled
    # VAE latents: (z - shift) * scaling; SD3/FLUX VAEs have a shift, SD/SDXL none
    vae_shift_factor: float = 0.1


def _clip_encoder(cfg: TinyFamilyConfig, tokenizer: Any, projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.clip_hidden_size,
        intermediate_size=2 * cfg.clip_hidden_size,
        num_hidden_layers=cfg.clip_layers,
        num_attention_heads=4,
        max_position_embeddings=cfg.clip_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=cfg.clip_hidden_size,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5_encoder(cfg: TinyFamilyConfig, tokenizer: Any) -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=cfg.t5_d_model,
            d_kv=16,
            d_ff=2 * cfg.t5_d_model,
            num_layers=cfg.t5_layers,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
            dropout_rate=0.0,
        )
    )


def _vae(cfg: TinyFamilyConfig, vae: Any | None, shift: float | None) -> Any:
    from diffusers import AutoencoderKL

    if vae is None:
        n = len(cfg.vae_block_out_channels)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=cfg.vae_block_out_channels,
            layers_per_block=1,
            latent_channels=cfg.latent_channels,
            norm_num_groups=8,
            sample_size=cfg.resolution,
        )
    else:
        vae = copy.deepcopy(vae)  # the caller's pipeline keeps its own
    vae.register_to_config(shift_factor=shift, sample_size=cfg.resolution)
    return vae.eval().requires_grad_(False)


def _latent_size(cfg: TinyFamilyConfig, vae: Any) -> int:
    return cfg.resolution // 2 ** (len(vae.config.block_out_channels) - 1)


def build_sdxl(cfg: TinyFamilyConfig, vae: Any | None = None) -> Any:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tok = build_clip_tokenizer(cfg.clip_max_length)
    te1 = _clip_encoder(cfg, tok, projection=False)
    te2 = _clip_encoder(cfg, tok, projection=True)
    vae = _vae(cfg, vae, None)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=_latent_size(cfg, vae),
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        block_out_channels=cfg.unet_block_out_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        use_linear_projection=True,
        norm_num_groups=8,
        # SDXL conditioning: penultimate states of both encoders side by side, and the
        # pooled embedding of encoder 2 with six size/crop numbers ("text_time")
        cross_attention_dim=2 * cfg.clip_hidden_size,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + cfg.clip_hidden_size,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=copy.deepcopy(tok),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_sd3(cfg: TinyFamilyConfig, vae: Any | None = None) -> Any:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    tok = build_clip_tokenizer(cfg.clip_max_length)
    t5_tok = build_t5_tokenizer(cfg.t5_max_length)
    vae = _vae(cfg, vae, cfg.vae_shift_factor)
    channels = vae.config.latent_channels
    transformer = SD3Transformer2DModel(
        sample_size=_latent_size(cfg, vae),
        patch_size=1,
        in_channels=channels,
        out_channels=channels,
        num_layers=cfg.transformer_layers,
        attention_head_dim=cfg.transformer_head_dim,
        num_attention_heads=cfg.transformer_heads,
        joint_attention_dim=cfg.t5_d_model,
        caption_projection_dim=cfg.transformer_heads * cfg.transformer_head_dim,
        pooled_projection_dim=2 * cfg.clip_hidden_size,  # both projected CLIP embeddings
        qk_norm="rms_norm",  # SD3.5
        dual_attention_layers=(0,),  # SD3.5 (MMDiT-X)
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=_clip_encoder(cfg, tok, projection=True),
        tokenizer=tok,
        text_encoder_2=_clip_encoder(cfg, tok, projection=True),
        tokenizer_2=copy.deepcopy(tok),
        text_encoder_3=_t5_encoder(cfg, t5_tok),
        tokenizer_3=t5_tok,
    )


def build_flux(cfg: TinyFamilyConfig, vae: Any | None = None) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok = build_clip_tokenizer(cfg.clip_max_length)
    t5_tok = build_t5_tokenizer(cfg.t5_max_length)
    vae = _vae(cfg, vae, cfg.vae_shift_factor)
    head = cfg.transformer_head_dim
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * vae.config.latent_channels,  # 2x2 latent patches, packed
        num_layers=cfg.transformer_layers,
        num_single_layers=cfg.flux_single_layers,
        attention_head_dim=head,
        num_attention_heads=cfg.transformer_heads,
        joint_attention_dim=cfg.t5_d_model,
        pooled_projection_dim=cfg.clip_hidden_size,  # CLIP pooler output
        guidance_embeds=cfg.flux_guidance_embeds,
        axes_dims_rope=(head // 4, 3 * head // 8, 3 * head // 8),  # sums to the head dim
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_clip_encoder(cfg, tok, projection=False),
        tokenizer=tok,
        text_encoder_2=_t5_encoder(cfg, t5_tok),
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def build_tiny_family_pipeline(
    family: str,
    *,
    vae: Any | None = None,
    config: TinyFamilyConfig | None = None,
    seed: int = 0,
) -> Any:
    """An untrained tiny pipeline of `family` (fp32, CPU); `vae` is copied in when given."""
    from mm_pipelines.models.demo.tiny_diffusion import TinyDiffusionConfig, build_tiny_pipeline

    cfg = config or TinyFamilyConfig()
    builders = {"sdxl": build_sdxl, "sd3": build_sd3, "flux": build_flux}
    if family not in FAMILIES:
        raise ValueError(f"unknown diffusion family {family!r}; known: {list(FAMILIES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # deterministic weights without touching the caller's RNG
        if family == "sd":
            pipe = build_tiny_pipeline(TinyDiffusionConfig(resolution=cfg.resolution), seed=seed)
            if vae is not None:
                pipe.vae = copy.deepcopy(vae)
        else:
            pipe = builders[family](cfg, vae)
    for comp in pipe.components.values():  # inference mode, as from_pretrained leaves them
        if isinstance(comp, torch.nn.Module):
            comp.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_family_base(
    family: str,
    output_dir: str | Path,
    *,
    vae_from: str | Path | None = None,
    config: TinyFamilyConfig | None = None,
    seed: int = 0,
) -> Path:
    """Build a tiny `family` base and save it as a diffusers pipeline directory.

    `vae_from`: a pipeline directory whose (trained) VAE the new base uses, e.g. the demo's
    tiny SD base. The result loads with `DiffusionPipeline.from_pretrained` and with
    `models.diffusion.pipeline.load_pipeline`, so `MM_DIFFUSION_BASE=<dir>` works.
    """
    from diffusers import AutoencoderKL

    from mm_pipelines.models.diffusion.pipeline import save_pipeline

    vae = None
    if vae_from is not None:
        vae = AutoencoderKL.from_pretrained(Path(vae_from) / "vae", local_files_only=True)
    cfg = config or TinyFamilyConfig(resolution=int(vae.config.sample_size) if vae else 32)
    pipe = build_tiny_family_pipeline(family, vae=vae, config=cfg, seed=seed)
    return save_pipeline(pipe, output_dir)
