"""Helpers for tests that start a real server and look at it: stopping a
process group, headless Chromium (screenshots and the DOM its JavaScript built), and `mm
mlflow` as a user starts it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
MM = str(Path(sys.executable).parent / "mm")


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left of it."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):  # mlflow server's worker outlives its parent
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def chromium(
    args: list[str], profile: Path, url: str, timeout: int = 180, height: int = 1100
) -> str:
    """Run headless Chromium on `url` with a virtual-time budget; returns its stdout (the
    DOM with --dump-dom). Drawing every compositor stage first is what makes MLflow's
    charts render in headless mode (without it they stay spinners)."""
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--run-all-compositor-stages-before-draw",
        "--virtual-time-budget=60000",
        f"--user-data-dir={profile}",
        f"--window-size=1600,{height}",
        *args,
        url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout


def start_mm_mlflow(env: dict[str, str], log: Path) -> subprocess.Popen:
    """`mm mlflow` in its own process group (it execs `mlflow server`)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [MM, "mlflow"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"mm mlflow exited:\n{log.read_text(errors='replace')[-3000:]}"
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/health", timeout=5).ok:
                return
        time.sleep(1)
    raise AssertionError(f"mm mlflow not up in {timeout_s}s:\n{log.read_text()[-3000:]}")
