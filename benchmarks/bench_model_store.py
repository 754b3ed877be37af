"""What going through S3 costs: the demo graph (the proof's small settings, see
mm_pipelines_tests/stateless.py) run in one process, once with everything on the local disk
(media store, model store folder, filesystem IO manager) and once with MM_S3_BUCKET set
(media store, model store and step outputs in S3 on a moto server in its own process).

Same machine, same run, one pass each, one after the other, each in a fresh process with a
fresh MM_HOME and a fresh database on one embedded Postgres; MLflow is a local sqlite file in
both. The timed part is the graph's steps (Dagster `execute_in_process` per step on a local
instance), not the imports. Reports both whole-graph times, the ratio S3 / folder and the
per-step seconds.

    .venv/bin/python benchmarks/bench_model_store.py

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _child(variant: str) -> dict:
    """One pass of the graph in this process (the environment says where things go)."""
    import dagster as dg
    import yaml

    from mm_pipelines import settings
    from mm_pipelines.pipeline.sample_data import write_sample_batch
    from mm_pipelines_tests.stateless import BATCH, DEMO_SUBJECT, GRAPH, SUBJECT

    home = settings.mm_home()
    write_sample_batch(Path(settings.landing_uri()), BATCH)
    settings.subjects_file().parent.mkdir(parents=True, exist_ok=True)
    settings.subjects_file().write_text(yaml.safe_dump({"subjects": [DEMO_SUBJECT]}))
    settings.prepare_dagster_home()
    from mm_pipelines.defs import defs

    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions("batch", [BATCH])
    instance.add_dynamic_partitions("subject", [SUBJECT])
    repo = defs.get_repository_def()
    steps: dict[str, float] = {}
    started = time.perf_counter()
    for asset, partition, config in GRAPH:
        key = dg.AssetKey(asset)
        job = repo.get_implicit_job_def_for_assets([key])
        t0 = time.perf_counter()
        result = job.execute_in_process(
            asset_selection=[key],
            partition_key=partition,
            instance=instance,
            run_config={"ops": {asset: {"config": config}}} if config else None,
            raise_on_error=False,
        )
        if not result.success:
            failures = [
                e.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"
            ]
            raise SystemExit(f"{variant}: {asset} failed: {failures}")
        steps[asset] = round(time.perf_counter() - t0, 2)
    seconds = time.perf_counter() - started
    cache = sum(p.stat().st_size for p in (home / "cache").rglob("*") if p.is_file())
    return {"seconds": round(seconds, 1), "steps": steps, "local_cache_bytes": cache}


def _moto() -> tuple[subprocess.Popen, str]:
    """moto in server mode, in its own process (not a thread competing with the graph)."""
    from mm_pipelines_tests.ports import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    for _ in range(600):
        try:
            urllib.request.urlopen(url, timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("moto server did not start")


def _pass(variant: str, server_dsn: str, root: Path) -> dict:
    import boto3
    import psycopg
    from psycopg.conninfo import make_conninfo

    db = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    home = root / variant
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MM_", "DAGSTER_", "MLFLOW_"))}
    env.update(
        MM_HOME=str(home),
        MM_PG_DSN=make_conninfo(server_dsn, dbname=db),
        MM_DEVICE="cpu",
        PYTHONPATH=str(REPO),
    )
    moto = None
    if variant == "s3":
        moto, url = _moto()
        env.update(
            MM_S3_BUCKET="bench",
            MM_S3_ENDPOINT_URL=url,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
        )
        boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket="bench")
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--child", variant],
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            raise SystemExit(f"{variant} pass failed:\n{out.stderr[-4000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", choices=["folder", "s3"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child)))
        return

    from mm_pipelines.storage.postgres import embedded_server

    root = Path(tempfile.mkdtemp(prefix="bench-model-store-"))
    server = embedded_server(root / "pg", cleanup_mode="delete")
    try:
        load_before = os.getloadavg()
        folder = _pass("folder", server.get_uri(), root)
        s3 = _pass("s3", server.get_uri(), root)
        load_after = os.getloadavg()
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    print(
        json.dumps(
            {
                "benchmark": "model_store_folder_vs_s3",
                "graph": "demo graph, proof settings (mm_pipelines_tests/stateless.py GRAPH)",
                "folder_seconds": folder["seconds"],
                "s3_seconds": s3["seconds"],
                "s3_over_folder": round(s3["seconds"] / folder["seconds"], 3),
                "folder_steps": folder["steps"],
                "s3_steps": s3["steps"],
                "s3_local_cache_bytes": s3["local_cache_bytes"],
                "cpus": os.cpu_count(),
                "load_avg_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
                "python": platform.python_version(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
