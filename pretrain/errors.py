"""Errors meant for the person running a command: printed as one line, exit status 2."""


class UserError(Exception):
    """A mistake in what the user passed (config, data, paths), worded with the fix."""
