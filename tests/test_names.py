"""One name per thing: the vocabularies of runtime/core/names.py are written out only there.

Graph names, precisions, modes, providers and stages were once declared five, four and twice
over; a module that needs one imports it. The scan reads every module of the package's source
folders and fails on a tuple, list or set of string literals that spells one of the
vocabularies again (in any order), naming the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from clipinspect.runtime.core import names

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("runtime", "export", "calibration", "benchmarks")
DEFINED_IN = ROOT / "runtime" / "core" / "names.py"
VOCABULARIES = {v: getattr(names, v) for v in (
    "GRAPHS", "HEADS", "PRECISIONS", "QUANTIZED_PRECISIONS", "MODES", "SCORING_MODES",
    "ORT_PROVIDERS", "PROVIDERS", "STAGES", "REQUEST_TIMINGS")}


def spelled_out(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, vocabulary) of every literal collection of strings equal to a vocabulary."""
    found = []
    wanted = {frozenset(values): name for name, values in VOCABULARIES.items()}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Tuple, ast.List, ast.Set)) or len(node.elts) < 2:
            continue
        if all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
            key = frozenset(e.value for e in node.elts)
            if len(key) == len(node.elts) and key in wanted:
                found.append((node.lineno, wanted[key]))
    return found


def test_the_vocabularies_are_what_bundles_and_users_name():
    assert names.GRAPHS == ("encoder", "head_zeroshot", "head_fewshot")
    assert names.PRECISIONS == ("fp32", "fp16", "int8")
    assert names.MODES == ("auto", "zero-shot", "few-shot")
    assert names.PROVIDERS == ("cpu", "cuda", "tensorrt", "tensorrt-native")
    assert names.STAGES == ("load", "encode", "score", "post")
    assert set(names.HEAD_OF_MODE) == set(names.SCORING_MODES)
    assert set(names.HEAD_OF_MODE.values()) == set(names.HEADS)


def test_the_scan_finds_a_vocabulary_written_out_again_in_any_order():
    tree = ast.parse('PRECISIONS = ("fp32", "fp16", "int8")\n'
                     'x = ["few-shot", "zero-shot"]\n'
                     'y = ("fp32", "int8")\n')
    assert spelled_out(tree) == [(1, "PRECISIONS"), (2, "SCORING_MODES")]


def sources() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")
                  if p != DEFINED_IN)


@pytest.mark.parametrize("path", sources(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_module_writes_a_vocabulary_out_again(path):
    found = spelled_out(ast.parse(path.read_text(encoding="utf-8")))
    assert found == [], (f"{path.relative_to(ROOT)}: import these from "
                         f"clipinspect.runtime.core.names instead: {found}")
