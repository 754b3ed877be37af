"""Serving throughput: /v1/embeddings and /v1/search over HTTP vs the same calls in-process.

HTTP = `mm serve` (uvicorn, a real subprocess) on loopback, driven by a second process
that sends a fixed number of requests at a fixed concurrency over keep-alive
connections. In-process = the same `ServingModels.embed_text` / `.search` calls from a
thread pool of the same size, in this process, without HTTP. Same bundle (the tiny CLIP
by default, ``--arch ViT-B-32`` for a real-size text tower; random weights: the cost does
not depend on the weights), same catalog (an embedded
Postgres with `--rows` vectors), same run; the in-process pass runs before and after the
HTTP one and the two are averaged, to bracket drift on a shared machine.

    .venv/bin/python benchmarks/bench_serving.py [--requests 600] [--concurrency 4]

Prints one JSON object. Target: HTTP throughput >= 0.7 of in-process.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

QUERIES = [
    f"a {c} {s} on a {b} background"
    for c in ("red", "green", "blue", "yellow")
    for s in ("circle", "square", "star")
    for b in ("white", "grey")
]
TENANT = "acme"


# ----------------------------------------------------------------------------- client


def run_client(url: str, path: str, n: int, concurrency: int, kind: str, token: str) -> dict:
    """The load generator (runs in its own process): n requests, `concurrency` at a time,
    with the API key `token` ("-": none, for a server started with --no-auth)."""
    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    failures = 0
    counter = iter(range(n))
    lock = threading.Lock()

    def body(i: int) -> bytes:
        q = QUERIES[i % len(QUERIES)]
        doc = {"input": q} if kind == "embeddings" else {"query": q, "tenant": TENANT, "k": 10}
        return json.dumps(doc).encode()

    headers = {"Content-Type": "application/json"}
    if token != "-":
        headers["Authorization"] = f"Bearer {token}"

    def worker() -> None:
        nonlocal failures
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            t0 = time.perf_counter()
            conn.request("POST", path, body(i), headers)
            resp = conn.getresponse()
            resp.read()
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                failures += resp.status != 200
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _summary(latencies, time.perf_counter() - t0, failures)


def _summary(latencies: list[float], seconds: float, failures: int = 0) -> dict:
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "failures": failures,
        "seconds": round(seconds, 3),
        "per_s": round(len(ordered) / seconds, 1),
        "p50_ms": round(1000 * statistics.median(ordered), 2),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2),
    }


# ----------------------------------------------------------------------------- set-up


def make_bundle(root: Path, arch: str) -> Path:
    import torch

    from mm_pipelines.models.clip.loading import load_clip, save_checkpoint
    from mm_pipelines.models.unified.projector import (
        AudioHead,
        ProjectorConfig,
        UnifiedProjector,
        save_projector,
    )
    from mm_pipelines.serving.export import export_bundle

    ckpt = root / "clip.safetensors"
    save_checkpoint(load_clip(arch, checkpoint=None, seed=0).model, ckpt)
    clip = load_clip(arch, checkpoint=ckpt)
    torch.manual_seed(0)
    cfg = ProjectorConfig(384, clip.embed_dim, 64, clip.model_version, "")
    save_projector(UnifiedProjector(cfg, AudioHead(384, 64, clip.embed_dim)), root / "projector")
    result = export_bundle(
        root / "bundle",
        clip_architecture=arch,
        clip_checkpoint=ckpt,
        projector_dir=root / "projector",
        include_audio=False,
        bundle_version="bench",
    )
    return result.bundle_dir


def fill_catalog(dsn: str, models, n_rows: int) -> None:
    import numpy as np

    from mm_pipelines.storage.postgres import connect
    from mm_pipelines.storage.vectors import VectorRow, replace_batch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n_rows, models.embed_dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    enc = models.manifest["models"]["clip"]["version"]
    rows = [
        VectorRow(
            "bench", f"tenant{i % 4}" if i % 4 else TENANT, "caption", "image", f"h{i}", None,
            None, None, None, None, f"caption {i}", enc, models.projector_version, x[i],
        )
        for i in range(n_rows)
    ]  # fmt: skip
    with connect(dsn) as conn:
        replace_batch(conn, "bench", rows)


def start_server(store: Path, dsn: str, workers: int, auth: bool) -> tuple[subprocess.Popen, str]:
    args = [
        sys.executable, "-m", "mm_pipelines.serving.server", "--store", str(store),
        "--port", "0", "--dsn", dsn, "--no-audio", "--no-diffusion", "--log-level", "warning",
        "--workers", str(workers), *([] if auth else ["--no-auth"]),
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, line.split("listening on ", 1)[1].split()[0]


def admin_key(dsn: str) -> str:
    """An admin API key with a limit the benchmark never reaches (as `mm keys create`)."""
    from mm_pipelines.storage import api_keys
    from mm_pipelines.storage.postgres import connect

    with connect(dsn) as conn:
        return api_keys.create_key(conn, None, admin=True, rate_per_minute=10**8, burst=10**6)[1]


def http_pass(url: str, kind: str, n: int, concurrency: int, token: str) -> dict:
    path = {"embeddings": "/v1/embeddings", "search": "/v1/search"}[kind]
    cmd = [sys.executable, __file__, "--client", url, path, str(n), str(concurrency), kind, token]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def in_process_pass(fn, n: int, concurrency: int) -> dict:
    latencies: list[float] = []

    def one(i: int) -> None:
        t0 = time.perf_counter()
        fn(QUERIES[i % len(QUERIES)])
        latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    return _summary(latencies, time.perf_counter() - t0)


def _mean_pass(a: dict, b: dict) -> dict:
    seconds = a["seconds"] + b["seconds"]
    return {
        "requests": a["requests"] + b["requests"],
        "per_s": round((a["requests"] + b["requests"]) / seconds, 1),
        "p50_ms": round((a["p50_ms"] + b["p50_ms"]) / 2, 2),
        "p99_ms": round((a["p99_ms"] + b["p99_ms"]) / 2, 2),
        "runs_per_s": [a["per_s"], b["per_s"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--arch", default="mm-tiny-clip", help="open_clip architecture")
    parser.add_argument(
        "--no-auth", action="store_true", help="serve without API keys (default: an admin key)"
    )
    parser.add_argument("--client", nargs=6, metavar=("URL", "PATH", "N", "C", "KIND", "TOKEN"))
    args = parser.parse_args()
    if args.client:
        url, path, n, c, kind, token = args.client
        print(json.dumps(run_client(url, path, int(n), int(c), kind, token)))
        return

    import torch

    from mm_pipelines.serving.app import ConnectionPool
    from mm_pipelines.serving.runtime import ServingModels
    from mm_pipelines.serving.store import open_store, publish_bundle
    from mm_pipelines.storage.postgres import embedded_server

    torch.set_num_threads(1)  # as the server runs: one intra-op thread per request
    workers = max(1, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="bench_serving_") as tmp:
        root = Path(tmp)
        bundle = make_bundle(root, args.arch)
        publish_bundle(open_store(root / "store"), bundle)
        pg = embedded_server(root / "pg", cleanup_mode="delete")
        dsn = pg.get_uri()
        models = ServingModels.load(bundle, audio=False, diffusion=False)
        fill_catalog(dsn, models, args.rows)
        pool = ConnectionPool(lambda: dsn, size=args.concurrency)
        calls = {
            "embeddings": models.embed_text,
            # what /v1/search does: embed, then one ranked list across kinds
            "search": lambda q: pool.run(
                lambda conn: models.ranked_search(
                    conn, models.embed_text(q), "text", tenant=TENANT, query=q, k=10
                )
            ),
        }
        token = "-" if args.no_auth else admin_key(dsn)
        proc, url = start_server(root / "store", dsn, workers, not args.no_auth)
        results = {}
        try:
            for kind, fn in calls.items():
                warm = min(50, args.requests)
                in_process_pass(fn, warm, args.concurrency)  # first-call costs, both paths
                http_pass(url, kind, warm, args.concurrency, token)
                before = in_process_pass(fn, args.requests, args.concurrency)
                http = http_pass(url, kind, args.requests, args.concurrency, token)
                after = in_process_pass(fn, args.requests, args.concurrency)
                local = _mean_pass(before, after)
                results[kind] = {
                    "http": http,
                    "in_process": local,
                    "ratio": round(http["per_s"] / local["per_s"], 3),
                }
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            pool.close()
            pg.cleanup()
    print(
        json.dumps(
            {
                "benchmark": "serving_http_vs_in_process",
                "model": f"{args.arch} (random weights), TorchScript bundle",
                "server": "uvicorn + starlette, 1 process, "
                f"{workers} model threads, 1 torch thread each",
                "client": "a second process, keep-alive http.client connections",
                "api_keys": "off (--no-auth)" if args.no_auth else "on (an admin key)",
                "requests": args.requests,
                "concurrency": args.concurrency,
                "catalog_rows": args.rows,
                "search_k": 10,
                "cpu_count": os.cpu_count(),
                "embeddings": results["embeddings"],
                "search": results["search"],
                "target_ratio": 0.7,
                "python": platform.python_version(),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
