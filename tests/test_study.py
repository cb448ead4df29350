"""``clipinspect study``: the study file, the report writers (torch-free, on hand-made results)
and one small study end to end, checked against ``eval`` of each variant on its own."""

from __future__ import annotations

import builtins
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from clipinspect.benchmarks.study import report as study_report
from clipinspect.benchmarks.study.spec import (Variant, bundle_key, load_study,
                                               study_from_dict, variant_flag)
from clipinspect.calibration.evaluate import shots_refused
from clipinspect.runtime.core.errors import UsageError
from conftest import SMALL_MODEL

CATEGORIES = ["washer", "weave"]


# ---------------------------------------------------------------------------- study file
def test_study_file_resolves_files_and_names_variants(tmp_path):
    (tmp_path / "p.json").write_text("{}")
    path = tmp_path / "study.json"
    path.write_text(json.dumps({"shots": [4, 0, 1], "defaults": {"model": "ViT-S-16"},
                                "variants": [{"method": "patch", "prompts": "both:p.json",
                                              "adapt": True, "precision": "int8"},
                                             {"name": "plain", "method": "winclip"}]}))
    study = load_study(path)
    assert study.shots == (0, 1, 4)
    first, second = study.variants
    assert first.name == "patch both+adapt int8" and first.model == "ViT-S-16"
    assert first.prompt_file == str(tmp_path / "p.json")
    assert first.strategy == "ensemble + file + adaptation"
    assert second.name == "plain" and second.strategy == "ensemble"


@pytest.mark.parametrize("variant, message", [
    ({"prompts": "llm"}, "use 'ensemble', 'llm:FILE'"),
    ({"prompts": "ensemble:x.json"}, "use 'ensemble'"),
    ({"precision": "int4"}, "precision 'int4'"),
    ({"method": "winclip", "colour": "red"}, "unknown key"),
])
def test_study_file_refuses_what_cannot_run(tmp_path, variant, message):
    with pytest.raises(UsageError, match=message):
        study_from_dict({"variants": [variant]}, tmp_path, "s")


def test_repeated_variant_names_are_refused(tmp_path):
    with pytest.raises(UsageError, match="appear twice"):
        study_from_dict({"variants": [{"method": "winclip"}, {"method": "winclip"}]}, tmp_path,
                        "s")


def test_variant_flag_parses_keys():
    assert variant_flag("method=patch,prompts=llm:p.json,adapt=true,seed=2,"
                        "adapters_categories=a+b") == {
        "method": "patch", "prompts": "llm:p.json", "adapt": True, "seed": 2,
        "adapters_categories": ["a", "b"]}
    with pytest.raises(UsageError, match="not KEY=VALUE"):
        variant_flag("method")


def test_bundle_key_follows_what_makes_the_bundle(tmp_path):
    prompts = tmp_path / "p.json"
    prompts.write_text("a")
    v = Variant("a", prompts=f"both:{prompts}")
    key = bundle_key(v, CATEGORIES)
    assert bundle_key(Variant("b", prompts=f"both:{prompts}", precision="int8"),
                      CATEGORIES[::-1]) == key  # name, precision and order do not count
    assert bundle_key(Variant("a", prompts=f"both:{prompts}", adapt=True), CATEGORIES) != key
    prompts.write_text("b")
    assert bundle_key(v, CATEGORIES) != key  # the file's content does


# ---------------------------------------------------------------------------- eval skip
def test_two_reference_heads_refuse_one_shot():
    """eval asks the bundle's method: AprilLab's few-shot score needs two references."""
    from clipinspect.runtime.methods import METHODS

    def inspector(method):
        return SimpleNamespace(bundle=SimpleNamespace(method=METHODS[method]))
    spread = inspector("aprillab")
    assert "needs at least 2" in shots_refused(spread, 1)
    assert shots_refused(spread, 0) is None and shots_refused(spread, 2) is None
    assert all(shots_refused(inspector(m), 1) is None for m in ("winclip", "patch", "alfa"))


# ---------------------------------------------------------------------------- report
def _result(auroc: float, seen=None) -> dict:
    run = {"image_auroc": auroc, "image_ap": 0.9, "image_f1_max": 0.8, "pixel_auroc": 0.7,
           "pixel_ap": 0.3, "pixel_f1_max": 0.4, "pro": 0.5, "images_per_second": 2.0}
    return {"categories": {c: {**run, "images": 4, "anomalous": 2, "notes": [],
                               "seen_by_adapters": None if seen is None else c in seen}
                           for c in CATEGORIES},
            "mean": run, "latency": {"p50_ms": 100.0, "p99_ms": 150.0}, "method": "winclip",
            "gflops_per_image": 12.3, "peak_rss_mb": 400.0, "weights": "random",
            "adapters_seen": seen, "adapters_seen_source": "declared in the study"}


def hand_made_report() -> dict:
    ens = Variant("ens", method="winclip")
    llm = Variant("llm", method="winclip", prompts="llm:/p.json")
    cross = Variant("cross", method="aprillab", adapters="/b.pt",
                    adapters_categories=("tile", "gear"))
    per_variant = {"ens": {0: _result(0.61), 1: _result(0.81)},
                   "llm": {0: _result(0.55), 1: {"error": "ValueError: broken\ntraceback"}},
                   "cross": {0: _result(0.7, ["tile", "gear"]), 1: {"skipped": "1-shot skipped: "
                                                                    "needs 2"}}}
    variants = [{"name": v.name, "variant": v.to_dict(), "strategy": v.strategy,
                 "shots": {str(k): r for k, r in per_variant[v.name].items()}}
                for v in (ens, llm, cross)]
    return {"study": {"name": "t", "note": "hand-made", "shots": [0, 1], "data": "/d",
                      "categories": CATEGORIES, "batch_size": 8, "pixel_size": 64,
                      "timing_images": 2, "prompt_files": {"/p.json": "written by hand"}},
            "machine": {"cpu": "x", "logical_cores": 2},
            "variants": variants}


def test_markdown_has_every_result_prompt_rows_and_cross_domain_marks():
    md = study_report.render_markdown(hand_made_report())
    assert "| ens | winclip | ensemble | fp32 | 1 | 81.0 |" in md
    assert "| cross | winclip | ensemble | fp32 | 0 | 70.0 |" in md
    assert "cross-domain: trained on tile, gear" in md
    assert md.count("no (cross-domain)") == 2  # one row per category
    assert "| winclip | fp32 | 0 | prompt file alone | 55.0 |" in md
    assert "| llm | 1 | failed: ValueError: broken |" in md
    assert "| cross | 1 | 1-shot skipped: needs 2 |" in md
    assert "**Random weights**" in md and "hand-made" in md
    assert "Prompt file `p.json`: written by hand" in md


def test_the_report_quotes_who_wrote_each_prompt_file(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"source": "written by hand", "categories": {}}))
    assert study_report.prompt_file_source(str(tmp_path / "p.json")) == "written by hand"
    assert "not readable" in study_report.prompt_file_source(str(tmp_path / "missing.json"))


def test_html_is_self_contained_and_without_matplotlib_tables_are_still_written(
        tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    report = hand_made_report()
    study_report.write_reports(report, tmp_path)
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))
    assert "plots not drawn" in (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    assert "<table>" in page and "src=\"http" not in page and "cross-domain" in page
    assert json.loads((tmp_path / "study.json").read_text())["variants"][0]["name"] == "ens"


def test_plots_are_inlined_in_the_html(tmp_path):
    pytest.importorskip("matplotlib")
    report = hand_made_report()
    study_report.write_reports(report, tmp_path)
    assert (tmp_path / "accuracy_vs_speed.png").is_file()
    assert (tmp_path / "shots_curve.png").is_file()
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") == 2


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def small_study(small_bundle_path, tmp_path_factory):
    """Two categories, two test images each; the FP32 variant's bundle is the session's
    small bundle (copied into the cache under the key the study computes)."""
    from clipinspect.calibration.synth import generate

    root = tmp_path_factory.mktemp("study")
    generate(root / "data", seed=0, categories=CATEGORIES, image_size=64, n_train=1,
             n_test_good=1, n_test_defect_per_type=1, defects=["hole"])
    study = study_from_dict({
        "shots": [0, 1], "defaults": {"model": SMALL_MODEL, "pretrained": "none"},
        "eval": {"batch_size": 2, "pixel_size": 32, "timing_images": 1},
        "variants": [{"name": "fp32", "method": "winclip"},
                     {"name": "fp16", "method": "winclip", "precision": "fp16"},
                     {"name": "broken", "method": "winclip", "prompts": "both:missing.json"}]},
        root, "test")
    key = bundle_key(study.variants[0], CATEGORIES)
    shutil.copytree(small_bundle_path, root / "out" / "work" / "bundles" / key)
    return root, study


def test_study_matches_eval_of_each_variant_resumes_and_records_a_failure(small_study,
                                                                          monkeypatch):
    from clipinspect.benchmarks.study import bundles, run_study
    from clipinspect.calibration.evaluate import METRICS, EvalOptions, evaluate

    root, study = small_study
    report = run_study(study, root / "data", root / "out")
    by_name = {v["name"]: v for v in report["variants"]}
    assert "PromptFileError" in by_name["broken"]["shots"]["0"]["error"]
    for name in ("fp32", "fp16"):
        result = by_name[name]["shots"]["0"]
        alone = evaluate(result["bundle"], root / "data", root / f"eval-{name}", EvalOptions(
            precisions=(name,), shots=(0, 1), batch_size=2, pixel_size=32))
        for k in (0, 1):
            ours = by_name[name]["shots"][str(k)]
            for c in CATEGORIES:
                theirs = alone["categories"][c]["runs"][f"{name}/{k}-shot"]
                assert {m: ours["categories"][c][m] for m in METRICS} == \
                    {m: theirs[m] for m in METRICS}
            assert ours["latency"]["p50_ms"] > 0 and ours["peak_rss_mb"] > 0
            assert ours["gflops_per_image"] > 0
    assert (root / "out" / "report.html").is_file() and (root / "out" / "study.json").is_file()
    assert "| fp16 | winclip | ensemble | fp16 | 1 |" in (root / "out" / "report.md").read_text()

    stored = root / "out" / "results" / "fp32" / "1-shot.json"
    before = os.stat(stored).st_mtime_ns

    def no_export(*args, **kwargs):
        raise AssertionError("a finished variant was computed again")

    monkeypatch.setattr(bundles, "ensure_bundle", no_export)
    again = run_study(study, root / "data", root / "out")
    assert os.stat(stored).st_mtime_ns == before
    assert [v["shots"] for v in again["variants"][:2]] == \
        [by_name["fp32"]["shots"], by_name["fp16"]["shots"]]
    assert "a finished variant" in again["variants"][2]["shots"]["1"]["error"]  # retried


def test_cli_runs_a_study_from_flags(small_study, tmp_path):
    from clipinspect.runtime.cli import main

    root, _ = small_study
    out = root / "out"
    code = main(["study", str(root / "data"), "--variant", "name=fp32,method=winclip",
                 "--model", SMALL_MODEL, "--pretrained", "none", "--shots", "0,1",
                 "--batch-size", "2", "--pixel-size", "32", "--timing-images", "1",
                 "--out", str(out)])
    assert code == 0
    assert "| fp32 | winclip | ensemble | fp32 | 0 |" in (out / "report.md").read_text()
    assert Path(out / "study.json").is_file()
    # The report names the command that reproduces it (the data as DATA).
    command = json.loads((out / "study.json").read_text())["command"]
    assert command == ("clipinspect study DATA --variant name=fp32,method=winclip --out "
                       f"{out} --model {SMALL_MODEL} --pretrained none --shots 0,1 --batch-size 2 "
                       "--pixel-size 32 --timing-images 1")
    assert f"Command: `{command}`" in (out / "report.md").read_text()


# ---------------------------------------------------------------------------- export --no-ensemble
def test_no_ensemble_takes_the_prompt_file_alone(small_model, prompt_file, tmp_path):
    from clipinspect.export.exporter import TextRecipe, _prompt_file, write_category_text
    from clipinspect.export.methods import METHODS

    model, tokenizer = small_model
    descriptions = _prompt_file(prompt_file, ["weave"])
    file_only = TextRecipe.of(METHODS["winclip"], model, tokenizer, descriptions, None,
                              ensemble=False)
    with_ensemble = TextRecipe.of(METHODS["winclip"], model, tokenizer, descriptions, None)
    alone = write_category_text(tmp_path / "a", "weave", file_only)
    both = write_category_text(tmp_path / "b", "weave", with_ensemble)
    assert (alone["n_normal_prompts"], alone["n_anomalous_prompts"]) == (2, 2)
    assert both["n_normal_prompts"] > 2 and both["n_anomalous_prompts"] > 2


@pytest.mark.parametrize("given, message", [
    ({}, "pass --prompts FILE"),
    ({"categories": ["weave", "washer"], "prompts": True}, r"'washer' \(normal\)"),
    ({"method": "aprillab", "method_options": {"adapters": "none"}}, "do not apply"),
])
def test_no_ensemble_is_refused_before_loading_clip(given, message, prompt_file, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("open_clip")
    from clipinspect.export.exporter import ExportError, ExportOptions, export_bundle

    given = {"categories": ["weave"], **given}
    if given.pop("prompts", None):
        given["prompts"] = prompt_file
    with pytest.raises(ExportError, match=message):
        export_bundle(ExportOptions(tmp_path / "b", SMALL_MODEL, None, ensemble=False, **given))
