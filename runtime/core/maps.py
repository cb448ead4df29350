"""Post-processing of anomaly maps on the host: upsampling, optional smoothing, overlays."""

from __future__ import annotations

from functools import lru_cache

import numpy as np


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


def upsample(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of one (gh, gw) map to (H, W), as two small matrix products."""
    h, w = size
    ry = bilinear_matrix(h, grid_map.shape[0])
    rx = bilinear_matrix(w, grid_map.shape[1])
    # Both factors are float32, so the (H, W) product is too: no second full-size copy.
    return ry @ grid_map.astype(np.float32) @ rx.T


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
