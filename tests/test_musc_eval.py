"""MuSc in ``clipinspect eval`` and ``clipinspect study``: zero-shot scores the category's whole
test set as one pool (the same scores as ``Inspector.inspect`` of all of it), ``pool_size``
splits it into consecutive pools, k >= 4 shots score each image against a pool of k normal
training images (streaming), fewer are refused with the reason, and a study runs MuSc rows at
two pool sizes. The pool arithmetic, the study file's ``pool_sizes`` and the report's pool
column are checked without torch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipinspect.benchmarks.study import report as study_report
from clipinspect.benchmarks.study.spec import Variant, bundle_key, study_from_dict
from clipinspect.calibration.evaluate import (MIN_POOL, EvalOptions, pool_spans, pools_note,
                                              shots_refused)
from clipinspect.runtime.core.errors import UsageError
from conftest import SMALL_MODEL, needs_export

CATEGORIES = ["washer", "weave"]
CATEGORY = "weave"
N_TEST = 12  # 4 good + 2 per defect type


# ---------------------------------------------------------------------------- torch-free
@pytest.mark.parametrize("n, size, spans", [
    (12, None, [(0, 12)]),
    (12, 12, [(0, 12)]),
    (12, 100, [(0, 12)]),
    (12, 6, [(0, 6), (6, 12)]),
    (12, 5, [(0, 5), (5, 12)]),       # the last 2 join the pool before
    (13, 5, [(0, 5), (5, 13)]),       # the last 3 too
    (15, 5, [(0, 5), (5, 10), (10, 15)]),
    (7, 5, [(0, 7)]),
    (0, 5, []),
])
def test_pool_spans_are_consecutive_and_never_smaller_than_a_pool(n, size, spans):
    assert pool_spans(n, size) == spans
    if spans:
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert all(end - start >= MIN_POOL for start, end in spans) or len(spans) == 1


def test_pools_note_says_what_was_split_and_merged():
    assert pools_note([12], None) is None and pools_note([12], 12) is None
    assert pools_note([6, 6], 6) == "0-shot: the 12 test images scored in 2 pool(s) of at most 6 (6 + 6)"
    note = pools_note([5, 7], 5)
    assert "(5 + 7)" in note and "the last 2 merged into the pool before" in note
    assert f"at least {MIN_POOL} images" in note


def test_musc_refuses_pools_of_fewer_than_four_parts_in_eval_words():
    from types import SimpleNamespace

    from clipinspect.runtime.methods import METHODS

    musc = SimpleNamespace(bundle=SimpleNamespace(method=METHODS["musc"]))
    refused = shots_refused(musc, 2)
    assert refused.startswith("2-shot skipped: ") and "at least 4 other images" in refused
    assert shots_refused(musc, 0) is None and shots_refused(musc, 4) is None
    april = SimpleNamespace(bundle=SimpleNamespace(method=METHODS["aprillab"]))
    assert shots_refused(april, 1) == METHODS["aprillab"].shots_refused(1)  # as it was


def test_eval_refuses_a_pool_size_for_a_method_that_scores_each_image_alone(
        tiny_bundle_path, tmp_path, capsys):
    from clipinspect.calibration.evaluate import evaluate
    from clipinspect.calibration.synth import generate
    from clipinspect.runtime.cli import main

    generate(tmp_path / "data", categories=["weave"], image_size=32, n_train=1, n_test_good=1,
             n_test_defect_per_type=1, defects=["hole"])
    with pytest.raises(UsageError, match="'winclip', which scores each image alone: drop "
                                         "--pool-size"):
        evaluate(tiny_bundle_path, tmp_path / "data", tmp_path / "r",
                 EvalOptions(categories=["weave"], pool_size=5))
    assert not (tmp_path / "r" / "report.json").exists()
    base = ["eval", str(tiny_bundle_path), "--data", str(tmp_path / "data"), "--out",
            str(tmp_path / "r")]
    assert main(base + ["--pool-size", "5"]) == 2
    assert "drop --pool-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--pool-size", "4"])
    assert "'4': expected a whole number >= 5" in capsys.readouterr().err


@pytest.mark.parametrize("given, message", [
    ({"pool_sizes": [4]}, r"pool_sizes 4: expected a whole number from 5"),
    ({"pool_sizes": 5}, r"pool_sizes 5: expected a list of whole numbers from 5"),
    ({"pool_sizes": [True]}, r"pool_sizes True"),
    ({"pool_sizes": [5], "variants": [{"method": "winclip"}]},
     r"no variant has one; add a musc variant or drop pool_sizes"),
])
def test_study_pool_sizes_are_checked(tmp_path, given, message):
    data = {"variants": [{"method": "musc"}, {"method": "winclip"}], **given}
    with pytest.raises(UsageError, match=message):
        study_from_dict(data, tmp_path, "s")


def test_study_reads_pool_sizes_and_names_musc_without_prompts(tmp_path):
    study = study_from_dict({"pool_sizes": [10, 5, 10], "variants": [
        {"method": "musc"}, {"method": "musc", "precision": "int8"}, {"method": "winclip"}]},
        tmp_path, "s")
    assert study.pool_sizes == (5, 10)
    assert [v.name for v in study.variants] == ["musc fp32", "musc int8",
                                                "winclip ensemble fp32"]
    assert study.variants[0].strategy == "no prompts"
    from clipinspect.benchmarks.study.runner import result_path, run_keys

    assert run_keys(study.variants[0], study) == [0, 1, 2, 4, 8, (0, 5), (0, 10)]
    assert run_keys(study.variants[2], study) == [0, 1, 2, 4, 8]  # the axis is ignored
    assert result_path(tmp_path, study.variants[0], 0, 5).name == "0-shot-pool5.json"


def test_study_cli_refuses_pool_sizes_without_a_musc_variant(tmp_path, capsys):
    from clipinspect.runtime.cli import main

    assert main(["study", str(tmp_path), "--out", str(tmp_path / "o"), "--variant",
                 "method=winclip", "--pool-sizes", "5"]) == 2
    assert "--pool-sizes: pool_sizes [5]: only a method" in capsys.readouterr().err


def _run(auroc: float, pooled: bool, pools=None) -> dict:
    run = {"image_auroc": auroc, "image_ap": 0.9, "image_f1_max": 0.8, "pixel_auroc": 0.7,
           "pixel_ap": 0.3, "pixel_f1_max": 0.4, "pro": 0.5, "images_per_second": 2.0}
    cats = {c: {**run, "images": N_TEST, "anomalous": 8, "notes": [], "seen_by_adapters": None,
                **({"pools": pools} if pools else {})} for c in CATEGORIES}
    return {"categories": cats, "mean": run, "latency": None if pooled else {"p50_ms": 9.0},
            "method": "musc" if pooled else "winclip", "gflops_per_image": 1.0,
            "peak_rss_mb": 100.0, "weights": "random", "adapters_seen": None,
            **({"pool_scored": True} if pooled else {})}


def test_report_has_a_pool_column_and_rows_per_pool_size(tmp_path):
    musc, winclip = Variant("musc fp32", method="musc"), Variant("winclip", method="winclip")
    per_variant = {"musc fp32": {0: _run(0.6, True, [12]), 4: _run(0.7, True),
                                 (0, 5): _run(0.5, True, [5, 7]),
                                 (0, 6): {"error": "ValueError: broken"}},
                   "winclip": {0: _run(0.8, False), 4: _run(0.9, False)}}
    study = study_from_dict({"shots": [0, 4], "pool_sizes": [5, 6], "variants": [
        {"name": "musc fp32", "method": "musc"}, {"name": "winclip", "method": "winclip"}]},
        tmp_path, "s")
    report = study_report.assemble(study, per_variant, data=tmp_path, categories=CATEGORIES)
    report["machine"] = {"cpu": "x", "logical_cores": 2}
    entry = report["variants"][0]
    assert list(entry["shots"]) == ["0", "4"] and list(entry["pools"]) == ["5", "6"]
    assert "pools" not in report["variants"][1] and report["study"]["pool_sizes"] == [5, 6]
    md = study_report.render_markdown(report)
    assert "| musc fp32 | musc | no prompts | fp32 | 0 | all | 60.0 |" in md
    assert "| musc fp32 | musc | no prompts | fp32 | 0 | <= 5 | 50.0 |" in md
    assert "| musc fp32 | musc | no prompts | fp32 | 4 | 4 normal | 70.0 |" in md
    assert "| winclip | winclip | ensemble | fp32 | 0 | - | 80.0 |" in md
    assert "| musc fp32 | 0 | 5 + 7 | 50.0 |" in md  # per category: the pools themselves
    assert "| musc fp32 | 0 (pool <= 5) |" not in md
    assert "| musc fp32 | 0 (pool <= 6) | failed: ValueError: broken |" in md
    assert "zero-shot pool sizes 5, 6" in md
    if study_report.plot(report, tmp_path) is not None:
        assert (tmp_path / "pool_sizes.png").is_file()


# ---------------------------------------------------------------------------- with a bundle
@pytest.fixture(scope="module")
def musc_bundle(tmp_path_factory):
    needs_export()
    from clipinspect.export.exporter import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("musc-eval") / "bundle"
    export_bundle(ExportOptions(out=out, model=SMALL_MODEL, pretrained=None,
                                categories=CATEGORIES, method="musc", warn_random=False))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from clipinspect.calibration.synth import generate

    root = tmp_path_factory.mktemp("musc-eval-data")
    generate(root, seed=0, categories=CATEGORIES, image_size=64, n_train=5, n_test_good=4,
             n_test_defect_per_type=2)
    return root


def _test_set(data):
    from clipinspect.calibration.datasets import load_dataset

    test = load_dataset(data, "auto", [CATEGORY], split="test")
    assert len(test) == N_TEST
    return test


def _scored(inspector, data, shots, **options):
    """eval's own scoring of the category's test set (calibration.evaluate.score_test_set)."""
    from clipinspect.calibration.datasets import load_dataset
    from clipinspect.calibration.evaluate import _memories, score_test_set
    from clipinspect.runtime.core.progress import Progress

    opts = EvalOptions(shots=shots, batch_size=4, pixel_size=32, **options)
    train = [s for s in load_dataset(data, "auto", [CATEGORY], "train") if not s.is_anomalous]
    notes: list[str] = []
    memories = _memories(inspector, opts, train, notes)
    with Progress(0, "test") as bar:
        return score_test_set(inspector, CATEGORY, [s.path for s in _test_set(data)], memories,
                              opts, bar), notes


def test_eval_zero_shot_is_inspect_of_the_whole_test_set(musc_bundle, data):
    from clipinspect.runtime import Inspector

    inspector = Inspector.open(musc_bundle)
    done, _ = _scored(inspector, data, (0,))
    files = [s.path for s in _test_set(data)]
    whole = [r.image_score for r in inspector.inspect(files, CATEGORY, batch_size=4,
                                                      mode="zero-shot")]
    assert done.pools == [N_TEST]
    np.testing.assert_array_equal(done.scores[0], np.array(whole, np.float64))


def test_a_pool_size_splits_the_test_set_into_consecutive_pools(musc_bundle, data):
    from clipinspect.runtime import Inspector

    inspector = Inspector.open(musc_bundle)
    done, _ = _scored(inspector, data, (0,), pool_size=5)
    assert done.pools == [5, 7]
    files = [s.path for s in _test_set(data)]
    parts = [inspector.inspect(files[a:b], CATEGORY, batch_size=4, mode="zero-shot")
             for a, b in ((0, 5), (5, N_TEST))]
    np.testing.assert_array_equal(done.scores[0], [r.image_score for p in parts for r in p])
    whole, _ = _scored(inspector, data, (0,))
    assert not np.array_equal(whole.scores[0], done.scores[0])  # each pool normalised alone


def test_four_shots_score_against_a_pool_and_two_are_refused(musc_bundle, data):
    from clipinspect.calibration.datasets import load_dataset
    from clipinspect.runtime import Inspector

    inspector = Inspector.open(musc_bundle)
    done, notes = _scored(inspector, data, (0, 2, 4))
    assert set(done.scores) == {0, 4}
    assert notes == ["2-shot skipped: 2-part pool skipped: MuSc's interval average needs at "
                     "least 4 other images"]
    train = [s.path for s in load_dataset(data, "auto", [CATEGORY], "train")][:4]
    memory = inspector.build_memory(train, category=CATEGORY)[0]
    files = [s.path for s in _test_set(data)]
    with inspector.using_memory(CATEGORY, memory):
        streamed = [r.image_score for r in inspector.inspect(files, CATEGORY, batch_size=4,
                                                             mode="few-shot")]
    np.testing.assert_allclose(done.scores[4], streamed, rtol=0, atol=1e-6)


def test_eval_report_records_pools_and_compares_int8_with_fp32(musc_bundle, data, tmp_path):
    from clipinspect.calibration.evaluate import evaluate
    from clipinspect.calibration.quantize import quantize_bundle

    bundle = Path(shutil.copytree(musc_bundle, tmp_path / "bundle"))
    quantize_bundle(bundle, "int8", data, max_images=6, sensitivity="off")
    report = evaluate(bundle, data, tmp_path / "r", EvalOptions(
        precisions=("fp32", "int8"), shots=(0, 2, 4), batch_size=4, pixel_size=32,
        pool_size=6))
    assert report["config"]["pool_size"] == 6
    for c in CATEGORIES:
        result = report["categories"][c]
        assert result["pools"] == [6, 6]
        assert set(result["runs"]) == {"fp32/0-shot", "fp32/4-shot", "int8/0-shot",
                                       "int8/4-shot"}
        for k in (0, 4):
            int8 = result["runs"][f"int8/{k}-shot"]
            assert 0.9 < int8["map_pearson_vs_fp32"] <= 1.0 + 1e-9
            assert int8["max_image_score_diff_vs_fp32"] >= 0
        assert any(n.startswith("2-shot skipped: ") for n in result["notes"])
    md = (tmp_path / "r" / "report.md").read_text()
    assert "consecutive pools of at most 6 images (pools: washer 6 + 6, weave 6 + 6)" in md
    # The whole test set is the default pool, and is recorded as such.
    whole = evaluate(bundle, data, tmp_path / "w", EvalOptions(
        categories=[CATEGORY], shots=(0,), batch_size=4, pixel_size=32))
    assert whole["config"]["pool_size"] is None
    assert whole["categories"][CATEGORY]["pools"] == [N_TEST]
    assert "each category's whole test set in one pool" in (tmp_path / "w" / "report.md"
                                                            ).read_text()


def test_study_runs_musc_rows_at_two_pool_sizes(musc_bundle, data, tmp_path, monkeypatch):
    from clipinspect.benchmarks.study import bundles, run_study
    from clipinspect.calibration.evaluate import METRICS, evaluate

    study = study_from_dict({
        "shots": [0, 2, 4], "pool_sizes": [5, 6],
        "defaults": {"model": SMALL_MODEL, "pretrained": "none"},
        "eval": {"batch_size": 4, "pixel_size": 32, "timing_images": 1},
        "variants": [{"name": "musc", "method": "musc"}]}, tmp_path, "test")
    key = bundle_key(study.variants[0], CATEGORIES)
    shutil.copytree(musc_bundle, tmp_path / "out" / "work" / "bundles" / key)
    report = run_study(study, data, tmp_path / "out")
    (entry,) = report["variants"]
    assert "at least 4 other images" in entry["shots"]["2"]["skipped"]
    assert entry["shots"]["0"]["pool_size"] is None and entry["shots"]["0"]["latency"] is None
    assert entry["shots"]["4"]["latency"]["p50_ms"] > 0
    assert {p: [r["categories"][c]["pools"] for c in CATEGORIES]
            for p, r in entry["pools"].items()} == {"5": [[5, 7], [5, 7]], "6": [[6, 6], [6, 6]]}
    for size in (5, 6):
        alone = evaluate(entry["shots"]["0"]["bundle"], data, tmp_path / f"eval{size}",
                         EvalOptions(shots=(0,), batch_size=4, pixel_size=32, pool_size=size))
        for c in CATEGORIES:
            ours = entry["pools"][str(size)]["categories"][c]
            assert {m: ours[m] for m in METRICS} == \
                {m: alone["categories"][c]["runs"]["fp32/0-shot"][m] for m in METRICS}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| musc | musc | no prompts | fp32 | 0 | <= 5 |" in md
    assert "| musc | musc | no prompts | fp32 | 4 | 4 normal |" in md
    stored = json.loads((tmp_path / "out" / "results" / "musc" / "0-shot-pool5.json"
                         ).read_text())
    assert stored["config"]["pool_size"] == 5

    def no_export(*args, **kwargs):
        raise AssertionError("a finished result was computed again")

    monkeypatch.setattr(bundles, "ensure_bundle", no_export)
    again = run_study(study, data, tmp_path / "out")
    assert again["variants"][0]["pools"] == entry["pools"]
