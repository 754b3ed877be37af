"""The curation resource: which heads, which captioner and which per-tenant policy."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from mm_pipelines import settings
from mm_pipelines.pipeline.curate.config import CurationChoice, CurationPolicy


class CurationResource(dg.ConfigurableResource):
    """Empty head paths: the heads `content_heads` trains from labelled catalog items;
    empty captioner: the CLIP zero-shot tagger over `caption_vocabulary` (empty: the demo's
    shapes vocabulary); `policy`: JSON or a file path (see pipeline/curate/config.py)."""

    aesthetic_head: str = Field(default="", description="MM_AESTHETIC_HEAD")
    safety_head: str = Field(default="", description="MM_SAFETY_HEAD")
    text_safety_head: str = Field(default="", description="MM_TEXT_SAFETY_HEAD")
    captioner: str = Field(default="", description="transformers image-to-text model dir")
    caption_vocabulary: str = Field(default="", description="tagger vocabulary file")
    policy: str = Field(default="", description="MM_CURATION_POLICY: JSON or a file path")

    def get_choice(self) -> CurationChoice:
        return CurationChoice(
            self.aesthetic_head,
            self.safety_head,
            self.text_safety_head,
            self.captioner,
            self.caption_vocabulary,
            CurationPolicy.load(self.policy),
        )

    @classmethod
    def from_settings(cls) -> CurationResource:
        return cls(
            aesthetic_head=settings.aesthetic_head(),
            safety_head=settings.safety_head(),
            text_safety_head=settings.text_safety_head(),
            captioner=settings.captioner(),
            caption_vocabulary=settings.caption_vocabulary(),
            policy=settings.curation_policy(),
        )
