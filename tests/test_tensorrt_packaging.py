"""The TensorRT extras pair TensorRT and cupy built for one CUDA major, as a resolver reads them
(pyproject.toml metadata, parsed with packaging's requirement and specifier rules)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
EXTRAS = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]


def requirements(extra: str) -> dict[str, Requirement]:
    return {r.name: r for r in map(Requirement, EXTRAS[extra])}


@pytest.mark.parametrize("cuda", ["12", "13"])
def test_each_cuda_major_has_a_tensorrt_and_cupy_pair(cuda):
    reqs = requirements(f"tensorrt-cu{cuda}")
    trt, cupy = reqs[f"tensorrt-cu{cuda}"], reqs[f"cupy-cuda{cuda}x"]
    assert "onnx" in reqs  # build-engine reads the graphs' inputs
    # Every other CUDA build of either package is absent, the bare metapackage too.
    others = [n for n in reqs if re.fullmatch(r"tensorrt(-cu\d+)?|cupy-cuda\d+x?", n)]
    assert sorted(others) == sorted([trt.name, cupy.name])
    # An upper bound: a new TensorRT major is taken on purpose, not by a fresh install.
    assert any(s.operator == "<" for s in trt.specifier)
    assert not trt.specifier.contains(Version("12.0"))


def test_cuda12_pair_is_the_tensorrt_10_line():
    trt = requirements("tensorrt-cu12")["tensorrt-cu12"]
    assert trt.specifier.contains(Version("10.3.0")) and trt.specifier.contains(Version("10.15.1"))
    assert not trt.specifier.contains(Version("11.4.0.106"))


def test_old_tensorrt_extra_is_the_cuda12_pair():
    assert EXTRAS["tensorrt"] == ["clipinspect[tensorrt-cu12]"]


def test_no_extra_asks_for_the_bare_tensorrt_metapackage():
    for extra, reqs in EXTRAS.items():
        assert all(Requirement(r).name != "tensorrt" for r in reqs), extra
