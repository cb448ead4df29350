"""Deterministic synthetic defect dataset in the MVTec AD folder layout.

Layout written by :func:`generate` (the same one :mod:`.datasets` reads)::

    <root>/<category>/train/good/000.png
    <root>/<category>/test/good/000.png
    <root>/<category>/test/<defect>/000.png
    <root>/<category>/ground_truth/<defect>/000_mask.png   # uint8 L, 0 or 255

Images are RGB uint8 PNGs of ``image_size x image_size`` pixels. Every image is
drawn from its own ``numpy.random.default_rng`` keyed by
``(seed, category index, split, index)``, so a file's bytes depend only on that
key and the image size, never on which other categories or counts were asked for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES: tuple[str, ...] = ("weave", "grain", "washer", "pill")
"""The default categories: two procedural textures, then two objects on a plain background."""

MORE_CATEGORIES: tuple[str, ...] = ("tile", "gear")
"""Categories generated only when asked for: a texture and an object that share nothing with
the default ones, so that two datasets with disjoint categories can be made (adapters trained
on one, evaluated on the other: the cross-domain protocol of ``clipinspect study``)."""

ALL_CATEGORIES: tuple[str, ...] = CATEGORIES + MORE_CATEGORIES
"""Every category :func:`render_sample` draws; new ones are appended so that the RNG key (the
index here) of the existing ones, hence their images, never changes."""

DEFECTS: tuple[str, ...] = ("scratch", "hole", "stain", "crack")
"""Defect type names; each becomes a ``test/<defect>`` folder."""

TEXTURES: tuple[str, ...] = ("weave", "grain", "tile")
"""Categories whose defects may land anywhere in the image (not only on an object)."""

_MIN_IMAGE_SIZE = 32  # below this the shapes no longer fit or stay visible

# Split codes used in the RNG key. Defect splits follow, one code per DEFECTS entry,
# so adding a defect type never changes the images of the existing ones.
_SPLIT_TRAIN = 0
_SPLIT_TEST_GOOD = 1
_SPLIT_FIRST_DEFECT = 2

# Last element of the RNG key: the defect-free rendering and the defect painted on
# it use separate streams, so the base of a defect image can be re-rendered alone.
_PART_BASE = 0
_PART_DEFECT = 1

ProgressFn = Callable[[int, int], None]


# --------------------------------------------------------------------------- public


def generate(
    out_dir: str | Path,
    *,
    seed: int = 0,
    categories: Iterable[str] | None = None,
    image_size: int = 256,
    n_train: int = 8,
    n_test_good: int = 6,
    n_test_defect_per_type: int = 3,
    defects: Iterable[str] | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, dict]:
    """Write a synthetic MVTec-AD-style dataset under ``out_dir``.

    Args:
        out_dir: Dataset root; created if missing. Files with the same names are
            overwritten; other files already there are left alone.
        seed: Non-negative integer; same seed and arguments give byte-identical PNGs.
        categories: Subset of :data:`ALL_CATEGORIES` (default: :data:`CATEGORIES`).
        image_size: Side length in pixels of every (square) image, >= 32.
        n_train: Defect-free training images per category, >= 1.
        n_test_good: Defect-free test images per category, >= 1.
        n_test_defect_per_type: Test images per defect type and category, >= 1.
        defects: Subset of :data:`DEFECTS` (default: all of them).
        progress: Optional ``callable(n_done, n_total)`` called after each image.

    Returns:
        ``{category: {"train": n, "test_good": n, "test_defect": {defect: n}}}``.
    """
    cats = _check_names(categories, ALL_CATEGORIES, "category", "categories", CATEGORIES)
    defs = _check_names(defects, DEFECTS, "defect", "defects")
    seed = _check_int("seed", seed, minimum=0)
    image_size = _check_int("image_size", image_size, minimum=_MIN_IMAGE_SIZE)
    n_train = _check_int("n_train", n_train, minimum=1)
    n_test_good = _check_int("n_test_good", n_test_good, minimum=1)
    n_def = _check_int("n_test_defect_per_type", n_test_defect_per_type, minimum=1)
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable(n_done, n_total) or None, got {progress!r}")

    root = _dataset_root(out_dir)

    n_total = len(cats) * (n_train + n_test_good + len(defs) * n_def)
    done = [0]

    def written() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], n_total)

    summary: dict[str, dict] = {}
    for cat in cats:
        jobs = [("train", "good", n_train), ("test", "good", n_test_good)]
        jobs += [("test", d, n_def) for d in defs]
        for split, defect, count in jobs:
            _write_folder(root / cat, cat, split, defect, count, seed=seed,
                          image_size=image_size, written=written)
        summary[cat] = {
            "train": n_train,
            "test_good": n_test_good,
            "test_defect": {d: n_def for d in defs},
        }
    return summary


def _write_folder(cat_dir: Path, cat: str, split: str, defect: str, count: int, *,
                  seed: int, image_size: int, written: Callable[[], None]) -> None:
    """The ``count`` images of one category, split and defect (and their masks), named
    000.png, 001.png, ... like MVTec AD; ``written()`` after each image."""
    img_dir = cat_dir / split / defect
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir = cat_dir / "ground_truth" / defect
    if defect != "good":
        mask_dir.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(count - 1)))  # 000.png like MVTec, wider if needed
    for i in range(count):
        image, mask = render_sample(cat, split=split, defect=defect, index=i, seed=seed,
                                    image_size=image_size)
        stem = f"{i:0{width}d}"
        _write_png(image, img_dir / f"{stem}.png")
        if defect != "good":
            _write_png(mask.astype(np.uint8) * 255, mask_dir / f"{stem}_mask.png")
        written()


def render_sample(
    category: str,
    split: str = "test",
    defect: str = "good",
    index: int = 0,
    *,
    seed: int = 0,
    image_size: int = 256,
    paint_defect: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one image exactly as :func:`generate` writes it, without touching disk.

    Args:
        category: One of :data:`ALL_CATEGORIES`.
        split: ``"train"`` (only with ``defect="good"``) or ``"test"``.
        defect: ``"good"`` or one of :data:`DEFECTS`.
        index: Image index within its folder, >= 0.
        seed: Dataset seed, >= 0.
        image_size: Side length in pixels, >= 32.
        paint_defect: If False, return the defect-free base image that the defect
            would be painted on (same key), with an all-False mask. Pixels outside
            the defect mask are identical between the two renderings.

    Returns:
        ``(image, mask)``: image uint8 (H, W, 3) RGB; mask bool (H, W), True on the
        pixels the defect altered (all False for ``"good"``).
    """
    if category not in ALL_CATEGORIES:
        raise ValueError(
            f"unknown category {category!r}; known categories: {', '.join(ALL_CATEGORIES)}"
        )
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if defect != "good" and defect not in DEFECTS:
        raise ValueError(f"unknown defect {defect!r}; use 'good' or one of: {', '.join(DEFECTS)}")
    if split == "train" and defect != "good":
        raise ValueError(
            f"the train split only holds defect-free images; got defect={defect!r}, "
            "use split='test' for defect images"
        )
    index = _check_int("index", index, minimum=0)
    seed = _check_int("seed", seed, minimum=0)
    size = _check_int("image_size", image_size, minimum=_MIN_IMAGE_SIZE)

    if split == "train":
        split_code = _SPLIT_TRAIN
    elif defect == "good":
        split_code = _SPLIT_TEST_GOOD
    else:
        split_code = _SPLIT_FIRST_DEFECT + DEFECTS.index(defect)
    key = [seed, ALL_CATEGORIES.index(category), split_code, index]

    img, obj, place = _RENDERERS[category](np.random.default_rng(key + [_PART_BASE]), size)
    mask = np.zeros((size, size), dtype=bool)
    if defect != "good" and paint_defect:
        rng = np.random.default_rng(key + [_PART_DEFECT])
        img, mask = _paint_defect(img, obj, place, defect, rng)
    return _to_uint8(img), mask


# ------------------------------------------------------------------- validation


def _dataset_root(out_dir: str | Path) -> Path:
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(
            f"out_dir {str(root)!r} exists and is not a directory; "
            "pass a directory path (it is created if missing)"
        )
    return root


def _check_int(name: str, value: object, minimum: int) -> int:
    # bool is an int subclass; True as a size is almost certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_names(
    names: Iterable[str] | None,
    known: tuple[str, ...],
    what: str,
    plural: str,
    default: tuple[str, ...] | None = None,
) -> list[str]:
    """Validate a subset of ``known``; keep the caller's order, drop repeats; None gives
    ``default`` (all of ``known`` if not given)."""
    if names is None:
        return list(known if default is None else default)
    if isinstance(names, str):  # "weave" would otherwise iterate as letters
        names = [names]
    out: list[str] = []
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {what} {name!r}; known {plural}: {', '.join(known)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(f"{plural} is empty; pass None for all of: {', '.join(known)}")
    return out


# -------------------------------------------------------------------- rendering
#
# Renderers take (rng, size) and return
#   img   float32 (H, W, 3) in roughly [0, 1],
#   obj   bool (H, W), pixels belonging to the product (all True for textures),
#   place bool (H, W), where a defect may be anchored (well inside the product).


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates: y (H, 1) and x (1, W), float32, broadcastable."""
    c = np.arange(size, dtype=np.float32) + 0.5
    return c[:, None], c[None, :]


def _smooth_noise(rng: np.random.Generator, cells: tuple[int, int], size: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1], shape (size, size).

    A (rows, cols) grid of uniform values upsampled bicubically: few cells give
    blotchy illumination/material variation; many rows and few columns give
    streaks along x (wood fibres).
    """
    small = rng.uniform(-1.0, 1.0, size=cells).astype(np.float32)
    big = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(big, dtype=np.float32)


def _pixel_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Sensor-like per-pixel noise, float32 (size, size, 1), shared across channels."""
    return (rng.standard_normal((size, size, 1), dtype=np.float32) * sigma).astype(np.float32)


def _rotate(y: np.ndarray, x: np.ndarray, cy: float, cx: float, angle: float):
    """Coordinates in a frame rotated by ``angle`` around (cy, cx): (u along, v across)."""
    c, s = math.cos(angle), math.sin(angle)
    dy, dx = y - cy, x - cx
    return dx * c + dy * s, -dx * s + dy * c


def _weave(rng: np.random.Generator, size: int):
    """Plain-weave fabric: alternating warp/weft threads on a slightly rotated grid."""
    scale = size / 256
    period = max(6.0, 16.0 * scale)
    y, x = _grid(size)
    u, v = _rotate(y, x, 0.0, 0.0, rng.normal(0.0, 0.015))
    u = u / period + rng.uniform(0.0, 2.0)
    v = v / period + rng.uniform(0.0, 2.0)
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    # Rounded thread cross-section; each thread darkens where it dives under the other.
    across_u = np.sqrt(np.maximum(np.sin(np.pi * fu), 0.0))
    across_v = np.sqrt(np.maximum(np.sin(np.pi * fv), 0.0))
    warp = across_u * (0.7 + 0.3 * across_v)
    weft = across_v * (0.7 + 0.3 * across_u)
    warp_on_top = ((iu + iv) % 2) == 0
    val = 0.3 + 0.6 * np.where(warp_on_top, warp, weft)
    val = val * (1.0 + 0.06 * _smooth_noise(rng, (6, 6), size))

    base = np.array([0.80, 0.74, 0.62], np.float32) * rng.uniform(0.97, 1.03, 3)
    img = val[..., None] * base.astype(np.float32) * rng.uniform(0.93, 1.07)
    img = img + _pixel_noise(rng, size, 0.015)
    full = np.ones((size, size), dtype=bool)
    return img.astype(np.float32), full, _margin_mask(size, 0.12)


def _grain(rng: np.random.Generator, size: int):
    """Wood: growth rings from warped sinusoids, plus fibre streaks and noise."""
    scale = size / 256
    y, x = _grid(size)
    u, v = _rotate(y, x, size / 2, size / 2, rng.normal(0.0, 0.03))
    # Ring lines bend with one slow and one faster wave plus a smooth random warp.
    slow = 2 * np.pi * u / (size * rng.uniform(0.6, 1.2)) + rng.uniform(0, 6.3)
    fast = 2 * np.pi * u / (size * rng.uniform(0.15, 0.3)) + rng.uniform(0, 6.3)
    warp = scale * (
        6.0 * np.sin(slow) + 2.5 * np.sin(fast) + 4.0 * _smooth_noise(rng, (4, 4), size)
    )
    period = 11.0 * scale * rng.uniform(0.9, 1.1)
    ring = 0.5 + 0.5 * np.sin(2 * np.pi * (v + warp) / period + rng.uniform(0, 6.3))
    ring = ring**3  # narrow dark latewood lines on wider light earlywood
    fibres = _smooth_noise(rng, (max(8, size // 3), 5), size)

    light = np.array([0.80, 0.60, 0.38], np.float32)
    dark = np.array([0.52, 0.33, 0.18], np.float32)
    t = np.clip(0.75 * ring + 0.12 * fibres, 0.0, 1.0)[..., None]
    img = light * (1.0 - t) + dark * t
    img = img * rng.uniform(0.93, 1.07) + _pixel_noise(rng, size, 0.012)
    full = np.ones((size, size), dtype=bool)
    return img.astype(np.float32), full, _margin_mask(size, 0.12)


def _washer(rng: np.random.Generator, size: int):
    """Flat metal washer (ring) on a dark plain background, lit from one side."""
    cy, cx = (size / 2 + rng.normal(0.0, 0.015 * size, 2)).tolist()
    r_out = 0.36 * size * rng.uniform(0.98, 1.02)
    r_in = 0.16 * size * rng.uniform(0.97, 1.03)
    y, x = _grid(size)
    dy, dx = y - cy, x - cx
    r = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    # One-pixel linear ramp at both edges: cheap anti-aliasing.
    cover = np.clip(r_out - r + 0.5, 0.0, 1.0) * np.clip(r - r_in + 0.5, 0.0, 1.0)

    p = np.clip((r - r_in) / (r_out - r_in), 0.0, 1.0)  # 0 at inner edge, 1 at outer
    light_dir = rng.uniform(-0.3, 0.3) - 0.8  # the "rotation" variation of the part
    shade = 0.55 + 0.2 * np.sin(np.pi * p) + 0.12 * np.cos(theta - light_dir)
    # Brushed metal: fine concentric streaks, a random profile indexed by radius.
    rings = rng.normal(0.0, 0.025, int(size) + 2).astype(np.float32)
    shade = shade + rings[np.clip(r.astype(np.int64), 0, size + 1)]
    metal = np.array([0.72, 0.74, 0.78], np.float32) * rng.uniform(0.95, 1.05)

    bg = np.array([0.16, 0.18, 0.20], np.float32) * rng.uniform(0.95, 1.05)
    c = cover[..., None]
    img = bg * (1.0 - c) + (shade[..., None] * metal) * c
    img = img + _pixel_noise(rng, size, 0.01)
    obj = cover > 0.5
    place = obj & (p > 0.2) & (p < 0.8)  # anchor defects well inside the ring
    return img.astype(np.float32), obj, place


def _pill(rng: np.random.Generator, size: int):
    """Two-coloured capsule with domed shading on a plain background."""
    cy, cx = (size / 2 + rng.normal(0.0, 0.015 * size, 2)).tolist()
    half = 0.22 * size * rng.uniform(0.98, 1.02)  # half distance between cap centres
    radius = 0.14 * size * rng.uniform(0.98, 1.02)
    y, x = _grid(size)
    u, v = _rotate(y, x, cy, cx, rng.normal(0.0, 0.07))
    du = u - np.clip(u, -half, half)
    dist = np.sqrt(du * du + v * v)  # distance to the capsule's axis segment
    cover = np.clip(radius - dist + 0.5, 0.0, 1.0)

    height = np.sqrt(np.clip(1.0 - (dist / radius) ** 2, 0.0, 1.0))
    shade = 0.5 + 0.5 * height
    highlight = 0.25 * np.exp(-((v + 0.4 * radius) ** 2) / (2 * (0.1 * radius) ** 2))
    highlight = highlight * (np.abs(u) < half + 0.4 * radius)
    cream = np.array([0.93, 0.91, 0.86], np.float32)
    colour = np.array([0.85, 0.42, 0.22], np.float32) * rng.uniform(0.95, 1.05, 3)
    body = np.where((u < 0)[..., None], cream, colour.astype(np.float32))
    body = body * shade[..., None] + highlight[..., None]
    seam = np.where(np.abs(u) < 0.8, np.float32(0.8), np.float32(1.0))  # between the halves
    body = body * seam[..., None]

    bg = np.array([0.20, 0.26, 0.24], np.float32) * rng.uniform(0.95, 1.05)
    c = cover[..., None]
    img = bg * (1.0 - c) + body * c
    img = img * rng.uniform(0.96, 1.04) + _pixel_noise(rng, size, 0.01)
    obj = cover > 0.5
    place = dist < 0.7 * radius
    return img.astype(np.float32), obj, place


def _tile(rng: np.random.Generator, size: int):
    """Glazed square ceramic tiles in a light grout grid, each tile its own shade."""
    scale = size / 256
    period = 64.0 * scale * rng.uniform(0.95, 1.05)
    grout = max(2.0, 4.0 * scale)
    y, x = _grid(size)
    u, v = _rotate(y, x, 0.0, 0.0, rng.normal(0.0, 0.01))
    u, v = u + rng.uniform(0.0, period), v + rng.uniform(0.0, period)
    iu, iv = np.floor(u / period), np.floor(v / period)
    edge = np.minimum(np.minimum(u - iu * period, (iu + 1) * period - u),
                      np.minimum(v - iv * period, (iv + 1) * period - v))
    in_tile = np.clip(edge - grout / 2 + 0.5, 0.0, 1.0)  # one-pixel anti-aliased grout edge
    # One shade per tile from a hash of its grid position (no per-tile loop).
    shade = 0.9 + 0.08 * np.sin(12.9898 * iu + 78.233 * iv + rng.uniform(0, 6.3))
    glaze = np.array([0.36, 0.52, 0.62], np.float32) * rng.uniform(0.95, 1.05, 3)
    glaze_img = glaze.astype(np.float32) * (shade * (1 + 0.04 * _smooth_noise(rng, (5, 5), size))
                                            )[..., None]
    grout_c = np.array([0.82, 0.80, 0.76], np.float32)
    t = in_tile[..., None]
    img = grout_c * (1.0 - t) + glaze_img * t + _pixel_noise(rng, size, 0.01)
    full = np.ones((size, size), dtype=bool)
    return img.astype(np.float32), full, _margin_mask(size, 0.12)


def _gear(rng: np.random.Generator, size: int):
    """Spur gear (toothed disc with a bore) in dull brass on a light plain background."""
    cy, cx = (size / 2 + rng.normal(0.0, 0.015 * size, 2)).tolist()
    teeth = 12
    r_root = 0.30 * size * rng.uniform(0.98, 1.02)
    r_tip = r_root + 0.07 * size
    r_bore = 0.10 * size
    y, x = _grid(size)
    dy, dx = y - cy, x - cx
    r = np.sqrt(dx * dx + dy * dy)
    phase = (np.arctan2(dy, dx) + rng.uniform(0, 2 * np.pi)) * teeth / (2 * np.pi)
    tooth = (np.abs(phase - np.round(phase)) < 0.25).astype(np.float32)  # half a pitch each
    outline = r_root + (r_tip - r_root) * tooth
    cover = np.clip(outline - r + 0.5, 0.0, 1.0) * np.clip(r - r_bore + 0.5, 0.0, 1.0)
    shade = 0.75 + 0.15 * np.cos(np.arctan2(dy, dx) - rng.uniform(-0.5, 0.5) + 2.3)
    brass = np.array([0.72, 0.58, 0.30], np.float32) * rng.uniform(0.95, 1.05)
    bg = np.array([0.86, 0.86, 0.84], np.float32) * rng.uniform(0.97, 1.03)
    c = cover[..., None]
    img = bg * (1.0 - c) + (shade[..., None] * brass) * c + _pixel_noise(rng, size, 0.01)
    obj = cover > 0.5
    place = obj & (r > r_bore + 0.04 * size) & (r < r_root - 0.03 * size)
    return img.astype(np.float32), obj, place


def _margin_mask(size: int, frac: float) -> np.ndarray:
    """Bool (size, size), True away from the border by ``frac`` of the size."""
    m = np.zeros((size, size), dtype=bool)
    b = int(round(frac * size))
    m[b : size - b, b : size - b] = True
    return m


_RENDERERS = {"weave": _weave, "grain": _grain, "washer": _washer, "pill": _pill,
              "tile": _tile, "gear": _gear}


# ---------------------------------------------------------------------- defects


def _paint_defect(img, obj, place, defect, rng):
    """Paint ``defect`` onto img (float32 (H, W, 3)); return (new img, bool mask (H, W)).

    The alpha map is exactly zero outside the returned mask, so pixels outside it
    keep their base values bit for bit.
    """
    size = img.shape[0]
    scale = size / 256
    min_area = max(4, int(10 * scale * scale))
    ys, xs = np.nonzero(place)
    for _ in range(32):  # a shape clipped to a thin object can come out tiny: redraw
        k = int(rng.integers(len(ys)))
        anchor = (float(xs[k]) + 0.5, float(ys[k]) + 0.5)
        alpha, colour = _DEFECT_PAINTERS[defect](img, anchor, rng, size, scale)
        alpha = np.where(obj, alpha, np.float32(0.0))
        mask = alpha > 0
        if mask.sum() >= min_area:
            break
    else:  # pragma: no cover - the anchor is always inside the object
        raise RuntimeError(f"could not place a visible {defect!r} defect")
    a = alpha[..., None]
    out = img * (1.0 - a) + colour * a
    return out.astype(np.float32), mask


def _draw(size: int, fn) -> np.ndarray:
    """Run ``fn(ImageDraw)`` on a blank L canvas; return bool (size, size) of drawn pixels."""
    canvas = Image.new("L", (size, size), 0)
    fn(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _contrasting(img: np.ndarray, region: np.ndarray, bright, dark) -> np.ndarray:
    """Pick ``bright`` or ``dark`` (RGB), whichever stands out more from the region."""
    mean = float(img[region].mean()) if region.any() else 0.5
    return np.asarray(bright if mean < 0.5 else dark, dtype=np.float32)


def _polyline(anchor, rng, length, n_seg, turn):
    """Points of a polyline of total ``length`` centred on ``anchor``.

    The heading starts random and drifts by ``turn`` radians (std) per segment.
    """
    heading = rng.uniform(0.0, 2 * np.pi) + np.cumsum(rng.normal(0.0, turn, n_seg))
    steps = np.stack([np.cos(heading), np.sin(heading)], axis=1) * (length / n_seg)
    pts = np.vstack([[0.0, 0.0], np.cumsum(steps, axis=0)])
    pts += np.asarray(anchor) - pts.mean(axis=0)
    return [tuple(p) for p in pts]


def _scratch(img, anchor, rng, size, scale):
    """Thin bright or dark polyline, as from a sharp tool dragged across the part."""
    pts = _polyline(anchor, rng, rng.uniform(0.2, 0.4) * size, int(rng.integers(2, 5)), 0.2)
    width = max(1, int(round(rng.uniform(1.0, 2.5) * scale)))
    region = _draw(size, lambda d: d.line(pts, fill=255, width=width, joint="curve"))
    colour = _contrasting(img, region, (0.97, 0.97, 0.95), (0.08, 0.08, 0.09))
    return region.astype(np.float32) * np.float32(0.9), colour


def _hole(img, anchor, rng, size, scale):
    """Dark filled, slightly irregular ellipse: missing material."""
    a = rng.uniform(0.03, 0.065) * size
    b = a * rng.uniform(0.55, 1.0)
    rot = rng.uniform(0.0, np.pi)
    t = np.linspace(0.0, 2 * np.pi, 28, endpoint=False)
    wobble = 1.0 + rng.uniform(-0.12, 0.12, t.size)
    ex, ey = a * wobble * np.cos(t), b * wobble * np.sin(t)
    px = anchor[0] + ex * math.cos(rot) - ey * math.sin(rot)
    py = anchor[1] + ex * math.sin(rot) + ey * math.cos(rot)
    poly = list(zip(px.tolist(), py.tolist(), strict=True))
    region = _draw(size, lambda d: d.polygon(poly, fill=255))
    return region.astype(np.float32), np.array([0.04, 0.035, 0.03], np.float32)


_STAIN_COLOURS = np.array(
    [[0.45, 0.24, 0.07], [0.12, 0.22, 0.55], [0.28, 0.38, 0.10], [0.55, 0.08, 0.14]],
    dtype=np.float32,
)  # rust, ink, oil, dye


def _stain(img, anchor, rng, size, scale):
    """Soft coloured blotch: a few overlapping Gaussian blobs, cut off at low alpha."""
    y, x = _grid(size)
    field = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(2, 5))):
        bx, by = np.asarray(anchor) + rng.normal(0.0, 0.035 * size, 2)
        sigma = rng.uniform(0.02, 0.045) * size
        weight = rng.uniform(0.7, 1.2)
        field += weight * np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * sigma * sigma))
    alpha = np.clip(field, 0.0, 1.0) * rng.uniform(0.75, 0.9)
    # Hard cut-off keeps the faint tail out of the image, so the mask is what changed.
    alpha = np.where(alpha >= 0.25, alpha, 0.0).astype(np.float32)
    colour = _STAIN_COLOURS[int(rng.integers(len(_STAIN_COLOURS)))]
    mean = img[alpha > 0].mean(axis=0) if (alpha > 0).any() else np.full(3, 0.5)
    if np.abs(colour - mean).max() < 0.35:  # too close to the surface: use the most distant
        colour = _STAIN_COLOURS[np.abs(_STAIN_COLOURS - mean).max(axis=1).argmax()]
    return alpha, colour


def _crack(img, anchor, rng, size, scale):
    """Dark jagged random-walk line, sometimes with a side branch."""
    step = max(2.0, 3.0 * scale)
    n = int(rng.uniform(0.25, 0.4) * size / step)
    main = _polyline(anchor, rng, n * step, n, 0.45)
    lines = [main]
    if rng.random() < 0.5:
        start = main[int(rng.integers(n // 4, 3 * n // 4 + 1))]
        m = max(3, n // 3)
        branch = _polyline((0.0, 0.0), rng, m * step, m, 0.45)
        off = np.asarray(start) - np.asarray(branch[0])
        lines.append([tuple(np.asarray(p) + off) for p in branch])
    width = max(1, int(round(rng.uniform(1.0, 2.0) * scale)))

    def draw(d):
        for pts in lines:
            d.line(pts, fill=255, width=width)

    region = _draw(size, draw)
    return region.astype(np.float32) * np.float32(0.95), np.array([0.05, 0.04, 0.04], np.float32)


_DEFECT_PAINTERS = {"scratch": _scratch, "hole": _hole, "stain": _stain, "crack": _crack}


# ------------------------------------------------------------------------ output


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """float (H, W, 3) in [0, 1] -> uint8 (H, W, 3), rounded and clipped."""
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _write_png(arr: np.ndarray, path: Path) -> None:
    """Write uint8 (H, W) as L or (H, W, 3) as RGB; no metadata, fixed compression."""
    # Pillow adds no timestamps to PNGs. Level 1: the noisy images compress about as
    # well as at the default level 6 but encode ~4x faster (encoding dominated the
    # run time); pinning it also keeps the bytes independent of Pillow's default.
    Image.fromarray(np.ascontiguousarray(arr)).save(path, format="PNG", compress_level=1)
