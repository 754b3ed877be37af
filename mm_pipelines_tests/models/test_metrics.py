"""CLIP score, FID and KID (models.diffusion.metrics) on a random tiny open_clip model."""

from __future__ import annotations

import random
from pathlib import Path
from unittest import mock

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mm_pipelines.models.diffusion.metrics import (
    ClipImageFeatures,
    clip_score,
    distribution_metrics,
    extract_features,
    inception_feature_extractor,
    mean_color_distance,
    split_prompt,
    token_count,
)
from mm_pipelines_tests.models.conftest_diffusion import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    draw_shape,
    torch_threads,
)

CTX = 16  # a short text context makes long-prompt chunking easy to exercise


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread (see conftest_diffusion.torch_threads)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def tiny_clip() -> tuple[open_clip.CLIP, object]:
    """Randomly initialised tiny open_clip model + its eval transform (no download)."""
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.CLIPVisionCfg(
            layers=2, width=64, head_width=32, patch_size=8, image_size=32
        ),
        text_cfg=open_clip.CLIPTextCfg(
            context_length=CTX, vocab_size=49408, width=64, heads=2, layers=2
        ),
    ).eval()
    preprocess = open_clip.image_transform(32, is_train=False)
    return model, preprocess


def _tokenize(texts: list[str], context_length: int = CTX) -> torch.Tensor:
    return open_clip.tokenize(texts, context_length=context_length)


def _shapes(n: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    rng = random.Random(seed)
    images, captions = [], []
    for i in range(n):
        cname, colour = list(COLOURS.items())[i % len(COLOURS)]
        bname, bg = list(BACKGROUNDS.items())[(i // len(COLOURS)) % len(BACKGROUNDS)]
        shape = SHAPES[i % len(SHAPES)]
        images.append(draw_shape(shape, colour, bg, rng))
        captions.append(f"a {cname} {shape} on a {bname} background")
    return images, captions


def _independent_score(model, preprocess, image: Image.Image, text: str) -> float:
    """Textbook CLIP score of one pair, straight from the open_clip model."""
    with torch.no_grad():
        img = model.encode_image(preprocess(image)[None])
        txt = model.encode_text(_tokenize([text]))
    return 100.0 * max(F.cosine_similarity(img, txt).item(), 0.0)


def test_clip_score_matches_independent_computation(tiny_clip) -> None:
    model, preprocess = tiny_clip
    images, captions = _shapes(12, seed=3)
    res = clip_score(images, captions, model, _tokenize, preprocess, batch_size=5)
    expected = [
        _independent_score(model, preprocess, im, c) for im, c in zip(images, captions, strict=True)
    ]
    assert res.n == 12 and res.n_chunked == 0 and res.flagged == []
    assert res.context_length == CTX
    np.testing.assert_allclose(res.per_pair, expected, rtol=1e-4, atol=1e-4)
    assert res.score == pytest.approx(float(np.mean(expected)), abs=1e-4)
    assert any(s > 0 for s in expected)  # not a trivial all-clipped comparison


def test_long_prompts_are_chunked_or_flagged_never_truncated(tiny_clip) -> None:
    model, preprocess = tiny_clip
    images, _ = _shapes(2, seed=4)
    long_prompt = (
        "a red circle on a white background drawn with thick flat paint, centred in the frame, "
        "photographed in soft daylight with a shallow depth of field and a lot of detail"
    )
    short_prompt = "a blue square"
    assert token_count(_tokenize, long_prompt) > CTX

    chunks = split_prompt(long_prompt, _tokenize, CTX)
    assert chunks is not None and len(chunks) >= 2
    assert " ".join(chunks) == " ".join(long_prompt.split())  # every word scored once
    assert all(token_count(_tokenize, c) <= CTX for c in chunks)

    res = clip_score(images, [long_prompt, short_prompt], model, _tokenize, preprocess)
    assert res.n_chunked == 1 and res.n == 2
    # mean over chunks of the cosine, then 100x and clipped (documented choice)
    with torch.no_grad():
        img = F.normalize(model.encode_image(preprocess(images[0])[None]), dim=-1)
        txt = F.normalize(model.encode_text(_tokenize(chunks)), dim=-1)
    expected_long = 100.0 * max(float((txt @ img[0]).mean()), 0.0)
    assert res.per_pair[0] == pytest.approx(expected_long, abs=1e-4)
    assert res.per_pair[1] == pytest.approx(
        _independent_score(model, preprocess, images[1], short_prompt), abs=1e-4
    )

    res_max = clip_score(
        images, [long_prompt, short_prompt], model, _tokenize, preprocess, chunk_reduce="max"
    )
    assert res_max.per_pair[0] == pytest.approx(
        100.0 * max(float((txt @ img[0]).max()), 0.0), abs=1e-4
    )

    flagged = clip_score(
        images, [long_prompt, short_prompt], model, _tokenize, preprocess, long_prompts="flag"
    )
    assert flagged.flagged == [0] and flagged.per_pair[0] is None and flagged.n == 1
    assert flagged.score == pytest.approx(res.per_pair[1], abs=1e-4)

    with pytest.raises(ValueError, match="longer than the text context"):
        clip_score(
            images, [long_prompt, short_prompt], model, _tokenize, preprocess, long_prompts="error"
        )


def test_fid_self_is_zero_and_far_below_noise(tiny_clip) -> None:
    model, _ = tiny_clip
    feature = ClipImageFeatures(model, image_size=32)
    real, _ = _shapes(40, seed=5)
    other, _ = _shapes(40, seed=6)  # same distribution, different draws
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(40)]

    self_m = distribution_metrics(real, real, feature)
    same_m = distribution_metrics(real, other, feature)
    noise_m = distribution_metrics(real, noise, feature)

    assert self_m.fid.n_real == self_m.fid.n_fake == 40
    assert self_m.kid.subset_size == 20 and self_m.kid.subset_size < 40
    assert noise_m.fid.fid > 1.0
    assert abs(self_m.fid.fid) < 1e-6 * noise_m.fid.fid + 1e-6
    # measured: FID self -5e-12, same-distribution 0.054, noise 2.40 (random tiny CLIP)
    assert same_m.fid.fid < 0.1 * noise_m.fid.fid
    # KID of a set against itself is slightly negative: torchmetrics draws the real and the
    # fake subsets independently, so identical samples land in the cross term (measured
    # -0.033 self, -0.031 same distribution, +0.085 noise)
    assert noise_m.kid.kid_mean > 0
    assert self_m.kid.kid_mean < 0.25 * noise_m.kid.kid_mean
    assert same_m.kid.kid_mean < 0.25 * noise_m.kid.kid_mean
    flat = noise_m.as_dict()
    assert {"fid", "kid_mean", "kid_std", "n_real", "n_fake", "kid_subset_size"} <= set(flat)
    # KID subsets come from a fixed seed: same inputs, same numbers
    again = distribution_metrics(real, noise, feature)
    assert again.kid.kid_mean == noise_m.kid.kid_mean


def test_kid_subset_size_is_kept_below_the_sample_count(tiny_clip) -> None:
    model, _ = tiny_clip
    feature = ClipImageFeatures(model, image_size=32)
    real, _ = _shapes(6, seed=7)
    fake, _ = _shapes(5, seed=8)
    m = distribution_metrics(real, fake, feature, kid_subset_size=1000)
    assert m.kid.subset_size == 4 and (m.kid.n_real, m.kid.n_fake) == (6, 5)
    with pytest.raises(ValueError, match="at least 3"):
        distribution_metrics(real[:2], fake[:2], feature)


def test_inception_is_loaded_from_a_local_file_only(tmp_path: Path) -> None:
    """The Inception path reads a local weights file (random weights here) and never a URL."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with pytest.raises(FileNotFoundError):
        inception_feature_extractor(tmp_path / "missing.pth")
    # a random-weights file with the real architecture's keys
    with (
        mock.patch.object(fe, "load_state_dict_from_url", return_value={}),
        mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict"),
    ):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "inception.pth"
    torch.save(net.state_dict(), weights)

    with mock.patch.object(fe, "load_state_dict_from_url", side_effect=AssertionError("URL")):
        feature = inception_feature_extractor(weights)
        images, _ = _shapes(3, seed=9)
        feats = extract_features(images, feature)
    assert feature.num_features == 2048 and feature.name == "inception-v3-2048"
    assert feats.shape == (3, 2048) and torch.isfinite(feats).all()


def test_mean_color_distance() -> None:
    red = [Image.new("RGB", (8, 8), (255, 0, 0))] * 2
    blue = [Image.new("RGB", (8, 8), (0, 0, 255))]
    assert mean_color_distance(red, red) == 0.0
    assert mean_color_distance(blue, red) == pytest.approx(float(np.sqrt(2) * 255))
