"""The generative group as Dagster runs it: a subject from catalog selection to a gated,
registered adapter, with generations catalogued and every MLflow run closed.

Shared, session-scoped: the tiny base pipeline (`base_pipeline_dir`) and the demo CLIP
(`demo_clip`). The subject run itself (~1 min) happens once per module."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import psycopg
import pytest
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
from mm_pipelines.pipeline import lora, registry, subjects
from mm_pipelines.pipeline.sample_data import write_sample_batch
from mm_pipelines_tests.models.conftest_diffusion import torch_threads

SUBJECT = subjects.DEMO_SUBJECT["name"]
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
def subject_run(env):
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
