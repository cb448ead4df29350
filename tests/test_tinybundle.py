"""The tiny bundle the runtime tests run on: a valid bundle, shaped like a real export, whose
scores behave (deterministic, batch-invariant, higher for an image unlike the references)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from clipinspect.runtime import Bundle, Inspector
from conftest import SMALL_GRID
from tinybundle import GRID, build_tiny_bundle


def images(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (90, 120, 3), dtype=np.uint8) for _ in range(n)]


def test_two_builds_are_the_same_bundle(tmp_path):
    a = build_tiny_bundle(tmp_path / "a").manifest
    b = build_tiny_bundle(tmp_path / "b").manifest
    assert a.graphs == b.graphs and a.categories == b.categories


@pytest.mark.parametrize("bundle", ["tiny_bundle_path", "tiny_patch_bundle_path"])
@pytest.mark.parametrize("mode", ["zero-shot", "few-shot"])
def test_scores_do_not_depend_on_the_batch(bundle, mode, request, tmp_path):
    path = shutil.copytree(request.getfixturevalue(bundle), tmp_path / "b")
    inspector = Inspector.open(path)
    inspector.add_references("weave", images(1, 2))
    batch = inspector.inspect(images(2, 5), "weave", batch_size=5, mode=mode)
    single = inspector.inspect(images(2, 5), "weave", batch_size=1, mode=mode)
    for a, b in zip(batch, single):
        assert a.mode == mode and 0 <= a.image_score <= 1
        assert a.image_score == b.image_score and np.array_equal(a.anomaly_map, b.anomaly_map)


def test_an_image_unlike_the_references_scores_higher(tiny_bundle_copy):
    inspector = Inspector.open(tiny_bundle_copy)
    normal = np.full((64, 64, 3), 120, np.uint8)
    inspector.add_references("washer", [normal])
    defect = normal.copy()
    defect[20:40, 24:44] = 250
    same, unlike = inspector.inspect([normal, defect], "washer", mode="few-shot")
    assert unlike.image_score > same.image_score + 0.01
    # ...and the map is highest where the defect is.
    y, x = np.unravel_index(np.argmax(unlike.anomaly_map), unlike.anomaly_map.shape)
    assert 12 <= y < 48 and 16 <= x < 52


@pytest.mark.torch
@pytest.mark.parametrize("tiny, real", [("tiny_bundle_path", "small_bundle_path"),
                                        ("tiny_patch_bundle_path", "patch_bundle_path")])
def test_shaped_like_a_real_export(tiny, real, request):
    """Same graphs with the same input and output names, manifest keys and category entries;
    the grid is ViT-S-16's here and ViT-S-32's there, and what follows from it follows alike."""
    t = Bundle.open(request.getfixturevalue(tiny)).manifest.to_dict()
    r = Bundle.open(request.getfixturevalue(real)).manifest.to_dict()
    assert set(t) == set(r)
    for key in ("format_version", "method", "method_options", "adaptation", "scales", "outputs"):
        assert t.get(key) == r.get(key), key
    for m, grid in ((t, list(GRID)), (r, [SMALL_GRID, SMALL_GRID])):
        assert m["grid"] == grid and m["dims"]["patches"] == grid[0] * grid[1]
        if m.get("scales"):
            assert m["windows"] == {str(k): (grid[0] - k + 1) * (grid[1] - k + 1)
                                    for k in m["scales"]}
    same = ("embed", "width")  # no transformer here: layers differ; patches follow the grid
    assert {k: t["dims"][k] for k in same} == {k: r["dims"][k] for k in same}
    assert t["preprocess"]["size"] == r["preprocess"]["size"]
    for name, graph in r["graphs"]["fp32"].items():
        if name == "encoder_fused":  # optional (export --no-fused-attention); the tiny bundle's
            continue                 # encoder has no attention to fuse
        assert (t["graphs"]["fp32"][name]["inputs"], t["graphs"]["fp32"][name]["outputs"]) == \
            (graph["inputs"], graph["outputs"]), name
    category = sorted(r["categories"])[0]
    assert set(t["categories"][category]) == set(r["categories"][category])
    tiny_text = np.load(Bundle.open(request.getfixturevalue(tiny)).root
                        / t["categories"][category]["text"]["file"])
    real_text = np.load(Bundle.open(request.getfixturevalue(real)).root
                        / r["categories"][category]["text"]["file"])
    assert set(tiny_text.files) == set(real_text.files)
    prompts = [json.loads((request.getfixturevalue(b) / m["categories"][category]["prompts"]
                           ["file"]).read_text()) for b, m in ((tiny, t), (real, r))]
    assert set(prompts[0]) <= set(prompts[1])
    assert prompts[0]["normal"] == prompts[1]["normal"]
