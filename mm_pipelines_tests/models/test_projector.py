"""Acoustic vectors and the unified-space projector."""

from __future__ import annotations

import numpy as np

from mm_pipelines.models.speech.audio_encoder import (
    SAMPLE_RATE,
    embed_audio,
    embed_audio_batch,
    embed_windows,
)
from mm_pipelines.models.unified.projector import (
    ProjectorTrainConfig,
    load_projector,
    mean_text_vectors,
    save_projector,
    train_projector,
)


def _augment(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A new 'recording' of the same speech: tempo/pitch, crop, gain and noise."""
    speed = rng.uniform(0.9, 1.1)
    positions = np.arange(0, len(audio) - 1, speed)
    out = np.interp(positions, np.arange(len(audio)), audio)
    keep = int(len(out) * rng.uniform(0.8, 1.0))
    start = rng.integers(0, len(out) - keep + 1)
    out = out[start : start + keep] * rng.uniform(0.5, 1.5)
    noise = rng.standard_normal(len(out)) * np.std(out) * 10 ** (-rng.uniform(20, 35) / 20)
    return (out + noise).astype(np.float32)


def test_audio_vectors_are_normalised_and_tell_clips_apart(whisper_encoder, speech_clips):
    (_, a, _), (_, b, _) = speech_clips[0], speech_clips[1]
    rng = np.random.default_rng(0)
    noisy_a = a + (0.003 * rng.standard_normal(len(a))).astype(np.float32)
    vecs = embed_audio_batch(whisper_encoder, [a, b, noisy_a])
    assert vecs.shape == (3, whisper_encoder.dim) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    dist_other = 1 - vecs[0] @ vecs[1]
    dist_noisy = 1 - vecs[0] @ vecs[2]
    assert dist_other > 3 * dist_noisy
    # A clip's vector does not depend on the batch it was computed in.
    np.testing.assert_allclose(embed_audio(whisper_encoder, a), vecs[0], atol=1e-5)

    windows = embed_windows(whisper_encoder, np.concatenate([a, b]), window_s=2.0)
    total_s = (len(a) + len(b)) / SAMPLE_RATE
    assert windows.vectors.shape == (len(windows.starts_s), whisper_encoder.dim)
    assert windows.starts_s[0] == 0 and abs(windows.ends_s[-1] - total_s) < 0.6
    np.testing.assert_allclose(np.linalg.norm(windows.vectors, axis=1), 1.0, rtol=1e-5)


def test_projector_training_improves_audio_to_text_retrieval(
    whisper_encoder, speech_clips, demo_clip, tmp_path
):
    rng = np.random.default_rng(0)
    variants = 10
    audio, texts, groups = [], [], []
    for name, clip, transcript in speech_clips:
        for k in range(variants):
            audio.append(_augment(clip, rng))
            texts.append(transcript)
            groups.append(f"{name}#{k}")  # each variant is its own recording
    audio_vecs = embed_audio_batch(whisper_encoder, audio)
    text_vecs = mean_text_vectors(demo_clip.bundle, texts)

    result = train_projector(
        audio_vecs,
        text_vecs,
        groups,
        ProjectorTrainConfig(steps=300, seed=0),
        clip_model_version=demo_clip.bundle.model_version,
        audio_model_version=whisper_encoder.model_version,
    )
    m = result.metrics
    print({k: round(v, 3) for k, v in m.items()})
    assert m["heldout_pairs"] >= len(speech_clips)
    assert m["heldout_recall_at_1"] >= m["untrained_recall_at_1"] + 0.3
    assert m["heldout_mean_rank"] < m["untrained_mean_rank"]

    version = save_projector(result.projector, tmp_path / "proj")
    loaded = load_projector(tmp_path / "proj")
    assert loaded.version == version and version.startswith("unified-proj@sha256:")
    held = result.heldout_index
    np.testing.assert_allclose(
        loaded.project("audio", audio_vecs[held]),
        result.projector.project("audio", audio_vecs[held]),
        atol=1e-6,
    )
    np.testing.assert_allclose(loaded.project("text", text_vecs[:3]), text_vecs[:3], atol=1e-6)
    assert loaded.project("audio", audio_vecs[:2]).shape == (2, demo_clip.bundle.embed_dim)
