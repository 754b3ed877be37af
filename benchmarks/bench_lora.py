"""LoRA training step time and generation throughput: our code vs plain diffusers, same run.

CPU, per family (tiny models):
    .venv/bin/python benchmarks/bench_lora.py --family sd|sdxl|sd3|flux [--steps 40]
        [--rounds 3] [--threads 1] [--no-asset]
Prints ONE JSON object.

- sd: lora.ratio: median step time of `mm_pipelines.models.diffusion.lora.train_lora`
  (checkpointing and callbacks included) / median step time of a minimal diffusers+peft
  loop written the way diffusers' train_text_to_image_lora example does it (VAE + text
  encoder every step), same model, batch, rank, optimizer. Target <= 1.1.
  lora.ratio_same_inputs: the same against a plain loop also given pre-encoded
  latents/embeddings, i.e. our loop's pure bookkeeping overhead.
  generation.ratio: images/s of `generate_images` / images/s of calling the pipeline
  directly with the same batch size, prompts, seeds and steps. Target >= 0.9.
  asset.*: the same two comparisons through the Dagster assets themselves (`lora_adapter`
  with its MLflow run, step times from the logged loss timestamps; `generated_images`
  with the media store and catalog writes) against the plain loop / direct pipeline
  calls in the same process. With --no-asset they are skipped.
- sdxl, sd3, flux: lora.ratio against a loop written the way diffusers'
  train_dreambooth_lora_{sdxl,sd3,flux}.py writes its step (instance prompt encoded once,
  VAE every step), ratio_same_inputs against its --cache_latents step; generation as above.
Rounds alternate between the contenders so load drift on a shared machine hits both.

GPU (the lead's check, one prepared command, about 4-6 minutes on an H100/H200):
FLUX.1-dev-sized transformer (11.9 B, random weights, built on the meta device and
materialised on the GPU), rank 16 on the attention projections, batch 1, cached text
embeddings, 512 and 1024 px: step time and peak memory with bf16, with gradient
checkpointing, and with NF4 + 8-bit AdamW + checkpointing; the diffusers-script reference
step at 512 px and our ratio to it; SDXL-sized UNet (2.6 B) at 1024 px the same way; with
--probe-cudnn one FLUX 512 px run with cuDNN attention in a child process (it crashed on
an H200: the attention backend is a setting, "default" leaves cuDNN out).
The GPU box has torch 2.11 + transformers 5.17 + peft + accelerate + Pillow, not diffusers
or bitsandbytes: carry them as wheels (bitsandbytes slimmed to its CUDA 13 libraries, 43
-> 7 MB; diffusers 6 MB). Here, in the repository root, once:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_24_x86_64 -d .whl \
        diffusers==0.42.1 importlib_metadata==10.2.0 bitsandbytes==0.50.2
    zip -qd .whl/bitsandbytes-0.50.2-*.whl 'bitsandbytes/libbitsandbytes_cuda1[12]*' \
        'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*'

then the device run (carry [".whl"], timeout_s 600):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 \
        && python3 benchmarks/bench_lora.py --gpu --probe-cudnn \
        --out $OUT/bench_lora_gpu.json 2>&1 | tee $OUT/bench_lora_gpu.log

Every row is tried on its own (an OOM or kernel error is recorded, the next row runs);
rows print to stderr as they finish, so a cut-off run still shows what it measured.
`--gpu --dry-run` runs the same code paths with tiny widths on any device (CPU check).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from mm_pipelines.models.common import autocast, resolve_device
from mm_pipelines.models.demo.tiny_diffusion import TinyDiffusionConfig, build_tiny_pipeline
from mm_pipelines.models.diffusion.generate import generate_images
from mm_pipelines.models.diffusion.lora import LoraTrainConfig, train_lora
from mm_pipelines.models.diffusion.pipeline import (
    count_parameters,
    encode_prompts,
    pipeline_resolution,
)
from mm_pipelines.models.diffusion.training import (
    encode_latent_dist,
    images_to_tensor,
    make_optimizer,
)

PROMPT = "a photo of sks"


def _images(n: int) -> list[Image.Image]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (32, 32), (240, 140, 20))
        r = rng.uniform(6, 10)
        cx, cy = rng.uniform(10, 22), rng.uniform(10, 22)
        ImageDraw.Draw(im).ellipse((cx - r, cy - r, cx + r, cy + r), fill=(40, 60, 220))
        out.append(im)
    return out


def _fresh_pipeline(device: torch.device) -> Any:
    pipe = build_tiny_pipeline(TinyDiffusionConfig(), seed=0)
    return pipe.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _ours_step_times(device: torch.device, cfg: LoraTrainConfig) -> list[float]:
    pipe = _fresh_pipeline(device)
    stamps: list[float] = []

    def on_step(step: int, loss: float) -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        stamps.append(time.perf_counter())
        train_lora(pipe, _images(8), PROMPT, Path(tmp), cfg, device=device, on_step=on_step)
    # the first interval includes setup (adapter, caching); drop it
    return [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]


def _plain_step_times(device: torch.device, cfg: LoraTrainConfig, cached: bool) -> list[float]:
    """Minimal diffusers + peft LoRA loop (as in diffusers' text-to-image LoRA example)."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    pipe = _fresh_pipeline(device)
    unet, vae, te = pipe.unet, pipe.vae, pipe.text_encoder
    for m in (unet, vae, te):
        m.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            init_lora_weights="gaussian",
            target_modules=list(cfg.target_modules or ("to_k", "to_q", "to_v", "to_out.0")),
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg.learning_rate)  # same optimizer as ours
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    pixels = images_to_tensor(_images(8), 32).to(device)
    ids = pipe.tokenizer(
        [PROMPT] * 8,
        padding="max_length",
        truncation=True,
        max_length=pipe.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids.to(device)
    mean, std = encode_latent_dist(vae, pixels)
    emb_all = encode_prompts(pipe, [PROMPT] * 8, device)
    scaling = vae.config.scaling_factor
    unet.train()
    times = []
    for _ in range(cfg.steps):
        t0 = time.perf_counter()
        idx = torch.randint(0, 8, (cfg.batch_size,))
        with torch.no_grad():
            if cached:
                latents = (mean[idx] + std[idx] * torch.randn_like(mean[idx])) * scaling
                emb = emb_all[idx]
            else:
                latents = vae.encode(pixels[idx]).latent_dist.sample() * scaling
                emb = te(ids[idx])[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch_size,), device=device)
        pred = unet(sched.add_noise(latents, noise, t), t, emb).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _ = loss.item()  # ours reads the loss every step too (callback)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def bench_lora(device: torch.device, steps: int, rounds: int) -> dict[str, Any]:
    cfg = LoraTrainConfig(
        rank=4,
        alpha=4,
        learning_rate=1e-4,
        steps=steps,
        batch_size=4,
        checkpoint_every=max(1, steps // 2),
        keep_checkpoints=1,
    )
    ours: list[float] = []
    plain: list[float] = []
    plain_cached: list[float] = []
    _plain_step_times(device, LoraTrainConfig(steps=3, batch_size=4), cached=True)  # warm-up
    for _ in range(rounds):
        ours += _ours_step_times(device, cfg)[2:]
        plain += _plain_step_times(device, cfg, cached=False)[2:]
        plain_cached += _plain_step_times(device, cfg, cached=True)[2:]
    m_ours, m_plain = statistics.median(ours), statistics.median(plain)
    m_cached = statistics.median(plain_cached)
    return {
        "rank": cfg.rank,
        "batch_size": cfg.batch_size,
        "steps_per_round": steps,
        "rounds": rounds,
        "checkpoint_every": cfg.checkpoint_every,
        "ours_step_ms_median": round(1000 * m_ours, 2),
        "ours_step_ms_mean": round(1000 * statistics.mean(ours), 2),
        "plain_step_ms_median": round(1000 * m_plain, 2),
        "plain_step_ms_mean": round(1000 * statistics.mean(plain), 2),
        "plain_same_inputs_step_ms_median": round(1000 * m_cached, 2),
        "plain_same_inputs_step_ms_mean": round(1000 * statistics.mean(plain_cached), 2),
        "ratio": round(m_ours / m_plain, 3),
        "ratio_same_inputs": round(m_ours / m_cached, 3),
        "target_ratio_max": 1.1,
        "pass": m_ours / m_plain <= 1.1,
    }


def _direct_generation(
    pipe: Any, prompts: list[str], seeds: list[int], bs: int, steps: int, guidance: float
) -> int:
    pairs = [(p, s) for p in prompts for s in seeds]
    n = 0
    for i in range(0, len(pairs), bs):
        chunk = pairs[i : i + bs]
        out = pipe(
            prompt=[p for p, _ in chunk],
            generator=[torch.Generator().manual_seed(s) for _, s in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="pil",
        )
        n += len(out.images)
    return n


def bench_generation(
    device: torch.device, rounds: int, n_images: int = 32, bs: int = 8, steps: int = 20
) -> dict[str, Any]:
    pipe = _fresh_pipeline(device)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle on a white background", "a photo of sks"]
    seeds = list(range(n_images // len(prompts)))
    guidance = 5.0
    _direct_generation(pipe, prompts[:1], seeds[:bs], bs, 2, guidance)  # warm-up
    ours_t, direct_t = [], []
    for _ in range(rounds):
        _sync(device)
        t0 = time.perf_counter()
        got = generate_images(
            pipe, prompts, seeds, batch_size=bs, num_inference_steps=steps, guidance_scale=guidance
        )
        _sync(device)
        ours_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        n = _direct_generation(pipe, prompts, seeds, bs, steps, guidance)
        _sync(device)
        direct_t.append(time.perf_counter() - t0)
        assert len(got) == n == n_images
    ours_ips = n_images / statistics.median(ours_t)
    direct_ips = n_images / statistics.median(direct_t)
    return {
        "batch_size": bs,
        "images_per_round": n_images,
        "inference_steps": steps,
        "rounds": rounds,
        "ours_images_per_s": round(ours_ips, 2),
        "direct_images_per_s": round(direct_ips, 2),
        "ratio": round(ours_ips / direct_ips, 3),
        "target_ratio_min": 0.9,
        "pass": ours_ips / direct_ips >= 0.9,
    }


def bench_assets(device: torch.device, steps: int, rounds: int) -> dict[str, Any]:
    """lora_adapter and generated_images as Dagster materializes them (MLflow, catalog,
    media store included) vs the plain loop / direct pipeline, same process."""
    import os

    import dagster as dg
    import mlflow
    import yaml
    from dagster_aws.s3 import S3Resource

    from mm_pipelines.defs.generative.assets import generated_images, lora_adapter
    from mm_pipelines.defs.partitions import subject_partitions
    from mm_pipelines.defs.resources import (
        CatalogResource,
        ComputeResource,
        MediaStoreResource,
        MLflowResource,
        ModelsResource,
    )
    from mm_pipelines.models.diffusion.lora import load_adapter
    from mm_pipelines.models.diffusion.pipeline import load_pipeline, save_pipeline
    from mm_pipelines.models.diffusion.training_set import TrainingSet, save_training_set
    from mm_pipelines.pipeline import model_store as ms
    from mm_pipelines.pipeline.lora import adapter_record
    from mm_pipelines.pipeline.services import folder_model_store
    from mm_pipelines.storage.postgres import stop_embedded

    bs, n_seeds, gen_steps, guidance = 8, 16, 20, 3.0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = save_pipeline(_fresh_pipeline(torch.device("cpu")), root / "base")
        subject = {
            "name": "bench",
            "instance_prompt": PROMPT,
            "select": {"content_hashes": ["-"]},
            "seeds": list(range(n_seeds)),
            "validation_metric": "color_distance",
            "lora": {
                "rank": 4,
                "alpha": 4,
                "learning_rate": 1e-4,
                "steps": steps,
                "batch_size": 4,
                "checkpoint_every": max(1, steps // 2),
                "keep_checkpoints": 1,
                "validation_every": 0,
            },
            "generation": {
                "num_inference_steps": gen_steps,
                "guidance_scale": guidance,
                "batch_size": bs,
            },
        }
        (root / "subjects.yaml").write_text(yaml.safe_dump({"subjects": [subject]}))
        os.environ["MM_SUBJECTS"] = str(root / "subjects.yaml")
        images = _images(8)
        ts = TrainingSet(images, [PROMPT] * 8, [f"h{i}" for i in range(8)], [None] * 8, 32)
        save_training_set(ts, root / "training_set")
        folder_model_store(root / "models").put(
            ms.TRAINING_SET, "bench", root / "training_set", version=ts.version, make_current=True
        )
        tracking = MLflowResource(
            tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
            artifact_root=(root / "mlartifacts").as_uri(),
        )
        resources = {
            "models": ModelsResource(models_dir=str(root / "models"), diffusion_base=str(base)),
            "compute": ComputeResource(device=str(device)),
            "mlflow_tracking": tracking,
            "catalog_db": CatalogResource(embedded_dir=str(root / "pg")),
            "media_store": MediaStoreResource(local_dir=str(root / "media"), s3=S3Resource()),
        }
        cfg = LoraTrainConfig(rank=4, alpha=4, learning_rate=1e-4, steps=steps, batch_size=4)
        asset_steps: list[float] = []
        plain: list[float] = []
        gen_step_ips: list[float] = []
        gen_part_ips: list[float] = []
        direct_ips: list[float] = []
        try:
            with dg.instance_for_test() as instance:
                instance.add_dynamic_partitions(subject_partitions.name, ["bench"])
                for _ in range(rounds):
                    result = dg.materialize(
                        [lora_adapter],
                        partition_key="bench",
                        instance=instance,
                        resources=resources,
                        run_config={"ops": {"lora_adapter": {"config": {"resume": False}}}},
                    )
                    run_id = result.asset_materializations_for_node("lora_adapter")[0]
                    url = run_id.metadata["mlflow_run"].value
                    history = mlflow.MlflowClient(tracking.tracking_uri).get_metric_history(
                        url.rsplit("/", 1)[-1], "loss"
                    )
                    stamps = [m.timestamp / 1000 for m in sorted(history, key=lambda m: m.step)]
                    asset_steps += [b - a for a, b in zip(stamps[2:], stamps[3:], strict=False)]
                    plain += _plain_step_times(device, cfg, cached=False)[2:]

                    result = dg.materialize(
                        [generated_images],
                        partition_key="bench",
                        instance=instance,
                        resources=resources,
                    )
                    events = {
                        e.dagster_event.event_type_value: e.timestamp
                        for e in instance.all_logs(result.run_id)
                        if e.dagster_event is not None
                    }
                    seconds = events["STEP_SUCCESS"] - events["STEP_START"]
                    meta = result.asset_materializations_for_node("generated_images")[0].metadata
                    gen_step_ips.append(meta["images"].value / seconds)
                    gen_part_ips.append(meta["images_per_second"].value)
                    record = adapter_record(resources["models"].services(), "bench")
                    pipe = load_adapter(load_pipeline(base, device=device), record.adapter_dir)
                    pipe.set_progress_bar_config(disable=True)
                    _sync(device)
                    t0 = time.perf_counter()
                    n = _direct_generation(
                        pipe, [PROMPT], list(range(n_seeds)), bs, gen_steps, guidance
                    )
                    _sync(device)
                    direct_ips.append(n / (time.perf_counter() - t0))
        finally:
            stop_embedded(root / "pg")
    m_asset, m_plain = statistics.median(asset_steps), statistics.median(plain)
    step_ips, part_ips = statistics.median(gen_step_ips), statistics.median(gen_part_ips)
    d_ips = statistics.median(direct_ips)
    return {
        "rounds": rounds,
        "lora_adapter_step_ms_median": round(1000 * m_asset, 2),
        "plain_step_ms_median": round(1000 * m_plain, 2),
        "lora_ratio": round(m_asset / m_plain, 3),
        "lora_target_ratio_max": 1.1,
        "lora_pass": m_asset / m_plain <= 1.1,
        "generated_images_whole_step_images_per_s": round(step_ips, 2),
        "generated_images_generation_images_per_s": round(part_ips, 2),
        "direct_images_per_s": round(d_ips, 2),
        "generation_ratio_whole_step": round(step_ips / d_ips, 3),
        "generation_ratio_generation_part": round(part_ips / d_ips, 3),
        "generation_target_ratio_min": 0.9,
        "images_per_round": n_seeds,
        "note": "whole step = model load + adapter load + generation + PNG + store + catalog",
    }


# ============================================================================ families (CPU)
#
# SDXL, SD3 and FLUX: our train_lora step against a plain loop written the way the
# family's diffusers dreambooth LoRA script writes its step (train_dreambooth_lora_sdxl.py,
# _sd3.py, _flux.py with an instance prompt: text embeddings computed once; the VAE every
# step unless --cache_latents). Same tiny random model, batch, rank, target modules and
# optimizer. "ratio" is against the script's default step (VAE every step);
# "ratio_same_inputs" against its --cache_latents step, i.e. our pure bookkeeping.


def _family_pipeline(family: str, device: torch.device, seed: int = 0) -> Any:
    from mm_pipelines.models.demo.tiny_families import build_tiny_family_pipeline

    return build_tiny_family_pipeline(family, seed=seed).to(device)


def _family_ours_step_times(
    family: str, device: torch.device, cfg: LoraTrainConfig, images: list[Image.Image]
) -> list[float]:
    pipe = _family_pipeline(family, device)
    stamps: list[float] = []

    def on_step(step: int, loss: float) -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        stamps.append(time.perf_counter())
        train_lora(pipe, images, PROMPT, Path(tmp), cfg, device=device, on_step=on_step)
    return [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]


def _script_prompt_embeds(pipe: Any, family: str, n: int) -> dict[str, torch.Tensor]:
    """The instance prompt encoded once by the pipeline's own encode_prompt (as the
    scripts do with their copy of it), repeated to the batch."""
    from mm_pipelines.models.diffusion.families import get_family

    with torch.no_grad():
        if family == "sdxl":
            emb, _, pooled, _ = pipe.encode_prompt(
                PROMPT, device=pipe.device, do_classifier_free_guidance=False
            )
        elif family == "sd3":
            emb, _, pooled, _ = pipe.encode_prompt(
                PROMPT,
                None,
                None,
                device=pipe.device,
                do_classifier_free_guidance=False,
                max_sequence_length=get_family("sd3").t5_length(pipe),
            )
        else:
            emb, pooled, _ = pipe.encode_prompt(
                PROMPT,
                None,
                device=pipe.device,
                max_sequence_length=get_family("flux").t5_length(pipe),
            )
    return {"emb": emb.repeat(n, 1, 1), "pooled": pooled.repeat(n, 1)}


def script_step(
    family: str,
    pipe: Any,
    sched: Any,
    latents: torch.Tensor,
    text: dict[str, torch.Tensor],
    weight_dtype: torch.dtype,
    time_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """One loss the way the family's diffusers LoRA script computes it (global RNG)."""
    from diffusers import FluxPipeline
    from diffusers.training_utils import (
        compute_density_for_timestep_sampling,
        compute_loss_weighting_for_sd3,
    )

    bsz = latents.shape[0]
    noise = torch.randn_like(latents)
    if family == "sdxl":
        t = torch.randint(0, sched.config.num_train_timesteps, (bsz,), device=latents.device)
        noisy = sched.add_noise(latents, noise, t)
        cond = {"text_embeds": text["pooled"], "time_ids": time_ids}
        pred = pipe.unet(noisy, t, text["emb"], added_cond_kwargs=cond, return_dict=False)[0]
        return F.mse_loss(pred.float(), noise.float(), reduction="mean")
    scheme = "logit_normal" if family == "sd3" else "none"
    u = compute_density_for_timestep_sampling(
        weighting_scheme=scheme, batch_size=bsz, logit_mean=0.0, logit_std=1.0, mode_scale=1.29
    )
    indices = (u * sched.config.num_train_timesteps).long()
    timesteps = sched.timesteps[indices].to(latents.device)
    # the scripts' get_sigmas: look each timestep up in the schedule
    schedule = sched.timesteps.to(latents.device)
    steps = [(schedule == t).nonzero().item() for t in timesteps]
    sigmas = sched.sigmas.to(latents.device, latents.dtype)[steps].view(bsz, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    if family == "sd3":
        pred = pipe.transformer(
            hidden_states=noisy.to(weight_dtype),
            timestep=timesteps,
            encoder_hidden_states=text["emb"],
            pooled_projections=text["pooled"],
            return_dict=False,
        )[0]
        pred = pred * (-sigmas) + noisy  # preconditioned outputs (script default)
        target = latents
    else:
        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(
            b, h // 2, w // 2, latents.device, weight_dtype
        )
        txt_ids = torch.zeros(text["emb"].shape[1], 3, device=latents.device, dtype=weight_dtype)
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.tensor([3.5], device=latents.device).expand(b)
        pred = pipe.transformer(
            hidden_states=packed.to(weight_dtype),
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=text["pooled"],
            encoder_hidden_states=text["emb"],
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        scale = pipe.vae_scale_factor
        pred = FluxPipeline._unpack_latents(pred, h * scale, w * scale, scale)
        target = noise - latents
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    per_sample = (weighting.float() * (pred.float() - target.float()) ** 2).reshape(bsz, -1)
    return per_sample.mean(1).mean()


def _script_lora(pipe: Any, family: str, cfg: LoraTrainConfig) -> list[torch.nn.Parameter]:
    from peft import LoraConfig

    from mm_pipelines.models.diffusion.families import get_family

    fam = get_family(family)
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.requires_grad_(False)
    denoiser = fam.denoiser(pipe)
    denoiser.add_adapter(
        LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            init_lora_weights="gaussian",
            target_modules=list(cfg.target_modules or fam.default_target_modules),
        )
    )
    params = [p for p in denoiser.parameters() if p.requires_grad]
    for p in params:  # cast_training_params(..., torch.float32), as the scripts do
        p.data = p.data.float()
    return params


def _family_script_step_times(
    family: str,
    device: torch.device,
    cfg: LoraTrainConfig,
    images: list[Image.Image],
    cached: bool,
) -> list[float]:
    """The script's loop: --cache_latents samples cached posteriors, else the VAE runs."""
    from mm_pipelines.models.diffusion.families import get_family

    pipe = _family_pipeline(family, device)
    fam = get_family(family)
    params = _script_lora(pipe, family, cfg)
    opt = make_optimizer(params, cfg.learning_rate)  # same optimizer as ours
    sched = fam.training_scheduler(pipe)
    res = pipeline_resolution(pipe)
    pixels = images_to_tensor(images, res).to(device)
    text = _script_prompt_embeds(pipe, family, cfg.batch_size)
    time_ids = None
    if family == "sdxl":
        ids = [res, res, 0, 0, res, res]
        time_ids = torch.tensor([ids] * cfg.batch_size, dtype=torch.float32, device=device)
    vae = pipe.vae
    shift, scale = vae.config.shift_factor or 0.0, vae.config.scaling_factor
    mean, std = encode_latent_dist(vae, pixels)
    denoiser = fam.denoiser(pipe).train()
    weight_dtype = denoiser.dtype
    times = []
    for _ in range(cfg.steps):
        t0 = time.perf_counter()
        idx = torch.randint(0, len(images), (cfg.batch_size,))
        with torch.no_grad():
            if cached:
                latents = mean[idx] + std[idx] * torch.randn_like(mean[idx])
            else:
                latents = vae.encode(pixels[idx]).latent_dist.sample()
        latents = (latents - shift) * scale
        loss = script_step(family, pipe, sched, latents, text, weight_dtype, time_ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _ = loss.item()  # ours reads the loss every step too (callback)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def bench_family(family: str, device: torch.device, steps: int, rounds: int) -> dict[str, Any]:
    cfg = LoraTrainConfig(
        rank=4,
        alpha=4,
        learning_rate=1e-4,
        steps=steps,
        batch_size=4,
        checkpoint_every=max(1, steps // 2),
        keep_checkpoints=1,
    )
    images = _images(8)
    ours: list[float] = []
    plain: list[float] = []
    plain_cached: list[float] = []
    warm = LoraTrainConfig(steps=3, batch_size=4)
    _family_script_step_times(family, device, warm, images, cached=True)  # warm-up
    for _ in range(rounds):  # alternate: load drift on a shared machine hits all three
        ours += _family_ours_step_times(family, device, cfg, images)[2:]
        plain += _family_script_step_times(family, device, cfg, images, cached=False)[2:]
        plain_cached += _family_script_step_times(family, device, cfg, images, cached=True)[2:]
    m_ours, m_plain = statistics.median(ours), statistics.median(plain)
    m_cached = statistics.median(plain_cached)
    return {
        "family": family,
        "rank": cfg.rank,
        "batch_size": cfg.batch_size,
        "steps_per_round": steps,
        "rounds": rounds,
        "checkpoint_every": cfg.checkpoint_every,
        "ours_step_ms_median": round(1000 * m_ours, 2),
        "script_step_ms_median": round(1000 * m_plain, 2),
        "script_cache_latents_step_ms_median": round(1000 * m_cached, 2),
        "ratio": round(m_ours / m_plain, 3),
        "ratio_same_inputs": round(m_ours / m_cached, 3),
        "target_ratio_max": 1.1,
        "pass": m_ours / m_plain <= 1.1,
    }


def bench_family_generation(
    family: str, device: torch.device, rounds: int, n_images: int = 16, bs: int = 8
) -> dict[str, Any]:
    """generate_images vs calling the pipeline directly with the same arguments."""
    from mm_pipelines.models.diffusion.generate import pipeline_call_kwargs, seed_generators

    pipe = _family_pipeline(family, device)
    seeds = list(range(n_images))
    steps, guidance = 10, 3.0
    kwargs = pipeline_call_kwargs(pipe, guidance, batch=bs)
    ours_t, direct_t = [], []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        generate_images(
            pipe, [PROMPT], seeds, batch_size=bs, num_inference_steps=steps, guidance_scale=guidance
        )
        _sync(device)
        ours_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(0, n_images, bs):
            pipe(
                prompt=[PROMPT] * bs,
                generator=seed_generators(seeds[i : i + bs]),
                num_inference_steps=steps,
                output_type="pil",
                **kwargs,
            )
        _sync(device)
        direct_t.append(time.perf_counter() - t0)
    ours_ips = n_images / statistics.median(ours_t[1:])  # first round: warm-up
    direct_ips = n_images / statistics.median(direct_t[1:])
    return {
        "images_per_round": n_images,
        "batch_size": bs,
        "inference_steps": steps,
        "ours_images_per_s": round(ours_ips, 2),
        "direct_images_per_s": round(direct_ips, 2),
        "ratio": round(ours_ips / direct_ips, 3),
        "target_ratio_min": 0.9,
    }


# ============================================================================ GPU mode
#
# FLUX.1-dev-sized transformer (11.9 B params) and SDXL-sized UNet (2.6 B) with random
# weights: built on the meta device, cast to bf16 there, materialised on the GPU with
# to_empty and initialised in place (seconds instead of minutes of CPU init and copy).
# The VAE and text encoders are small stand-ins with the real widths (latents and text
# embeddings have the real shapes; they are cached before the timed steps anyway).
# Each configuration: train_lora for warm-up + N steps at batch 1, rank 16 on the
# attention projections; step time = median of the timed steps; peak = the CUDA
# allocator's max_memory_allocated (and reserved) over the whole call after a reset.

FLUX_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
SDXL_BASE = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
# --dry-run: the same code paths with tiny widths (runs on a CPU)
FLUX_TINY = {
    **FLUX_DEV,
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 32,
    "axes_dims_rope": (4, 6, 6),
}
SDXL_TINY = {
    **SDXL_BASE,
    "sample_size": 16,
    "block_out_channels": (32, 64, 64),
    "transformer_layers_per_block": (1, 1, 1),
    "attention_head_dim": (2, 4, 4),
    "cross_attention_dim": 64,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "norm_num_groups": 8,
}
ATTENTION_TARGETS = {
    "flux": (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
    ),
    "sdxl": ("to_q", "to_k", "to_v", "to_out.0"),
}


def _materialise(cls: Any, config: dict[str, Any], device: torch.device, seed: int = 0) -> Any:
    """Build on meta, cast there, allocate on `device`, fill with N(0, 0.02) (norms 1)."""
    with torch.device("meta"):
        model = cls(**config)
    model = model.to(torch.bfloat16).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=gen)
            elif name.endswith("weight") and "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()
    return model.eval().requires_grad_(False)


def _stand_in_vae(latent_channels: int, scale_blocks: int, shift: float | None) -> Any:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * scale_blocks,
        up_block_types=("UpDecoderBlock2D",) * scale_blocks,
        block_out_channels=(8,) * scale_blocks,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        scaling_factor=0.3611 if shift is not None else 0.13025,
        shift_factor=shift,
    )
    return vae.eval()


def _clip_tokenizer() -> Any:
    try:
        from mm_pipelines.models.demo.tokenizers import build_clip_tokenizer

        return build_clip_tokenizer()
    except ImportError:  # the GPU box has no open_clip
        from mm_pipelines.models.demo.tokenizers import build_char_clip_tokenizer

        return build_char_clip_tokenizer()


def _stand_in_clip(tok: Any, hidden: int, projection: int | None) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        projection_dim=projection or hidden,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def gpu_pipeline(family: str, device: torch.device, dry_run: bool) -> Any:
    from diffusers import (
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import T5Config, T5EncoderModel

    from mm_pipelines.models.demo.tokenizers import build_t5_tokenizer

    tok = _clip_tokenizer()
    if family == "flux":
        cfg = FLUX_TINY if dry_run else FLUX_DEV
        t5_tok = build_t5_tokenizer(512)
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tok),
                d_model=cfg["joint_attention_dim"],
                d_kv=32,
                d_ff=64,
                num_layers=1,
                num_heads=2,
                dropout_rate=0.0,
            )
        ).eval()
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
            vae=_stand_in_vae(16, 4, 0.1159),
            text_encoder=_stand_in_clip(tok, cfg["pooled_projection_dim"], None),
            tokenizer=tok,
            text_encoder_2=t5,
            tokenizer_2=t5_tok,
            transformer=_materialise(FluxTransformer2DModel, cfg, device),
        )
    else:
        cfg = SDXL_TINY if dry_run else SDXL_BASE
        width2 = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        pipe = StableDiffusionXLPipeline(
            vae=_stand_in_vae(4, 4, None),
            text_encoder=_stand_in_clip(tok, cfg["cross_attention_dim"] - width2, None),
            text_encoder_2=_stand_in_clip(tok, width2, width2),
            tokenizer=tok,
            tokenizer_2=tok,
            unet=_materialise(UNet2DConditionModel, cfg, device),
            scheduler=EulerDiscreteScheduler(
                beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
            ),
            add_watermarker=False,
        )
    for name, comp in pipe.components.items():  # the small parts in bf16 as well
        if isinstance(comp, torch.nn.Module) and name not in ("transformer", "unet"):
            comp.to(device, torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gpu_images(size: int, n: int = 2) -> list[Image.Image]:
    out = []
    for i in range(n):
        im = Image.new("RGB", (size, size), (240, 140, 20))
        r = size // 4 + 8 * i
        ImageDraw.Draw(im).ellipse((r, r, size - r, size - r), fill=(40, 60, 220))
        out.append(im)
    return out


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    gib = 1024**3
    return {
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / gib, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / gib, 2),
    }


def _gpu_ours(
    pipe: Any, family: str, size: int, device: torch.device, steps: int, **switches: Any
) -> dict[str, Any]:
    from mm_pipelines.models.diffusion.families import get_family

    cfg = LoraTrainConfig(
        rank=16,
        alpha=16,
        learning_rate=1e-4,
        steps=steps + 2,
        batch_size=1,
        checkpoint_every=0,
        target_modules=ATTENTION_TARGETS[family],
        **switches,
    )
    stamps: list[float] = []

    def on_step(step: int, loss: float) -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    _reset_peak(device)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = train_lora(
                pipe, _gpu_images(size), PROMPT, tmp, cfg, device=device, on_step=on_step
            )
    finally:  # the base as it was for the next row, also after an OOM
        _unload(get_family(family).denoiser(pipe))
    times = [b - a for a, b in zip(stamps[2:], stamps[3:], strict=False)]  # 2 warm-up steps
    row = {
        "step_ms_median": round(1000 * statistics.median(times), 1),
        "step_ms_min": round(1000 * min(times), 1),
        "timed_steps": len(times),
        "trainable_params": result.params["trainable_params"],
        "final_loss": round(result.losses[-1], 4),
        **_peak(device),
    }
    return row


def _unload(denoiser: Any) -> None:
    if getattr(denoiser, "peft_config", None):
        denoiser.unload_lora()
    _free(next(denoiser.parameters()).device)


def _gpu_reference(
    pipe: Any, family: str, size: int, device: torch.device, steps: int
) -> dict[str, Any]:
    """The step as diffusers' FLUX LoRA script writes it (bf16 weights, fp32 LoRA via
    cast_training_params, AdamW, cached latents and text embeddings, batch 1), run under
    the same attention restriction as ours (cuDNN SDPA crashed on FLUX shapes)."""
    from mm_pipelines.models.diffusion.families import get_family

    fam = get_family(family)
    cfg = LoraTrainConfig(rank=16, alpha=16, target_modules=ATTENTION_TARGETS[family])
    denoiser = fam.denoiser(pipe)
    _reset_peak(device)
    try:
        params = _script_lora(pipe, family, cfg)
        times = _reference_steps(pipe, family, size, device, steps, params)
    finally:
        denoiser.eval()
        _unload(denoiser)
    return {
        "step_ms_median": round(1000 * statistics.median(times[2:]), 1),
        "step_ms_min": round(1000 * min(times[2:]), 1),
        "timed_steps": len(times) - 2,
        **_peak(device),
    }


def _reference_steps(
    pipe: Any,
    family: str,
    size: int,
    device: torch.device,
    steps: int,
    params: list[torch.nn.Parameter],
) -> list[float]:
    from mm_pipelines.models.diffusion.families import get_family
    from mm_pipelines.models.diffusion.memory import attention_backend

    fam = get_family(family)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    sched = fam.training_scheduler(pipe)
    with torch.no_grad():
        pixels = images_to_tensor(_gpu_images(size), size).to(device, torch.bfloat16)
        dist = pipe.vae.encode(pixels).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        text = _script_prompt_embeds(pipe, family, 1)
    shift, scale = pipe.vae.config.shift_factor or 0.0, pipe.vae.config.scaling_factor
    fam.denoiser(pipe).train()
    times = []
    with attention_backend("default", device):
        for _ in range(steps + 2):
            t0 = time.perf_counter()
            idx = torch.randint(0, len(mean), (1,))
            latents = ((mean[idx] + std[idx] * torch.randn_like(mean[idx])) - shift) * scale
            with autocast(device, torch.bfloat16):  # accelerate's mixed_precision="bf16"
                loss = script_step(
                    family, pipe, sched, latents.to(torch.bfloat16), text, torch.bfloat16
                )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            _ = loss.item()
            _sync(device)
            times.append(time.perf_counter() - t0)
    return times


def _gpu_rows(
    family: str,
    sizes: list[int],
    device: torch.device,
    steps: int,
    dry_run: bool,
    reference_size: int | None,
) -> dict[str, Any]:
    """Every configuration of one family, NF4 last (it quantizes the base in place)."""
    out: dict[str, Any] = {}

    def attempt(key: str, fn: Any) -> None:
        try:
            out[key] = fn()
        except Exception as err:  # one failed row (OOM, kernel) must not lose the others
            out[key] = {"error": f"{type(err).__name__}: {str(err)[:400]}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(json.dumps({key: out[key]}), file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    pipe = gpu_pipeline(family, device, dry_run)
    denoiser = pipe.transformer if family == "flux" else pipe.unet
    out["build_s"] = round(time.perf_counter() - t0, 1)
    out["denoiser_params"] = count_parameters(denoiser)
    for size in sizes:
        attempt(f"{size}px_bf16", lambda s=size: _gpu_ours(pipe, family, s, device, steps))
        attempt(
            f"{size}px_bf16_checkpointing",
            lambda s=size: _gpu_ours(pipe, family, s, device, steps, gradient_checkpointing=True),
        )
    if reference_size is not None:
        attempt(
            f"{reference_size}px_reference_diffusers_script",
            lambda: _gpu_reference(pipe, family, reference_size, device, steps),
        )
        ours = out.get(f"{reference_size}px_bf16", {})
        ref = out[f"{reference_size}px_reference_diffusers_script"]
        if "step_ms_median" in ours and "step_ms_median" in ref:
            out[f"{reference_size}px_ratio_ours_to_reference"] = round(
                ours["step_ms_median"] / ref["step_ms_median"], 3
            )
    try:
        import bitsandbytes  # noqa: F401

        nf4_ok = device.type == "cuda"
        why = "needs CUDA"
    except ImportError:
        nf4_ok, why = False, "bitsandbytes not importable"
    for size in sizes:
        key = f"{size}px_nf4_adamw8bit_checkpointing"
        if not nf4_ok:
            out[key] = {"skipped": why}
            continue
        attempt(
            key,
            lambda s=size: _gpu_ours(
                pipe,
                family,
                s,
                device,
                steps,
                nf4=True,
                optimizer="adamw8bit",
                gradient_checkpointing=True,
            ),
        )
    return out  # the pipeline goes with this frame (run_gpu collects it)


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _probe_cudnn(args: Any) -> dict[str, Any]:
    """FLUX at 512 px with attention_backend=cudnn in a child process: a crash there
    ('illegal memory access' in mha_graph.execute) takes the CUDA context with it."""
    import subprocess

    cmd = [sys.executable, __file__, "--gpu", "--only", "flux-cudnn", "--gpu-steps", "3"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "timed out after 240 s"}
    row: dict[str, Any] = {
        "returncode": proc.returncode,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if proc.returncode == 0:
        row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    else:
        row["stderr_tail"] = proc.stderr[-1500:]
    return row


def run_gpu(args: Any) -> dict[str, Any]:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type != "cuda" and not args.dry_run:
        raise SystemExit("--gpu needs CUDA (use --dry-run to check the code paths on a CPU)")
    if args.only == "flux-cudnn":  # child of --probe-cudnn
        pipe = gpu_pipeline("flux", device, args.dry_run)
        row = _gpu_ours(pipe, "flux", 512, device, args.gpu_steps, attention_backend="cudnn")
        return {"flux_512px_bf16_cudnn_attention": row}
    steps = 2 if args.dry_run else args.gpu_steps
    sizes = [64, 128] if args.dry_run else [512, 1024]
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "bench_lora --gpu",
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "batch_size": 1,
        "rank": 16,
        "attention_backend": "default (flash / efficient / math; cuDNN SDPA left out)",
        "text_embeddings": "cached (train_lora default)",
    }
    result["flux"] = _gpu_rows("flux", sizes, device, steps, args.dry_run, sizes[0])
    _free(device)  # FLUX's 24 GB go before SDXL is built
    result["sdxl"] = _gpu_rows("sdxl", sizes[-1:], device, steps, args.dry_run, None)
    _free(device)
    if args.probe_cudnn and device.type == "cuda":
        result["flux_cudnn_probe"] = _probe_cudnn(args)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="sd", choices=["sd", "sdxl", "sd3", "flux"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    # one thread by default: on a small shared CPU box, oversubscribed thread pools add
    # more noise than a second thread adds speed to these tiny models (0 = torch default)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-asset", action="store_true", help="skip the Dagster asset comparison")
    ap.add_argument("--gpu", action="store_true", help="FLUX.1-dev / SDXL sized GPU mode")
    ap.add_argument("--dry-run", action="store_true", help="--gpu with tiny sizes (any device)")
    ap.add_argument("--gpu-steps", type=int, default=6)
    ap.add_argument("--probe-cudnn", action="store_true", help="--gpu: try cuDNN attention too")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # child of --probe-cudnn
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    if args.gpu:
        result = run_gpu(args)
    else:
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        device = resolve_device(args.device)
        if args.family == "sd":
            pipe = build_tiny_pipeline()
            result = {
                "benchmark": "bench_lora",
                "family": "sd",
                "device": str(device),
                "torch_threads": torch.get_num_threads(),
                "model": "tiny StableDiffusion (build_tiny_pipeline defaults, 32 px)",
                "unet_params": count_parameters(pipe.unet),
                "lora_training": bench_lora(device, args.steps, args.rounds),
                "generation": bench_generation(device, args.rounds),
            }
            if not args.no_asset:
                result["asset"] = bench_assets(device, args.steps, args.rounds)
        else:
            pipe = _family_pipeline(args.family, torch.device("cpu"))
            denoiser = pipe.unet if args.family == "sdxl" else pipe.transformer
            result = {
                "benchmark": "bench_lora",
                "family": args.family,
                "device": str(device),
                "torch_threads": torch.get_num_threads(),
                "model": f"tiny {type(pipe).__name__} (models.demo.tiny_families, 32 px, random)",
                "denoiser_params": count_parameters(denoiser),
                "lora_training": bench_family(args.family, device, args.steps, args.rounds),
                "generation": bench_family_generation(args.family, device, args.rounds),
            }
    text = json.dumps(result)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
