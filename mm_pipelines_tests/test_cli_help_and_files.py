"""The `mm` command's manners: every option says its default, progress lines say how far
and how long, and nothing a user put in a folder is ever deleted."""

from __future__ import annotations

import argparse
import contextlib
import io
import json

import pytest

from mm_pipelines import cli
from mm_pipelines.pipeline.progress import Eta, duration

COMMANDS = ["sample-data", "demo", "search", "ingest", "catalog", "status", "dev", "db"]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    """The parsers `mm` builds (captured from its own --help runs)."""
    found: dict[str, argparse.ArgumentParser] = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        actions = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
        found.update(actions[0].choices)
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture
    try:
        with contextlib.suppress(SystemExit):
            cli.main(["status"])
    finally:
        argparse.ArgumentParser.parse_args = original
    return found


def _without_default(name: str, parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        text = formatter._expand_help(action) if action.help else ""
        if "default" not in text:
            missing.append(f"{name} {action.option_strings[0]}: {text!r}")
    return missing


def test_every_option_of_every_command_has_help_that_names_its_default():
    parsers = _subparsers()
    assert set(COMMANDS) <= set(parsers)
    assert [m for name, p in parsers.items() for m in _without_default(f"mm {name}", p)] == []


def test_serve_options_name_their_defaults_too():
    from mm_pipelines.serving.server import build_parser

    assert _without_default("mm serve", build_parser()) == []


def test_progress_lines_say_done_of_total_and_an_estimate():
    now = [100.0]
    lines: list[str] = []
    eta = Eta("LoRA, step", 400, lines.append, every_s=0, clock=lambda: now[0])
    eta(0)
    now[0] += 30
    eta(100, "loss 0.25")
    now[0] += 90
    eta(400)
    assert lines[1] == "progress: LoRA, step 100/400 (25%), about 1 min 30 s left (loss 0.25)"
    assert lines[2] == "progress: LoRA, step 400/400 (100%), done in 2 min 00 s"
    assert duration(3725) == "1 h 02 min"


def test_sample_data_never_deletes_a_file_it_did_not_write(tmp_path):
    batch = tmp_path / "b1"
    batch.mkdir()
    mine = batch / "holiday.jpg"  # a user's file, in a folder without _READY
    mine.write_bytes(b"precious")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["sample-data", "--landing", str(tmp_path), "--batch", "b1"])
    assert code == 2 and mine.read_bytes() == b"precious"
    assert "holiday.jpg" in err.getvalue() and "left untouched" in err.getvalue()
    assert sorted(p.name for p in batch.iterdir()) == ["holiday.jpg"]


def test_an_interrupted_sample_batch_is_completed_in_place(tmp_path):
    from mm_pipelines.pipeline.sample_data import write_sample_batch
    from mm_pipelines.storage.landing import READY_MARKER

    batch = tmp_path / "b1"
    (batch / "images").mkdir(parents=True)
    (batch / "images" / "red_circle_on_blue.png").write_bytes(b"half written")
    write_sample_batch(tmp_path, "b1")
    assert (batch / READY_MARKER).exists()
    assert (batch / "images" / "red_circle_on_blue.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("name", ["drop 7!", "-x", "_private"])
def test_ingest_refuses_a_folder_name_that_is_no_batch_name(tmp_path, name, mm_home):
    folder = tmp_path / "in" / name
    folder.mkdir(parents=True)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["ingest", str(folder)])
    assert code == 2 and "--batch" in err.getvalue()


def test_mm_ingest_reads_an_s3_folder_where_it_is_under_another_batch_name(
    mm_home, s3_env, monkeypatch, capsys
):
    """Nothing is copied into the landing area; the batch remembers its source, so a later
    run (the UI, a retry) finds the same files."""
    import uuid

    import boto3

    from mm_pipelines.pipeline.services import Services
    from mm_pipelines.storage import landing_sources
    from mm_pipelines.storage.postgres import connect, stop_embedded
    from mm_pipelines_tests import bad_media

    monkeypatch.setenv("MM_S3_ENDPOINT_URL", s3_env)
    monkeypatch.setenv("DAGSTER_HOME", str(mm_home / "dagster"))
    bucket = f"in-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="drops/2024-07/photo.png", Body=bad_media.png_bytes())
    s3.put_object(Bucket=bucket, Key="drops/2024-07/empty.jpg", Body=b"")
    source = f"s3://{bucket}/drops/2024-07"
    try:
        args = ["ingest", source, "--batch", "july", "--tenant", "acme", "--through", "ingest"]
        assert cli.main(args) == 0
        out = capsys.readouterr().out
        assert "✓ raw_media" in out and "2 files, 1 ok, 1 quarantined (empty_file 1)" in out
        stats = json.loads((mm_home / "stats" / "july_stats.json").read_text())
        assert (stats["count"], stats["successes"], stats["status_dict"]) == (
            2,
            1,
            {"empty_file": 1},
        )
        with connect(Services.from_settings().need_dsn()) as conn:
            registered = landing_sources.lookup(conn, "july")
            rows = conn.execute("SELECT source_uri, tenant FROM media_sources").fetchall()
        assert registered == landing_sources.BatchSource("july", source, "acme")
        assert sorted(rows) == [(f"{source}/empty.jpg", "acme"), (f"{source}/photo.png", "acme")]
        assert not (mm_home / "landing").exists()  # read where it is: nothing copied
        assert cli.main(args) == 0 and "is up to date" in capsys.readouterr().out
    finally:
        stop_embedded(mm_home / "pgdata")
