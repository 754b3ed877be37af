"""`mm catalog`: what the catalog holds per batch, and which files were quarantined and why."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mm_pipelines.helpformat import Defaults


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "-"


def run(args: argparse.Namespace) -> int:
    from mm_pipelines.pipeline.services import Services
    from mm_pipelines.storage import catalog
    from mm_pipelines.storage.postgres import connect

    with connect(Services.from_settings().need_dsn()) as conn:
        batches = catalog.batch_summaries(conn, args.batch)
        bad = catalog.quarantined_sources(conn, args.batch) if args.quarantined else []
    if args.batch and not batches:
        print(f"mm catalog: no batch {args.batch!r} in the catalog", file=sys.stderr)
        return 2
    if args.json:
        out: dict[str, Any] = {"batches": batches}
        if args.quarantined:
            out["quarantined"] = bad
        print(json.dumps(out, indent=2, default=str))
        return 0
    if not batches:
        print("the catalog is empty: `mm ingest PATH` or `mm demo` adds a batch")
        return 0
    for b in batches:
        print(
            f"{b['batch']}: {b['files']} files, {b['ok']} ok ({_counts(b['by_modality'])}), "
            f"{b['quarantined']} quarantined, {b['duplicates']} duplicates, "
            f"{b['bytes'] / 1e6:.1f} MB, tenants {', '.join(b['tenants'])}, "
            f"ingested {b['ingested_at']:%Y-%m-%d %H:%M}"
        )
        if b["quarantined_by_reason"] and not args.quarantined:
            print(
                f"  quarantined: {_counts(b['quarantined_by_reason'])} (--quarantined lists them)"
            )
    if args.quarantined:
        print(f"\nquarantined files ({len(bad)}):" if bad else "\nno quarantined files")
        for row in bad:
            name = row["source_uri"].rsplit("/", 1)[-1]
            message = " ".join((row["error_message"] or "").split())
            print(f"  {row['batch']}  {name}  {row['error_category']}: {message}")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "catalog",
        help="the catalog per batch: files, modalities, duplicates, quarantined files and why",
        formatter_class=Defaults,
    )
    p.add_argument("--batch", default=None, help="only this batch (default: every batch)")
    p.add_argument(
        "--quarantined", action="store_true", help="list each quarantined file with its reason"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)
