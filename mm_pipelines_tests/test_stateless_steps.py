"""The proof that steps are stateless: the demo graph with every step in its own process and
its own empty disk (deleted when the step ends), sharing only the catalog Postgres (by DSN),
an S3-protocol server (moto) behind the real dagster-aws resource, a real `mlflow server`
over HTTP serving its artifacts, and the Dagster instance (dagster-postgres on the same
Postgres). How a step process stands in for a pod: see mm_pipelines_tests/stateless.py.

One run of the graph, then what it must show:
- every step succeeds (a step that read another step's disk would fail: that disk is gone);
- a LoRA step killed after its first checkpoint reached S3, re-run in a new process on a new
  empty disk, resumes from that checkpoint (steps continue, one continuous loss history);
- `mm serve`, started with only the shared services, answers the demo queries as a search in
  one process over the same catalog and models does;
- the MLflow registry and the model store agree (store URI and digest on the version);
- a step whose MLflow server is unreachable fails at once naming it (MLflow's shortened
  retries apply in step processes too);
- bad input: one byte changed in a stored artifact makes the step that reads it fail, naming
  the artifact and the expected hash, with nothing written anywhere.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from mm_pipelines.cli_commands.demo import DEMO_QUERIES as QUERIES
from mm_pipelines.pipeline import model_store as ms
from mm_pipelines.pipeline import registry
from mm_pipelines_tests.conftest import new_database
from mm_pipelines_tests.ports import free_port
from mm_pipelines_tests.stateless import (
    BASE_MODEL,
    BATCH,
    BIN,
    CLIP_STEPS,
    LORA_CHECKPOINT_EVERY,
    LORA_STEPS,
    SUBJECT,
    Outcome,
    Shared,
    Step,
    StepRunner,
    materialization,
    shared_services,
    stop_group,
    upload_sample_batch,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(4000),
]  # minutes normally; hours on a crowded box

PARALLEL = 2  # step processes at once (Dagster starts step pods as their inputs are ready)


class KillAtFirstCheckpoint:
    """Watches S3 for the LoRA step's first checkpoint and SIGKILLs the step's process group
    (a pod lost mid-training); then notes which checkpoint is current in the store."""

    def __init__(self) -> None:
        self.checkpoint: tuple[str, int] | None = None  # (store name, step)
        self._client: Any = None

    def __call__(self, shared: Shared, proc: subprocess.Popen) -> bool:
        if self._client is None:
            self._client = shared.s3()
        prefix = f"models/{ms.LORA_CHECKPOINT}/{SUBJECT}/"
        listed = self._client.list_objects_v2(Bucket=shared.bucket, Prefix=prefix)
        pointers = [o["Key"] for o in listed.get("Contents", []) if o["Key"].endswith("/CURRENT")]
        if not pointers or proc.poll() is not None:
            return False
        stop_group(proc, signal.SIGKILL)
        name = pointers[0][len(f"models/{ms.LORA_CHECKPOINT}/") : -len("/CURRENT")]
        with tempfile.TemporaryDirectory() as cache:
            step = model_store(shared, cache).get(ms.LORA_CHECKPOINT, name).metadata["step"]
        self.checkpoint = (name, int(step))
        return True


def model_store(shared: Shared, cache: str | Path) -> ms.ModelStore:
    """The model store as the test reads it (its own cache, never a step's)."""
    return ms.ModelStore(ms.S3Backend(shared.s3(), shared.bucket, "models"), cache)


def demo_graph(killer: KillAtFirstCheckpoint, mlflow_down: str) -> list[Step]:
    """The demo graph, one step per asset, in the order of preference when several are ready."""
    return [
        Step("raw_media", "raw_media", BATCH),
        # MLflow unreachable: the step fails fast, naming the tracking URI
        Step(
            "clip_model_mlflow_down",
            "clip_model",
            config={"steps": CLIP_STEPS},
            expect="failure",
            env={"MLFLOW_TRACKING_URI": mlflow_down},
        ),
        Step("clip_model", "clip_model", config={"steps": CLIP_STEPS}, needs_mlflow=True),
        Step(
            "lora_base_model",
            "lora_base_model",
            config=BASE_MODEL,
            after=("raw_media",),
            needs_mlflow=True,
        ),
        Step("transcripts", "transcripts", BATCH, after=("raw_media",)),
        Step("video_frames", "video_frames", BATCH, after=("raw_media",)),
        Step("lora_training_set", "lora_training_set", SUBJECT, after=("lora_base_model",)),
        Step(
            "lora_adapter_killed",
            "lora_adapter",
            SUBJECT,
            after=("lora_training_set",),
            needs_mlflow=True,
            expect="killed",
            watch=killer,
        ),
        Step(
            "lora_adapter",
            "lora_adapter",
            SUBJECT,
            after=("lora_adapter_killed",),
            needs_mlflow=True,
        ),
        Step("audio_embeddings", "audio_embeddings", BATCH, after=("raw_media",)),
        Step(
            "clip_embeddings",
            "clip_embeddings",
            BATCH,
            after=("video_frames", "transcripts", "clip_model"),
        ),
        Step("generated_images", "generated_images", SUBJECT, after=("lora_adapter",)),
        Step(
            "unified_projector",
            "unified_projector",
            after=("clip_embeddings", "audio_embeddings"),
            needs_mlflow=True,
        ),
        Step(
            "generation_quality",
            "generation_quality",
            SUBJECT,
            after=("generated_images", "clip_model"),
            needs_mlflow=True,
        ),
        Step("unified_embeddings", "unified_embeddings", BATCH, after=("unified_projector",)),
        Step("vector_index", "vector_index", BATCH, after=("unified_embeddings",)),
        Step(
            "online_model",
            "online_model",
            after=("generation_quality", "unified_projector"),
            needs_mlflow=True,
        ),
    ]


@dataclass
class GraphRun:
    shared: Shared
    outcomes: dict[str, Outcome]
    killer: KillAtFirstCheckpoint
    seconds: float


@pytest.fixture(scope="module")
def graph(
    pg_server_dsn: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GraphRun]:
    """The whole graph, run once for the module's tests."""
    # not under pytest's tmp root: the steps' files stay private to this test
    root = Path(tempfile.mkdtemp(prefix="mm-stateless-"))
    try:
        with shared_services(root, pg_server_dsn, s3_endpoint, new_database) as shared:
            started = time.monotonic()
            upload_sample_batch(shared, root / "scratch")
            # what the landing and subjects sensors do
            shared.instance.add_dynamic_partitions("batch", [BATCH])
            shared.instance.add_dynamic_partitions("subject", [SUBJECT])
            killer = KillAtFirstCheckpoint()
            logs = tmp_path_factory.mktemp("stateless-step-logs")
            runner = StepRunner(shared, logs, parallel=PARALLEL)
            outcomes = runner.run(demo_graph(killer, f"http://127.0.0.1:{free_port()}"))
            killed = shared.instance.get_run_by_id(outcomes["lora_adapter_killed"].run_id)
            shared.instance.report_run_failed(killed)  # what run monitoring does for a lost pod
            yield GraphRun(shared, outcomes, killer, time.monotonic() - started)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_every_step_succeeds_in_its_own_process_on_its_own_disk(graph: GraphRun) -> None:
    shared, outcomes = graph.shared, graph.outcomes
    for name, outcome in outcomes.items():
        if outcome.step.expect == "success":
            run = shared.instance.get_run_by_id(outcome.run_id)
            assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS, name
    assert list(shared.steps_root.iterdir()) == []  # every step's disk is gone
    assert materialization(shared.instance, "vector_index", BATCH)["vectors_written"] > 50
    summary = {n: round(o.seconds, 1) for n, o in outcomes.items()}
    print(f"\ngraph {graph.seconds:.0f} s; step seconds: {json.dumps(summary)}")


def test_a_killed_lora_step_resumes_from_its_checkpoint_on_a_new_disk(graph: GraphRun) -> None:
    shared, outcomes = graph.shared, graph.outcomes
    assert graph.killer.checkpoint is not None, "the LoRA step was never killed"
    _name, step = graph.killer.checkpoint
    assert step % LORA_CHECKPOINT_EVERY == 0 and 0 < step < LORA_STEPS, step
    meta = materialization(shared.instance, "lora_adapter", SUBJECT)
    assert meta["run_id"] == outcomes["lora_adapter"].run_id
    assert meta["resumed_from_step"] == step
    assert meta["steps_done"] == LORA_STEPS

    client = _mlflow(shared)
    version = client.get_model_version(registry.lora_model_name(SUBJECT), "1")
    resumed = {m.step: m.value for m in client.get_metric_history(version.run_id, "loss")}
    assert sorted(resumed) == list(range(1, LORA_STEPS + 1))  # one curve, no gap, no repeat
    (killed,) = client.search_runs(
        [client.get_run(version.run_id).info.experiment_id],
        filter_string=f"tags.`dagster.run_id` = '{outcomes['lora_adapter_killed'].run_id}'",
    )
    assert killed.info.status == "RUNNING"  # killed: it never got to close its run
    # what the killed process logged up to its checkpoint is what the resumed run continues
    before = {m.step: m.value for m in client.get_metric_history(killed.info.run_id, "loss")}
    assert set(range(1, step + 1)) <= set(before)
    assert all(abs(resumed[s] - before[s]) < 1e-6 for s in range(1, step + 1))


def test_registered_versions_name_the_artifact_they_were_made_from(
    graph: GraphRun, tmp_path: Path
) -> None:
    shared = graph.shared
    client = _mlflow(shared)
    store = model_store(shared, tmp_path)
    for name, kind, store_name in (
        (registry.CLIP_MODEL, ms.CLIP, "demo"),
        (registry.PROJECTOR_MODEL, ms.PROJECTOR, "unified"),
        (registry.DIFFUSION_BASE_MODEL, ms.DIFFUSION_BASE, "demo"),
        (registry.lora_model_name(SUBJECT), ms.ADAPTER, SUBJECT),
    ):
        tags = client.get_model_version(name, "1").tags
        artifact = store.get(kind, store_name, tags["mm.store_version"])
        assert tags["mm.store_uri"] == artifact.uri
        assert artifact.uri.startswith(f"s3://{shared.bucket}/models/{kind}/")
        assert tags["mm.store_digest"] == artifact.digest


def test_mm_serve_with_only_the_shared_services_answers_as_one_process_does(
    graph: GraphRun, tmp_path: Path
) -> None:
    shared = graph.shared
    online = materialization(shared.instance, "online_model")
    asks = [{"query": q, "tenant": "acme", "k": 10} for q in QUERIES]
    asks.append({**asks[0], "modalities": ["image"]})  # the demo's "top image"
    served = _served_search(shared, tmp_path / "serve", asks)
    assert {a["bundle_version"] for a in served} == {online["bundle_version"]}
    reference = _search_in_one_process(shared, tmp_path / "reference", asks)
    for ask, got, want in zip(asks, served, reference, strict=True):
        hits = got["hits"]
        assert [h["media_hash"] for h in hits] == [h["media_hash"] for h in want], ask
        for g, w in zip(hits, want, strict=True):
            assert abs(g["score"] - w["score"]) < 1e-3, (ask, g, w)
    top_image = next(h for h in served[-1]["hits"] if h["kind"] == "image")
    # the same bytes landed twice under two names: the first seen is either
    assert top_image["name"] in {"red_circle_on_blue.png", "copy_of_first_photo.png"}, top_image


def test_a_corrupted_artifact_fails_the_step_that_reads_it_and_nothing_is_written(
    graph: GraphRun, tmp_path: Path
) -> None:
    shared = graph.shared
    store = model_store(shared, tmp_path)
    projector = store.get(ms.PROJECTOR, "unified")
    rel = max(projector.manifest["files"], key=lambda r: projector.manifest["files"][r]["size"])
    expected = projector.manifest["files"][rel]["sha256"]
    key = f"models/{ms.PROJECTOR}/unified/{projector.version}/{rel}"
    client = shared.s3()
    data = bytearray(client.get_object(Bucket=shared.bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    client.put_object(Bucket=shared.bucket, Key=key, Body=bytes(data))
    before = shared.s3_listing()
    last = materialization(shared.instance, "unified_embeddings", BATCH)["run_id"]

    runner = StepRunner(shared, tmp_path / "logs")
    (outcome,) = runner.run(
        [Step("unified_embeddings_corrupt", "unified_embeddings", BATCH, expect="failure")]
    ).values()
    failures = shared.instance.all_logs(outcome.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    message = str(failures[0].dagster_event.step_failure_data.error)
    assert "ArtifactIntegrityError" in message
    assert f"{projector.uri}: {rel}" in message and f"expected {expected}" in message
    assert shared.s3_listing() == before  # no object written, changed or removed
    assert materialization(shared.instance, "unified_embeddings", BATCH)["run_id"] == last


def test_a_step_with_mlflow_unreachable_fails_fast_naming_the_tracking_uri(
    graph: GraphRun,
) -> None:
    shared, outcome = graph.shared, graph.outcomes["clip_model_mlflow_down"]
    uri = outcome.step.env["MLFLOW_TRACKING_URI"]
    (start,) = shared.instance.all_logs(outcome.run_id, of_type=dg.DagsterEventType.STEP_START)
    (failure,) = shared.instance.all_logs(outcome.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    message = str(failure.dagster_event.step_failure_data.error)
    assert f"the MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is unreachable" in message
    # the step process runs MLflow with one retry (settings.MLFLOW_HTTP_DEFAULTS); MLflow's own
    # default is 7 retries with exponential backoff, over 4 minutes of waiting
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES=1, MLFLOW_HTTP_REQUEST_TIMEOUT=10" in message
    assert failure.timestamp - start.timestamp < 180  # imports included


# --------------------------------------------------------------------------- helpers


def _mlflow(shared: Shared) -> Any:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=shared.mlflow.url, registry_uri=shared.mlflow.url)


def _served_search(shared: Shared, disk: Path, asks: list[dict[str, Any]]) -> list[Any]:
    """`mm serve` on a new empty disk, configured by the shared environment only, asked
    with an admin API key from the shared catalog."""
    from mm_pipelines.storage import api_keys
    from mm_pipelines.storage.postgres import connect

    with connect(shared.catalog_dsn) as conn:
        _, key = api_keys.create_key(conn, None, admin=True, name="stateless proof")
    for sub in ("mm", "home", "tmp"):
        (disk / sub).mkdir(parents=True)
    env = {
        **shared.env(),
        "MM_HOME": str(disk / "mm"),
        "HOME": str(disk / "home"),
        "TMPDIR": str(disk / "tmp"),
    }
    cmd = [str(BIN / "mm"), "serve", "--store", f"s3://{shared.bucket}/serving", "--port", "0"]
    cmd += ["--no-audio", "--no-diffusion", "--log-level", "warning"]
    server = subprocess.Popen(
        cmd, cwd=disk, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        first = server.stdout.readline() if server.stdout else ""
        assert "listening on " in first, first
        url = first.split("listening on ", 1)[1].split()[0]
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        answers = []
        for ask in asks:
            request = urllib.request.Request(
                f"{url}/v1/search", data=json.dumps(ask).encode(), headers=headers
            )
            with urllib.request.urlopen(request, timeout=300) as response:
                answers.append(json.loads(response.read()))
        return answers
    finally:
        stop_group(server)


def _search_in_one_process(shared: Shared, cache: Path, asks: list[dict[str, Any]]) -> list[Any]:
    """The same searches as one process makes them (`mm search`'s ranked list): the
    training-side CLIP and projector from the model store, the catalog's index."""
    from mm_pipelines.pipeline.search import QueryModels, search
    from mm_pipelines.storage.postgres import connect

    store = model_store(shared, cache)
    clip = store.get(ms.CLIP, "demo")
    projector = store.get(ms.PROJECTOR, "unified")
    models = QueryModels.load(
        "mm-tiny-clip", str(clip.path / clip.metadata["weights"]), projector.path
    )
    with connect(shared.catalog_dsn) as conn:
        return [
            search(
                conn, models, a["query"], a["k"], a["tenant"], modalities=a.get("modalities")
            ).hits
            for a in asks
        ]
