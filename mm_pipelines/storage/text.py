"""Text that Postgres can store: UTF-8, without NUL characters."""

from __future__ import annotations


def storable_text_problem(value: str) -> str | None:
    """Why Postgres (UTF-8 text) cannot store `value`, or None. JSON can carry both kinds
    of bad text (a "\\u0000" escape, a lone surrogate such as "\\ud800")."""
    if "\x00" in value:
        return "contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (not valid Unicode)"
    return None
