"""Bootstrap intervals of the quality numbers (models.diffusion.bootstrap) and the gates
that use them (models.diffusion.gates). Features are random vectors: the statistics are
checked against torchmetrics and against what resampling must do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from mm_pipelines.models.diffusion.bootstrap import (
    fid_from_features,
    kid_from_features,
    quality_intervals,
)
from mm_pipelines.models.diffusion.gates import gate_failures
from mm_pipelines.pipeline.subjects import QualityGates

DIMS = 64  # the demo CLIP's feature size


class _Identity(torch.nn.Module):
    num_features = DIMS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def features(n: int, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, 1.0, size=(n, DIMS))


def test_fid_from_features_equals_torchmetrics_fid_at_a_handful_of_samples():
    real, fake = features(5), features(16, shift=0.3, seed=1)
    fid = FrechetInceptionDistance(feature=_Identity()).double()
    fid.update(torch.from_numpy(real), real=True)
    fid.update(torch.from_numpy(fake), real=False)
    assert fid_from_features(real, fake) == pytest.approx(float(fid.compute()), rel=1e-6)


def test_kid_from_features_equals_torchmetrics_kid_on_the_full_sets():
    real, fake = features(12), features(12, shift=0.3, seed=1)
    kid = KernelInceptionDistance(feature=_Identity(), subsets=1, subset_size=12)
    kid.update(torch.from_numpy(real), real=True)
    kid.update(torch.from_numpy(fake), real=False)
    mean, _ = kid.compute()  # one subset of all 12: a permutation, the same statistic
    assert kid_from_features(real, fake) == pytest.approx(float(mean), rel=1e-6)


def _intervals(n_real: int = 5, n_gen: int = 16, seed: int = 0, **kwargs):
    kwargs.setdefault("resamples", 200)
    rng = np.random.default_rng(7)
    return quality_intervals(
        features(n_real),
        features(n_gen, shift=0.2, seed=1),
        features(n_gen, shift=0.6, seed=2),
        rng.normal(30, 3, n_gen),
        rng.normal(25, 3, n_gen),
        seed=seed,
        **kwargs,
    )


def test_intervals_are_repeatable_for_a_seed_and_differ_for_another():
    first, again, other = _intervals(seed=0), _intervals(seed=0), _intervals(seed=1)
    assert {k: v.as_dict() for k, v in first.items()} == {k: v.as_dict() for k, v in again.items()}
    assert first["fid_ratio_to_base"].high != other["fid_ratio_to_base"].high


def test_every_number_gets_an_interval_with_its_sample_sizes():
    intervals = _intervals(resamples=200, confidence=0.8)
    assert set(intervals) == {
        "adapter_clip_score",
        "base_clip_score",
        "clip_score_delta",
        "adapter_fid",
        "base_fid",
        "fid_ratio_to_base",
        "adapter_kid",
        "base_kid",
        "kid_ratio_to_base",
    }
    fid = intervals["adapter_fid"]
    assert fid.n == {"n_real": 5, "n_generated": 16} and fid.resamples == 200
    assert fid.confidence == 0.8 and fid.low < fid.high
    clip = intervals["adapter_clip_score"]
    assert clip.low <= clip.estimate <= clip.high  # a mean sits inside its own interval


def test_more_reference_images_give_narrower_fid_and_kid_intervals():
    def widths(n_real: int) -> tuple[float, float]:
        intervals = _intervals(n_real=n_real, n_gen=40)
        fid, kid = intervals["adapter_fid"], intervals["adapter_kid"]
        return fid.high - fid.low, kid.high - kid.low

    (fid_5, kid_5), (fid_60, kid_60) = widths(5), widths(60)
    assert fid_60 < 0.6 * fid_5 and kid_60 < 0.5 * kid_5


def test_base_and_adapter_are_resampled_as_pairs():
    same = features(16, seed=3)
    scores = np.linspace(20, 30, 16)
    intervals = quality_intervals(features(5), same, same.copy(), scores, scores, resamples=100)
    # identical images on both sides: every resample compares an image with itself
    assert (intervals["fid_ratio_to_base"].low, intervals["fid_ratio_to_base"].high) == (1.0, 1.0)
    assert intervals["clip_score_delta"].low == intervals["clip_score_delta"].high == 0.0


def test_unpaired_inputs_are_refused():
    with pytest.raises(ValueError, match="must be paired"):
        quality_intervals(features(5), features(16), features(15), [1.0] * 16, [1.0] * 16)


# --------------------------------------------------------------------------- gates


def report(n_real: int = 5, n_generated: int = 16, ratio: float = 0.75, high: float = 1.3):
    """A quality report as generation_quality stores it (numbers chosen by the test)."""
    sizes = {"n_real": n_real, "n_generated": n_generated}

    def interval(estimate: float, low: float, high: float) -> dict:
        return {"estimate": estimate, "low": low, "high": high, "confidence": 0.9, "n": sizes}

    side = {"fid": 10.0, "kid_mean": 0.5, "clip_score": 30.0, "n_real": n_real}
    return {
        "adapter": {**side, "n_fake": n_generated},
        "base": {**side, "fid": 10.0 / ratio, "n_fake": n_generated},
        "fid_ratio_to_base": ratio,
        "sample_sizes": sizes,
        "intervals": {
            "fid_ratio_to_base": interval(ratio, 0.5, high),
            "adapter_fid": interval(10.0, 6.0, 19.0),
            "adapter_kid": interval(0.5, 0.1, 1.2),
            "adapter_clip_score": interval(30.0, 27.0, 33.0),
        },
    }


def test_a_sample_below_the_minimum_refuses_to_pass_whatever_the_numbers_say():
    failures = gate_failures(report(n_real=3), QualityGates(min_references=5))
    assert failures == [
        "n_real 3 is below min_references 5: too few reference images for the quality "
        "numbers to support a decision"
    ]
    assert gate_failures(report(n_generated=4), QualityGates(min_generated=8))
    assert gate_failures(report(), QualityGates()) == []  # 5 and 16 meet the defaults


def test_an_interval_gate_decides_on_the_bound_and_reports_the_interval():
    gates = QualityGates(max_fid_ratio_to_base=0.9, decide_on="interval")
    (failure,) = gate_failures(report(ratio=0.75, high=1.3), gates)
    assert failure == (
        "fid_ratio_to_base 0.75 [0.5, 1.3] (90% CI, n_real=5, n_generated=16): "
        "upper bound 1.3 is not <= 0.9"
    )
    assert gate_failures(report(ratio=0.75, high=0.85), gates) == []
    # the estimate alone passes the same report
    assert gate_failures(report(ratio=0.75, high=1.3), QualityGates()) == []


def test_a_minimum_gate_on_the_interval_uses_its_lower_bound():
    gates = QualityGates(max_fid_ratio_to_base=None, min_clip_score=28, decide_on="interval")
    (failure,) = gate_failures(report(), gates)
    assert failure.endswith("lower bound 27 is not >= 28")
