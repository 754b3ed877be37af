"""The generative group as Dagster runs it: a subject from catalog selection to a gated,
registered adapter, with generations catalogued and every MLflow run closed.

Shared, session-scoped: the tiny base pipeline (`base_pipeline_dir`) and the demo CLIP
(`demo_clip`). The subject run itself (~1 min) happens once per module."""

from __future__ import annotations

import base64
import copy
import io
import os
import re
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import pandas as pd
import psutil
import psycopg
import pytest
import requests
import yaml
from dagster_aws.s3 import S3Resource
from PIL import Image

from mm_pipelines.defs.generative import assets as gen_assets
from mm_pipelines.defs.generative import checks as gen_checks
from mm_pipelines.defs.generative.jobs import subject_pipeline
from mm_pipelines.defs.generative.sensors import subjects_sensor
from mm_pipelines.defs.ingest.assets import raw_media
from mm_pipelines.defs.partitions import batch_partitions, subject_partitions
from mm_pipelines.defs.resources import (
    CatalogResource,
    ComputeResource,
    LandingResource,
    MediaStoreResource,
    MLflowResource,
    ModelsResource,
)
from mm_pipelines.models.diffusion.generate import generate_images
from mm_pipelines.models.diffusion.lora import load_adapter
from mm_pipelines.models.diffusion.pipeline import load_pipeline
from mm_pipelines.pipeline import lora, registry, review, subjects
from mm_pipelines.pipeline.sample_data import write_sample_batch
from mm_pipelines_tests.browser import (
    CHROMIUM,
    chromium,
    start_mm_mlflow,
    stop_group,
    wait_healthy,
)
from mm_pipelines_tests.models.conftest_diffusion import torch_threads
from mm_pipelines_tests.ports import free_port

SUBJECT = subjects.DEMO_SUBJECT["name"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHECKS = [gen_checks.enough_images, gen_checks.quality_gates]
ASSETS = [
    gen_assets.lora_base_model,
    gen_assets.lora_training_set,
    gen_assets.lora_adapter,
    gen_assets.generated_images,
    gen_assets.generation_quality,
]


class Env:
    def __init__(self, root: Path, dsn: str, clip: Path, base: Path):
        self.root, self.dsn = root, dsn
        self.subjects_file = root / "subjects.yaml"
        s3 = S3Resource()
        self.models = ModelsResource(
            models_dir=str(root / "models"),
            clip_checkpoint=str(clip),
            diffusion_base=str(base),
        )
        self.tracking = MLflowResource(
            tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
            artifact_root=(root / "mlartifacts").as_uri(),
        )
        self.resources = {
            "catalog_db": CatalogResource(dsn=dsn),
            "landing": LandingResource(uri=str(root / "landing"), s3=s3),
            "media_store": MediaStoreResource(local_dir=str(root / "media"), s3=s3),
            "compute": ComputeResource(device="cpu", io_workers=2),
            "models": self.models,
            "mlflow_tracking": self.tracking,
        }
        self.defs = dg.Definitions(
            assets=[raw_media, *ASSETS],
            asset_checks=CHECKS,
            jobs=[subject_pipeline],
            resources=self.resources,
        )

    def declare(self, *raw: dict) -> None:
        self.subjects_file.write_text(yaml.safe_dump({"subjects": list(raw)}))

    def run(self, instance, subject: str, assets: list[str] | None = None):
        if not instance.has_dynamic_partition(subject_partitions.name, subject):
            instance.add_dynamic_partitions(subject_partitions.name, [subject])
        return self.defs.resolve_job_def("subject_pipeline").execute_in_process(
            partition_key=subject,
            instance=instance,
            raise_on_error=False,
            asset_selection=[dg.AssetKey(a) for a in assets] if assets else None,
        )

    def mlflow(self) -> mlflow.MlflowClient:
        return mlflow.MlflowClient(self.tracking.tracking_uri)


def checks(result) -> dict[str, bool]:
    return {
        e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data.passed
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def meta(result, asset: str) -> dict:
    (mat,) = result.asset_materializations_for_node(asset)
    return {k: v.value for k, v in mat.metadata.items()}


@pytest.fixture(scope="module")
def env(tmp_path_factory, module_pg_dsn, demo_clip, base_pipeline_dir):
    root = tmp_path_factory.mktemp("generate")
    mp = pytest.MonkeyPatch()
    e = Env(root, module_pg_dsn, demo_clip.checkpoint_path, base_pipeline_dir)
    mp.setenv("MM_SUBJECTS", str(e.subjects_file))
    # run links point where this module's `mm mlflow` listens (test_quality_review_*)
    e.mlflow_url = f"http://127.0.0.1:{free_port()}"
    mp.setenv("MM_MLFLOW_UI", e.mlflow_url)
    write_sample_batch(root / "landing", "b1")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(batch_partitions.name, ["b1"])
        ingest = dg.materialize(
            [raw_media], partition_key="b1", instance=instance, resources=e.resources
        )
        assert ingest.success
        e.instance = instance
        with torch_threads(1):
            yield e
    mp.undo()


@pytest.fixture(scope="module")
def mlflow_process(env):
    """`mm mlflow` on this module's tracking store, started before the subject runs so its
    start-up overlaps the training; `mlflow_ui` waits until it answers."""
    env.tracking._client_setup()  # the store exists before the server opens it
    server_env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": env.tracking.tracking_uri,
        "MM_MLFLOW_ARTIFACTS": env.tracking.artifact_root,
        "MM_MLFLOW_UI": env.mlflow_url,
        "MM_HOME": str(env.root),
    }
    env.mlflow_log = env.root / "mlflow-server.log"
    proc = start_mm_mlflow(server_env, env.mlflow_log)
    yield proc
    stop_group(proc)


@pytest.fixture(scope="module")
def subject_run(env, mlflow_process):
    env.declare(subjects.DEMO_SUBJECT)
    return env.run(env.instance, SUBJECT)


def test_a_subject_goes_from_selection_to_a_passing_quality_report(subject_run):
    assert subject_run.success
    assert checks(subject_run) == {"enough_images": True, "quality_gates": True}
    training = meta(subject_run, "lora_training_set")
    assert training["images"] == 5  # the sample batch's five shots on the orange backdrop
    quality = meta(subject_run, "generation_quality")
    # the adapter moves generations towards the subject's images (same prompts and seeds)
    assert quality["adapter_fid"] < 0.9 * quality["base_fid"], quality
    assert quality["adapter_kid_mean"] < quality["base_kid_mean"], quality
    assert quality["adapter_n_real"] == 5 and quality["adapter_n_fake"] == 16


def test_the_passing_version_is_registered_and_marked_candidate(env, subject_run):
    client = env.mlflow()
    name = registry.lora_model_name(SUBJECT)
    (version,) = client.search_model_versions(f"name = '{name}'")
    assert client.get_model_version_by_alias(name, "candidate").version == version.version
    assert version.tags[registry.GATE_TAG] == "passed"
    adapter = meta(subject_run, "lora_adapter")
    assert version.tags["adapter_version"] == adapter["adapter_version"]
    assert client.list_artifacts(version.run_id, "adapter")


def test_generations_are_catalogued_and_reproducible_from_their_lineage(env, subject_run):
    adapter_version = meta(subject_run, "lora_adapter")["adapter_version"]
    with psycopg.connect(env.dsn) as conn:
        rows = conn.execute(
            "SELECT g.content_hash, g.prompt, g.seed, g.params, g.base_model, o.storage_uri "
            "FROM generated_media g JOIN media_objects o USING (content_hash) "
            "WHERE g.subject = %s AND g.adapter_version = %s ORDER BY g.seed",
            (SUBJECT, adapter_version),
        ).fetchall()
    assert [r[2] for r in rows] == list(range(16))
    content_hash, prompt, seed, params, _, uri = rows[3]
    stored = Image.open(io.BytesIO(Path(uri.removeprefix("file://")).read_bytes()))
    # regenerate from the recorded lineage alone: base model + adapter + prompt + seed
    record = lora.adapter_record(env.models.services(), SUBJECT)
    pipe = load_adapter(load_pipeline(record.base_model_dir, device="cpu"), record.adapter_dir)
    (again,) = generate_images(
        pipe,
        [prompt],
        [seed],
        num_inference_steps=params["num_inference_steps"],
        guidance_scale=params["guidance_scale"],
        scheduler=params["scheduler"],
    )
    diff = np.abs(np.asarray(again.image, np.int16) - np.asarray(stored, np.int16))
    assert diff.max() <= 1


def test_every_mlflow_run_of_the_subject_is_closed_finished(env, subject_run):
    runs = env.mlflow().search_runs(
        experiment_ids=[env.tracking._client_setup()], filter_string=f"tags.subject = '{SUBJECT}'"
    )
    assert {r.data.tags["dagster.asset_key"] for r in runs} >= {
        "lora_adapter",
        "generation_quality",
    }
    assert {r.info.status for r in runs} == {"FINISHED"}
    adapter_run = next(r for r in runs if r.data.tags["dagster.asset_key"] == "lora_adapter")
    assert "quality_adapter_fid" in adapter_run.data.metrics  # quality lands on the adapter run
    history = env.mlflow().get_metric_history(adapter_run.info.run_id, "loss")
    assert len(history) == int(adapter_run.data.params["steps"])


def test_gates_set_to_fail_block_the_version_and_take_its_candidate_alias_away(env, subject_run):
    strict = copy.deepcopy(subjects.DEMO_SUBJECT)
    strict["gates"] = {"max_fid": 1e-6, "max_fid_ratio_to_base": None}
    env.declare(strict)
    try:
        result = env.run(env.instance, SUBJECT, ["generation_quality"])
    finally:
        env.declare(subjects.DEMO_SUBJECT)
    assert checks(result) == {"quality_gates": False}
    client = env.mlflow()
    name = registry.lora_model_name(SUBJECT)
    (version,) = client.search_model_versions(f"name = '{name}'")
    assert version.tags[registry.GATE_TAG] == "failed"
    assert "fid" in version.tags["mm.gate_failures"]
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(name, "candidate")
    # the same adapter passes again under the declared gates: the check is what decides
    again = env.run(env.instance, SUBJECT, ["generation_quality"])
    assert checks(again) == {"quality_gates": True}
    assert client.get_model_version_by_alias(name, "candidate").version == version.version


def test_too_few_images_stop_the_subject_before_training(env):
    few = {**copy.deepcopy(subjects.DEMO_SUBJECT), "name": "too-few", "min_images": 50}
    env.declare(subjects.DEMO_SUBJECT, few)
    result = env.run(env.instance, "too-few")
    assert checks(result) == {"enough_images": False}
    assert not result.asset_materializations_for_node("lora_adapter")
    assert not env.mlflow().search_model_versions("name = 'mm-lora-too-few'")


def test_a_training_error_fails_the_step_and_closes_its_mlflow_run_failed(env):
    broken = copy.deepcopy(subjects.DEMO_SUBJECT)
    broken["name"] = "broken"
    broken["lora"]["target_modules"] = ["no_such_layer"]
    env.declare(subjects.DEMO_SUBJECT, broken)
    result = env.run(env.instance, "broken", ["lora_training_set", "lora_adapter"])
    assert not result.success
    runs = env.mlflow().search_runs(
        experiment_ids=[env.tracking._client_setup()], filter_string="tags.subject = 'broken'"
    )
    assert [r.info.status for r in runs] == ["FAILED"] * len(runs) and runs


def test_subjects_sensor_adds_new_and_changed_subjects_once(tmp_path, monkeypatch):
    path = tmp_path / "subjects.yaml"
    monkeypatch.setenv("MM_SUBJECTS", str(path))
    with dg.instance_for_test() as instance:

        def tick(cursor):
            with dg.build_sensor_context(instance=instance, cursor=cursor) as ctx:
                return subjects_sensor(ctx)

        assert isinstance(tick(None), dg.SkipReason)  # no file: no subjects
        subjects.ensure_subject(subjects.DEMO_SUBJECT, path)
        first = tick(None)
        assert [r.partition_key for r in first.run_requests] == [SUBJECT]
        assert first.dynamic_partitions_requests[0].partition_keys == [SUBJECT]
        instance.add_dynamic_partitions(subject_partitions.name, [SUBJECT])
        assert isinstance(tick(first.cursor), dg.SkipReason)  # the same declaration again

        changed = {**subjects.DEMO_SUBJECT, "seeds": [1, 2, 3]}
        path.write_text(yaml.safe_dump({"subjects": [changed]}))
        second = tick(first.cursor)
        assert [r.partition_key for r in second.run_requests] == [SUBJECT]
        assert second.run_requests[0].run_key != first.run_requests[0].run_key
        assert not second.dynamic_partitions_requests  # the partition exists already

        path.write_text("subjects: [name: oops")  # broken YAML: skip with the reason
        skipped = tick(second.cursor)
        assert isinstance(skipped, dg.SkipReason) and str(path) in skipped.skip_message


def test_the_demo_base_model_is_trained_on_the_catalog_tracked_and_registered(env):
    models = ModelsResource(models_dir=str(env.root / "base-models"))  # no MM_DIFFUSION_BASE
    result = dg.materialize(
        [gen_assets.lora_base_model],
        instance=env.instance,
        resources={**env.resources, "models": models},
        run_config={"ops": {"lora_base_model": {"config": {"vae_steps": 20, "unet_steps": 20}}}},
    )
    meta = {
        k: v.value
        for k, v in result.asset_materializations_for_node("lora_base_model")[0].metadata.items()
    }
    assert meta["images"] == 15  # the sample batch's distinct captioned images (one is twice)
    assert models.diffusion_base_dir().name == meta["model_version"]
    load_pipeline(models.diffusion_base_dir(), device="cpu")  # a plain diffusers directory
    client = env.mlflow()
    (version,) = client.search_model_versions("name = 'mm-diffusion-base'")
    assert version.tags["model_version"] == meta["model_version"]
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "unet_loss")) == 20


# ---------------------------------------------------------------- quality review (issue 16)
# On the state the subject run above left: the MLflow record a reviewer opens, through a
# real `mm mlflow` (REST API and headless Chromium), the gates' sample-size floor, and the
# quality notebook on a subject whose latest training run resumed.


def _latest_evaluation(client: mlflow.MlflowClient, experiment_id: str):
    parents = client.search_runs(
        [experiment_id],
        filter_string=f"tags.subject = '{SUBJECT}' and tags.`dagster.asset_key` = "
        "'generation_quality'",
        order_by=["start_time DESC"],
    )
    return next(r for r in parents if "mlflow.parentRunId" not in r.data.tags)


def test_each_evaluation_is_a_parent_run_with_base_and_adapter_children(env, subject_run):
    client = env.mlflow()
    experiment_id = env.tracking._client_setup()
    parent = _latest_evaluation(client, experiment_id)
    children = client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    by_side = {r.info.run_name: r for r in children}
    assert set(by_side) == {"base", "adapter"}
    base, adapter = by_side["base"], by_side["adapter"]
    assert set(base.data.metrics) == set(adapter.data.metrics)  # what "compare runs" lines up
    assert {"fid", "fid_ci_low", "fid_ci_high", "clip_score", "kid_mean"} <= set(base.data.metrics)
    # sample sizes and settings are params, not metric charts
    assert (adapter.data.params["n_real"], adapter.data.params["n_fake"]) == ("5", "16")
    for run in (parent, base, adapter):
        assert not {"n_real", "n_fake", "kid_subsets", "num_features"} & set(run.data.metrics)
    assert parent.data.metrics["fid_ratio_to_base"] == pytest.approx(
        adapter.data.metrics["fid"] / base.data.metrics["fid"]
    )
    low, high = (parent.data.metrics[f"fid_ratio_to_base_ci_{b}"] for b in ("low", "high"))
    assert low < high and parent.data.params["n_real"] == "5"


def test_dagster_shows_previews_inline_and_every_quality_number_with_its_interval(subject_run):
    quality = meta(subject_run, "generation_quality")
    # markdown under Dagster's 1000-character limit is drawn on the asset page, no click:
    # base over adapter at the generated size (32 px), as many pairs as fit
    preview = quality["base_vs_adapter_preview"]
    assert len(preview) < 1000
    png = base64.b64decode(preview.split("base64,", 1)[1].rstrip(")"))
    width, height = Image.open(io.BytesIO(png)).size
    assert height == 64 and width % 32 == 0
    assert len(meta(subject_run, "lora_adapter")["validation_grid_preview"]) < 1000
    assert quality["base_vs_adapter"].count("data:image/png;base64,") == 1  # the full sheet
    assert quality["sample_sizes"] == {"n_real": 5, "n_generated": 16}
    assert set(quality["intervals"]) >= {"adapter_fid", "fid_ratio_to_base", "adapter_kid"}
    assert quality["intervals"]["adapter_fid"].endswith("(90% CI, n_real=5, n_generated=16)")


def test_the_evaluation_is_linked_to_the_adapter_run_its_logged_model_and_version(env, subject_run):
    client = env.mlflow()
    parent = _latest_evaluation(client, env.tracking._client_setup())
    name = registry.lora_model_name(SUBJECT)
    version = client.get_model_version(name, "1")
    adapter_run = client.get_run(version.run_id)
    assert parent.data.tags["mm.adapter_run_id"] == adapter_run.info.run_id
    assert adapter_run.data.tags["mm.quality_run_id"] == parent.info.run_id
    assert version.tags["mm.quality_run_id"] == parent.info.run_id
    model_id = version.tags["mm.logged_model_id"]
    inputs = client.get_run(parent.info.run_id).inputs  # search results leave inputs out
    assert [m.model_id for m in inputs.model_inputs] == [model_id]
    # the adapter's numbers are its logged model's evaluation on the reference images
    model = client.get_logged_model(model_id)
    fid = next(m for m in model.metrics if m.key == "fid")
    assert fid.dataset_digest == adapter_run.data.params["training_set_version"]


def test_the_adapter_run_has_its_dataset_image_series_system_metrics_and_facts_as_params(
    env, subject_run
):
    client = env.mlflow()
    version = client.get_model_version(registry.lora_model_name(SUBJECT), "1")
    run = client.get_run(version.run_id)
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == run.data.params["training_set_version"]
    assert dataset.dataset.name == f"training-set/{SUBJECT}"
    steps = [s for s, _ in review.image_series(client, run.info.run_id, "validation")]
    assert steps == [50, 100, 150, 200, 250, 300]  # validation_every 50, 300 steps
    assert any(k.startswith("system/") for k in run.data.metrics)
    assert run.data.params["steps_done"] == "300" and "steps_done" not in run.data.metrics


def test_the_registered_version_loads_as_a_pyfunc_that_regenerates_a_catalogued_image(
    env, subject_run
):
    adapter_version = meta(subject_run, "lora_adapter")["adapter_version"]
    with psycopg.connect(env.dsn) as conn:
        prompt, seed, uri = conn.execute(
            "SELECT g.prompt, g.seed, o.storage_uri FROM generated_media g "
            "JOIN media_objects o USING (content_hash) "
            "WHERE g.subject = %s AND g.adapter_version = %s AND g.seed = 5",
            (SUBJECT, adapter_version),
        ).fetchone()
    mlflow.set_tracking_uri(env.tracking.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{registry.lora_model_name(SUBJECT)}/1")
    out = model.predict(pd.DataFrame({"prompt": [prompt], "seed": [seed]}))
    png = base64.b64decode(out["image_png_base64"][0])
    again = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.int16)
    stored = np.asarray(Image.open(Path(uri.removeprefix("file://"))).convert("RGB"), np.int16)
    assert np.abs(again - stored).max() <= 1


def _run_check_only(env) -> dg.ExecuteInProcessResult:
    """The gates again on the stored report, without re-scoring (a check-only selection
    takes its partition from the run tag: it has no asset to take it from)."""
    return dg.materialize(
        [gen_assets.generation_quality, gen_checks.quality_gates],
        selection=dg.AssetSelection.checks(gen_checks.quality_gates),
        tags={"dagster/partition": SUBJECT},
        instance=env.instance,
        resources=env.resources,
        raise_on_error=False,
    )


def test_a_tiny_reference_sample_refuses_to_pass_the_gate_and_reports_its_interval(
    env, subject_run
):
    strict = {**copy.deepcopy(subjects.DEMO_SUBJECT), "gates": {"min_references": 10}}
    env.declare(strict)
    try:
        result = _run_check_only(env)
    finally:
        env.declare(subjects.DEMO_SUBJECT)
    (evaluation,) = [
        e.asset_check_evaluation_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    ]
    assert not evaluation.passed
    found = {k: v.value for k, v in evaluation.metadata.items()}
    assert found["failures"] == [
        "n_real 5 is below min_references 10: too few reference images for the quality "
        "numbers to support a decision"
    ]
    assert found["sample_sizes"] == {"n_real": 5, "n_generated": 16}
    ratio = found["intervals"]["fid_ratio_to_base"]
    assert "(90% CI, n_real=5, n_generated=16)" in ratio and ratio.count("[") == 1
    client = env.mlflow()
    name = registry.lora_model_name(SUBJECT)
    assert client.get_model_version(name, "1").tags[registry.GATE_TAG] == "failed"
    # the declared gates again: the same report passes and the version is candidate again
    assert checks(_run_check_only(env)) == {"quality_gates": True}
    assert str(client.get_model_version_by_alias(name, "candidate").version) == "1"


@pytest.fixture(scope="module")
def mlflow_ui(env, subject_run, mlflow_process) -> str:
    """The base URL of this module's `mm mlflow`, once it answers."""
    wait_healthy(env.mlflow_url, mlflow_process, env.mlflow_log, timeout_s=300)
    return env.mlflow_url


def _run_id(link: str) -> str:
    return re.search(r"/runs/([0-9a-f]{32})", link)[1]


def rest(base: str, endpoint: str, **params: str) -> dict:
    resp = requests.get(f"{base}/api/2.0/mlflow/{endpoint}", params=params, timeout=60)
    assert resp.ok, (endpoint, resp.status_code, resp.text[:500])
    return resp.json()


def test_mm_mlflow_serves_the_runs_the_compare_view_and_the_registry_over_rest(
    subject_run, mlflow_ui
):
    experiment = rest(mlflow_ui, "experiments/get-by-name", experiment_name="mm_pipelines")
    experiment = experiment["experiment"]
    tags = {t["key"]: t["value"] for t in experiment["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"  # the training view
    # the adapter run behind the link its Dagster materialization carries
    link = meta(subject_run, "lora_adapter")["mlflow_run"]
    prefix = f"{mlflow_ui}/#/experiments/{experiment['experiment_id']}/runs/"
    assert link.startswith(prefix) and link.endswith("?workflowType=machine_learning")
    run = rest(mlflow_ui, "runs/get", run_id=_run_id(link))["run"]
    assert run["info"]["run_name"] == f"lora_adapter[{SUBJECT}]"
    images = rest(mlflow_ui, "artifacts/list", run_id=run["info"]["run_id"], path="images")
    assert sum("validation+step+" in f["path"] for f in images["files"]) >= 6
    # the compare view's data: the two child runs its link names, with the same metrics
    compare = meta(subject_run, "generation_quality")["mlflow_compare"]
    ids = re.findall(r'"([0-9a-f]{32})"', compare)
    runs = [rest(mlflow_ui, "runs/get", run_id=i)["run"] for i in ids]
    assert sorted(r["info"]["run_name"] for r in runs) == ["adapter", "base"]
    metric_names = [{m["key"] for m in r["data"]["metrics"]} for r in runs]
    assert metric_names[0] == metric_names[1] and "fid" in metric_names[0]
    # the registered version with its aliases (the registry page's data)
    name = registry.lora_model_name(SUBJECT)
    model = rest(mlflow_ui, "registered-models/get", name=name)["registered_model"]
    assert {"alias": "candidate", "version": "1"} in model["aliases"]
    version = rest(mlflow_ui, "model-versions/get", name=name, version="1")["model_version"]
    assert "candidate" in version["aliases"]
    assert {t["key"]: t["value"] for t in version["tags"]}[registry.GATE_TAG] == "passed"
    # the full labelled sheet Dagster embeds inline comes from this server
    served = meta(subject_run, "generation_quality")["base_vs_adapter_mlflow"]
    url = re.search(r"\((http[^)]+)\)", served)[1]
    assert url.startswith(f"{mlflow_ui}/get-artifact?")
    image = requests.get(url, timeout=60)
    assert image.ok and image.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(image.content)).width > 500  # enlarged and labelled


def test_mm_mlflow_serves_without_mlflows_job_runner(mlflow_ui, mlflow_process):
    """MLflow 3's server starts a job runner of eight processes unless told not to; nothing
    here submits MLflow jobs (settings.MLFLOW_SERVER_DEFAULTS)."""
    commands = [" ".join(p.cmdline()) for p in psutil.Process(mlflow_process.pid).children(True)]
    assert any("uvicorn" in c for c in commands), commands  # the server that answered
    assert not [c for c in commands if "huey" in c or "jobs._job_runner" in c], commands


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium package is missing")
def test_mlflow_pages_in_headless_chromium(env, subject_run, mlflow_ui, tmp_path):
    """Screenshots of what a reviewer opens (into test-artifacts/), and the DOM MLflow's
    JavaScript built for each page names what the page is about."""
    ARTIFACTS.mkdir(exist_ok=True)
    tracker = env.tracking.get_tracker()
    experiment_id = env.tracking._client_setup()
    run_id = _run_id(meta(subject_run, "lora_adapter")["mlflow_run"])
    evaluation_id = _run_id(meta(subject_run, "generation_quality")["mlflow_run"])
    pages = {  # name: (url, window height, text the rendered page must contain)
        "mlflow_experiment": (
            tracker.experiment_url(experiment_id),
            1100,
            f"lora_adapter[{SUBJECT}]",
        ),
        "mlflow_adapter_run": (
            tracker.run_url(experiment_id, run_id, "model-metrics"),
            2600,  # every chart on screen (MLflow draws only those in view)
            "validation",
        ),
        "mlflow_compare": (
            meta(subject_run, "generation_quality")["mlflow_compare"],
            2400,
            "fid_ci_high",
        ),
        "mlflow_base_vs_adapter": (  # the evaluation's labelled sheet, in its artifact view
            tracker.run_url(experiment_id, evaluation_id, "artifacts/base_vs_adapter.png"),
            1300,
            "base_vs_adapter.png",
        ),
    }
    for name, (url, height, expected) in pages.items():
        shot = ARTIFACTS / f"{name}.png"
        shot.unlink(missing_ok=True)
        chromium([f"--screenshot={shot}"], tmp_path / f"{name}-shot", url, height=height)
        assert shot.is_file() and len(shot.read_bytes()) > 20_000, name
        dom = chromium(["--dump-dom"], tmp_path / name, url, height=height)
        assert expected in dom, f"{name}: {expected!r} is not on {url}"
        if name != "mlflow_compare":  # the experiment's side bar is the training view's
            assert ">Runs<" in dom and "Judges" not in dom  # GenAI's has Judges, Sessions


def _run_quality_notebook(env, subject: str, monkeypatch) -> list[dict]:
    import nbformat
    from nbclient import NotebookClient

    for key, value in {
        "MM_HOME": str(env.root),
        "MLFLOW_TRACKING_URI": env.tracking.tracking_uri,
        "MM_MLFLOW_ARTIFACTS": env.tracking.artifact_root,
        "MM_MODELS_DIR": env.models.models_dir,
        "MM_SUBJECT": subject,
    }.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this environment
    repo = Path(__file__).resolve().parents[1]
    notebook = nbformat.read(repo / "notebooks" / "02_quality_review.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(repo)}}
    ).execute()
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]


def test_the_quality_notebook_runs_on_a_subject_whose_latest_training_run_resumed(env, monkeypatch):
    quick = copy.deepcopy(subjects.DEMO_SUBJECT)
    quick.update(name="resumed", seeds=list(range(8)))
    quick["lora"].update(
        steps=20,
        checkpoint_every=10,
        validation_every=10,
        validation_seeds=[0, 1, 2, 3],
        validation_inference_steps=5,
    )
    env.declare(subjects.DEMO_SUBJECT, quick)
    assert env.run(env.instance, "resumed", ["lora_training_set", "lora_adapter"]).success
    # a retry after the last checkpoint of an attempt that died before registering (its
    # version removed: otherwise the same inputs reuse it): it resumes at step 20 with no
    # step left to train
    env.mlflow().delete_model_version("mm-lora-resumed", "1")
    again = env.run(env.instance, "resumed", ["lora_adapter"])
    assert again.success and meta(again, "lora_adapter")["resumed_from_step"] == 20
    client = env.mlflow()
    resumed_run = client.get_run(_run_id(meta(again, "lora_adapter")["mlflow_run"]))
    assert resumed_run.data.params["resumed_from_step"] == "20"
    # the steps before the resume come from the checkpoint: the curve is whole
    assert len(client.get_metric_history(resumed_run.info.run_id, "loss")) == 20

    outputs = _run_quality_notebook(env, "resumed", monkeypatch)
    text = "".join(o.get("text", "") for o in outputs)
    assert "2 training run(s), 0 evaluation(s)" in text
    assert "no evaluation yet" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss plot
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert html.count("data:image/png;base64,") == 2  # validation images at steps 10, 20
