"""Bundles written by main at 1a75222 (format version 2, before methods owned their manifest
sections and thresholds were typed) still open and give the same results, to float32 rounding
(onnxruntime's and numpy's kernels are chosen per CPU).

tests/data/v2-1a75222 holds a WinCLIP and a patch-only bundle (tiny graphs of tests/tinybundle.py
as it was at 1a75222, with 2-shot memory and thresholds), the images they were run on and the
scores and maps that version produced."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipinspect.runtime import Bundle, Inspector

DATA = Path(__file__).parent / "data" / "v2-1a75222"
FLOAT32_ROUNDING = 1e-6  # a few units in the last place of values below 1


@pytest.fixture(scope="module")
def expected():
    with np.load(DATA / "expected.npz") as e:
        return dict(e)


@pytest.fixture(scope="module")
def images():
    with np.load(DATA / "images.npz") as z:
        return [z[f"arr_{i}"] for i in range(4)]


@pytest.mark.parametrize("method", ["winclip", "patch"])
@pytest.mark.parametrize("mode", ["zero-shot", "few-shot"])
def test_old_bundle_gives_identical_results(method, mode, expected, images, tmp_path):
    root = Path(shutil.copytree(DATA / method, tmp_path / method))
    results = Inspector.open(root).inspect(images, "weave", mode=mode)
    assert all(r.ok for r in results)
    # Equal to float32 rounding: the expected values were computed on another CPU, and both
    # onnxruntime's and numpy's BLAS kernels are chosen per CPU (on an AMD EPYC the upsampling
    # product differs from the recorded maps by 3e-8 in 1.5 % of pixels).
    np.testing.assert_allclose([r.image_score for r in results],
                               expected[f"{method}/{mode}/scores"], rtol=0, atol=FLOAT32_ROUNDING)
    np.testing.assert_allclose(np.stack([r.anomaly_map[:40, :48] for r in results]),
                               expected[f"{method}/{mode}/maps"], rtol=0, atol=FLOAT32_ROUNDING)
    if mode == "few-shot":
        assert all(r.is_anomalous is not None and r.mask is not None for r in results)


@pytest.mark.parametrize("method", ["winclip", "patch"])
def test_old_manifest_reads_typed_and_rewrites_without_losing_a_key(method, tmp_path):
    root = Path(shutil.copytree(DATA / method, tmp_path / method))
    before = json.loads((root / "manifest.json").read_text())
    bundle = Bundle.open(root)
    m = bundle.manifest
    stored = m.categories["weave"].thresholds["fp32/few-shot"]
    assert (stored.image, stored.pixel, stored.extra) == (0.5, 0.5, {"rule": "hand-set"})
    if method == "winclip":
        assert m.section.scales == before["scales"] and m.section.windows == before["windows"]
    else:
        assert m.section.dense_blocks == before["method_options"]["dense_blocks"]
    bundle.set_thresholds("weave", "fp32/zero-shot", {"image": 0.25})
    after = json.loads((root / "manifest.json").read_text())
    del after["categories"]["weave"]["thresholds"]["fp32/zero-shot"]
    assert after == before
