"""How curation shapes a LoRA training set: which selected images stay (no flagged item,
no two near-duplicates, a minimum aesthetic score if the subject asks), and the captions
they are trained with (kohya-ss conventions: a trigger-token prefix, caption dropout,
shuffled comma-separated tokens with the first N kept in place)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mm_pipelines.models.curation import dedup
from mm_pipelines.models.curation.kohya import caption_variants, kohya_caption
from mm_pipelines.pipeline.curate.config import AESTHETIC
from mm_pipelines.storage import curation as db
from mm_pipelines.storage.generated import CatalogImage

__all__ = ["caption_variants", "curate_selection", "kohya_caption", "training_captions"]


@dataclass
class CuratedSelection:
    kept: list[CatalogImage]
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (content hash, why)


def curate_selection(
    conn: Any, rows: Sequence[CatalogImage], min_aesthetic: float | None = None
) -> CuratedSelection:
    """Drop flagged images, images under the subject's minimum aesthetic score (or with
    none), and all but one image of every near-duplicate group among the rest (the
    largest, then the oldest: the catalog's keep-one policy)."""
    out = CuratedSelection([])
    hashes = [r.content_hash for r in rows]
    flags = {
        (f["tenant"], f["content_hash"]): f
        for f in db.flags_of(conn, [(r.tenant, r.content_hash) for r in rows])
    }
    scores = db.latest_scores(conn, hashes, AESTHETIC) if min_aesthetic is not None else {}
    candidates = []
    for r in rows:
        flag = flags.get((r.tenant, r.content_hash))
        if flag is not None:
            out.left_out.append((r.content_hash, f"flagged: {flag['reason']}"))
        elif min_aesthetic is not None and r.content_hash not in scores:
            out.left_out.append(
                (r.content_hash, "no aesthetic score yet (materialize content_scores)")
            )
        elif min_aesthetic is not None and scores[r.content_hash] < min_aesthetic:
            out.left_out.append(
                (r.content_hash, f"aesthetic {scores[r.content_hash]:.3f} < {min_aesthetic:g}")
            )
        else:
            candidates.append(r)
    dropped = _duplicates_to_drop(conn, candidates)
    for r in candidates:
        if r.content_hash in dropped:
            out.left_out.append((r.content_hash, f"near-duplicate of {dropped[r.content_hash]}"))
        else:
            out.kept.append(r)
    return out


def _duplicates_to_drop(conn: Any, rows: Sequence[CatalogImage]) -> dict[str, str]:
    """content hash -> the kept image, for every non-keeper of a group among `rows`."""
    tenant_of = {r.content_hash: r.tenant for r in rows}
    drop: dict[str, str] = {}
    for group in dedup.groups(db.pairs_among(conn, list(tenant_of))):
        tenant = tenant_of[min(group)]
        facts = db.picture_facts(conn, tenant, sorted(group))
        keep = dedup.keeper(
            [
                dedup.Picture(f["content_hash"], f["width"], f["height"], f["first_seen"])
                for f in facts
            ]
            or [dedup.Picture(h, None, None, None) for h in group]
        )
        drop.update({h: keep for h in group if h != keep})
    return drop


# --------------------------------------------------------------------------- captions


def training_captions(
    conn: Any, rows: Sequence[CatalogImage], trigger: str
) -> tuple[dict[str, str], Counter]:
    """content hash -> training caption (`trigger, caption`), and how many came from each
    source: the manifest's caption wins, else the newest model caption, else the trigger."""
    generated = db.effective_captions(conn, [r.content_hash for r in rows])
    out: dict[str, str] = {}
    sources: Counter = Counter()
    for r in rows:
        if r.caption:
            text, source = r.caption, "manifest"
        elif r.content_hash in generated:
            text, source = generated[r.content_hash]["caption"], generated[r.content_hash]["source"]
        else:
            text, source = "", "none"
        sources["model" if source.startswith("model:") else source] += 1
        out[r.content_hash] = ", ".join(t for t in (trigger, text) if t)
    return out, sources
