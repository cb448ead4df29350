"""Inspect images into a folder: JSON lines of results and PNG heat-map overlays."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .core.images import ImageInput
from .core.inspector import InspectionResult, Inspector
from .core.maps import heatmap_rgb, overlay
from .core.progress import Progress


def overlay_name(index: int, source: str) -> str:
    """Unique, readable file name: MVTec-style trees repeat stems (test/hole/000.png, ...)."""
    p = Path(source)
    stem = "_".join(part for part in (p.parent.name, p.stem) if part)
    return f"{index:05d}_{re.sub(r'[^A-Za-z0-9_.-]+', '-', stem)[:80] or 'image'}.png"


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


def predict_to_dir(inspector: Inspector, images: Sequence[ImageInput], category: str,
                   out: str | Path, batch_size: int = 8, *, mode: str = "auto",
                   smoothing_sigma: float = 0.0, overlays: bool = True, save_maps: bool = False,
                   vmin: float | None = None, vmax: float | None = None,
                   label: str = "inspect") -> list[InspectionResult]:
    """Writes ``results.jsonl`` (one line per image, failures included), ``overlays/*.png`` and,
    with ``save_maps``, ``maps/*.npy`` (float32 H x W). Results are written as they arrive, so
    an interruption keeps what was done; the category is checked before anything is written.

    Overlay colours: :func:`colour_range`; where all overlays share one scale
    (:func:`shared_scale`) its bar is written to ``colour_bar.png``.
    """
    thresholds = inspector.thresholds(category, inspector.check(category, mode))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for wanted, folder in ((overlays, "overlays"), (save_maps, "maps")):
        if wanted:
            (out / folder).mkdir(exist_ok=True)
    scale = shared_scale(thresholds, vmin, vmax)
    if overlays and scale is not None:
        middle = f"pixel threshold {thresholds['pixel']:.3g}" if "pixel" in thresholds else None
        colour_bar(384, 30, scale, middle).save(out / "colour_bar.png")
    images = list(images)
    results: list[InspectionResult] = []
    with open(out / "results.jsonl", "w") as jsonl, Progress(len(images), label) as bar:
        stream = inspector.iter_inspect(images, category, batch_size, mode,
                                        smoothing_sigma=smoothing_sigma, keep_images=overlays,
                                        progress=bar.update)
        for i, r in enumerate(stream):
            record = {"index": i, "category": category, **r.to_json()}
            name = overlay_name(i, r.source)
            if r.ok and overlays:
                lo, hi = colour_range(thresholds, r.anomaly_map, vmin, vmax)
                Image.fromarray(overlay(r.image, r.anomaly_map, vmin=lo, vmax=hi,
                                        mask=r.mask)).save(out / "overlays" / name)
                record["overlay"] = f"overlays/{name}"
            if r.ok and save_maps:
                np.save(out / "maps" / name.replace(".png", ".npy"), r.anomaly_map)
            r.image = None  # drop the decoded image once written
            jsonl.write(json.dumps(record) + "\n")
            jsonl.flush()
            results.append(r)
    return results
