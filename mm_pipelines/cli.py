"""The `mm` command: sample data, the offline demo, the Dagster UI, and service control."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mm_pipelines import settings


def _cmd_sample_data(args: argparse.Namespace) -> int:
    from mm_pipelines.media.sample_data import write_sample_batch

    folder = write_sample_batch(Path(args.landing or settings.landing_uri()), args.batch)
    print(f"wrote sample batch {args.batch!r} to {folder}")
    return 0


def run_batch(batch: str) -> dict:
    """Materialize the batch pipeline for one batch on the persistent local instance."""
    import dagster as dg

    settings.prepare_dagster_home()
    from mm_pipelines.defs import defs
    from mm_pipelines.defs.partitions import batch_partitions

    instance = dg.DagsterInstance.get()
    if not instance.has_dynamic_partition(batch_partitions.name, batch):
        instance.add_dynamic_partitions(batch_partitions.name, [batch])
    result = defs.resolve_job_def("batch_pipeline").execute_in_process(
        partition_key=batch, instance=instance, raise_on_error=False
    )
    metadata: dict = {}
    for event in result.get_asset_materialization_events():
        mat = event.materialization
        metadata[mat.asset_key.to_user_string()] = {k: v.value for k, v in mat.metadata.items()}
    checks = {
        e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data.passed
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }
    return {
        "success": result.success,
        "run_id": result.run_id,
        "assets": metadata,
        "checks": checks,
    }


def _printable(outcome: dict) -> dict:
    """The run's metadata without inline images and long markdown, for a terminal."""
    assets = {
        key: {
            k: v
            for k, v in meta.items()
            if not (isinstance(v, str) and ("![" in v or len(v) > 300))
        }
        for key, meta in outcome["assets"].items()
    }
    return {"assets": assets, "checks": outcome["checks"]}


def _cmd_demo(args: argparse.Namespace) -> int:
    from mm_pipelines.media.sample_data import write_sample_batch

    landing = Path(settings.landing_uri())
    if str(landing).startswith("s3:"):
        print("mm demo writes a local landing batch; unset MM_LANDING", file=sys.stderr)
        return 2
    write_sample_batch(landing, args.batch)
    print(f"sample batch {args.batch!r} written to {landing / args.batch}")
    outcome = run_batch(args.batch)
    print(json.dumps({"batch": args.batch, **_printable(outcome)}, indent=2))
    print(
        "\nOpen the Dagster UI on the same data:  make dev   (or: mm dev)\n"
        f"  DAGSTER_HOME={settings.dagster_home()}  ->  http://127.0.0.1:3000"
    )
    return 0 if outcome["success"] else 1


def _cmd_dev(args: argparse.Namespace) -> int:
    home = settings.prepare_dagster_home()
    repo = Path(__file__).resolve().parents[1]
    cmd = [
        "dagster",
        "dev",
        "-w",
        str(repo / "workspace.yaml"),
        "-h",
        args.host,
        "-p",
        str(args.port),
    ]
    print(f"DAGSTER_HOME={home}; running {' '.join(cmd)}", flush=True)
    bindir = Path(sys.executable).parent
    os.chdir(repo)
    os.execv(str(bindir / "dagster"), cmd)
    return 0  # unreachable


def _cmd_db(args: argparse.Namespace) -> int:
    from mm_pipelines.storage.postgres import embedded_dsn, stop_embedded

    if args.action == "stop":
        stopped = stop_embedded(settings.embedded_pg_dir())
        print("embedded Postgres stopped" if stopped else "embedded Postgres was not running")
    else:
        print(settings.pg_dsn() or embedded_dsn(settings.embedded_pg_dir()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample-data", help="write a small realistic landing batch")
    p.add_argument("--landing", help="landing folder (default: MM_LANDING or .mm/landing)")
    p.add_argument("--batch", default="demo-0001")
    p.set_defaults(func=_cmd_sample_data)

    p = sub.add_parser("demo", help="write the sample batch and run the pipeline on it")
    p.add_argument("--batch", default="demo-0001")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("dev", help="start the Dagster UI on the local .mm/ state")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.set_defaults(func=_cmd_dev)

    p = sub.add_parser("db", help="the embedded Postgres: print its DSN, or stop it")
    p.add_argument("action", choices=["dsn", "stop"])
    p.set_defaults(func=_cmd_db)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
