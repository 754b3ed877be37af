#!/usr/bin/env bash
# Issue 17's CLIP input measurement on a bare GPU box, as one device call (4-5 min on an
# H100 incl. installs): the GPU check's CLIP parts, then bench_clip_encode on the 3 JPEG :
# 1 PNG set the target is about and on JPEGs only. JSON and logs go to $OUT; the last lines
# printed are each run's ratio of end to end to the raw forward (target >= 0.7).
#
# Device tool: carry [".whl/clip"] (made by benchmarks/gpu_wheels.sh), command
#   bash benchmarks/gpu_clip_input.sh
# A dry run without a GPU: DEVICE=cpu IMAGES=64 QUICK=--quick bash benchmarks/gpu_clip_input.sh
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl/clip}
DEVICE=${DEVICE:-cuda}
IMAGES=${IMAGES:-2048}
QUICK=${QUICK:-}
OUT=${OUT:-/tmp/mm_gpu_out}
mkdir -p "$OUT"

if [ -d "$WHEELS" ]; then # a bare box: our few wheels beside its torch
  W=$(ls "$WHEELS"/*.whl)
  python3 -c 'import torchvision' 2>/dev/null || W="$W $(ls "$WHEELS"/optional/*.whl)"
  # shellcheck disable=SC2086 # one word per wheel
  python3 -m pip install -q --no-index --no-deps --target /tmp/mm_site $W || exit 1
  export PYTHONPATH=/tmp/mm_site:$PWD
else
  export PYTHONPATH=$PWD
fi

rc=0
# shellcheck disable=SC2086 # QUICK: no word or one
python3 benchmarks/gpu_check.py --device "$DEVICE" $QUICK \
  --parts clip_train,clip_encode,clip_encode_vitb32 --out "$OUT/gpu_check_clip.json" \
  >/dev/null 2>"$OUT/gpu_check_clip.log" || rc=$?
grep '^\[gpu_check\]' "$OUT/gpu_check_clip.log"
[ $rc = 0 ] || tail -c 3000 "$OUT/gpu_check_clip.log"
for formats in mixed jpeg; do
  python3 benchmarks/bench_clip_encode.py --device "$DEVICE" --images "$IMAGES" \
    --batch-size 256 --workers 14 --rounds 3 --formats $formats \
    >"$OUT/bench_clip_encode_$formats.json" 2>"$OUT/bench_clip_encode_$formats.log" || {
    rc=1
    tail -c 2000 "$OUT/bench_clip_encode_$formats.log"
  }
done
python3 - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
if (out / "gpu_check_clip.json").exists():
    check = json.loads((out / "gpu_check_clip.json").read_text())
    part = check.get("parts", check).get("clip_encode_vitb32", {})
    print("gpu_check clip_encode_vitb32 ratio", part.get("ratio"), part.get("same_model_other_inputs"))
for formats in ("mixed", "jpeg"):
    path = out / f"bench_clip_encode_{formats}.json"
    if path.exists() and path.stat().st_size:
        result = json.loads(path.read_text())
        print(f"bench_clip_encode {formats}: ratio {result['ratio']}",
              f"({result['end_to_end_images_per_s']} vs {result['raw_forward_images_per_s']} img/s)")
EOF
exit $rc
