"""Thresholds and the evaluation report, on the synthetic dataset with the small bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipinspect.calibration import evaluate as evaluation
from clipinspect.calibration.datasets import load_mvtec
from clipinspect.calibration.synth import generate
from clipinspect.calibration.thresholds import calibrate, threshold_at_fpr
from clipinspect.runtime import Bundle, Inspector
from clipinspect.runtime.core.errors import UsageError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, seed=3, categories=["weave", "washer"], image_size=128, n_train=2,
             n_test_good=2, n_test_defect_per_type=1)
    return root


def test_threshold_at_fpr_allows_at_most_the_target_share():
    scores = np.arange(1, 11) / 10.0
    t, measured = threshold_at_fpr(scores, 0.1)
    assert 0.9 < t <= 1.0 and measured == 0.1           # only the top score is flagged
    t, measured = threshold_at_fpr(scores, 0.0)
    assert t > 1.0 and measured == 0.0
    t, measured = threshold_at_fpr(scores, 0.25)         # 2.5 allowed -> 2 flagged
    assert measured == 0.2
    t, measured = threshold_at_fpr(np.full(10, 0.5), 0.1)  # ties cannot be split
    assert measured == 0.0 and t > 0.5
    with pytest.raises(UsageError, match="not a rate"):
        threshold_at_fpr(scores, 1.5)


def test_normal_image_thresholds_are_stored_and_used(tiny_bundle_copy, dataset):
    inspector = Inspector.open(tiny_bundle_copy)
    normal = [s.path for s in load_mvtec(dataset, ["weave"], split="train")]
    normal += [s.path for s in load_mvtec(dataset, ["weave"]) if not s.is_anomalous]
    key, t = calibrate(inspector, "weave", normal=normal, fpr=0.25)
    assert key == "fp32/zero-shot" and t["images"] == 4 and t["measured_image_fpr"] <= 0.25
    stored = Bundle.open(tiny_bundle_copy).manifest.categories["weave"].thresholds[key]
    assert stored.image == t["image"] and stored.extra["target_fpr"] == 0.25
    results = Inspector.open(tiny_bundle_copy).inspect(normal, "weave")
    assert sum(r.is_anomalous for r in results) <= 1     # 25% of 4 images
    share = np.mean(np.concatenate([r.mask.ravel() for r in results]))
    assert share <= 0.25 + 1e-9


def test_validation_thresholds_maximize_f1(tiny_bundle_copy, dataset):
    inspector = Inspector.open(tiny_bundle_copy)
    key, t = calibrate(inspector, "washer", validation=dataset)
    assert 0 < t["image_f1"] <= 1 and 0 < t["pixel_f1"] <= 1
    assert t["method"] == "F1-max on a validation set" and t["images"] == 6
    with pytest.raises(UsageError, match="either normal images"):
        calibrate(inspector, "washer")


def test_eval_report_is_complete_and_failure_safe(tiny_bundle_path, dataset, tmp_path,
                                                  monkeypatch):
    out = tmp_path / "report"
    original = evaluation.evaluate_category

    def flaky(inspectors, root, category, *args):
        if category == "washer":
            raise RuntimeError("disk on fire")
        return original(inspectors, root, category, *args)

    monkeypatch.setattr(evaluation, "evaluate_category", flaky)
    report = evaluation.evaluate(tiny_bundle_path, dataset, out, evaluation.EvalOptions(
        precisions=["fp32", "int8"], shots=[0, 1], batch_size=4))
    assert report["skipped_precisions"] == {"int8": "the bundle has no int8 graphs"}
    assert report["categories"]["washer"] == {"error": "RuntimeError: disk on fire"}
    runs = report["categories"]["weave"]["runs"]
    assert set(runs) == {"fp32/0-shot", "fp32/1-shot"}
    for run in runs.values():
        for metric in evaluation.METRICS:
            assert 0.0 <= run[metric] <= 1.0, metric
        assert run["images_per_second"] > 0
    assert (out / "report.md").read_text().count("| weave |") == 2
    assert (out / "report.png").stat().st_size > 1000
    # A rerun reuses weave and retries only the failed category.
    monkeypatch.setattr(evaluation, "evaluate_category", original)
    calls = []
    monkeypatch.setattr(evaluation, "evaluate_category",
                        lambda *a: calls.append(a[2]) or original(*a))
    again = evaluation.evaluate(tiny_bundle_path, dataset, out, evaluation.EvalOptions(
        precisions=["fp32"], shots=[0, 1], batch_size=4))
    assert calls == ["washer"] and "error" not in again["categories"]["washer"]
    assert again["categories"]["weave"] == json.loads(
        (out / "categories" / "weave.json").read_text())["result"]


def test_eval_agreement_columns_compare_against_fp32(tiny_bundle_path, dataset, tmp_path):
    # A second "precision" that is the same fp32 graphs must agree perfectly.
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle_path, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["graphs"]["copy"] = manifest["graphs"]["fp32"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    report = evaluation.evaluate(bundle, dataset, tmp_path / "r", evaluation.EvalOptions(
        categories=["weave"], precisions=["copy", "fp32"], shots=[1], batch_size=4))
    run = report["categories"]["weave"]["runs"]["copy/1-shot"]
    assert run["map_pearson_vs_fp32"] > 0.999999 and run["max_image_score_diff_vs_fp32"] < 1e-6
