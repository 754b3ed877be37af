"""Shared, real test infrastructure: an embedded Postgres + pgvector and an S3 server
(moto in server mode) on loopback, both started once per session."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import torch
from psycopg.conninfo import make_conninfo

from mm_pipelines_tests import scheduling
from mm_pipelines_tests.ports import free_port

# One intra-op thread for the torch work the tests do in this process, for the whole
# session: on 2 cores shared with the step processes and servers the tests start, two
# threads spin at every barrier whenever another process holds a core (base training
# measured ~4x slower under load). On an idle machine it costs a little: the demo CLIP
# fixture trained in 107 s with one thread, 62-69 s with two (measured here).
torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    scheduling.longest_first(items)
    scheduling.give_the_demo_time(items)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`--dist loadfile` (pyproject's addopts): modules, the demo's state as one unit."""
    return scheduling.make_scheduler(config, log) if config.getvalue("dist") == "loadfile" else None


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri() -> Iterator[None]:
    """`mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI; one test's store must not
    become the next test's (or its subprocesses') default."""
    import os

    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def outside_pytests_tmp(prefix: str) -> Path:
    """A directory for an embedded Postgres's data. Not under pytest's tmp root: a pytest
    session started meanwhile on this machine resets that root to 0700, and the server (run
    as its own system user under root) then loses its data directory and shuts down."""
    return Path(tempfile.mkdtemp(prefix=prefix))


@pytest.fixture(scope="session")
def pg_server_dsn() -> Iterator[str]:
    from mm_pipelines.storage.postgres import embedded_server

    root = outside_pytests_tmp("mm-test-pg-")
    server = embedded_server(root / "data", cleanup_mode="delete")
    yield server.get_uri()
    server.cleanup()
    shutil.rmtree(root, ignore_errors=True)


def new_database(server_dsn: str) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_conninfo(server_dsn, dbname=name)


@pytest.fixture
def pg_dsn(pg_server_dsn: str) -> str:
    """A fresh, empty database on the session's server for each test."""
    return new_database(pg_server_dsn)


@pytest.fixture(scope="module")
def module_pg_dsn(pg_server_dsn: str) -> str:
    """A fresh database shared by the tests of one module (for expensive set-ups)."""
    return new_database(pg_server_dsn)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_endpoint


@pytest.fixture
def mm_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "mm"
    monkeypatch.setenv("MM_HOME", str(home))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("MM_LANDING", raising=False)
    monkeypatch.delenv("MM_S3_BUCKET", raising=False)
    return home


def built_once(
    tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]
) -> Path:
    """The directory `name`, filled by `build` once per test run: the xdist workers share
    the run's temporary root, the first to ask builds while the others wait, then all read
    it (nothing writes to it afterwards). A worker that dies building leaves no marker."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # <run>/popen-gwN -> <run>
    out, marker = root / "built" / name, root / "built" / f"{name}.done"
    out.parent.mkdir(exist_ok=True)
    with open(root / "built" / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes or its holder dies
        if not marker.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            build(out)
            marker.touch()
    return out


@pytest.fixture(scope="session")
def demo_clip(tmp_path_factory: pytest.TempPathFactory):
    """The tiny CLIP trained exactly as `mm demo` trains it (once per test run); a
    TrainResult whose `checkpoint_path` holds the weights and whose `bundle` is loaded from
    them, so every worker has the same model."""
    from mm_pipelines.models.clip.loading import load_clip
    from mm_pipelines.models.demo.tiny_clip import DEMO_TRAIN_CONFIG, train_clip

    def train(out: Path) -> None:
        path = out / "open_clip_model.safetensors"
        result = train_clip(DEMO_TRAIN_CONFIG, device="cpu", checkpoint_path=path)
        (out / "result.pickle").write_bytes(pickle.dumps(dataclasses.replace(result, bundle=None)))

    result = pickle.loads(
        (built_once(tmp_path_factory, "demo_clip", train) / "result.pickle").read_bytes()
    )
    bundle = load_clip(result.config.architecture, result.checkpoint_path, device="cpu")
    return dataclasses.replace(result, bundle=bundle)


@pytest.fixture(scope="session")
def base_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny diffusion base pipeline trained on drawn shapes (32 px), once per test run."""
    from mm_pipelines_tests.models.conftest_diffusion import make_base_pipeline_dir

    return built_once(tmp_path_factory, "base_pipeline", make_base_pipeline_dir)


MM = str(Path(sys.executable).parent / "mm")


def run_mm(*args: str, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([MM, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def demo(demo_clip, base_pipeline_dir):
    """`mm demo` run once in a fresh MM_HOME, shared by every test that looks at its state
    (the modules of scheduling.DEMO_STATE, one worker); (finished process, its environment)."""
    root = outside_pytests_tmp("mm-test-demo-")  # its state includes an embedded Postgres
    home = root / "mm"
    # the demo CLIP and the tiny diffusion base of this test session stand in for the ones
    # `mm demo` would train (their training assets are tested on their own)
    env = {
        **os.environ,
        "MM_HOME": str(home),
        "MM_CLIP_CHECKPOINT": str(demo_clip.checkpoint_path),
        "MM_DIFFUSION_BASE": str(base_pipeline_dir),
    }
    env.pop("DAGSTER_HOME", None)
    env.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri exports it in-process
    for name in (
        "MM_SERVE_URL",
        "MM_API_KEY",
        "MM_TENANT",
        "MM_LANDING",
        "MM_S3_BUCKET",
        "MM_PG_DSN",
    ):
        env.pop(name, None)  # a developer's own deployment must not leak in
    proc = run_mm("demo", env=env, timeout=1500)
    yield proc, env
    run_mm("db", "stop", env=env)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def family_base_dir(base_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """family -> tiny base pipeline directory, trained on first use ("sd": the session's
    `base_pipeline_dir`; "sdxl", "sd3", "flux": its VAE plus the family's own denoiser)."""
    from mm_pipelines_tests.models.conftest_diffusion import make_family_base_dir

    built: dict[str, Path] = {"sd": base_pipeline_dir}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = built_once(
                tmp_path_factory,
                f"base_{family}",
                lambda out: make_family_base_dir(family, base_pipeline_dir, out),
            )
        return built[family]

    return get
