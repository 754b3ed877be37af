"""Start-up cost of loading the definitions: what Dagster's code server, every step process
(a pod on Kubernetes) and `mm` pay before doing anything.

Ours: `import mm_pipelines.defs` in a fresh interpreter. Baseline: the same plus the
torch-level model modules the drivers imported at module level before they imported them
lazily (the CLIP tagger with open_clip, the curation heads, the diffusion pipeline helpers):
what loading the definitions cost then. A second baseline, `with_pandas`: the same plus
pandas, which the embed definitions imported at module level before they typed the batch's
frame `Any`. Also a bare interpreter, for scale. Runs alternate
(ours, baseline, bare, ...) so that load drift hits all alike; medians compared.

    .venv/bin/python benchmarks/bench_definitions_import.py [--rounds 3]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

OURS = "import mm_pipelines.defs"
EAGER_MODELS = (
    "mm_pipelines.models.curation.tagger",
    "mm_pipelines.models.curation.heads",
    "mm_pipelines.models.diffusion.pipeline",
)
BASELINE = "; ".join([OURS, *(f"import {m}" for m in EAGER_MODELS)])
WITH_PANDAS = f"import pandas; {OURS}"


def _seconds(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    _seconds(BASELINE)  # warm the page cache for every module both runs read
    runs: dict[str, list[float]] = {"ours": [], "baseline": [], "with_pandas": [], "bare": []}
    for _ in range(args.rounds):
        runs["ours"].append(_seconds(OURS))
        runs["baseline"].append(_seconds(BASELINE))
        runs["with_pandas"].append(_seconds(WITH_PANDAS))
        runs["bare"].append(_seconds("pass"))
    medians = {k: statistics.median(v) for k, v in runs.items()}
    print(
        json.dumps(
            {
                "benchmark": "definitions_import",
                "ours": OURS,
                "baseline": BASELINE,
                "with_pandas": WITH_PANDAS,
                "cpu_count": os.cpu_count(),
                "rounds": args.rounds,
                "runs_s": {k: [round(t, 2) for t in v] for k, v in runs.items()},
                "median_s": {k: round(v, 2) for k, v in medians.items()},
                "ratio_ours_to_baseline": round(medians["ours"] / medians["baseline"], 3),
                "ratio_ours_to_with_pandas": round(medians["ours"] / medians["with_pandas"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
