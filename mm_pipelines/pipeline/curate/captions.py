"""`captions`: a caption for every image and sampled video frame of a batch.

The manifest's caption is stored with source `manifest` and always wins; a model writes
one with source `model:<version>` and a confidence: the configured transformers captioner
(`MM_CAPTIONER`), or the CLIP zero-shot tagger over a vocabulary, which reads the image
vectors `clip_embeddings` stored (no image is decoded again). A picture already captioned
by the same model version is skipped.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from mm_pipelines.pipeline.curate.config import CurationChoice
from mm_pipelines.pipeline.services import Services
from mm_pipelines.storage import curation as db
from mm_pipelines.storage import embeddings
from mm_pipelines.storage.postgres import connect

if TYPE_CHECKING:
    from mm_pipelines.models.curation.tagger import ZeroShotTagger

Log = Callable[[str], None]
CAPTIONER_BATCH = 16


def _quiet(_: str) -> None:
    pass


@dataclass
class CaptionResult:
    source: str  # model:<version>
    pictures: int = 0
    from_manifest: int = 0
    captioned_now: int = 0
    already_captioned: int = 0
    not_embedded: int = 0  # tagger only: pictures without a CLIP vector yet
    manifest_agreement: float | None = None  # model caption == manifest caption, where both
    mean_confidence: float | None = None
    samples: list[tuple[str, str, float]] = field(default_factory=list)  # hash, caption, conf


def _tagger(svc: Services, choice: CurationChoice) -> ZeroShotTagger:
    # torch and open_clip load when a step captions, not when Dagster loads the definitions
    from mm_pipelines.models.curation.tagger import ZeroShotTagger, demo_vocabulary, load_vocabulary

    path = choice.caption_vocabulary
    return ZeroShotTagger(svc.load_clip(), load_vocabulary(path) if path else demo_vocabulary())


def caption_batch(
    svc: Services, choice: CurationChoice, batch: str, log: Log = _quiet
) -> CaptionResult:
    with connect(svc.need_dsn()) as conn:
        items = [
            i
            for i in embeddings.batch_items(conn, batch, None)
            if i.item_kind in ("image", "video_frame")
        ]
        kinds = {i.content_hash: i.item_kind for i in items}
        manifest = db.manifest_captions(conn, batch)
        db.save_captions(
            conn, [db.CaptionRow(h, "manifest", c, 1.0, "image") for h, c in manifest.items()]
        )
        if choice.captioner:
            written, result = _with_captioner(svc, choice, conn, kinds)
        else:
            written, result = _with_tagger(svc, choice, conn, items)
        db.save_captions(conn, written)
        result.pictures, result.from_manifest = len(kinds), len(manifest)
        result.captioned_now = len(written)
        mine = {
            r["content_hash"]: r["caption"]
            for r in db.caption_rows(conn, list(kinds))
            if r["source"] == result.source
        }
    both = [h for h in manifest if h in mine]
    if both:
        result.manifest_agreement = sum(mine[h] == manifest[h] for h in both) / len(both)
    if written:
        result.mean_confidence = sum(r.confidence or 0.0 for r in written) / len(written)
        result.samples = [(r.content_hash, r.caption, r.confidence or 0.0) for r in written[:8]]
    log(f"{len(written)} pictures captioned by {result.source}")
    return result


def _with_tagger(
    svc: Services, choice: CurationChoice, conn, items: list[embeddings.Item]
) -> tuple[list[db.CaptionRow], CaptionResult]:
    tagger = _tagger(svc, choice)
    result = CaptionResult(f"model:{tagger.version}")
    hashes = sorted({i.content_hash for i in items})
    done = db.captioned(conn, hashes, result.source)
    result.already_captioned = len(done)
    todo = [i for i in items if i.content_hash not in done]
    rows = {}
    for r in embeddings.load(conn, [i.item_key for i in todo], tagger.clip_version):
        rows.setdefault(r["content_hash"], r)  # frames with the same pixels share one caption
    result.not_embedded = len({i.content_hash for i in todo} - set(rows))
    ordered = list(rows.values())
    tags = tagger.tag(db.as_matrix(ordered, tagger.embed_dim))
    written = [
        db.CaptionRow(r["content_hash"], result.source, t.caption, t.confidence, r["item_kind"])
        for r, t in zip(ordered, tags, strict=True)
    ]
    return written, result


def _with_captioner(
    svc: Services, choice: CurationChoice, conn, kinds: dict[str, str]
) -> tuple[list[db.CaptionRow], CaptionResult]:
    from mm_pipelines.models.curation.captioner import ImageCaptioner

    captioner = ImageCaptioner(Path(choice.captioner), device=svc.compute.torch_device())
    result = CaptionResult(f"model:{captioner.version}")
    done = db.captioned(conn, list(kinds), result.source)
    result.already_captioned = len(done)
    todo = sorted(set(kinds) - done)
    store = svc.need_media()
    written: list[db.CaptionRow] = []
    for start in range(0, len(todo), CAPTIONER_BATCH):
        chunk = todo[start : start + CAPTIONER_BATCH]
        images = [Image.open(io.BytesIO(store.read_bytes(h))).convert("RGB") for h in chunk]
        for h, (text, conf) in zip(chunk, captioner.caption(images), strict=True):
            if text:
                written.append(db.CaptionRow(h, result.source, text, conf, kinds[h]))
    return written, result
