"""The clipinspect command as a user runs it (subprocesses, real files)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from conftest import SMALL_MODEL


def run(*args, check=False):
    proc = subprocess.run([sys.executable, "-m", "clipinspect.runtime.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def images(tmp_path, rng):
    folder = tmp_path / "images"
    (folder / "good").mkdir(parents=True)
    (folder / "hole").mkdir()
    for sub in ("good", "hole"):  # the same stem in two folders, as in MVTec trees
        Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(folder / sub / "000.png")
    return folder


def test_predict_writes_results_and_overlays(tiny_bundle_path, images, tmp_path):
    out = tmp_path / "out"
    proc = run("predict", tiny_bundle_path, images, "--category", "weave", "--out", out,
               "--save-maps", check=True)
    assert "2 image(s) inspected (zero-shot), 0 failed" in proc.stdout
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [x["index"] for x in lines] == [0, 1]
    assert all(0 <= x["image_score"] <= 1 and x["size"] == [70, 90] for x in lines)
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == ["00000_good_000.png", "00001_hole_000.png"]
    assert Image.open(out / "overlays" / overlays[0]).size == (90, 70)
    assert np.load(out / "maps" / "00000_good_000.npy").shape == (70, 90)


def test_predict_with_one_bad_image_reports_it_and_keeps_the_rest(tiny_bundle_path, images,
                                                                   tmp_path):
    bad = images / "good" / "broken.png"
    bad.write_bytes(b"garbage")
    out = tmp_path / "out"
    proc = run("predict", tiny_bundle_path, images, "--category", "weave", "--out", out)
    assert proc.returncode == 1
    assert "broken.png" in proc.stderr
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and sum("error" in x for x in lines) == 1


@pytest.mark.parametrize("args, message", [
    (["predict", "{missing}", "x.png", "--category", "a", "--out", "{out}"], "does not exist"),
    (["predict", "{bundle}", "x.png", "--category", "bottle", "--out", "{out}"],
     "unknown category 'bottle'"),
    (["fewshot", "{bundle}", "{empty}", "--category", "weave"], "holds no image files"),
    (["predict", "{bundle}", "x.png", "--category", "weave", "--out", "{out}", "--batch-size", "0"],
     "expected a whole number >= 1"),
    (["quantize", "{bundle}", "--precision", "int8"], "INT8 needs --calibration DIR"),
    (["quantize", "{bundle}", "--precision", "fp16", "--calibration", "{missing}"],
     "is not a directory"),
])
def test_errors_are_one_line_without_traceback(args, message, tiny_bundle_path, tmp_path):
    (tmp_path / "empty").mkdir()
    subst = {"missing": tmp_path / "nope", "bundle": tiny_bundle_path, "empty": tmp_path / "empty",
             "out": tmp_path / "out"}
    proc = run(*[a.format(**subst) for a in args])
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "results.jsonl").exists()  # nothing written before the check


@pytest.mark.torch
@pytest.mark.parametrize("args, message", [
    (["--scales", "2,x"], "expected comma-separated whole numbers"),
    (["--model", SMALL_MODEL, "--categories", "metal nut,metal_nut"], "would share the folder"),
])
def test_export_errors_are_one_line_without_traceback(args, message, tmp_path, capsys):
    # In-process (the export parser imports torch, seconds per child process); the console
    # entry point's own error path is the one the cases above run.
    from clipinspect.runtime.cli import main

    try:
        code = main(["export", "--pretrained", "none", "--out", str(tmp_path / "out"), *args])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_predict_keeps_earlier_results_when_the_category_is_wrong(tiny_bundle_path, images,
                                                                  tmp_path):
    out = tmp_path / "out"
    run("predict", tiny_bundle_path, images, "--category", "weave", "--out", out, check=True)
    before = (out / "results.jsonl").read_text()
    assert run("predict", tiny_bundle_path, images, "--category", "wevae", "--out",
               out).returncode == 2
    assert (out / "results.jsonl").read_text() == before


def test_fewshot_then_info_then_predict_uses_references(tiny_bundle_copy, images, tmp_path):
    run("fewshot", tiny_bundle_copy, images / "good", "--category", "washer", check=True)
    info = run("info", tiny_bundle_copy, check=True).stdout
    assert "washer: 147+84 prompts, 1-shot memory" in info
    assert "RANDOM WEIGHTS" in info
    proc = run("predict", tiny_bundle_copy, images / "hole", "--category", "washer", "--out",
               tmp_path / "o", check=True)
    assert "(few-shot)" in proc.stdout


def test_add_category_reproduces_export_text_embeddings(bundle_copy):
    from clipinspect.runtime import Bundle

    before = Bundle.open(bundle_copy).category("weave").text_prototypes
    # One run (one model load): 'weave' replaced, 'metal nut' new.
    run("add-category", bundle_copy, "weave", "metal nut", "--replace", check=True)
    bundle = Bundle.open(bundle_copy)
    assert np.abs(before - bundle.category("weave").text_prototypes).max() < 1e-5
    entry = bundle.manifest.categories["metal nut"].prompts
    prompts = json.loads((bundle_copy / entry.file).read_text())
    assert len(prompts["normal"]) == 147 and len(prompts["anomalous"]) == 84
    assert prompts["normal"][0] == "a cropped photo of the metal nut."
    assert "damaged metal nut" in prompts["anomalous"][0]
    assert "metal nut" in run("info", bundle_copy, check=True).stdout


def test_synth_is_deterministic_through_the_cli(tmp_path):
    for name in ("a", "b"):
        run("synth", "--out", tmp_path / name, "--categories", "pill", "--train", "1",
            "--test-good", "1", "--test-defect", "1", check=True)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files_a) == 1 + 1 + 4 + 4  # train, good, 4 defects, 4 masks
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_quantize_fp16_then_info_and_predict_with_it(tiny_bundle_copy, images, tmp_path):
    proc = run("quantize", tiny_bundle_copy, "--precision", "fp16", "--holdout", "1", check=True)
    assert "fp16: map Pearson vs FP32 " in proc.stdout
    info = run("info", tiny_bundle_copy, check=True).stdout
    assert "precisions  fp16, fp32" in info and "fp16 vs fp32: map Pearson" in info
    out = tmp_path / "o"
    run("predict", tiny_bundle_copy, images / "hole", "--category", "weave", "--out", out,
        "--precision", "fp16", check=True)
    assert json.loads((out / "results.jsonl").read_text().splitlines()[0])["image_score"] > 0


# ------------------------------------------------------------------ options shared by commands
def _options(command: str) -> dict:
    import argparse

    from clipinspect.runtime.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {o: a for a in sub.choices[command]._actions for o in a.option_strings}


def test_shared_options_mean_the_same_in_every_command():
    from clipinspect.runtime.cli.options import MODES, positive_int

    for command in ("predict", "fewshot", "serve", "watch", "eval", "threshold", "loadtest"):
        batch = _options(command)["--batch-size"]
        assert (batch.type, batch.default) == (positive_int, 8), command
    for command in ("predict", "watch", "threshold"):
        mode = _options(command)["--mode"]
        assert (tuple(mode.choices), mode.default) == (MODES, "auto"), command
    for command in ("predict", "fewshot", "serve", "watch", "quantize", "bench"):
        assert _options(command)["--threads"].type is positive_int, command
    assert "tensorrt-native" in _options("predict")["--provider"].choices
    assert "tensorrt-native" not in _options("eval")["--provider"].choices


@pytest.mark.parametrize("spelling, deprecated", [("--calibration-method", False),
                                                  ("--method", True)])
def test_quantize_calibration_method_and_its_old_spelling(spelling, deprecated, monkeypatch,
                                                          capsys):
    from clipinspect.calibration import quantize
    from clipinspect.runtime.cli import main

    calls = []

    def fake_quantize(bundle, precision, calibration, **options):
        calls.append(options)
        return {"agreement_vs_fp32": {"map_pearson_min": 1.0, "images": 1,
                                      "max_image_score_diff": 0.0}}

    monkeypatch.setattr(quantize, "quantize_bundle", fake_quantize)
    assert main(["quantize", "b", "--precision", "int8", "--calibration", "c",
                 spelling, "entropy"]) == 0
    assert calls[0]["method"] == "entropy"
    warning = "--method is deprecated, use --calibration-method"
    assert (warning in capsys.readouterr().err) == deprecated
    calls.clear()
    assert main(["quantize", "b", "--precision", "fp16"]) == 0
    assert calls[0]["method"] == "minmax"


def test_quantize_old_method_spelling_still_checks_its_values(capsys):
    from clipinspect.runtime.cli import main

    with pytest.raises(SystemExit):
        main(["quantize", "b", "--precision", "int8", "--method", "kl"])
    assert "invalid choice: 'kl'" in capsys.readouterr().err


# Parsing 'export' adds the methods' options (their registry imports torch), and 'add-category'
# checks its names only once the export extra is found.
@pytest.mark.torch
def test_export_takes_category_names_as_every_command_does(tmp_path, capsys):
    from clipinspect.runtime.cli import build_parser, main

    parser = build_parser()
    export = parser.parse_args(["export", "--out", "b", "--categories", "bottle,metal nut,screw"])
    assert export.categories == ["bottle", "metal nut", "screw"]
    assert capsys.readouterr().err == ""
    words = parser.parse_args(["export", "--out", "b", "--categories", "bottle,metal nut",
                               "screw"])  # the old form: the same names, and a warning
    assert words.categories == export.categories
    assert "deprecated" in capsys.readouterr().err
    assert main(["add-category", str(tmp_path)]) == 2
    assert "name at least one category" in capsys.readouterr().err


def test_category_names_are_given_the_same_way_to_every_command(capsys):
    from clipinspect.runtime.cli import build_parser

    parser = build_parser()
    new = parser.parse_args(["add-category", "B", "--categories", "screw,cable,pill"])
    old = parser.parse_args(["add-category", "B", "screw"])  # the positional form still works
    assert (new.names, new.categories) == ([], ["screw", "cable", "pill"])
    assert (old.names, old.categories) == (["screw"], [])
    assert capsys.readouterr().err == ""


def test_export_and_train_adapters_take_every_methods_options_from_the_registry(capsys):
    from clipinspect.export.methods import METHODS
    from clipinspect.runtime.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--help"])
    shown = capsys.readouterr().out
    for method in METHODS.values():
        assert method.name in shown and method.summary.split(",")[0] in shown
        for option in method.options:
            assert option.flag in shown, option.flag
    args = parser.parse_args(["export", "--out", "b", "--dense-blocks", "2", "--layers", "3,6"])
    assert (args.method, args.dense_blocks, args.layers, args.scales) == ("winclip", 2, [3, 6],
                                                                          None)
    args = parser.parse_args(["train-adapters", "data", "--out", "a.pt", "--image-size", "518"])
    assert (args.image_size, args.layers) == (518, None)
