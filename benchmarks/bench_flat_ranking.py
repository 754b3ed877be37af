"""One ranked list across modalities: does a text describing an image put that image (its
pixels; captions are left out) in the top 3 of the flat list, calibrated vs raw cosines?

Run on a demo state (after `mm demo`; MM_HOME as for `mm`):
    .venv/bin/python benchmarks/bench_flat_ranking.py [--heldout-batch heldout-0001]
The held-out batch (8 caption-less shapes whose caption combos the demo never shows) is
written to the landing area and ingested through batch_pipeline first if it is not indexed
yet. Prints ONE JSON object: for the demo's 15 images (queries: their captions) and the
held-out shapes (queries: their descriptions), top-1 / top-3 rates, the smallest margin of
a top-3 image over the 4th hit, and the misses; `calibrated` (per-kind score calibration,
what `mm search` and /v1/search do) and `raw_cosine` (the same per-kind candidates ranked
by raw cosine: the baseline).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mm_pipelines import settings
from mm_pipelines.pipeline.sample_data import write_heldout_batch
from mm_pipelines.pipeline.search import QueryModels
from mm_pipelines.pipeline.search_eval import place, summary
from mm_pipelines.pipeline.services import Services
from mm_pipelines.storage.postgres import connect


def demo_queries(conn, batch: str) -> list[tuple[str, set[str]]]:
    """Each captioned demo image's caption -> the names of the files with that content."""
    rows = conn.execute(
        "SELECT caption, source_uri, content_hash FROM media_sources WHERE batch = %s "
        "AND status = 'ok' AND modality = 'image' AND caption IS NOT NULL",
        (batch,),
    ).fetchall()
    names: dict[str, set[str]] = {}
    by_hash: dict[str, set[str]] = {}
    for _, uri, content in rows:
        by_hash.setdefault(content, set()).add(uri.rsplit("/", 1)[-1])
    for caption, _, content in rows:
        names.setdefault(caption, set()).update(by_hash[content])
    return sorted(names.items())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", default="demo-0001")
    parser.add_argument("--heldout-batch", default="heldout-0001")
    parser.add_argument("--tenant", default="acme")
    args = parser.parse_args()

    from mm_pipelines.cli_commands.runner import run_job

    svc = Services.from_settings()
    described = write_heldout_batch(Path(settings.landing_uri()), args.heldout_batch)
    with connect(svc.need_dsn()) as conn:
        indexed = conn.execute(
            "SELECT count(*) FROM unified_vectors WHERE batch = %s", (args.heldout_batch,)
        ).fetchone()[0]
    if not indexed:
        outcome = run_job("batch_pipeline", args.heldout_batch)
        assert outcome["success"], outcome["failures"]
    architecture, checkpoint = svc.clip_source()
    models = QueryModels.load(architecture, checkpoint, svc.projector_dir())
    heldout = [(caption, {name}) for caption, name in sorted(described.items())]
    out: dict = {"tenant": args.tenant}
    with connect(svc.need_dsn()) as conn:
        demo = demo_queries(conn, args.batch)
        for label, raw in (("calibrated", False), ("raw_cosine", True)):
            t0 = time.perf_counter()
            out[label] = {
                "demo": summary(place(conn, models, demo, raw_cosine=raw, tenant=args.tenant)),
                "heldout": summary(
                    place(conn, models, heldout, raw_cosine=raw, tenant=args.tenant)
                ),
                "seconds": round(time.perf_counter() - t0, 2),
            }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
