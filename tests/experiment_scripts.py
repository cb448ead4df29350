"""The experiment scripts of benchmarks/experiments/ (not an installed package): loaded from
their files, as ``python benchmarks/experiments/NAME.py`` runs them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "benchmarks" / "experiments"


def load(name: str) -> ModuleType:
    """benchmarks/experiments/``name``.py as a module (loaded once per session)."""
    key = f"experiment_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, EXPERIMENTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]
