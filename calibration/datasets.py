"""Loaders for anomaly-detection datasets in the MVTec AD and VisA layouts.

MVTec AD layout (the one :mod:`.synth` writes)::

    <root>/<category>/train/good/<name>.<ext>
    <root>/<category>/test/good/<name>.<ext>
    <root>/<category>/test/<defect>/<name>.<ext>
    <root>/<category>/ground_truth/<defect>/<name>_mask.png

Every folder under ``<split>/`` is a defect type, ``good`` meaning defect-free.
Masks are 8-bit images, non-zero (255) on defective pixels.

VisA layout, read through the split CSV that ships with the dataset::

    <root>/<category>/Data/Images/Normal/<name>.JPG
    <root>/<category>/Data/Images/Anomaly/<name>.JPG
    <root>/<category>/Data/Masks/Anomaly/<name>.png
    <root>/split_csv/1cls.csv     # object,split,label,image,mask

Each CSV row is one image: ``object`` the category, ``split`` ``train`` or
``test``, ``label`` ``normal`` or ``anomaly``, ``image`` and ``mask`` paths
relative to ``<root>`` (``mask`` empty for normal rows). VisA masks are label
images: every non-zero value marks a defective pixel.

:func:`load_dataset` and :func:`dataset_categories` read either layout,
telling them apart with :func:`detect_format`.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clipinspect.runtime.core.errors import ClipInspectError
from clipinspect.runtime.core.images import IMAGE_SUFFIXES

SPLITS: tuple[str, ...] = ("train", "test")

GOOD = "good"
# A file at a dataset root saying its anomalous images have image-level labels only (no masks):
# the labelled set operator feedback keeps (runtime/core/memory_book.py).
IMAGE_LEVEL = "IMAGE_LEVEL_LABELS"

ANOMALY = "anomaly"
"""``defect`` of anomalous VisA samples (VisA does not name defect types in its split CSV)."""

FORMATS: tuple[str, ...] = ("mvtec", "visa")
"""Dataset layouts understood by :func:`load_dataset`."""

VISA_SPLIT_CSV = Path("split_csv") / "1cls.csv"
"""VisA's split file, relative to the dataset root."""

VISA_COLUMNS: tuple[str, ...] = ("object", "split", "label", "image", "mask")
"""Header of :data:`VISA_SPLIT_CSV`."""

VISA_LABELS: tuple[str, ...] = ("normal", "anomaly")


class DatasetError(ClipInspectError, ValueError):
    """The dataset on disk does not match the expected MVTec AD or VisA layout."""


@dataclass(frozen=True)
class Sample:
    """One image of an MVTec AD or VisA dataset.

    Attributes:
        path: Image file.
        category: Category name, e.g. ``"bottle"`` or ``"pcb1"``.
        split: ``"train"`` or ``"test"``.
        defect: ``"good"`` or the defect type: the defect folder name for MVTec AD,
            e.g. ``"scratch"``; ``"anomaly"`` for VisA.
        mask_path: Ground-truth mask for anomalous samples, None for good ones.
        mask_any_nonzero: How :func:`load_mask` reads the mask. True (VisA): every
            non-zero pixel is defective. False (MVTec AD): 0/255 masks are cut at
            half scale (128), masks whose values all stay below 128 (0/1, label
            images) at non-zero.
    """

    path: Path
    category: str
    split: str
    defect: str
    mask_path: Path | None = None
    mask_any_nonzero: bool = False

    @property
    def is_anomalous(self) -> bool:
        """True unless the sample comes from a ``good`` folder."""
        return self.defect != GOOD


def list_categories(root: str | Path) -> list[str]:
    """Sorted names of the folders under ``root`` that hold a ``train/`` or ``test/`` folder."""
    root = _check_root(root)
    return sorted(
        d.name
        for d in root.iterdir()
        if d.is_dir() and not d.name.startswith(".") and any((d / s).is_dir() for s in SPLITS)
    )


def load_mvtec(
    root: str | Path,
    categories: Iterable[str] | str | None = None,
    split: str = "test",
) -> list[Sample]:
    """List the samples of one split, in a deterministic order.

    Order: categories as given (sorted when None), then defect folders sorted by
    name, then image files sorted by name.

    Args:
        root: Dataset root holding one folder per category.
        categories: Category names (a single name is accepted too); None for all
            found by :func:`list_categories`.
        split: ``"train"`` or ``"test"``.

    Returns:
        Samples with ``mask_path`` set for every anomalous one.

    Raises:
        DatasetError: root missing, no or unknown categories, a split folder that
            is missing or holds no images, or an anomalous image without a mask.
    """
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
    root = _check_root(root)
    found = list_categories(root)
    if categories is None:
        cats = found
        if not cats:
            raise DatasetError(
                f"no categories found under {str(root)!r}: expected folders like "
                f"<root>/<category>/train/good/ (MVTec AD layout)"
            )
    else:
        cats = _select(categories, found, f"under {str(root)!r}", "categories found")
    samples: list[Sample] = []
    for cat in cats:
        samples.extend(_load_split(root, cat, split))
    return samples


def _select(categories: Iterable[str] | str, found: list[str], where: str, listing: str
            ) -> list[str]:
    """The requested categories (one name or several), each of which must be among ``found``."""
    cats = [categories] if isinstance(categories, str) else list(categories)
    missing = [c for c in cats if c not in found]
    if missing:
        raise DatasetError(f"category {missing[0]!r} not found {where}; "
                           f"{listing}: {', '.join(found) if found else '(none)'}")
    return cats


def load_mask(sample: Sample, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Ground-truth mask of ``sample`` as bool (H, W).

    Args:
        sample: A sample from :func:`load_mvtec`, :func:`load_visa` or
            :func:`load_dataset`.
        size: Output ``(height, width)`` (numpy order, like the returned array), or
            an int for a square; None keeps the image's own size. Resizing uses
            nearest neighbour so the mask stays binary.

    Returns:
        bool (H, W), True on defective pixels; all False for good samples. With
        ``sample.mask_any_nonzero`` (VisA) every non-zero pixel is defective;
        otherwise masks reaching 128 or more are cut at 128 (MVTec 0/255, keeping
        stray anti-aliasing values out) and masks below 128 everywhere (0/1,
        small label values) at non-zero.

    Raises:
        DatasetError: image or mask unreadable, mask missing, or mask and image
            sizes differ.
    """
    out_hw = _check_size(size)
    img_w, img_h = _image_size(sample.path)
    if not sample.is_anomalous:
        h, w = out_hw if out_hw is not None else (img_h, img_w)
        return np.zeros((h, w), dtype=bool)

    if sample.mask_path is None:
        raise DatasetError(
            f"anomalous sample {str(sample.path)!r} (defect {sample.defect!r}) has no "
            "mask_path; load samples with load_mvtec(), load_visa() or load_dataset(), "
            "or set mask_path"
        )
    mask = _read_mask(sample)
    mask_size = (mask.shape[1], mask.shape[0])
    if mask_size != (img_w, img_h):
        raise DatasetError(
            f"mask {str(sample.mask_path)!r} is {mask_size[0]}x{mask_size[1]} "
            f"but image {str(sample.path)!r} is {img_w}x{img_h} (width x height); "
            "masks must match their image size"
        )
    if out_hw is not None and out_hw != (img_h, img_w):
        # Thresholding and nearest-neighbour resizing commute, so resize the binary mask.
        small = Image.fromarray(mask.astype(np.uint8) * 255)
        mask = np.asarray(small.resize((out_hw[1], out_hw[0]), Image.Resampling.NEAREST)) > 0
    return mask


def _read_mask(sample: Sample) -> np.ndarray:
    """The mask file of ``sample`` as bool (H, W) at its own size, binarized as
    :func:`load_mask` says."""
    try:
        with Image.open(sample.mask_path) as im:
            im.load()  # force decoding here so truncated files fail inside the try
            if sample.mask_any_nonzero:
                return _nonzero(im)
            arr = np.asarray(im.convert("L"))
            return arr > 0 if arr.max(initial=0) < 128 else arr >= 128
    except FileNotFoundError:
        raise DatasetError(f"mask file {str(sample.mask_path)!r} does not exist") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(
            f"cannot read mask file {str(sample.mask_path)!r} ({exc}); "
            "replace it with a valid 8-bit PNG"
        ) from exc


def list_visa_categories(root: str | Path) -> list[str]:
    """Sorted category names (``object`` column) of VisA's split CSV under ``root``.

    Raises:
        DatasetError: root or CSV missing, or a malformed CSV (see :func:`load_visa`).
    """
    root = _check_root(root)
    return sorted({row.category for row in _read_visa_csv(root)})


def load_visa(
    root: str | Path,
    categories: Iterable[str] | str | None = None,
    split: str = "test",
) -> list[Sample]:
    """List the samples of one VisA split, read from ``<root>/split_csv/1cls.csv``.

    Order: categories as given (sorted when None), then rows in CSV order.

    Args:
        root: VisA root holding ``split_csv/`` and one folder per category.
        categories: Category names (a single name is accepted too); None for all
            in the CSV.
        split: ``"train"`` or ``"test"``.

    Returns:
        Samples with ``defect`` ``"good"`` for normal rows and ``"anomaly"`` for
        anomalous ones; anomalous ones have ``mask_path`` set and
        ``mask_any_nonzero`` True.

    Raises:
        DatasetError: root or CSV missing; CSV with missing or extra columns, an
            unknown split or label value, or an anomalous row without a mask;
            unknown categories, a category with no rows in ``split``, or an image
            or mask listed for the loaded split that does not exist. Messages name
            the CSV and its line.
    """
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
    root = _check_root(root)
    rows = _read_visa_csv(root)
    csv_path = root / VISA_SPLIT_CSV
    found = sorted({row.category for row in rows})
    if categories is None:
        cats = found
        if not cats:
            raise DatasetError(f"VisA split CSV {str(csv_path)!r} has no rows")
    else:
        cats = _select(categories, found, f"in {str(csv_path)!r}", "categories in the CSV")
    by_cat: dict[str, list[_VisaRow]] = {c: [] for c in cats}
    for row in rows:
        if row.split == split and row.category in by_cat:
            by_cat[row.category].append(row)
    samples: list[Sample] = []
    for cat in cats:
        if not by_cat[cat]:
            raise DatasetError(f"category {cat!r} has no {split!r} rows in {str(csv_path)!r}")
        for row in by_cat[cat]:
            path = root / row.image
            if not path.is_file():
                raise DatasetError(
                    f"image {str(path)!r} listed in {str(csv_path)!r} line {row.line} "
                    "does not exist"
                )
            mask_path = None
            if row.anomalous:
                mask_path = root / row.mask
                if not mask_path.is_file():
                    raise DatasetError(
                        f"mask {str(mask_path)!r} for anomalous image {str(path)!r}, "
                        f"listed in {str(csv_path)!r} line {row.line}, does not exist"
                    )
            samples.append(
                Sample(
                    path,
                    cat,
                    split,
                    ANOMALY if row.anomalous else GOOD,
                    mask_path,
                    mask_any_nonzero=row.anomalous,
                )
            )
    return samples


def detect_format(root: str | Path) -> str:
    """``"visa"`` if ``<root>/split_csv/1cls.csv`` exists, else ``"mvtec"`` if
    :func:`list_categories` finds a category.

    Raises:
        DatasetError: root missing, or neither layout found (the message describes both).
    """
    root = _check_root(root)
    if (root / VISA_SPLIT_CSV).is_file():
        return "visa"
    if list_categories(root):
        return "mvtec"
    hint = ""
    visa_like = sorted(
        d.name
        for d in root.iterdir()
        if d.is_dir() and not d.name.startswith(".") and (d / "Data" / "Images").is_dir()
    )
    if visa_like:
        hint = (
            f" ({', '.join(visa_like)} look like VisA categories, but the split CSV "
            f"{str(root / VISA_SPLIT_CSV)!r} is missing: VisA is read through it)"
        )
    raise DatasetError(
        f"cannot tell the dataset layout of {str(root)!r}{hint}: expected either "
        "MVTec AD (<root>/<category>/train/good/, <root>/<category>/test/<defect>/, "
        "<root>/<category>/ground_truth/<defect>/<name>_mask.png) or VisA "
        "(<root>/split_csv/1cls.csv with columns object,split,label,image,mask, and "
        "<root>/<category>/Data/Images/{Normal,Anomaly}/, "
        "<root>/<category>/Data/Masks/Anomaly/)"
    )


def load_dataset(
    root: str | Path,
    format: str = "auto",
    categories: Iterable[str] | str | None = None,
    split: str = "test",
) -> list[Sample]:
    """Samples of one split of an MVTec AD or VisA dataset.

    Args:
        root: Dataset root.
        format: ``"mvtec"``, ``"visa"`` or ``"auto"`` (:func:`detect_format`).
        categories: As for :func:`load_mvtec` / :func:`load_visa`.
        split: ``"train"`` or ``"test"``.

    Raises:
        DatasetError: unknown format, or as raised by the chosen loader.
    """
    fmt = _resolve_format(root, format)
    loader = load_visa if fmt == "visa" else load_mvtec
    return loader(root, categories, split)


def dataset_categories(root: str | Path, format: str = "auto") -> list[str]:
    """Sorted category names of an MVTec AD or VisA dataset (``format`` as for
    :func:`load_dataset`)."""
    fmt = _resolve_format(root, format)
    return list_visa_categories(root) if fmt == "visa" else list_categories(root)


# ------------------------------------------------------------------ internals


def _check_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"dataset root {str(root)!r} does not exist; check the path")
    if not root.is_dir():
        raise DatasetError(f"dataset root {str(root)!r} is not a directory")
    return root


def _check_size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    hw = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if (
        len(hw) != 2
        or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in hw)
        or min(hw) <= 0
    ):
        raise ValueError(
            f"size must be None, a positive int or a (height, width) pair of positive "
            f"ints, got {size!r}"
        )
    return int(hw[0]), int(hw[1])


def _is_image(path: Path) -> bool:
    return (
        path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES
    )


def _load_split(root: Path, cat: str, split: str) -> list[Sample]:
    split_dir = root / cat / split
    if not split_dir.is_dir():
        raise DatasetError(f"category {cat!r} has no {split!r} folder: expected {str(split_dir)!r}")
    samples: list[Sample] = []
    defect_dirs = sorted(
        (d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")),
        key=lambda d: d.name,
    )
    for d in defect_dirs:
        for path in sorted((p for p in d.iterdir() if _is_image(p)), key=lambda p: p.name):
            mask_path = None
            if d.name != GOOD:
                mask_path = root / cat / "ground_truth" / d.name / f"{path.stem}_mask.png"
                if not mask_path.is_file() and (root / IMAGE_LEVEL).is_file():
                    mask_path = None  # image-level labels: no pixel metrics or threshold
                elif not mask_path.is_file():
                    raise DatasetError(
                        f"no ground-truth mask for anomalous image {str(path)!r}: "
                        f"expected {str(mask_path)!r}"
                    )
            samples.append(Sample(path, cat, split, d.name, mask_path))
    if not samples:
        raise DatasetError(
            f"no images in {str(split_dir)!r}: expected <defect>/<name>.png files "
            f"(extensions: {', '.join(IMAGE_SUFFIXES)})"
        )
    return samples


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise DatasetError(f"image file {str(path)!r} does not exist") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"cannot read image file {str(path)!r} ({exc})") from exc


def _resolve_format(root: str | Path, format: str) -> str:
    if format == "auto":
        return detect_format(root)
    if format not in FORMATS:
        raise DatasetError(f"format must be 'auto' or one of {FORMATS}, got {format!r}")
    return format


def _nonzero(im: Image.Image) -> np.ndarray:
    """bool (H, W): pixels with any non-zero value (colour channels for colour and
    palette images, like reading them as BGR and testing ``!= 0``)."""
    if im.mode in ("1", "L", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        return np.asarray(im) != 0
    return np.asarray(im.convert("RGB")).any(axis=2)


@dataclass(frozen=True)
class _VisaRow:
    line: int
    category: str
    split: str
    anomalous: bool
    image: str
    mask: str


def _read_visa_csv(root: Path) -> list[_VisaRow]:
    """Parse and validate VisA's split CSV (values only; files are checked by the loader)."""
    csv_path = root / VISA_SPLIT_CSV
    where = f"VisA split CSV {str(csv_path)!r}"
    if not csv_path.is_file():
        raise DatasetError(
            f"VisA split CSV not found: expected {str(csv_path)!r}. VisA is read through "
            "the split CSV shipped with the dataset (split_csv/1cls.csv, columns "
            f"{','.join(VISA_COLUMNS)}); copy it under the dataset root"
        )
    rows: list[_VisaRow] = []
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DatasetError(
                    f"{where} is empty: expected the header {','.join(VISA_COLUMNS)}"
                )
            header = [h.strip() for h in header]
            missing = [c for c in VISA_COLUMNS if c not in header]
            extra = [h for h in header if h not in VISA_COLUMNS]
            dup = sorted({h for h in header if header.count(h) > 1})
            if missing or extra or dup:
                parts = []
                if missing:
                    parts.append(f"missing column(s) {', '.join(missing)}")
                if extra:
                    parts.append(f"unexpected column(s) {', '.join(map(repr, extra))}")
                if dup:
                    parts.append(f"duplicated column(s) {', '.join(dup)}")
                raise DatasetError(
                    f"{where} has a bad header ({'; '.join(parts)}): expected the "
                    f"columns {','.join(VISA_COLUMNS)}"
                )
            index = {c: header.index(c) for c in VISA_COLUMNS}
            for record in reader:
                line = reader.line_num
                if not record or all(not v.strip() for v in record):
                    continue  # blank line
                if len(record) != len(header):
                    raise DatasetError(
                        f"{where} line {line} has {len(record)} field(s), expected "
                        f"{len(header)} ({','.join(header)})"
                    )
                v = {c: record[i].strip() for c, i in index.items()}
                if v["split"] not in SPLITS:
                    raise DatasetError(
                        f"{where} line {line}: unknown split {v['split']!r}, expected "
                        f"one of {', '.join(SPLITS)}"
                    )
                if v["label"] not in VISA_LABELS:
                    raise DatasetError(
                        f"{where} line {line}: unknown label {v['label']!r}, expected "
                        f"one of {', '.join(VISA_LABELS)}"
                    )
                if not v["object"]:
                    raise DatasetError(f"{where} line {line}: empty object (category)")
                if not v["image"]:
                    raise DatasetError(f"{where} line {line}: empty image path")
                anomalous = v["label"] == "anomaly"
                if anomalous and not v["mask"]:
                    raise DatasetError(
                        f"{where} line {line}: anomalous image {v['image']!r} has no "
                        "mask (the mask column is empty)"
                    )
                rows.append(
                    _VisaRow(line, v["object"], v["split"], anomalous, v["image"], v["mask"])
                )
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot parse {where} ({exc})") from exc
    except OSError as exc:
        raise DatasetError(f"cannot read {where} ({exc})") from exc
    return rows
