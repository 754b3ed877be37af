"""Encoder-space vectors of catalog items, and the list of what a batch has to embed."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import psycopg
from psycopg.rows import dict_row

from mm_pipelines.storage.vectors import to_array


@dataclass(frozen=True)
class Item:
    """One thing of a batch to embed, with the lineage its vector will carry."""

    item_key: str
    item_kind: str  # image | video_frame | caption | text_doc | transcript_segment | audio
    modality: str  # of the source: image | video | audio | text
    content_hash: str
    parent_hash: str | None = None
    start_s: float | None = None
    end_s: float | None = None
    part: int | None = None
    text: str | None = None
    tenant: str = "default"
    source_uri: str | None = None
    text_encoding: str | None = None


@dataclass(frozen=True)
class EmbeddingRow:
    item_key: str
    encoder_version: str
    item_kind: str
    content_hash: str
    parent_hash: str | None
    start_s: float | None
    end_s: float | None
    part: int | None
    text: str | None
    char_start: int | None
    char_end: int | None
    embedding: np.ndarray


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def batch_items(conn: psycopg.Connection, batch: str, transcript_version: str | None) -> list[Item]:
    """Everything of the batch that goes into the unified space (one entry per source)."""
    items: list[Item] = []
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT DISTINCT ON (s.content_hash, s.caption) s.content_hash, s.caption, s.tenant, "
            "s.source_uri, o.modality, o.has_audio, o.text_encoding FROM media_sources s "
            "JOIN media_objects o USING (content_hash) WHERE s.batch = %s AND s.status = 'ok' "
            "ORDER BY s.content_hash, s.caption, s.source_uri",
            (batch,),
        )
        sources = cur.fetchall()
        for s in sources:
            h, tenant, uri, modality = (
                s["content_hash"],
                s["tenant"],
                s["source_uri"],
                s["modality"],
            )
            if modality == "image":
                items.append(Item(f"image:{h}", "image", "image", h, tenant=tenant, source_uri=uri))
            elif modality == "text":
                items.append(
                    Item(
                        f"text:{h}",
                        "text_doc",
                        "text",
                        h,
                        tenant=tenant,
                        source_uri=uri,
                        text_encoding=s["text_encoding"],
                    )
                )
            elif modality == "audio" or s["has_audio"]:
                items.append(
                    Item(f"audio:{h}", "audio", modality, h, tenant=tenant, source_uri=uri)
                )
            if s["caption"]:
                items.append(
                    Item(
                        f"caption:{h}:{text_hash(s['caption'])[:16]}",
                        "caption",
                        modality,
                        text_hash(s["caption"]),
                        parent_hash=h,
                        text=s["caption"],
                        tenant=tenant,
                        source_uri=uri,
                    )
                )
        owner = {s["content_hash"]: s for s in sources}
        cur.execute(
            "SELECT DISTINCT ON (video_hash, frame_index) video_hash, frame_index, timestamp_s, "
            "frame_hash FROM video_frames WHERE video_hash = ANY(%s) "
            "ORDER BY video_hash, frame_index",
            (list(owner),),
        )
        for f in cur.fetchall():
            v = owner[f["video_hash"]]
            items.append(
                Item(
                    f"frame:{f['video_hash']}:{f['frame_index']}",
                    "video_frame",
                    "video",
                    f["frame_hash"],
                    parent_hash=f["video_hash"],
                    start_s=f["timestamp_s"],
                    end_s=f["timestamp_s"],
                    part=f["frame_index"],
                    tenant=v["tenant"],
                    source_uri=v["source_uri"],
                )
            )
        if transcript_version:
            cur.execute(
                "SELECT content_hash, segment_index, start_s, end_s, text FROM transcript_segments "
                "WHERE content_hash = ANY(%s) AND model_version = %s ORDER BY 1, 2",
                (list(owner), transcript_version),
            )
            for seg in cur.fetchall():
                src = owner[seg["content_hash"]]
                items.append(
                    Item(
                        f"segment:{seg['content_hash']}:{transcript_version}:{seg['segment_index']}",
                        "transcript_segment",
                        src["modality"],
                        text_hash(seg["text"]),
                        parent_hash=seg["content_hash"],
                        start_s=seg["start_s"],
                        end_s=seg["end_s"],
                        part=seg["segment_index"],
                        text=seg["text"],
                        tenant=src["tenant"],
                        source_uri=src["source_uri"],
                    )
                )
    return items


def encoded_keys(conn: psycopg.Connection, keys: Sequence[str], encoder_version: str) -> set[str]:
    rows = conn.execute(
        "SELECT item_key FROM item_embeddings WHERE item_key = ANY(%s) AND encoder_version = %s",
        (list(keys), encoder_version),
    )
    return {r[0] for r in rows}


def save(conn: psycopg.Connection, rows: Iterable[EmbeddingRow]) -> int:
    """Binary COPY into item_embeddings, replacing rows with the same key and version."""
    rows = list(rows)
    if not rows:
        return 0
    cols = [f.name for f in fields(EmbeddingRow)]
    types = ["text"] * 5 + ["float8", "float8", "int4", "text", "int4", "int4", "vector"]
    with conn.transaction():
        conn.execute(
            "DELETE FROM item_embeddings WHERE (item_key, encoder_version) IN "
            "(SELECT * FROM unnest(%s::text[], %s::text[]))",
            ([r.item_key for r in rows], [r.encoder_version for r in rows]),
        )
        with conn.cursor().copy(
            f"COPY item_embeddings ({', '.join(cols)}) FROM STDIN WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types(types)
            for r in rows:
                values = [getattr(r, c) for c in cols]
                values[-1] = np.asarray(values[-1], dtype=np.float32)
                copy.write_row(values)
    return len(rows)


def load(
    conn: psycopg.Connection, prefixes: Sequence[str], encoder_version: str
) -> list[dict[str, Any]]:
    """Rows whose item key starts with one of `prefixes` (an item's key, or key + ':')."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT * FROM item_embeddings WHERE encoder_version = %s AND "
            "(item_key = ANY(%s) OR item_key LIKE ANY(%s)) ORDER BY item_key",
            (
                encoder_version,
                list(prefixes),
                [p.replace("%", r"\%").replace("_", r"\_") + ":%" for p in prefixes],
            ),
        )
        rows = cur.fetchall()
    for r in rows:
        r["embedding"] = to_array(r["embedding"])
    return rows
