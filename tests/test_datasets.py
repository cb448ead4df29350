"""Tests for the MVTec AD layout loader."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipinspect.calibration.datasets import (
    DatasetError,
    Sample,
    list_categories,
    load_mask,
    load_mvtec,
)
from clipinspect.calibration.synth import DEFECTS, generate

COUNTS = dict(image_size=64, n_train=3, n_test_good=2, n_test_defect_per_type=2)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    generate(root, seed=0, categories=["weave", "pill"], **COUNTS)
    return root


@pytest.fixture
def copy_root(tmp_path, synth_root) -> Path:
    """A private, writable copy of one category for tests that break things."""
    dst = tmp_path / "ds"
    shutil.copytree(synth_root / "pill", dst / "pill")
    return dst


def _write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_list_categories_sorted_and_filtered(synth_root, tmp_path):
    assert list_categories(synth_root) == ["pill", "weave"]
    (tmp_path / "zeta" / "test").mkdir(parents=True)
    (tmp_path / "alpha" / "train").mkdir(parents=True)
    (tmp_path / "notes").mkdir()  # no train/ or test/: not a category
    (tmp_path / "readme.txt").write_text("x")
    assert list_categories(tmp_path) == ["alpha", "zeta"]


def test_loader_finds_everything_the_generator_made(synth_root):
    test = load_mvtec(synth_root)
    train = load_mvtec(synth_root, split="train")
    assert len(train) == 2 * 3
    assert len(test) == 2 * (2 + 2 * len(DEFECTS))
    assert {s.split for s in train} == {"train"} and {s.defect for s in train} == {"good"}
    assert not any(s.is_anomalous or s.mask_path for s in train)

    on_disk = {p for p in synth_root.glob("*/test/*/*.png")}
    assert {s.path for s in test} == on_disk
    for s in test:
        assert s.split == "test" and s.path.parent.name == s.defect
        assert s.category == s.path.parents[2].name
        if s.defect == "good":
            assert not s.is_anomalous and s.mask_path is None
        else:
            assert s.is_anomalous
            assert s.mask_path == (
                synth_root / s.category / "ground_truth" / s.defect / f"{s.path.stem}_mask.png"
            )
            assert s.mask_path.is_file()


def test_order_is_sorted_and_deterministic(synth_root):
    samples = load_mvtec(synth_root)
    keys = [(s.category, s.defect, s.path.name) for s in samples]
    assert keys == sorted(keys)
    assert load_mvtec(synth_root) == samples


def test_category_selection(synth_root):
    assert {s.category for s in load_mvtec(synth_root, ["weave"])} == {"weave"}
    assert {s.category for s in load_mvtec(synth_root, "pill")} == {"pill"}
    both = load_mvtec(synth_root, ["weave", "pill"])
    assert [s.category for s in both][0] == "weave"  # caller's order is kept


def test_load_mask_pairs_with_generated_mask(synth_root):
    for s in load_mvtec(synth_root):
        m = load_mask(s)
        assert m.dtype == bool and m.shape == (64, 64)
        if s.is_anomalous:
            expected = np.asarray(Image.open(s.mask_path)) > 0
            assert np.array_equal(m, expected) and m.any()
        else:
            assert not m.any()


def test_load_mask_resizes_to_height_width(synth_root):
    anomalous = next(s for s in load_mvtec(synth_root) if s.defect == "hole")
    good = next(s for s in load_mvtec(synth_root) if s.defect == "good")
    for s in (anomalous, good):
        assert load_mask(s, size=(32, 48)).shape == (32, 48)
        assert load_mask(s, size=16).shape == (16, 16)
    assert load_mask(anomalous, size=(32, 32)).any()
    with pytest.raises(ValueError, match="size"):
        load_mask(good, size=(0, 4))


def test_load_mask_reads_good_image_size_from_header(tmp_path):
    _write_png(tmp_path / "c" / "test" / "good" / "a.png", np.zeros((30, 50, 3), np.uint8))
    (s,) = load_mvtec(tmp_path)
    m = load_mask(s)
    assert m.shape == (30, 50) and not m.any()


def test_accepts_other_extensions_case_insensitively(tmp_path):
    d = tmp_path / "c" / "test"
    _write_png(d / "good" / "a.PNG", np.zeros((8, 8, 3), np.uint8))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "good" / "b.JPG")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "good" / "c.bmp")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "good" / "d.tiff")
    (d / "good" / "notes.txt").write_text("not an image")
    _write_png(d / "dent" / "e.Jpeg", np.zeros((8, 8, 3), np.uint8))
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 2:4] = 255
    _write_png(tmp_path / "c" / "ground_truth" / "dent" / "e_mask.png", mask)
    samples = load_mvtec(tmp_path)
    assert [s.path.name for s in samples] == ["e.Jpeg", "a.PNG", "b.JPG", "c.bmp", "d.tiff"]
    assert load_mask(samples[0]).sum() == 4


def test_zero_one_masks_are_understood(tmp_path):
    _write_png(tmp_path / "c" / "test" / "dent" / "a.png", np.zeros((8, 8, 3), np.uint8))
    mask = np.zeros((8, 8), np.uint8)
    mask[0, :3] = 1
    _write_png(tmp_path / "c" / "ground_truth" / "dent" / "a_mask.png", mask)
    (s,) = load_mvtec(tmp_path)
    assert load_mask(s).sum() == 3


def test_missing_mask_names_image_and_expected_mask(copy_root):
    mask = copy_root / "pill" / "ground_truth" / "stain" / "001_mask.png"
    mask.unlink()
    with pytest.raises(DatasetError) as info:
        load_mvtec(copy_root)
    msg = str(info.value)
    assert str(copy_root / "pill" / "test" / "stain" / "001.png") in msg
    assert str(mask) in msg
    # The train split has no anomalies, so it still loads.
    assert len(load_mvtec(copy_root, split="train")) == 3


def test_corrupt_mask_names_file(copy_root):
    (s,) = [x for x in load_mvtec(copy_root) if x.defect == "crack" and x.path.stem == "000"]
    s.mask_path.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(DatasetError, match="000_mask.png"):
        load_mask(s)


def test_truncated_mask_names_file(copy_root):
    (s,) = [x for x in load_mvtec(copy_root) if x.defect == "hole" and x.path.stem == "000"]
    data = s.mask_path.read_bytes()
    s.mask_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="000_mask.png"):
        load_mask(s)


def test_mask_size_mismatch(copy_root):
    (s,) = [x for x in load_mvtec(copy_root) if x.defect == "hole" and x.path.stem == "001"]
    _write_png(s.mask_path, np.zeros((10, 10), np.uint8))
    with pytest.raises(DatasetError, match="must match"):
        load_mask(s)


def test_mask_deleted_after_loading(copy_root):
    (s,) = [x for x in load_mvtec(copy_root) if x.defect == "hole" and x.path.stem == "001"]
    s.mask_path.unlink()
    with pytest.raises(DatasetError, match="does not exist"):
        load_mask(s)


def test_anomalous_sample_without_mask_path(synth_root):
    s = next(x for x in load_mvtec(synth_root) if x.is_anomalous)
    bare = Sample(s.path, s.category, s.split, s.defect, None)
    with pytest.raises(DatasetError, match="no mask_path"):
        load_mask(bare)


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_mvtec(tmp_path / "nope")
    with pytest.raises(DatasetError, match="does not exist"):
        list_categories(tmp_path / "nope")


def test_root_without_categories(tmp_path):
    with pytest.raises(DatasetError, match="no categories"):
        load_mvtec(tmp_path)


def test_missing_category_lists_found_ones(synth_root):
    with pytest.raises(DatasetError, match="'bottle'.*pill, weave"):
        load_mvtec(synth_root, ["weave", "bottle"])


def test_missing_split_folder(tmp_path):
    _write_png(tmp_path / "c" / "train" / "good" / "a.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match="no 'test' folder"):
        load_mvtec(tmp_path)


def test_empty_split(tmp_path):
    (tmp_path / "c" / "test" / "good").mkdir(parents=True)
    (tmp_path / "c" / "test" / "good" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images"):
        load_mvtec(tmp_path)


def test_bad_split_name(synth_root):
    with pytest.raises(DatasetError, match="split"):
        load_mvtec(synth_root, split="val")


def test_dataset_error_is_value_error():
    assert issubclass(DatasetError, ValueError)


def test_sample_is_frozen(synth_root):
    s = load_mvtec(synth_root)[0]
    with pytest.raises(AttributeError):
        s.defect = "good"  # type: ignore[misc]
