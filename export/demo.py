"""``clipinspect demo``: the whole workflow on a built-in synthetic dataset, in a few minutes.

synthesize (MVTec AD layout) -> export a bundle (pretrained if loadable, else random weights,
said loudly) -> few-shot references from train/good -> inspect the test split -> report.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from clipinspect.calibration.datasets import load_mask, load_mvtec
from clipinspect.calibration.metrics import image_auroc
from clipinspect.calibration.synth import generate
from clipinspect.runtime import Bundle, Inspector
from clipinspect.runtime.predict import predict_to_dir

from .exporter import (DEFAULT_MODEL, DEFAULT_PRETRAINED, RANDOM_WEIGHTS_WARNING, ExportError,
                       ExportOptions, export_bundle, log)

DEMO_CATEGORIES = ("weave", "washer")


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


def export_for_demo(path: Path, model: str, pretrained: str, categories: Sequence[str],
                    seed: int) -> tuple[Bundle, str | None]:
    """Export with ``pretrained``; fall back to random weights (returned as a warning)."""
    if _bundle_matches(path, model, pretrained, categories):
        log(f"reusing the bundle in {path}")
        return Bundle.open(path), None
    options = ExportOptions(path, model, pretrained, categories, overwrite=True, seed=seed)
    try:
        return export_bundle(options), None
    except ExportError as e:
        warning = f"pretrained weights {model}/{pretrained} could not be loaded ({e})."
        log(f"WARNING: {warning} Continuing with random weights.")
    if _bundle_matches(path, model, None, categories):
        log(f"reusing the random-weights bundle in {path}")
        return Bundle.open(path), warning
    options.pretrained = None
    return export_bundle(options), warning


def contact_sheet(overlay_dir: Path, records: list[dict], out: Path, thumb: int = 128,
                  columns: int = 6) -> None:
    """One PNG of all overlays of a category, captioned with truth and score."""
    rows = (len(records) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * thumb, rows * (thumb + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, r in enumerate(records):
        x, y = (i % columns) * thumb, (i // columns) * (thumb + 16)
        if "overlay" in r:
            with Image.open(overlay_dir / r["overlay"]) as im:
                sheet.paste(im.convert("RGB").resize((thumb, thumb)), (x, y))
        draw.text((x + 3, y + thumb + 2), f"{r['truth'][:8]} {r.get('image_score', 0):.3f}",
                  fill="black")
    sheet.save(out)


@dataclass
class DemoOptions:
    """What ``run_demo`` does: output folder, model and weights (random ones, loudly reported,
    if ``pretrained`` cannot be loaded), few-shot reference count, synthetic categories (None =
    DEMO_CATEGORIES), seed of data and random weights, inspection batch size."""

    out: str | Path = "demo-output"
    model: str = DEFAULT_MODEL
    pretrained: str = DEFAULT_PRETRAINED
    shots: int = 2
    categories: Sequence[str] | None = None
    seed: int = 0
    batch_size: int = 4


def run_demo(options: DemoOptions) -> dict:
    out, model, shots, seed = Path(options.out), options.model, options.shots, options.seed
    batch_size, categories = options.batch_size, list(options.categories or DEMO_CATEGORIES)
    t0 = time.perf_counter()
    data = out / "data"
    log(f"== 1/4 synthetic dataset ({', '.join(categories)}) -> {data}")
    generate(data, seed=seed, categories=categories, n_train=max(shots, 2), n_test_good=4,
             n_test_defect_per_type=2)
    log(f"== 2/4 export {model} -> {out / 'bundle'}")
    bundle, weights_warning = export_for_demo(out / "bundle", model, options.pretrained,
                                               categories, seed)
    inspector = Inspector.open(bundle)
    report = {"model": model, "weights": bundle.manifest.model.weights.kind,
              "weights_warning": weights_warning, "bundle": bundle.identity,
              "parity_fp32": bundle.manifest.parity["fp32"].to_dict(), "shots": shots,
              "categories": {}}
    for name in categories:
        train = [s.path for s in load_mvtec(data, [name], split="train")][:shots]
        log(f"== 3/4 {name}: {len(train)}-shot references")
        inspector.add_references(name, train, batch_size)
        test = load_mvtec(data, [name], split="test")
        log(f"== 4/4 {name}: inspecting {len(test)} test images")
        pred_dir = out / "predictions" / name
        start = time.perf_counter()
        results = predict_to_dir(inspector, [s.path for s in test], name, pred_dir, batch_size,
                                 label=name)
        seconds = time.perf_counter() - start
        labels = np.array([s.is_anomalous for s in test])
        scores = np.array([r.image_score for r in results], dtype=np.float64)
        masks = np.stack([load_mask(s) for s in test])
        maps = np.stack([r.anomaly_map for r in results])
        records = [json.loads(line) for line in (pred_dir / "results.jsonl").read_text().splitlines()]
        for rec, sample in zip(records, test):
            rec["truth"] = sample.defect
        contact_sheet(pred_dir, records, out / f"overlays_{name}.png")
        report["categories"][name] = {
            "images": len(test), "anomalous": int(labels.sum()),
            "image_auroc": image_auroc(labels, scores), "pixel_auroc": image_auroc(masks, maps),
            "mean_score_good": float(scores[~labels].mean()),
            "mean_score_defective": float(scores[labels].mean()),
            "images_per_second": len(test) / seconds,
            "scores": {rec["source"]: rec["image_score"] for rec in records},
        }
    report["seconds"] = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_report(report))
    print(render_report(report))
    print(f"report: {out / 'report.md'}; overlays: {out}/overlays_*.png and {out}/predictions/")
    return report


def render_report(r: dict) -> str:
    lines = ["# clipinspect demo", ""]
    if r["weights_warning"] or r["weights"] == "random":
        lines += ["**WARNING: RANDOM WEIGHTS.** " + (r["weights_warning"] or RANDOM_WEIGHTS_WARNING)
                  + " The numbers below show that the pipeline runs end to end; they say nothing "
                  "about detection quality.", ""]
    parity = r["parity_fp32"]["max_abs_diff"]
    lines += [f"Model {r['model']} ({r['weights']} weights), bundle `{r['bundle']}`, "
              f"{r['shots']}-shot WinCLIP+.",
              "Export parity, max |onnxruntime - torch|: "
              + ", ".join(f"{k} {v:.1e}" for k, v in parity.items()), "",
              "| category | images (defective) | image AUROC | pixel AUROC | mean score good | "
              "mean score defective | images/s |", "|---|---|---|---|---|---|---|"]
    for name, c in r["categories"].items():
        lines.append(f"| {name} | {c['images']} ({c['anomalous']}) | {c['image_auroc']:.3f} | "
                     f"{c['pixel_auroc']:.3f} | {c['mean_score_good']:.4f} | "
                     f"{c['mean_score_defective']:.4f} | {c['images_per_second']:.2f} |")
    lines += ["", f"Total time {r['seconds']:.0f} s.", ""]
    return "\n".join(lines)
