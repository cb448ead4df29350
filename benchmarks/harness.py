"""The harness every measurement shares, done once: the workload (synthetic images of a
bundle's category), the end-to-end pass, variants timed in interleaved rounds (medians, ratios:
benchmarks/stats.py), and the result record (command, machine, load, versions) written as JSON
and Markdown (benchmarks/report.py).

``clipinspect bench``, ``loadtest`` and ``study`` are the package's products; the one-off
measurements are small scripts under benchmarks/experiments/ (not installed) that reuse this
module, each result file keeping the command that reproduced it (:func:`finish`)."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from clipinspect.runtime.core.names import FEW_SHOT

from .report import command_line, environment, write_results
from .stats import interleaved_rounds

# Where the experiment scripts live, relative to the repository root (their commands are run
# from there, as every command in benchmarks/README.md is).
EXPERIMENTS = "benchmarks/experiments"
DEFECTS = ("good", "scratch", "hole", "stain", "crack")
IMAGE_SIZE = 256


def program(script: str) -> str:
    """How a result names an experiment script: ``python benchmarks/experiments/NAME.py``."""
    return f"python {EXPERIMENTS}/{Path(script).name}"


def parser(script_doc: str, *, out: str | None, rounds: int | None = None,
           prog: str | None = None) -> argparse.ArgumentParser:
    """An experiment's argument parser with the options every one has: ``--out`` (a path without
    extension; required where ``out`` is None) and, where it times rounds, ``--rounds``."""
    p = argparse.ArgumentParser(prog=prog, description=script_doc.split("\n\n")[0])
    p.add_argument("--out", default=out, required=out is None,
                   help="result path without extension (.json and .md are written)")
    if rounds is not None:
        p.add_argument("--rounds", type=int, default=rounds,
                       help=f"interleaved rounds, medians reported (default {rounds})")
    return p


def finish(result: dict, out: str | Path, render: Callable[[dict], str], *, script: str,
           argv: Sequence[str] | None = None,
           placeholders: Mapping[str, str] | None = None) -> dict:
    """``result`` with the command that reproduces it (``script``'s program and ``argv``, paths
    of this machine as ``placeholders``) and the environment record, written to
    ``out``.json and ``out``.md."""
    full = {"command": command_line(program(script), argv, placeholders), **result}
    for key, value in environment().items():  # a result's own record (more versions) wins
        full.setdefault(key, value)
    write_results(full, out, render)
    return full


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


def synthetic_category(bundle, asked: str | None = None) -> str:
    """The category to measure: the one asked, else the bundle's first that the synthetic
    image generator draws."""
    from clipinspect.calibration.synth import CATEGORIES

    if asked is not None:
        if asked not in bundle.categories or asked not in CATEGORIES:
            raise SystemExit(f"--category {asked!r} must be one of the bundle's categories "
                             f"({', '.join(bundle.categories)}) that synthetic images exist for "
                             f"({', '.join(CATEGORIES)})")
        return asked
    usable = [c for c in bundle.categories if c in CATEGORIES]
    if not usable:
        raise SystemExit(f"the bundle's categories ({', '.join(bundle.categories)}) have no "
                         f"synthetic images; add one of {', '.join(CATEGORIES)} with "
                         "'clipinspect add-category'")
    return usable[0]


def synthetic_images(category: str, n_images: int, n_refs: int, size: int = IMAGE_SIZE
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


def end_to_end_rounds(inspectors: Sequence, labels: Sequence[str], work: tuple[list, list], *,
                      category: str, mode: str, batch_size: int, rounds: int
                      ) -> tuple[list, list[list[float]], list[float]]:
    """Every inspector scores the same images end to end (its own memory of the references in
    few-shot mode): one untimed pass each (its outputs returned), then interleaved rounds ->
    (outputs per inspector, seconds per round per inspector, median images/s per inspector)."""
    images, refs = work
    memories = [insp.build_memory(refs)[0] if mode == FEW_SHOT else None for insp in inspectors]

    def run(i: int):
        return end_to_end(inspectors[i], images, batch_size, category, mode, memories[i])

    outputs = [run(i) for i in range(len(inspectors))]  # also the warm-up
    seconds, rates = interleaved_rounds(labels, run, rounds, len(images))
    return outputs, seconds, rates


def linked_copy(src: Path, dst: Path) -> Path:
    """A copy of a bundle whose large files are hard links (copied where linking fails); the
    manifest is a real copy, so storing memory in the copy never touches the original."""
    def link(a: str, b: str) -> None:
        if Path(a).name == "manifest.json":
            shutil.copy2(a, b)
            return
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    return Path(shutil.copytree(src, dst, copy_function=link))
