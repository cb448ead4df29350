"""One base class for errors a user can act on; the CLI prints them as one line, no traceback."""


class ClipInspectError(Exception):
    """Raised for bad input or state; the message names the value and what to do."""


class UsageError(ClipInspectError, ValueError):
    """An argument value that cannot work (a batch size of 0, an unknown mode, ...)."""
