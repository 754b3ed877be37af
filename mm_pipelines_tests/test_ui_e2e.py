"""The Dagster UI end to end: a real `mm dev` (= `dagster dev` on our workspace.yaml) with its
own DAGSTER_HOME and MM_HOME, a materialization submitted through the GraphQL API as the UI
submits it, its metadata read back through GraphQL, and headless Chromium on the asset graph.

The server runs in its own process group (killed at the end, even on failure); the embedded
Postgres its run started is stopped too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from mm_pipelines.pipeline.sample_data import write_sample_batch
from mm_pipelines.storage.landing import MANIFEST, READY_MARKER
from mm_pipelines.storage.postgres import stop_embedded
from mm_pipelines_tests.ports import free_port

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
BATCH = "ui-0001"
OUR_ASSETS = [
    "raw_media",
    "video_frames",
    "transcripts",
    "clip_model",
    "clip_embeddings",
    "audio_embeddings",
    "unified_projector",
    "unified_embeddings",
    "vector_index",
    "lora_base_model",
    "lora_training_set",
    "lora_adapter",
    "generated_images",
    "generation_quality",
    "online_model",
]
STARTUP_TIMEOUT_S = 150  # the code location imports torch/open_clip: slow on a busy 2-core box
RUN_TIMEOUT_S = 420  # the subject pipeline trains a LoRA and generates 32 images


@dataclass
class DagsterDev:
    url: str
    mm_home: Path
    log: Path

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        resp = requests.post(
            f"{self.url}/graphql", json={"query": query, "variables": variables or {}}, timeout=60
        )
        resp.raise_for_status()
        body = resp.json()
        assert "errors" not in body, body["errors"]
        return body["data"]

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def _server_env(mm_home: Path, dagster_home: Path, models: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    # nothing of the developer's own deployment may leak in: embedded defaults under mm_home
    for name in list(env):
        if name.startswith(("MM_", "DAGSTER_", "MLFLOW_")):
            del env[name]
    env.update(MM_HOME=str(mm_home), DAGSTER_HOME=str(dagster_home), PYTHONUNBUFFERED="1")
    env.update(models)  # this session's trained CLIP and diffusion base (see dagster_dev)
    return env


WORKSPACE_QUERY = """
{ workspaceOrError { __typename ... on Workspace { locationEntries {
    name loadStatus
    locationOrLoadError { __typename ... on PythonError { message } }
} } } }
"""


def _wait_until_loaded(server: DagsterDev, proc: subprocess.Popen) -> None:
    """Until the webserver answers and our code location has loaded (or failed to)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"dagster dev exited:\n{server.log_tail()}"
        try:
            if requests.get(f"{server.url}/server_info", timeout=5).ok:
                entries = server.graphql(WORKSPACE_QUERY)["workspaceOrError"]["locationEntries"]
                if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                    errors = [e["locationOrLoadError"] for e in entries]
                    assert all(e["__typename"] == "RepositoryLocation" for e in errors), errors
                    return
        except requests.RequestException:
            pass  # not listening yet
        time.sleep(1)
    raise AssertionError(f"dagster dev not ready in {STARTUP_TIMEOUT_S}s:\n{server.log_tail()}")


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (dagster dev stops its children), then SIGKILL."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:  # the leader is gone; make sure no child lingers
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        return


SENSOR_QUERY = """
query($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) { __typename ... on Sensor { id } }
}
"""

STOP_SENSOR = """
mutation($id: String!) { stopSensor(id: $id) { __typename
  ... on StopSensorMutationResult { instigationState { status } }
  ... on Error { message }
} }
"""


def _stop_sensors(server: DagsterDev) -> None:
    repo, _ = _selectors(server)
    for name in ("landing_sensor", "subjects_sensor", "serving_sensor"):
        selector = {**repo, "sensorName": name}
        sensor = server.graphql(SENSOR_QUERY, {"selector": selector})["sensorOrError"]
        stopped = server.graphql(STOP_SENSOR, {"id": sensor["id"]})["stopSensor"]
        assert stopped["instigationState"]["status"] == "STOPPED", stopped


@pytest.fixture(scope="module")
def dagster_dev(demo_clip, base_pipeline_dir) -> Iterator[DagsterDev]:
    # Not under pytest's tmp root: any other pytest session on the machine resets that to 0700,
    # after which the embedded Postgres's own user can no longer reach its data dir to stop it.
    root = Path(tempfile.mkdtemp(prefix="mm-ui-e2e-"))
    mm_home, dagster_home = root / "mm", root / "dagster_home"
    port = free_port()
    server = DagsterDev(url=f"http://127.0.0.1:{port}", mm_home=mm_home, log=root / "dev.log")
    mm = Path(sys.executable).parent / "mm"
    with open(server.log, "wb") as log:
        proc = subprocess.Popen(
            [str(mm), "dev", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            # the models the test session trained once stand in for the demo's own training
            env=_server_env(
                mm_home,
                dagster_home,
                {
                    "MM_CLIP_CHECKPOINT": str(demo_clip.checkpoint_path),
                    "MM_DIFFUSION_BASE": str(base_pipeline_dir),
                },
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so all of it can be killed
        )
    try:
        _wait_until_loaded(server, proc)
        # the sensors (on by default) would pick the batch and the subject up by themselves;
        # these tests drive the path a user clicks through instead
        _stop_sensors(server)
        write_sample_batch(mm_home / "landing", BATCH)
        yield server
    finally:
        _stop_group(proc)
        # the run started the embedded Postgres under mm_home; it outlives the server by design
        stop_embedded(mm_home / "pgdata")
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- GraphQL

REPOS_QUERY = """
{ repositoriesOrError { ... on RepositoryConnection { nodes {
    name location { name } jobs { name }
} } } }
"""

ADD_PARTITION = """
mutation($repo: RepositorySelector!, $def: String!, $key: String!) {
  addDynamicPartition(repositorySelector: $repo, partitionsDefName: $def, partitionKey: $key) {
    __typename
    ... on AddDynamicPartitionSuccess { partitionKey }
    ... on Error { message }
  }
}
"""

LAUNCH_RUN = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on Error { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""

RUN_STATUS = """
query($runId: ID!) { runOrError(runId: $runId) { __typename ... on Run { status } } }
"""

RUN_ERRORS = """
query($runId: ID!) { logsForRun(runId: $runId) { ... on EventConnection { events {
  __typename ... on MessageEvent { message }
} } } }
"""

MATERIALIZATIONS = """
query($partition: String!) {
  assetOrError(assetKey: {path: ["raw_media"]}) {
    __typename
    ... on Asset { assetMaterializations(partitions: [$partition]) {
      partition runId
      metadataEntries {
        label
        ... on IntMetadataEntry { intValue }
        ... on FloatMetadataEntry { floatValue }
        ... on JsonMetadataEntry { jsonString }
      }
    } }
  }
}
"""


def _selectors(server: DagsterDev) -> tuple[dict[str, str], str]:
    """(repository selector, name of the implicit asset job) of our code location."""
    nodes = server.graphql(REPOS_QUERY)["repositoriesOrError"]["nodes"]
    assert len(nodes) == 1, nodes
    repo = {
        "repositoryName": nodes[0]["name"],
        "repositoryLocationName": nodes[0]["location"]["name"],
    }
    asset_job = next(j["name"] for j in nodes[0]["jobs"] if j["name"].startswith("__ASSET_JOB"))
    return repo, asset_job


def _wait_for_run(server: DagsterDev, run_id: str) -> str:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    status = "UNKNOWN"
    while time.monotonic() < deadline:
        status = server.graphql(RUN_STATUS, {"runId": run_id})["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        time.sleep(2)
    return status


def _expected_counts(batch_dir: Path) -> tuple[int, int]:
    """(files seen, files ok) of the sample batch: every file but the markers; the files in
    broken/ are the ones to quarantine."""
    files = [
        p for p in batch_dir.rglob("*") if p.is_file() and p.name not in (READY_MARKER, MANIFEST)
    ]
    broken = [p for p in files if p.parent.name == "broken"]
    return len(files), len(files) - len(broken)


def test_materialize_raw_media_through_graphql(dagster_dev: DagsterDev) -> None:
    repo, asset_job = _selectors(dagster_dev)
    added = dagster_dev.graphql(ADD_PARTITION, {"repo": repo, "def": "batch", "key": BATCH})
    assert added["addDynamicPartition"]["__typename"] == "AddDynamicPartitionSuccess", added

    params = {
        "selector": {**repo, "jobName": asset_job, "assetSelection": [{"path": ["raw_media"]}]},
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": BATCH}]},
        # one process for the run's steps: each extra process re-imports the code location,
        # which costs ~30 s here; the UI's default (multiprocess) behaves the same otherwise
        "runConfigData": {"execution": {"config": {"in_process": {}}}},
    }
    launched = dagster_dev.graphql(LAUNCH_RUN, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]

    status = _wait_for_run(dagster_dev, run_id)
    if status != "SUCCESS":
        events = dagster_dev.graphql(RUN_ERRORS, {"runId": run_id})["logsForRun"]["events"]
        messages = [e.get("message") for e in events if "Failure" in e["__typename"]]
        pytest.fail(f"run {run_id} ended {status}: {messages}\n{dagster_dev.log_tail()}")

    asset = dagster_dev.graphql(MATERIALIZATIONS, {"partition": BATCH})["assetOrError"]
    (mat,) = [m for m in asset["assetMaterializations"] if m["runId"] == run_id]
    assert mat["partition"] == BATCH
    meta = {e["label"]: e.get("intValue", e.get("floatValue")) for e in mat["metadataEntries"]}
    files_seen, ok = _expected_counts(dagster_dev.mm_home / "landing" / BATCH)
    assert (meta["files_seen"], meta["ok"]) == (files_seen, ok), meta
    assert meta["quarantined"] == files_seen - ok
    assert meta["duplicates"] >= 1  # the sample batch delivers one photo twice


def _launch(
    server: DagsterDev, job: str, partition: str | None = None, assets: list[str] | None = None
) -> str:
    """Launch `job` (optionally a subset of its assets) as the UI's Materialize button does;
    wait for it and fail with its errors unless it succeeds. Returns the run id."""
    repo, _ = _selectors(server)
    params: dict[str, Any] = {
        "selector": {**repo, "jobName": job},
        "runConfigData": {"execution": {"config": {"in_process": {}}}},
    }
    if assets:
        params["selector"]["assetSelection"] = [{"path": [a]} for a in assets]
    if partition:
        params["executionMetadata"] = {"tags": [{"key": "dagster/partition", "value": partition}]}
    launched = server.graphql(LAUNCH_RUN, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    status = _wait_for_run(server, run_id)
    if status != "SUCCESS":
        events = server.graphql(RUN_ERRORS, {"runId": run_id})["logsForRun"]["events"]
        messages = [e.get("message") for e in events if "Failure" in e["__typename"]]
        pytest.fail(f"{job} run {run_id} ended {status}: {messages}\n{server.log_tail()}")
    return run_id


LATEST_METADATA = """
query($path: [String!]!) {
  assetOrError(assetKey: {path: $path}) { ... on Asset { assetMaterializations(limit: 1) {
    runId metadataEntries { label
      ... on IntMetadataEntry { intValue }
      ... on FloatMetadataEntry { floatValue }
      ... on TextMetadataEntry { text }
    }
  } } }
}
"""


def _latest_metadata(server: DagsterDev, asset: str) -> dict[str, Any]:
    (mat,) = server.graphql(LATEST_METADATA, {"path": [asset]})["assetOrError"][
        "assetMaterializations"
    ]
    return {
        e["label"]: e.get("intValue", e.get("floatValue", e.get("text")))
        for e in mat["metadataEntries"]
    }


def test_the_whole_demo_graph_materializes_from_the_ui(dagster_dev: DagsterDev) -> None:
    """What `mm demo` runs, launched job by job through the UI's API: the batch through
    the encoders, the projector, the index, a subject's LoRA to its quality report, and
    the export of the approved model."""
    from mm_pipelines.pipeline import subjects

    repo, _ = _selectors(dagster_dev)
    for name, key in (("batch", BATCH), ("subject", subjects.DEMO_SUBJECT["name"])):
        added = dagster_dev.graphql(ADD_PARTITION, {"repo": repo, "def": name, "key": key})
        assert added["addDynamicPartition"]["__typename"] in (
            "AddDynamicPartitionSuccess",
            "DuplicateDynamicPartitionError",
        ), added
    encoders = ["raw_media", "video_frames", "transcripts", "clip_embeddings", "audio_embeddings"]
    _launch(dagster_dev, "batch_pipeline", BATCH, encoders)
    _launch(dagster_dev, "train_projector")
    _launch(dagster_dev, "batch_pipeline", BATCH, ["unified_embeddings", "vector_index"])
    assert _latest_metadata(dagster_dev, "vector_index")["vectors_written"] > 50

    # the demo subject, shortened: what this test checks is the path through the UI (the
    # LoRA's effect is measured in test_dagster_generate.py and by the demo test)
    quick = {
        **subjects.DEMO_SUBJECT,
        "seeds": list(range(8)),
        "lora": {**subjects.DEMO_SUBJECT["lora"], "steps": 40, "validation_every": 0},
        "gates": {"max_fid_ratio_to_base": None},
    }
    subjects.ensure_subject(quick, dagster_dev.mm_home / "subjects.yaml")
    _launch(dagster_dev, "subject_pipeline", subjects.DEMO_SUBJECT["name"])
    quality = _latest_metadata(dagster_dev, "generation_quality")
    assert quality["adapter_n_fake"] == 8 and quality["base_fid"] > 0, quality
    _launch(dagster_dev, "export_online_model")
    online = _latest_metadata(dagster_dev, "online_model")
    assert online["lora"] == "mm-lora-orange-backdrop/1", online
    current = dagster_dev.mm_home / "serving" / "CURRENT"
    assert current.read_text().strip() == online["bundle_version"]


# ---------------------------------------------------------------- browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ASSET_NODES = "{ assetNodes { assetKey { path } groupName } }"


def _dom_naming(
    keys: list[str], profile: Path, url: str, attempts: int = 3, height: int = 1000
) -> str:
    """The DOM Chromium builds for `url`, retried with a longer virtual-time budget while
    it does not yet name every key: the client-rendered page can outlast one budget on a
    busy 2-core machine (seen once in CI: an empty assets list)."""
    dom = ""
    for attempt in range(attempts):
        budget = 15000 * 2**attempt
        dom = _chromium(
            ["--dump-dom", f"--virtual-time-budget={budget}"],
            profile.with_name(f"{profile.name}-{attempt}"),
            url,
            height,
        ).stdout
        if all(key in dom for key in keys):
            break
    return dom


def _chromium(
    args: list[str], profile: Path, url: str, height: int = 1000
) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--window-size=1600,{height}",
        *args,
        url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium package is missing")
def test_asset_graph_in_headless_chromium(dagster_dev: DagsterDev, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "asset_graph.png"
    shot.unlink(missing_ok=True)
    # what "Skip" on the first-visit community dialog does; it would cover the graph otherwise
    assert dagster_dev.graphql("mutation { setNuxSeen }")["setNuxSeen"] is True
    # the `embed` group's lineage: the encoders, projector, index and their upstream assets
    repo, _ = _selectors(dagster_dev)
    location = quote(repo["repositoryLocationName"], safe=":")
    graph_url = f"{dagster_dev.url}/locations/{location}/asset-groups/embed/lineage"
    done = _chromium(
        [f"--screenshot={shot}", "--virtual-time-budget=15000"], tmp_path / "profile", graph_url
    )
    assert shot.is_file(), done.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000, len(png)
    print(f"\nasset graph screenshot: {shot}")
    drawn = ["raw_media", "clip_embeddings", "unified_projector", "vector_index"]
    graph_dom = _dom_naming(drawn, tmp_path / "profile3", graph_url)
    assert all(key in graph_dom for key in drawn), [k for k in drawn if k not in graph_dom]

    # the generative group: subject LoRA, generations, quality (and the serving export)
    shot = ARTIFACTS / "asset_graph_generative.png"
    shot.unlink(missing_ok=True)
    generative_url = f"{dagster_dev.url}/locations/{location}/asset-groups/generative/lineage"
    _chromium(
        [f"--screenshot={shot}", "--virtual-time-budget=15000"],
        tmp_path / "profile4",
        generative_url,
    )
    assert shot.is_file() and len(shot.read_bytes()) > 20_000
    drawn = ["lora_training_set", "lora_adapter", "generated_images", "generation_quality"]
    graph_dom = _dom_naming(drawn, tmp_path / "profile5", generative_url)
    assert all(key in graph_dom for key in drawn), [k for k in drawn if k not in graph_dom]

    # The UI renders on the client: the DOM Chromium built (after running the app's JS and its
    # GraphQL calls) must name our assets, and the page's own GraphQL must list them.
    # a window tall enough for every row: the list renders only the rows in view
    dom = _dom_naming(OUR_ASSETS, tmp_path / "profile2", f"{dagster_dev.url}/assets", height=3000)
    assert "<div" in dom, dom[:500]
    shown = [key for key in OUR_ASSETS if key in dom]
    assert shown == OUR_ASSETS, f"missing in the assets page: {set(OUR_ASSETS) - set(shown)}"
    nodes = dagster_dev.graphql(ASSET_NODES)["assetNodes"]
    groups = {"/".join(n["assetKey"]["path"]): n["groupName"] for n in nodes}
    assert set(OUR_ASSETS) <= set(groups)
    assert {"ingest", "understand", "embed", "generative", "serve"} <= set(groups.values())
