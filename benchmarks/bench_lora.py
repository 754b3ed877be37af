"""LoRA training step time and generation throughput: our code vs plain diffusers, same run.

Run: .venv/bin/python benchmarks/bench_lora.py [--device auto|cpu|cuda] [--steps 40]
     [--rounds 3] [--threads 1]
Prints ONE JSON object.

- lora.ratio: median step time of `mm_pipelines.models.diffusion.lora.train_lora` (checkpointing and
  callbacks included) / median step time of a minimal diffusers+peft loop written the way
  diffusers' train_text_to_image_lora example does it (VAE + text encoder every step),
  same model, batch, rank, optimizer. Target <= 1.1.
- lora.ratio_same_inputs: the same against a plain loop that is also given pre-encoded
  latents/embeddings, i.e. our loop's pure bookkeeping overhead.
- generation.ratio: images/s of `generate_images` / images/s of calling the pipeline
  directly with the same batch size, prompts, seeds and steps. Target >= 0.9.
- asset.*: the same two comparisons through the Dagster assets themselves
  (`lora_adapter` materialized with its MLflow run, step times read from the logged
  loss timestamps; `generated_images` materialized with the media store and catalog
  writes, whole step and generation part) against the plain loop / direct pipeline
  calls in the same process. With --no-asset they are skipped.
Rounds alternate between the contenders so load drift on a shared machine hits both.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from mm_pipelines.models.common import resolve_device
from mm_pipelines.models.demo.tiny_diffusion import TinyDiffusionConfig, build_tiny_pipeline
from mm_pipelines.models.diffusion.generate import generate_images
from mm_pipelines.models.diffusion.lora import LoraTrainConfig, train_lora
from mm_pipelines.models.diffusion.pipeline import count_parameters, encode_prompts
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
            target_modules=list(cfg.target_modules),
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    # one thread by default: on a small shared CPU box, oversubscribed thread pools add
    # more noise than a second thread adds speed to these tiny models (0 = torch default)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-asset", action="store_true", help="skip the Dagster asset comparison")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    pipe = build_tiny_pipeline()
    result = {
        "benchmark": "bench_lora",
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "model": "tiny StableDiffusion (build_tiny_pipeline defaults, 32 px)",
        "unet_params": count_parameters(pipe.unet),
        "lora_training": bench_lora(device, args.steps, args.rounds),
        "generation": bench_generation(device, args.rounds),
    }
    if not args.no_asset:
        result["asset"] = bench_assets(device, args.steps, args.rounds)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
