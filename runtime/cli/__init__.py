"""The ``clipinspect`` command.

Runtime commands live in this package (one module per area; the options they share in
:mod:`.options`). The other subpackages contribute theirs through the ``clipinspect.cli``
entry-point group (each a ``register(subparsers)`` function that imports nothing heavy and takes
its shared options from :mod:`.options`), so this package never imports torch, export or
calibration by itself.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys

from ..core.errors import ClipInspectError
from . import bundle_tools, inspection, operations, station
# Re-exported: the argparse types other subpackages have imported from here.
from .options import add_runtime_options, csv_list, int_list, positive_int

__all__ = ["add_runtime_options", "build_parser", "csv_list", "int_list", "main", "positive_int"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipinspect", description="CLIP zero-/few-shot anomaly detection, exported and fast.")
    try:
        version = importlib.metadata.version("clipinspect")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    parser.add_argument("--version", action="version", version=f"clipinspect {version}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    inspection.register(sub)
    bundle_tools.register(sub)
    station.register(sub)
    operations.register(sub)
    for ep in sorted(importlib.metadata.entry_points(group="clipinspect.cli"), key=lambda e: e.name):
        try:
            ep.load()(sub)
        except ImportError as e:  # a subpackage missing from this installation
            print(f"clipinspect: '{ep.name}' commands unavailable: {e}", file=sys.stderr)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ClipInspectError as e:
        print(f"clipinspect: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clipinspect: interrupted", file=sys.stderr)
        return 130
