"""Inspect images into a folder: JSON lines of results and PNG heat-map overlays."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .core.images import ImageInput
from .core.inspector import InspectionResult, Inspector
# colour_range and colour_bar stay importable from here (export/demo.py, demo_report.py).
from .core.maps import colour_bar, colour_range, scaled_overlay, shared_scale
from .core.progress import Progress


def overlay_name(index: int, source: str) -> str:
    """Unique, readable file name: MVTec-style trees repeat stems (test/hole/000.png, ...)."""
    p = Path(source)
    stem = "_".join(part for part in (p.parent.name, p.stem) if part)
    return f"{index:05d}_{re.sub(r'[^A-Za-z0-9_.-]+', '-', stem)[:80] or 'image'}.png"


def predict_to_dir(inspector: Inspector, images: Sequence[ImageInput], category: str,
                   out: str | Path, batch_size: int = 8, *, mode: str = "auto",
                   smoothing_sigma: float = 0.0, overlays: bool = True, save_maps: bool = False,
                   vmin: float | None = None, vmax: float | None = None,
                   label: str = "inspect") -> list[InspectionResult]:
    """Writes ``results.jsonl`` (one line per image, failures included), ``overlays/*.png`` and,
    with ``save_maps``, ``maps/*.npy`` (float32 H x W). Results are written as they arrive, so
    an interruption keeps what was done; the category is checked before anything is written.

    Overlay colours: :func:`~.core.maps.colour_range`; where all overlays share one scale
    (:func:`~.core.maps.shared_scale`) its bar is written to ``colour_bar.png``.
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
                Image.fromarray(scaled_overlay(r.image, r.anomaly_map, thresholds, r.mask,
                                               vmin=vmin, vmax=vmax)).save(out / "overlays" / name)
                record["overlay"] = f"overlays/{name}"
            if r.ok and save_maps:
                np.save(out / "maps" / name.replace(".png", ".npy"), r.anomaly_map)
            r.image = None  # drop the decoded image once written
            jsonl.write(json.dumps(record) + "\n")
            jsonl.flush()
            results.append(r)
    return results
