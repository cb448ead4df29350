"""One CLI style: every command takes ``--categories``, ``--format`` and whole numbers the same
way, through the shared helpers of ``runtime/cli/options.py``; the argparse tree is walked, so a
command added with its own spelling fails here."""

from __future__ import annotations

import argparse
import importlib.util
import shutil

import pytest
from PIL import Image

from clipinspect.runtime.cli import build_parser, main
from clipinspect.runtime.cli.options import DATASET_FORMATS, CategoryNames
from clipinspect.runtime.core import images as image_module

HAVE_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "open_clip"))

# The fewest arguments each command parses with; a test checks that every command is here.
MINIMAL = {
    "predict": ["B", "x.png", "--category", "c", "--out", "o"],
    "fewshot": ["B", "x.png", "--category", "c"],
    "serve": ["B"],
    "watch": ["B", "--category", "c"],
    "info": ["B"],
    "build-engine": ["B", "--precision", "fp16"],
    "triton": ["B", "--out", "o"],
    "providers": [],
    "export": ["--out", "o"],
    "train-adapters": ["data", "--out", "a.pt"],
    "add-category": ["B"],
    "prompts check": ["f.json"],
    "prompts generate": ["--url", "u", "--model", "m", "--out", "f.json", "--categories", "c"],
    "demo": [],
    "quantize": ["B", "--precision", "fp16"],
    "eval": ["B", "--data", "d", "--out", "o"],
    "threshold": ["B", "--category", "c"],
    "synth": ["--out", "o"],
    "study": ["data", "--out", "o", "--variant", "method=winclip"],
    "loadtest": ["B", "--out", "o"],
    "bench": ["B", "--out", "o"],
    "station": ["station.toml"],
    "feedback": ["B", "x.png", "--category", "c", "--label", "false-alarm"],
    "memory": ["show", "B", "--category", "c"],
    "promote": ["http://127.0.0.1:8080"],
    "rollback": ["http://127.0.0.1:8080"],
}
# The commands that took ``--categories a b`` before: still parsed, with a warning.
WORDS = {"export", "train-adapters", "add-category", "prompts generate", "demo"}
# Options whose value is a count or size: 0 makes no sense for any of them.
MUST_BE_POSITIVE = {"batch_size", "threads", "per_state", "holdout", "max_images",
                    "pixel_size", "timing_images", "images", "runs", "stream_frames",
                    "max_queue", "max_connections", "max_connections_per_client", "every",
                    "max_frames", "max_map_side", "images_per_category", "train", "test_good",
                    "test_defect", "min_batch", "opt_batch", "max_batch", "max_shots",
                    "workspace", "top_k", "dense_blocks", "image_size"}


def commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict:
    """{'eval': parser, 'prompts generate': parser, ...}: every leaf command, lazily added
    options completed where torch is installed (they come from the method registry)."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(commands(sub, f"{prefix}{name} "))
    if not found and prefix:
        if getattr(parser, "add_lazily", None) is not None and HAVE_TORCH:
            parser._complete()
        found[prefix.strip()] = parser
    return found


def options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if a.option_strings]


def parse(command: str, *extra: str) -> argparse.Namespace:
    minimal = MINIMAL[command]
    if "--categories" in extra and "--categories" in minimal:  # repeated flags add up
        minimal = minimal[:minimal.index("--categories")]
    return build_parser().parse_args([*command.split(), *minimal, *extra])


def needs_torch(command: str):
    lazy = command in ("export", "train-adapters")  # their parsers add the methods' options
    return pytest.param(command, marks=pytest.mark.torch) if lazy else command


CATEGORY_COMMANDS = sorted(c for c, p in commands(build_parser()).items()
                           if any("--categories" in a.option_strings for a in options(p)))


@pytest.fixture(autouse=True)
def pixel_limit_restored(monkeypatch):
    """--max-megapixels and --jpeg-draft set the process's decoding: put them back."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    yield
    image_module.set_max_megapixels(None)
    image_module.set_jpeg_draft(None)


def test_minimal_arguments_cover_every_command():
    assert set(commands(build_parser())) == set(MINIMAL)
    assert WORDS <= set(CATEGORY_COMMANDS)
    assert {"export", "eval", "synth", "study", "loadtest", "demo"} <= set(CATEGORY_COMMANDS)


def test_every_categories_option_is_the_shared_one():
    for name, parser in commands(build_parser()).items():
        for action in options(parser):
            if "--categories" in action.option_strings:
                assert isinstance(action, CategoryNames), name
                assert (action.nargs == "+") == (name in WORDS), name


@pytest.mark.parametrize("command", [needs_torch(c) for c in CATEGORY_COMMANDS])
def test_categories_take_one_comma_separated_form(command, capsys):
    args = parse(command, "--categories", "bottle,metal nut")
    assert args.categories == ["bottle", "metal nut"]
    args = parse(command, "--categories", "metal nut")  # a space is part of the name
    assert args.categories == ["metal nut"]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command", [needs_torch(c) for c in sorted(WORDS)])
def test_the_old_separate_words_form_still_parses_with_a_one_line_warning(command, capsys):
    args = parse(command, "--categories", "bottle", "metal nut", "screw,cable")
    assert args.categories == ["bottle", "metal nut", "screw", "cable"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "deprecated" in err[0]
    assert err[0].endswith("--categories 'bottle,metal nut,screw,cable'")  # pasteable


def test_a_command_without_the_old_form_refuses_separate_words(capsys):
    with pytest.raises(SystemExit):
        parse("eval", "--categories", "bottle", "screw")
    assert "unrecognized arguments: screw" in capsys.readouterr().err


def test_no_option_takes_a_bare_int_and_counts_are_positive():
    """Every whole-number option has a stated minimum (``whole_number``), so -1 or 'x' is refused,
    and 0 too where it makes no sense: counts and sizes have minimum >= 1."""
    checked = 0
    for name, parser in commands(build_parser()).items():
        for action in options(parser):
            flag = f"{name} {action.option_strings[0]}"
            assert action.type is not int, f"{flag}: type=int, use a whole_number type"
            if action.dest in MUST_BE_POSITIVE:
                assert getattr(action.type, "minimum", 0) >= 1, f"{flag}: a count must be >= 1"
                checked += 1
    assert checked >= 30


def positive_options():
    for name, parser in sorted(commands(build_parser()).items()):
        for action in options(parser):
            if getattr(action.type, "minimum", 0) >= 1:
                lazy = name in ("export", "train-adapters")
                yield pytest.param(name, action.option_strings[0],
                                   marks=[pytest.mark.torch] if lazy else [])


@pytest.mark.parametrize("command, flag", list(positive_options()))
@pytest.mark.parametrize("value", ["0", "x"])
def test_counts_refuse_zero_and_words_with_one_line(command, flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        parse(command, flag, value)
    assert e.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1
    assert f"argument {flag}" in errors[0] and f"{value!r}: expected a whole number >=" in errors[0]


def test_batch_size_is_positive_in_every_command_that_has_one():
    have = [n for n, p in commands(build_parser()).items()
            if any(a.dest == "batch_size" for a in options(p))]
    assert {"predict", "eval", "threshold", "study", "demo", "loadtest"} <= set(have)
    if HAVE_TORCH:
        assert "train-adapters" in have


def test_format_is_one_definition():
    for name, parser in commands(build_parser()).items():
        for action in options(parser):
            if "--format" in action.option_strings:
                assert tuple(action.choices) == DATASET_FORMATS, name


def test_the_dataset_formats_agree_with_the_loader():
    from clipinspect.calibration.datasets import FORMATS

    assert DATASET_FORMATS == ("auto", *FORMATS)


@pytest.mark.parametrize("command", ["threshold", "eval"])
def test_threshold_and_eval_take_threads_and_the_pixel_limit(command):
    args = parse(command, "--threads", "3", "--max-megapixels", "2.5", "--jpeg-draft")
    assert (args.threads, args.max_megapixels) == (3, 2.5)
    assert image_module.max_pixels() == 2_500_000 and image_module.jpeg_draft()


@pytest.fixture
def opened(monkeypatch):
    """The threads and batch size every Inspector.open of this test was given."""
    from clipinspect.runtime.core.inspector import Inspector

    calls, real = [], Inspector.open.__func__

    def spy(cls, bundle, precision="fp32", provider="cpu", threads=None, *a, **kw):
        calls.append((threads, kw.get("batch_size")))
        return real(cls, bundle, precision, provider, threads, *a, **kw)
    monkeypatch.setattr(Inspector, "open", classmethod(spy))
    return calls


@pytest.fixture
def dataset(tmp_path):
    from clipinspect.calibration.synth import generate

    root = tmp_path / "data"
    generate(root, seed=1, categories=["weave"], image_size=64, n_train=2, n_test_good=2,
             n_test_defect_per_type=1)
    return root


def test_threshold_opens_the_bundle_as_predict_does(tiny_bundle_path, dataset, tmp_path, opened):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_path, bundle)
    rc = main(["threshold", str(bundle), "--category", "weave", "--normal",
               str(dataset / "weave" / "train"), "--threads", "1", "--batch-size", "2",
               "--max-megapixels", "3"])
    assert rc == 0 and opened == [(1, 2)]
    assert image_module.max_pixels() == 3_000_000


def test_eval_runs_with_the_threads_asked(tiny_bundle_path, dataset, tmp_path, opened):
    import json

    out = tmp_path / "report"
    rc = main(["eval", str(tiny_bundle_path), "--data", str(dataset), "--out", str(out),
               "--categories", "weave", "--threads", "1", "--max-megapixels", "3"])
    assert rc == 0 and [threads for threads, _ in opened] == [1]
    assert json.loads((out / "report.json").read_text())["config"]["threads"] == 1
