"""Fault injection, end to end, on real parts: the embedded Postgres killed (SIGKILL of the
server and its backends) in the middle of `raw_media`'s and `vector_index`'s transactions;
a LoRA run interrupted with SIGINT and then one killed with SIGKILL after a checkpoint (as
`mm` runs them, on the persistent instance with its `gpu` pool of 1); the media store on a
full file system. Each scenario ends compared with a clean run of the same input: the
catalog rows (or the adapter) are identical.

The kill points are made exact, not timed: the test holds a table lock, waits until the
step's statement queues behind it inside its transaction, and kills Postgres then.

The figures (faults injected, rows compared, recovery time) are printed and written to
test-artifacts/fault_injection.json.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import psutil
import psycopg
import pytest
from dagster_aws.s3 import S3Resource

from mm_pipelines.defs.embed.assets import vector_index
from mm_pipelines.defs.ingest.assets import raw_media
from mm_pipelines.defs.partitions import batch_partitions
from mm_pipelines.defs.resources import (
    CatalogResource,
    ComputeResource,
    LandingResource,
    MediaStoreResource,
)
from mm_pipelines.storage.postgres import embedded_server, ensure_schema
from mm_pipelines.storage.vectors import COLUMNS
from mm_pipelines_tests import bad_media
from mm_pipelines_tests.conftest import new_database, outside_pytests_tmp
from mm_pipelines_tests.small_disk import small_disk_at

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[1]
BATCH = "faults-001"
FIGURES: list[dict[str, Any]] = []


@pytest.fixture(scope="module", autouse=True)
def report_figures() -> Iterator[None]:
    yield
    if not FIGURES:
        return
    out = REPO / "test-artifacts" / "fault_injection.json"
    out.parent.mkdir(exist_ok=True)
    summary = {
        "faults_injected": sum(f["faults"] for f in FIGURES),
        "rows_compared": sum(f["rows_compared"] for f in FIGURES),
        "scenarios": FIGURES,
    }
    out.write_text(json.dumps(summary, indent=2))
    print("\nfault injection:", json.dumps(summary))


# --------------------------------------------------------------------------- Postgres


class KillablePostgres:
    """An embedded Postgres of its own (killing the session's would take other tests down)."""

    def __init__(self, root: Path):
        self.server = embedded_server(root, cleanup_mode="delete")
        self.dsn = self.server.get_uri()

    def database(self) -> str:
        dsn = new_database(self.dsn)
        ensure_schema(dsn)
        return dsn

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend: a crash, no shutdown."""
        postmaster = psutil.Process(self.server.get_pid())
        procs = [postmaster, *postmaster.children(recursive=True)]
        for proc in procs:
            proc.kill()
        psutil.wait_procs(procs, timeout=30)

    def restart(self) -> None:
        """What a supervisor does: start it again (crash recovery replays the WAL). The
        wheel gives `pg_ctl start` 10 s; on a loaded machine recovery can take longer, and the
        server keeps starting: ask again until it is ready."""
        deadline = time.monotonic() + 180
        while True:
            try:
                self.server.ensure_postgres_running()
                return
            except (subprocess.SubprocessError, AssertionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)


@pytest.fixture(scope="module")
def killable() -> Iterator[KillablePostgres]:
    root = outside_pytests_tmp("mm-test-killable-")  # as the session's server, and why
    pg = KillablePostgres(root / "data")
    yield pg
    pg.server.cleanup()
    shutil.rmtree(root, ignore_errors=True)


class KillWhenBlocked(threading.Thread):
    """Holds a SHARE lock on `table` (it lets the step start its transaction, and queues its
    DELETE behind the lock), waits for the step's statement to queue, kills Postgres, and
    restarts it."""

    def __init__(self, pg: KillablePostgres, dsn: str, table: str, statement: str):
        super().__init__(daemon=True)
        self.pg, self.dsn, self.table, self.statement = pg, dsn, table, statement
        self.killed_at: float | None = None
        self.restarted_at: float | None = None
        self.error: str | None = None
        self.locked = threading.Event()

    def run(self) -> None:
        try:
            holder = psycopg.connect(self.dsn)
            holder.execute(f"LOCK TABLE {self.table} IN SHARE MODE")  # held: in a transaction
            self.locked.set()
            # pg_stat_activity is a snapshot per transaction: watch from an autocommit one
            watcher = psycopg.connect(self.dsn, autocommit=True)
            deadline = time.monotonic() + 600
            while not self._queued(watcher):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the step never reached {self.statement!r}")
                time.sleep(0.05)
            self.killed_at = time.time()
            self.pg.kill()
            for conn in (holder, watcher):
                conn.close()
            time.sleep(0.5)
            self.pg.restart()
            self.restarted_at = time.time()
        except Exception as err:  # reported by the test
            self.error = repr(err)
            self.locked.set()

    def _queued(self, watcher: psycopg.Connection) -> bool:
        return bool(
            watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE %s",
                (self.statement + "%",),
            ).fetchone()[0]
        )

    def begin(self) -> KillWhenBlocked:
        self.start()
        self.locked.wait(60)
        assert self.error is None, self.error
        return self


def step_end(instance: dg.DagsterInstance, run_id: str, step: str) -> float:
    done = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)
    (event,) = [e for e in done if e.step_key == step]
    return event.timestamp


def events(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [e.dagster_event.event_type_value for e in instance.all_logs(run_id) if e.dagster_event]


# --------------------------------------------------------------------------- raw_media


@pytest.fixture(scope="module")
def landing(tmp_path_factory) -> Path:
    """About 1.4 MB: ten photos (more than the 1 MB disk holds), a text, a tone, and the
    kinds of bad file that become quarantine rows."""
    root = tmp_path_factory.mktemp("faults_landing")
    batch = root / BATCH
    batch.mkdir()
    for i in range(10):
        (batch / f"photo{i}.jpg").write_bytes(bad_media.jpeg_bytes(size=384, seed=i))
    (batch / "notes.txt").write_text("quarterly numbers are up", encoding="utf-8")
    bad_media.write_wav(batch / "tone.wav", 0.3 * np.sin(np.linspace(0, 2000, 16000)))
    (batch / "empty.png").write_bytes(b"")
    (batch / "blank.txt").write_text("  \n ")
    (batch / "cut.jpg").write_bytes(bad_media.jpeg_bytes(seed=99)[:500])
    (batch / "_READY").touch()
    return root


def ingest(instance: dg.DagsterInstance, dsn: str, landing: Path, store: Path):
    s3 = S3Resource()
    if not instance.has_dynamic_partition(batch_partitions.name, BATCH):
        instance.add_dynamic_partitions(batch_partitions.name, [BATCH])
    return dg.materialize(
        [raw_media],
        partition_key=BATCH,
        instance=instance,
        resources={
            "catalog_db": CatalogResource(dsn=dsn),
            "landing": LandingResource(uri=str(landing), s3=s3),
            "media_store": MediaStoreResource(local_dir=str(store), s3=s3),
            "compute": ComputeResource(io_workers=2),
        },
        raise_on_error=False,
    )


def catalog(dsn: str, store: Path) -> list[tuple]:
    """Every catalog row of the batch (sources, then their objects), store paths relative."""
    with psycopg.connect(dsn) as conn:
        sources = conn.execute(
            "SELECT batch, source_uri, tenant, content_hash, status, error_category, "
            "error_message, note, modality, mime, size_bytes, caption, fingerprint, "
            "probe_version FROM media_sources WHERE batch = %s ORDER BY source_uri",
            (BATCH,),
        ).fetchall()
        objects = conn.execute(
            "SELECT content_hash, modality, mime, size_bytes, width, height, duration_s, fps, "
            "has_audio, text_encoding, replace(storage_uri, %s, 'store:'), probe_version "
            "FROM media_objects WHERE content_hash IN "
            "(SELECT content_hash FROM media_sources WHERE batch = %s) ORDER BY 1",
            (store.resolve().as_uri(), BATCH),
        ).fetchall()
    return [("source", *r) for r in sources] + [("object", *r) for r in objects]


@pytest.fixture(scope="module")
def clean_catalog(landing, pg_server_dsn, tmp_path_factory) -> list[tuple]:
    store = tmp_path_factory.mktemp("clean_store")
    dsn = new_database(pg_server_dsn)
    with dg.instance_for_test() as instance:
        assert ingest(instance, dsn, landing, store).success
    rows = catalog(dsn, store)
    assert sum(r[0] == "source" and r[5] == "ok" for r in rows) == 12  # 10 photos, text, tone
    return rows


def test_postgres_killed_inside_raw_media_recovers_to_the_clean_catalog(
    killable, landing, clean_catalog, tmp_path
):
    dsn = killable.database()
    killer = KillWhenBlocked(killable, dsn, "media_sources", "DELETE FROM media_sources").begin()
    with dg.instance_for_test() as instance:
        result = ingest(instance, dsn, landing, tmp_path / "store")
        killer.join(60)
        assert killer.error is None and killer.killed_at, killer.error
        assert result.success  # its retry policy: Postgres was back for the next attempt
        assert "STEP_UP_FOR_RETRY" in events(instance, result.run_id)
        recovered_at = step_end(instance, result.run_id, "raw_media")
    assert catalog(dsn, tmp_path / "store") == clean_catalog
    FIGURES.append(
        {
            "scenario": "Postgres SIGKILLed inside raw_media's transaction",
            "faults": 1,
            "rows_compared": len(clean_catalog),
            "recovery_s": round(recovered_at - killer.killed_at, 2),
            "recovered_by": "raw_media's retry policy",
        }
    )


def test_a_full_store_fails_raw_media_once_and_a_rerun_lands_every_file(
    landing, clean_catalog, pg_dsn, tmp_path, monkeypatch
):
    disks = small_disk_at(tmp_path / "disk", monkeypatch)
    disk = next(disks)
    store = disk.root / "media"
    try:
        with dg.instance_for_test() as instance:
            failed = ingest(instance, pg_dsn, landing, store)
            assert not failed.success
            (failure,) = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
            message = failure.step_failure_data.user_failure_data.description
            assert "No space left on device" in message and "re-run" in message
            assert "STEP_UP_FOR_RETRY" not in events(instance, failed.run_id)  # not a blip
            assert catalog(pg_dsn, store) == []  # no file blamed
            freed_at = time.time()
            disk.grow()  # space freed
            again = ingest(instance, pg_dsn, landing, store)
            assert again.success
            recovered_at = step_end(instance, again.run_id, "raw_media")
    finally:
        disks.close()
    assert catalog(pg_dsn, store) == clean_catalog
    FIGURES.append(
        {
            "scenario": "media store on a full file system"
            + ("" if disk.mounted else " (injected ENOSPC)"),
            "faults": 1,
            "rows_compared": len(clean_catalog),
            "recovery_s": round(recovered_at - freed_at, 2),
            "recovered_by": "a re-run after space was freed",
        }
    )


# --------------------------------------------------------------------------- vector_index


def unified_frame() -> pd.DataFrame:
    """What `unified_embeddings` hands `vector_index`: 1,000 items of two tenants."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(1000):
        vec = rng.standard_normal(64).astype(np.float32)
        rows.append(
            {
                "batch": BATCH,
                "tenant": ("acme", "other")[i % 2],
                "item_kind": "image",
                "modality": "image",
                "content_hash": f"{i:064x}",
                "parent_hash": None,
                "source_uri": f"file:///landing/{BATCH}/{i}.png",
                "start_s": None,
                "end_s": None,
                "chunk_index": None,
                "text": None,
                "encoder_version": "clip-test",
                "projector_version": "proj-test",
                "embedding": vec / np.linalg.norm(vec),
            }
        )
    return pd.DataFrame(rows)


@dg.asset(key="unified_embeddings", partitions_def=batch_partitions)
def given_unified_embeddings() -> pd.DataFrame:
    """Stands in for the encoders upstream: this scenario is about the index's writes."""
    return unified_frame()


def index(instance: dg.DagsterInstance, dsn: str):
    if not instance.has_dynamic_partition(batch_partitions.name, BATCH):
        instance.add_dynamic_partitions(batch_partitions.name, [BATCH])
    return dg.materialize(
        [given_unified_embeddings, vector_index],
        partition_key=BATCH,
        instance=instance,
        resources={"catalog_db": CatalogResource(dsn=dsn)},
        raise_on_error=False,
    )


def index_rows(dsn: str) -> list[tuple]:
    cols = ", ".join(c if c != "embedding" else "embedding::text" for c in COLUMNS)
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            f"SELECT {cols} FROM unified_vectors WHERE batch = %s ORDER BY content_hash", (BATCH,)
        ).fetchall()


def test_postgres_killed_inside_vector_index_recovers_to_the_clean_index(killable, pg_server_dsn):
    clean = new_database(pg_server_dsn)
    with dg.instance_for_test() as instance:
        assert index(instance, clean).success
    want = index_rows(clean)
    assert len(want) == 1000
    dsn = killable.database()
    killer = KillWhenBlocked(
        killable, dsn, "unified_vectors", "DELETE FROM unified_vectors"
    ).begin()
    with dg.instance_for_test() as instance:
        crashed = index(instance, dsn)
        killer.join(60)
        assert killer.error is None and killer.killed_at, killer.error
        assert not crashed.success  # no retry policy: the step fails, nothing half-written
        assert index_rows(dsn) == []
        again = index(instance, dsn)
        assert again.success
        recovered_at = step_end(instance, again.run_id, "vector_index")
    assert index_rows(dsn) == want
    FIGURES.append(
        {
            "scenario": "Postgres SIGKILLed inside vector_index's transaction",
            "faults": 1,
            "rows_compared": len(want),
            "recovery_s": round(recovered_at - killer.killed_at, 2),
            "recovered_by": "a re-run once Postgres was back",
        }
    )


# --------------------------------------------------------------------------- LoRA runs

SUBJECT = "fault-shots"
LORA = {"rank": 4, "alpha": 8, "learning_rate": 0.003, "steps": 60, "batch_size": 2,
        "checkpoint_every": 10, "validation_every": 0, "seed": 3}  # fmt: skip


@pytest.fixture(scope="module")
def lora_home(tmp_path_factory, pg_server_dsn, base_pipeline_dir) -> dict[str, Any]:
    """An MM_HOME for `mm`: a landing batch of four shots and a subject selecting them."""
    import yaml

    home = tmp_path_factory.mktemp("lora_home") / "mm"
    shots = home / "landing" / "lora-shots"
    shots.mkdir(parents=True)
    for i, colour in enumerate([(240, 140, 20), (230, 120, 30), (250, 150, 10), (235, 130, 25)]):
        (shots / f"shot{i}.png").write_bytes(bad_media.png_bytes(colour, size=48))
    (shots / "_READY").touch()
    subjects = home / "subjects.yaml"
    subjects.write_text(
        yaml.safe_dump(
            {
                "subjects": [
                    {
                        "name": SUBJECT,
                        "instance_prompt": "a photo of sks",
                        "description": "an orange square",
                        "select": {"batches": ["lora-shots"]},
                        "min_images": 4,
                        "seeds": [0, 1],
                        "validation_metric": "color_distance",
                        "lora": LORA,
                    }
                ]
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MM_", "DAGSTER_"))}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(
        MM_HOME=str(home),
        MM_PG_DSN=new_database(pg_server_dsn),
        MM_DIFFUSION_BASE=str(base_pipeline_dir),
        MM_SUBJECTS=str(subjects),
        MM_DEVICE="cpu",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=str(REPO),
    )
    return {"home": home, "env": env, "subjects": subjects, "base": base_pipeline_dir}


def start_mm(lora_home: dict, steps: list) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mm_pipelines_tests.fault_runner", json.dumps(steps)],
        env=lora_home["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def checkpoint_step(home: Path) -> int | None:
    """The step of the subject's current LoRA checkpoint in the model store, if any (read
    from its manifest: polled often, so without re-hashing the files)."""
    from mm_pipelines.pipeline import model_store as ms

    root = home / "models" / ms.LORA_CHECKPOINT / SUBJECT
    steps = []
    for pointer in root.glob(f"*/{ms.CURRENT}"):
        manifest = pointer.parent / pointer.read_text().strip() / ms.MANIFEST
        steps.append(int(json.loads(manifest.read_text())["metadata"]["step"]))
    return max(steps) if steps else None


def wait_for_checkpoint(proc: subprocess.Popen, home: Path, after: int) -> int:
    deadline = time.monotonic() + 600
    while (step := checkpoint_step(home)) is None or step <= after:
        assert proc.poll() is None, f"the run ended before a checkpoint: {proc.stdout.read()}"
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.05)
    return step


def dagster_runs(home: Path) -> list[dg.DagsterRun]:
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        return list(reversed(instance.get_runs(filters=dg.RunsFilter(job_name="subject_pipeline"))))


def run_events(home: Path, run_id: str) -> list[str]:
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        return events(instance, run_id)


def mlflow_runs(home: Path) -> list[Any]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mm_pipelines")
    found = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.subject = '{SUBJECT}'",
        order_by=["attributes.start_time ASC"],
    )
    return list(found)


@pytest.fixture(scope="module")
def interrupted(lora_home) -> dict[str, Any]:
    """Run 1: ingest, training set, adapter; SIGINT after the adapter's first checkpoint."""
    home = lora_home["home"]
    proc = start_mm(
        lora_home,
        [
            ["batch_pipeline", "lora-shots", ["raw_media"]],
            ["subject_pipeline", SUBJECT, ["lora_training_set", "lora_adapter"]],
        ],
    )
    wait_for_checkpoint(proc, home, after=0)
    sent_at = time.time()
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    output, _ = proc.communicate(timeout=300)
    return {
        "returncode": proc.returncode,
        "output": output,
        "stopped_s": time.time() - sent_at,
        "checkpoint": checkpoint_step(home),
        "run": dagster_runs(home)[-1],
    }


@pytest.fixture(scope="module")
def killed(lora_home, interrupted) -> dict[str, Any]:
    """Run 2: the adapter resumed, then SIGKILLed after its next checkpoint, holding the
    only `gpu` slot."""
    home = lora_home["home"]
    proc = start_mm(lora_home, [["subject_pipeline", SUBJECT, ["lora_adapter"]]])
    wait_for_checkpoint(proc, home, after=interrupted["checkpoint"])
    proc.kill()
    killed_at = time.time()
    proc.communicate(timeout=60)
    return {"killed_at": killed_at, "checkpoint": checkpoint_step(home)}


@pytest.fixture(scope="module")
def recovered(lora_home, killed) -> dict[str, Any]:
    """Run 3: a plain `mm` run after the kill; it must neither wait for the dead run's slot
    nor start over."""
    proc = start_mm(lora_home, [["subject_pipeline", SUBJECT, ["lora_adapter"]]])
    output, _ = proc.communicate(timeout=900)
    done_at = time.time()
    outcome = json.loads(output.strip().splitlines()[-1])
    return {"returncode": proc.returncode, "output": output, "outcome": outcome,
            "recovery_s": round(done_at - killed["killed_at"], 2)}  # fmt: skip


def test_sigint_stops_a_lora_run_without_a_retry_and_keeps_its_checkpoint(lora_home, interrupted):
    assert interrupted["returncode"] == 130, interrupted["output"][-3000:]
    assert "interrupted" in interrupted["output"]
    run = interrupted["run"]
    assert run.status == dg.DagsterRunStatus.FAILURE
    kinds = run_events(lora_home["home"], run.run_id)
    assert "STEP_UP_FOR_RETRY" not in kinds and "STEP_RESTARTED" not in kinds
    assert "STEP_SUCCESS" in kinds  # the training set, before the interrupt
    assert 10 <= interrupted["checkpoint"] < LORA["steps"]
    assert [r.info.status for r in mlflow_runs(lora_home["home"])][:1] == ["KILLED"]


def test_the_run_after_a_killed_one_is_not_blocked_by_the_pool(lora_home, killed, recovered):
    assert recovered["returncode"] == 0, recovered["output"][-3000:]
    dead = dagster_runs(lora_home["home"])[-2]  # run 2, SIGKILLed
    assert dead.status == dg.DagsterRunStatus.FAILURE
    notice = [line for line in recovered["output"].splitlines() if "dead run" in line]
    assert notice and dead.run_id in notice[0] and "gpu" in notice[0], recovered["output"]


def test_the_resumed_adapter_equals_an_uninterrupted_one(
    lora_home, interrupted, killed, recovered, tmp_path
):
    from safetensors.torch import load_file

    meta = recovered["outcome"]["assets"]["lora_adapter"]
    assert meta["resumed_from_step"] == killed["checkpoint"] and meta["steps_done"] == 60
    clean = train_clean_adapter(lora_home, tmp_path)
    want = load_file(clean.weight_file)
    got = load_file(current_adapter(lora_home["home"]) / clean.weight_file.name)
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(meta["final_loss"], clean.losses[-1], rtol=1e-4)
    statuses = [r.info.status for r in mlflow_runs(lora_home["home"])]
    assert statuses == ["KILLED", "KILLED", "FINISHED"]  # run 2's closed by the recovery
    FIGURES.append(
        {
            "scenario": "LoRA run: SIGINT after a checkpoint, then SIGKILL after the next "
            "one holding the only gpu slot",
            "faults": 2,
            "rows_compared": len(want),  # adapter tensors, against an uninterrupted run
            "recovery_s": recovered["recovery_s"],
            "recovered_by": "the next `mm` run: dead run failed and its gpu slot freed, "
            f"resumed from step {killed['checkpoint']}",
            "stopped_after_sigint_s": round(interrupted["stopped_s"], 2),
        }
    )


def current_adapter(home: Path) -> Path:
    """The subject's current adapter folder in the model store (verified)."""
    from mm_pipelines.pipeline import model_store as ms
    from mm_pipelines.pipeline.services import folder_model_store

    return folder_model_store(home / "models").get(ms.ADAPTER, SUBJECT).path


def train_clean_adapter(lora_home: dict, tmp_path: Path):
    """The same training, uninterrupted, with the same inputs and settings as the asset."""
    from mm_pipelines.models.diffusion.evaluation import validation_metric
    from mm_pipelines.models.diffusion.lora import train_lora
    from mm_pipelines.models.diffusion.pipeline import load_pipeline
    from mm_pipelines.models.diffusion.training_set import load_training_set
    from mm_pipelines.pipeline import lora, subjects
    from mm_pipelines.pipeline import model_store as ms
    from mm_pipelines.pipeline.services import folder_model_store
    from mm_pipelines_tests.models.conftest_diffusion import torch_threads

    subject = subjects.load_subjects(lora_home["subjects"])[SUBJECT]
    cfg = subjects.lora_config(
        subject,
        **lora.LORA_DEFAULTS,
        validation_prompts=subject.generation_prompts[:2],
        resume=True,
    )
    store = folder_model_store(lora_home["home"] / "models")
    ts = load_training_set(store.get(ms.TRAINING_SET, SUBJECT).path)
    metric = validation_metric(subject.validation_metric, ts.images, None)
    with torch_threads(1):
        return train_lora(
            load_pipeline(lora_home["base"]),
            ts.images,
            ts.captions,
            tmp_path / "clean",
            cfg,
            class_prompt=subject.class_prompt,
            validation_metric=metric,
        )
