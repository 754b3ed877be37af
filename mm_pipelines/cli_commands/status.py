"""`mm status`: what is materialized, what is stale (and why), which runs are going, and
what is online. The same reading of the instance the sensors use (`defs.automation`)."""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from typing import Any

from mm_pipelines import settings
from mm_pipelines.helpformat import Defaults


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "never"


def collect() -> dict[str, Any]:
    import dagster as dg

    from mm_pipelines.defs import automation, defs
    from mm_pipelines.pipeline import subjects
    from mm_pipelines.storage.landing import open_landing

    settings.prepare_dagster_home()
    instance = dg.DagsterInstance.get()
    graph = defs.resolve_asset_graph()
    latest: dict[tuple[str, str | None], Any] = {}

    def last(asset: str, partition: str | None) -> Any:
        if (asset, partition) not in latest:
            latest[(asset, partition)] = automation.latest(instance, asset, partition)
        return latest[(asset, partition)]

    materialized, stale = [], []
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        name = key.to_user_string()
        pdef = node.partitions_def
        partitions = (
            sorted(instance.get_dynamic_partitions(pdef.name)) if pdef is not None else [None]
        )
        done = [p for p in partitions if last(name, p) is not None]
        newest = max((last(name, p).timestamp for p in done), default=None)
        materialized.append(
            {
                "asset": name,
                "partitions": pdef.name if pdef is not None else None,
                "materialized": len(done),
                "of": len(partitions) if pdef is not None else 1,
                "last": newest,
            }
        )
        for p in done:
            mine = last(name, p)
            for parent in node.parent_keys:
                pnode = graph.get(parent)
                if pnode.partitions_def is not None and pnode.partitions_def != pdef:
                    continue  # many-to-one (any batch -> a model): newer data, not staleness
                upstream = last(parent.to_user_string(), p if pnode.partitions_def else None)
                if upstream is not None and upstream.storage_id > mine.storage_id:
                    where = f"{name}[{p}]" if p else name
                    stale.append({"asset": where, "why": f"{parent.to_user_string()} is newer"})

    landing = open_landing(settings.landing_uri(), _s3_client_if(settings.landing_uri()))
    for s in automation.landing_states(instance, landing):
        if s.state != "done":
            stale.append({"asset": f"batch {s.batch}", "why": _batch_why(s.state)})
    try:
        declared = {n: s.fingerprint() for n, s in subjects.load_subjects().items()}
        for s in automation.subject_states(instance, declared):
            if s.state != "done":
                stale.append({"asset": f"subject {s.name}", "why": _subject_why(s.state)})
    except subjects.SubjectConfigError as err:
        stale.append({"asset": "subjects file", "why": str(err)})
    serving = _serving(instance, stale)
    going = [
        {
            "run_id": r.run_id,
            "job": r.job_name,
            "partition": r.tags.get(automation.PARTITION_TAG),
            "status": r.status.value,
        }
        for r in automation.runs_going(instance)
    ]
    return {"materialized": materialized, "stale": stale, "runs_going": going, **serving}


def _s3_client_if(uri: str) -> Any:
    if not uri.startswith("s3://"):
        return None
    from mm_pipelines.storage import s3

    return s3.client()


def _batch_why(state: str) -> str:
    return {
        "new": "ready in the landing area, never ingested",
        "changed": "its files changed since the last ingest",
        "not indexed": "ingested, but the search index was not built after it",
        "running": "a run is going",
    }[state]


def _subject_why(state: str) -> str:
    return {
        "new": "declared, never trained",
        "changed": "its declaration changed since its training set was built",
        "running": "a run is going",
    }[state]


def _serving(instance: Any, stale: list[dict[str, str]]) -> dict[str, Any]:
    from mm_pipelines.defs import automation
    from mm_pipelines.pipeline.services import Services
    from mm_pipelines.serving.store import current_version, open_store

    location = settings.serving_store()
    try:
        store = open_store(location, client=_s3_client_if(location))
        online = current_version(store)
    except Exception as err:  # noqa: BLE001 - status reports, it does not fail
        online = f"unknown ({err})"
    try:
        client = Services.from_settings().need_tracker().client()
        for c in automation.exports_needed(instance, client):
            stale.append({"asset": f"model {c.key}", "why": "approved, not exported yet"})
    except Exception as err:  # noqa: BLE001 - MLflow down: say so
        stale.append({"asset": "MLflow registry", "why": f"unreachable: {err}"})
    return {"online_bundle": online}


def run(args: argparse.Namespace) -> int:
    status = collect()
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    print("materialized:")
    for m in status["materialized"]:
        count = f"{m['materialized']}/{m['of']} {m['partitions']}" if m["partitions"] else ""
        print(f"  {m['asset']:<20} {count:<14} last {_when(m['last'])}")
    print("stale:" if status["stale"] else "stale: nothing (every input is older than its output)")
    for s in status["stale"]:
        print(f"  {s['asset']}: {s['why']}")
    print("runs going:" if status["runs_going"] else "runs going: none")
    for r in status["runs_going"]:
        part = f" [{r['partition']}]" if r["partition"] else ""
        print(f"  {r['job']}{part}  {r['status']}  {r['run_id']}")
    print(f"online bundle: {status['online_bundle'] or 'none published'}")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "status",
        help="what is materialized, what is stale and why, which runs are going",
        formatter_class=Defaults,
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)
