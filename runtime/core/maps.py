"""Post-processing of anomaly maps on the host: upsampling, optional smoothing, overlays and
their colour scale."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw


@lru_cache(maxsize=64)
def bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) float32 matrix of 1-D bilinear interpolation, align_corners=False.

    Same sampling as ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``
    for an output size given explicitly: source coordinate ``(i + 0.5) * n_in / n_out - 0.5``,
    clamped at 0, neighbours clamped at the last index.
    """
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    m = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1.0 - frac)
    np.add.at(m, (rows, i1), frac)
    out = m.astype(np.float32)
    out.flags.writeable = False  # shared through the cache
    return out


@lru_cache(maxsize=64)
def bilinear_taps(n_out: int, n_in: int) -> tuple[np.ndarray, ...]:
    """The two non-zero entries of each row of :func:`bilinear_matrix`: (first index, second
    index, first weight, second weight), each (n_out,), read-only."""
    m = bilinear_matrix(n_out, n_in)
    rows = np.arange(n_out)
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    i0 = np.minimum(np.floor(np.maximum(src, 0.0)).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w0 = m[rows, i0]
    w1 = np.where(i0 == i1, np.float32(0), m[rows, i1])  # clamped: the whole weight is in w0
    out = (i0, i1, w0, w1)
    for a in out:
        a.flags.writeable = False  # shared through the cache
    return out


# Rows of an upsampled map computed at a time: bounds the temporaries of a large map.
_UPSAMPLE_ROWS = 512


def upsample(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of one (gh, gw) map to (H, W): the products of
    :func:`bilinear_matrix`, computed from its two taps per row and column with element-wise
    numpy (no BLAS call: OpenBLAS's threads busy-wait after one and took the cores from the
    next encoder run; benchmarks/results/int8_notes_cpu_b16p.md, issue 27)."""
    h, w = size
    y0, y1, wy0, wy1 = bilinear_taps(h, grid_map.shape[0])
    x0, x1, wx0, wx1 = bilinear_taps(w, grid_map.shape[1])
    g = grid_map.astype(np.float32)
    rows = g[y0] * wy0[:, None] + g[y1] * wy1[:, None]                  # (H, gw)
    out = np.empty((h, w), np.float32)
    for r in range(0, h, _UPSAMPLE_ROWS):
        block = rows[r:r + _UPSAMPLE_ROWS]
        np.multiply(block[:, x0], wx0, out=out[r:r + _UPSAMPLE_ROWS])
        out[r:r + _UPSAMPLE_ROWS] += block[:, x1] * wx1
    return out


def gaussian_blur(m: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian smoothing (reflect padding, radius 4 sigma) of an (H, W) map."""
    if sigma <= 0:
        return m
    radius = max(1, int(4.0 * sigma + 0.5))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    out = m.astype(np.float32)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect" if out.shape[axis] > radius else "edge")
        acc = np.zeros_like(out)
        n = out.shape[axis]
        for t, weight in enumerate(taps):
            acc += weight * (padded[t:t + n] if axis == 0 else padded[:, t:t + n])
        out = acc
    return out


# Anchor colours of a jet-like map (blue -> cyan -> yellow -> red), positions in [0, 1].
_ANCHORS = np.array([0.0, 0.35, 0.65, 1.0])
_COLOURS = np.array([[0, 0, 160], [0, 200, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float32)


def heatmap_rgb(m: np.ndarray, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """(H, W) scores -> (H, W, 3) uint8 colours, clipped to [vmin, vmax]."""
    t = np.clip((m - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    rgb = np.stack([np.interp(t, _ANCHORS, _COLOURS[:, c]) for c in range(3)], axis=-1)
    return rgb.astype(np.uint8)


def mask_edge(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> the mask's pixels that touch a pixel outside it (its outline)."""
    return mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) &
                    np.roll(mask, 1, 1) & np.roll(mask, -1, 1))


def overlay(rgb: np.ndarray, m: np.ndarray, alpha: float = 0.5, vmin: float = 0.0,
            vmax: float = 1.0, mask: np.ndarray | None = None) -> np.ndarray:
    """Blend a heat map, coloured over [vmin, vmax], over the image; outline the binary mask in
    white when given."""
    out = (1 - alpha) * rgb.astype(np.float32) + alpha * heatmap_rgb(m, vmin, vmax)
    if mask is not None and mask.any():
        out[mask_edge(mask)] = 255
    return out.astype(np.uint8)


def colour_range(thresholds: dict, amap: np.ndarray, vmin: float | None = None,
                 vmax: float | None = None) -> tuple[float, float]:
    """Overlay colours span [vmin, vmax]; by default, where the category has a pixel threshold,
    a range centred on it (hot = above threshold): from the median pixel of its normal images
    when recorded (maps with a high baseline, like WinCLIP's), else from 0.5 x the threshold.
    Without a threshold: the map's own range (relative only)."""
    if "pixel" in thresholds and vmin is None and vmax is None:
        t = thresholds["pixel"]
        vmin = min(thresholds.get("pixel_median", 0.5 * t), t)
        vmax = 2 * t - vmin
    lo = float(amap.min()) if vmin is None else vmin
    hi = float(amap.max()) if vmax is None else vmax
    return lo, max(hi, lo + 1e-6)


def shared_scale(thresholds: dict, vmin: float | None = None, vmax: float | None = None
                 ) -> tuple[float, float] | None:
    """The colour scale all overlays of a category share, or None where each map is coloured by
    its own range (no pixel threshold and no explicit vmin and vmax)."""
    if "pixel" in thresholds and vmin is None and vmax is None:
        return colour_range(thresholds, np.zeros(1, np.float32))
    return (vmin, max(vmax, vmin + 1e-6)) if vmin is not None and vmax is not None else None


def scaled_overlay(rgb: np.ndarray, m: np.ndarray, thresholds: dict,
                   mask: np.ndarray | None = None, *, vmin: float | None = None,
                   vmax: float | None = None) -> np.ndarray:
    """:func:`overlay` coloured over :func:`colour_range` of the category's ``thresholds``: the
    colours every overlay of this project (files, HTTP answers, the live page) shows."""
    lo, hi = colour_range(thresholds, m, vmin, vmax)
    return overlay(rgb, m, vmin=lo, vmax=hi, mask=mask)


def colour_bar(width: int, height: int, scale: tuple[float, float],
               middle: str | None = None) -> Image.Image:
    """A horizontal bar of the overlay colours over ``scale``, its ends (and ``middle``, a label
    for the centre) written underneath."""
    ramp = np.linspace(scale[0], scale[1], width, dtype=np.float32)[None, :].repeat(12, 0)
    bar = Image.new("RGB", (width, height), "white")
    bar.paste(Image.fromarray(heatmap_rgb(ramp, *scale)), (0, 0))
    draw = ImageDraw.Draw(bar)
    draw.text((2, 14), f"{scale[0]:.3g}", fill="black")
    right = f"{scale[1]:.3g}"
    draw.text((width - 7 * len(right) - 2, 14), right, fill="black")
    if middle:
        draw.text((width // 2 - 3 * len(middle), 14), middle, fill="black")
    return bar
