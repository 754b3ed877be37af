"""Bootstrap confidence intervals for the quality numbers (CLIP score, FID, KID and the
adapter-to-base ratios): numpy on features and per-image scores (`quality_intervals`),
and `image_evidence`, which computes those from the images with the report's own models.

Why: a subject has a handful of reference images, so FID/KID move a lot with which images
happen to be in the sample. A percentile bootstrap shows how much: the reference images
and the generated (prompt, seed) pairs are resampled with replacement, every number is
recomputed on each resample, and the interval is the central `confidence` share of those
values. Base and adapter images share prompts and seeds, so they are resampled as pairs
(the same indices for both): the ratios and deltas then compare like with like. A fixed
`seed` makes the intervals repeatable.

FID here is computed exactly from the features (no eigen-decomposition of a d x d
matrix): with centred feature matrices A (n1 x d) and B (n2 x d),
tr sqrt(S1 S2) is the nuclear norm of A B^T / sqrt((n1-1)(n2-1)), so each resample costs
an SVD of an n1 x n2 matrix. It equals torchmetrics' FID on the same features.
KID is the unbiased MMD^2 with torchmetrics' polynomial kernel (x.y/d + 1)^3 over all
samples (no subsets); within a resample, pairs drawn from the same original image are
left out of the within-set terms, so duplicates do not pull it towards zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

DEFAULT_RESAMPLES = 500
DEFAULT_CONFIDENCE = 0.9


@dataclass(frozen=True)
class Interval:
    """A number, its bootstrap interval and the sample sizes it was computed from."""

    estimate: float
    low: float
    high: float
    confidence: float
    resamples: int
    n: dict[str, int]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def describe(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in self.n.items())
        return (
            f"{self.estimate:.4g} [{self.low:.4g}, {self.high:.4g}] "
            f"({self.confidence:.0%} CI, {sizes})"
        )


# --------------------------------------------------------------------------- statistics


def _gram(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64) @ np.asarray(y, np.float64).T


def _centre(g: np.ndarray, rows: bool = True, cols: bool = True) -> np.ndarray:
    if rows:
        g = g - g.mean(axis=0, keepdims=True)
    if cols:
        g = g - g.mean(axis=1, keepdims=True)
    return g


def fid_from_grams(g_rr: np.ndarray, g_ff: np.ndarray, g_rf: np.ndarray) -> float:
    """FID from the Gram matrices of real (r) and fake (f) features (rows = samples)."""
    n1, n2 = len(g_rr), len(g_ff)
    if n1 < 2 or n2 < 2:
        return float("nan")
    mean_sq = g_rr.mean() + g_ff.mean() - 2.0 * g_rf.mean()  # |mu_r - mu_f|^2
    trace_r = np.trace(_centre(g_rr)) / (n1 - 1)
    trace_f = np.trace(_centre(g_ff)) / (n2 - 1)
    cross = np.linalg.svd(_centre(g_rf), compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    return float(max(mean_sq + trace_r + trace_f - 2.0 * cross, 0.0))


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    return fid_from_grams(_gram(real, real), _gram(fake, fake), _gram(real, fake))


def _poly_kernel(gram: np.ndarray, dims: int) -> np.ndarray:
    return (gram / dims + 1.0) ** 3


def _within_mean(k: np.ndarray, idx: np.ndarray) -> float:
    """Mean kernel value over pairs of a resample drawn from different original images."""
    mask = idx[:, None] != idx[None, :]
    return float(k[mask].mean()) if mask.any() else float("nan")


def kid_from_kernels(
    k_rr: np.ndarray, k_ff: np.ndarray, k_rf: np.ndarray, ri: np.ndarray, fi: np.ndarray
) -> float:
    """Unbiased MMD^2 of the resample (`ri`, `fi` index the full kernel matrices)."""
    within_r = _within_mean(k_rr[np.ix_(ri, ri)], ri)
    within_f = _within_mean(k_ff[np.ix_(fi, fi)], fi)
    return within_r + within_f - 2.0 * float(k_rf[np.ix_(ri, fi)].mean())


def kid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    dims = np.asarray(real).shape[1]
    k_rr, k_ff = _poly_kernel(_gram(real, real), dims), _poly_kernel(_gram(fake, fake), dims)
    k_rf = _poly_kernel(_gram(real, fake), dims)
    return kid_from_kernels(k_rr, k_ff, k_rf, np.arange(len(real)), np.arange(len(fake)))


def _nanmean(values: np.ndarray) -> float:
    """Mean of the scored pairs (a prompt flagged as too long has no score)."""
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def ratio(a: float, b: float) -> float:
    """a / b as the quality report defines it (inf when b <= 0 < a, 1 when both <= 0)."""
    return float(a / b) if b > 0 else float("inf") if a > 0 else 1.0


# --------------------------------------------------------------------------- bootstrap


def _interval(
    values: Sequence[float], estimate: float, confidence: float, n: dict[str, int]
) -> Interval:
    arr = np.asarray(values, np.float64)
    arr = arr[~np.isnan(arr)]
    if not len(arr):
        return Interval(estimate, float("nan"), float("nan"), confidence, 0, n)
    tail = (1.0 - confidence) / 2.0
    # "inverted_cdf" takes observed values (no interpolation), so an inf stays an inf
    low, high = np.quantile(arr, [tail, 1.0 - tail], method="inverted_cdf")
    return Interval(float(estimate), float(low), float(high), confidence, len(arr), n)


def quality_intervals(
    real: np.ndarray,
    adapter: np.ndarray,
    base: np.ndarray,
    adapter_clip: Sequence[float],
    base_clip: Sequence[float],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> dict[str, Interval]:
    """Intervals of every quality number. `adapter[i]` and `base[i]` (features) and
    `adapter_clip[i]` / `base_clip[i]` (per-image CLIP scores) must come from the same
    prompt and seed: they are resampled as pairs. Same inputs and seed, same intervals."""
    real = np.asarray(real, np.float64)
    adapter, base = np.asarray(adapter, np.float64), np.asarray(base, np.float64)
    a_clip, b_clip = np.asarray(adapter_clip, np.float64), np.asarray(base_clip, np.float64)
    pairs = len(adapter)
    if len(base) != pairs or len(a_clip) != pairs or len(b_clip) != pairs:
        raise ValueError(
            f"adapter and base must be paired: {pairs} adapter images, {len(base)} base "
            f"images, {len(a_clip)} and {len(b_clip)} CLIP scores"
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    n_real, dims = real.shape
    grams = {
        "rr": _gram(real, real),
        "aa": _gram(adapter, adapter),
        "bb": _gram(base, base),
        "ra": _gram(real, adapter),
        "rb": _gram(real, base),
    }
    kernels = {k: _poly_kernel(g, dims) for k, g in grams.items()}

    def numbers(ri: np.ndarray, fi: np.ndarray) -> dict[str, float]:
        rr = np.ix_(ri, ri)
        ff = np.ix_(fi, fi)
        rf = np.ix_(ri, fi)
        out = {
            "adapter_clip_score": _nanmean(a_clip[fi]),
            "base_clip_score": _nanmean(b_clip[fi]),
        }
        out["clip_score_delta"] = out["adapter_clip_score"] - out["base_clip_score"]
        for side, s in (("adapter", "a"), ("base", "b")):
            out[f"{side}_fid"] = fid_from_grams(
                grams["rr"][rr], grams[s + s][ff], grams["r" + s][rf]
            )
            out[f"{side}_kid"] = kid_from_kernels(
                kernels["rr"], kernels[s + s], kernels["r" + s], ri, fi
            )
        out["fid_ratio_to_base"] = ratio(out["adapter_fid"], out["base_fid"])
        out["kid_ratio_to_base"] = ratio(out["adapter_kid"], out["base_kid"])
        return out

    estimates = numbers(np.arange(n_real), np.arange(pairs))
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in estimates}
    for _ in range(resamples):
        values = numbers(rng.integers(0, n_real, n_real), rng.integers(0, pairs, pairs))
        for k, v in values.items():
            draws[k].append(v)
    sizes = {"n_real": n_real, "n_generated": pairs}
    clip_sizes = {"n_generated": pairs}
    return {
        k: _interval(draws[k], v, confidence, clip_sizes if "clip" in k else sizes)
        for k, v in estimates.items()
    }


# --------------------------------------------------------------------------- from images


@dataclass
class Evidence:
    """What the intervals were computed from: per-image CLIP scores (paired by index) and
    the intervals themselves."""

    adapter_clip: list[float]
    base_clip: list[float]
    intervals: dict[str, Interval]


def image_evidence(
    references: Sequence[Image.Image],
    adapted: Sequence[Image.Image],
    base: Sequence[Image.Image],
    score_prompt: str,
    clip_bundle: Any,
    feature: torch.nn.Module,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> Evidence:
    """Per-image CLIP scores and features of the same images `quality_report` scores (with
    the same CLIP and feature extractor, placed as `quality_report` places them), and the
    bootstrap intervals of every number. `adapted[i]` and `base[i]` must share prompt and
    seed."""
    from mm_pipelines.models.diffusion.metrics import clip_score, extract_features

    def per_image(images: Sequence[Image.Image]) -> list[float]:
        result = clip_score(  # runs where the bundle's model is, as quality_report's does
            list(images),
            [score_prompt] * len(images),
            clip_bundle.model,
            clip_bundle.tokenizer,
            clip_bundle.preprocess,
            context_length=clip_bundle.context_length,
        )
        return [float("nan") if s is None else float(s) for s in result.per_pair]

    def features(images: Sequence[Image.Image]) -> np.ndarray:
        return extract_features(list(images), feature, device=device).cpu().numpy()

    a_clip, b_clip = per_image(adapted), per_image(base)
    intervals = quality_intervals(
        features(references),
        features(adapted),
        features(base),
        a_clip,
        b_clip,
        resamples=resamples,
        confidence=confidence,
        seed=seed,
    )
    return Evidence(a_clip, b_clip, intervals)
