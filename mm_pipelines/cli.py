"""The `mm` command: sample data, the offline demo, the Dagster UI, and service control."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mm_pipelines import settings


def _cmd_sample_data(args: argparse.Namespace) -> int:
    from mm_pipelines.pipeline.sample_data import write_sample_batch

    folder = write_sample_batch(Path(args.landing or settings.landing_uri()), args.batch)
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
    import dagster as dg

    settings.prepare_dagster_home()
    from mm_pipelines.defs import defs

    instance = dg.DagsterInstance.get()
    job_def = defs.resolve_job_def(job)
    pdef = job_def.partitions_def
    if (
        partition
        and isinstance(pdef, dg.DynamicPartitionsDefinition)
        and not instance.has_dynamic_partition(pdef.name, partition)
    ):
        instance.add_dynamic_partitions(pdef.name, [partition])
    result = job_def.execute_in_process(
        partition_key=partition,
        instance=instance,
        raise_on_error=False,
        asset_selection=[dg.AssetKey(a) for a in assets] if assets else None,
        run_config=run_config,
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
    failures = [e.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return {
        "success": result.success,
        "run_id": result.run_id,
        "assets": metadata,
        "checks": checks,
        "failures": failures,
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


DEMO_QUERIES = [
    "a red circle on a blue background",
    "a yellow cross on a black background",
    "customer support is available every day",
]


def _cmd_demo(args: argparse.Namespace) -> int:
    from mm_pipelines.pipeline import model_store as ms
    from mm_pipelines.pipeline.sample_data import write_sample_batch
    from mm_pipelines.pipeline.services import DEMO, UNIFIED, Services

    landing = Path(settings.landing_uri())
    if str(landing).startswith("s3:"):
        print("mm demo writes a local landing batch; unset MM_LANDING", file=sys.stderr)
        return 2
    write_sample_batch(landing, args.batch)
    print(f"sample batch {args.batch!r} written to {landing / args.batch}", flush=True)
    svc = Services.from_settings()
    store, choice = svc.need_models(), svc.choice
    steps: list[tuple[str, str | None, list[str] | None]] = []
    if not choice.clip_checkpoint and store.current(ms.CLIP, DEMO) is None:
        print("training the demo CLIP model (a few minutes on a CPU) ...", flush=True)
        steps.append(("train_clip", None, None))
    steps.append(
        (
            "batch_pipeline",
            args.batch,
            ["raw_media", "video_frames", "transcripts", "clip_embeddings", "audio_embeddings"],
        )
    )
    if not choice.projector_dir and store.current(ms.PROJECTOR, UNIFIED) is None:
        steps.append(("train_projector", None, None))
    steps.append(("batch_pipeline", args.batch, ["unified_embeddings", "vector_index"]))
    if not args.no_lora:
        steps += _lora_demo_steps(svc)
    outcome: dict = {"assets": {}, "checks": {}}
    for job, partition, assets in steps:
        print(f"running {job}{f' [{partition}]' if partition else ''} ...", flush=True)
        result = run_job(job, partition, assets)
        outcome["assets"].update(result["assets"])
        outcome["checks"].update(result["checks"])
        if not result["success"]:
            print(json.dumps({"failed": job, "errors": result["failures"]}, indent=2))
            return 1
    print(json.dumps({"batch": args.batch, **_printable(outcome)}, indent=2))
    if not args.no_lora:
        _print_quality(outcome)
        _demo_served_search(DEMO_QUERIES[0])
    print("\nSample searches over the demo index:")
    for query in DEMO_QUERIES:
        print(f"\n$ mm search {query!r}")
        _print_results(_search(query, k=3))
    print(
        "\nOpen the Dagster UI on the same data:  make dev   (or: mm dev)\n"
        f"  DAGSTER_HOME={settings.dagster_home()}  ->  http://127.0.0.1:3000\n"
        f"Open MLflow (runs, images, compare, registry):  mm mlflow  ->  {settings.mlflow_ui_url()}"
    )
    return 0


def _lora_demo_steps(svc) -> list[tuple[str, str | None, list[str] | None]]:
    """The demo subject, declared in the subjects file, trained, generated and evaluated."""
    from mm_pipelines.pipeline import model_store as ms
    from mm_pipelines.pipeline import subjects
    from mm_pipelines.pipeline.services import DEMO

    path = subjects.ensure_subject(subjects.DEMO_SUBJECT)
    print(f"demo subject {subjects.DEMO_SUBJECT['name']!r} declared in {path}", flush=True)
    steps: list[tuple[str, str | None, list[str] | None]] = []
    has_base = svc.need_models().current(ms.DIFFUSION_BASE, DEMO) is not None
    if not svc.choice.diffusion_base and not has_base:
        print("training the demo diffusion base model (a few minutes on a CPU) ...", flush=True)
        steps.append(("train_diffusion_base", None, None))
    steps.append(("subject_pipeline", subjects.DEMO_SUBJECT["name"], None))
    steps.append(("export_online_model", None, None))  # the newest approved version
    return steps


def _print_quality(outcome: dict) -> None:
    quality = outcome["assets"].get("generation_quality", {})
    if not quality:
        return
    print(f"\nQuality of the {subjects_demo_name()!r} adapter vs its base model (same seeds):")
    for metric in ("clip_score", "fid", "kid_mean"):
        base, adapter = quality.get(f"base_{metric}"), quality.get(f"adapter_{metric}")
        if base is not None and adapter is not None:
            print(f"  {metric:<10} base {base:8.3f}   adapter {adapter:8.3f}")
    gate = outcome["checks"].get("quality_gates")
    print(f"  quality gates: {'passed (model version marked candidate)' if gate else 'FAILED'}")


def _demo_served_search(query: str) -> None:
    """Start `mm serve` on the bundle just published, search through HTTP, stop it."""
    import subprocess
    import urllib.request

    cmd = [sys.executable, "-m", "mm_pipelines.cli", "serve", "--port", "0", "--no-audio"]
    cmd += ["--log-level", "warning"]  # its start-up lines would interleave with ours
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        first = server.stdout.readline() if server.stdout else ""
        if "listening on " not in first:
            print(f"mm serve did not start: {first.strip()}", file=sys.stderr)
            return
        url = first.split("listening on ", 1)[1].split()[0]
        request = urllib.request.Request(
            f"{url}/v1/search",
            data=json.dumps({"query": query, "tenant": "acme", "k": 3}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        print(f"\nServed by `mm serve` at {url} (bundle {answer['bundle_version']}):")
        print(f'$ curl -s {url}/v1/search -d \'{{"query": "{query}", "tenant": "acme"}}\'')
        for hit in answer["hits"]:
            where = hit.get("source_uri") or hit.get("content_hash")
            print(f"  {hit.get('item_kind', ''):<12} {hit['score']:.3f}  {where}")
        print("Start it yourself with:  mm serve   (http://127.0.0.1:8000)")
    finally:
        server.terminate()
        server.wait(timeout=30)


def subjects_demo_name() -> str:
    from mm_pipelines.pipeline import subjects

    return str(subjects.DEMO_SUBJECT["name"])


def _search(
    query: str | Path,
    k: int = 5,
    tenant: str | None = None,
    batches: list[str] | None = None,
    modalities: list[str] | None = None,
):
    from mm_pipelines.pipeline.search import QueryModels, search
    from mm_pipelines.pipeline.services import Services
    from mm_pipelines.storage.postgres import connect

    svc = Services.from_settings()
    architecture, checkpoint = svc.clip_source()
    query_models = QueryModels.load(
        architecture,
        checkpoint,
        svc.projector_dir(),
        svc.choice.whisper_model,
        device=svc.compute.torch_device(),
    )
    with connect(svc.need_dsn()) as conn:
        return search(conn, query_models, query, k, tenant, batches, modalities)


def _print_results(results) -> None:
    def short(h: str | None) -> str:
        return (h or "")[:12]

    for r in results.images:
        print(
            f"  image   {r['score']:.3f}  {r['source_uri'].rsplit('/', 1)[-1]}  ({r['matched_by']})"
        )
    for r in results.videos:
        moments = ", ".join(f"{f['timestamp_s']:.1f}s" for f in r["matched_frames"][:3])
        print(f"  video   {r['score']:.3f}  {r['source_uri'].rsplit('/', 1)[-1]}  at {moments}")
    for r in results.passages:
        print(
            f"  speech  {r['score']:.3f}  {short(r['source_hash'])} "
            f'{r["start_s"]:.1f}-{r["end_s"]:.1f}s  "{r["text"].strip()}"'
        )
    for r in results.documents:
        print(f'  text    {r["score"]:.3f}  {short(r["document_hash"])}  "{r["text"][:70]}"')
    for r in results.sounds:
        print(
            f"  sound   {r['score']:.3f}  {short(r['source_hash'])} "
            f"{(r['start_s'] or 0):.1f}-{(r['end_s'] or 0):.1f}s"
        )


def _cmd_search(args: argparse.Namespace) -> int:
    from mm_pipelines.pipeline.search import SearchError

    query: str | Path = Path(args.file) if args.file else " ".join(args.query)
    try:
        results = _search(query, args.k, args.tenant, args.batch, args.modality)
    except (SearchError, FileNotFoundError) as err:
        print(f"mm search: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results.as_dict(), indent=2, default=str))
    else:
        _print_results(results)
    return 0


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
    os.execv(cmd[0], cmd)
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # the server owns its options (mm serve --help)
        return _cmd_serve(argv[1:])
    parser = argparse.ArgumentParser(prog="mm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample-data", help="write a small realistic landing batch")
    p.add_argument("--landing", help="landing folder (default: MM_LANDING or .mm/landing)")
    p.add_argument("--batch", default="demo-0001")
    p.set_defaults(func=_cmd_sample_data)

    p = sub.add_parser("demo", help="write the sample batch and run the pipeline on it")
    p.add_argument("--batch", default="demo-0001")
    p.add_argument(
        "--no-lora", action="store_true", help="skip the LoRA subject (base model, adapter, report)"
    )
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("search", help="cross-modal search of the index")
    p.add_argument("query", nargs="*", help="query text")
    p.add_argument("--file", help="an image, audio or video file as the query instead")
    p.add_argument("-k", type=int, default=5, help="results per group")
    p.add_argument("--tenant")
    p.add_argument("--batch", action="append", help="restrict to a batch (repeatable)")
    p.add_argument("--modality", action="append", choices=["image", "video", "audio", "text"])
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("dev", help="start the Dagster UI on the local .mm/ state")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.set_defaults(func=_cmd_dev)

    sub.add_parser("serve", help="the serving API on the current bundle (mm serve --help)")

    p = sub.add_parser("mlflow", help="the MLflow UI on the local tracking store")
    p.add_argument("--host", help="default: the host of MM_MLFLOW_UI (127.0.0.1)")
    p.add_argument("--port", type=int, help="default: the port of MM_MLFLOW_UI (5000)")
    p.set_defaults(func=_cmd_mlflow)

    p = sub.add_parser("rollback", help="put a previously published serving bundle back online")
    p.add_argument("bundle_version")
    p.set_defaults(func=_cmd_rollback)

    p = sub.add_parser("db", help="the embedded Postgres: print its DSN, or stop it")
    p.add_argument("action", choices=["dsn", "stop"])
    p.set_defaults(func=_cmd_db)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
