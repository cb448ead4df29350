"""``clipinspect demo``: the whole workflow on a built-in synthetic dataset, in a few minutes.

synthesize (MVTec AD layout) -> export a bundle (pretrained if loadable, else random weights,
said once, loudly) -> few-shot references from train/good -> thresholds from the held-out
train/good images -> inspect the test split -> report (Markdown, HTML with pictures, JSON).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from clipinspect.calibration.datasets import load_mask, load_mvtec
from clipinspect.calibration.metrics import image_auroc
from clipinspect.calibration.synth import generate
from clipinspect.calibration.thresholds import from_normal_images
from clipinspect.runtime import Bundle, Inspector
from clipinspect.runtime.core.errors import UsageError
from clipinspect.runtime.core.inspector import threshold_key
from clipinspect.runtime.predict import colour_range, predict_to_dir

from .demo_defaults import DEMO_CATEGORIES, DEMO_MODEL, DEMO_PRETRAINED
from .demo_report import contact_sheet, render_html, render_markdown
from .clip import WeightsDownloadError
from .exporter import ExportError, ExportOptions, export_bundle, log

HELD_OUT_NORMAL = 8  # train/good images beyond the references, for the thresholds


@dataclass
class DemoOptions:
    """What ``run_demo`` does: output folder (refused if it exists, unless ``overwrite``), model
    and weights (random ones, reported once, if ``pretrained`` cannot be loaded), few-shot
    reference count, synthetic categories (None = DEMO_CATEGORIES), seed of data and random
    weights, inspection batch size."""

    out: str | Path = "demo-output"
    model: str = DEMO_MODEL
    pretrained: str = DEMO_PRETRAINED
    shots: int = 4  # with random weights 2 shots leave the washer's image AUROC near chance
    categories: Sequence[str] | None = None
    seed: int = 0
    batch_size: int = 4
    overwrite: bool = False


def _bundle_matches(path: Path, model: str, pretrained: str | None, categories: Sequence[str]
                    ) -> bool:
    """Reuse a bundle from an earlier demo run if it is the same model, weights and categories."""
    try:
        m = Bundle.open(path).manifest
    except Exception:
        return False
    w = m.model.weights
    same_weights = (w.kind == "random") if pretrained is None else w.tag == pretrained
    return m.model.name == model and same_weights and set(categories) <= set(m.categories)


def weights_warning(model: str, pretrained: str, error: Exception) -> str:
    """One line: what failed (the real cause: no network connection or another one, and the hub
    repository and file it tried to fetch; not a page of text) and the fix."""
    if isinstance(error, WeightsDownloadError):
        cause = error.cause + (f"; tried {error.source}" if error.source else "")
        fix = ("download that file on a machine with internet access" if error.offline
               else "download the checkpoint")
    else:
        cause, fix = type(error.__cause__ or error).__name__, "download the checkpoint elsewhere"
    return (f"WARNING: could not load pretrained weights {model}/{pretrained} ({cause}); using "
            f"RANDOM weights: the numbers test the pipeline, not detection. Fix: {fix} and pass "
            "--pretrained PATH.")


def export_for_demo(path: Path, model: str, pretrained: str, categories: Sequence[str],
                    seed: int) -> tuple[Bundle, str | None, str | None]:
    """Export with ``pretrained``; fall back to random weights. -> (bundle, one-line warning,
    the full error) where the fallback was taken."""
    if _bundle_matches(path, model, pretrained, categories):
        log(f"  reusing the bundle in {path}")
        return Bundle.open(path), None, None
    options = ExportOptions(path, model, pretrained, categories, overwrite=True, seed=seed,
                            sub_steps=True)
    try:
        return export_bundle(options), None, None
    except ExportError as e:
        warning, error = weights_warning(model, pretrained, e), str(e)
        log(warning)
    if _bundle_matches(path, model, None, categories):
        log(f"  reusing the random-weights bundle in {path}")
        return Bundle.open(path), warning, error
    options.pretrained, options.warn_random = None, False
    return export_bundle(options), warning, error


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty output folder unless ``overwrite``; then clear all but the bundle
    (reused when it matches, see ``export_for_demo``)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"the demo output folder {str(out)!r} already exists; pass "
                             "--overwrite to replace its contents, or choose another --out")
        for child in out.iterdir():
            if child.name != "bundle":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def set_demo_thresholds(inspector: Inspector, name: str, normal: list) -> dict:
    """Thresholds just above the highest image score and pixel value of the held-out normal
    images (none of them flagged): with a handful of images that is the only honest choice."""
    t = from_normal_images(inspector, name, normal, fpr=0.0)
    t["how"] = (f"just above the highest image score and pixel value of {t['images']} normal "
                "train/good images not used as references (none of them is flagged); with so "
                f"few images the false-positive rate is only known to be below about "
                f"{100 / t['images']:.0f}%")
    inspector.bundle.set_thresholds(name, threshold_key(inspector.precision, t["mode"]), t)
    return t


def decisions(labels: np.ndarray, flagged: np.ndarray) -> dict[str, int]:
    """Image-level confusion counts at the threshold (positive = defective)."""
    return {"TP": int(np.sum(labels & flagged)), "FP": int(np.sum(~labels & flagged)),
            "FN": int(np.sum(labels & ~flagged)), "TN": int(np.sum(~labels & ~flagged))}


def demo_steps(categories: Sequence[str]) -> int:
    """How many numbered steps the demo logs: data, export, then two per category."""
    return 2 + 2 * len(categories)


def step(k: int, total: int, text: str) -> None:
    """One of the demo's steps, each number logged once."""
    log(f"== {k}/{total} {text}")


def inspect_category(inspector: Inspector, data: Path, out: Path, name: str,
                     options: DemoOptions, *, first_step: int) -> dict:
    """References, thresholds, inspection of the test split, contact sheet -> the category's
    report entry; logged as steps ``first_step`` and the next."""
    total = demo_steps(options.categories or DEMO_CATEGORIES)
    train = [s.path for s in load_mvtec(data, [name], split="train")]
    refs, held_out = train[:options.shots], train[options.shots:]
    step(first_step, total, f"{name}: {len(refs)}-shot references, thresholds from "
         f"{len(held_out)} other normal images")
    inspector.add_references(name, refs, options.batch_size)
    thresholds = set_demo_thresholds(inspector, name, held_out)
    test = load_mvtec(data, [name], split="test")
    step(first_step + 1, total, f"{name}: inspecting {len(test)} test images")
    pred_dir = out / "predictions" / name
    start = time.perf_counter()
    results = predict_to_dir(inspector, [s.path for s in test], name, pred_dir,
                             options.batch_size, label=name)
    seconds = time.perf_counter() - start
    labels = np.array([s.is_anomalous for s in test])
    scores = np.array([r.image_score for r in results], dtype=np.float64)
    flagged = np.array([bool(r.is_anomalous) for r in results])
    masks = np.stack([load_mask(s) for s in test])
    maps = np.stack([r.anomaly_map for r in results])
    records = [json.loads(line) for line in (pred_dir / "results.jsonl").read_text().splitlines()]
    for rec, sample in zip(records, test):
        rec["truth"] = sample.defect
    lo, hi = colour_range(thresholds, maps[0])
    contact_sheet(pred_dir, records, out / f"overlays_{name}.png", truth_masks=list(masks),
                  colour_scale=(lo, hi))
    return {
        "images": len(test), "anomalous": int(labels.sum()),
        "image_auroc": image_auroc(labels, scores), "pixel_auroc": image_auroc(masks, maps),
        "mean_score_good": float(scores[~labels].mean()),
        "mean_score_defective": float(scores[labels].mean()),
        "images_per_second": len(test) / seconds, "thresholds": thresholds,
        "decisions": decisions(labels, flagged), "colour_scale": [lo, hi],
        "images_detail": [{"source": r["source"], "truth": r["truth"],
                           "image_score": r["image_score"],
                           "is_anomalous": r.get("is_anomalous")} for r in records],
    }


def run_demo(options: DemoOptions) -> dict:
    out, categories = Path(options.out), list(options.categories or DEMO_CATEGORIES)
    prepare_out(out, options.overwrite)
    t0 = time.perf_counter()
    data = out / "data"
    total = demo_steps(categories)
    step(1, total, f"synthetic dataset ({', '.join(categories)}) -> {data}")
    generate(data, seed=options.seed, categories=categories,
             n_train=max(options.shots, 1) + HELD_OUT_NORMAL, n_test_good=4,
             n_test_defect_per_type=1)  # one image per defect type: the image count sets the time
    step(2, total, f"export {options.model} -> {out / 'bundle'}")
    bundle, warning, error = export_for_demo(out / "bundle", options.model, options.pretrained,
                                             categories, options.seed)
    inspector = Inspector.open(bundle)
    parity = bundle.manifest.parity.get("fp32")
    report = {"model": options.model, "weights": bundle.manifest.model.weights.kind,
              "weights_warning": warning, "weights_error": error, "bundle": bundle.identity,
              "parity_fp32": parity.to_dict() if parity else None, "shots": options.shots,
              "categories": {}}
    for i, name in enumerate(categories):
        report["categories"][name] = inspect_category(inspector, data, out, name, options,
                                                      first_step=3 + 2 * i)
    report["seconds"] = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    (out / "report.html").write_text(render_html(report, out))
    print(render_markdown(report, console=True))
    print(f"report: {out / 'report.html'} (also report.md, report.json); overlays: "
          f"{out}/overlays_*.png and {out}/predictions/")
    return report
