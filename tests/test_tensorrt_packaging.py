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


# ---------------------------------------------------------------- one CUDA major per extra
# onnxruntime-gpu releases on PyPI and the CUDA major each wheel is built for: its
# nvidia-cuda-runtime requirement, read off the wheels' metadata for 1.22.0 to 1.31.1 (cu12 up
# to 1.26.0, CUDA 13 from 1.27.0); 1.19 to 1.21 declare none: CUDA 12 and, before 1.19, CUDA
# 11.8, per onnxruntime's CUDA provider page ("starting ORT 1.19, CUDA 12.x becomes default").
# A specifier admitting a release not listed here (a future one) has an unknown CUDA major: the
# extra must then be checked and extended.
ORT_GPU_CUDA = {**{f"1.{m}.0": 11 for m in (15, 16, 17, 18)},
                **{f"1.{m}.0": 12 for m in range(19, 27)},
                **{f"1.{m}.0": 13 for m in range(27, 32)}, "1.31.1": 13}
UNRELEASED = ("1.32.0", "1.40.0", "2.0.0")


def resolved(extra: str) -> list[Requirement]:
    """The extra's requirements with clipinspect[...] self-references expanded."""
    out = []
    for req in map(Requirement, EXTRAS[extra]):
        if req.name == "clipinspect":
            out += [r for e in sorted(req.extras) for r in resolved(e)]
        else:
            out.append(req)
    return out


def cuda_majors(req: Requirement) -> set:
    """CUDA majors the requirement admits ('?' for a release of unknown CUDA)."""
    if req.name == "onnxruntime-gpu":
        majors = {c for v, c in ORT_GPU_CUDA.items() if req.specifier.contains(Version(v))}
        return majors | ({"?"} if any(req.specifier.contains(Version(v)) for v in UNRELEASED)
                         else set())
    found = re.fullmatch(r"(?:tensorrt|cupy|nvidia-[a-z-]+)-cu(?:da)?(\d+)x?", req.name)
    return {int(found.group(1))} if found else set()


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_every_extra_resolves_to_one_cuda_major(extra):
    majors = set().union(*(cuda_majors(r) for r in resolved(extra)))
    assert len(majors) <= 1 and "?" not in majors, (extra, majors)


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_no_tensorrt_11_next_to_onnxruntimes_tensorrt_provider(extra):
    """onnxruntime's TensorRT provider links libnvinfer.so.10; TensorRT 11 ships .so.11."""
    reqs = resolved(extra)
    if any(r.name == "onnxruntime-gpu" for r in reqs):
        for r in reqs:
            if r.name.startswith("tensorrt"):
                assert not r.specifier.contains(Version("11.4.0.106")), (extra, str(r))


def test_each_supported_combination_has_an_extra():
    for cuda in ("12", "13"):
        reqs = {r.name: r for r in resolved(f"gpu-tensorrt-cu{cuda}")}
        assert {"onnxruntime-gpu", f"tensorrt-cu{cuda}", f"cupy-cuda{cuda}x"} <= set(reqs)
        assert cuda_majors(reqs["onnxruntime-gpu"]) == {int(cuda)}
    # The names README and older instructions use keep working.
    assert {"cpu", "gpu", "tensorrt"} <= set(EXTRAS)
    assert {r.name for r in resolved("gpu")} == {"onnxruntime-gpu", "onnx"}


def test_the_checks_catch_what_they_are_for():
    """The rules above, applied to the sets they must refuse."""
    assert cuda_majors(Requirement("onnxruntime-gpu>=1.17")) == {11, 12, 13, "?"}
    assert cuda_majors(Requirement("cupy-cuda12x>=13")) == {12}
    assert cuda_majors(Requirement("tensorrt-cu13>=10.13,<12")) == {13}
    assert Requirement("tensorrt-cu13>=10.13,<12").specifier.contains(Version("11.4.0.106"))
