"""How the suite shares two cores (`-n 2`, pytest-xdist, in pyproject's addopts).

A module's tests run on one worker (its module fixtures, such as a whole graph run, are built
once), and the modules that read the state one `mm demo` leaves (the session's `demo` fixture)
run on one worker as one unit, in their file order, as they would without xdist.

Modules start longest first, so the short ones fill in at the end instead of one long module
running alone on one core while the other idles. The order is measured (`--durations`, whole
suite, 2 cores: each of these takes minutes); it changes when tests run, never what they check.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

# the modules sharing the `demo` fixture's state, in the order they read and change it
DEMO_STATE = ("test_cli.py", "test_everyday.py", "test_everyday_serving.py")
DEMO_UNIT = "the modules on the state of `mm demo`"
# seconds a test of those modules may take: the first to ask for `mm demo` pays for it (and,
# on a fresh worker, for the demo CLIP and diffusion base it uses): 13-15 min while the
# other worker is busy, past the suite's 900 s per test
DEMO_TIMEOUT_S = 2400

# longest first: one graph in step processes, `mm demo` and its readers, the graph from the
# UI, a subject's pipeline, the fault runs, the diffusion families
LONGEST_FIRST = (
    "test_stateless_steps.py",
    *DEMO_STATE,
    "test_ui_e2e.py",
    "test_dagster_generate.py",
    "test_faults.py",
    "test_dagster_generate_families.py",
)


def module_name(nodeid: str) -> str:
    return PurePosixPath(nodeid.split("::", 1)[0]).name


def work_unit(nodeid: str) -> str:
    """What runs on one worker: a module, or the modules on the demo's state."""
    return DEMO_UNIT if module_name(nodeid) in DEMO_STATE else nodeid.split("::", 1)[0]


def longest_first(items: list[pytest.Item]) -> None:
    """Reorder `items` in place: LONGEST_FIRST's modules in its order, then the rest as
    collected (a stable sort: tests keep their order inside a module)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(module_name(item.nodeid), len(rank)))


def give_the_demo_time(items: list[pytest.Item]) -> None:
    """The modules on the demo's state get `DEMO_TIMEOUT_S` a test."""
    for item in items:
        if module_name(item.nodeid) in DEMO_STATE:
            item.add_marker(pytest.mark.timeout(DEMO_TIMEOUT_S))


def make_scheduler(config: pytest.Config, log: object) -> object:
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        """xdist's module scheduling, with the demo's modules as one unit and the units
        handed out in the (longest-first) collection order."""

        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False  # xdist would order units by their test count
    return ModuleScheduling(config, log)
