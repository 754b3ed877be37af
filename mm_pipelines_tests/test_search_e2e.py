"""Cross-modal search end to end on a real batch: ingest, frames, transcripts, CLIP and
audio embeddings, the trained projector, the pgvector index, then queries.

Uses the demo CLIP trained exactly as `mm demo` trains it (session fixture `demo_clip`)."""

import hashlib
import json
import shutil

import dagster as dg
import pytest
from dagster_aws.s3 import S3Resource

from mm_pipelines.defs.embed.assets import (
    audio_embeddings,
    clip_embeddings,
    unified_embeddings,
    unified_projector,
    vector_index,
)
from mm_pipelines.defs.embed.checks import ann_recall
from mm_pipelines.defs.ingest.assets import raw_media
from mm_pipelines.defs.resources import (
    CatalogResource,
    ComputeResource,
    LandingResource,
    MediaStoreResource,
    MLflowResource,
    ModelsResource,
)
from mm_pipelines.defs.understand.assets import transcripts, video_frames
from mm_pipelines.models.demo.shapes import draw_shape
from mm_pipelines.models.speech.whisper import load_audio
from mm_pipelines.pipeline.sample_data import SPEECH_DIR, scene_frames, write_video
from mm_pipelines.pipeline.search import QueryModels, search
from mm_pipelines.storage import vectors
from mm_pipelines.storage.postgres import connect

pytestmark = pytest.mark.slow

IMAGES = [
    ("red", "circle", "blue"),
    ("yellow", "square", "purple"),
    ("green", "triangle", "white"),
    ("blue", "cross", "yellow"),
    ("white", "circle", "black"),
    ("orange", "square", "green"),
]
SCENES = [
    ("purple", "triangle", "orange"),
    ("black", "cross", "white"),
    ("red", "square", "yellow"),
]
SCENE_S = 2.0  # each scene lasts 2 s; frames are sampled at 1 fps


def caption(spec) -> str:
    return f"a {spec[0]} {spec[1]} on a {spec[2]} background"


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, module_pg_dsn, demo_clip):
    root = tmp_path_factory.mktemp("e2e")
    batch = root / "landing" / "s1"
    batch.mkdir(parents=True)
    manifest = []
    for i, spec in enumerate(IMAGES):
        img, text = draw_shape(*spec, size_px=96, seed=100 + i)
        img.save(batch / f"img{i}.png")
        manifest.append(
            {"path": f"img{i}.png", "caption": text, "tenant": "acme" if i < 4 else "globex"}
        )
    speech = load_audio(SPEECH_DIR / "clip_04.ogg")
    write_video(batch / "tour.mp4", scene_frames(SCENES, SCENE_S, fps=10), fps=10, audio=speech)
    manifest.append({"path": "tour.mp4", "tenant": "acme"})
    for clip in ("clip_02.ogg", "clip_06.ogg", "clip_07.ogg"):
        shutil.copyfile(SPEECH_DIR / clip, batch / clip)
        manifest.append({"path": clip, "tenant": "acme"})
    (batch / "_manifest.jsonl").write_text("\n".join(json.dumps(m) for m in manifest))
    (batch / "_READY").touch()

    s3 = S3Resource()
    models = ModelsResource(
        models_dir=str(root / "models"), clip_checkpoint=str(demo_clip.checkpoint_path)
    )
    resources = {
        "catalog_db": CatalogResource(dsn=module_pg_dsn),
        "landing": LandingResource(uri=str(root / "landing"), s3=s3),
        "media_store": MediaStoreResource(local_dir=str(root / "media"), s3=s3),
        "compute": ComputeResource(device="cpu", io_workers=2, dataloader_workers=0),
        "models": models,
        "mlflow_tracking": MLflowResource(
            tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
            artifact_root=(root / "artifacts").as_uri(),
        ),
    }
    frames_config = {
        "ops": {"video_frames": {"config": {"strategies": ["fps:fps=1,snap=0", "scene"]}}}
    }
    everything = [
        raw_media,
        video_frames,
        transcripts,
        clip_embeddings,
        audio_embeddings,
        unified_projector,
        unified_embeddings,
        vector_index,
        ann_recall,
    ]
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("batch", ["s1"])
        first = dg.materialize(
            everything,
            partition_key="s1",
            instance=instance,
            resources=resources,
            run_config=frames_config,
            selection=[a.key for a in everything[:5]],
        )
        assert first.success
        assert dg.materialize(
            everything, instance=instance, resources=resources, selection=[unified_projector.key]
        ).success
        last = dg.materialize(
            everything,
            partition_key="s1",
            instance=instance,
            resources=resources,
            selection=dg.AssetSelection.assets(unified_embeddings, vector_index),
        )
        assert last.success
        again = dg.materialize(
            everything,
            partition_key="s1",
            instance=instance,
            resources=resources,
            selection=dg.AssetSelection.assets(unified_embeddings, vector_index),
        )
    query_models = QueryModels.load(
        models.clip_architecture, str(demo_clip.checkpoint_path), models.projector_path()
    )
    return {"dsn": module_pg_dsn, "models": query_models, "runs": (last, again)}


def test_text_finds_the_right_image(indexed):
    with connect(indexed["dsn"]) as conn:
        results = search(conn, indexed["models"], caption(IMAGES[0]), k=3)
    assert results.images[0]["source_uri"].endswith("/img0.png")


def test_text_finds_the_video_moment_within_one_sampling_interval(indexed):
    with connect(indexed["dsn"]) as conn:
        results = search(conn, indexed["models"], caption(SCENES[1]), k=3, modalities=["video"])
    video = results.videos[0]
    assert video["source_uri"].endswith("/tour.mp4")
    best = video["matched_frames"][0]["timestamp_s"]
    assert SCENE_S * 1 - 1.0 <= best <= SCENE_S * 2 + 1.0  # scene 2 is on screen 2-4 s


def test_spoken_passage_is_found(indexed):
    with connect(indexed["dsn"]) as conn:
        results = search(
            conn,
            indexed["models"],
            "check the shipping address before you confirm the order",
            k=3,
            modalities=["video", "audio"],
        )
    assert "shipping" in results.passages[0]["text"].lower()


def test_a_tenant_never_sees_another_tenants_items(indexed):
    with connect(indexed["dsn"]) as conn:
        for query in [caption(s) for s in IMAGES]:
            results = search(conn, indexed["models"], query, k=10, tenant="globex")
            found = results.images + results.videos + results.passages + results.documents
            assert found and {r["tenant"] for r in found} == {"globex"}


def index_total(result: dg.ExecuteInProcessResult) -> int:
    return result.asset_materializations_for_node("vector_index")[0].metadata["index_total"].value


def test_reindexing_is_idempotent_and_recall_check_passes(indexed):
    last, again = indexed["runs"]
    assert index_total(last) == index_total(again) > 0
    checks = [
        e.asset_check_evaluation_data
        for e in again.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    ]
    assert checks and all(c.passed for c in checks)
    with connect(indexed["dsn"]) as conn:
        assert vectors.count(conn, "s1") == index_total(again)


def test_audio_file_query_finds_its_own_recording(indexed):
    clip = SPEECH_DIR / "clip_06.ogg"
    with connect(indexed["dsn"]) as conn:
        results = search(conn, indexed["models"], clip, k=3)
    assert results.sounds[0]["source_hash"] == hashlib.sha256(clip.read_bytes()).hexdigest()
