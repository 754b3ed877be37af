"""`near_duplicates`: for every image and sampled video frame of a batch, its
near-duplicates across the whole catalog of the same tenant.

Two passes, each recorded with its own method version:
- perceptual hash (pHash, 64 bits) within `phash_max_distance` bits and a colour
  signature within `colour_max_distance`: near-exact copies (re-encodes, resizes, small
  crops, brightness, overlays), compared in Postgres with pgvector's Hamming (bit(64))
  and L1 (vector(48)) distances;
- CLIP image vectors through the HNSW index (cosine >= `clip_threshold`): semantic
  duplicates, mirrored copies and heavier edits.

Frames of the same video are never paired with each other (consecutive frames are
alike by nature). A picture checked once per tenant and method version is not checked
again: a new batch's pictures are searched against everything (old batches included),
old pictures are not searched again, and each unordered pair is stored once.

Keep-one: duplicate groups are the connected components of the image pairs of a tenant;
each keeps its largest image (then the oldest); the others leave search results and
training sets (view `curation_hidden`). Frames are linked but never hidden: a video is not
a duplicate of a photo because one of its frames is.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from mm_pipelines.models.curation import dedup
from mm_pipelines.pipeline.services import Services
from mm_pipelines.storage import curation as db
from mm_pipelines.storage import vectors
from mm_pipelines.storage.postgres import connect

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class DedupConfig:
    # SemDeDup keeps pairs above ~0.9-0.95 for real CLIPs. The demo CLIP (held-out recall@1
    # 0.996): mirrored, cropped, brightened copies >= 0.89, distinct shapes <= 0.82
    clip_threshold: float = 0.9
    phash_max_distance: int = 16
    colour_max_distance: float = 0.2
    neighbours: int = 16  # HNSW candidates per picture

    def clip_version(self, encoder_version: str) -> str:
        return f"clip:{encoder_version}:cos>={self.clip_threshold:g}"

    def phash_version(self) -> str:
        return dedup.phash_version(self.phash_max_distance, self.colour_max_distance)


@dataclass
class DedupResult:
    pictures: int = 0
    checked_now: int = 0
    already_checked: int = 0
    phashes_computed: int = 0
    pairs_found: dict[str, int] = field(default_factory=dict)  # by method
    tenants: int = 0
    groups_in_batch: int = 0
    hidden_in_batch: int = 0
    method_versions: list[str] = field(default_factory=list)
    # groups with a picture of this batch: [(label, image bytes)], keeper first
    galleries: list[list[tuple[str, bytes]]] = field(default_factory=list)


def find_near_duplicates(
    svc: Services, batch: str, cfg: DedupConfig = DedupConfig(), log: Log = _quiet
) -> DedupResult:
    store = svc.need_media()
    result = DedupResult()
    with connect(svc.need_dsn()) as conn:
        pictures = db.batch_pictures(conn, batch)
        result.pictures = len({p["content_hash"] for p in pictures})
        if not pictures:
            return result
        encoders = db.batch_encoder_versions(conn, batch)
        if not encoders:
            raise ValueError(
                f"batch {batch!r} has pictures but no image vectors in the index: materialize "
                "clip_embeddings, unified_embeddings and vector_index for it first"
            )
        pv = cfg.phash_version()
        result.phashes_computed = _ensure_phashes(conn, store, pictures)
        versions = [pv, *(cfg.clip_version(e) for e in encoders)]
        result.method_versions = versions
        tenants = sorted({p["tenant"] for p in pictures})
        result.tenants = len(tenants)
        for tenant in tenants:
            mine = [p for p in pictures if p["tenant"] == tenant]
            n = _phash_pass(conn, tenant, mine, pv, cfg, batch, result)
            result.pairs_found["phash"] = result.pairs_found.get("phash", 0) + n
            for encoder in encoders:
                n = _clip_pass(conn, tenant, batch, encoder, cfg, result)
                result.pairs_found["clip"] = result.pairs_found.get("clip", 0) + n
            _keep_one(conn, tenant, versions)
            _describe(conn, store, tenant, mine, result)
        log(f"{result.checked_now} pictures checked, pairs: {result.pairs_found}")
    return result


def _ensure_phashes(conn: Any, store: Any, pictures: list[dict]) -> int:
    """Perceptual signatures of pictures that have none of this version yet."""
    version = dedup.signature_version()
    hashes = sorted({p["content_hash"] for p in pictures})
    known = db.known_signatures(conn, hashes, version)
    new: dict[str, tuple[str, Any]] = {}
    for h in hashes:
        if h in known:
            continue
        with Image.open(io.BytesIO(store.read_bytes(h))) as im:
            rgb = im.convert("RGB")
        new[h] = (dedup.phash_bits(rgb), dedup.colour_signature(rgb))
    if new:
        db.save_signatures(conn, new, version)
    return len(new)


def _same_video(a: str | None, b: str | None) -> bool:
    return a is not None and a == b


def _phash_pass(
    conn: Any,
    tenant: str,
    mine: list[dict],
    version: str,
    cfg: DedupConfig,
    batch: str,
    result: DedupResult,
) -> int:
    by_hash = {p["content_hash"]: p for p in mine}
    todo = sorted(set(by_hash) - db.checked(conn, tenant, list(by_hash), version))
    result.checked_now += len(todo)
    result.already_checked += len(by_hash) - len(todo)
    pairs = []
    matches = db.phash_matches(
        conn, tenant, todo, dedup.signature_version(), cfg.phash_max_distance,
        cfg.colour_max_distance,
    )  # fmt: skip
    for m in matches:
        q, other = by_hash[m["query_hash"]], m["content_hash"]
        if _same_video(q["parent_hash"], m["parent_hash"]):
            continue
        pairs.append(
            db.DuplicatePair(
                tenant,
                q["content_hash"],
                other,
                q["item_kind"],
                m["item_kind"],
                dedup.phash_similarity(m["distance"]),
                "phash",
                version,
                batch,
            )
        )
    return db.save_pairs(conn, _unique(pairs), tenant, todo, version, batch)


def _clip_pass(
    conn: Any, tenant: str, batch: str, encoder: str, cfg: DedupConfig, result: DedupResult
) -> int:
    version = cfg.clip_version(encoder)
    rows = [r for r in db.batch_picture_vectors(conn, batch, encoder) if r["tenant"] == tenant]
    by_hash = {r["content_hash"]: r for r in rows}
    todo = set(by_hash) - db.checked(conn, tenant, list(by_hash), version)
    filters = vectors.Filters(
        tenant=tenant, item_kinds=db.PICTURE_KINDS, encoder_version=encoder, hide_curated=False
    )
    pairs = []
    order = sorted(todo)
    found = vectors.search_many(
        conn, np.stack([by_hash[h]["embedding"] for h in order]) if order else np.zeros((0, 1)),
        cfg.neighbours, filters,
    )  # fmt: skip
    for h, hits in zip(order, found, strict=True):
        q = by_hash[h]
        for hit in hits:
            other = hit["content_hash"]
            if other == h or hit["score"] < cfg.clip_threshold:
                continue
            if _same_video(q["parent_hash"], hit["parent_hash"]):
                continue
            pairs.append(
                db.DuplicatePair(
                    tenant,
                    h,
                    other,
                    q["item_kind"],
                    hit["item_kind"],
                    min(1.0, float(hit["score"])),
                    "clip",
                    version,
                    batch,
                )  # fmt: skip
            )
    return db.save_pairs(conn, _unique(pairs), tenant, sorted(todo), version, batch)


def _unique(pairs: list[db.DuplicatePair]) -> list[db.DuplicatePair]:
    """One pair per unordered (item, other), the most similar (a picture can be several
    index rows: an image in two batches, a frame shared by two videos)."""
    best: dict[tuple[str, str], db.DuplicatePair] = {}
    for p in pairs:
        key = tuple(sorted((p.item_hash, p.duplicate_of)))
        if key not in best or best[key].similarity < p.similarity:
            best[key] = p  # type: ignore[index]
    return list(best.values())


def _keep_one(conn: Any, tenant: str, versions: list[str]) -> None:
    """Recompute the tenant's image groups and keepers from its pairs of these versions."""
    pairs = [
        (p["item_hash"], p["duplicate_of"])
        for p in db.tenant_pairs(conn, tenant, versions)
        if p["item_kind"] == "image" and p["duplicate_kind"] == "image"
    ]
    members: dict[str, tuple[str, int]] = {}
    for group in dedup.groups(pairs):
        facts = db.picture_facts(conn, tenant, sorted(group))
        keep = dedup.keeper(
            [
                dedup.Picture(f["content_hash"], f["width"], f["height"], f["first_seen"])
                for f in facts
            ]
        )
        members.update({h: (keep, len(group)) for h in group})
    db.replace_groups(conn, tenant, members, dedup.KEEP_ONE_POLICY)


def _describe(conn: Any, store: Any, tenant: str, mine: list[dict], result: DedupResult) -> None:
    """Groups that hold one of the batch's images, as thumbnail rows (keeper first)."""
    rows = db.groups_of(conn, tenant, [p["content_hash"] for p in mine])
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["keeper_hash"], []).append(r)
    mine_hashes = {p["content_hash"] for p in mine}
    result.groups_in_batch += len(groups)
    result.hidden_in_batch += sum(
        1
        for r in rows
        if r["content_hash"] in mine_hashes and r["content_hash"] != r["keeper_hash"]
    )
    for keeper, members in list(groups.items())[: 12 - len(result.galleries)]:
        result.galleries.append(
            [
                (
                    ("kept " if m["content_hash"] == keeper else "") + m["content_hash"][:10],
                    store.read_bytes(m["content_hash"]),
                )
                for m in members[:8]
            ]
        )
