"""The project's size limits, checked on the source: no function longer than 80 lines, none with
more than 6 positional parameters (keyword-only ones are fine: callers name them)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80
MAX_POSITIONAL = 6
CHECKED = ("runtime", "export", "calibration", "benchmarks")


def positional(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    names = [a.arg for a in fn.args.posonlyargs + fn.args.args]
    return len(names) - (1 if names and names[0] in ("self", "cls") else 0)


def offences(source: str) -> list[tuple[str, str]]:
    """(function name, what is over the limit) for every function in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_LINES:
                found.append((node.name, f"{lines} lines (limit {MAX_LINES})"))
            if positional(node) > MAX_POSITIONAL:
                found.append((node.name, f"{positional(node)} positional parameters (limit "
                                         f"{MAX_POSITIONAL}; make the trailing ones "
                                         "keyword-only or pass an options dataclass)"))
    return found


def all_offences() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for folder in CHECKED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for name, what in offences(path.read_text()):
                found.setdefault(f"{rel}:{name}", []).append(what)
    return found


def test_no_function_is_too_long_or_takes_too_many_positional_parameters():
    found = all_offences()
    assert not found, "over the limits:\n" + "\n".join(f"{k}: {', '.join(v)}"
                                                       for k, v in sorted(found.items()))


@pytest.mark.parametrize("source, expected", [
    ("def f(a, b, c, d, e, f): pass", []),
    ("def f(a, b, c, d, e, f, g): pass", ["f"]),
    ("def f(a, b, c, d, e, f, *, g, h, i): pass", []),
    ("class C:\n    def m(self, a, b, c, d, e, f): pass", []),
    ("def f():\n" + "    x = 1\n" * 80, ["f"]),
    ("def f():\n" + "    x = 1\n" * 79, []),
])
def test_the_check_counts_what_the_limits_say(source, expected):
    assert [name for name, _ in offences(source)] == expected
