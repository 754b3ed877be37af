"""Cross-modal search: a text, image or audio query -> ranked images, video moments,
spoken passages and document passages from the unified index."""

from __future__ import annotations

from dataclasses import dataclass
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
from mm_pipelines.pipeline import ranking
from mm_pipelines.pipeline.ranking import Ranked


class SearchError(ValueError):
    """A query that cannot be answered: say why, in words a user can act on."""


SearchResults = Ranked  # the flat list `hits` and the groups (images, videos, ...)


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

    @classmethod
    def from_services(cls, svc: Any, audio: bool = True) -> QueryModels:
        """The configured CLIP, projector and (unless `audio` is off) Whisper, on the compute
        device: what `mm search`, the demo and training-set selection query with."""
        architecture, checkpoint = svc.clip_source()
        whisper = svc.choice.whisper_model if audio else None
        device = svc.compute.torch_device()
        return cls.load(architecture, checkpoint, svc.projector_dir(), whisper, device=device)

    def audio(self) -> audio_embed.WhisperEncoder:
        if self._audio is None:
            self._audio = audio_embed.load_whisper_encoder(
                self.whisper_model, device=str(self.clip.device)
            )
        return self._audio


def embed_query(models: QueryModels, query: str | Path) -> np.ndarray:
    """A text, or the path of an image / audio / video file, as a unified-space vector."""
    return embed_query_as(models, query)[0]


def embed_query_as(models: QueryModels, query: str | Path) -> tuple[np.ndarray, str]:
    """(unified-space vector, query modality: text | image | audio)."""
    if isinstance(query, Path):
        if not query.is_file():
            raise SearchError(f"{query}: no such file")
        kind = filetype.guess(str(query))
        mime = kind.mime if kind else "unknown"
        if mime.startswith("image/"):
            result = clip_encode.encode_images(models.clip, [query], num_workers=0)
            if result.errors:
                raise SearchError(f"{query}: the image does not decode ({result.errors[0]})")
            return models.projector.project("image", result.vectors[0]), "image"
        if mime.startswith(("audio/", "video/")):
            try:
                audio = speech.load_audio(query)
            except speech.AudioDecodeError as err:
                raise SearchError(f"{query}: no usable sound ({err.reason})") from err
            vector = audio_embed.embed_audio(models.audio(), audio)
            return models.projector.project("audio", vector), "audio"
        raise SearchError(
            f"{query}: unsupported query format ({mime}); use text, an image or an audio/video file"
        )
    if not query.strip():
        raise SearchError("empty query text")
    vector = clip_encode.encode_text_query(models.clip, query)
    return models.projector.project("text", vector), "text"


def search(
    conn: psycopg.Connection,
    models: QueryModels,
    query: str | Path,
    k: int = 5,
    tenant: str | None = None,
    batches: list[str] | None = None,
    modalities: list[str] | None = None,
    min_score: float = 0.0,
    item_kinds: list[str] | None = None,
) -> Ranked:
    """One ranked list across modalities (`hits`) and the same hits by group; see
    `pipeline.ranking` for how scores of different kinds are made comparable."""
    version = models.projector.version
    if not conn.execute(
        "SELECT EXISTS (SELECT 1 FROM unified_vectors WHERE projector_version = %s)", (version,)
    ).fetchone()[0]:
        raise SearchError(
            f"the index has no vectors of projector {version}: materialize vector_index "
            "for a batch first (mm demo does)"
        )
    vector, modality = embed_query_as(models, query)
    return ranking.search_vector(
        conn,
        vector,
        modality,
        version,
        query=str(query),
        k=k,
        tenant=tenant,
        batches=batches,
        modalities=modalities,
        item_kinds=item_kinds,
        min_score=min_score,
    )
