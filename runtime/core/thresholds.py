"""Image and pixel thresholds at a target false-positive rate on normal images.

Here (not in calibration) because a running service refits them when an operator adds a
reference image (runtime/core/memory_book.py); ``clipinspect threshold --normal`` uses the same
functions (calibration/thresholds.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .errors import UsageError
from .images import ImageInput

if TYPE_CHECKING:
    from .inspector import Inspector

MAX_PIXELS = 20_000_000  # pooled pixel values kept for a pixel threshold (a random subsample)
NORMAL_RULE = "normal images at a target FPR"


def threshold_at_fpr(normal_scores: np.ndarray, fpr: float) -> tuple[float, float]:
    """Lowest threshold t whose false-positive rate on these normal scores is at most ``fpr``
    (anomalous means score >= t). Returns (t, the rate measured on the scores)."""
    if not 0.0 <= fpr < 1.0:
        raise UsageError(f"--fpr {fpr} is not a rate in [0, 1), e.g. 0.01 for 1%")
    s = np.sort(np.ravel(np.asarray(normal_scores)))[::-1]
    if s.size == 0:
        raise UsageError("no normal scores to set a threshold on")
    allowed = int(np.floor(fpr * s.size))  # false positives the target permits
    # Everything strictly above the (allowed+1)-th largest score is flagged: at most `allowed`.
    # The step up is taken in the scores' own dtype: float32 maps compare in float32, where a
    # float64 step would round back onto the score itself.
    kth = s[min(allowed, s.size - 1)]
    t = float(np.nextafter(kth, np.array(np.inf, dtype=kth.dtype)))
    return t, float(np.count_nonzero(s >= t) / s.size)


def pooled(maps: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    values = np.concatenate([m.ravel() for m in maps])
    if values.size > MAX_PIXELS:
        values = rng.choice(values, MAX_PIXELS, replace=False)
    return values


def from_normal_images(inspector: "Inspector", category: str, images: Sequence[ImageInput],
                       fpr: float, mode: str = "auto", batch_size: int = 8) -> dict:
    """Image and pixel thresholds at ``fpr`` on normal images (all their pixels are normal).
    Image files are recorded by path (``normal_images``), so that they can be refit later."""
    results = [r for r in inspector.inspect(images, category, batch_size, mode) if r.ok]
    if len(results) < 2:
        raise UsageError(f"need at least 2 usable normal images of {category!r}, got "
                         f"{len(results)}")
    scores = np.array([r.image_score for r in results])
    image_t, image_fpr = threshold_at_fpr(scores, fpr)
    pixels = pooled([r.anomaly_map for r in results], np.random.default_rng(0))
    pixel_t, pixel_fpr = threshold_at_fpr(pixels, fpr)
    out = {"image": image_t, "pixel": pixel_t, "method": NORMAL_RULE,
           "target_fpr": fpr, "measured_image_fpr": image_fpr, "measured_pixel_fpr": pixel_fpr,
           "images": len(results), "smallest_measurable_image_fpr": 1.0 / len(results),
           "pixel_median": float(np.median(pixels)),  # where overlay colours start
           "mode": results[0].mode}
    files = [str(Path(i).resolve()) for i in images if isinstance(i, (str, Path))]
    if files and len(files) == len(images):
        out["normal_images"] = files
    return out
