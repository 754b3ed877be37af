"""The curate group as Dagster runs it, on the demo's sample batch (its manifest labels the
images: purple backdrop = the demo's stand-in for unsafe, the orange studio shots = high
quality): heads trained from those labels, scores and flags, captions, and what search,
`mm search` and LoRA training sets do with them.

Real Postgres/pgvector, real MLflow (sqlite), the demo CLIP (session fixture `demo_clip`)
and, for the LoRA run, the session's tiny diffusion base (`base_pipeline_dir`)."""

from __future__ import annotations

import json

import dagster as dg
import mlflow
import numpy as np
import pytest
import yaml
from dagster_aws.s3 import S3Resource

from mm_pipelines.defs.curate import assets as curate
from mm_pipelines.defs.curate.checks import flagged_share
from mm_pipelines.defs.curate.resources import CurationResource
from mm_pipelines.defs.embed.assets import clip_embeddings, unified_embeddings, vector_index
from mm_pipelines.defs.ingest.assets import raw_media
from mm_pipelines.defs.resources import (
    CatalogResource,
    ComputeResource,
    LandingResource,
    MediaStoreResource,
    MLflowResource,
    ModelsResource,
)
from mm_pipelines.defs.understand.assets import video_frames
from mm_pipelines.models.clip.encode import encode_images, encode_texts
from mm_pipelines.models.curation import heads as hd
from mm_pipelines.models.demo import shapes
from mm_pipelines.pipeline import lora
from mm_pipelines.pipeline import model_store as ms
from mm_pipelines.pipeline.curate.scores import LABELLED
from mm_pipelines.pipeline.sample_data import demo_labels, write_sample_batch
from mm_pipelines.pipeline.tracking import RunSpec
from mm_pipelines.storage.postgres import connect
from mm_pipelines_tests.curation_env import CurationEnv, jpeg

ASSETS = [
    raw_media,
    video_frames,
    clip_embeddings,
    unified_embeddings,
    vector_index,
    curate.near_duplicates,
    curate.content_heads,
    curate.content_scores,
    curate.captions,
]
EMBED = [raw_media, video_frames, clip_embeddings, unified_embeddings, vector_index]
CURATE = [curate.near_duplicates, curate.content_scores, curate.captions]
FRAMES = {"ops": {"video_frames": {"config": {"strategies": ["uniform:n=4"]}}}}
PURPLE = ("yellow_square_on_purple.png", "green_cross_on_purple.png")


class Run:
    def __init__(self, env: CurationEnv, instance: dg.DagsterInstance) -> None:
        s3 = S3Resource()
        self.env, self.instance = env, instance
        self.models = ModelsResource(
            models_dir=str(env.root / "models"),
            clip_checkpoint=env.svc.choice.clip_checkpoint,
            projector_dir=env.svc.choice.projector_dir,
        )
        self.tracking = MLflowResource(
            tracking_uri=env.svc.tracker.tracking_uri, artifact_root=env.svc.tracker.artifact_root
        )
        self.resources = {
            "catalog_db": CatalogResource(dsn=env.dsn),
            "landing": LandingResource(uri=str(env.landing), s3=s3),
            "media_store": MediaStoreResource(local_dir=str(env.root / "media"), s3=s3),
            "compute": ComputeResource(device="cpu", io_workers=2, dataloader_workers=0),
            "models": self.models,
            "mlflow_tracking": self.tracking,
            "curation": CurationResource(),
        }

    def __call__(self, selection: list, batch: str | None = None) -> dg.ExecuteInProcessResult:
        """Materialize `selection` (and the checks of those assets)."""
        if batch and not self.instance.has_dynamic_partition("batch", batch):
            self.instance.add_dynamic_partitions("batch", [batch])
        result = dg.materialize(
            [*ASSETS, flagged_share],
            partition_key=batch,
            instance=self.instance,
            resources=self.resources,
            run_config=FRAMES if video_frames in selection else None,
            selection=dg.AssetSelection.assets(*selection),
        )
        assert result.success
        return result


def meta(result, asset) -> dict:
    (mat,) = result.asset_materializations_for_node(asset.key.path[-1])
    return {k: v.value for k, v in mat.metadata.items()}


@pytest.fixture(scope="module")
def env(tmp_path_factory, module_pg_dsn, demo_clip):
    e = CurationEnv(tmp_path_factory.mktemp("curate"), module_pg_dsn, demo_clip.checkpoint_path)
    write_sample_batch(e.landing, "demo")
    with dg.instance_for_test() as instance:
        run = Run(e, instance)
        run(EMBED, "demo")
        e.heads = meta(run([curate.content_heads]), curate.content_heads)
        e.curated = run(CURATE, "demo")
        e.run = run
        yield e


def _hash_of(env, name: str, batch: str = "demo") -> str:
    with connect(env.dsn) as conn:
        return conn.execute(
            "SELECT content_hash FROM media_sources WHERE batch = %s AND source_uri LIKE %s",
            (batch, f"%/{name}"),
        ).fetchone()[0]


def test_heads_trained_on_the_demo_labels_separate_held_out_shapes(env, demo_clip):
    """Scored on held-out drawings (none of them in the batch) labelled by the same rule:
    every combo once, 28 of 224 on purple, 28 on orange."""
    assert set(env.heads["heads"]) == {"unsafe", "aesthetic", "text_unsafe"}
    folder = env.svc.need_models().get(ms.CONTENT_HEADS, LABELLED).path
    samples = list(shapes.iter_samples("heldout", len(shapes.all_specs()), size_px=128))
    vectors = encode_images(demo_clip.bundle, [s.image for s in samples], num_workers=0).vectors
    texts = encode_texts(demo_clip.bundle, [s.caption for s in samples]).vectors
    labels = [demo_labels(s.spec.colour, s.spec.shape, s.spec.background) for s in samples]
    auc = {}
    for name, x, positive in (
        ("unsafe", vectors, "unsafe"),
        ("aesthetic", vectors, "high_quality"),
        ("text_unsafe", texts, "unsafe"),
    ):
        scores = hd.score(hd.load_head(folder, name).head, x)
        auc[name] = hd.roc_auc(scores, [positive in lab for lab in labels])
    print(f"\nheld-out AUC of the heads trained on the demo batch's labels: {auc}")
    # chance is 0.5; a rule the CLIP sees (a backdrop colour) learnt from 2 (unsafe) and
    # 5 (high quality) positive images must rank most held-out positives above negatives
    assert auc["unsafe"] > 0.8 and auc["aesthetic"] > 0.8 and auc["text_unsafe"] > 0.8


def test_the_heads_run_is_tracked_registered_and_published(env):
    client = mlflow.MlflowClient(env.svc.tracker.tracking_uri)
    (version,) = client.search_model_versions("name = 'mm-content-heads'")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert {"unsafe_cv_auc", "aesthetic_cv_auc"} <= set(run.data.metrics)
    stored = env.svc.need_models().get(ms.CONTENT_HEADS, LABELLED)
    assert version.tags["mm.store_version"] == stored.version
    assert stored.metadata["heads"] == {k: v["version"] for k, v in env.heads["heads"].items()}


def test_flagged_items_stay_in_the_catalog_with_the_reason(env):
    scores = meta(env.curated, curate.content_scores)
    purple = {_hash_of(env, name) for name in PURPLE}
    with connect(env.dsn) as conn:
        flags = dict(conn.execute("SELECT content_hash, reason FROM content_flags").fetchall())
        in_catalog = conn.execute(
            "SELECT count(*) FROM media_catalog WHERE content_hash = ANY(%s)", (list(purple),)
        ).fetchone()[0]
    assert set(flags) == purple
    assert all(reason.startswith(("unsafe", "text_unsafe")) for reason in flags.values())
    assert in_catalog == 2
    assert scores["flagged"] == 2 and scores["flagged_share"] == round(2 / scores["items"], 4)
    (check,) = env.curated.get_asset_check_evaluations()
    assert check.passed and check.metadata["flagged"].value == 2


def test_flagged_items_never_come_back_from_mm_search(env, monkeypatch, capsys):
    from mm_pipelines import cli

    monkeypatch.setenv("MM_HOME", str(env.root / "home"))
    monkeypatch.setenv("MM_PG_DSN", env.dsn)
    monkeypatch.setenv("MM_CLIP_CHECKPOINT", env.svc.choice.clip_checkpoint)
    monkeypatch.setenv("MM_PROJECTOR_DIR", env.svc.choice.projector_dir)
    monkeypatch.delenv("MM_S3_BUCKET", raising=False)
    flagged = {_hash_of(env, name) for name in PURPLE}
    for name in PURPLE:
        query = name.removesuffix(".png").replace("_", " ")
        capsys.readouterr()
        assert cli.main(["search", f"a {query} background", "-k", "20", "--json"]) == 0
        found = json.loads(capsys.readouterr().out)
        hits = {h["media_hash"] for h in found["hits"]}  # the catalog item each hit shows
        assert hits and not hits & flagged


def test_captions_record_source_and_confidence_and_the_manifest_wins(env):
    captions = meta(env.curated, curate.captions)
    assert captions["source"].startswith("model:tagger-v1:")
    assert captions["from_manifest"] == 15 and captions["pictures"] > 15  # images + frames
    with connect(env.dsn) as conn:
        rows = conn.execute(
            "SELECT e.source, s.caption = e.caption FROM media_sources s JOIN effective_captions e "
            "USING (content_hash) WHERE s.batch = 'demo' AND s.modality = 'image'"
        ).fetchall()
        frames = conn.execute(
            "SELECT c.source, c.confidence FROM captions c JOIN video_frames f "
            "ON f.frame_hash = c.content_hash"
        ).fetchall()
    assert rows and all(source == "manifest" and same for source, same in rows)
    assert frames and all(s == captions["source"] and 0 < c <= 1 for s, c in frames)
    print(f"\ntagger agrees with the manifest on {captions['manifest_agreement']:.3f} of images")


def test_a_rerun_of_the_batch_does_no_work_twice(env):
    again = env.run(CURATE, "demo")
    scores, captions = meta(again, curate.content_scores), meta(again, curate.captions)
    dups = meta(again, curate.near_duplicates)
    assert sum(scores["scored_now"].values()) == 0 and scores["already_scored"] > 0
    assert captions["captioned_now"] == 0 and dups["checked_now"] == 0


def _subject(env, monkeypatch, **fields) -> str:
    path = env.root / "subjects.yaml"
    raw = {
        "name": "studio",
        "instance_prompt": "a photo of sks",
        "min_images": 1,
        "lora": {"steps": 3, "batch_size": 2, "validation_every": 0, "checkpoint_every": 0},
        **fields,
    }
    path.write_text(yaml.safe_dump({"subjects": [raw]}))
    monkeypatch.setenv("MM_SUBJECTS", str(path))
    return raw["name"]


def test_a_training_set_leaves_out_flagged_items_near_duplicates_and_low_quality(
    env, monkeypatch, base_pipeline_dir
):
    studio = "green_circle_on_orange.png"
    copy = jpeg(shapes.draw_shape("green", "circle", "orange", 128, seed=12)[0])
    env.land("extra", {"studio_copy.jpg": (copy.resize((96, 96)), {"tenant": "acme"})})
    env.run(EMBED, "extra")
    env.run(CURATE, "extra")
    name = _subject(env, monkeypatch, select={"batches": ["demo", "extra"]}, min_aesthetic=0.5)
    svc = env.svc
    svc.choice.diffusion_base = str(base_pipeline_dir)
    result = lora.build_training_set(svc, name)
    why = {h: reason for h, reason in result.left_out}
    ts = lora.load_training_set(svc, name)
    orange = {_hash_of(env, n) for n in (studio, "white_square_on_orange.png")}
    assert orange <= set(ts.source_hashes)
    for purple in PURPLE:
        assert why[_hash_of(env, purple)].startswith("flagged: ")
    assert (
        why[_hash_of(env, "studio_copy.jpg", "extra")]
        == f"near-duplicate of {_hash_of(env, studio)}"
    )
    assert why[_hash_of(env, "red_circle_on_blue.png")].startswith("aesthetic ")
    assert not set(ts.source_hashes) & set(why)


def test_a_subject_from_uncaptioned_images_trains_with_generated_captions(
    env, monkeypatch, base_pipeline_dir
):
    specs = [("red", "circle", "green"), ("blue", "square", "yellow"), ("white", "cross", "black")]
    env.land(
        "nocap",
        {
            f"{c}_{s}_{b}.png": (shapes.draw_shape(c, s, b, 128, seed=77)[0], {"tenant": "acme"})
            for c, s, b in specs
        },
    )
    env.run(EMBED, "nocap")
    env.run([curate.captions], "nocap")
    captions = {"use": True, "trigger": "sks", "shuffle": True, "keep_tokens": 1, "dropout": 0.2}
    name = _subject(env, monkeypatch, select={"batches": ["nocap"]}, captions=captions)
    svc = env.svc
    svc.choice.diffusion_base = str(base_pipeline_dir)
    built = lora.build_training_set(svc, name)
    assert built.caption_sources == {"model": 3}
    ts = lora.load_training_set(svc, name)
    with connect(env.dsn) as conn:
        generated = dict(
            conn.execute(
                "SELECT content_hash, caption FROM effective_captions WHERE content_hash = ANY(%s)",
                (ts.source_hashes,),
            ).fetchall()
        )
    assert ts.captions == [f"sks, {generated[h]}" for h in ts.source_hashes]
    result = lora.train_adapter(svc, name, RunSpec("studio-lora"), steps=3)
    params = (
        mlflow.MlflowClient(svc.tracker.tracking_uri)
        .get_run(result.record.mlflow_run_id)
        .data.params
    )
    assert params["caption_mode"] == "catalog" and params["caption_example"] == ts.captions[0]
    assert (params["caption_shuffle"], params["caption_keep_tokens"]) == ("True", "1")
    assert params["caption_samples"] == str(3 * 4)  # 4 pre-drawn augmentations per image
    assert np.isfinite(result.final_loss)


def test_a_configured_head_file_wins_and_a_mismatched_one_is_a_clear_error(env, tmp_path):
    from mm_pipelines.pipeline.curate.config import CurationChoice
    from mm_pipelines.pipeline.curate.scores import active_heads, clip_version

    version = clip_version(env.svc)
    trained = active_heads(env.svc, CurationChoice(), version, 64)
    configured = hd.ScoringHead(hd.HeadConfig("unsafe", 64))
    hd.save_head(configured, tmp_path)
    path = str(tmp_path / "unsafe.safetensors")
    heads = active_heads(env.svc, CurationChoice(safety_head=path), version, 64)
    assert heads["unsafe"].version == configured.cfg.version != trained["unsafe"].version
    assert heads["aesthetic"].version == trained["aesthetic"].version  # the rest: trained
    wide = hd.ScoringHead(hd.HeadConfig("unsafe", 768))
    hd.save_head(wide, tmp_path / "wide")
    with pytest.raises(ValueError, match=r"wide/unsafe.safetensors: head 'unsafe' reads 768-d"):
        active_heads(
            env.svc, CurationChoice(safety_head=str(tmp_path / "wide" / "unsafe.safetensors")),
            version, 64,
        )  # fmt: skip
    with pytest.raises(ValueError, match="materialize content_heads again"):
        active_heads(env.svc, CurationChoice(), "another-clip@sha256:0", 64)
