"""Does adapter training learn? AprilLab pixel AUROC with untrained vs trained projections on
held-out synthetic images, through exported bundles and ``clipinspect eval``.

Training images: the test split of a synthetic dataset drawn with one seed; evaluation images:
the test split of another dataset drawn with another seed (same categories, different images).
With random CLIP weights the text prototypes of each category point in unrelated random
directions, so one projection per category is trained (``--categories <c>``); the untrained
baseline is the same seeded initialisation every training run starts from (``--epochs 0``).

    python -m clipinspect.benchmarks.aprillab_training --work /tmp/aprillab-bench \
        --out benchmarks/results/aprillab_training_synth
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .report import machine, write_results

MODEL = "ViT-S-16"


def run(work: Path, epochs: int, train_seed: int, eval_seed: int) -> dict:
    from clipinspect.calibration.evaluate import evaluate
    from clipinspect.calibration.synth import CATEGORIES, generate
    from clipinspect.export.aprillab import export_aprillab_bundle
    from clipinspect.export.train_adapters import train_adapters

    t0 = time.perf_counter()
    train_data, eval_data, cache = work / "train-data", work / "eval-data", work / "features"
    generate(train_data, seed=train_seed)
    generate(eval_data, seed=eval_seed)
    categories = list(CATEGORIES)
    common = dict(model_name=MODEL, pretrained=None, cache=cache, overwrite=True)
    train_adapters(train_data, work / "untrained.pt", epochs=0, **common)
    bundle = work / "bundle-untrained"
    export_aprillab_bundle(bundle, MODEL, None, categories, adapters=work / "untrained.pt",
                           overwrite=True)
    untrained = evaluate(bundle, eval_data, work / "eval-untrained", shots=[0], resume=False)
    rows, losses = {}, {}
    for c in categories:
        ckpt = work / f"trained-{c}.pt"
        losses[c] = train_adapters(train_data, ckpt, categories=[c], epochs=epochs,
                                   **common)["loss_per_epoch"]
        bundle = work / f"bundle-{c}"
        export_aprillab_bundle(bundle, MODEL, None, [c], adapters=ckpt, overwrite=True)
        trained = evaluate(bundle, eval_data, work / f"eval-{c}", categories=[c], shots=[0],
                           resume=False)
        rows[c] = {m: {"untrained": metric(untrained, c, m), "trained": metric(trained, c, m)}
                   for m in ("pixel_auroc", "image_auroc", "pro")}
    mean = {m: {k: sum(r[m][k] for r in rows.values()) / len(rows)
                for k in ("untrained", "trained")} for m in ("pixel_auroc", "image_auroc", "pro")}
    return {"benchmark": "aprillab_training", "model": MODEL, "weights": "random (seed 0)",
            "epochs": epochs, "train_data": f"synthetic, seed {train_seed}, test split",
            "eval_data": f"synthetic, seed {eval_seed}, test split (held-out images)",
            "categories": rows, "mean": mean, "loss_per_epoch": losses,
            "seconds": round(time.perf_counter() - t0), "machine": machine()}


def metric(report: dict, category: str, name: str) -> float:
    return float(report["categories"][category]["runs"]["fp32/0-shot"][name])


def render(r: dict) -> str:
    lines = [f"# AprilLab adapter training on synthetic data ({r['model']}, {r['weights']})", "",
             f"Trained {r['epochs']} epochs on {r['train_data']}; evaluated on {r['eval_data']} "
             "through exported bundles (onnxruntime FP32, zero-shot). One projection set per "
             "category.", "",
             "| category | pixel AUROC untrained | pixel AUROC trained | image AUROC untrained "
             "| image AUROC trained | loss first -> last epoch |", "|---|---|---|---|---|---|"]
    for c, row in list(r["categories"].items()) + [("mean", r["mean"])]:
        loss = r["loss_per_epoch"].get(c)
        lines.append(f"| {c} | {row['pixel_auroc']['untrained']:.3f} | "
                     f"{row['pixel_auroc']['trained']:.3f} | {row['image_auroc']['untrained']:.3f}"
                     f" | {row['image_auroc']['trained']:.3f} | "
                     f"{f'{loss[0]:.3f} -> {loss[-1]:.3f}' if loss else ''} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="scratch folder (datasets, bundles, caches)")
    p.add_argument("--out", default="benchmarks/results/aprillab_training_synth",
                   help="result path without extension (.json and .md are written)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train-seed", type=int, default=1)
    p.add_argument("--eval-seed", type=int, default=2)
    args = p.parse_args(argv)
    write_results(run(Path(args.work), args.epochs, args.train_seed, args.eval_seed), args.out,
                  render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
