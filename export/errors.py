"""The export side's error and progress messages."""

from __future__ import annotations

import sys

from clipinspect.runtime.core.errors import ClipInspectError


class ExportError(ClipInspectError, RuntimeError):
    """Export cannot go on; the message says what to change."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
