"""Overlays of one category share one colour scale where the category has a pixel threshold (a
bar is written beside them); without one, predict says that each overlay is relative."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from clipinspect.runtime.cli import main
from clipinspect.runtime.core.bundle import Bundle
from clipinspect.runtime.core.maps import colour_bar, heatmap_rgb, shared_scale


def test_shared_scale_comes_from_the_pixel_threshold_or_explicit_bounds():
    assert shared_scale({"pixel": 0.2}) == pytest.approx((0.1, 0.3))
    assert shared_scale({"pixel": 0.3, "pixel_median": 0.25}) == pytest.approx((0.25, 0.35))
    assert shared_scale({}, 0.0, 1.0) == (0.0, 1.0)
    assert shared_scale({}) is None and shared_scale({}, vmin=0.0) is None


def test_colour_bar_runs_from_cold_to_hot():
    bar = np.asarray(colour_bar(200, 30, (0.1, 0.3)))
    assert tuple(bar[5, 0]) == tuple(heatmap_rgb(np.array([[0.1]]), 0.1, 0.3)[0, 0])
    assert tuple(bar[5, -1]) == tuple(heatmap_rgb(np.array([[0.3]]), 0.1, 0.3)[0, 0])


def _images(tmp_path, n=3):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_predict_with_a_threshold_writes_one_bar_and_colours_all_alike(tiny_bundle_path,
                                                                       tmp_path, capsys):
    root = shutil.copytree(tiny_bundle_path, tmp_path / "bundle")
    Bundle.open(root).set_thresholds("weave", "fp32/zero-shot", {"image": 0.5, "pixel": 1e9})
    out = tmp_path / "out"
    assert main(["predict", str(root), *_images(tmp_path), "--category", "weave", "--mode",
                 "zero-shot", "--out", str(out)]) == 0
    assert (out / "colour_bar.png").exists() and "own range" not in capsys.readouterr().err
    # every map is far below 0.5 x the threshold: all overlays show the coldest colour only
    coldest = heatmap_rgb(np.zeros((1, 1)), 1.0, 2.0)[0, 0].astype(int)
    for png in (out / "overlays").glob("*.png"):
        image = np.asarray(Image.open(png)).astype(int)
        source = np.asarray(Image.open(tmp_path / f"{int(png.name[:5])}.png")).astype(int)
        assert np.abs(image - (source + coldest) / 2).max() <= 1


def test_predict_without_a_threshold_says_the_colours_are_relative(tiny_bundle_path, tmp_path,
                                                                   capsys):
    out = tmp_path / "out"
    main(["predict", str(tiny_bundle_path), *_images(tmp_path, 1), "--category", "weave",
          "--mode", "zero-shot", "--out", str(out)])
    assert not (out / "colour_bar.png").exists()
    assert "coloured by its own range" in capsys.readouterr().err
