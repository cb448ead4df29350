"""benchmarks/gpu_check.py: what runs without a GPU (the refusal, the report, the pieces)."""

from __future__ import annotations

import importlib.util
import json
import types

import numpy as np
import pytest

from clipinspect.benchmarks import gpu_check


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="tests the refusal where TensorRT is missing")
def test_without_tensorrt_it_refuses_clearly_and_still_writes_the_report(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--out", str(out)]) == 2
    report = json.loads(out.read_text())
    assert report["passed"] is False and report["format"] == "clipinspect-gpu-check"
    assert "TensorRT's Python package is not installed" in report["error"]
    assert "tensorrt-cu12" in capsys.readouterr().err


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
