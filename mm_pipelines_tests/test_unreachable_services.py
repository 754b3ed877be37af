"""A step facing an unreachable S3 endpoint or MLflow server fails within seconds with an
error that names what it could not reach, instead of minutes of hidden retries.

The unreachable endpoint is a closed port on 127.0.0.1; the hanging one a socket that accepts
connections and never answers (where botocore's defaults would wait 60 s per attempt, six
times over)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import mlflow  # noqa: F401 - imported here, not inside the timed steps
import pytest

from mm_pipelines.defs.embed.assets import clip_model, unified_embeddings
from mm_pipelines.defs.resources import build_resources
from mm_pipelines.pipeline import model_store as ms
from mm_pipelines_tests.ports import free_port

BATCH = "b1"


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """Accepts TCP connections and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(timeout=5)
    for conn in held:
        conn.close()
    server.close()


@pytest.fixture
def s3_deployment(mm_home: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A deployment configured for S3 (bucket, credentials); the endpoint is the test's."""
    monkeypatch.setenv("MM_S3_BUCKET", "mm")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return monkeypatch


def _materialize(asset: dg.AssetsDefinition, resources: dict, partition: str | None = None):
    instance = dg.DagsterInstance.ephemeral()
    if partition:
        instance.add_dynamic_partitions("batch", [partition])
    result = dg.materialize(
        [asset],
        partition_key=partition,
        resources=resources,
        instance=instance,
        raise_on_error=False,
    )
    events = {e.event_type_value: e for e in result.all_events}
    failure = events.get("STEP_FAILURE")
    message = str(failure.step_failure_data.error) if failure else ""
    # how long the step itself took to give up, from Dagster's own event times
    started = instance.all_logs(result.run_id, of_type=dg.DagsterEventType.STEP_START)[0].timestamp
    seconds = (
        instance.all_logs(result.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)[0].timestamp
        - started
        if failure
        else float("nan")
    )
    return result, message, seconds


def test_a_step_facing_a_closed_s3_port_fails_at_once_naming_the_endpoint(
    s3_deployment: pytest.MonkeyPatch,
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    s3_deployment.setenv("MM_S3_ENDPOINT_URL", endpoint)
    # unified_embeddings reads the projector from the model store before anything else
    result, message, seconds = _materialize(unified_embeddings, build_resources(), BATCH)
    assert not result.success
    assert "StoreUnavailable" in message and f"S3 endpoint {endpoint} is unreachable" in message
    assert "s3://mm/models/projector/unified/CURRENT" in message
    assert seconds < 30, seconds


def test_every_s3_client_we_build_gives_up_on_a_silent_endpoint_within_its_timeouts(
    s3_deployment: pytest.MonkeyPatch, silent_endpoint: str
) -> None:
    from mm_pipelines.serving.store import open_store
    from mm_pipelines.storage import s3

    s3_deployment.setenv("MM_S3_ENDPOINT_URL", silent_endpoint)
    s3_deployment.setenv("MM_S3_CONNECT_TIMEOUT", "1")
    s3_deployment.setenv("MM_S3_READ_TIMEOUT", "1")
    s3_deployment.setenv("MM_S3_MAX_ATTEMPTS", "2")
    resources = build_resources()
    store = resources["models"].get_store()
    clients = {
        "storage.s3.client": s3.client(),
        "model store (S3Resource)": store.backend.client,
        "media store (S3Resource)": resources["media_store"].get_store().client,
        "serving store": open_store("s3://mm/serving").client,
    }
    for name, client in clients.items():
        config = client.meta.config
        assert (config.connect_timeout, config.read_timeout) == (1, 1), name
        assert config.retries["total_max_attempts"] == 2, name

    started = time.monotonic()
    with pytest.raises(ms.StoreUnavailable, match="unreachable"):
        store.get(ms.CLIP, "demo")
    assert time.monotonic() - started < 15  # 2 attempts x 1 s, not 6 x 60 s


def test_a_step_facing_an_unreachable_mlflow_fails_within_seconds_naming_the_tracking_uri(
    mm_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(name, "")  # restored after the test, whatever the step sets
        monkeypatch.delenv(name)  # MLflow's own default: 7 retries with backoff (minutes)
    # clip_model opens its MLflow run before it trains
    result, message, seconds = _materialize(clip_model, build_resources())
    assert not result.success
    assert f"the MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is unreachable" in message
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES=1" in message
    assert seconds < 30, seconds  # MLflow's default retries wait over 4 minutes
