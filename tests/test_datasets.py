"""Tests for the MVTec AD and VisA layout loaders."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipinspect.calibration.datasets import (
    DatasetError,
    Sample,
    dataset_categories,
    detect_format,
    list_categories,
    list_visa_categories,
    load_dataset,
    load_mask,
    load_mvtec,
    load_visa,
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


def test_label_valued_masks_below_128_count_as_defective(tmp_path):
    # Masks whose values all stay below 128 (labels 1, 2, ...) are read at non-zero.
    _write_png(tmp_path / "c" / "test" / "dent" / "a.png", np.zeros((8, 8, 3), np.uint8))
    mask = np.zeros((8, 8), np.uint8)
    mask[0, :2] = 1
    mask[1, :3] = 2
    _write_png(tmp_path / "c" / "ground_truth" / "dent" / "a_mask.png", mask)
    (s,) = load_mvtec(tmp_path)
    assert load_mask(s).sum() == 5


def test_mvtec_masks_keep_half_scale_threshold(tmp_path):
    _write_png(tmp_path / "c" / "test" / "dent" / "a.png", np.zeros((8, 8, 3), np.uint8))
    mask = np.zeros((8, 8), np.uint8)
    mask[0, :4] = 255
    mask[1, :2] = 30  # anti-aliasing fringe
    _write_png(tmp_path / "c" / "ground_truth" / "dent" / "a_mask.png", mask)
    (s,) = load_mvtec(tmp_path)
    assert load_mask(s).sum() == 4
    # The same file read the VisA way: every non-zero pixel counts.
    visa_like = Sample(s.path, s.category, s.split, s.defect, s.mask_path, mask_any_nonzero=True)
    assert load_mask(visa_like).sum() == 6


# ------------------------------------------------------------------ VisA

VISA_HEADER = "object,split,label,image,mask"

# (object, split, label, image stem, mask values or None). pcb1 is listed first and
# its stems are out of order, to check that CSV order (not name order) is kept.
VISA_ROWS = [
    ("pcb1", "train", "normal", "0102", None),
    ("pcb1", "train", "normal", "0101", None),
    ("pcb1", "test", "anomaly", "001", (0, 1)),
    ("pcb1", "test", "normal", "0103", None),
    ("pcb1", "test", "anomaly", "000", (0, 2, 200)),
    ("candle", "train", "normal", "0001", None),
    ("candle", "test", "normal", "0002", None),
    ("candle", "test", "anomaly", "000", (0, 255)),
]


def _visa_mask(values: tuple[int, ...]) -> np.ndarray:
    m = np.zeros((8, 8), np.uint8)
    for i, v in enumerate(values[1:]):
        m[i, : i + 2] = v  # row i: i + 2 pixels of value v
    return m


def _visa_lines(rows=VISA_ROWS) -> list[str]:
    lines = []
    for obj, split, label, stem, _ in rows:
        kind = "Anomaly" if label == "anomaly" else "Normal"
        image = f"{obj}/Data/Images/{kind}/{stem}.JPG"
        mask = f"{obj}/Data/Masks/Anomaly/{stem}.png" if label == "anomaly" else ""
        lines.append(f"{obj},{split},{label},{image},{mask}")
    return lines


def _write_csv(root: Path, lines: list[str], header: str = VISA_HEADER) -> Path:
    path = root / "split_csv" / "1cls.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


def _make_visa(root: Path) -> Path:
    for obj, _, label, stem, values in VISA_ROWS:
        kind = "Anomaly" if label == "anomaly" else "Normal"
        img = root / obj / "Data" / "Images" / kind / f"{stem}.JPG"
        img.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(img, format="JPEG")
        if values is not None:
            mask_path = root / obj / "Data" / "Masks" / "Anomaly" / f"{stem}.png"
            _write_png(mask_path, _visa_mask(values))
    _write_csv(root, _visa_lines())
    return root


@pytest.fixture(scope="module")
def visa_root(tmp_path_factory) -> Path:
    return _make_visa(tmp_path_factory.mktemp("visa"))


@pytest.fixture
def visa_copy(tmp_path) -> Path:
    """A private, writable VisA tree for tests that break things."""
    return _make_visa(tmp_path / "visa")


def test_visa_loads_test_split_in_csv_order(visa_root):
    samples = load_visa(visa_root)
    assert [(s.category, s.defect, s.path.name) for s in samples] == [
        ("candle", "good", "0002.JPG"),
        ("candle", "anomaly", "000.JPG"),
        ("pcb1", "anomaly", "001.JPG"),
        ("pcb1", "good", "0103.JPG"),
        ("pcb1", "anomaly", "000.JPG"),
    ]
    for s in samples:
        assert s.split == "test" and s.path.is_file()
        kind = "Anomaly" if s.is_anomalous else "Normal"
        assert s.path == visa_root / s.category / "Data" / "Images" / kind / s.path.name
        if s.is_anomalous:
            assert s.mask_path == (
                visa_root / s.category / "Data" / "Masks" / "Anomaly" / f"{s.path.stem}.png"
            )
            assert s.mask_any_nonzero
        else:
            assert s.mask_path is None
    assert load_visa(visa_root) == samples  # deterministic


def test_visa_train_split_and_category_selection(visa_root):
    train = load_visa(visa_root, split="train")
    assert [(s.category, s.path.name) for s in train] == [
        ("candle", "0001.JPG"),
        ("pcb1", "0102.JPG"),
        ("pcb1", "0101.JPG"),
    ]
    assert not any(s.is_anomalous or s.mask_path for s in train)
    assert {s.category for s in load_visa(visa_root, "pcb1")} == {"pcb1"}
    both = load_visa(visa_root, ["pcb1", "candle"])
    assert [s.category for s in both] == ["pcb1"] * 3 + ["candle"] * 2  # caller's order kept
    assert load_visa(visa_root, []) == []


def test_visa_categories(visa_root, synth_root):
    assert list_visa_categories(visa_root) == ["candle", "pcb1"]
    assert dataset_categories(visa_root) == ["candle", "pcb1"]
    assert dataset_categories(synth_root) == ["pill", "weave"]
    assert dataset_categories(visa_root, format="visa") == ["candle", "pcb1"]


def test_visa_masks_any_nonzero_is_defective(visa_root):
    by_key = {(s.category, s.path.stem): s for s in load_visa(visa_root)}
    for (cat, stem), values in [
        (("pcb1", "001"), (0, 1)),
        (("pcb1", "000"), (0, 2, 200)),
        (("candle", "000"), (0, 255)),
    ]:
        m = load_mask(by_key[(cat, stem)])
        assert m.dtype == bool and m.shape == (8, 8)
        assert np.array_equal(m, _visa_mask(values) > 0)
        assert m.sum() == sum(range(2, len(values) + 1))
    assert not load_mask(by_key[("pcb1", "0103")]).any()
    assert load_mask(by_key[("pcb1", "000")], size=(4, 16)).shape == (4, 16)
    assert load_mask(by_key[("pcb1", "000")], size=16).sum() == 4 * 5


def test_visa_csv_with_bom_crlf_blank_lines_and_column_order(visa_copy):
    lines = []
    for line in _visa_lines():
        obj, split, label, image, mask = line.split(",")
        lines.append(f"{mask},{image},{label},{split},{obj}")
    lines.insert(3, "")
    path = visa_copy / "split_csv" / "1cls.csv"
    text = "\r\n".join(["mask, image ,label,split,object", *lines]) + "\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert [s.path.name for s in load_visa(visa_copy, "pcb1")] == ["001.JPG", "0103.JPG", "000.JPG"]


def test_detect_format_and_load_dataset(visa_root, synth_root):
    assert detect_format(visa_root) == "visa"
    assert detect_format(synth_root) == "mvtec"
    assert load_dataset(visa_root) == load_visa(visa_root)
    assert load_dataset(visa_root, format="visa", categories="candle", split="train") == (
        load_visa(visa_root, "candle", "train")
    )
    assert load_dataset(synth_root) == load_mvtec(synth_root)
    assert load_dataset(synth_root, "mvtec", ["weave"], "train") == load_mvtec(
        synth_root, ["weave"], "train"
    )
    with pytest.raises(DatasetError, match="format must be.*'coco'"):
        load_dataset(synth_root, format="coco")
    with pytest.raises(DatasetError, match="format must be"):
        dataset_categories(synth_root, format="coco")


def test_detect_format_unknown_layout_explains_both(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DatasetError) as info:
        detect_format(tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg and "MVTec AD" in msg and "VisA" in msg
    assert "split_csv/1cls.csv" in msg and "ground_truth" in msg
    with pytest.raises(DatasetError, match="does not exist"):
        detect_format(tmp_path / "nope")
    with pytest.raises(DatasetError, match="cannot tell"):
        load_dataset(tmp_path)


def test_detect_format_hints_at_visa_without_csv(visa_copy):
    csv_path = visa_copy / "split_csv" / "1cls.csv"
    csv_path.unlink()
    with pytest.raises(DatasetError) as info:
        detect_format(visa_copy)
    msg = str(info.value)
    assert "candle, pcb1 look like VisA" in msg and str(csv_path) in msg


def test_visa_missing_csv(visa_copy):
    csv_path = visa_copy / "split_csv" / "1cls.csv"
    csv_path.unlink()
    for call in (load_visa, list_visa_categories, lambda r: load_dataset(r, format="visa")):
        with pytest.raises(DatasetError) as info:
            call(visa_copy)
        msg = str(info.value)
        assert str(csv_path) in msg and "split CSV" in msg and "object,split,label" in msg


@pytest.mark.parametrize(
    "header, expected",
    [
        ("object,split,label,image", "missing column(s) mask"),
        ("object,split,label,image,mask,note", "unexpected column(s) 'note'"),
        ("object,split,label,image,image", "missing column(s) mask"),
        ("object,split,kind,image,mask", "missing column(s) label"),
    ],
)
def test_visa_bad_header(visa_copy, header, expected):
    csv_path = _write_csv(visa_copy, [], header=header)
    with pytest.raises(DatasetError) as info:
        load_visa(visa_copy)
    msg = str(info.value)
    assert str(csv_path) in msg and expected in msg
    assert "expected the columns object,split,label,image,mask" in msg


def test_visa_empty_csv(visa_copy):
    csv_path = visa_copy / "split_csv" / "1cls.csv"
    csv_path.write_text("")
    with pytest.raises(DatasetError, match="is empty"):
        load_visa(visa_copy)
    _write_csv(visa_copy, [])
    with pytest.raises(DatasetError, match="has no rows"):
        load_visa(visa_copy)
    assert list_visa_categories(visa_copy) == []


@pytest.mark.parametrize(
    "column, value, expected",
    [
        (1, "val", "line 4: unknown split 'val', expected one of train, test"),
        (2, "bad", "line 4: unknown label 'bad', expected one of normal, anomaly"),
        (4, "", "line 4: anomalous image 'pcb1/Data/Images/Anomaly/001.JPG' has no mask"),
    ],
)
def test_visa_bad_row_values_name_the_line(visa_copy, column, value, expected):
    lines = _visa_lines()
    fields = lines[2].split(",")  # third data row: line 4 of the file
    fields[column] = value
    lines[2] = ",".join(fields)
    csv_path = _write_csv(visa_copy, lines)
    with pytest.raises(DatasetError) as info:
        load_visa(visa_copy, split="train")  # values are checked whatever the split
    msg = str(info.value)
    assert str(csv_path) in msg and expected in msg


def test_visa_row_with_wrong_field_count(visa_copy):
    lines = _visa_lines()
    lines[4] += ",extra"
    _write_csv(visa_copy, lines)
    with pytest.raises(DatasetError, match="line 6 has 6 field"):
        load_visa(visa_copy)


def test_visa_missing_image_names_file_and_line(visa_copy):
    img = visa_copy / "pcb1" / "Data" / "Images" / "Normal" / "0103.JPG"
    img.unlink()
    with pytest.raises(DatasetError) as info:
        load_visa(visa_copy)
    msg = str(info.value)
    assert str(img) in msg and "line 5" in msg and "1cls.csv" in msg
    # Only the loaded split's files are checked.
    assert len(load_visa(visa_copy, split="train")) == 3
    assert len(load_visa(visa_copy, "candle")) == 2


def test_visa_missing_mask_names_file_and_line(visa_copy):
    mask = visa_copy / "candle" / "Data" / "Masks" / "Anomaly" / "000.png"
    mask.unlink()
    with pytest.raises(DatasetError) as info:
        load_visa(visa_copy)
    msg = str(info.value)
    assert str(mask) in msg and "line 9" in msg and "1cls.csv" in msg
    assert str(visa_copy / "candle" / "Data" / "Images" / "Anomaly" / "000.JPG") in msg


def test_visa_unknown_category_lists_csv_categories(visa_root):
    with pytest.raises(DatasetError) as info:
        load_visa(visa_root, ["pcb1", "bottle"])
    msg = str(info.value)
    assert "'bottle'" in msg and "candle, pcb1" in msg and "1cls.csv" in msg


def test_visa_category_without_rows_in_split(visa_copy):
    lines = [ln for ln in _visa_lines() if not ln.startswith("candle,test")]
    _write_csv(visa_copy, lines)
    with pytest.raises(DatasetError, match="'candle' has no 'test' rows"):
        load_visa(visa_copy)
    assert len(load_visa(visa_copy, split="train")) == 3


def test_visa_bad_split_argument_and_root(visa_root, tmp_path):
    with pytest.raises(DatasetError, match="split"):
        load_visa(visa_root, split="val")
    with pytest.raises(DatasetError, match="does not exist"):
        load_visa(tmp_path / "nope")

