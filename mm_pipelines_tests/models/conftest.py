"""Session-scoped models for the ML tests: each is trained or loaded once per run."""

from __future__ import annotations

import numpy as np
import pytest

from mm_pipelines.models.demo.tiny_clip import FAST_TRAIN_CONFIG, TrainResult, train_clip
from mm_pipelines.pipeline.sample_data import SPEECH_DIR

# One torch thread for training: on 2 shared cores two threads spin at every barrier
# whenever another process holds a core, and a step can take 10x longer; one thread is
# never far from the best case. The trained model is the same up to float rounding.
TRAIN_THREADS = 1


@pytest.fixture(scope="session")
def fast_clip(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """The short training setting, saved as a checkpoint file."""
    path = tmp_path_factory.mktemp("clip") / "fast.safetensors"
    return train_clip(
        FAST_TRAIN_CONFIG, device="cpu", checkpoint_path=path, num_threads=TRAIN_THREADS
    )


@pytest.fixture(scope="session")
def whisper_encoder():
    from mm_pipelines.models.speech.audio_encoder import load_whisper_encoder

    return load_whisper_encoder(device="cpu")


@pytest.fixture(scope="session")
def speech_clips() -> list[tuple[str, np.ndarray, str]]:
    """(name, 16 kHz audio, transcript) for the shipped speech clips."""
    from mm_pipelines.models.speech.whisper import load_audio
    from mm_pipelines.pipeline.sample_data import speech_clips as shipped

    return [(n, load_audio(SPEECH_DIR / n), t) for n, t in sorted(shipped().items())]
