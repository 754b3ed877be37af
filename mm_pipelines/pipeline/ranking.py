"""One ranked list across modalities, from a query vector in the unified space.

Raw cosines are not comparable across item kinds: in CLIP's space a text query is closer to
any text (captions, transcript segments, document chunks) than to the image it describes.
So each item kind is searched on its own (nearest rows per kind) and each cosine is
calibrated against what that kind scores for queries of the same modality in general:

- fitted on the index itself: a fixed sample of every kind's vectors; for text queries the
  index's own texts (captions, chunks, transcript segments) stand in for queries, for
  image queries its images and frames, for audio its sounds. For each (query modality,
  item kind) the mean and spread of the sample's cosines (self-pairs left out), shrunk
  towards the pooled values when a kind has few rows;
- a hit's `score` is the standard normal CDF of its z-score against those statistics: the
  share of unrelated (query, item) pairs of that kind it beats. 0.5 is a typical unrelated
  pair, 0.99 one that beats 99% of them, whatever the kind; so scores of different kinds
  mean the same thing and sort into one list, and one `min_score` cut-off fits them all.

Hits are folded into what a person looks for: an image once (by content hash, whether its
pixels or its caption matched), a video with its best moments (the same frame once), a
spoken passage, a document passage, a sound; each with the name of the file it was first
seen as. Nothing here loads a model: `pipeline.search` (the CLI, notebooks) and the serving
app both call `search_vector`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mm_pipelines.storage import catalog, vectors

KINDS = (
    "image",
    "caption",
    "video_frame",
    "text_chunk",
    "transcript_segment",
    "audio",
    "audio_window",
)
# which stored kinds stand in for a query of each modality
QUERY_STAND_INS = {
    "text": ("caption", "text_chunk", "transcript_segment"),
    "image": ("image", "video_frame"),
    "audio": ("audio", "audio_window"),
}
PRIOR_ROWS = 20  # pseudo-count pulling a small kind's statistics towards the pooled ones
MIN_STD = 0.01


@dataclass(frozen=True)
class KindStats:
    mean: float
    std: float
    rows: int  # how many vectors of the kind the index holds (at fitting time)


@dataclass(frozen=True)
class Calibration:
    """(query modality, item kind) -> cosine statistics of unrelated pairs."""

    projector_version: str
    stats: dict[tuple[str, str], KindStats]

    def z(self, query_modality: str, item_kind: str, cosine: float) -> float:
        s = self.stats.get((query_modality, item_kind))
        if s is None:
            return (cosine - 0.0) / 0.1  # nothing to fit on: a neutral guess
        return (cosine - s.mean) / s.std

    def score(self, query_modality: str, item_kind: str, cosine: float) -> float:
        return 0.5 * math.erfc(-self.z(query_modality, item_kind, cosine) / math.sqrt(2))


def fit_calibration(
    conn: Any, projector_version: str, per_kind: int = 256, max_queries: int = 256
) -> Calibration:
    """Fit the per-kind statistics on a fixed sample of the index (see the module doc)."""
    samples = vectors.sample_by_kind(conn, projector_version, per_kind)
    counts = vectors.kind_counts(conn, projector_version)
    stats: dict[tuple[str, str], KindStats] = {}
    for modality, stand_ins in QUERY_STAND_INS.items():
        present = [samples[k] for k in stand_ins if k in samples]
        if not present:
            continue
        queries = np.concatenate(present)[:max_queries]
        per_kind_sims = {}
        for kind, items in samples.items():
            sims = queries @ items.T
            per_kind_sims[kind] = sims[sims < 0.999]  # leave self-pairs and exact copies out
        pooled = np.concatenate([s for s in per_kind_sims.values() if s.size])
        if not pooled.size:
            continue
        p_mean, p_var = float(pooled.mean()), float(pooled.var())
        for kind, sims in per_kind_sims.items():
            n = min(len(samples[kind]), sims.size)
            k_mean = float(sims.mean()) if sims.size else p_mean
            k_var = float(sims.var()) if sims.size else p_var
            w = n / (n + PRIOR_ROWS)
            mean = w * k_mean + (1 - w) * p_mean
            var = w * k_var + (1 - w) * p_var
            stats[(modality, kind)] = KindStats(
                mean, max(MIN_STD, math.sqrt(var)), counts.get(kind, len(samples[kind]))
            )
    return Calibration(projector_version, stats)


class CalibrationCache:
    """One fitted calibration per projector version, refitted when the index changed (its
    largest row id moved) and at most every `refresh_s` seconds: a server fits once, not per
    query."""

    def __init__(self, refresh_s: float = 30.0) -> None:
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[Calibration, int, float]] = {}

    def get(self, conn: Any, projector_version: str) -> Calibration:
        with self._lock:
            entry = self._entries.get(projector_version)
            now = time.monotonic()
            if entry is not None and now - entry[2] < self.refresh_s:
                return entry[0]
            _, max_id = vectors.index_signature(conn, projector_version)
            if entry is not None and entry[1] == max_id:
                self._entries[projector_version] = (entry[0], max_id, now)
                return entry[0]
            fitted = fit_calibration(conn, projector_version)
            self._entries[projector_version] = (fitted, max_id, now)
            return fitted


# --------------------------------------------------------------------------- results


@dataclass
class Ranked:
    """The flat list (`hits`, best first) and the same hits by group."""

    query: str
    query_modality: str
    hits: list[dict[str, Any]] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    videos: list[dict[str, Any]] = field(default_factory=list)
    passages: list[dict[str, Any]] = field(default_factory=list)  # spoken
    documents: list[dict[str, Any]] = field(default_factory=list)  # text chunks
    sounds: list[dict[str, Any]] = field(default_factory=list)  # acoustic matches

    def as_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "query_modality": self.query_modality,
            "hits": self.hits,
            "groups": {
                g: getattr(self, g) for g in ("images", "videos", "passages", "documents", "sounds")
            },
        }


def name_of(uri: str | None) -> str:
    return (uri or "").rstrip("/").rsplit("/", 1)[-1]


def one_line(text: str | None) -> str:
    """Text as one line: newlines and runs of spaces become one space."""
    return " ".join((text or "").split())


def search_vector(
    conn: Any,
    vector: np.ndarray,
    query_modality: str,
    projector_version: str,
    *,
    query: str = "",
    k: int = 10,
    tenant: str | None = None,
    batches: Sequence[str] | None = None,
    modalities: Sequence[str] | None = None,
    item_kinds: Sequence[str] | None = None,
    min_score: float = 0.0,
    calibration: Calibration | None = None,
    per_kind: int | None = None,
    include_hidden: bool = False,
) -> Ranked:
    """Nearest rows of each item kind, calibrated, folded and ranked (module doc). What
    curation hides (flagged items, near-duplicates not kept) is left out unless
    `include_hidden` (evaluations of the ranking itself)."""
    calibration = calibration or fit_calibration(conn, projector_version)
    per_kind = per_kind or max(4 * k, 20)
    rows: list[dict[str, Any]] = []
    for kind in item_kinds or KINDS:
        filters = vectors.Filters(
            tenant=tenant,
            batches=batches,
            modalities=modalities,
            item_kinds=[kind],
            hide_curated=not include_hidden,
            projector_version=projector_version,
        )
        for row in vectors.search(conn, vector, per_kind, filters):
            row["cosine"] = float(row["score"])
            row["score"] = calibration.score(query_modality, kind, row["cosine"])
            rows.append(row)
    out = fold(rows, query, query_modality, k, min_score)
    _add_moments(conn, out, vector, projector_version, tenant, calibration, query_modality)
    _add_names(conn, out, tenant)
    return out


def fold(
    rows: list[dict[str, Any]], query: str, query_modality: str, k: int, min_score: float = 0.0
) -> Ranked:
    """Raw per-kind rows (with `score` calibrated and `cosine` raw) -> one hit per thing."""
    images: dict[str, dict] = {}
    videos: dict[str, dict] = {}
    passages: dict[tuple, dict] = {}
    documents: dict[tuple, dict] = {}
    sounds: dict[tuple, dict] = {}

    def keep(table: dict, key: Any, hit: dict) -> None:
        if key not in table or table[key]["score"] < hit["score"]:
            table[key] = hit

    for r in sorted(rows, key=lambda r: -r["score"]):
        if r["score"] < min_score:
            continue
        kind, modality = r["item_kind"], r["modality"]
        base = {
            "score": round(r["score"], 4),
            "cosine": round(r["cosine"], 4),
            "tenant": r["tenant"],
            "batch": r["batch"],
            "source_uri": r["source_uri"],
        }
        if kind == "image" or (kind == "caption" and modality == "image"):
            key = r["content_hash"] if kind == "image" else r["parent_hash"] or r["content_hash"]
            hit = {**base, "kind": "image", "content_hash": key, "matched_by": kind}
            if kind == "caption":
                hit["text"] = one_line(r["text"])
            keep(images, key, hit)
        elif kind == "video_frame" or (kind == "caption" and modality == "video"):
            key = r["parent_hash"] or r["content_hash"]
            video = videos.setdefault(
                key,
                {
                    **base,
                    "kind": "video",
                    "video_hash": key,
                    "matched_frames": [],
                    "matched_by": kind,
                },
            )
            if r["score"] > video["score"]:
                video.update(score=base["score"], cosine=base["cosine"], matched_by=kind)
            if kind == "video_frame":
                _add_moment(video, r["content_hash"], r["start_s"], base["score"])
        elif kind == "transcript_segment":
            key = (r["parent_hash"], r["start_s"])
            hit = {
                **base,
                "kind": "speech",
                "text": one_line(r["text"]),
                "start_s": r["start_s"],
                "end_s": r["end_s"],
                "source_hash": r["parent_hash"],
                "source_modality": modality,
                "matched_by": "text",
            }
            keep(passages, key, hit)
        elif kind == "text_chunk":
            key = (r["parent_hash"], r["chunk_index"])
            hit = {
                **base,
                "kind": "text",
                "text": one_line(r["text"]),
                "chunk_index": r["chunk_index"],
                "document_hash": r["parent_hash"],
            }
            keep(documents, key, hit)
        elif kind in ("audio", "audio_window"):
            source = r["parent_hash"] or r["content_hash"]
            key = source  # one hit per sound file: its best window
            hit = {
                **base,
                "kind": "sound",
                "source_hash": source,
                "start_s": r["start_s"],
                "end_s": r["end_s"],
                "source_modality": modality,
            }
            keep(sounds, key, hit)

    if query_modality == "text":  # for a sound as the query, the sound is the answer
        _merge_sounds_into_speech(sounds, passages)

    def top(table: dict) -> list[dict]:
        return sorted(table.values(), key=lambda h: -h["score"])[:k]

    out = Ranked(query, query_modality, [], top(images), top(videos))
    out.passages, out.documents, out.sounds = top(passages), top(documents), top(sounds)
    every = out.images + out.videos + out.passages + out.documents + out.sounds
    out.hits = sorted(every, key=lambda h: -h["score"])[:k]
    for rank, hit in enumerate(out.hits, start=1):
        hit["rank"] = rank
    return out


def _merge_sounds_into_speech(sounds: dict, passages: dict) -> None:
    """For a text query, a sound that is a found spoken passage (same file, overlapping
    time) is that passage: one hit, ranked by its text (the audio head only approximates
    the transcript's place in the space)."""
    for key, sound in list(sounds.items()):
        for passage in passages.values():
            if passage["source_hash"] != sound["source_hash"]:
                continue
            start, end = sound["start_s"], sound["end_s"]
            if start is None or (start < passage["end_s"] and passage["start_s"] < end):
                del sounds[key]
                break


def _add_moment(video: dict, frame_hash: str, t: float | None, score: float) -> None:
    """The same frame (same content, e.g. sampled by two strategies) is one moment."""
    for m in video["matched_frames"]:
        if m["frame_hash"] == frame_hash:
            m["timestamp_s"] = min(m["timestamp_s"], t or 0.0)
            m["score"] = max(m["score"], score)
            return
    video["matched_frames"].append(
        {"timestamp_s": t or 0.0, "score": score, "frame_hash": frame_hash}
    )
    video["matched_frames"].sort(key=lambda m: -m["score"])


def _add_moments(
    conn: Any,
    out: Ranked,
    vector: np.ndarray,
    projector_version: str,
    tenant: str | None,
    calibration: Calibration,
    query_modality: str,
) -> None:
    """A video found through its caption gets its best-matching frames too: every video hit
    names a moment to open it at."""
    bare = [v for v in out.videos if not v["matched_frames"]]
    for video in bare:
        filters = vectors.Filters(
            tenant=tenant,
            item_kinds=["video_frame"],
            parent_hashes=[video["video_hash"]],
            projector_version=projector_version,
        )
        for row in vectors.search(conn, vector, 3, filters):
            score = calibration.score(query_modality, "video_frame", float(row["score"]))
            _add_moment(video, row["content_hash"], row["start_s"], round(score, 4))
        if not video["matched_frames"]:  # a video without sampled frames: from its start
            video["matched_frames"].append(
                {"timestamp_s": 0.0, "score": video["score"], "frame_hash": None}
            )


def _add_names(conn: Any, out: Ranked, tenant: str | None) -> None:
    """Every hit names the file it was first seen as (a duplicate upload shows the original)."""
    every = out.images + out.videos + out.passages + out.documents + out.sounds

    def source(hit: dict) -> str | None:
        return (
            hit.get("content_hash")
            or hit.get("video_hash")
            or hit.get("source_hash")
            or (hit.get("document_hash"))
        )

    first = catalog.first_sources(conn, sorted({s for h in every if (s := source(h))}), tenant)
    for hit in every:
        found = first.get(source(hit) or "")
        if found is not None:
            hit["source_uri"], hit["batch"] = found["source_uri"], found["batch"]
        hit["name"] = name_of(hit.get("source_uri"))
        hit["media_hash"] = source(hit)
        if hit["kind"] == "video":
            hit["thumb_hash"] = (
                hit["matched_frames"][0]["frame_hash"] if hit["matched_frames"] else None
            )
        elif hit["kind"] == "image":
            hit["thumb_hash"] = hit["content_hash"]
