"""Generation quality metrics: CLIP score, FID and KID. Plain Python, no downloads.

CLIP score works with any open_clip-like model object (`encode_image`, `encode_text`) plus
its tokenizer, preprocess transform and text context length; torchmetrics' own CLIPScore
loads a hub model and cannot run offline.

FID/KID use torchmetrics' `FrechetInceptionDistance` / `KernelInceptionDistance` with a
custom feature module (their default Inception downloads its weights). The default
feature extractor is a CLIP image tower (`ClipImageFeatures`); Inception is used only
when a local weights file is configured (`inception_feature_extractor(path)`, the
torch-fidelity `pt_inception-2015-12-05` file that published FIDs use). Features are
extracted once and fed to both metrics. Every result carries its sample sizes: FID is
strongly biased at small n, so a number without its n cannot be compared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mm_pipelines.models.common import module_device, module_dtype

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImagesLike = Sequence[Image.Image] | torch.Tensor


class ClipLike(Protocol):
    """What CLIP score needs from a model (open_clip's CLIP has both)."""

    def encode_image(self, image: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, text: torch.Tensor) -> torch.Tensor: ...


# --------------------------------------------------------------------------- CLIP score


@dataclass(frozen=True)
class ClipScoreResult:
    """100 x cosine(image, prompt), clipped at 0, averaged over the scored pairs."""

    score: float
    per_pair: list[float | None]  # None where the prompt was flagged as too long
    n: int  # pairs that were scored
    n_chunked: int  # prompts longer than the context that were scored in chunks
    flagged: list[int]  # indices of prompts too long and not scored (long_prompts="flag")
    chunk_reduce: str
    context_length: int


def clip_score(
    images: ImagesLike,
    prompts: Sequence[str],
    model: ClipLike,
    tokenizer: Callable[..., torch.Tensor],
    preprocess: Callable[[Image.Image], torch.Tensor] | None = None,
    *,
    context_length: int | None = None,
    long_prompts: Literal["chunk", "flag", "error"] = "chunk",
    chunk_reduce: Literal["mean", "max"] = "mean",
    pad_id: int = 0,
    batch_size: int = 32,
) -> ClipScoreResult:
    """CLIP score of each image against its prompt (pairs: images[i] <-> prompts[i]).

    Prompts longer than the text context are never silently truncated:
    - "chunk" (default): split at word boundaries into pieces that fit, score each piece,
      and reduce with `chunk_reduce`. Default "mean": an image has to match every part
      of a long prompt to score high, while "max" would reward an image that matches
      any one clause (e.g. only the style words) as much as one matching them all.
    - "flag": such pairs get no score (None) and their indices are returned in `flagged`.
    - "error": raise ValueError.
    `tokenizer(texts, context_length=N)` must return ids padded with `pad_id` (open_clip).
    `context_length` defaults to `model.context_length`. The model runs where its weights
    are; the scores come to the host once, at the end.
    """
    scores, chunks, flagged, ctx = _pair_scores(
        images,
        prompts,
        model,
        tokenizer,
        preprocess,
        context_length,
        long_prompts,
        chunk_reduce,
        pad_id,
        batch_size,
    )
    per_pair: list[float | None] = [
        None if not cs else float(v) for cs, v in zip(chunks, scores.cpu().tolist(), strict=True)
    ]
    scored = [s for s in per_pair if s is not None]
    return ClipScoreResult(
        score=float(np.mean(scored)) if scored else float("nan"),
        per_pair=per_pair,
        n=len(scored),
        n_chunked=sum(1 for cs in chunks if len(cs) > 1),
        flagged=flagged,
        chunk_reduce=chunk_reduce,
        context_length=ctx,
    )


def clip_score_per_pair(
    images: ImagesLike,
    prompts: Sequence[str],
    model: ClipLike,
    tokenizer: Callable[..., torch.Tensor],
    preprocess: Callable[[Image.Image], torch.Tensor] | None = None,
    *,
    context_length: int | None = None,
    long_prompts: Literal["chunk", "flag", "error"] = "chunk",
    chunk_reduce: Literal["mean", "max"] = "mean",
    pad_id: int = 0,
    batch_size: int = 32,
) -> torch.Tensor:
    """The per-pair scores of `clip_score` as a tensor on the model's device (NaN where a
    prompt was flagged), without the host copy."""
    return _pair_scores(
        images,
        prompts,
        model,
        tokenizer,
        preprocess,
        context_length,
        long_prompts,
        chunk_reduce,
        pad_id,
        batch_size,
    )[0]


def _pair_scores(
    images: ImagesLike,
    prompts: Sequence[str],
    model: ClipLike,
    tokenizer: Callable[..., torch.Tensor],
    preprocess: Callable[[Image.Image], torch.Tensor] | None,
    context_length: int | None,
    long_prompts: str,
    chunk_reduce: str,
    pad_id: int,
    batch_size: int,
) -> tuple[torch.Tensor, list[list[str]], list[int], int]:
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if chunk_reduce not in ("mean", "max"):
        raise ValueError(f"chunk_reduce must be 'mean' or 'max', got {chunk_reduce!r}")
    ctx = int(context_length or getattr(model, "context_length", 0) or 0)
    if ctx <= 0:
        raise ValueError("context_length is needed (the model has no .context_length)")
    chunks, flagged = _prompt_chunks(prompts, tokenizer, ctx, pad_id, long_prompts)
    img_emb = _image_embeddings(images, model, preprocess, batch_size)
    txt_emb = _text_embeddings([c for cs in chunks for c in cs], model, tokenizer, ctx, batch_size)
    device = img_emb.device
    owner = torch.tensor([i for i, cs in enumerate(chunks) for _ in cs], dtype=torch.long)
    owner = owner.to(device)
    cos = (txt_emb * img_emb[owner]).sum(-1)  # each chunk against its own image
    n = len(chunks)
    if chunk_reduce == "mean":
        counts = torch.tensor([len(cs) for cs in chunks], dtype=cos.dtype).to(device)
        reduced = torch.zeros(n, dtype=cos.dtype, device=device).index_add_(0, owner, cos)
        reduced = reduced / counts.clamp_min(1)
    else:
        reduced = torch.full((n,), -torch.inf, dtype=cos.dtype, device=device)
        reduced = reduced.scatter_reduce(0, owner, cos, reduce="amax")
    unscored = torch.tensor([not cs for cs in chunks], dtype=torch.bool).to(device)
    scores = torch.where(unscored, torch.nan, 100.0 * reduced.clamp_min(0))
    return scores, chunks, flagged, ctx


def token_count(tokenizer: Callable[..., torch.Tensor], text: str, pad_id: int = 0) -> int:
    """Tokens the text needs, start/end tokens included (tokenised without truncation)."""
    limit = 8 * max(16, len(text))  # > any tokenisation of the text: nothing gets cut
    ids = tokenizer([text], context_length=limit)
    return int((ids[0] != pad_id).sum())


def split_prompt(
    text: str, tokenizer: Callable[..., torch.Tensor], context_length: int, pad_id: int = 0
) -> list[str] | None:
    """Greedy word-boundary chunks that each fit the context; None if a word alone is too long."""
    words = text.split()
    chunks: list[str] = []
    current: list[str] = []
    for word in words:
        candidate = " ".join([*current, word])
        if token_count(tokenizer, candidate, pad_id) <= context_length:
            current.append(word)
            continue
        if not current:
            return None
        chunks.append(" ".join(current))
        current = [word]
        if token_count(tokenizer, word, pad_id) > context_length:
            return None
    if current:
        chunks.append(" ".join(current))
    return chunks


def _prompt_chunks(
    prompts: Sequence[str],
    tokenizer: Callable[..., torch.Tensor],
    ctx: int,
    pad_id: int,
    mode: str,
) -> tuple[list[list[str]], list[int]]:
    chunks: list[list[str]] = []
    flagged: list[int] = []
    for i, prompt in enumerate(prompts):
        if token_count(tokenizer, prompt, pad_id) <= ctx:
            chunks.append([prompt])
            continue
        if mode == "error":
            raise ValueError(f"prompt {i} is longer than the text context ({ctx} tokens)")
        parts = split_prompt(prompt, tokenizer, ctx, pad_id) if mode == "chunk" else None
        if parts is None:
            flagged.append(i)
            chunks.append([])
        else:
            chunks.append(parts)
    return chunks, flagged


@torch.no_grad()
def _image_embeddings(
    images: ImagesLike,
    model: ClipLike,
    preprocess: Callable[[Image.Image], torch.Tensor] | None,
    batch_size: int,
) -> torch.Tensor:
    """L2-normalised float32 image embeddings on the model's device."""
    if isinstance(images, torch.Tensor):
        pixels = images
    else:
        if preprocess is None:
            raise ValueError("preprocess is needed for PIL images")
        pixels = torch.stack([preprocess(im.convert("RGB")) for im in images])
    device, dtype = _placement(model)
    out = [
        model.encode_image(b.to(device, dtype=dtype, non_blocking=True)).float()
        for b in pixels.split(batch_size)
    ]
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def _text_embeddings(
    texts: list[str],
    model: ClipLike,
    tokenizer: Callable[..., torch.Tensor],
    ctx: int,
    batch_size: int,
) -> torch.Tensor:
    """L2-normalised float32 text embeddings on the model's device."""
    device, _ = _placement(model)
    if not texts:
        return torch.zeros(0, 1, device=device)
    out = []
    for start in range(0, len(texts), batch_size):
        ids = tokenizer(texts[start : start + batch_size], context_length=ctx)
        out.append(model.encode_text(ids.to(device, non_blocking=True)).float())
    return F.normalize(torch.cat(out), dim=-1)


def _placement(model: Any) -> tuple[torch.device, torch.dtype]:
    """Device and weight dtype of a model (CPU/float32 for an object without weights)."""
    if isinstance(model, torch.nn.Module):
        return module_device(model), module_dtype(model)
    return torch.device("cpu"), torch.float32


# --------------------------------------------------------------------------- feature extractors


class ClipImageFeatures(torch.nn.Module):
    """CLIP image tower as a FID/KID feature extractor.

    Takes uint8 [B,3,H,W] in [0,255] (torchmetrics' convention) or float in [0,1] on any
    device, moves it to the tower's device, resizes to the tower's input size and
    normalises with CLIP's mean/std there, so no torchvision transform has to travel
    with it.
    """

    def __init__(
        self,
        model: ClipLike,
        image_size: int,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        name: str = "clip",
    ) -> None:
        super().__init__()
        self.model = model
        self.image_size = int(image_size)
        self.name = name
        device, _ = _placement(model)
        self.register_buffer("mean", torch.tensor(mean, device=device).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(std, device=device).view(1, 3, 1, 1), False)
        with torch.no_grad():  # torchmetrics reads num_features instead of probing at 299 px
            probe = torch.zeros(1, 3, self.image_size, self.image_size, dtype=torch.uint8)
            self.num_features = int(self.forward(probe).shape[-1])

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        # the tower's placement, read on every call: the model may have moved on its own
        device, dtype = _placement(self.model)
        x = imgs.to(device, non_blocking=True)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(
                x,
                size=(self.image_size, self.image_size),
                mode="bicubic",
                align_corners=False,
                antialias=True,
            ).clamp(0, 1)
        x = (x - self.mean.to(device)) / self.std.to(device)
        return self.model.encode_image(x.to(dtype)).float()


class _InceptionFeatures(torch.nn.Module):
    def __init__(self, inception: torch.nn.Module, dims: int) -> None:
        super().__init__()
        self.inception = inception
        self.num_features = dims
        self.name = f"inception-v3-{dims}"

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        if imgs.dtype != torch.uint8:  # torch-fidelity's Inception wants uint8 [0, 255]
            imgs = (imgs.clamp(0, 1) * 255).round().to(torch.uint8)
        return self.inception(imgs).reshape(imgs.shape[0], -1)


def inception_feature_extractor(weights_path: str | Path, dims: int = 2048) -> torch.nn.Module:
    """torchmetrics' FID Inception (torch-fidelity) from a LOCAL weights file, never a URL."""
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights not found: {path}")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as e:  # pragma: no cover - torchmetrics is a hard dependency
        raise ImportError("torchmetrics is needed for the Inception extractor") from e
    net = NoTrainInceptionV3(
        name="inception-v3-compat",
        features_list=[str(dims)],
        feature_extractor_weights_path=str(path),
    )
    return _InceptionFeatures(net, dims)


# --------------------------------------------------------------------------- FID / KID


@dataclass(frozen=True)
class FidResult:
    fid: float
    n_real: int
    n_fake: int
    feature_extractor: str
    num_features: int


@dataclass(frozen=True)
class KidResult:
    kid_mean: float
    kid_std: float
    n_real: int
    n_fake: int
    subset_size: int
    subsets: int
    feature_extractor: str
    num_features: int


@dataclass(frozen=True)
class DistributionMetrics:
    fid: FidResult
    kid: KidResult
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float | int | str]:
        """Flat numbers, sample sizes included (ready for MLflow / Dagster metadata)."""
        return {
            "fid": self.fid.fid,
            "kid_mean": self.kid.kid_mean,
            "kid_std": self.kid.kid_std,
            "n_real": self.fid.n_real,
            "n_fake": self.fid.n_fake,
            "kid_subset_size": self.kid.subset_size,
            "kid_subsets": self.kid.subsets,
            "feature_extractor": self.fid.feature_extractor,
            "num_features": self.fid.num_features,
        }


class _Precomputed(torch.nn.Module):
    """Pass-through 'extractor': lets torchmetrics consume features computed once."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def to_uint8_tensor(images: ImagesLike) -> torch.Tensor:
    """PIL images (same size) or a tensor -> uint8 [B,3,H,W]."""
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            return images
        return (images.clamp(0, 1) * 255).round().to(torch.uint8)
    arrays = [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def extract_features(
    images: ImagesLike,
    feature: torch.nn.Module,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Features [N, D] (float64) on the extractor's device; no host copy.

    ``device``: move the extractor there first (e.g. a CPU-loaded Inception onto the GPU);
    None runs it where its weights already are (a CLIP tower shared with other code must
    not be moved behind that code's back).
    """
    pixels = to_uint8_tensor(images)
    if device is not None:
        feature = feature.to(device)
    feature = feature.eval()
    dev = module_device(feature)
    out = [feature(b.to(dev, non_blocking=True)).double() for b in pixels.split(batch_size)]
    if not out:
        return torch.zeros(0, int(getattr(feature, "num_features", 0)), dtype=torch.float64)
    return torch.cat(out)


def default_kid_subset_size(n_real: int, n_fake: int, requested: int | None = None) -> int:
    """Half the smaller set by default; always below the smaller sample count."""
    smallest = min(n_real, n_fake)
    if smallest < 3:
        raise ValueError(f"KID needs at least 3 samples per set, got {n_real} and {n_fake}")
    size = requested if requested is not None else max(2, smallest // 2)
    return max(2, min(size, smallest - 1))


def distribution_metrics(
    real: ImagesLike,
    fake: ImagesLike,
    feature: torch.nn.Module,
    *,
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> DistributionMetrics:
    """FID and KID of `fake` against `real` with one feature extractor (features computed once).

    KID subsets are drawn with a fixed `seed` so the same inputs give the same numbers.
    Features are extracted on the extractor's device (``device`` moves it, see
    `extract_features`); torchmetrics then runs on the host in float64.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    f_real = extract_features(real, feature, batch_size, device).cpu()
    f_fake = extract_features(fake, feature, batch_size, device).cpu()
    n_real, n_fake, dims = len(f_real), len(f_fake), f_real.shape[1]
    if min(n_real, n_fake) < 2:
        raise ValueError("FID needs at least 2 samples per set")
    name = str(getattr(feature, "name", type(feature).__name__))

    fid = FrechetInceptionDistance(feature=_Precomputed(dims)).double()
    fid.update(f_real, real=True)
    fid.update(f_fake, real=False)
    fid_value = float(fid.compute())

    subset = default_kid_subset_size(n_real, n_fake, kid_subset_size)
    kid = KernelInceptionDistance(
        feature=_Precomputed(dims), subsets=kid_subsets, subset_size=subset
    )
    kid.update(f_real, real=True)
    kid.update(f_fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # torchmetrics draws KID subsets from the global RNG
        kid_mean, kid_std = kid.compute()
    return DistributionMetrics(
        FidResult(fid_value, n_real, n_fake, name, dims),
        KidResult(float(kid_mean), float(kid_std), n_real, n_fake, subset, kid_subsets, name, dims),
    )


def fid_score(
    real: ImagesLike, fake: ImagesLike, feature: torch.nn.Module, **kwargs: Any
) -> FidResult:
    return distribution_metrics(real, fake, feature, **kwargs).fid


def kid_score(
    real: ImagesLike, fake: ImagesLike, feature: torch.nn.Module, **kwargs: Any
) -> KidResult:
    return distribution_metrics(real, fake, feature, **kwargs).kid


def mean_color_distance(images: ImagesLike, reference: ImagesLike) -> float:
    """Mean L2 distance (0-255 RGB) of each image's mean colour to the references' mean colour.

    A cheap, model-free validation metric for colour/background subjects (early stopping).
    """
    imgs = to_uint8_tensor(images).double().mean(dim=(2, 3))
    ref = to_uint8_tensor(reference).double().mean(dim=(0, 2, 3))
    return float((imgs - ref).norm(dim=1).mean())
