"""``clipinspect study`` against a careless or hostile study file: typed values, result folders
that never collide or leave OUT/results, prompt files read only when regular and small, and a
per-variant deadline on the child process. No torch, no export: the children run stand-ins."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clipinspect.benchmarks.study import report as study_report
from clipinspect.benchmarks.study import runner
from clipinspect.benchmarks.study.spec import Study, Variant, load_study, study_from_dict
from clipinspect.runtime.core.errors import UsageError


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipinspect: error:") and "\n" not in err, err
    return err


# ---------------------------------------------------------------------------- types
@pytest.mark.parametrize("given, message", [
    ({"shots": ["abc"]}, r"shots 'abc': expected a whole number from 0"),
    ({"shots": "abc"}, r"shots 'abc': expected a non-empty list"),
    ({"shots": [True]}, r"shots True"),
    ({"shots": [1.5]}, r"shots 1.5"),
    ({"eval": {"batch_size": "x"}}, r"eval.batch_size 'x': expected a whole number from 1"),
    ({"eval": {"pixel_size": 0}}, r"eval.pixel_size 0"),
    ({"eval": {"timeout_s": -1}}, r"eval.timeout_s -1: expected seconds"),
    ({"eval": "fast"}, r"eval 'fast': expected an object"),
    ({"categories": "weave"}, r"categories 'weave': expected a non-empty list of category"),
    ({"categories": ["weave", "../x"]}, r"'../x' is not a category name"),
    ({"categories": ["weave", "weave"]}, r"appears twice"),
    ({"name": {"a": 1}}, r"name \{'a': 1\}: expected text"),
    ({"defaults": ["x"]}, r"defaults \['x'\]: expected an object"),
])
def test_study_settings_of_the_wrong_type_are_refused(tmp_path, given, message):
    with pytest.raises(UsageError, match=message):
        study_from_dict({"variants": [{"method": "winclip"}], **given}, tmp_path, "s")


@pytest.mark.parametrize("variant, message", [
    ({"adapt": "false"}, r"adapt 'false': expected true or false"),
    ({"seed": "x"}, r"seed 'x': expected a whole number"),
    ({"seed": 1e400}, r"seed inf"),
    ({"name": ""}, r"name '': expected text"),
    ({"name": "a\nb"}, r"name 'a\\nb': expected text of 1 to 100 printable"),
    ({"model": 3}, r"model 3"),
    ({"options": ["scales"]}, r"options \['scales'\]: expected an object"),
    ({"adapters_categories": "tile"}, r"adapters_categories 'tile'"),
])
def test_variant_keys_of_the_wrong_type_are_refused(tmp_path, variant, message):
    with pytest.raises(UsageError, match=message):
        study_from_dict({"variants": [{"method": "winclip", **variant}]}, tmp_path, "s")


def test_a_huge_number_in_the_study_file_is_a_one_line_error(tmp_path, capsys):
    from clipinspect.runtime.cli import main

    path = tmp_path / "study.json"
    path.write_text('{"shots": [0, 1e400], "variants": [{"method": "winclip"}]}')
    with pytest.raises(UsageError, match=r"shots inf"):
        load_study(path)
    assert main(["study", str(tmp_path), "--study", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "shots inf" in one_line_error(capsys)
    study = load_study(_write(tmp_path / "ok.json", {"categories": ["weave"], "eval": {
        "timeout_s": 90}, "variants": [{"method": "winclip", "adapt": False, "seed": 3}]}))
    assert study.categories == ("weave",) and study.timeout_s == 90.0
    assert study.variants[0].seed == 3 and study.variants[0].adapt is False


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_cli_flags_are_checked_too(tmp_path, capsys):
    from clipinspect.runtime.cli import main

    base = ["study", str(tmp_path), "--out", str(tmp_path / "o")]
    for flags, message in ((["--variant", "method=winclip,seed=x"], "seed='x'"),
                           (["--variant", "method=winclip,adapt=maybe"], "adapt='maybe'"),
                           (["--variant", "method=winclip", "--categories", "a/b"],
                            "'a/b' is not a category name"),
                           (["--variant", "method=winclip", "--variant-timeout", "0"],
                            "--variant-timeout 0.0: expected seconds")):
        assert main(base + flags) == 2, flags
        assert message in one_line_error(capsys)


# ---------------------------------------------------------------------------- result folders
@pytest.mark.parametrize("names", [["a b", "a_b"], ["Fast", "fast"], ["x/y", "x y"]])
def test_variants_sharing_a_result_folder_are_refused(tmp_path, names):
    with pytest.raises(UsageError, match="would share the result folder"):
        study_from_dict({"variants": [{"name": n, "method": "winclip"} for n in names]},
                        tmp_path, "s")


@pytest.mark.parametrize("name", ["..", ".", "../..", "/etc", "...", "a/../../b"])
def test_every_result_path_stays_inside_out_results(tmp_path, name):
    results = (tmp_path / "out" / "results").resolve()
    path = runner.result_path(tmp_path / "out", Variant(name), 0)
    assert path.resolve().is_relative_to(results) and path.resolve().parent != results


def test_a_result_folder_that_links_outside_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out" / "results").mkdir(parents=True)
    (tmp_path / "out" / "results" / "v").symlink_to(elsewhere)
    with pytest.raises(UsageError, match="outside"):
        runner.result_path(tmp_path / "out", Variant("v"), 0)


# ---------------------------------------------------------------------------- prompt files
def test_a_fifo_prompt_file_does_not_hang_the_report(tmp_path):
    from clipinspect.export import prompt_format

    fifo = tmp_path / "prompts.json"
    os.mkfifo(fifo)
    found = []
    reader = threading.Thread(target=lambda: found.append(
        study_report.prompt_file_source(str(fifo))), daemon=True)
    reader.start()
    reader.join(5)
    hung = reader.is_alive()
    if hung:  # release it: a writer that opens and closes gives the reader end of file
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5)
    assert not hung, "reading a FIFO prompt file blocked the report"
    assert "not a regular file" in found[0]
    with pytest.raises(prompt_format.PromptFileError, match="not a regular file"):
        prompt_format.read_prompt_file(fifo)


def test_an_oversized_prompt_file_is_not_read_whole(tmp_path):
    from clipinspect.export import prompt_format

    big = tmp_path / "big.json"
    big.write_text(json.dumps({"source": "someone", "categories": {},
                               "pad": "x" * (prompt_format.MAX_FILE_BYTES + 10)}))
    assert "larger than" in study_report.prompt_file_source(str(big))
    with pytest.raises(prompt_format.PromptFileError, match="larger than"):
        prompt_format.load(big)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero here")
def test_an_endless_device_as_prompt_file_is_refused_without_reading_it(tmp_path):
    link = tmp_path / "prompts.json"
    link.symlink_to("/dev/zero")
    # In a child with its address space capped: reading the device whole would exhaust memory.
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
            "from clipinspect.benchmarks.study.report import prompt_file_source; "
            "print(prompt_file_source(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", code, str(link)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert "not a regular file" in proc.stdout


# ---------------------------------------------------------------------------- deadline
def hang_or_answer(job):
    """Runs in the study's child process (found by name there): a variant named 'slow' never
    finishes, any other answers at once."""
    if job.variant.name == "slow":
        time.sleep(600)
    return {k: {"skipped": f"{k}-shot: stand-in evaluation"} for k in job.shots}


def test_a_variant_past_its_timeout_is_recorded_as_failed_and_the_study_goes_on(tmp_path,
                                                                                 monkeypatch):
    study = Study((Variant("slow"), Variant("fast")), shots=(0,), categories=("weave",),
                  timeout_s=6.0)
    monkeypatch.setattr(runner, "evaluate_job", hang_or_answer)
    import clipinspect.benchmarks.study.bundles as bundles

    monkeypatch.setattr(bundles, "ensure_bundle", lambda *args: tmp_path / "bundle")
    started = time.monotonic()
    report = runner.run_study(study, tmp_path / "data", tmp_path / "out")
    assert time.monotonic() - started < 6.0 + 20.0
    slow, fast = report["variants"]
    assert slow["shots"]["0"]["error"].startswith("TimeoutError: the evaluation did not "
                                                  "finish within 6 s")
    assert fast["shots"]["0"] == {"skipped": "0-shot: stand-in evaluation"}
    assert "did not finish within 6 s" in (tmp_path / "out" / "report.md").read_text()


def test_a_child_that_dies_is_recorded_not_waited_for():
    started = time.monotonic()
    with pytest.raises(runner.ChildFailed, match="exited with code 3 without a result"):
        runner.run_in_child(os._exit, 3, 60)
    with pytest.raises(runner.ChildFailed, match=r"ValueError: math domain error") as e:
        runner.run_in_child(math.log, 0, 60)
    assert "Traceback" in e.value.traceback
    assert time.monotonic() - started < 30
