"""Loader for datasets in the MVTec AD folder layout.

Expected layout (the one :mod:`.synth` writes)::

    <root>/<category>/train/good/<name>.<ext>
    <root>/<category>/test/good/<name>.<ext>
    <root>/<category>/test/<defect>/<name>.<ext>
    <root>/<category>/ground_truth/<defect>/<name>_mask.png

Every folder under ``<split>/`` is a defect type, ``good`` meaning defect-free.
Masks are 8-bit images, non-zero (255) on defective pixels.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clipinspect.runtime.errors import ClipInspectError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
"""Lower-case suffixes recognised as images (matched case-insensitively)."""

SPLITS: tuple[str, ...] = ("train", "test")

GOOD = "good"


class DatasetError(ClipInspectError, ValueError):
    """The dataset on disk does not match the expected MVTec AD layout."""


@dataclass(frozen=True)
class Sample:
    """One image of an MVTec-AD-style dataset.

    Attributes:
        path: Image file.
        category: Category folder name, e.g. ``"bottle"``.
        split: ``"train"`` or ``"test"``.
        defect: ``"good"`` or the defect folder name, e.g. ``"scratch"``.
        mask_path: Ground-truth mask for anomalous samples, None for good ones.
    """

    path: Path
    category: str
    split: str
    defect: str
    mask_path: Path | None = None

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
        cats = [categories] if isinstance(categories, str) else list(categories)
        missing = [c for c in cats if c not in found]
        if missing:
            raise DatasetError(
                f"category {missing[0]!r} not found under {str(root)!r}; "
                f"categories found: {', '.join(found) if found else '(none)'}"
            )
    samples: list[Sample] = []
    for cat in cats:
        samples.extend(_load_split(root, cat, split))
    return samples


def load_mask(sample: Sample, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Ground-truth mask of ``sample`` as bool (H, W).

    Args:
        sample: A sample from :func:`load_mvtec`.
        size: Output ``(height, width)`` (numpy order, like the returned array), or
            an int for a square; None keeps the image's own size. Resizing uses
            nearest neighbour so the mask stays binary.

    Returns:
        bool (H, W), True on defective pixels; all False for good samples.

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
            "mask_path; load samples with load_mvtec() or set mask_path"
        )
    try:
        with Image.open(sample.mask_path) as im:
            im.load()  # force decoding here so truncated files fail inside the try
            mask_img = im.convert("L")
    except FileNotFoundError:
        raise DatasetError(f"mask file {str(sample.mask_path)!r} does not exist") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(
            f"cannot read mask file {str(sample.mask_path)!r} ({exc}); "
            "replace it with a valid 8-bit PNG"
        ) from exc
    if mask_img.size != (img_w, img_h):
        raise DatasetError(
            f"mask {str(sample.mask_path)!r} is {mask_img.size[0]}x{mask_img.size[1]} "
            f"but image {str(sample.path)!r} is {img_w}x{img_h} (width x height); "
            "masks must match their image size"
        )
    if out_hw is not None and out_hw != (img_h, img_w):
        mask_img = mask_img.resize((out_hw[1], out_hw[0]), Image.Resampling.NEAREST)
    arr = np.asarray(mask_img)
    # MVTec masks are 0/255; some datasets store 0/1. Half-scale threshold for the
    # former keeps stray anti-aliasing values out.
    return arr > 0 if arr.max(initial=0) <= 1 else arr >= 128


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
        path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
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
                if not mask_path.is_file():
                    raise DatasetError(
                        f"no ground-truth mask for anomalous image {str(path)!r}: "
                        f"expected {str(mask_path)!r}"
                    )
            samples.append(Sample(path, cat, split, d.name, mask_path))
    if not samples:
        raise DatasetError(
            f"no images in {str(split_dir)!r}: expected <defect>/<name>.png files "
            f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
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
