"""Start-up cost of the MLflow server we run (`mm mlflow`, the compose file's, the stateless
proof's): with our server defaults (settings.MLFLOW_SERVER_DEFAULTS: no job runner) against
MLflow's own default (MLflow 3 also starts a job runner for GenAI jobs).

Each start: `mlflow server` on a fresh sqlite store, one worker, on loopback; seconds until
/health answers, then, after `--settle` seconds, the CPU seconds (user + sys) and resident
memory of its whole process tree and the number of processes in it. Starts alternate (ours,
MLflow's default, ...) so that load drift hits both alike; medians compared.

    .venv/bin/python benchmarks/bench_mlflow_server.py [--rounds 3] [--settle 15]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

from mm_pipelines import settings
from mm_pipelines_tests.ports import free_port

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def start_once(env: dict[str, str], settle_s: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as root:
        port = free_port()
        cmd = [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        cmd += ["--backend-store-uri", f"sqlite:///{root}/mlflow.db"]
        cmd += ["--default-artifact-root", f"{root}/artifacts"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            while True:
                assert proc.poll() is None, "mlflow server exited"
                try:
                    if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                        break
                except requests.RequestException:
                    pass
                time.sleep(0.2)
            up_s = time.perf_counter() - t0
            time.sleep(settle_s)
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            cpu = sum(p.cpu_times().user + p.cpu_times().system for p in tree)
            rss = sum(p.memory_info().rss for p in tree) / 2**20
            return {"up_s": up_s, "cpu_s": cpu, "rss_mib": rss, "processes": len(tree)}
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=15.0)
    args = parser.parse_args()

    mlflow_default = {
        k: v for k, v in os.environ.items() if k not in settings.MLFLOW_SERVER_DEFAULTS
    }
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "mlflow_default": []}
    for _ in range(args.rounds):
        runs["ours"].append(start_once(settings.mlflow_server_environ(), args.settle))
        runs["mlflow_default"].append(start_once(mlflow_default, args.settle))

    def median(name: str, key: str) -> float:
        return round(statistics.median(r[key] for r in runs[name]), 2)

    keys = ("up_s", "cpu_s", "rss_mib", "processes")
    result = {
        "benchmark": "mlflow_server_start",
        "ours_env": settings.MLFLOW_SERVER_DEFAULTS,
        "rounds": args.rounds,
        "settle_s": args.settle,
        "cpu_count": os.cpu_count(),
        "ours": {k: median("ours", k) for k in keys},
        "mlflow_default": {k: median("mlflow_default", k) for k in keys},
        "cpu_ratio": round(median("ours", "cpu_s") / median("mlflow_default", "cpu_s"), 3),
        "rss_ratio": round(median("ours", "rss_mib") / median("mlflow_default", "rss_mib"), 3),
        "runs": {n: [{k: round(v, 2) for k, v in r.items()} for r in rs] for n, rs in runs.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
