"""Transcription benchmark: real-time factor, batched vs sequential, same run.

    .venv/bin/python benchmarks/bench_transcribe.py [--device auto] [--repeats 3]

Audio is built from the shipped espeak-ng clips (mm_pipelines/media/samples/speech):

* long: one 60 s WAV file: the clips one after another with 0.8 s of silence between;
* short: 10 WAV files of 6 s each: one clip each, padded with silence to 6 s.

Each set is transcribed, from the files on disk (decode + resample included), by

* ours: `speech.transcribe_many` (Silero VAD, 30 s windows shared across short files,
  `BatchedInferencePipeline`, batch_size 8, word timestamps);
* faster_whisper_batched: `BatchedInferencePipeline.transcribe` called per file (stock
  batched usage: one file's windows per batch);
* sequential: `WhisperModel.transcribe` per file with the same VAD, beam size 5 and
  word timestamps (its defaults otherwise).

RTF = wall seconds / audio seconds, median of `--repeats` runs (`rtf_best`: the fastest
run; the machine is shared, `loadavg_1m` says how busy it was). WER against the clip
references is reported too so that speed is not bought with accuracy. Prints one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import jiwer
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mm_pipelines.models.speech import whisper as S  # noqa: E402
from mm_pipelines.pipeline.sample_data import SPEECH_DIR  # noqa: E402

CLIPS = Path(str(SPEECH_DIR))
SR = S.SAMPLE_RATE


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z' ]", " ", text.lower()).split())


def write_wav(path: Path, samples: np.ndarray) -> Path:
    pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16).reshape(1, -1)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=SR, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = SR
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return path


def build_audio(tmp: Path) -> tuple[Path, str, list[Path], list[str]]:
    references = json.loads((CLIPS / "transcripts.json").read_text())
    clips = [(S.load_audio(CLIPS / name), text) for name, text in references.items()]
    gap = np.zeros(int(0.8 * SR), np.float32)
    parts, texts, total, i = [], [], 0, 0
    while total < 60 * SR:  # cycle through the clips until 60 s
        audio, text = clips[i % len(clips)]
        parts += [audio, gap]
        texts.append(text)
        total += len(audio) + len(gap)
        i += 1
    long_audio = np.concatenate(parts)[: 60 * SR]
    long_path = write_wav(tmp / "long.wav", long_audio)
    # The cut at 60 s may clip the last sentence: reference = the sentences that fit.
    fits, used = [], 0
    for (audio, _), text in zip((clips[k % len(clips)] for k in range(i)), texts, strict=True):
        used += len(audio)
        if used <= 60 * SR:
            fits.append(text)
        used += len(gap)
    short_paths, short_texts = [], []
    for k in range(10):
        audio, text = clips[k % len(clips)]
        padded = np.zeros(6 * SR, np.float32)
        padded[: len(audio)] = audio[: 6 * SR]
        short_paths.append(write_wav(tmp / f"short_{k}.wav", padded))
        short_texts.append(text)
    return long_path, " ".join(fits), short_paths, short_texts


def run_ours(model: S.SpeechModel, paths: list[Path]) -> list[str]:
    return [t.text for t in S.transcribe_many(paths, model=model, batch_size=8)]


def run_fw_batched(model: S.SpeechModel, paths: list[Path]) -> list[str]:
    texts = []
    for path in paths:
        segments, _ = model.pipeline.transcribe(str(path), batch_size=8, word_timestamps=True)
        texts.append(" ".join(s.text for s in segments))
    return texts


def run_sequential(model: S.SpeechModel, paths: list[Path]) -> list[str]:
    texts = []
    for path in paths:
        segments, _ = model.whisper.transcribe(
            str(path), beam_size=5, vad_filter=True, word_timestamps=True
        )
        texts.append(" ".join(s.text for s in segments))  # the generator does the work
    return texts


def measure(fn, model, paths, references: list[str], audio_s: float, repeats: int) -> dict:
    times, texts = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        texts = fn(model, paths)
        times.append(time.perf_counter() - start)
    wer = jiwer.wer([normalise(r) for r in references], [normalise(t) for t in texts])
    median = statistics.median(times)
    return {
        "seconds": round(median, 3),
        "rtf": round(median / audio_s, 4),
        "rtf_best": round(min(times) / audio_s, 4),
        "wer": round(wer, 4),
        "times_s": [round(t, 3) for t in times],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    start = time.perf_counter()
    model = S.load_model(device=args.device)
    load_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        long_path, long_ref, short_paths, short_refs = build_audio(Path(tmp))
        run_ours(model, short_paths[:1])  # warm-up: first-call allocations, VAD session
        report: dict = {
            "model": model.version,
            "device": f"{model.device.device}:{model.device.index}",
            "compute_type": model.device.compute_type,
            "model_load_s": round(load_s, 2),
            "machine": {"cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)},
            "settings": "beam 5, word timestamps, Silero VAD, batch_size 8",
        }
        for name, paths, refs in (
            ("long_60s", [long_path], [long_ref]),
            ("short_10x6s", short_paths, short_refs),
        ):
            audio_s = 60.0
            results = {
                name: measure(fn, model, paths, refs, audio_s, args.repeats)
                for name, fn in (
                    ("ours", run_ours),
                    ("faster_whisper_batched", run_fw_batched),
                    ("sequential", run_sequential),
                )
            }
            seq = results["sequential"]["seconds"]
            results["speedup_ours_vs_sequential"] = round(seq / results["ours"]["seconds"], 2)
            results["speedup_fw_batched_vs_sequential"] = round(
                seq / results["faster_whisper_batched"]["seconds"], 2
            )
            report[name] = results
        report["machine"]["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
