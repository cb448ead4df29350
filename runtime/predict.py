"""Inspect images into a folder: JSON lines of results and PNG heat-map overlays."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .images import ImageInput
from .inspector import InspectionResult, Inspector
from .maps import overlay
from .progress import Progress


def overlay_name(index: int, source: str) -> str:
    """Unique, readable file name: MVTec-style trees repeat stems (test/hole/000.png, ...)."""
    p = Path(source)
    stem = "_".join(part for part in (p.parent.name, p.stem) if part)
    return f"{index:05d}_{re.sub(r'[^A-Za-z0-9_.-]+', '-', stem)[:80] or 'image'}.png"


def predict_to_dir(inspector: Inspector, images: Sequence[ImageInput], category: str,
                   out: str | Path, batch_size: int = 8, mode: str = "auto",
                   smoothing_sigma: float = 0.0, overlays: bool = True, save_maps: bool = False,
                   vmax: float | None = None, label: str = "inspect") -> list[InspectionResult]:
    """Writes ``results.jsonl`` (one line per image, failures included), ``overlays/*.png`` and,
    with ``save_maps``, ``maps/*.npy`` (float32 H x W). Results are written as they arrive, so
    an interruption keeps what was done."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = list(images)
    results: list[InspectionResult] = []
    for wanted, folder in ((overlays, "overlays"), (save_maps, "maps")):
        if wanted:
            (out / folder).mkdir(exist_ok=True)
    with open(out / "results.jsonl", "w") as jsonl, Progress(len(images), label) as bar:
        chunk = max(batch_size, 1) * 4  # bound memory: maps and decoded images of a few batches
        for start in range(0, len(images), chunk):
            part = inspector.inspect(images[start:start + chunk], category, batch_size, mode,
                                     smoothing_sigma, keep_images=overlays, progress=bar.update)
            for i, r in enumerate(part, start):
                record = {"index": i, "category": category, **r.to_json()}
                name = overlay_name(i, r.source)
                if r.ok and overlays:
                    top = vmax if vmax is not None else max(1e-6, float(r.anomaly_map.max()))
                    Image.fromarray(overlay(r.image, r.anomaly_map, vmax=top, mask=r.mask)).save(
                        out / "overlays" / name)
                    record["overlay"] = f"overlays/{name}"
                if r.ok and save_maps:
                    np.save(out / "maps" / name.replace(".png", ".npy"), r.anomaly_map)
                r.image = None  # drop the decoded image once written
                jsonl.write(json.dumps(record) + "\n")
                jsonl.flush()
                results.append(r)
    return results

