"""Progress lines for long steps: done/total, percent, and an estimate of the time left.

Drivers log them through their `log` callback (Dagster's `context.log.info` in an asset);
`mm demo` and `mm ingest` print the lines that start with `PREFIX` as they arrive, the UI
shows them in the run's log. A line at the start, at each quarter, at most every
`every_s` seconds in between, and at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable

PREFIX = "progress: "


def duration(seconds: float) -> str:
    """`42 s`, `3 min 05 s`, `1 h 02 min`."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Eta:
    """`Eta("CLIP training", 400, log)(done, "loss 1.23")` logs
    `progress: CLIP training 100/400 (25%), about 1 min 10 s left (loss 1.23)`."""

    def __init__(
        self,
        what: str,
        total: int,
        log: Callable[[str], None],
        every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.total, self.log = what, max(1, int(total)), log
        self.every_s, self.clock = every_s, clock
        self.started = clock()
        self.first_done: int | None = None
        self.first_at = self.started
        self.last_logged = -float("inf")
        self.quarter = 0  # a line at least at every quarter, however fast the steps go

    def line(self, done: int, note: str = "") -> str:
        now = self.clock()
        if self.first_done is None:  # the first call may include set-up time: start there
            self.first_done, self.first_at = done, now
        rate_n, rate_t = done - self.first_done, now - self.first_at
        left = ""
        if done >= self.total:
            left = f", done in {duration(now - self.started)}"
        elif rate_n > 0 and rate_t > 0:
            left = f", about {duration((self.total - done) * rate_t / rate_n)} left"
        pct = 100 * done // self.total
        extra = f" ({note})" if note else ""
        return f"{PREFIX}{self.what} {done}/{self.total} ({pct}%){left}{extra}"

    def __call__(self, done: int, note: str = "") -> None:
        line = self.line(done, note)
        now = self.clock()
        quarter = 4 * done // self.total
        if done >= self.total or quarter > self.quarter or now - self.last_logged >= self.every_s:
            self.last_logged, self.quarter = now, quarter
            self.log(line)


def counter(what: str, log: Callable[[str], None]) -> Callable[[int, int], None]:
    """A `(done, total)` callback that logs progress lines (the total known at the first call)."""
    eta: Eta | None = None

    def report(done: int, total: int) -> None:
        nonlocal eta
        if eta is None:
            eta = Eta(what, total, log)
        eta(done)

    return report
