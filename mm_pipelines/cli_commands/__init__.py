"""Sub-commands of `mm` for everyday use, one module each; `register` adds their parsers."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    from mm_pipelines.cli_commands import catalog, demo, ingest, search_view, status

    for module in (demo, search_view, ingest, catalog, status):
        module.add_parser(sub)
