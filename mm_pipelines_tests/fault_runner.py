"""`python -m mm_pipelines_tests.fault_runner '[[JOB, PARTITION, [ASSET, ...]], ...]'`: runs
jobs one after the other with `cli.run_job`, as `mm` runs them (in-process, on the
persistent instance of $MM_HOME), in a process the fault tests can interrupt or kill.
Prints one JSON line per job; exits 130 when a run was interrupted, as `mm` does."""

from __future__ import annotations

import json
import sys

from mm_pipelines.cli import run_job


def main() -> int:
    for job, partition, assets in json.loads(sys.argv[1]):
        try:
            out = run_job(job, partition, assets)
        except KeyboardInterrupt as err:
            print(json.dumps({"job": job, "interrupted": str(err)}), flush=True)
            return 130
        shown = {k: out[k] for k in ("success", "run_id", "failures", "assets")}
        print(json.dumps({"job": job, **shown}, default=str), flush=True)
        if not out["success"]:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
