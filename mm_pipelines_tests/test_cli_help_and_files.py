"""The `mm` command's manners: every option says its default, progress lines say how far
and how long, and nothing a user put in a folder is ever deleted."""

from __future__ import annotations

import argparse
import contextlib
import io

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
