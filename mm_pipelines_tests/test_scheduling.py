"""How the suite is split over two workers (mm_pipelines_tests/scheduling.py)."""

from __future__ import annotations

from pathlib import Path

from mm_pipelines_tests import scheduling

TESTS = Path(__file__).resolve().parent


def test_every_module_named_for_ordering_exists() -> None:
    """A renamed module would silently lose its place (or the demo's state its one worker)."""
    modules = {p.name for p in TESTS.rglob("test_*.py")}
    assert set(scheduling.LONGEST_FIRST) <= modules
    assert set(scheduling.DEMO_STATE) <= set(scheduling.LONGEST_FIRST)


def test_the_modules_on_the_demos_state_are_one_unit_and_others_their_own() -> None:
    units = {
        scheduling.work_unit(f"mm_pipelines_tests/{name}::test_x") for name in scheduling.DEMO_STATE
    }
    assert units == {scheduling.DEMO_UNIT}
    assert scheduling.work_unit("mm_pipelines_tests/models/test_clip.py::test_a[x]") == (
        "mm_pipelines_tests/models/test_clip.py"
    )


def test_the_longest_modules_come_first_and_the_rest_keep_their_order() -> None:
    class Item:
        def __init__(self, nodeid: str) -> None:
            self.nodeid = nodeid

    collected = [
        "mm_pipelines_tests/models/test_clip.py::test_b",
        "mm_pipelines_tests/test_cli.py::test_a",
        "mm_pipelines_tests/models/test_clip.py::test_a",
        "mm_pipelines_tests/test_stateless_steps.py::test_s",
        "mm_pipelines_tests/test_everyday.py::test_e",
    ]
    items = [Item(n) for n in collected]
    scheduling.longest_first(items)  # type: ignore[arg-type]
    assert [i.nodeid for i in items] == [
        "mm_pipelines_tests/test_stateless_steps.py::test_s",
        "mm_pipelines_tests/test_cli.py::test_a",
        "mm_pipelines_tests/test_everyday.py::test_e",
        "mm_pipelines_tests/models/test_clip.py::test_b",
        "mm_pipelines_tests/models/test_clip.py::test_a",
    ]


def test_only_the_modules_on_the_demos_state_get_its_time() -> None:
    class Item:
        def __init__(self, nodeid: str) -> None:
            self.nodeid, self.markers = nodeid, []

        def add_marker(self, marker: object) -> None:
            self.markers.append(marker)

    items = [Item(f"mm_pipelines_tests/{name}::test_x") for name in scheduling.DEMO_STATE]
    other = Item("mm_pipelines_tests/models/test_clip.py::test_a")
    scheduling.give_the_demo_time([*items, other])  # type: ignore[list-item]
    for item in items:
        [marker] = item.markers
        assert (marker.name, marker.args) == ("timeout", (scheduling.DEMO_TIMEOUT_S,))
    assert other.markers == []
