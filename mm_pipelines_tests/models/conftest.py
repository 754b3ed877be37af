"""Session-scoped models for the ML tests: each is trained or loaded once per run (the
demo CLIP, `demo_clip`, is in the root conftest)."""

from __future__ import annotations

import numpy as np
import pytest

from mm_pipelines.pipeline.sample_data import SPEECH_DIR


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
