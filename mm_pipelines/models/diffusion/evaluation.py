"""How good an adapter is: validation metrics for early stopping, the quality report
(CLIP score, FID/KID against the references, adapter vs base) and the gates on it.
Plain Python (no Dagster, no MLflow)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from mm_pipelines.models.diffusion.metrics import (
    ClipImageFeatures,
    clip_score,
    distribution_metrics,
    extract_features,
    mean_color_distance,
)

# --------------------------------------------------------------------------- metrics


def clip_features(bundle: Any) -> ClipImageFeatures:
    """The CLIP image tower of a ClipBundle as the FID/KID/validation feature extractor
    (on the bundle's device, normalised with the model's own mean/std)."""
    size = bundle.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    cfg = getattr(bundle.model.visual, "preprocess_cfg", None) or {}
    stats = {k: tuple(cfg[k]) for k in ("mean", "std") if k in cfg}
    return ClipImageFeatures(bundle.model, image_size=int(size), name=bundle.model_version, **stats)


def validation_metric(
    kind: str, references: Sequence[Image.Image], features: torch.nn.Module | None = None
) -> Callable[[list[Any]], float]:
    """Lower-is-better metric of validation images (GeneratedImage list) for early stopping.

    "clip_distance": 1 - cosine of each image's CLIP embedding to the references' centroid
    (general purpose); "color_distance": mean-colour distance (model-free, colour subjects).
    """
    if kind == "color_distance":
        return lambda gens: mean_color_distance([g.image for g in gens], references)
    if kind != "clip_distance":
        raise ValueError(f"unknown validation metric {kind!r} (clip_distance | color_distance)")
    if features is None:
        raise ValueError("clip_distance needs the CLIP feature extractor")
    centroid = feature_centroid(references, features)

    def metric(gens: list[Any]) -> float:
        return float(clip_distances([g.image for g in gens], features, centroid).mean())

    return metric


def feature_centroid(images: Sequence[Image.Image], features: torch.nn.Module) -> torch.Tensor:
    """Unit-length mean feature of `images`, on the extractor's device."""
    return F.normalize(extract_features(images, features).float().mean(0), dim=0)


def clip_distances(
    images: Sequence[Image.Image], features: torch.nn.Module, centroid: torch.Tensor
) -> torch.Tensor:
    """1 - cosine of each image's feature to `centroid`, on the extractor's device."""
    emb = F.normalize(extract_features(images, features).float(), dim=-1)
    return 1.0 - emb @ centroid.to(emb.device)


def quality_report(
    references: Sequence[Image.Image],
    adapted: Sequence[Image.Image],
    base: Sequence[Image.Image],
    score_prompt: str,
    clip_bundle: Any,
    feature: torch.nn.Module,
    *,
    kid_subset_size: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """CLIP score (towards `score_prompt`), FID and KID against the references, for the
    adapted pipeline's images and the base pipeline's images on the same prompts and seeds.
    Sample sizes and the feature extractor are recorded next to the numbers.

    CLIP score runs where the bundle's model is; ``device`` only places the FID/KID
    feature extractor (None: where it already is, see `extract_features`)."""
    report: dict[str, Any] = {"score_prompt": score_prompt}
    for name, images in (("adapter", adapted), ("base", base)):
        cs = clip_score(
            list(images),
            [score_prompt] * len(images),
            clip_bundle.model,
            clip_bundle.tokenizer,
            clip_bundle.preprocess,
            context_length=clip_bundle.context_length,
        )
        # subjects have few images: the largest subsets KID allows (torchmetrics' default
        # 1000 at most) keep its variance down; half the set (the generic default) gave
        # KID std 4x its mean on the demo's 5 references
        subset = kid_subset_size or min(1000, len(references) - 1, len(images) - 1)
        dist = distribution_metrics(
            list(references), list(images), feature, kid_subset_size=subset, device=device
        )
        report[name] = {
            "clip_score": cs.score,
            "clip_prompts_chunked": cs.n_chunked,
            **dist.as_dict(),
        }
    report["fid_ratio_to_base"] = _ratio(report["adapter"]["fid"], report["base"]["fid"])
    report["kid_ratio_to_base"] = _ratio(report["adapter"]["kid_mean"], report["base"]["kid_mean"])
    report["clip_score_delta"] = report["adapter"]["clip_score"] - report["base"]["clip_score"]
    return report


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else float("inf") if a > 0 else 1.0


def gate_failures(report: dict[str, Any], gates: Any) -> list[str]:
    """Human-readable reasons the report fails `gates` (subjects.QualityGates); [] = pass.
    The rules (sample-size floors, estimate or interval bound) live in gates.py."""
    from mm_pipelines.models.diffusion.gates import gate_failures as failures

    return failures(report, gates)
