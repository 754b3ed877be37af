"""One ranked list across modalities: calibrated scores, hits folded into what a person
looks for (an image once, a frame once, a passage once), and the one-line search output."""

from __future__ import annotations

import pytest

from mm_pipelines.cli_commands.search_view import clock, hit_line
from mm_pipelines.pipeline.ranking import Calibration, KindStats, fold


def row(kind: str, modality: str, content: str, score: float, **extra) -> dict:
    base = {
        "item_kind": kind,
        "modality": modality,
        "content_hash": content,
        "parent_hash": None,
        "source_uri": f"file:///landing/b1/{content}",
        "start_s": None,
        "end_s": None,
        "chunk_index": None,
        "text": None,
        "tenant": "acme",
        "batch": "b1",
        "score": score,
        "cosine": score,
    }
    return {**base, **extra}


def test_an_image_matched_by_its_pixels_and_its_caption_is_one_hit():
    hits = fold(
        [
            row("image", "image", "img1", 0.91),
            row("caption", "image", "cap1", 0.95, parent_hash="img1", text="a red\ncircle"),
        ],
        "q",
        "text",
        k=10,
    )
    assert [h["content_hash"] for h in hits.hits] == ["img1"]
    assert hits.hits[0]["matched_by"] == "caption" and hits.hits[0]["score"] == 0.95


def test_the_same_frame_sampled_twice_is_one_moment_of_one_video():
    frame = dict(parent_hash="vid1")
    hits = fold(
        [
            row("video_frame", "video", "f1", 0.9, start_s=2.0, **frame),
            row("video_frame", "video", "f1", 0.9, start_s=3.0, **frame),  # identical frame
            row("video_frame", "video", "f2", 0.7, start_s=6.0, **frame),
        ],
        "q",
        "text",
        k=10,
    )
    (video,) = hits.hits
    assert [(m["frame_hash"], m["timestamp_s"]) for m in video["matched_frames"]] == [
        ("f1", 2.0),
        ("f2", 6.0),
    ]


def test_duplicate_passages_collapse_and_the_list_is_one_ranking_across_kinds():
    seg = dict(parent_hash="a1", start_s=1.0, end_s=2.5, text="hello")
    hits = fold(
        [
            row("transcript_segment", "audio", "a1", 0.80, **seg),
            row("transcript_segment", "audio", "a1", 0.80, batch="b2", **seg),  # re-ingested
            row("text_chunk", "text", "d1", 0.85, parent_hash="d1", chunk_index=0, text="x"),
            row("image", "image", "img1", 0.60),
        ],
        "q",
        "text",
        k=10,
    )
    assert [h["kind"] for h in hits.hits] == ["text", "speech", "image"]
    assert [h["rank"] for h in hits.hits] == [1, 2, 3]
    assert len(hits.passages) == 1


def test_min_score_leaves_out_weak_hits():
    rows = [row("image", "image", "a", 0.9), row("image", "image", "b", 0.4)]
    assert [h["content_hash"] for h in fold(rows, "q", "text", 10, min_score=0.5).hits] == ["a"]


def test_calibrated_scores_compare_kinds_whose_raw_cosines_do_not():
    """Text-to-text cosines run high in CLIP's space: a transcript at 0.60 is unremarkable
    among transcripts, an image at 0.30 is far above what images score."""
    cal = Calibration(
        "p",
        {
            ("text", "transcript_segment"): KindStats(0.55, 0.05, 100),
            ("text", "image"): KindStats(0.05, 0.08, 100),
        },
    )
    transcript = cal.score("text", "transcript_segment", 0.60)
    image = cal.score("text", "image", 0.30)
    assert image > 0.99 > transcript > 0.8
    assert cal.score("text", "image", 0.05) == pytest.approx(0.5)


def test_a_hit_is_one_line_with_its_file_name_and_timestamps():
    speech = {
        "kind": "speech",
        "score": 0.93,
        "name": "clip_01.ogg",
        "start_s": 61.25,
        "end_s": 64.0,
        "text": "customer support\nis available   every day",
    }
    line = hit_line(speech)
    assert "\n" not in line and "clip_01.ogg" in line
    assert "1:01.2-1:04.0" in line and '"customer support is available every day"' in line
    video = {"kind": "video", "score": 0.9, "name": "tour.mp4", "matched_by": "caption",
             "matched_frames": []}  # fmt: skip
    assert "at 0:00.0 (caption)" in hit_line(video)  # a video hit always says where
    long = {**speech, "text": "word " * 100}
    assert len(hit_line(long, width=80)) == 80 and hit_line(long, width=80).endswith("…")


def test_clock_reads_minutes_and_tenths():
    assert (clock(0), clock(3.04), clock(125.5)) == ("0:00.0", "0:03.0", "2:05.5")


def test_for_a_text_query_a_sound_that_is_a_found_spoken_passage_is_that_passage():
    seg = dict(parent_hash="a1", start_s=0.5, end_s=4.0, text="customer support")
    rows = [
        row("transcript_segment", "audio", "a1", 0.90, **seg),
        row("audio_window", "audio", "w1", 0.95, parent_hash="a1", start_s=0.0, end_s=2.0),
        row("audio_window", "audio", "w2", 0.93, parent_hash="a1", start_s=2.0, end_s=4.0),
        row("audio_window", "audio", "w3", 0.50, parent_hash="a2", start_s=0.0, end_s=2.0),
    ]
    hits = fold(rows, "q", "text", k=10)
    assert [(h["kind"], h.get("source_hash")) for h in hits.hits] == [
        ("speech", "a1"),
        ("sound", "a2"),
    ]
    assert hits.hits[0]["score"] == 0.90 and hits.hits[0]["text"] == "customer support"
    # for a sound as the query the sound is the answer: both stay
    heard = fold(rows, "q", "audio", k=10)
    assert {h["kind"] for h in heard.hits} == {"speech", "sound"}
