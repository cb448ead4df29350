"""One base class for errors a user can act on; the CLI prints them as one line, no traceback."""


class ClipInspectError(Exception):
    """Raised for bad input or state; the message names the value and what to do."""


class UsageError(ClipInspectError, ValueError):
    """An argument value that cannot work (a batch size of 0, an unknown mode, ...)."""


def did_you_mean(value: str, choices) -> str:
    """" (did you mean 'x'?)" for a choice that differs from ``value`` only in case (``Weave``
    for ``weave``), else ''. Only case: a guess from similar spelling would name real,
    different categories."""
    folded = [c for c in choices if c.casefold() == str(value).casefold() and c != value]
    return f" (did you mean {folded[0]!r}?)" if folded else ""
