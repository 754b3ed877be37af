"""One-off generator for the shipped speech clips (NOT run by tests or the pipeline).

Speaks a handful of short English sentences with espeak-ng, converts them with PyAV to
16 kHz mono Ogg/Opus and writes them next to this file:

    speech/clip_XX.ogg        the clips (about 4-5 s each, about 16 KB each)
    speech/transcripts.json   {"clip_XX.ogg": "reference text", ...}

The clips are committed, so nobody needs espeak-ng to run the tests or the demo. To
regenerate them (for instance to change a sentence):

    apt-get install -y espeak-ng
    .venv/bin/python mm_pipelines/media/samples/make_speech_clips.py

The references avoid digits on purpose: espeak says "two hundred" and Whisper may write
"200", which would count as a word error although the transcription is right.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import av
import numpy as np

OUT_DIR = Path(__file__).parent / "speech"
SAMPLE_RATE = 16_000
BITRATE = 32_000  # measured: 24 kbit/s raised tiny.en WER from 8% to 11%, 32 kbit/s did not

# (voice, words per minute, sentence): two voices, about 4-5 s each.
SENTENCES: list[tuple[str, int, str]] = [
    ("en-us", 160, "Welcome to the quarterly product review for the outdoor collection."),
    ("en-gb", 160, "The new backpack is waterproof and comes in forest green and charcoal."),
    ("en-us", 160, "Customer support is available every day from early morning to late evening."),
    ("en-gb", 160, "Please check the shipping address before you confirm your order."),
    ("en-us", 160, "Our design team tested the desk lamp in a small apartment and a large office."),
    ("en-gb", 160, "Sales of the ceramic coffee mugs grew faster than we expected this spring."),
    ("en-us", 160, "The warehouse in Rotterdam handles all returns for our European customers."),
    ("en-gb", 160, "Thank you for joining the call, and see you at the launch event next week."),
]


def speak(text: str, voice: str, wpm: int) -> bytes:
    """WAV bytes from espeak-ng."""
    cmd = ["espeak-ng", "-v", voice, "-s", str(wpm), "--stdout", text]
    return subprocess.run(cmd, check=True, capture_output=True).stdout


def wav_to_mono16k(wav: bytes) -> np.ndarray:
    """Decode WAV bytes to 16 kHz mono int16 samples."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    parts: list[np.ndarray] = []
    with av.open(io.BytesIO(wav)) as container:
        for frame in container.decode(audio=0):
            parts.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
    parts.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    return np.concatenate(parts)


def write_opus(samples: np.ndarray, path: Path) -> None:
    """Encode int16 mono samples to Ogg/Opus."""
    with av.open(str(path), "w", format="ogg") as container:
        stream = container.add_stream("libopus", rate=SAMPLE_RATE, layout="mono")
        stream.bit_rate = BITRATE
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    transcripts: dict[str, str] = {}
    for i, (voice, wpm, text) in enumerate(SENTENCES, start=1):
        name = f"clip_{i:02d}.ogg"
        samples = wav_to_mono16k(speak(text, voice, wpm))
        write_opus(samples, OUT_DIR / name)
        transcripts[name] = text
        size = (OUT_DIR / name).stat().st_size
        print(f"{name}: {len(samples) / SAMPLE_RATE:.2f} s, {size} bytes")
    (OUT_DIR / "transcripts.json").write_text(json.dumps(transcripts, indent=2) + "\n")


if __name__ == "__main__":
    main()
