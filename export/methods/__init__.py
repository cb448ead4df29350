"""Scoring methods the exporter can build, keyed by the name stored in the manifest.

One module per method holds what the method is on the torch side (``base.ExportMethod``): its
torch modules, options, text recipe, manifest entries and eager reference; ``common`` holds the
building blocks they share. Exporting, the parity check and the manifest are the same for every
method (``exporter``); the runtime's counterpart is ``clipinspect.runtime.methods``. Adding a
method is one module here, one there, and its line in each registry.
"""

from __future__ import annotations

from typing import Any

from . import alfa, aprillab, musc, patch, winclip
from .base import HEADS, Built, Clip, ExportMethod, Option
from .common import Adaptation

METHODS: dict[str, ExportMethod] = {m.name: m for m in (winclip.METHOD, patch.METHOD,
                                                         aprillab.METHOD, alfa.METHOD,
                                                         musc.METHOD)}

__all__ = ["HEADS", "METHODS", "Adaptation", "Built", "Clip", "ExportMethod", "Option",
           "method_options", "owner"]


def owner(option: str) -> str | None:
    """The method that takes ``option`` (None if none does)."""
    return next((m.name for m in METHODS.values() for o in m.options if o.name == option), None)


def method_options(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """The method's options: its defaults updated with the ``given`` ones (None = default); an
    option the method does not take is an error (ValueError) rather than silently ignored."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    spec = METHODS[method]
    unknown = [k for k, v in given.items() if v is not None and k not in spec.defaults]
    if unknown:
        flag = "--" + unknown[0].replace("_", "-")
        other = owner(unknown[0])
        raise ValueError(f"{flag} does not apply to method {method!r} (its options: "
                         f"{', '.join(o.flag for o in spec.options) or 'none'})"
                         + (f"; {flag} is an option of --method {other}" if other else ""))
    return spec.resolve(given)
