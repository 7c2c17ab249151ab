"""Errors meant for the person running a command: printed as one line, exit status 2."""


class UserError(Exception):
    """A mistake in what the user passed (config, data, paths), worded with the fix."""

    collective = False
    """Raised by every rank alike (from the same files, or after a vote across ranks): only
    rank 0 prints it, so a job says it once."""
