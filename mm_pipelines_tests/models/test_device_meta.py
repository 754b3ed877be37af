"""Device mistakes caught without a GPU: model paths run with their model on PyTorch's
`meta` device (shapes only, no data). A tensor a function builds on the CPU and hands to
the model fails here exactly as it fails on CUDA ("Tensor on device cpu is not on the
expected device meta!"), so these tests stand in for a GPU for that class of bug.

What cannot run on meta, and why (the GPU check, benchmarks/gpu_check.py, runs them):
- reading values at the host boundary (`.cpu()`, `.item()`, `float()`): CLIP score's final
  list, vectors returned as numpy, torchmetrics' FID/KID (matrix square root), the
  early-stopping comparison, loss logging; each path is tested up to that boundary;
- generation: diffusers' schedulers index their CPU alpha tables with the timestep's
  value (`Tensor.item()` inside `scheduler.step`);
- the nvJPEG decode itself (CUDA only; here the device path decodes JPEGs with
  libjpeg-turbo on the CPU and uploads, the same code after the decode call);
- Whisper transcription and audio embeddings (CTranslate2, not torch);
- export verification (CPU by design: TorchScript tracing, values compared in a fresh
  process).
"""

from __future__ import annotations

import copy
import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from mm_pipelines.models.clip.encode import (
    chunk_text,
    encode_chunk_features,
    iter_image_features,
)
from mm_pipelines.models.clip.loading import TINY_ARCH, ClipBundle, load_clip
from mm_pipelines.models.common import encode_image
from mm_pipelines.models.diffusion.evaluation import clip_distances, clip_features, feature_centroid
from mm_pipelines.models.diffusion.metrics import clip_score_per_pair, extract_features
from mm_pipelines.models.unified import projector as proj

META = torch.device("meta")


@pytest.fixture(scope="module")
def cpu_bundle() -> ClipBundle:
    return load_clip(TINY_ARCH, None, device="cpu")


@pytest.fixture
def meta_bundle(cpu_bundle: ClipBundle) -> ClipBundle:
    """The tiny CLIP with its weights on meta: what a CUDA bundle is to the code."""
    model = copy.deepcopy(cpu_bundle.model).to(META)
    return dataclasses.replace(cpu_bundle, model=model, device=META)


def _photo(seed: int, size: tuple[int, int] = (80, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_meta_catches_a_tensor_left_on_the_cpu(meta_bundle: ClipBundle) -> None:
    """The harness itself: a CPU tensor meeting a meta model is an error, as on CUDA."""
    with pytest.raises(RuntimeError, match="device"):
        meta_bundle.model.encode_image(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("decode", ["pil", "device"])
def test_clip_image_encoding_runs_on_the_models_device(
    meta_bundle: ClipBundle, decode: str
) -> None:
    sources = [
        encode_image(_photo(1), "jpeg"),  # nvJPEG's kind of input on the device path
        _png(_photo(2, (50, 90))),  # decoded by PIL in the workers
        _photo(3, (32, 32)),  # an in-memory image
        b"\xff\xd8\xff not really a jpeg \xff\xd9",  # fails: a per-file error
    ]
    batches = list(iter_image_features(meta_bundle, sources, 2, 0, decode=decode))
    features = [b.features for b in batches if b.features is not None]
    assert all(f.device == META for f in features)
    assert sum(len(f) for f in features) == 3
    assert {i for b in batches for i in b.errors} == {3}


def test_clip_text_encoding_runs_on_the_models_device(meta_bundle: ClipBundle) -> None:
    texts = ["a red circle on a blue background", "word " * 80]  # the second is chunked
    chunks = [
        c
        for i, t in enumerate(texts)
        for c in chunk_text(t, meta_bundle.tokenizer, meta_bundle.context_length, 8, i)
    ]
    features = encode_chunk_features(meta_bundle, chunks, texts, batch_size=2)
    assert features.device == META and features.shape == (len(chunks), meta_bundle.embed_dim)


def test_clip_score_runs_on_the_models_device(meta_bundle: ClipBundle) -> None:
    images = [_photo(i) for i in range(3)]
    prompts = ["a red circle", "a square " * 20, "a blue cross"]  # one prompt is chunked
    scores = clip_score_per_pair(
        images,
        prompts,
        meta_bundle.model,
        meta_bundle.tokenizer,
        meta_bundle.preprocess,
        context_length=meta_bundle.context_length,
        batch_size=2,
    )
    assert scores.device == META and scores.shape == (3,)
    pixels = torch.stack([meta_bundle.preprocess(im) for im in images])  # tensor input
    scores = clip_score_per_pair(
        pixels, prompts, meta_bundle.model, meta_bundle.tokenizer, chunk_reduce="max"
    )
    assert scores.device == META


def test_fid_kid_features_run_on_the_models_device(meta_bundle: ClipBundle) -> None:
    feature = clip_features(meta_bundle)  # probes the tower at construction
    assert feature.num_features == meta_bundle.embed_dim
    images = [_photo(i, (48, 40)) for i in range(5)]
    features = extract_features(images, feature, batch_size=2)
    assert features.device == META and features.shape == (5, meta_bundle.embed_dim)


def test_validation_metric_runs_on_the_models_device(meta_bundle: ClipBundle) -> None:
    feature = clip_features(meta_bundle)
    centroid = feature_centroid([_photo(i) for i in range(3)], feature)
    distances = clip_distances([_photo(i) for i in range(3, 7)], feature, centroid)
    assert distances.device == META and distances.shape == (4,)


def test_projector_projects_and_trains_on_its_device() -> None:
    audio_dim, clip_dim = 24, 16
    head = proj.AudioHead(audio_dim, 32, clip_dim).to(META)
    proj._fit_standardiser(head, np.random.default_rng(0).normal(size=(6, audio_dim)))
    config = proj.ProjectorConfig(audio_dim=audio_dim, clip_dim=clip_dim, hidden_dim=32)
    projector = proj.UnifiedProjector(config, head, META)
    out = projector.project_tensor("audio", torch.randn(3, audio_dim))  # from the host
    assert out.device == META and out.shape == (3, clip_dim)
    assert projector.project_tensor("text", torch.randn(2, clip_dim)).device == META

    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    x_all = torch.randn(6, audio_dim, device=META)
    y_all = torch.zeros(6, dtype=torch.long, device=META)
    candidates = torch.randn(4, clip_dim, device=META)
    idx = torch.tensor([0, 2, 5])  # drawn on the CPU, as training draws them
    loss = proj.projector_train_step(head, optimizer, x_all, y_all, candidates, idx, 0.05)
    assert loss.device == META and loss.shape == ()


# the DDPM families' extras (noise offset, Min-SNR) are on where they exist
_FAMILY_SETTINGS = {
    "sd": {"noise_offset": 0.1, "snr_gamma": 5.0},
    "sdxl": {"noise_offset": 0.1, "snr_gamma": 5.0},
    "sd3": {},
    "flux": {},
}


@pytest.mark.parametrize("family", sorted(_FAMILY_SETTINGS))
def test_lora_training_step_runs_on_the_pipelines_device(family: str) -> None:
    """Latent/prompt preparation (instance and prior-preservation images), adapter setup,
    the family's loss (CPU-generated noise and timesteps moved to the device), backward
    and the optimizer step: `train_lora`'s step without the loss read, for every family."""
    from mm_pipelines.models.demo.tiny_families import build_tiny_family_pipeline
    from mm_pipelines.models.diffusion import lora
    from mm_pipelines.models.diffusion.families import family_of
    from mm_pipelines.models.diffusion.memory import make_lora_optimizer

    pipe = build_tiny_family_pipeline(family)
    pipe.to(META)
    fam = family_of(pipe)
    cfg = lora.LoraTrainConfig(rank=2, steps=1, batch_size=2, **_FAMILY_SETTINGS[family])
    images = [_photo(i, (40, 32)) for i in range(2)]
    instance = lora._prepare_part(pipe, fam, images, ["a sks", "a sks"], cfg, META)
    prior = lora._prepare_part(pipe, fam, images[:1], ["a"], cfg, META)
    cached = [t for t in (instance.mean, instance.pixels, *instance.cond.values()) if t is not None]
    assert cached and all(t.device == META for t in cached)
    params = lora.add_lora_adapters(pipe, cfg)
    assert params and all(p.device == META and p.dtype == torch.float32 for p in params)
    optimizer = make_lora_optimizer(params, cfg)
    run = lora._Run(pipe, fam, cfg, META, torch.float32, instance, prior, [])
    gen = torch.Generator().manual_seed(0)
    loss = lora._micro_step_loss(run, fam.training_scheduler(pipe), gen)
    assert loss.device == META and loss.shape == ()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
