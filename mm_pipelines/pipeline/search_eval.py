"""How well one ranked list serves a description: the rank of the described image (its
pixels only: its caption is left out of the index search) in the flat list of everything
else the index holds (other images, video moments, speech, texts, sounds)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mm_pipelines.pipeline import ranking
from mm_pipelines.pipeline.search import QueryModels, embed_query_as

PIXELS_ONLY = [k for k in ranking.KINDS if k != "caption"]


@dataclass(frozen=True)
class Placement:
    query: str
    rank: int | None  # 1-based place of the described image in the flat list (None: absent)
    score: float | None
    next_best: float | None  # the best score of anything else in the list
    fourth: float | None  # the score at place 4 (what the image must beat for a top 3)


def place(
    conn: Any,
    models: QueryModels,
    described: Iterable[tuple[str, set[str]]],
    k: int = 10,
    raw_cosine: bool = False,
    tenant: str | None = None,
) -> list[Placement]:
    """For each (query, acceptable image names): where the image lands. `raw_cosine` ranks
    by uncalibrated cosines instead (the baseline this replaces). Items curation hides are
    searched too: this measures the ranking, not the policy (tested on its own)."""
    version = models.projector.version
    calibration = ranking.fit_calibration(conn, version)
    if raw_cosine:
        calibration = ranking.Calibration(version, {})
    out = []
    for query, names in described:
        vector, modality = embed_query_as(models, query)
        result = ranking.search_vector(
            conn,
            vector,
            modality,
            version,
            query=query,
            k=k,
            tenant=tenant,
            item_kinds=PIXELS_ONLY,
            calibration=calibration,
            include_hidden=True,
        )
        hits = sorted(result.hits, key=lambda h: -(h["cosine"] if raw_cosine else h["score"]))
        value = [h["cosine"] if raw_cosine else h["score"] for h in hits]
        rank = next(
            (i for i, h in enumerate(hits, 1) if h["kind"] == "image" and h["name"] in names),
            None,
        )
        others = [v for i, v in enumerate(value, 1) if i != rank]
        out.append(
            Placement(
                query,
                rank,
                value[rank - 1] if rank else None,
                others[0] if others else None,
                value[3] if len(value) > 3 else None,
            )
        )
    return out


def summary(placements: list[Placement]) -> dict[str, Any]:
    n = len(placements)
    ranks = [p.rank for p in placements]
    margins = [p.score - p.fourth for p in placements if p.rank and p.rank <= 3 and p.fourth]
    return {
        "queries": n,
        "top1": round(sum(r == 1 for r in ranks) / n, 3) if n else None,
        "top3": round(sum(r is not None and r <= 3 for r in ranks) / n, 3) if n else None,
        "mean_rank_found": round(
            sum(r for r in ranks if r) / max(1, sum(1 for r in ranks if r)), 2
        ),
        "min_margin_over_4th": round(min(margins), 4) if margins else None,
        "misses": [p.query for p in placements if not (p.rank and p.rank <= 3)],
    }
