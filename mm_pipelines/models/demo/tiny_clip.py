"""Contrastive training of a (tiny) CLIP on procedurally drawn captioned shapes.

Training runs a fixed number of optimizer STEPS from a seed, so the same config gives the
same model whatever the machine load; ``max_seconds`` is only a safety net (a run that
hits it reports ``stopped_early``). A ``progress(step, loss)`` callback lets callers log
to MLflow without this module knowing about MLflow.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from mm_pipelines.models.clip.encode import encode_images, encode_texts
from mm_pipelines.models.clip.loading import (
    TINY_ARCH,
    ClipBundle,
    autocast_dtype,
    register_tiny_architecture,
    resolve_precision,
    save_checkpoint,
)
from mm_pipelines.models.common import file_sha256, resolve_device
from mm_pipelines.models.demo import shapes

ProgressFn = Callable[[int, float], None]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained model (with the seed, bit for bit on CPU)."""

    steps: int = 400
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    images_per_combo: int = 16  # training pool: drawn once, sampled every step
    draw_px: int = 64  # drawn larger than the model input and resized, as demo images are
    seed: int = 0
    architecture: str = TINY_ARCH
    # The 49k x width token table is ~3/4 of the tiny model's weights but captions use a few
    # dozen rows: training it costs a dense optimizer pass per step for little gain, so the
    # random (seeded) table stays fixed and the transformer learns on top of it.
    train_token_embedding: bool = False
    max_seconds: float | None = 900.0  # safety net only; results must not depend on it
    log_every: int = 25

    def to_dict(self) -> dict:
        return asdict(self)


# The demo model (`mm demo`, and the tests' session fixture `demo_clip`).
DEMO_TRAIN_CONFIG = TrainConfig()


@dataclass
class TrainResult:
    bundle: ClipBundle  # the trained model, in eval mode
    config: TrainConfig
    steps_done: int
    final_loss: float
    seconds: float
    cpu_seconds: float  # all threads; on an idle machine wall time ~ cpu_seconds / cores
    stopped_early: bool
    losses: list[tuple[int, float]] = field(default_factory=list)
    checkpoint_path: str | None = None
    checkpoint_sha256: str | None = None


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to zero over exactly cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, progress)))


def _build_pool(
    cfg: TrainConfig, preprocess, tokenizer
) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Pre-draw and pre-process the training images once: steps then only index tensors."""
    specs = shapes.all_specs()
    n = len(specs) * cfg.images_per_combo
    images, tensors, combo_of = [], [], []
    spec_index = {s: i for i, s in enumerate(specs)}
    for sample in shapes.iter_samples("train", n, seed=cfg.seed, size_px=cfg.draw_px):
        tensors.append(preprocess(sample.image))
        combo_of.append(spec_index[sample.spec])
        images.append(sample.image)
    by_combo: list[list[int]] = [[] for _ in specs]
    for i, c in enumerate(combo_of):
        by_combo[c].append(i)
    text_tokens = tokenizer([s.caption for s in specs])
    return torch.stack(tensors), text_tokens, by_combo


def _shape_groups(specs: Sequence[shapes.ShapeSpec]) -> list[list[int]]:
    """Combo indices grouped by (colour, background): a group differs only in shape."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, s in enumerate(specs):
        groups.setdefault((s.colour, s.background), []).append(i)
    return list(groups.values())


def _sample_batch(
    gen: torch.Generator,
    by_combo: list[list[int]],
    groups: list[list[int]],
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of distinct caption combos, built from whole (colour, background) groups.

    Colour is easy and shape is hard: with every shape of a colour pair in the batch,
    the only way to tell those captions apart is the shape, so each step teaches it.
    Distinct combos also mean no in-batch negative shares the positive's caption.
    """
    combos: list[int] = []
    for g in torch.randperm(len(groups), generator=gen).tolist():
        if len(combos) + len(groups[g]) > batch_size:
            break
        combos.extend(groups[g])
    picks = torch.randint(0, 1 << 30, (len(combos),), generator=gen).tolist()
    image_idx = [by_combo[c][p % len(by_combo[c])] for c, p in zip(combos, picks, strict=True)]
    return torch.tensor(image_idx), torch.tensor(combos)


def train_clip(
    config: TrainConfig = DEMO_TRAIN_CONFIG,
    device: str | torch.device | None = "cpu",
    precision: str | None = None,
    progress: ProgressFn | None = None,
    checkpoint_path: str | Path | None = None,
) -> TrainResult:
    """Train from scratch; optionally save a checkpoint loadable by ``load_clip``."""
    register_tiny_architecture()
    dev = resolve_device(device)
    prec = resolve_precision(dev, precision)
    with torch.random.fork_rng(devices=[]):  # seed the init without touching global state
        torch.manual_seed(config.seed)
        model, _, preprocess = open_clip.create_model_and_transforms(
            config.architecture, device=dev
        )
    tokenizer = open_clip.get_tokenizer(config.architecture)
    images, text_tokens, by_combo = _build_pool(config, preprocess, tokenizer)
    groups = _shape_groups(shapes.all_specs())
    images, text_tokens = images.to(dev), text_tokens.to(dev)

    if not config.train_token_embedding:
        model.token_embedding.weight.requires_grad_(False)
    optimizer = _make_optimizer(model, config)
    gen = torch.Generator().manual_seed(config.seed)
    amp = autocast_dtype(prec)
    losses: list[tuple[int, float]] = []
    t0, cpu0 = time.perf_counter(), time.process_time()
    step, loss, stopped_early = 0, None, False
    model.train()
    for step in range(config.steps):
        if config.max_seconds is not None and time.perf_counter() - t0 > config.max_seconds:
            stopped_early = True
            break
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        img_idx, combo_idx = _sample_batch(gen, by_combo, groups, config.batch_size)
        loss = _step(model, optimizer, images[img_idx.to(dev)], text_tokens[combo_idx.to(dev)], amp)
        # reading a loss waits for the device: only on the steps that are logged
        if step % config.log_every == 0 or step == config.steps - 1:
            losses.append((step, float(loss)))
            if progress is not None:
                progress(step, losses[-1][1])
    else:
        step = config.steps
    loss_value = float("nan") if loss is None else float(loss)
    model.eval()
    bundle = _bundle_from_trained(model, preprocess, tokenizer, dev, prec, config)
    result = TrainResult(
        bundle=bundle,
        config=config,
        steps_done=step,
        final_loss=loss_value,
        seconds=time.perf_counter() - t0,
        cpu_seconds=time.process_time() - cpu0,
        stopped_early=stopped_early,
        losses=losses,
    )
    if checkpoint_path is not None:
        result.checkpoint_sha256 = save_checkpoint(model, checkpoint_path)
        result.checkpoint_path = str(checkpoint_path)
        bundle.checkpoint = str(checkpoint_path)
        bundle.model_version = f"{config.architecture}@sha256:{result.checkpoint_sha256[:16]}"
    return result


def _make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on gains, biases, embeddings and the temperature (CLIP's recipe).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "logit_scale" in name or "embedding" in name or "token" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
        fused=True,  # one pass over the weights per step: CPU memory bandwidth is scarce
    )


def _step(model, optimizer, images, tokens, amp: torch.dtype | None) -> torch.Tensor:
    ctx = torch.autocast(images.device.type, dtype=amp) if amp else contextlib.nullcontext()
    with ctx:
        img, txt, logit_scale = model(images, tokens)[:3]
        logits = logit_scale * img.float() @ txt.float().T
        labels = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():  # CLIP clamps the learned temperature at 100
        model.logit_scale.clamp_(0, math.log(100))
    return loss.detach()


def _bundle_from_trained(model, preprocess, tokenizer, dev, prec, cfg: TrainConfig) -> ClipBundle:
    text_proj = model.text_projection
    return ClipBundle(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        context_length=int(model.context_length),
        device=dev,
        precision=prec,
        architecture=cfg.architecture,
        checkpoint=None,
        model_version=f"{cfg.architecture}@unsaved-seed{cfg.seed}-steps{cfg.steps}",
        embed_dim=int(text_proj.shape[-1]),
    )


def evaluate_text_to_image_recall(
    model: ClipBundle,
    images: Sequence[Image.Image | str | bytes],
    captions: Sequence[str],
    k: int = 1,
) -> float:
    """Caption-match recall@k: for each distinct caption, a hit if any of the top-k
    images (by cosine similarity to the caption's text vector) carries that caption."""
    if len(images) != len(captions):
        raise ValueError("images and captions must align")
    encoded = encode_images(model, images, num_workers=0)
    if encoded.errors:
        raise ValueError(f"{len(encoded.errors)} evaluation images failed to decode")
    image_captions = np.array([captions[i] for i in encoded.indices])
    queries = sorted(set(captions))
    text_vectors = encode_texts(model, queries).vectors
    scores = text_vectors @ encoded.vectors.T  # [queries, images]
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    hits = [(image_captions[top[q]] == queries[q]).any() for q in range(len(queries))]
    return float(np.mean(hits))


def evaluate_on_heldout(
    bundle: ClipBundle, n: int | None = None, seed: int = 0, size_px: int = 64, k: int = 1
) -> float:
    """Recall@k on the held-out shapes split (one image per combo by default)."""
    images, captions = shapes.heldout_split(n, seed=seed, size_px=size_px)
    return evaluate_text_to_image_recall(bundle, images, captions, k)


def checkpoint_version(architecture: str, path: str | Path) -> str:
    return f"{architecture}@sha256:{file_sha256(path)[:16]}"
