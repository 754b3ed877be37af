"""`mm demo`: the sample batch through the whole graph on the persistent local instance.

Quiet by default: a numbered line per step, the progress lines of long steps (done/total
and an estimate), a line per finished stage, and a summary to read in ten seconds; `-v`
adds every INFO message of the steps, `-vv` Dagster's own DEBUG log. Steps whose inputs
did not change since their last run (whoever ran them: an earlier demo, a sensor, the UI)
are skipped, with the same reading of the instance the sensors use (`defs.automation`).
The full summary (every asset's numbers and check results, no markdown) goes to
`$MM_HOME/demo-summary.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm_pipelines import settings
from mm_pipelines.cli_commands.runner import run_job
from mm_pipelines.cli_commands.search_view import hit_line
from mm_pipelines.helpformat import Defaults
from mm_pipelines.pipeline.progress import duration

DEMO_QUERIES = [
    "a red circle on a blue background",
    "a yellow cross on a black background",
    "customer support is available every day",
]
SUMMARY_FILE = "demo-summary.json"
ENCODERS = ["raw_media", "video_frames", "transcripts", "clip_embeddings", "audio_embeddings"]
INDEX = ["unified_embeddings", "vector_index"]
CURATION = ["near_duplicates", "content_scores", "captions"]
NOISY_LOGGERS = ("mlflow", "alembic", "urllib3", "faster_whisper", "diffusers", "transformers")


def say(line: str = "") -> None:
    print(line, flush=True)


def configure_output(verbosity: int) -> None:
    """Library warnings and log chatter off unless asked for (`-v`)."""
    if verbosity >= 1:
        return
    settings.quiet_logs()  # before the libraries are imported: they read it then
    warnings.simplefilter("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import ctranslate2  # Whisper's runtime logs from C++ (float16 -> float32 notes)

        ctranslate2.set_log_level(logging.ERROR)
    except (ImportError, AttributeError):
        pass


@dataclass
class Step:
    title: str
    job: str
    partition: str | None = None
    assets: list[str] | None = None
    # asked just before the step would run (earlier steps change the answer): why it can be
    # skipped, or None to run it
    up_to_date: Callable[[], str | None] = lambda: None


@dataclass
class Outcome:
    assets: dict[str, dict[str, Any]] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def clean(metadata: dict[str, Any]) -> dict[str, Any]:
    """Numbers and short strings only: no markdown, no inline images, no long text."""
    out = {}
    for k, v in metadata.items():
        if isinstance(v, str) and ("\n" in v or "![" in v or "|---" in v or len(v) > 200):
            continue
        if isinstance(v, int | float | str | bool | dict | list) or v is None:
            out[k] = v
    return out


def plan(args: argparse.Namespace, instance: Any, svc: Any) -> list[Step]:
    from mm_pipelines.defs import automation
    from mm_pipelines.pipeline import model_store as ms
    from mm_pipelines.pipeline.services import DEMO, UNIFIED
    from mm_pipelines.storage.landing import LocalLanding

    store, choice, batch = svc.need_models(), svc.choice, args.batch
    landing = LocalLanding(settings.landing_uri())

    def batch_done(last_asset: str) -> Callable[[], str | None]:
        def check() -> str | None:
            state = automation.batch_state(instance, landing, batch)
            done = not state.needs_run and not state.running
            if done and automation.done_after_ingest(instance, batch, last_asset):
                return "up to date (done before, and its files did not change since)"
            return None

        return check

    steps: list[Step] = []
    if not choice.clip_checkpoint and store.current(ms.CLIP, DEMO) is None:
        steps.append(Step("train the demo CLIP model (minutes on a CPU)", "train_clip"))
    title = f"ingest, understand and encode batch {batch}"
    steps.append(Step(title, "batch_pipeline", batch, ENCODERS, batch_done(ENCODERS[-1])))
    if not choice.projector_dir and store.current(ms.PROJECTOR, UNIFIED) is None:
        steps.append(Step("train the unified projector (audio head)", "train_projector"))
    steps.append(
        Step(f"index batch {batch}", "batch_pipeline", batch, INDEX, batch_done(INDEX[-1]))
    )
    steps += _curation_steps(svc, batch, batch_done(CURATION[-1]))
    if not args.no_lora:
        steps += _lora_steps(instance, svc)
    return steps


def _curation_steps(svc: Any, batch: str, done: Callable[[], str | None]) -> list[Step]:
    """The scoring heads trained on the sample batch's labels (unless configured or trained
    already), then the batch's near-duplicates, scores (and flags) and captions."""
    from mm_pipelines.pipeline import model_store as ms
    from mm_pipelines.pipeline.curate.config import CurationChoice
    from mm_pipelines.pipeline.curate.scores import LABELLED

    steps: list[Step] = []
    configured = CurationChoice.from_settings().configured_heads()
    if not configured and svc.need_models().current(ms.CONTENT_HEADS, LABELLED) is None:
        steps.append(
            Step("train the content scoring heads on labelled items", "train_content_heads")
        )
    steps.append(Step(f"curate batch {batch}", "batch_pipeline", batch, CURATION, done))
    return steps


def _lora_steps(instance: Any, svc: Any) -> list[Step]:
    from mm_pipelines.defs import automation
    from mm_pipelines.pipeline import model_store as ms
    from mm_pipelines.pipeline import subjects
    from mm_pipelines.pipeline.services import DEMO

    subjects.ensure_subject(subjects.DEMO_SUBJECT)
    name = str(subjects.DEMO_SUBJECT["name"])
    steps = []
    needs_base = svc.need_models().current(ms.DIFFUSION_BASE, DEMO) is None
    if not svc.choice.diffusion_base and needs_base:
        title = "train the demo diffusion base model (minutes on a CPU)"
        steps.append(Step(title, "train_diffusion_base"))

    def subject_done() -> str | None:
        fingerprint = subjects.get_subject(name).fingerprint()
        (state,) = automation.subject_states(instance, {name: fingerprint})
        return None if state.needs_run else "up to date (trained from this declaration before)"

    def exported() -> str | None:
        try:
            pending = automation.exports_needed(instance, svc.need_tracker().client())
        except Exception:  # noqa: BLE001 - MLflow trouble: the export step will say it
            return None
        online = _online_bundle()
        return "up to date (the approved version is online)" if online and not pending else None

    title = f"LoRA subject {name!r}: train, generate, evaluate"
    steps.append(Step(title, "subject_pipeline", name, None, subject_done))
    steps.append(Step("export and publish the approved model", "export_online_model", None,
                      None, exported))  # fmt: skip
    return steps


def _online_bundle() -> str | None:
    from mm_pipelines.serving.store import current_version, open_store

    location = settings.serving_store()
    return None if location.startswith("s3://") else current_version(open_store(location))


def _previous(instance: Any, step: Step) -> dict[str, dict[str, Any]]:
    """The metadata a skipped step's assets recorded when they last ran."""
    from mm_pipelines.defs import automation, defs

    job = defs.resolve_job_def(step.job)
    names = step.assets or [k.to_user_string() for k in job.asset_layer.selected_asset_keys]
    out = {}
    for name in names:
        record = automation.latest(instance, name, step.partition)
        if record is not None and record.asset_materialization is not None:
            meta = record.asset_materialization.metadata
            out[name] = clean({k: getattr(v, "value", v) for k, v in meta.items()})
    return out


def run(args: argparse.Namespace) -> int:
    import dagster as dg

    from mm_pipelines.pipeline.sample_data import write_sample_batch
    from mm_pipelines.pipeline.services import Services

    configure_output(args.verbose)
    started = time.monotonic()
    landing = settings.landing_uri()
    if landing.startswith("s3:"):
        print("mm demo writes a local landing batch; unset MM_LANDING", file=sys.stderr)
        return 2
    folder = write_sample_batch(Path(landing), args.batch)
    say(f"mm demo: sample batch {args.batch!r} in {folder}")
    settings.prepare_dagster_home()
    instance = dg.DagsterInstance.get()
    svc = Services.from_settings()
    steps = plan(args, instance, svc)
    outcome = Outcome()
    for number, step in enumerate(steps, start=1):
        head = f"[{number}/{len(steps)}] {step.title}"
        if why := step.up_to_date():
            say(f"{head}: {why}")
            outcome.assets.update(_previous(instance, step))
            outcome.skipped.append(step.title)
            continue
        say(f"{head} ...")
        result = run_job(step.job, step.partition, step.assets, echo=say, verbosity=args.verbose)
        outcome.assets.update({k: clean(v) for k, v in result["assets"].items()})
        outcome.checks.update(result["checks"])
        outcome.ran.append(step.title)
        if not result["success"]:
            first = [f.strip().splitlines()[0] for f in result["failures"]]
            print(f"mm demo: {step.title} failed: {'; '.join(first)}", file=sys.stderr)
            print(f"  run {result['run_id']}: see `mm dev` for its log", file=sys.stderr)
            return 1
    summary_path = settings.mm_home() / SUMMARY_FILE
    summary = {
        "batch": args.batch,
        "seconds": round(time.monotonic() - started, 1),
        "ran": outcome.ran,
        "skipped": outcome.skipped,
        "assets": outcome.assets,
        "checks": outcome.checks,
    }
    # the server loads its bundle while the local searches load their models (each is
    # mostly single-threaded imports: side by side they take the longer one's time)
    with _demo_server(start=not args.no_lora) as server:
        summary["searches"] = _sample_searches(svc)
        summary["served_search"] = server and _served_search(server, DEMO_QUERIES[0])
    summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    _print_summary(summary, summary_path)
    return 0


def _sample_searches(svc: Any) -> dict[str, list[dict[str, Any]]]:
    """The three demo queries against the local index (the models loaded once)."""
    from mm_pipelines.pipeline.search import QueryModels, search
    from mm_pipelines.storage.postgres import connect

    models = QueryModels.from_services(svc)
    with connect(svc.need_dsn()) as conn:
        return {q: search(conn, models, q, k=3).hits for q in DEMO_QUERIES}


@dataclass
class _Server:
    proc: subprocess.Popen
    log: Any  # its stderr (a temporary file)


@contextlib.contextmanager
def _demo_server(start: bool) -> Iterator[_Server | None]:
    """`mm serve` on the bundle just published, started now and stopped on leaving. It
    runs without API keys (--no-auth), on loopback, for one request: the summary says so."""
    if not start:
        yield None
        return
    cmd = [sys.executable, "-m", "mm_pipelines.cli", "serve", "--port", "0", "--no-audio"]
    cmd += ["--no-auth"]
    cmd += ["--log-level", "warning"]  # its start-up lines would interleave with ours
    with tempfile.TemporaryFile("w+") as log:  # its stderr: shown only if it fails to start
        server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            yield _Server(server, log)
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def _served_search(server: _Server, query: str) -> dict[str, Any] | None:
    """Once the server is listening: `query` through HTTP."""
    first = server.proc.stdout.readline() if server.proc.stdout else ""
    if "listening on " not in first:
        server.log.seek(0)
        print(f"mm serve did not start: {first.strip()}", file=sys.stderr)
        print(server.log.read()[-2000:], file=sys.stderr)
        return None
    url = first.split("listening on ", 1)[1].split()[0]
    request = urllib.request.Request(
        f"{url}/v1/search",
        data=json.dumps({"query": query, "tenant": "acme", "k": 3}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    return {"url": url, "query": query, **answer}


def _line(label: str, text: str) -> str:
    return f"  {label:<9} {text}"


def _print_summary(s: dict[str, Any], path: Path) -> None:
    a, checks = s["assets"], s["checks"]
    skipped = f" ({len(s['skipped'])} steps were up to date)" if s["skipped"] else ""
    say(f"\nDone in {duration(s['seconds'])}{skipped}.")
    raw = a.get("raw_media", {})
    if raw:
        reasons = ", ".join(f"{k} {v}" for k, v in raw.get("quarantined_by_reason", {}).items())
        say(_line("catalog", f"{s['batch']}: {raw.get('files_seen')} files, {raw.get('ok')} ok, "
                  f"{raw.get('quarantined')} quarantined ({reasons}), "
                  f"{raw.get('duplicates')} duplicate"))  # fmt: skip
    frames, speech = a.get("video_frames", {}), a.get("transcripts", {})
    if frames or speech:
        say(_line("media", f"{frames.get('videos', 0)} videos -> {frames.get('frames', 0)} "
                  f"frames; {speech.get('sources', 0)} sound tracks -> "
                  f"{speech.get('segments', 0)} spoken segments"))  # fmt: skip
    index = a.get("vector_index", {})
    if index:
        recall = checks.get("ann_recall")
        verdict = "" if recall is None else f", ANN recall check {_ok(recall)}"
        say(_line("index", f"{index.get('index_total')} vectors{verdict}"))
    _print_lora(a, checks)
    online = a.get("online_model", {})
    if online:
        say(_line("serving", f"bundle {online.get('bundle_version')} online with "
                  f"{online.get('lora')}"))  # fmt: skip
    if checks:
        failed = [k for k, v in checks.items() if not v]
        say(_line("checks", f"{len(checks) - len(failed)}/{len(checks)} passed"
                  + (f" (FAILED: {', '.join(failed)})" if failed else "")))  # fmt: skip
    say("\nSample searches over the demo index (one ranked list across images, video, "
        "speech, text):")  # fmt: skip
    for query, hits in s["searches"].items():
        say(f"\n$ mm search {query!r}")
        for hit in hits:
            say(hit_line(hit))
    served = s.get("served_search")
    if served:
        say(f"\nServed by `mm serve` at {served['url']} (bundle {served['bundle_version']}):")
        say(f"$ curl -s {served['url']}/v1/search -d "
            f"'{{\"query\": \"{served['query']}\", \"tenant\": \"acme\"}}'")  # fmt: skip
        for hit in served["hits"]:
            say(hit_line(hit))
        say("(this demo server ran with --no-auth, no API keys; `mm serve` needs them:")
        say(" mm keys create --tenant acme, then send 'Authorization: Bearer <key>')")
    say("\nNext:")
    say("  mm search 'a green triangle'      search from the terminal")
    say("  mm serve                          API + search page on http://127.0.0.1:8000/")
    say("  mm dev                            the Dagster UI on this state")
    say(f"  DAGSTER_HOME={settings.dagster_home()}  ->  http://127.0.0.1:3000")
    say(f"  mm mlflow                         runs, images, compare: {settings.mlflow_ui_url()}")
    say(f"Everything the steps recorded: {path}")


def _ok(passed: bool) -> str:
    return "passed" if passed else "FAILED"


def _print_lora(a: dict[str, Any], checks: dict[str, bool]) -> None:
    from mm_pipelines.pipeline import subjects

    quality = a.get("generation_quality", {})
    if not quality:
        return
    name = subjects.DEMO_SUBJECT["name"]
    adapter = a.get("lora_adapter", {})
    parts = []
    for metric, label in (("fid", "FID"), ("clip_score", "CLIP score"), ("kid_mean", "KID")):
        base, tuned = quality.get(f"base_{metric}"), quality.get(f"adapter_{metric}")
        if base is not None and tuned is not None:
            parts.append(f"{label} {base:.3g} -> {tuned:.3g}")
    say(_line("LoRA", f"{name}: {adapter.get('registered', '')}, base -> adapter "
              f"{'; '.join(parts)}"))  # fmt: skip
    gate = checks.get("quality_gates")
    if gate is not None:
        verdict = "passed (model version marked candidate)" if gate else "FAILED"
        say(_line("", f"quality gates: {verdict}"))


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="write the sample batch and run the whole graph on it (skips what is up to date)",
        formatter_class=Defaults,
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--batch", default="demo-0001", help="the sample batch's name")
    p.add_argument(
        "--no-lora", action="store_true", help="skip the LoRA subject (base model, adapter, report)"
    )
    p.add_argument("--json", action="store_true", help="print the full summary as JSON at the end")
    p.add_argument(
        "-v", "--verbose", action="count", default=0, help="more output (-vv: Dagster's own log)"
    )
    p.set_defaults(func=run)
