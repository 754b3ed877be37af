"""Steps as pods: the shared services of a production deployment on loopback (Postgres, an
S3-protocol server, an MLflow server over HTTP, a Dagster instance in Postgres) and a runner
that materializes each step in its own process with its own empty disk.

Why a step process is a faithful stand-in for a pod: a `k8s_job_executor` step pod starts from
the image (the code and its installed packages), its environment (the ConfigMap/Secret
variables) and an empty disk, loads the code location and executes one step against the
shared instance. Here each step is `dagster asset materialize -m mm_pipelines.defs --select
<asset>` in a new process group, with an environment built from nothing but those variables,
a new empty MM_HOME, HOME, TMPDIR, DAGSTER_HOME (holding only the instance's dagster.yaml, as
the chart's ConfigMap does) and working directory, all deleted when the step ends. The only
files it shares with the test are read-only configuration (dagster.yaml, the subjects file:
what a ConfigMap mounts); everything else it can reach is a network service.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import dagster as dg
import requests
import yaml
from psycopg.conninfo import conninfo_to_dict

from mm_pipelines import settings
from mm_pipelines.pipeline import subjects
from mm_pipelines.pipeline.sample_data import write_sample_batch
from mm_pipelines.storage.landing import READY_MARKER
from mm_pipelines_tests.ports import free_port

BIN = Path(sys.executable).parent
BATCH = "stateless-0001"
SUBJECT = str(subjects.DEMO_SUBJECT["name"])
MLFLOW_START_TIMEOUT_S = 300  # the server imports MLflow and migrates sqlite: slow on 2 busy cores

# The demo graph with small training settings: the demo CLIP and the tiny diffusion base are
# trained inside their own steps (never taken from a local disk), just shorter.
CLIP_STEPS = 120
BASE_MODEL = {"vae_steps": 60, "unet_steps": 80}
LORA_STEPS, LORA_CHECKPOINT_EVERY = 80, 20
DEMO_SUBJECT = {
    **subjects.DEMO_SUBJECT,
    "seeds": list(range(8)),
    "lora": {
        **subjects.DEMO_SUBJECT["lora"],
        "steps": LORA_STEPS,
        "checkpoint_every": LORA_CHECKPOINT_EVERY,
        # validation (and so a best snapshot inside every checkpoint) at each checkpoint
        "validation_every": LORA_CHECKPOINT_EVERY,
        "validation_seeds": [0, 1, 2, 3],
        "validation_inference_steps": 5,
    },
    "generation": {"num_inference_steps": 10, "guidance_scale": 3.0},
    # a LoRA this short does not beat its base; the gate is what serving waits for, not
    # what this run measures (test_dagster_generate.py measures the adapter's effect)
    "gates": {"max_fid_ratio_to_base": None},
}


CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def s3_client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **CREDENTIALS)


# (asset, partition, run config) in an order that respects the graph's dependencies: what
# the proof runs one process per step, and benchmarks/bench_model_store.py in one process
GRAPH: list[tuple[str, str | None, dict[str, Any] | None]] = [
    ("raw_media", BATCH, None),
    ("clip_model", None, {"steps": CLIP_STEPS}),
    ("lora_base_model", None, BASE_MODEL),
    ("transcripts", BATCH, None),
    ("video_frames", BATCH, None),
    ("lora_training_set", SUBJECT, None),
    ("lora_adapter", SUBJECT, None),
    ("audio_embeddings", BATCH, None),
    ("clip_embeddings", BATCH, None),
    ("generated_images", SUBJECT, None),
    ("unified_projector", None, None),
    ("generation_quality", SUBJECT, None),
    ("unified_embeddings", BATCH, None),
    ("vector_index", BATCH, None),
    ("online_model", None, None),
]


def sqlalchemy_url(conninfo: str) -> str:
    """dagster-postgres wants a psycopg2 URL; the embedded server hands out a libpq conninfo
    (unix socket)."""
    c = conninfo_to_dict(conninfo)
    auth = c.get("user", "postgres") + (f":{c['password']}" if c.get("password") else "")
    host = str(c.get("host", ""))
    if host.startswith("/"):
        return f"postgresql+psycopg2://{auth}@/{c['dbname']}?host={host}&port={c.get('port', 5432)}"
    return f"postgresql+psycopg2://{auth}@{host}:{c.get('port', 5432)}/{c['dbname']}"


# --------------------------------------------------------------------------- services


@dataclass
class MlflowServer:
    """A real `mlflow server` with a sqlite backend, serving artifacts itself."""

    url: str
    proc: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, root: Path) -> MlflowServer:
        root.mkdir(parents=True, exist_ok=True)
        port = free_port()
        log = root / "mlflow-server.log"
        cmd = [
            str(BIN / "mlflow"),
            "server",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--backend-store-uri=sqlite:///{root / 'mlflow.db'}",
            f"--artifacts-destination={root / 'artifacts'}",
            "--serve-artifacts",
            "--workers=1",
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=root,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=settings.mlflow_server_environ(),  # as `mm mlflow` and the compose file run it
            )
        return cls(f"http://127.0.0.1:{port}", proc, log)

    def healthy(self) -> bool:
        assert self.proc.poll() is None, f"mlflow server exited:\n{self.tail()}"
        try:
            return requests.get(f"{self.url}/health", timeout=2).ok
        except requests.RequestException:
            return False

    def wait(self, timeout_s: float = MLFLOW_START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            assert time.monotonic() < deadline, f"mlflow server not up:\n{self.tail()}"
            time.sleep(0.5)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self) -> None:
        stop_group(self.proc, wait_s=3)  # its state dies with the test


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait_s: float = 10) -> None:
    """End a process started with start_new_session (its whole group), by its id."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@dataclass
class Shared:
    """What the steps share: services reached by address, and read-only configuration."""

    root: Path  # the test's own folder; steps get only `config/` from it, read-only
    catalog_dsn: str
    dagster_dsn: str
    s3_endpoint: str
    bucket: str
    mlflow: MlflowServer
    instance: dg.DagsterInstance  # the test's handle on the shared instance
    steps_root: Path  # where each step's disk is made (and deleted)

    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    def s3(self) -> Any:
        return s3_client(self.s3_endpoint)

    def env(self) -> dict[str, str]:
        """A step's environment: nothing of this machine's MM_/DAGSTER_/MLFLOW_ settings."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("MM_", "DAGSTER_", "MLFLOW_", "AWS_"))
        }
        env.update(
            MM_PG_DSN=self.catalog_dsn,
            MM_S3_BUCKET=self.bucket,
            MM_S3_ENDPOINT_URL=self.s3_endpoint,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
            MM_LANDING=f"s3://{self.bucket}/landing",
            MM_SERVING_STORE=f"s3://{self.bucket}/serving",
            MM_SUBJECTS=str(self.config_dir / "subjects.yaml"),
            MLFLOW_TRACKING_URI=self.mlflow.url,
            # clients upload artifacts through the server: no artifact store credentials
            MM_MLFLOW_ARTIFACTS="mlflow-artifacts:/",
            MM_DEVICE="cpu",
            PYTHONUNBUFFERED="1",
        )
        return env

    def s3_listing(self) -> dict[str, str]:
        """Every object of the bucket with its ETag."""
        found: dict[str, str] = {}
        for page in self.s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            found.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
        return found


def write_config(config_dir: Path, dagster_dsn: str) -> None:
    """The instance file and the subjects file, read-only: what ConfigMaps would mount."""
    config_dir.mkdir(parents=True)
    instance = {
        "storage": {"postgres": {"postgres_url": sqlalchemy_url(dagster_dsn)}},
        # a step's stdout/stderr stay in its process log (the test keeps those)
        "compute_logs": {
            "module": "dagster._core.storage.noop_compute_log_manager",
            "class": "NoOpComputeLogManager",
        },
        "telemetry": {"enabled": False},
    }
    (config_dir / "dagster.yaml").write_text(yaml.safe_dump(instance))
    (config_dir / "subjects.yaml").write_text(yaml.safe_dump({"subjects": [DEMO_SUBJECT]}))
    for path in config_dir.iterdir():
        path.chmod(0o444)


def upload_sample_batch(shared: Shared, scratch: Path) -> int:
    """The sample batch lands in S3 (`_READY` last); the local copy is deleted."""
    folder = write_sample_batch(scratch, BATCH)
    client = shared.s3()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == READY_MARKER)
    for path in files:
        key = f"landing/{BATCH}/{path.relative_to(folder).as_posix()}"
        client.upload_file(str(path), shared.bucket, key)
    shutil.rmtree(scratch)
    return len(files)


# --------------------------------------------------------------------------- steps


@dataclass
class Step:
    """One asset materialization in its own process."""

    name: str  # unique label in the run log
    asset: str
    partition: str | None = None
    config: dict[str, Any] | None = None
    after: tuple[str, ...] = ()
    needs_mlflow: bool = False
    expect: str = "success"  # success | failure | killed
    env: dict[str, str] = field(default_factory=dict)  # overrides of the shared environment
    # called while the step runs; returns True when it killed the step
    watch: Callable[[Shared, subprocess.Popen], bool] | None = None


@dataclass
class Outcome:
    step: Step
    returncode: int
    seconds: float
    run_id: str | None
    log: str


class StepRunner:
    """Runs steps as separate processes, up to `parallel` at once, each when its `after`
    steps are done (as Dagster starts step pods when their upstream steps are done)."""

    def __init__(self, shared: Shared, logs: Path, parallel: int = 2) -> None:
        self.shared, self.parallel = shared, parallel
        self.done: dict[str, Outcome] = {}
        self.logs = logs  # each step's output, kept after the test (never read by steps)
        self.logs.mkdir(parents=True, exist_ok=True)

    def _launch(self, step: Step) -> tuple[subprocess.Popen, Path, float, datetime]:
        disk = Path(self.shared.steps_root) / f"{step.name}-{uuid.uuid4().hex[:6]}"
        for sub in ("mm", "home", "tmp", "cwd", "dagster_home"):
            (disk / sub).mkdir(parents=True)
        shutil.copy(self.shared.config_dir / "dagster.yaml", disk / "dagster_home")
        env = {
            **self.shared.env(),
            # each step gets its share of the cores, as a pod gets its CPU request: torch's
            # default (a thread per core in every process) thrashes when steps run side by side
            "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // self.parallel)),
            "MM_HOME": str(disk / "mm"),
            "HOME": str(disk / "home"),
            "TMPDIR": str(disk / "tmp"),
            "DAGSTER_HOME": str(disk / "dagster_home"),
            **step.env,
        }
        run_config: dict[str, Any] = {"execution": {"config": {"in_process": {}}}}
        if step.config:
            run_config["ops"] = {step.asset: {"config": step.config}}
        cmd = [str(BIN / "dagster"), "asset", "materialize", "-m", "mm_pipelines.defs"]
        cmd += ["--select", step.asset, "--config-json", json.dumps(run_config)]
        if step.partition:
            cmd += ["--partition", step.partition]
        log = self.logs / f"{step.name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=disk / "cwd",
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own group: a SIGKILL takes all of it, like a pod
            )
        return proc, disk, time.monotonic(), datetime.now(UTC)

    def run(self, steps: list[Step], timeout_s: float = 3600) -> dict[str, Outcome]:
        pending = list(steps)
        running: dict[str, tuple[Step, subprocess.Popen, Path, float, datetime]] = {}
        deadline = time.monotonic() + timeout_s
        try:
            while pending or running:
                assert time.monotonic() < deadline, f"steps still running: {list(running)}"
                for step in list(pending):
                    if len(running) >= self.parallel:
                        break
                    if not all(a in self.done for a in step.after):
                        continue
                    if step.needs_mlflow and not self.shared.mlflow.healthy():
                        continue
                    pending.remove(step)
                    running[step.name] = (step, *self._launch(step))
                for name, (step, proc, disk, t0, started) in list(running.items()):
                    killed = step.watch(self.shared, proc) if step.watch else False
                    if proc.poll() is None and not killed:
                        continue
                    proc.wait()
                    del running[name]
                    # the step's disk goes with it: no later step can read what it left
                    shutil.rmtree(disk)
                    self.done[name] = self._outcome(step, proc, time.monotonic() - t0, started)
                time.sleep(0.2)
        finally:
            for _step, proc, disk, *_ in running.values():
                stop_group(proc, signal.SIGKILL)
                shutil.rmtree(disk, ignore_errors=True)
        return self.done

    def _outcome(
        self, step: Step, proc: subprocess.Popen, seconds: float, started: datetime
    ) -> Outcome:
        log = (self.logs / f"{step.name}.log").read_text(errors="replace")
        run_id = self._run_id(step, started)
        outcome = Outcome(step, proc.returncode, seconds, run_id, log)
        ok = {
            "success": proc.returncode == 0,
            "failure": proc.returncode not in (0, -signal.SIGKILL),
            "killed": proc.returncode == -signal.SIGKILL,
        }[step.expect]
        assert ok, f"step {step.name}: expected {step.expect}, rc {proc.returncode}\n{log[-6000:]}"
        return outcome

    def _run_id(self, step: Step, started: datetime) -> str | None:
        """The run this step's process made in the shared instance."""
        records = self.shared.instance.get_run_records(
            dg.RunsFilter(created_after=started), limit=20
        )
        for record in records:
            run = record.dagster_run
            selected = {k.to_user_string() for k in (run.asset_selection or ())}
            if step.asset in selected and run.tags.get("dagster/partition") == step.partition:
                return run.run_id
        return None


def materialization(
    instance: dg.DagsterInstance, asset: str, partition: str | None = None
) -> dict[str, Any]:
    """Metadata of the asset's (partition's) latest materialization in the shared instance."""
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    if partition is not None:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]),
            limit=1,
        ).records
        event = records[0].event_log_entry if records else None
    assert event is not None, f"no materialization of {asset} {partition or ''}"
    mat = event.asset_materialization
    return {"run_id": event.run_id, **{k: v.value for k, v in mat.metadata.items()}}


@contextlib.contextmanager
def shared_services(
    root: Path, pg_server_dsn: str, s3_endpoint: str, new_database: Callable[[str], str]
) -> Iterator[Shared]:
    mlflow_server = MlflowServer.start(root / "mlflow")  # starts while the rest is set up
    try:
        catalog, dagster_db = new_database(pg_server_dsn), new_database(pg_server_dsn)
        write_config(root / "config", dagster_db)
        bucket = f"mm-{uuid.uuid4().hex[:8]}"
        s3_client(s3_endpoint).create_bucket(Bucket=bucket)
        instance = dg.DagsterInstance.from_config(str(root / "config"))
        steps_root = root / "steps"
        steps_root.mkdir()
        yield Shared(
            root, catalog, dagster_db, s3_endpoint, bucket, mlflow_server, instance, steps_root
        )
        instance.dispose()
    finally:
        mlflow_server.stop()
