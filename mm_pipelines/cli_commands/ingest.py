"""`mm ingest PATH|s3://bucket/prefix/folder`: one folder of media as a batch, through the
same job the landing sensor runs, with a line per stage and a stats file per batch.

A folder under the landing area is that batch; any other folder (or S3 prefix) is read
where it is (nothing is copied into the landing area) and remembered as the batch's
source, so a later re-materialization from the UI finds it again. No `_READY` marker is
needed: naming the folder says it is complete. The stats file follows img2dataset's
`<shard>_stats.json` (count, successes, failed, status_dict, duration, start/end time) with
what each stage did.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mm_pipelines import settings
from mm_pipelines.helpformat import Defaults

# the last asset of batch_pipeline (defs/ingest/jobs.py) each --through choice runs to
THROUGH = {
    "ingest": "raw_media",
    "understand": "transcripts",
    "embeddings": "unified_embeddings",
    "index": "vector_index",
    "curate": "captions",  # the whole batch_pipeline: what the landing sensor runs
}


def through_assets(through: str) -> list[str]:
    from mm_pipelines.defs.ingest.jobs import BATCH_ASSETS  # loads the Definitions: late

    return BATCH_ASSETS[: BATCH_ASSETS.index(THROUGH[through]) + 1]


class IngestRefused(ValueError):
    """The command cannot run as asked; the message says why and what to do."""


def resolve_source(path: str, batch: str | None) -> tuple[str, str | None, str]:
    """(batch name, source URI or None when it is `<landing>/<batch>`, landing parent)."""
    from mm_pipelines.storage.landing import BATCH_NAME, split_source

    if path.startswith("s3://"):
        uri = path.rstrip("/")
    else:
        folder = Path(path).expanduser().resolve()
        if not folder.is_dir():
            raise IngestRefused(f"{path}: no such folder")
        uri = str(folder)
    parent, folder_name = split_source(uri)
    name = batch or folder_name
    if not BATCH_NAME.match(name):
        raise IngestRefused(
            f"{name!r} is not a usable batch name (letters, digits, '.', '_', '-'; up to 128, "
            "starting with a letter or digit): give one with --batch"
        )
    landing = settings.landing_uri().rstrip("/")
    if not landing.startswith("s3://"):
        landing = str(Path(landing).expanduser().resolve())
    in_landing = parent == landing and folder_name == name
    return name, None if in_landing else uri, parent


def check_models(through: str) -> None:
    """Refuse before running anything when a stage would fail for want of a model."""
    from mm_pipelines.pipeline.services import Services

    if through in ("ingest", "understand"):
        return
    svc = Services.from_settings()
    try:
        svc.clip_source()
        svc.projector_dir()  # every stage past understand embeds into the unified space
    except FileNotFoundError as err:
        raise IngestRefused(
            f"--through {through} needs a trained CLIP and unified projector ({err}); run "
            "`mm demo` once, or `mm ingest ... --through understand`"
        ) from err


def _s3_client() -> Any:
    from mm_pipelines.storage import s3

    return s3.client()


def stats_record(
    batch: str, source: str, tenant: str | None, outcome: dict, started: float, ended: float
) -> dict[str, Any]:
    assets = outcome["assets"]
    raw = assets.get("raw_media", {})
    return {
        "batch": batch,
        "source": source,
        "tenant": tenant,
        "success": outcome["success"],
        "count": raw.get("files_seen", 0),
        "successes": raw.get("ok", 0),
        "failed": raw.get("quarantined", 0),
        "status_dict": raw.get("quarantined_by_reason", {}),
        "by_modality": raw.get("by_modality", {}),
        "duplicates": raw.get("duplicates", 0),
        "bytes": raw.get("bytes", 0),
        "new_objects_stored": raw.get("new_objects_stored", 0),
        "unchanged_files_skipped": raw.get("unchanged_files_skipped", 0),
        "frames": assets.get("video_frames", {}).get("frames"),
        "transcript_segments": assets.get("transcripts", {}).get("segments"),
        "clip_items": assets.get("clip_embeddings", {}).get("items"),
        "audio_items": assets.get("audio_embeddings", {}).get("items"),
        "vectors_written": assets.get("vector_index", {}).get("vectors_written"),
        "checks": outcome["checks"],
        "stage_seconds": outcome.get("step_seconds", {}),
        "start_time": started,
        "end_time": ended,
        "duration": round(ended - started, 2),
        "run_id": outcome["run_id"],
        "failures": [f.splitlines()[0] for f in outcome["failures"]],
    }


def run(args: argparse.Namespace) -> int:
    from mm_pipelines.cli_commands.demo import configure_output
    from mm_pipelines.cli_commands.runner import run_job
    from mm_pipelines.pipeline.services import Services
    from mm_pipelines.storage import landing_sources
    from mm_pipelines.storage.landing import open_batch_source, open_landing
    from mm_pipelines.storage.postgres import connect

    configure_output(args.verbose)
    try:
        batch, source_uri, _ = resolve_source(args.path, args.batch)
        check_models(args.through)
        where = source_uri or settings.landing_uri()
        client = _s3_client() if where.startswith("s3://") else None
        landing = (
            open_batch_source(source_uri, batch, client)
            if source_uri
            else open_landing(settings.landing_uri(), client)
        )
        files, _ = landing.list_batch(batch)
    except (IngestRefused, ValueError, FileNotFoundError) as err:
        print(f"mm ingest: {err}", file=sys.stderr)
        return 2
    if not files:
        print(f"mm ingest: {args.path}: no files to ingest", file=sys.stderr)
        return 2
    with connect(Services.from_settings().need_dsn()) as conn:
        landing_sources.register(
            conn, landing_sources.BatchSource(batch, source_uri, args.tenant or None)
        )
    if not args.force and _up_to_date(landing, batch, args.through):
        print(
            f"batch {batch!r} is up to date: nothing changed since its last ingest "
            "(--force runs it again)"
        )
        return 0
    shown = source_uri or f"{settings.landing_uri()}/{batch}"
    print(f"ingesting {shown} as batch {batch!r} ({len(files)} files, through {args.through})")
    started = time.time()
    outcome = run_job(
        "batch_pipeline",
        batch,
        through_assets(args.through),
        # naming the folder says it is complete: no _READY marker needed
        {"ops": {"raw_media": {"config": {"tenant": args.tenant or "", "force": True}}}},
        echo=lambda line: print(line, flush=True),
        verbosity=args.verbose,
    )
    stats = stats_record(batch, shown, args.tenant, outcome, started, time.time())
    stats_dir = Path(args.stats_dir or settings.mm_home() / "stats")
    stats_dir.mkdir(parents=True, exist_ok=True)
    stats_path = stats_dir / f"{batch}_stats.json"
    stats_path.write_text(json.dumps(stats, indent=2, default=str) + "\n")
    print(_summary(stats))
    print(f"stats: {stats_path}")
    if not outcome["success"]:
        print(f"mm ingest: batch {batch!r} failed: {stats['failures']}", file=sys.stderr)
        return 1
    return 0


def _up_to_date(landing: Any, batch: str, through: str) -> bool:
    """The sensors' view: the last ingest saw exactly these files, and the last stage asked
    for was materialized after it."""
    import dagster as dg

    from mm_pipelines.defs import automation

    settings.prepare_dagster_home()
    instance = dg.DagsterInstance.get()
    state = automation.batch_state(instance, landing, batch)
    if state.running or state.ingested_digest != state.digest:
        return False
    return automation.done_after_ingest(instance, batch, THROUGH[through])


def _summary(stats: dict[str, Any]) -> str:
    when = datetime.fromtimestamp(stats["end_time"], UTC).strftime("%H:%M:%S")
    reasons = ", ".join(f"{k} {v}" for k, v in stats["status_dict"].items())
    parts = [
        f"batch {stats['batch']}: {stats['count']} files, {stats['successes']} ok, "
        f"{stats['failed']} quarantined{f' ({reasons})' if reasons else ''}, "
        f"{stats['duplicates']} duplicates",
    ]
    if stats["vectors_written"] is not None:
        parts.append(f"{stats['vectors_written']} vectors indexed")
    return f"{'; '.join(parts)}; {stats['duration']:.1f} s (done {when} UTC)"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "ingest",
        help="ingest a folder (or s3:// prefix) as a batch: the landing sensor's job, here",
        formatter_class=Defaults,
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("path", help="a folder of media, or s3://bucket/prefix/folder")
    p.add_argument("--batch", default=None, help="batch name (default: the folder's name)")
    p.add_argument(
        "--tenant",
        default=settings.default_tenant(),
        help="tenant of the files the batch's _manifest.jsonl does not assign (default: "
        "MM_TENANT, else 'default')",
    )
    p.add_argument(
        "--through",
        choices=list(THROUGH),
        default="curate",
        help="the last stage to run: ingest (catalog only), understand (+ frames, "
        "transcripts), embeddings (+ CLIP/audio/unified vectors), index (+ the search index), "
        "curate (+ near-duplicates, scores and flags, captions: what the landing sensor runs)",
    )
    p.add_argument("--force", action="store_true", help="run even if nothing changed")
    p.add_argument(
        "--stats-dir", default=None, help="where <batch>_stats.json goes (default: $MM_HOME/stats)"
    )
    p.add_argument(
        "-v", "--verbose", action="count", default=0, help="more output (-vv: Dagster's own log)"
    )
    p.set_defaults(func=run)
