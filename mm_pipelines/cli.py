"""The `mm` command: sample data, the offline demo, ingest / catalog / status / search, the
Dagster UI, and service control."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mm_pipelines import settings


def _cmd_sample_data(args: argparse.Namespace) -> int:
    from mm_pipelines.pipeline.sample_data import write_sample_batch

    try:
        folder = write_sample_batch(Path(args.landing or settings.landing_uri()), args.batch)
    except FileExistsError as err:
        print(f"mm sample-data: {err}", file=sys.stderr)
        return 2
    print(f"wrote sample batch {args.batch!r} to {folder}")
    return 0


def run_job(
    job: str,
    partition: str | None = None,
    assets: list[str] | None = None,
    run_config: dict | None = None,
) -> dict:
    """Run a job of the Definitions (optionally a subset of its assets) on the persistent
    local instance, exactly as the UI would; return its metadata and check results."""
    from mm_pipelines.cli_commands.runner import run_job as run

    return run(job, partition, assets, run_config)


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
    print(f"its MLflow links open with `mm mlflow` ({settings.mlflow_ui_url()})", flush=True)
    bindir = Path(sys.executable).parent
    os.chdir(repo)
    os.execv(str(bindir / "dagster"), cmd)
    return 0  # unreachable


# ---------------------------------------------------------------- mm mlflow (issue 16)


def _cmd_mlflow(args: argparse.Namespace) -> int:
    """The MLflow UI on the project's tracking store, where the run links point."""
    from mm_pipelines.pipeline import mlflow_ui
    from mm_pipelines.pipeline.services import Services

    tracking = settings.mlflow_tracking_uri()
    if mlflow_ui.is_remote(tracking):
        print(f"runs are tracked on the MLflow server {tracking}: open it there")
        return 0
    host, port = mlflow_ui.ui_address()
    host, port = args.host or host, args.port or port
    Services.from_settings().need_tracker().setup()  # the store exists, the experiment tagged
    links = settings.mlflow_ui_url()
    print(f"MLflow UI on http://{host}:{port} (store {tracking})", flush=True)
    if (host, port) != mlflow_ui.ui_address():
        print(f"note: run links point at {links} (set MM_MLFLOW_UI to match)", flush=True)
    cmd = mlflow_ui.server_command(host, port, tracking, settings.mlflow_artifact_root())
    os.execve(cmd[0], cmd, settings.mlflow_server_environ())
    return 0  # unreachable


def _cmd_rollback(args: argparse.Namespace) -> int:
    """Point the serving store and the `champion` alias back at a published bundle."""
    from mm_pipelines.pipeline import registry
    from mm_pipelines.pipeline.services import Services
    from mm_pipelines.serving.manifest import MANIFEST, BundleIntegrityError
    from mm_pipelines.serving.store import bundle_key, open_store, rollback

    location = settings.serving_store()
    if location.startswith("s3://"):
        from mm_pipelines.storage import s3

        store = open_store(location, client=s3.client())
    else:
        store = open_store(location)
    try:
        record = rollback(store, args.bundle_version)
    except BundleIntegrityError as err:
        print(f"mm rollback: {err}", file=sys.stderr)
        return 2
    manifest = json.loads(store.read_bytes(bundle_key(args.bundle_version, MANIFEST)) or b"{}")
    lora = manifest.get("models", {}).get("diffusion", {})
    if lora.get("registered_name") and lora.get("registered_version"):
        registry.promote(
            Services.from_settings().need_tracker().client(),
            lora["registered_name"],
            str(lora["registered_version"]),
            args.bundle_version,
        )
    print(json.dumps(record, indent=2))
    return 0


def _cmd_serve(argv: list[str]) -> int:
    from mm_pipelines.serving.server import main as serve_main

    return serve_main(argv)


def _cmd_db(args: argparse.Namespace) -> int:
    from mm_pipelines.storage.postgres import embedded_dsn, stop_embedded

    if args.action == "stop":
        stopped = stop_embedded(settings.embedded_pg_dir())
        print("embedded Postgres stopped" if stopped else "embedded Postgres was not running")
    else:
        print(settings.pg_dsn() or embedded_dsn(settings.embedded_pg_dir()))
    return 0


# --------------------------------------------------------------------------- mm keys


def _cmd_keys(args: argparse.Namespace) -> int:
    """API keys of `mm serve`: create (the token is printed once), list, revoke."""
    from mm_pipelines.storage import api_keys
    from mm_pipelines.storage.postgres import connect, embedded_dsn

    dsn = settings.pg_dsn() or embedded_dsn(settings.embedded_pg_dir())
    with connect(dsn) as conn:
        if args.action == "create":
            if args.admin == bool(args.tenant):
                print("mm keys create: give --tenant T, or --admin", file=sys.stderr)
                return 2
            key, token = api_keys.create_key(
                conn,
                args.tenant,
                admin=args.admin,
                name=args.name,
                rate_per_minute=args.rate_per_minute,
                burst=args.burst,
            )
            scope = "admin" if key.admin else f"tenant {key.tenant!r}"
            print(f"created key {key.key_id} ({scope}); it is shown once:", file=sys.stderr)
            print(token)
        elif args.action == "list":
            for key in api_keys.list_keys(conn, args.tenant):
                state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
                print(
                    f"{key.key_id}  {key.tenant or '(admin)':<16} {state:<18} "
                    f"{key.rate_per_minute}/min burst {key.burst}  {key.name}"
                )
        else:
            if not args.key:
                print("mm keys revoke: give the key id", file=sys.stderr)
                return 2
            key_id = (api_keys.parse_token(args.key) or (args.key, ""))[0]
            if not api_keys.revoke_key(conn, key_id, args.tenant):
                print(f"mm keys revoke: no active key {key_id}", file=sys.stderr)
                return 2
            print(f"revoked key {key_id}")
    return 0


def _add_keys_parser(sub: argparse._SubParsersAction) -> None:
    from mm_pipelines.helpformat import Defaults

    p = sub.add_parser(
        "keys", help="API keys of mm serve: create, list, revoke", formatter_class=Defaults
    )
    p.add_argument("action", choices=["create", "list", "revoke"], help="what to do")
    p.add_argument("key", nargs="?", help="revoke: the key id (or the whole key)")
    p.add_argument(
        "--tenant",
        help="create: the tenant the key serves; list/revoke: only its keys (default: none)",
    )
    p.add_argument("--admin", action="store_true", help="create: a key for every tenant")
    p.add_argument("--name", default="", help="create: a label (who holds it)")
    p.add_argument("--rate-per-minute", type=int, default=600, help="create: requests a minute")
    p.add_argument("--burst", type=int, default=60, help="create: requests at once")
    p.set_defaults(func=_cmd_keys)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    settings.quiet_libraries()  # before any library imports tqdm: `mm` prints its own progress
    if argv[:1] == ["serve"]:  # the server owns its options (mm serve --help)
        return _cmd_serve(argv[1:])
    parser = argparse.ArgumentParser(prog="mm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from mm_pipelines.helpformat import Defaults as defaults  # help names each default

    p = sub.add_parser(
        "sample-data", help="write a small realistic landing batch", formatter_class=defaults
    )
    p.add_argument("--landing", help="landing folder (default: MM_LANDING, else $MM_HOME/landing)")
    p.add_argument("--batch", default="demo-0001", help="the batch folder to write")
    p.set_defaults(func=_cmd_sample_data)

    # ---- everyday commands (issue 15): demo, search, ingest, catalog, status ----------
    from mm_pipelines.cli_commands import register

    register(sub)
    # ---- end of everyday commands ----------------------------------------------------

    p = sub.add_parser(
        "dev", help="start the Dagster UI on the local .mm/ state", formatter_class=defaults
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--port", type=int, default=3000, help="port of the UI")
    p.set_defaults(func=_cmd_dev)

    sub.add_parser(
        "serve", help="the serving API and search page on the current bundle (mm serve --help)"
    )

    p = sub.add_parser(
        "mlflow", help="the MLflow UI on the local tracking store", formatter_class=defaults
    )
    p.add_argument("--host", help="default: the host of MM_MLFLOW_UI (127.0.0.1)")
    p.add_argument("--port", type=int, help="default: the port of MM_MLFLOW_UI (5000)")
    p.set_defaults(func=_cmd_mlflow)

    p = sub.add_parser(
        "rollback",
        help="put a previously published serving bundle back online",
        formatter_class=defaults,
    )
    p.add_argument("bundle_version", help="a published bundle version (see history.jsonl)")
    p.set_defaults(func=_cmd_rollback)

    _add_keys_parser(sub)

    p = sub.add_parser(
        "db", help="the embedded Postgres: print its DSN, or stop it", formatter_class=defaults
    )
    p.add_argument("action", choices=["dsn", "stop"], help="what to do")
    p.set_defaults(func=_cmd_db)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt as err:  # the run stopped; no retry, checkpoints kept
        print(f"mm: {err or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
