"""Errors meant for the person running a command: printed as one line, exit status 2."""

import os
import sys


class UserError(Exception):
    """A mistake in what the user passed (config, data, paths), worded with the fix."""

    collective = False
    """Raised by every rank alike (from the same files, or after a vote across ranks): only
    rank 0 prints it, so a job says it once."""


def print_error(err: UserError) -> None:
    """The one line of a UserError on stderr (a collective one from rank 0 only)."""
    if not err.collective or os.environ.get("RANK", "0") == "0":
        print(f"error: {err}", file=sys.stderr)
