"""benchmarks/gpu_check.py: what runs without a GPU (the refusal, the report, the pieces)."""

from __future__ import annotations

import importlib.util
import json
import types

import numpy as np
import pytest

from clipinspect.benchmarks import gpu_check


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None or "CUDAExecutionProvider"
                    in __import__("onnxruntime").get_available_providers(),
                    reason="tests the refusal where TensorRT and onnxruntime-gpu are missing")
def test_without_tensorrt_it_refuses_clearly_and_still_writes_the_report(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--out", str(out)]) == 2
    report = json.loads(out.read_text())
    assert report["passed"] is False and report["format"] == "clipinspect-gpu-check"
    assert "TensorRT's Python package is not installed" in report["error"]
    # Every group says why it cannot run: the onnxruntime providers were tried, not listed.
    for group in ("onnxruntime cuda: ", "onnxruntime tensorrt: ", "native tensorrt: "):
        assert group in report["error"]
    assert set(report["groups"]) == {"onnxruntime cuda", "onnxruntime tensorrt",
                                     "native tensorrt"}
    assert "gpu-tensorrt-cu13" in capsys.readouterr().err


def test_a_check_that_raises_is_a_failure_and_the_rest_still_run(capsys):
    checks = gpu_check.Checks()
    checks.run("ok", lambda: (True, "fine"))
    checks.run("boom", lambda: 1 / 0)
    checks.run("after", lambda: (True, None))
    assert [r["passed"] for r in checks.results] == [True, False, True]
    assert checks.results[1]["detail"].startswith("ZeroDivisionError")
    assert not checks.passed
    assert "FAIL  boom" in capsys.readouterr().out


def test_agreement_is_the_worst_pearson_and_largest_score_difference():
    rng = np.random.default_rng(0)
    a = [types.SimpleNamespace(anomaly_map=rng.random((4, 4)), image_score=0.5) for _ in range(2)]
    b = [types.SimpleNamespace(anomaly_map=a[0].anomaly_map * 2, image_score=0.5),
         types.SimpleNamespace(anomaly_map=-a[1].anomaly_map, image_score=0.75)]
    got = gpu_check.agreement(a, b)
    assert got["map_pearson_min"] == pytest.approx(-1.0)
    assert got["max_image_score_diff"] == pytest.approx(0.25)


# ------------------------------------------- the onnxruntime CUDA path alone gives a verdict
def test_tolerances_follow_what_each_provider_can_be_asked_for():
    assert gpu_check.ort_tolerance("cuda", "fp32", {}) == (0.99999, 1e-4)   # TF32 off
    # onnxruntime's TensorRT provider has no TF32 option: the TF32 bound, unless overridden.
    assert gpu_check.ort_tolerance("tensorrt", "fp32", {}) == gpu_check.TF32_TOLERANCE
    assert gpu_check.ort_tolerance("tensorrt", "fp32", {"NVIDIA_TF32_OVERRIDE": "0"}) == (
        0.99999, 1e-4)
    assert gpu_check.ort_tolerance("tensorrt", "fp16", {}) == gpu_check.TOLERANCES["fp16"]


@pytest.fixture
def cuda_only(monkeypatch):
    """A machine with onnxruntime-gpu whose CUDA provider works, no TensorRT: onnxruntime's
    CPU provider stands in for the GPU (the logic is checked, not the GPU numerics)."""
    from clipinspect.runtime import Inspector

    monkeypatch.setattr(gpu_check, "capabilities", lambda: {
        "onnxruntime cuda": None,
        "onnxruntime tensorrt": "FELL BACK: libnvinfer.so.10: cannot open shared object file",
        "native tensorrt": "TensorRT's Python package is not installed"}, raising=False)
    opened: list = []

    def open_inspector(path, precision, provider, batch_size=None):
        opened.append((precision, provider))
        return Inspector.open(path, precision, "cpu")

    state = {"use_tf32": "0"}
    monkeypatch.setattr(gpu_check, "open_inspector", open_inspector, raising=False)
    monkeypatch.setattr(gpu_check, "cuda_provider_options", lambda inspector: dict(state),
                        raising=False)
    monkeypatch.setattr(gpu_check, "gpu_memory_used_mib", lambda: 1234.5, raising=False)
    return opened, state


def test_onnxruntime_cuda_alone_gives_a_full_verdict(cuda_only, tiny_bundle_path, tmp_path,
                                                     capsys):
    opened, _ = cuda_only
    out = tmp_path / "report.json"
    assert gpu_check.main(["--bundle", str(tiny_bundle_path), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["passed"] is True
    assert report["groups"]["onnxruntime cuda"] == "ran"
    assert report["groups"]["native tensorrt"].startswith("skipped: TensorRT's Python")
    names = [c["name"] for c in report["checks"]]
    for precision in ("fp32", "fp16", "int8"):
        for mode in ("zero-shot", "few-shot"):
            assert f"onnxruntime cuda {precision} {mode} vs cpu fp32" in names
        assert (precision, "cuda") in opened
    fp32 = next(c for c in report["checks"] if c["name"].startswith("onnxruntime cuda fp32"))
    assert fp32["detail"]["use_tf32"] == "0" and fp32["detail"]["tolerance"] == [0.99999, 1e-4]
    speed = [c for c in report["checks"] if c["name"].startswith("throughput onnxruntime cuda")]
    assert len(speed) == 3
    for check in speed:
        assert [r["batch"] for r in check["detail"]] == [1, 8, 32]
        assert all(r["images_per_s"] > 0 and r["gpu_memory_used_mib"] == 1234.5
                   for r in check["detail"])
    assert not any("tensorrt" in n for n in names)     # nothing of the skipped groups ran
    printed = capsys.readouterr().out
    assert "RUN   onnxruntime cuda" in printed and "SKIP  native tensorrt: " in printed
    assert "skipped: onnxruntime tensorrt, native tensorrt" in printed


def test_fp32_with_tf32_on_fails_the_verdict(cuda_only, tiny_bundle_path, tmp_path):
    cuda_only[1]["use_tf32"] = "1"
    out = tmp_path / "report.json"
    assert gpu_check.main(["--bundle", str(tiny_bundle_path), "--out", str(out)]) == 1
    checks = json.loads(out.read_text())["checks"]
    fp32 = [c for c in checks if c["name"].startswith("onnxruntime cuda fp32")]
    assert fp32 and not any(c["passed"] for c in fp32)
    assert all(c["passed"] for c in checks if c["name"].startswith("onnxruntime cuda fp16"))
