"""Tests for the synthetic MVTec-AD-style dataset generator."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from clipinspect.calibration.synth import (
    ALL_CATEGORIES,
    CATEGORIES,
    MORE_CATEGORIES,
    DEFECTS,
    TEXTURES,
    generate,
    render_sample,
)

SMALL = dict(image_size=64, n_train=2, n_test_good=1, n_test_defect_per_type=1)


def _files(root):
    """{relative path: bytes} of every file under root."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory):
    """The default dataset (all categories, 256 px), generated once and timed."""
    root = tmp_path_factory.mktemp("synth_default")
    calls = []
    t0 = time.perf_counter()
    summary = generate(root, progress=lambda done, total: calls.append((done, total)))
    elapsed = time.perf_counter() - t0
    return root, summary, calls, elapsed


def test_constants():
    assert len(CATEGORIES) >= 4 and len(set(CATEGORIES)) == len(CATEGORIES)
    assert set(DEFECTS) == {"scratch", "hole", "stain", "crack"}
    assert set(TEXTURES) < set(ALL_CATEGORIES)
    assert ALL_CATEGORIES[:len(CATEGORIES)] == CATEGORIES  # the old RNG keys stay
    assert not set(MORE_CATEGORIES) & set(CATEGORIES)


def test_default_layout_counts_and_summary(default_dataset):
    root, summary, _, _ = default_dataset
    assert set(summary) == set(CATEGORIES)
    for cat in CATEGORIES:
        assert summary[cat] == {
            "train": 8,
            "test_good": 6,
            "test_defect": {d: 3 for d in DEFECTS},
        }
        assert sorted(p.name for p in (root / cat / "train" / "good").iterdir()) == [
            f"{i:03d}.png" for i in range(8)
        ]
        assert sorted(p.name for p in (root / cat / "test" / "good").iterdir()) == [
            f"{i:03d}.png" for i in range(6)
        ]
        assert sorted(p.name for p in (root / cat / "test").iterdir()) == sorted(["good", *DEFECTS])
        assert sorted(p.name for p in (root / cat / "ground_truth").iterdir()) == sorted(DEFECTS)
        for d in DEFECTS:
            assert sorted(p.name for p in (root / cat / "test" / d).iterdir()) == [
                f"{i:03d}.png" for i in range(3)
            ]
            assert sorted(p.name for p in (root / cat / "ground_truth" / d).iterdir()) == [
                f"{i:03d}_mask.png" for i in range(3)
            ]


def test_default_generation_is_fast(default_dataset):
    # The brief allows well under 10 s on 2 cores; leave headroom for slow CI.
    assert default_dataset[3] < 8.0


def test_progress_reports_every_image(default_dataset):
    _, _, calls, _ = default_dataset
    total = len(CATEGORIES) * (8 + 6 + 3 * len(DEFECTS))
    assert calls == [(i, total) for i in range(1, total + 1)]


def test_images_and_masks_formats(default_dataset):
    root, _, _, _ = default_dataset
    for cat in CATEGORIES:
        with Image.open(root / cat / "train" / "good" / "000.png") as im:
            assert im.mode == "RGB" and im.size == (256, 256)
        for d in DEFECTS:
            for i in range(3):
                with Image.open(root / cat / "test" / d / f"{i:03d}.png") as im:
                    assert im.mode == "RGB" and im.size == (256, 256)
                with Image.open(root / cat / "ground_truth" / d / f"{i:03d}_mask.png") as m:
                    assert m.mode == "L" and m.size == (256, 256)
                    arr = np.asarray(m)
                assert set(np.unique(arr).tolist()) == {0, 255}
                frac = (arr > 0).mean()
                assert 0 < frac < 0.5, (cat, d, i, frac)


def test_normal_images_vary(default_dataset):
    root, _, _, _ = default_dataset
    for cat in CATEGORIES:
        a = np.asarray(Image.open(root / cat / "train" / "good" / "000.png"), dtype=np.int16)
        b = np.asarray(Image.open(root / cat / "train" / "good" / "001.png"), dtype=np.int16)
        assert np.abs(a - b).mean() > 1.0  # natural variation, not copies


def test_same_seed_is_byte_identical_and_seed_matters(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(a, seed=3, **SMALL)
    generate(b, seed=3, **SMALL)
    generate(c, seed=4, **SMALL)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb
    assert fa.keys() == fc.keys()
    assert all(fa[k] != fc[k] for k in fa if not k.endswith("_mask.png"))


def test_category_does_not_depend_on_other_categories(tmp_path):
    generate(tmp_path / "all", seed=1, **SMALL)
    generate(tmp_path / "one", seed=1, categories=["pill"], defects=["hole"], **SMALL)
    one = _files(tmp_path / "one")
    everything = _files(tmp_path / "all")
    assert one and all(everything[k] == v for k, v in one.items())
    assert {k.split("/")[0] for k in one} == {"pill"}


def test_files_match_render_sample(tmp_path):
    generate(tmp_path, seed=2, categories=["washer"], **SMALL)
    img, mask = render_sample("washer", "test", "crack", index=0, seed=2, image_size=64)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "washer/test/crack/000.png")), img)
    saved = np.asarray(Image.open(tmp_path / "washer/ground_truth/crack/000_mask.png"))
    assert np.array_equal(saved > 0, mask)


def test_more_categories_only_when_asked_and_disjoint_datasets(tmp_path):
    summary = generate(tmp_path / "b", seed=0, categories=list(MORE_CATEGORIES), **SMALL)
    assert set(summary) == set(MORE_CATEGORIES)
    assert {p.name for p in (tmp_path / "b").iterdir()} == set(MORE_CATEGORIES)
    for cat in MORE_CATEGORIES:
        a = np.asarray(Image.open(tmp_path / "b" / cat / "train" / "good" / "000.png"), np.int16)
        b = np.asarray(Image.open(tmp_path / "b" / cat / "train" / "good" / "001.png"), np.int16)
        assert np.abs(a - b).mean() > 1.0


@pytest.mark.parametrize("category", ALL_CATEGORIES)
@pytest.mark.parametrize("defect", DEFECTS)
def test_defect_changes_only_masked_pixels_visibly(category, defect):
    for index in range(3):
        img, mask = render_sample(category, "test", defect, index=index, seed=5, image_size=128)
        base, empty = render_sample(
            category, "test", defect, index=index, seed=5, image_size=128, paint_defect=False
        )
        assert img.shape == (128, 128, 3) and img.dtype == np.uint8
        assert mask.shape == (128, 128) and mask.dtype == bool
        assert not empty.any()
        assert 0 < mask.mean() < 0.5
        diff = np.abs(img.astype(np.int16) - base.astype(np.int16)).max(axis=2)
        # Nothing outside the mask changed, and the masked region visibly did.
        assert not diff[~mask].any()
        assert diff[mask].mean() > 30, (category, defect, index, diff[mask].mean())
        assert (diff[mask] > 0).mean() > 0.9


@pytest.mark.parametrize("category", ["washer", "pill"])
def test_object_defects_lie_on_the_object(category):
    # The background is the colour at the image corner; defects must not touch it.
    for defect in DEFECTS:
        args = (category, "test", defect, 1)
        base, _ = render_sample(*args, image_size=128, paint_defect=False)
        _, mask = render_sample(*args, image_size=128)
        corner = base[:8, :8].reshape(-1, 3).mean(axis=0)
        is_bg = np.abs(base.astype(float) - corner).max(axis=2) < 12
        assert not (mask & is_bg).any(), defect


def test_good_and_train_renderings_have_empty_masks():
    for split in ("train", "test"):
        img, mask = render_sample("weave", split, "good", index=0, image_size=64)
        assert img.shape == (64, 64, 3) and not mask.any()


@pytest.mark.parametrize(
    "kwargs, exc, fragment",
    [
        (dict(categories=["bolt"]), ValueError, "weave"),
        (dict(categories=[]), ValueError, "empty"),
        (dict(defects=["dent"]), ValueError, "scratch"),
        (dict(image_size=0), ValueError, "image_size"),
        (dict(image_size=16), ValueError, ">= 32"),
        (dict(n_train=0), ValueError, "n_train"),
        (dict(n_test_good=-1), ValueError, "n_test_good"),
        (dict(n_test_defect_per_type=0), ValueError, "n_test_defect_per_type"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(image_size=64.0), TypeError, "image_size"),
        (dict(progress="yes"), TypeError, "progress"),
    ],
)
def test_generate_rejects_bad_arguments(tmp_path, kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment):
        generate(tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists()  # validation happens before writing


def test_out_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="file"):
        generate(f, **SMALL)


def test_single_category_string_is_accepted(tmp_path):
    summary = generate(tmp_path, categories="grain", **SMALL)
    assert list(summary) == ["grain"]


def test_render_sample_rejects_bad_arguments():
    with pytest.raises(ValueError, match="known categories"):
        render_sample("bolt")
    with pytest.raises(ValueError, match="train split"):
        render_sample("weave", "train", "hole")
    with pytest.raises(ValueError, match="unknown defect"):
        render_sample("weave", "test", "dent")
