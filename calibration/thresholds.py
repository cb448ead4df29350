"""Decision thresholds per category: from normal images at a target false-positive rate, or
from an annotated validation set at the F1-maximizing point. Stored in the bundle per precision
and mode; the runtime then sets ``is_anomalous`` and the binary mask."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from clipinspect.runtime import Bundle, Inspector
from clipinspect.runtime.core.bundle import sha256_file
from clipinspect.runtime.core.errors import UsageError
from clipinspect.runtime.core.images import ImageInput
from clipinspect.runtime.core.inspector import threshold_key
# Re-exported: these lived here before the runtime needed them (refit after feedback).
from clipinspect.runtime.core.thresholds import MAX_PIXELS  # noqa: F401
from clipinspect.runtime.core.thresholds import from_normal_images
from clipinspect.runtime.core.thresholds import threshold_at_fpr  # noqa: F401

from .datasets import load_dataset, load_mask
from .metrics import f1_max_threshold


def references_among(bundle: Bundle, category: str, images: Sequence[ImageInput]) -> list[str]:
    """The ``images`` (paths) that are ``category``'s few-shot references, by the sources its
    memory records: the same file (resolved path; a relative source read from here or from the
    bundle, where feedback keeps its images) or the same content (sha256, only of files whose
    size is that of a reference, so it costs little). [] without memory."""
    memory = bundle.manifest.categories[category].memory if category in \
        bundle.manifest.categories else None
    if memory is None or not memory.sources:
        return []
    sources: set[Path] = set()
    for s in memory.sources:
        for p in ([Path(s)] if Path(s).is_absolute() else [Path(s), bundle.root / s]):
            if p.is_file():
                sources.add(p.resolve())
    sizes = {p.stat().st_size for p in sources}
    digests = {sha256_file(p) for p in sources}
    found = []
    for item in images:
        if not isinstance(item, (str, os.PathLike)) or not Path(item).is_file():
            continue
        path = Path(item).resolve()
        if path in sources or (path.stat().st_size in sizes and sha256_file(path) in digests):
            found.append(str(item))
    return found


def references_warning(category: str, found: Sequence[str], shown: int = 4) -> str:
    """One line: which --normal images are the category's references, why that matters, the
    fix."""
    names = ", ".join(found[:shown]) + (f" and {len(found) - shown} more" if len(found) > shown
                                         else "")
    return (f"WARNING: {len(found)} of the --normal images are few-shot references of "
            f"{category!r} ({names}): their few-shot scores are near zero, so the thresholds come "
            "out too low; give normal images not used as references (or --mode zero-shot)")


def from_validation(inspector: Inspector, category: str, root: str | Path, fmt: str = "auto",
                    mode: str = "auto", batch_size: int = 8) -> dict:
    """Thresholds at the F1-max points of an annotated set (the category's test split)."""
    samples = load_dataset(root, fmt, [category], split="test")
    results = inspector.inspect([s.path for s in samples], category, batch_size, mode)
    pairs = [(s, r) for s, r in zip(samples, results) if r.ok]
    labels = np.array([s.is_anomalous for s, _ in pairs])
    if labels.all() or not labels.any():
        raise UsageError(f"the validation set of {category!r} under {str(root)!r} needs both "
                         "normal and anomalous images")
    scores = np.array([r.image_score for _, r in pairs])
    image_f1, image_t = f1_max_threshold(labels, scores)
    normal = scores[~labels]
    out = {"image": image_t, "method": "F1-max on a validation set", "image_f1": image_f1,
           "measured_image_fpr": float(np.mean(normal >= image_t)), "images": len(pairs),
           "mode": pairs[0][1].mode}
    if any(s.is_anomalous and s.mask_path is None for s, _ in pairs):
        # Image-level labels (the operators' labelled set): no pixel threshold from them.
        return {**out, "pixel_f1": None, "image_level_labels": True}
    masks = [load_mask(s, size=r.anomaly_map.shape) for s, r in pairs]
    pixel_f1, pixel_t = f1_max_threshold(np.concatenate([m.ravel() for m in masks]),
                                         np.concatenate([r.anomaly_map.ravel() for _, r in pairs]))
    return {**out, "pixel": pixel_t, "pixel_f1": pixel_f1}


def describe(category: str, key: str, t: dict) -> str:
    pixel = f"{t['pixel']:.6g}" if t.get("pixel") is not None else "not set (no masks)"
    lines = [f"{category} ({key}): image threshold {t['image']:.6g}, pixel threshold "
             f"{pixel} ({t['method']}, {t['images']} images)"]
    if "target_fpr" in t:
        lines.append(
            f"  expected false-positive rate about {100 * t['target_fpr']:.2g}% of normal parts; "
            f"measured on these images: {100 * t['measured_image_fpr']:.2g}% of images, "
            f"{100 * t['measured_pixel_fpr']:.2g}% of pixels")
        if t["target_fpr"] < t["smallest_measurable_image_fpr"]:
            lines.append(f"  WARNING: with {t['images']} images the smallest non-zero image FPR "
                         f"that can be measured is {100 * t['smallest_measurable_image_fpr']:.2g}%;"
                         f" use about {int(np.ceil(10 / max(t['target_fpr'], 1e-9)))} normal "
                         "images for a reliable threshold at this rate")
    else:
        pixel_f1 = f"{t['pixel_f1']:.3f}" if t.get("pixel_f1") is not None else "-"
        lines.append(f"  F1 image {t['image_f1']:.3f}, pixel {pixel_f1}; false-positive "
                     f"rate on the normal validation images {100 * t['measured_image_fpr']:.2g}%")
    return "\n".join(lines)


def calibrate(inspector: Inspector, category: str, *,
              normal: Sequence[ImageInput] | None = None, fpr: float = 0.01,
              validation: str | Path | None = None, fmt: str = "auto", mode: str = "auto",
              batch_size: int = 8) -> tuple[str, dict]:
    """Compute thresholds one way or the other and store them in the bundle."""
    if (normal is None) == (validation is None):
        raise UsageError("give either normal images (--normal DIR) or a validation set "
                         "(--validation ROOT), not both and not neither")
    t = (from_normal_images(inspector, category, normal, fpr, mode, batch_size)
         if normal is not None else
         from_validation(inspector, category, validation, fmt, mode, batch_size))
    key = threshold_key(inspector.precision, t["mode"])
    inspector.bundle.set_thresholds(category, key, t)
    return key, t
