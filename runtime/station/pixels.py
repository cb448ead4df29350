"""Camera pixels to RGB: the GenICam pixel formats the station takes, each converted with whole-
array numpy operations (no per-pixel Python).

Bayer formats are named by their top-left 2 x 2 cell, as GenICam's pixel format naming
convention (PFNC) does: ``BayerRG8`` starts with a red then a green pixel on its first row, and
a green then a blue one on its second. They are demosaiced bilinearly: each missing colour is
the mean of that colour's nearest samples (normalised convolution, so the borders use only the
samples that exist). Mono16 (the full 16-bit range, as PFNC defines it) is rounded to 8 bits.
"""

from __future__ import annotations

import numpy as np

from ..core.errors import ClipInspectError

BYTES_PER_PIXEL = {"Mono8": 1, "Mono16": 2, "RGB8": 3, "BGR8": 3, "BayerRG8": 1,
                   "BayerGR8": 1, "BayerGB8": 1, "BayerBG8": 1}
PIXEL_FORMATS_SUPPORTED = tuple(BYTES_PER_PIXEL)
# (row, column) of red and of blue within the top-left 2 x 2 cell
BAYER_CELLS = {"BayerRG8": ((0, 0), (1, 1)), "BayerGR8": ((0, 1), (1, 0)),
               "BayerGB8": ((1, 0), (0, 1)), "BayerBG8": ((1, 1), (0, 0))}
# normalised-convolution kernels: red/blue sit two pixels apart, green in a quincunx
RB_KERNEL = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32)
G_KERNEL = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]], np.float32)


class PixelError(ClipInspectError):
    """A frame whose bytes do not hold the pixels its format and size say."""


def to_rgb(data: bytes | memoryview | np.ndarray, pixel_format: str, width: int,
           height: int) -> np.ndarray:
    """(height, width, 3) uint8 RGB from a frame's bytes."""
    if pixel_format not in BYTES_PER_PIXEL:
        raise PixelError(f"pixel format {pixel_format!r} is not supported; use one of "
                         f"{', '.join(BYTES_PER_PIXEL)} (set [source] pixel_format)")
    need = width * height * BYTES_PER_PIXEL[pixel_format]
    raw = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.ravel()
    if raw.size < need:
        raise PixelError(f"a {width} x {height} {pixel_format} frame needs {need} bytes, got "
                         f"{raw.size}")
    raw = raw[:need]
    if pixel_format == "Mono8":
        return np.repeat(raw.reshape(height, width, 1), 3, axis=2)
    if pixel_format == "Mono16":
        wide = raw.view("<u2").reshape(height, width).astype(np.uint32)
        mono = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(mono[:, :, None], 3, axis=2)
    if pixel_format in ("RGB8", "BGR8"):
        rgb = raw.reshape(height, width, 3)
        return np.ascontiguousarray(rgb[:, :, ::-1]) if pixel_format == "BGR8" else rgb.copy()
    return demosaic(raw.reshape(height, width), pixel_format)


def mosaic(rgb: np.ndarray, pixel_format: str) -> np.ndarray:
    """(H, W) Bayer samples of an RGB image: what a camera of that format would send (tests
    and the simulated source use it)."""
    (ry, rx), (by, bx) = BAYER_CELLS[pixel_format]
    out = rgb[:, :, 1].copy()
    out[ry::2, rx::2] = rgb[ry::2, rx::2, 0]
    out[by::2, bx::2] = rgb[by::2, bx::2, 2]
    return out


def demosaic(raw: np.ndarray, pixel_format: str) -> np.ndarray:
    """(H, W) uint8 Bayer samples -> (H, W, 3) uint8 RGB, bilinear."""
    h, w = raw.shape
    (ry, rx), (by, bx) = BAYER_CELLS[pixel_format]
    masks = np.zeros((3, h, w), np.float32)
    masks[0, ry::2, rx::2] = 1
    masks[2, by::2, bx::2] = 1
    masks[1] = 1 - masks[0] - masks[2]
    samples = masks * raw.astype(np.float32)
    out = np.empty((h, w, 3), np.uint8)
    for c, kernel in enumerate((RB_KERNEL, G_KERNEL, RB_KERNEL)):
        total = convolve3(samples[c], kernel)
        weight = convolve3(masks[c], kernel)
        out[:, :, c] = np.clip(np.rint(total / weight), 0, 255)
    return out


def convolve3(a: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``a`` convolved with a symmetric 3 x 3 kernel, zeros outside: nine shifted sums."""
    h, w = a.shape
    padded = np.pad(a, 1)
    out = np.zeros_like(a)
    for dy in range(3):
        for dx in range(3):
            if kernel[dy, dx]:
                out += kernel[dy, dx] * padded[dy:dy + h, dx:dx + w]
    return out
