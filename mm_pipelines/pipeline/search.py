"""Cross-modal search: a text, image or audio query -> ranked images, video moments,
spoken passages and document passages from the unified index."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filetype
import numpy as np
import psycopg

from mm_pipelines.models.clip import encode as clip_encode
from mm_pipelines.models.clip import loading as clip_models
from mm_pipelines.models.speech import audio_encoder as audio_embed
from mm_pipelines.models.speech import whisper as speech
from mm_pipelines.models.unified.projector import UnifiedProjector, load_projector
from mm_pipelines.storage import vectors
from mm_pipelines.storage.vectors import Filters


class SearchError(ValueError):
    """A query that cannot be answered: say why, in words a user can act on."""


@dataclass
class SearchResults:
    query: str
    images: list[dict[str, Any]] = field(default_factory=list)
    videos: list[dict[str, Any]] = field(default_factory=list)  # with matched_frames
    passages: list[dict[str, Any]] = field(default_factory=list)  # spoken: text + start/end
    documents: list[dict[str, Any]] = field(default_factory=list)  # text chunks
    sounds: list[dict[str, Any]] = field(default_factory=list)  # acoustic matches

    def as_dict(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in ("query", "images", "videos", "passages", "documents", "sounds")
        }


@dataclass
class QueryModels:
    clip: clip_models.ClipBundle
    projector: UnifiedProjector
    whisper_model: str | None = None
    _audio: audio_embed.WhisperEncoder | None = None

    @classmethod
    def load(
        cls,
        architecture: str,
        checkpoint: str,
        projector_dir: str | Path,
        whisper_model: str | None = None,
        device: str = "cpu",
    ) -> QueryModels:
        return cls(
            clip_models.load_clip(architecture, checkpoint, device=device),
            load_projector(projector_dir, device=device),
            whisper_model,
        )

    def audio(self) -> audio_embed.WhisperEncoder:
        if self._audio is None:
            self._audio = audio_embed.load_whisper_encoder(
                self.whisper_model, device=str(self.clip.device)
            )
        return self._audio


def embed_query(models: QueryModels, query: str | Path) -> np.ndarray:
    """A text, or the path of an image / audio / video file, as a unified-space vector."""
    if isinstance(query, Path):
        if not query.is_file():
            raise SearchError(f"{query}: no such file")
        kind = filetype.guess(str(query))
        mime = kind.mime if kind else "unknown"
        if mime.startswith("image/"):
            result = clip_encode.encode_images(models.clip, [query], num_workers=0)
            if result.errors:
                raise SearchError(f"{query}: the image does not decode ({result.errors[0]})")
            return models.projector.project("image", result.vectors[0])
        if mime.startswith(("audio/", "video/")):
            try:
                audio = speech.load_audio(query)
            except speech.AudioDecodeError as err:
                raise SearchError(f"{query}: no usable sound ({err.reason})") from err
            return models.projector.project("audio", audio_embed.embed_audio(models.audio(), audio))
        raise SearchError(
            f"{query}: unsupported query format ({mime}); use text, an image or an audio/video file"
        )
    if not query.strip():
        raise SearchError("empty query text")
    return models.projector.project("text", clip_encode.encode_text_query(models.clip, query))


def search(
    conn: psycopg.Connection,
    models: QueryModels,
    query: str | Path,
    k: int = 5,
    tenant: str | None = None,
    batches: list[str] | None = None,
    modalities: list[str] | None = None,
) -> SearchResults:
    version = models.projector.version
    if not conn.execute(
        "SELECT EXISTS (SELECT 1 FROM unified_vectors WHERE projector_version = %s)", (version,)
    ).fetchone()[0]:
        raise SearchError(
            f"the index has no vectors of projector {version}: materialize vector_index "
            "for a batch first (mm demo does)"
        )
    vector = embed_query(models, query)
    filters = Filters(
        tenant=tenant, batches=batches, modalities=modalities, projector_version=version
    )
    hits = vectors.search(conn, vector, k * 8, filters)
    return group_hits(str(query), hits, k)


def group_hits(query: str, hits: list[dict[str, Any]], k: int) -> SearchResults:
    """Fold raw nearest rows into what a person looks for: an image once (its own pixels or
    its caption, whichever scores higher), a video with its best moments, passages."""
    out = SearchResults(query)
    images: dict[str, dict] = {}
    videos: dict[str, dict] = defaultdict(lambda: {"matched_frames": [], "score": -1.0})
    for h in hits:
        score = round(float(h["score"]), 4)
        kind = h["item_kind"]
        base = {
            "score": score,
            "tenant": h["tenant"],
            "batch": h["batch"],
            "source_uri": h["source_uri"],
        }
        if kind in ("image", "caption") and h["modality"] == "image":
            key = h["content_hash"] if kind == "image" else h["parent_hash"]
            if key not in images or images[key]["score"] < score:
                images[key] = {**base, "content_hash": key, "matched_by": kind}
        elif kind == "video_frame" or (kind == "caption" and h["modality"] == "video"):
            video = videos[h["parent_hash"]]
            video.update({k2: v for k2, v in base.items() if k2 != "score"})
            video["video_hash"] = h["parent_hash"]
            video["score"] = max(video["score"], score)
            if kind == "video_frame":
                video["matched_frames"].append(
                    {"timestamp_s": h["start_s"], "score": score, "frame_hash": h["content_hash"]}
                )
        elif kind == "transcript_segment":
            out.passages.append(
                {
                    **base,
                    "text": h["text"],
                    "start_s": h["start_s"],
                    "end_s": h["end_s"],
                    "source_hash": h["parent_hash"],
                    "source_modality": h["modality"],
                }
            )
        elif kind == "text_chunk":
            out.documents.append(
                {
                    **base,
                    "text": h["text"],
                    "chunk_index": h["chunk_index"],
                    "document_hash": h["parent_hash"],
                }
            )
        elif kind in ("audio", "audio_window"):
            out.sounds.append(
                {
                    **base,
                    "source_hash": h["parent_hash"] or h["content_hash"],
                    "start_s": h["start_s"],
                    "end_s": h["end_s"],
                    "source_modality": h["modality"],
                }
            )
    out.images = sorted(images.values(), key=lambda r: -r["score"])[:k]
    for video in videos.values():
        video["matched_frames"].sort(key=lambda f: -f["score"])
    out.videos = sorted(videos.values(), key=lambda r: -r["score"])[:k]
    out.passages = out.passages[:k]
    out.documents = out.documents[:k]
    out.sounds = out.sounds[:k]
    return out
