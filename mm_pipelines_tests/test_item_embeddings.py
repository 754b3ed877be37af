"""Encoder-space vectors: saved with their lineage, found by item key, replaced per
(key, encoder version), and never mixed across encoder versions."""

import numpy as np

from mm_pipelines.storage import embeddings
from mm_pipelines.storage.embeddings import EmbeddingRow
from mm_pipelines.storage.postgres import connect


def row(
    key: str,
    version: str = "enc-v1",
    kind: str = "audio_window",
    value: float = 1.0,
    part: int | None = 0,
) -> EmbeddingRow:
    return EmbeddingRow(
        key,
        version,
        kind,
        "hash",
        "parent",
        0.0,
        2.0,
        part,
        "text",
        3,
        9,
        np.full(4, value, np.float32),
    )


def test_rows_round_trip_and_are_found_by_item_prefix(pg_dsn):
    with connect(pg_dsn) as conn:
        embeddings.save(
            conn,
            [
                row("audio:a", part=None),
                row("audio:a:0"),
                row("audio:a:1"),
                row("audio:ab"),
                row("audio:a", version="enc-v2"),
            ],
        )
        found = embeddings.load(conn, ["audio:a"], "enc-v1")
    assert [r["item_key"] for r in found] == ["audio:a", "audio:a:0", "audio:a:1"]
    first = found[1]
    assert (first["start_s"], first["end_s"], first["part"], first["char_start"]) == (
        0.0,
        2.0,
        0,
        3,
    )
    assert np.allclose(first["embedding"], 1.0)


def test_saving_the_same_key_again_replaces_it(pg_dsn):
    with connect(pg_dsn) as conn:
        embeddings.save(conn, [row("image:x", kind="image", part=None)])
        embeddings.save(conn, [row("image:x", kind="image", value=0.5, part=None)])
        (only,) = embeddings.load(conn, ["image:x"], "enc-v1")
        assert embeddings.encoded_keys(conn, ["image:x", "image:y"], "enc-v1") == {"image:x"}
        assert embeddings.encoded_keys(conn, ["image:x"], "enc-v2") == set()
    assert np.allclose(only["embedding"], 0.5)
