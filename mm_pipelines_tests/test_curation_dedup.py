"""Near-duplicates on a set made here from the demo images: each original with six edited
copies (JPEG q40, 50% resize, 5% crop per side, mirror, +20% brightness, a text
watermark), mixed with distinct images; then tenant isolation and incremental batches.

Real Postgres/pgvector, the demo CLIP (session fixture `demo_clip`), the real drivers."""

from __future__ import annotations

import itertools

import pytest

from mm_pipelines.models.demo import shapes
from mm_pipelines.pipeline.curate import dedup
from mm_pipelines.storage.postgres import connect
from mm_pipelines_tests.curation_env import EDITS, CurationEnv, jpeg

ORIGINALS = 12
DISTINCT = 24


def _specs() -> tuple[list[shapes.ShapeSpec], list[shapes.ShapeSpec]]:
    """Disjoint caption combos: originals and distinct images never share one (two
    drawings of one combo are semantic duplicates in this tiny world)."""
    import random

    specs = shapes.all_specs()
    random.Random(13).shuffle(specs)
    return specs[:ORIGINALS], specs[ORIGINALS : ORIGINALS + DISTINCT]


def _draw(spec: shapes.ShapeSpec, seed: int):
    return shapes.draw_shape(spec.colour, spec.shape, spec.background, 128, seed)[0]


def _hashes(env: CurationEnv, batch: str) -> dict[str, str]:
    """file name -> content hash, for the batch's sources."""
    with connect(env.dsn) as conn:
        rows = conn.execute(
            "SELECT source_uri, content_hash FROM media_sources WHERE batch = %s AND status = 'ok'",
            (batch,),
        ).fetchall()
    return {uri.rsplit("/", 1)[-1]: h for uri, h in rows}


def _pairs(env: CurationEnv, tenant: str) -> list[dict]:
    with connect(env.dsn) as conn:
        cur = conn.execute(
            "SELECT item_hash, duplicate_of, method, batch FROM near_duplicates WHERE tenant = %s",
            (tenant,),
        )
        return [dict(zip(("a", "b", "method", "batch"), r, strict=True)) for r in cur]


@pytest.fixture(scope="module")
def env(tmp_path_factory, module_pg_dsn, demo_clip) -> CurationEnv:
    e = CurationEnv(tmp_path_factory.mktemp("dedup"), module_pg_dsn, demo_clip.checkpoint_path)
    originals, distinct = _specs()
    files = {}
    for i, spec in enumerate(originals):
        image = _draw(spec, seed=i)
        files[f"g{i:02d}_original.png"] = (image, {"tenant": "acme"})
        for name, edit in EDITS.items():
            ext = "jpg" if name == "jpeg_q40" else "png"
            files[f"g{i:02d}_{name}.{ext}"] = (edit(image), {"tenant": "acme", "quality": 40})
    for j, spec in enumerate(distinct):
        files[f"d{j:02d}.png"] = (_draw(spec, seed=100 + j), {"tenant": "acme"})
    e.land("b1", files)
    e.process("b1")
    e.first = dedup.find_near_duplicates(e.svc, "b1")
    return e


def _precision_recall(predicted: set[frozenset], truth: set[frozenset]) -> tuple[float, float]:
    hits = len(predicted & truth)
    return hits / max(len(predicted), 1), hits / max(len(truth), 1)


def test_edited_copies_are_found_and_distinct_images_are_not(env):
    """Precision and recall of duplicate pairs at the default thresholds: as direct links
    (the relation table) and as keep-one groups (what search and training sets act on)."""
    by_name = _hashes(env, "b1")
    group_of = {h: n.split("_")[0] for n, h in by_name.items() if n.startswith("g")}
    truth = {
        frozenset((a, b))
        for a, b in itertools.combinations(sorted(group_of), 2)
        if group_of[a] == group_of[b]
    }
    links = {frozenset((p["a"], p["b"])) for p in _pairs(env, "acme")}
    with connect(env.dsn) as conn:
        groups: dict[str, set[str]] = {}
        for h, keeper in conn.execute(
            "SELECT content_hash, keeper_hash FROM duplicate_groups WHERE tenant = 'acme'"
        ):
            groups.setdefault(keeper, set()).add(h)
    grouped = {frozenset(p) for g in groups.values() for p in itertools.combinations(sorted(g), 2)}
    link_p, link_r = _precision_recall(links, truth)
    group_p, group_r = _precision_recall(grouped, truth)
    by_method = {
        m: _precision_recall(
            {frozenset((p["a"], p["b"])) for p in _pairs(env, "acme") if p["method"] == m}, truth
        )
        for m in ("phash", "clip")
    }
    print(
        f"\nnear-duplicates at defaults {dedup.DedupConfig()}: links precision {link_p:.3f} "
        f"recall {link_r:.3f}; groups precision {group_p:.3f} recall {group_r:.3f} "
        f"({len(truth)} true pairs, {len(links)} links, {len(groups)} groups); "
        f"by method (precision, recall): {by_method}"
    )
    assert group_p >= 0.95 and group_r >= 0.9
    assert link_p >= 0.95 and link_r >= 0.9
    assert {p["method"] for p in _pairs(env, "acme")} == {"phash", "clip"}


def test_each_group_keeps_its_largest_image_and_hides_the_others(env):
    by_name = _hashes(env, "b1")
    with connect(env.dsn) as conn:
        rows = conn.execute(
            "SELECT content_hash, keeper_hash FROM duplicate_groups WHERE tenant = 'acme'"
        ).fetchall()
        hidden = {
            h
            for (h,) in conn.execute(
                "SELECT content_hash FROM curation_hidden WHERE tenant = 'acme'"
            )
        }
    keepers = {k for _, k in rows}
    # the original and the mirrored, brightened and watermarked copies are 128 px; the crop
    # and resize are smaller: a keeper is never one of those
    small = {h for n, h in by_name.items() if "crop_5" in n or "resize_50" in n}
    assert keepers and not keepers & small
    assert hidden == {h for h, k in rows if h != k}
    assert not hidden & {h for n, h in by_name.items() if n.startswith("d")}


def test_a_rerun_checks_nothing_again(env):
    again = dedup.find_near_duplicates(env.svc, "b1")
    assert again.checked_now == 0 and again.phashes_computed == 0
    assert again.already_checked == env.first.checked_now


def test_a_duplicate_in_another_tenant_is_never_linked(env):
    originals, _ = _specs()
    image = _draw(originals[0], seed=0)
    env.land(
        "t2",
        {
            "same_bytes.png": (image, {"tenant": "globex"}),  # the very file acme has
            "recompressed.jpg": (jpeg(image), {"tenant": "globex", "quality": 40}),
        },
    )
    env.process("t2")
    dedup.find_near_duplicates(env.svc, "t2")
    globex = set(_hashes(env, "t2").values())
    acme_only = set(_hashes(env, "b1").values()) - globex
    pairs = _pairs(env, "globex")
    assert pairs and all({p["a"], p["b"]} <= globex for p in pairs)
    assert not any({p["a"], p["b"]} & acme_only for p in pairs)


def test_a_new_batch_links_to_old_batches_without_recomputing_them(env):
    with connect(env.dsn) as conn:
        before = conn.execute(
            "SELECT content_hash, method_version, batch, checked_at FROM near_duplicate_checks "
            "WHERE tenant = 'acme' ORDER BY 1, 2"
        ).fetchall()
        signatures_before = conn.execute("SELECT count(*) FROM perceptual_hashes").fetchone()[0]
    originals, _ = _specs()
    env.land("b3", {"late_copy.jpg": (jpeg(_draw(originals[3], seed=3), 30), {"tenant": "acme"})})
    env.process("b3")
    result = dedup.find_near_duplicates(env.svc, "b3")
    assert (result.checked_now, result.already_checked, result.phashes_computed) == (1, 0, 1)
    (late,) = _hashes(env, "b3").values()
    old = set(_hashes(env, "b1").values())
    new_links = [p for p in _pairs(env, "acme") if p["batch"] == "b3"]
    assert new_links and all(late in (p["a"], p["b"]) for p in new_links)
    assert {p["a"] if p["b"] == late else p["b"] for p in new_links} <= old
    with connect(env.dsn) as conn:
        after = conn.execute(
            "SELECT content_hash, method_version, batch, checked_at FROM near_duplicate_checks "
            "WHERE tenant = 'acme' AND batch <> 'b3' ORDER BY 1, 2"
        ).fetchall()
        signatures = conn.execute("SELECT count(*) FROM perceptual_hashes").fetchone()[0]
    assert after == before  # old pictures were not searched again
    assert signatures == signatures_before + 1
