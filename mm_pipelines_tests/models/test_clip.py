"""The CLIP core: offline loading, chunked text encoding, training and retrieval quality."""

from __future__ import annotations

import dataclasses
import io
import socket

import numpy as np
import pytest

from mm_pipelines.models.clip.encode import chunk_text, encode_images, encode_texts
from mm_pipelines.models.clip.loading import TINY_ARCH, load_clip, save_local_dir
from mm_pipelines.models.demo import shapes
from mm_pipelines.models.demo.tiny_clip import (
    DEMO_TRAIN_CONFIG,
    evaluate_on_heldout,
    evaluate_text_to_image_recall,
    train_clip,
)

LONG_TEXT = " ".join(
    f"Paragraph {i}: the warehouse in Rotterdam shipped {i} red backpacks, "
    "and customer-support answered every e-mail about waterproofing before noon."
    for i in range(12)
)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_saved_checkpoint_reloads_offline_with_identical_vectors(tmp_path, no_network):
    # a model of its own, still in memory as training left it (the session's demo CLIP is
    # shared between workers as its checkpoint, so its bundle is already a reload)
    short = dataclasses.replace(DEMO_TRAIN_CONFIG, steps=8, warmup_steps=2, images_per_combo=2)
    result = train_clip(short, device="cpu", checkpoint_path=tmp_path / "clip.safetensors")
    images, captions = shapes.heldout_split(n=16, size_px=48)
    trained = result.bundle
    expected_img = encode_images(trained, images, num_workers=0).vectors
    expected_txt = encode_texts(trained, captions).vectors

    from_file = load_clip(TINY_ARCH, result.checkpoint_path, device="cpu")
    local_dir = save_local_dir(trained.model, TINY_ARCH, tmp_path / "model")
    from_dir = load_clip(TINY_ARCH, local_dir, device="cpu")
    for loaded in (from_file, from_dir):
        np.testing.assert_array_equal(
            encode_images(loaded, images, num_workers=0).vectors, expected_img
        )
        np.testing.assert_array_equal(encode_texts(loaded, captions).vectors, expected_txt)
        # The version names the weights, so both forms of the same weights agree.
        assert loaded.model_version == trained.model_version
    assert result.checkpoint_sha256[:16] in trained.model_version


def test_long_text_is_chunked_never_truncated():
    bundle = load_clip(TINY_ARCH, None, device="cpu")
    chunks = chunk_text(LONG_TEXT, bundle.tokenizer, bundle.context_length, overlap_tokens=6)
    assert len(chunks) >= 5
    all_tokens = bundle.tokenizer.encode(LONG_TEXT)
    assert len(all_tokens) > bundle.context_length  # it would be truncated in one piece
    covered = np.zeros(len(LONG_TEXT), bool)
    for i, c in enumerate(chunks):
        assert c.chunk_index == i
        assert c.n_tokens + 2 <= bundle.context_length
        assert c.n_tokens == len(c.token_ids)
        # A chunk's ids are exactly the tokenizer's ids for its span of the text.
        assert list(c.token_ids) == bundle.tokenizer.encode(LONG_TEXT[c.char_start : c.char_end])
        covered[c.char_start : c.char_end] = True
    uncovered = "".join(ch for ch, cov in zip(LONG_TEXT, covered, strict=True) if not cov)
    assert uncovered.strip() == ""
    assert sum(c.n_tokens for c in chunks) > len(all_tokens)  # the windows overlap
    assert all(b.char_start < a.char_end for a, b in zip(chunks, chunks[1:], strict=False))

    result = encode_texts(
        bundle, [LONG_TEXT, "a red circle on a blue background", "  "], overlap_tokens=6
    )
    assert [c.text_index for c in result.chunks].count(0) == len(chunks)
    assert [c.text_index for c in result.chunks].count(1) == 1  # a caption: one chunk
    assert result.vectors.shape == (len(chunks) + 1, bundle.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, rtol=1e-5)


def test_image_encoding_reads_files_and_bytes_and_reports_bad_ones(demo_clip, tmp_path):
    images, _ = shapes.heldout_split(n=6, size_px=40)
    sources: list = []
    for i, img in enumerate(images[:3]):
        path = tmp_path / f"{i}.{'png' if i % 2 else 'jpg'}"
        img.save(path)
        sources.append(str(path))
    buf = io.BytesIO()
    images[3].save(buf, format="PNG")
    sources += [buf.getvalue(), b"not an image", images[4]]
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "0.jpg").read_bytes()[:100])
    sources.append(str(tmp_path / "truncated.jpg"))

    result = encode_images(demo_clip.bundle, sources, batch_size=2, num_workers=2)
    assert result.indices == [0, 1, 2, 3, 5]
    assert set(result.errors) == {4, 6}
    assert result.vectors.shape == (5, demo_clip.bundle.embed_dim)
    assert result.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, rtol=1e-5)
    inline = encode_images(demo_clip.bundle, sources, batch_size=4, num_workers=0)
    np.testing.assert_allclose(inline.vectors, result.vectors, atol=1e-6)


def test_heldout_images_are_never_training_images():
    train = list(shapes.iter_samples("train", 600, seed=0, size_px=32))
    held = list(shapes.iter_samples("heldout", 300, seed=0, size_px=32))
    assert {s.seed for s in train}.isdisjoint({s.seed for s in held})
    train_bytes = {s.image.tobytes() for s in train}
    assert not any(s.image.tobytes() in train_bytes for s in held)
    again, caption = shapes.draw_shape("red", "circle", "blue", 32, held[0].seed)
    assert caption == "a red circle on a blue background"
    assert (
        again.tobytes() == shapes.draw_shape("red", "circle", "blue", 32, held[0].seed)[0].tobytes()
    )


def test_training_lifts_heldout_recall_far_above_the_untrained_models(demo_clip):
    untrained = load_clip(TINY_ARCH, None, device="cpu", seed=demo_clip.config.seed)
    images, captions = shapes.heldout_split()
    before = evaluate_text_to_image_recall(untrained, images, captions, k=1)
    after = evaluate_text_to_image_recall(demo_clip.bundle, images, captions, k=1)
    print(f"held-out recall@1: untrained {before:.3f}, trained {after:.3f}")
    assert after >= before + 0.3


@pytest.mark.slow
def test_demo_training_reaches_heldout_recall(demo_clip):
    """Exactly the demo's training setting; the bar from the issue: recall@1 >= 0.9."""
    result = demo_clip
    assert result.steps_done == DEMO_TRAIN_CONFIG.steps and not result.stopped_early
    recall = evaluate_on_heldout(result.bundle)
    recall_big = evaluate_on_heldout(
        result.bundle, n=2 * len(shapes.all_specs()), seed=1, size_px=128
    )
    print(f"demo training: {result.seconds:.0f}s wall, recall@1 {recall:.3f} / {recall_big:.3f}")
    assert recall >= 0.9
    assert recall_big >= 0.9
