"""Throughput side by side in one process: the same decoded synthetic images inspected end to end
by several inspectors (precisions, methods), rounds cycling through them so that a drifting
machine's noise hits all alike."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import numpy as np

DEFECTS = ("good", "scratch", "hole", "stain", "crack")


def bundle_with_precisions(path: str, precisions: str):
    """(the bundle at ``path``, the comma-separated ``precisions`` as a list); exits with what
    to run when the bundle lacks one of their graphs."""
    from clipinspect.runtime import Bundle

    bundle = Bundle.open(path)
    wanted = [p.strip() for p in precisions.split(",") if p.strip()]
    missing = [p for p in wanted if p not in bundle.precisions]
    if missing:
        raise SystemExit(f"the bundle has no {', '.join(missing)} graphs; make them with "
                         f"'clipinspect quantize {path} --precision ...'")
    return bundle, wanted


def synthetic_images(category: str, n_images: int, n_refs: int, size: int = 256
                     ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(test images cycling through the defect kinds, normal reference images), RGB uint8."""
    from clipinspect.calibration.synth import render_sample

    images = [render_sample(category, "test", DEFECTS[i % len(DEFECTS)], i, image_size=size)[0]
              for i in range(n_images)]
    refs = [render_sample(category, "train", "good", i, image_size=size)[0]
            for i in range(n_refs)]
    return images, refs


def end_to_end(inspector, images: Sequence[np.ndarray], batch_size: int, category: str,
               mode: str, memory) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessing, encoder, scoring head and upsampling to each image's size ->
    (image scores (N,), maps (N, H, W))."""
    from clipinspect.runtime.core.maps import upsample

    scores, maps = [], []
    for _, good, encoded in inspector.iter_encoded(images, batch_size):
        s, grids, _ = inspector.score(encoded, category, mode, memory)
        scores.append(s)
        maps += [upsample(g, b.size) for b, g in zip(good, grids)]
    return np.concatenate(scores), np.stack(maps)


def interleaved_rounds(labels: Sequence[str], run: Callable[[int], object], rounds: int,
                       n_images: int) -> tuple[list[list[float]], list[float]]:
    """Time ``run(i)`` for every label in turn, ``rounds`` times (after the caller's warm-up) ->
    (seconds per round per label, median images/s per label)."""
    times: list[list[float]] = [[] for _ in labels]
    for r in range(rounds):
        for i, label in enumerate(labels):
            t0 = time.perf_counter()
            run(i)
            times[i].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{rounds} {label}: {n_images / times[i][-1]:.3f} img/s",
                  flush=True)
    return times, [n_images / statistics.median(t) for t in times]
