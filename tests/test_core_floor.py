"""The ground floor: runtime/core imports nothing of the floors above it (methods, backends
other than onnxruntime, Triton, serving, the CLI). Methods and backends register themselves
in core.registry instead, so a new method or backend never edits core."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "runtime" / "core"
UPSTAIRS = ("methods", "tensorrt", "triton", "serving", "cli")


def imported_modules(path: Path) -> list[str]:
    """Every module a file imports (also inside functions and TYPE_CHECKING blocks), written
    relative to clipinspect.runtime, and every string that names one (importlib)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 2:      # from ..x import y
                found.append(module or "")
                found += [f"{a.name}" for a in node.names] if not module else []
            elif node.level == 0 and module.startswith("clipinspect.runtime."):
                found.append(module[len("clipinspect.runtime."):])
        elif isinstance(node, ast.Import):
            found += [a.name[len("clipinspect.runtime."):] for a in node.names
                      if a.name.startswith("clipinspect.runtime.")]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.startswith("clipinspect.runtime."):
                found.append(node.value[len("clipinspect.runtime."):])
    return found


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_imports_nothing_upstairs(path):
    upstairs = [m for m in imported_modules(path) if m.split(".")[0] in UPSTAIRS]
    assert upstairs == [], f"runtime/core/{path.name} imports {upstairs}"


def test_the_check_sees_relative_absolute_and_string_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from ..methods import x\nimport clipinspect.runtime.serving.server\n"
                     "def f():\n    from ..tensorrt.compat import y\n"
                     "NAME = 'clipinspect.runtime.triton.client'\n")
    assert [m.split(".")[0] for m in imported_modules(probe)] == [
        "methods", "serving", "tensorrt", "triton"]


def test_methods_and_backends_are_registered_with_core():
    from clipinspect.runtime.core import registry
    from clipinspect.runtime.core.names import PROVIDERS

    assert set(registry.METHODS) == {"winclip", "patch", "aprillab", "alfa", "musc"}
    assert set(registry.BACKENDS) == set(PROVIDERS)
