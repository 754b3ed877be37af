"""One argparse help style for every `mm` command: each option's help ends with its default.

Flags say `(default: off)`; options whose default is None say in their own words what
happens when they are not given (their help names the default), never `(default: None)`."""

from __future__ import annotations

import argparse


class Defaults(argparse.HelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if isinstance(action, argparse._HelpAction) or "default" in text.lower():
            return text
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text  # a required positional has no default
        if action.default is False:
            return text + " (default: off)"
        if action.default in (None, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"
