"""``clipinspect demo``: refuses to overwrite, sets thresholds from its data, reports decisions in
percent with pictures (Markdown and self-contained HTML), and says the weights warning once.

The pipeline runs on the torch-free tiny bundle (placed where the demo reuses a bundle), so the
export step is the fallback path: the asked-for weights fail, the random-weights bundle is used.
"""

from __future__ import annotations

import io
import re
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the demo needs the export extra")

from clipinspect.export.demo import DemoOptions, prepare_out, run_demo  # noqa: E402
from clipinspect.export.demo_report import RANDOM_WEIGHTS_WHY, histogram_svg  # noqa: E402
from clipinspect.runtime.core.errors import UsageError  # noqa: E402
from tinybundle import MODEL_NAME  # noqa: E402


def test_an_existing_output_folder_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "demo"
    (out / "bundle").mkdir(parents=True)
    (out / "report.md").write_text("old")
    with pytest.raises(UsageError, match="--overwrite"):
        prepare_out(out, overwrite=False)
    assert (out / "report.md").read_text() == "old"
    prepare_out(out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["bundle"]  # kept for reuse


def run_demo_quietly(tiny_bundle_path: Path, out: Path) -> tuple[Path, dict, str]:
    """The demo on the tiny bundle -> (output folder, report, what it printed)."""
    shutil.copytree(tiny_bundle_path, out / "bundle")
    capture = pytest.MonkeyPatch()
    stream = io.StringIO()
    capture.setattr(sys, "stderr", stream)
    capture.setattr(sys, "stdout", stream)
    try:
        report = run_demo(DemoOptions(out=out, model=MODEL_NAME, pretrained="missing.pt",
                                      overwrite=True))
    finally:
        capture.undo()
    return out, report, stream.getvalue()


@pytest.fixture(scope="module")
def demo_run(tiny_bundle_path, tmp_path_factory):
    return run_demo_quietly(tiny_bundle_path, tmp_path_factory.mktemp("demo") / "out")


def test_the_weights_warning_is_one_line_with_the_fix_printed_once(demo_run):
    out, report, console = demo_run
    warnings = [line for line in console.splitlines() if "RANDOM" in line]
    assert len(warnings) == 1, warnings
    assert "--pretrained PATH" in warnings[0] and len(warnings[0]) < 250
    md = (out / "report.md").read_text()
    assert md.count(RANDOM_WEIGHTS_WHY) == 1 and md.count("RANDOM weights") == 1


def test_thresholds_come_from_held_out_normal_images_and_decide(demo_run):
    _, report, _ = demo_run
    for name, c in report["categories"].items():
        t = c["thresholds"]
        assert t["images"] == 8 and "not used as references" in t["how"]
        assert sum(c["decisions"].values()) == c["images"]
        flagged = sum(d["is_anomalous"] for d in c["images_detail"])
        assert flagged == c["decisions"]["TP"] + c["decisions"]["FP"]
        assert all(d["is_anomalous"] == (d["image_score"] >= t["image"])
                   for d in c["images_detail"])
        lo, hi = c["colour_scale"]
        assert lo == pytest.approx(t["pixel_median"]) and hi == pytest.approx(2 * t["pixel"] - lo)


def test_reports_use_percent_and_the_html_is_self_contained(demo_run):
    out, report, _ = demo_run
    md = (out / "report.md").read_text()
    assert re.search(r"\| weave \| \d+ \(\d+\) \| \d+\.\d% \|", md)
    assert "![weave](overlays_weave.png)" in md
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(report["categories"])
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert page.count('class="threshold"') == len(report["categories"])
    for name in report["categories"]:
        assert (out / f"overlays_{name}.png").stat().st_size > 0


def test_histogram_draws_the_threshold_between_the_scores():
    c = {"thresholds": {"image": 0.5},
         "images_detail": [{"image_score": s, "truth": t} for s, t in
                           ((0.1, "good"), (0.2, "good"), (0.8, "hole"), (0.9, "stain"))]}
    svg = histogram_svg(c, width=400)
    x = float(re.search(r'<line x1="([\d.]+)"', svg).group(1))
    assert x == pytest.approx(400 * (0.5 - 0.1) / 0.8, abs=0.1)
    assert svg.count('data-kind="defective"') == svg.count('data-kind="good"') == 16


def test_demo_help_shows_the_fast_default_and_overwrite(capsys):
    from clipinspect.runtime.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    assert "--overwrite" in text and "ViT-B-32" in text


def test_the_demo_numbers_each_step_once(demo_run):
    _, report, console = demo_run
    steps = re.findall(r"^== (\d+)/(\d+) ", console, flags=re.M)
    total = 2 + 2 * len(report["categories"])
    assert steps == [(str(k), str(total)) for k in range(1, total + 1)]
    # The export inside step 2 logs its own steps unnumbered, also on the random-weights retry.
    assert not re.search(r"^\[\d+/\d+\]", console, flags=re.M)
    assert "  loading " in console
