"""Errors meant for the person running a command: printed as one line, exit status 2."""

import difflib
import os
import sys
from collections.abc import Callable, Iterable
from typing import NoReturn


class UserError(Exception):
    """A mistake in what the user passed (config, data, paths), worded with the fix."""

    collective = False
    """Raised by every rank alike (from the same files, or after a vote across ranks): only
    rank 0 prints it, so a job says it once."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the closest of `choices` to a mistyped `word`, else ''."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def print_error(err: UserError) -> None:
    """The one line of a UserError on stderr (a collective one from rank 0 only)."""
    if not err.collective or os.environ.get("RANK", "0") == "0":
        print(f"error: {err}", file=sys.stderr)


def main_guard(fn: Callable[[], int | None]) -> NoReturn:
    """Run a command-line entry point; a UserError becomes one line on stderr and exit 2."""
    try:
        code = fn()
    except UserError as err:
        print_error(err)
        sys.exit(2)
    sys.exit(code or 0)
