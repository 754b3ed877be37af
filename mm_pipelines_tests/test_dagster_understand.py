"""video_frames and transcripts as Dagster runs them, on a real batch: frames and
transcripts land in the catalog, the UI metadata is there, and a re-run does nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from dagster_aws.s3 import S3Resource

from mm_pipelines.defs.ingest.assets import raw_media
from mm_pipelines.defs.resources import (
    CatalogResource,
    ComputeResource,
    LandingResource,
    MediaStoreResource,
    ModelsResource,
)
from mm_pipelines.defs.understand.assets import transcripts, video_frames
from mm_pipelines.models.speech.whisper import load_audio
from mm_pipelines.pipeline.sample_data import SPEECH_DIR, scene_frames, write_video

SCENES = [("red", "circle", "blue"), ("green", "square", "white"), ("yellow", "cross", "black")]


@pytest.fixture(scope="module")
def landing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("landing")
    batch = root / "u1"
    batch.mkdir()
    speech = load_audio(SPEECH_DIR / "clip_04.ogg")
    write_video(batch / "talk.mp4", scene_frames(SCENES, 2.0, fps=10), fps=10, audio=speech)
    write_video(batch / "silent_film.mp4", scene_frames(SCENES[:2], 1.5, fps=10), fps=10)
    shutil.copyfile(SPEECH_DIR / "clip_06.ogg", batch / "memo.ogg")
    (batch / "_READY").touch()
    return root


def run(assets, landing: Path, tmp_path: Path, dsn: str, instance) -> dg.ExecuteInProcessResult:
    s3 = S3Resource()
    resources = {
        "catalog_db": CatalogResource(dsn=dsn),
        "landing": LandingResource(uri=str(landing), s3=s3),
        "media_store": MediaStoreResource(local_dir=str(tmp_path / "media"), s3=s3),
        "compute": ComputeResource(device="cpu", io_workers=2),
        "models": ModelsResource(models_dir=str(tmp_path / "models")),
    }
    return dg.materialize(assets, partition_key="u1", instance=instance, resources=resources)


@pytest.fixture(scope="module")
def first_and_second_run(landing, tmp_path_factory, module_pg_dsn):
    tmp_path = tmp_path_factory.mktemp("state")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("batch", ["u1"])
        assets = [raw_media, video_frames, transcripts]
        first = run(assets, landing, tmp_path, module_pg_dsn, instance)
        second = run(assets, landing, tmp_path, module_pg_dsn, instance)
    return first, second


def meta(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    return {
        k: v.value for k, v in result.asset_materializations_for_node(asset)[0].metadata.items()
    }


def test_frames_and_transcripts_land_with_ui_metadata(first_and_second_run, module_pg_dsn):
    first, _ = first_and_second_run
    frames = meta(first, "video_frames")
    assert (frames["videos"], frames["videos_sampled_now"]) == (2, 2)
    assert frames["frames_by_strategy"]["scene"] == 3 + 2  # every cut of both videos
    assert "data:image/png;base64," in frames["contact_sheet"]
    said = meta(first, "transcripts")
    assert (said["sources"], said["transcribed_now"]) == (2, 2)  # talk.mp4 and memo.ogg
    assert "shipping address" in said["sample_transcript"] or "mugs" in said["sample_transcript"]
    with psycopg.connect(module_pg_dsn) as conn:
        texts = [r[0] for r in conn.execute("SELECT text FROM transcript_segments")]
        words = conn.execute("SELECT words FROM transcript_segments LIMIT 1").fetchone()[0]
    assert any("shipping" in t.lower() for t in texts)
    assert words and {"word", "start", "end", "probability"} <= set(words[0])


def test_a_rerun_of_the_batch_does_no_work(first_and_second_run):
    _, second = first_and_second_run
    assert meta(second, "video_frames")["videos_sampled_now"] == 0
    assert meta(second, "transcripts")["transcribed_now"] == 0
    assert (
        meta(second, "video_frames")["frames"]
        == meta(first_and_second_run[0], "video_frames")["frames"]
    )
