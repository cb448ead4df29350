"""What a new user met in the first hour: each message says the real cause and what to do."""

from __future__ import annotations

import socket

import pytest

HUB_REPO = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"


def _failing_download(error: BaseException):
    def download(*args, **kwargs):
        raise error
    return download


@pytest.fixture
def no_network(monkeypatch):
    """open_clip's Hub download fails as it does without a network (name resolution)."""
    pytest.importorskip("open_clip")
    import open_clip.pretrained

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", _failing_download(
        socket.gaierror(-3, "Temporary failure in name resolution")))


def test_weights_failure_without_network_says_so_and_names_the_hub_file(no_network):
    from clipinspect.export.clip import WeightsDownloadError, load_clip
    from clipinspect.export.demo import weights_warning

    with pytest.raises(WeightsDownloadError) as caught:
        load_clip("ViT-B-32", "laion2b_s34b_b79k")
    message = str(caught.value)
    assert "\n" not in message and "no network connection" in message
    assert HUB_REPO in message and "open_clip_pytorch_model.bin" in message
    assert "--pretrained PATH" in message and caught.value.offline
    warning = weights_warning("ViT-B-32", "laion2b_s34b_b79k", caught.value)
    assert "\n" not in warning and "no network connection" in warning and HUB_REPO in warning
    assert "open_clip_model.safetensors" in warning and "RANDOM" in warning


def test_weights_failure_in_offline_mode_says_offline(no_network, monkeypatch):
    from clipinspect.export.clip import WeightsDownloadError, load_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsDownloadError, match="offline mode.*HF_HUB_OFFLINE"):
        load_clip("ViT-B-32", "laion2b_s34b_b79k")


def test_weights_failure_for_another_cause_names_that_cause(monkeypatch):
    pytest.importorskip("open_clip")
    import open_clip.pretrained

    from clipinspect.export.clip import WeightsDownloadError, load_clip

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", _failing_download(
        PermissionError(13, "Permission denied: '/cache/models--laion'")))
    with pytest.raises(WeightsDownloadError) as caught:
        load_clip("ViT-B-32", "laion2b_s34b_b79k")
    message = str(caught.value)
    assert "no network" not in message and not caught.value.offline
    assert "PermissionError" in message and "Permission denied" in message and HUB_REPO in message


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib (the plots extra) as if not installed: importing it raises ImportError."""
    import sys

    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)


def _main(*args) -> tuple[int, str, str]:
    """The clipinspect command in this process -> (exit status, stdout, stderr)."""
    import contextlib
    import io

    from clipinspect.runtime.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main([str(a) for a in args])
        except SystemExit as e:
            status = e.code
    return status, out.getvalue(), err.getvalue()


PLOTS_HINT = "install the plots extra (pip install 'clipinspect[plots]')"


def test_bench_without_matplotlib_does_not_list_a_png_it_did_not_write(
        tiny_bundle_path, tmp_path, no_matplotlib):
    out = tmp_path / "bench"
    status, stdout, stderr = _main(
        "bench", tiny_bundle_path, "--out", out, "--no-baseline", "--runs", "1", "--warmup", "0",
        "--images", "1", "--batch-sizes", "1", "--shots", "1", "--rss-megapixels", "none")
    assert status == 0, stderr
    assert "bench.png" not in stdout and not (out / "bench.png").exists()
    assert f"bench.png not drawn: {PLOTS_HINT}" in stderr


def test_eval_without_matplotlib_does_not_list_a_png_it_did_not_write(
        tiny_bundle_path, tmp_path, no_matplotlib):
    from clipinspect.calibration.synth import generate

    data, out = tmp_path / "data", tmp_path / "report"
    generate(data, seed=3, categories=["weave"], image_size=64, n_train=1, n_test_good=1,
             n_test_defect_per_type=1)
    status, stdout, stderr = _main("eval", tiny_bundle_path, "--data", data, "--out", out,
                                   "--categories", "weave")
    assert status == 0, stderr
    assert "report.png" not in stdout and not (out / "report.png").exists()
    assert f"report.png not drawn: {PLOTS_HINT}" in stderr


def test_bench_baseline_on_random_weights_does_not_warn_about_exporting(small_bundle_path,
                                                                        tmp_path, capsys):
    from clipinspect.benchmarks import bench

    r = bench.run_bench(small_bundle_path, tmp_path / "bench", bench.BenchOptions(
        modes=["zero-shot"], batches=[1], shots=1, runs=1, warmup=0, images=1,
        rss_megapixels=[]))
    assert any(row["kind"] == "pytorch" for row in r["rows"]), r["skipped"]
    said = capsys.readouterr()
    console = said.out + said.err
    assert "exporting" not in console.lower()
    assert console.count("the PyTorch baseline uses the bundle's random weights (seed 0)") == 1


def test_did_you_mean_names_a_close_misspelling_after_a_case_match():
    from clipinspect.runtime.core.errors import did_you_mean

    assert did_you_mean("weeve", ["washer", "weave"]) == " (did you mean 'weave'?)"
    assert did_you_mean("WEEVE", ["washer", "weave"]) == " (did you mean 'weave'?)"
    assert did_you_mean("washr", ["washer", "weave"]) == " (did you mean 'washer'?)"
    # The case-only match wins over a closer-looking spelling.
    assert did_you_mean("Weave", ["weavee", "weave"]) == " (did you mean 'weave'?)"
    assert did_you_mean("bottle", ["washer", "weave"]) == ""
    assert did_you_mean("pcb5", ["pcb1", "pcb2"]) == ""  # another real name, not a typo
    assert did_you_mean("weave", ["weave"]) == ""


@pytest.fixture
def typo_data(tmp_path):
    from clipinspect.calibration.synth import generate

    generate(tmp_path / "data", seed=3, categories=["weave"], image_size=64, n_train=1,
             n_test_good=1, n_test_defect_per_type=1)
    return tmp_path / "data"


@pytest.mark.parametrize("command", [
    ("predict", "{bundle}", "{good}", "--category", "weeve", "--out", "{tmp}/out"),
    ("fewshot", "{bundle}", "{good}", "--category", "weeve"),
    ("threshold", "{bundle}", "--category", "weeve", "--normal", "{good}"),
    ("eval", "{bundle}", "--data", "{data}", "--out", "{tmp}/report", "--categories", "weeve"),
])
def test_a_category_typo_gets_the_hint_in_every_command(command, tiny_bundle_copy, typo_data,
                                                         tmp_path):
    values = {"bundle": tiny_bundle_copy, "good": typo_data / "weave" / "train" / "good",
              "data": typo_data, "tmp": tmp_path}
    status, _, stderr = _main(*(part.format(**values) for part in command))
    assert status != 0
    (line,) = [x for x in stderr.splitlines() if x.strip()]
    assert "'weeve' (did you mean 'weave'?)" in line, line


def test_bundle_entry_names_the_close_category(tiny_bundle_path):
    from clipinspect.runtime.core.bundle import Bundle
    from clipinspect.runtime.core.errors import ClipInspectError

    with pytest.raises(ClipInspectError, match=r"'washr' \(did you mean 'washer'\?\)"):
        Bundle.open(tiny_bundle_path).entry("washr")


def test_a_misspelt_choice_option_is_named(tiny_bundle_path, tmp_path):
    status, _, stderr = _main("predict", tiny_bundle_path, tmp_path, "--category", "weave",
                              "--mode", "zero-sht")
    assert status != 0 and "invalid choice 'zero-sht' (did you mean 'zero-shot'?)" in stderr


@pytest.mark.parametrize("command", [
    ("predict", "{bundle}", "{missing}", "--category", "weave", "--out", "{tmp}/out"),
    ("fewshot", "{bundle}", "{missing}", "--category", "weave"),
    ("threshold", "{bundle}", "--category", "weave", "--normal", "{missing}"),
])
def test_a_missing_input_path_is_one_line_naming_it(command, tiny_bundle_copy, tmp_path):
    from test_cli import run

    missing = tmp_path / "no" / "such" / "dir"
    values = {"bundle": tiny_bundle_copy, "missing": missing, "tmp": tmp_path}
    proc = run(*(part.format(**values) for part in command))
    assert proc.returncode == 2
    (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
    assert line.startswith("clipinspect: error: input path ") and repr(str(missing)) in line
    assert "no such file or directory" in line and "failed" not in proc.stdout
    assert not (tmp_path / "out").exists()


def test_info_prints_thresholds_as_a_table(tiny_bundle_copy):
    from clipinspect.runtime.core.bundle import Bundle
    from test_cli import run

    assert "thresholds  none (set them with 'clipinspect threshold')" in run(
        "info", tiny_bundle_copy, check=True).stdout
    Bundle.open(tiny_bundle_copy).set_thresholds("weave", "fp32/zero-shot", {
        "image": 0.1234567, "pixel": 0.25, "method": "normal images at a target FPR",
        "images": 12})
    Bundle.open(tiny_bundle_copy).set_thresholds("washer", "fp32/few-shot", {"image": 0.5})
    lines = run("info", tiny_bundle_copy, check=True).stdout.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("thresholds"))
    header, *rows = [x.split("  ") for x in lines[start:start + 3]]
    cells = [[c.strip() for c in row if c.strip()] for row in (header, *rows)]
    assert cells[0] == ["thresholds", "category", "key", "image", "pixel", "method", "images"]
    assert cells[1:] == [["washer", "fp32/few-shot", "0.5", "-", "-", "-"],
                         ["weave", "fp32/zero-shot", "0.123457", "0.25",
                          "normal images at a target FPR", "12"]]
    assert not any("{" in x for x in lines)
    column = lines[start].index("key")
    assert all(x[column:].startswith(("key", "fp32/")) for x in lines[start:start + 3])


def test_threshold_warns_when_normal_images_include_the_references(tiny_bundle_copy, tmp_path,
                                                                   rng):
    import shutil

    import numpy as np
    from PIL import Image

    refs, normal = tmp_path / "refs", tmp_path / "normal"
    refs.mkdir()
    normal.mkdir()
    for path in (refs / "r0.png", refs / "r1.png", *(normal / f"n{i}.png" for i in range(3))):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    shutil.copy(refs / "r1.png", normal / "copy_of_r1.png")  # the same content, another name
    assert _main("fewshot", tiny_bundle_copy, refs, "--category", "weave")[0] == 0

    status, _, stderr = _main("threshold", tiny_bundle_copy, "--category", "weave",
                              "--normal", normal, refs / "r0.png")
    assert status == 0, stderr
    (line,) = [x for x in stderr.splitlines() if "few-shot references" in x]
    assert line.startswith("clipinspect: WARNING: 2 of the --normal images")
    assert "copy_of_r1.png" in line and "r0.png" in line and "n0.png" not in line
    status, _, stderr = _main("threshold", tiny_bundle_copy, "--category", "weave",
                              "--normal", normal / "n0.png", normal / "n1.png")
    assert status == 0 and "few-shot references" not in stderr


def test_readme_says_how_to_avoid_the_cuda_wheels_and_states_the_demo_s_parity():
    from pathlib import Path

    text = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert ("pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"
            in text)
    assert "at most 6e-6" not in text and "the demo prints its own" in text
