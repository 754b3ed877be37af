"""Every kind of bad input ends as a quarantined row (or a refused path) with a clear
reason, and the good files of the same batch still land."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

from mm_pipelines.pipeline.ingest import IngestReport, ingest_batch
from mm_pipelines.storage.landing import LocalLanding
from mm_pipelines.storage.media_store import LocalMediaStore
from mm_pipelines_tests import bad_media

LATIN1_TEXT = "Crème brûlée à la carte, très élégant: déjà vu, naïve façade."


@pytest.fixture(scope="module")
def bad_batch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    landing = tmp_path_factory.mktemp("landing")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.txt").write_text("not part of any batch")
    root = landing / "bad-001"
    root.mkdir()
    png = bad_media.png_bytes()
    jpeg = bad_media.jpeg_bytes()
    (root / "good.png").write_bytes(png)
    (root / "zero.jpg").write_bytes(b"")
    (root / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "cut.png").write_bytes(bad_media.png_bytes(size=256)[:300])
    (root / "really_a_png.jpg").write_bytes(png[:-1] + b"\x82")  # other bytes, same picture
    (root / "random_bytes.mp4").write_bytes(np.random.default_rng(1).bytes(2048))
    (root / "bomb.png").write_bytes(bad_media.decompression_bomb_png())
    bad_media.write_mp4(root / "good.mp4")
    whole = (root / "good.mp4").read_bytes()
    (root / "cut_index_last.mp4").write_bytes(whole[: len(whole) * 2 // 3])
    bad_media.write_mp4(root / "faststart.mp4", faststart=True)
    fast = (root / "faststart.mp4").read_bytes()
    (root / "cut_index_first.mp4").write_bytes(fast[: len(fast) * 2 // 3])
    (root / "faststart.mp4").unlink()
    bad_media.write_audio_only_mp4(root / "sound_only.mp4")
    bad_media.write_wav(root / "silence.wav", np.zeros(16000))
    bad_media.write_wav(root / "tone.wav", 0.3 * np.sin(np.linspace(0, 2000, 16000)))
    (root / "latin1.txt").write_bytes(LATIN1_TEXT.encode("latin-1"))
    (root / "notes with spaces ünï 日本.txt").write_text("plain UTF-8 text", encoding="utf-8")
    os.symlink(outside / "secret.txt", root / "escape_link.txt")
    os.symlink(outside, root / "escape_dir")
    (root / "_READY").touch()
    return landing


@pytest.fixture(scope="module")
def report(
    bad_batch: Path, pg_server_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> IngestReport:
    store = LocalMediaStore(tmp_path_factory.mktemp("store"))
    return ingest_batch(LocalLanding(bad_batch), "bad-001", store, pg_server_dsn, workers=2)


def row(report: IngestReport, name: str):
    matches = [r for r in report.rows if unquote(r.source_uri).endswith("/" + name)]
    assert len(matches) == 1, f"expected one row for {name}, got {matches}"
    return matches[0]


@pytest.mark.parametrize(
    ("name", "category"),
    [
        ("zero.jpg", "empty_file"),
        ("cut.jpg", "truncated"),
        ("cut.png", "truncated"),
        ("random_bytes.mp4", "unsupported_type"),
        ("bomb.png", "decompression_bomb"),
        ("cut_index_last.mp4", "truncated"),
        ("cut_index_first.mp4", "truncated"),
        ("sound_only.mp4", "no_video_stream"),
        ("silence.wav", "silent_audio"),
        ("escape_link.txt", "path_refused"),
        ("escape_dir", "path_refused"),
    ],
)
def test_bad_file_is_quarantined_with_its_reason(report: IngestReport, name: str, category: str):
    r = row(report, name)
    assert (r.status, r.error_category) == ("quarantined", category)
    assert r.error_message  # a sentence a person can act on


def test_symlink_reason_names_where_it_points(report: IngestReport):
    assert "outside the batch" in row(report, "escape_link.txt").error_message


def test_extension_that_lies_is_decided_by_content(report: IngestReport):
    r = row(report, "really_a_png.jpg")
    assert (r.status, r.modality, r.mime) == ("ok", "image", "image/png")
    assert "content is image/png" in r.note


def test_non_utf8_text_is_detected_and_recorded(report: IngestReport, bad_batch: Path):
    r = row(report, "latin1.txt")
    assert (r.status, r.modality) == ("ok", "text")
    raw = (bad_batch / "bad-001" / "latin1.txt").read_bytes()
    assert "decoded as cp1252" in r.note
    assert raw.decode("cp1252") == LATIN1_TEXT


def test_name_with_spaces_and_unicode_lands(report: IngestReport):
    assert row(report, "notes with spaces ünï 日本.txt").status == "ok"


def test_good_files_of_the_same_batch_land(report: IngestReport):
    ok = {unquote(r.source_uri).rsplit("/", 1)[-1] for r in report.rows if r.status == "ok"}
    assert {"good.png", "good.mp4", "tone.wav", "really_a_png.jpg", "latin1.txt"} <= ok


def test_nothing_outside_the_batch_is_read(report: IngestReport):
    assert not any("secret" in r.source_uri for r in report.rows)


def test_parent_path_is_refused(bad_batch: Path):
    with pytest.raises(PermissionError, match="outside batch"):
        LocalLanding(bad_batch).resolve_inside("bad-001", "../../etc/passwd")
