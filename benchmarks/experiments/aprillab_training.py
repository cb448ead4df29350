"""Does adapter training learn? AprilLab pixel AUROC with untrained vs trained projections on
held-out synthetic images.

Training images: the test split of a synthetic dataset drawn with one seed; evaluation images:
the test split of another dataset drawn with another seed (same categories, different images).
With random CLIP weights the text prototypes of each category point in unrelated random
directions, so one projection set per category is trained (``--categories <c>``); the untrained
baseline is the seeded initialisation every training run starts from (``--epochs 0``). Maps are
computed with the scoring head's torch module (the one the ONNX head is traced from; their
agreement within 1e-4 is tested separately) on cached level tokens, at the 224x224 input size.

    python benchmarks/experiments/aprillab_training.py --work scratch/aprillab \
        --out benchmarks/results/aprillab_training_synth
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from clipinspect.benchmarks.harness import finish, parser
from clipinspect.runtime.cli.options import add_categories

MODEL = "ViT-S-16"


def run(work: Path, epochs: int, train_seed: int, eval_seed: int,
        categories: Sequence[str] | None = None) -> dict:
    import torch

    from clipinspect.calibration.datasets import load_dataset
    from clipinspect.calibration.metrics import pixel_auroc
    from clipinspect.calibration.synth import CATEGORIES, generate
    from clipinspect.export.clip import load_clip, preprocess_config
    from clipinspect.export.methods.aprillab import (CHECKPOINT_KEY, LevelProjections,
                                                     build_modules, category_text)
    from clipinspect.export.text import load_ensemble
    from clipinspect.export.train_adapters import (FeatureCache, TrainOptions, cache_key,
                                                   encoder_preprocess, train_adapters)

    t0 = time.perf_counter()
    train_data, eval_data, cache = work / "train-data", work / "eval-data", work / "features"
    categories = list(categories or CATEGORIES)
    generate(train_data, seed=train_seed, categories=categories)
    generate(eval_data, seed=eval_seed, categories=categories)
    common = dict(data=train_data, model=MODEL, pretrained=None, cache=cache, overwrite=True)
    train_adapters(TrainOptions(out=work / "untrained.pt", epochs=0, **common))
    losses = {c: train_adapters(TrainOptions(out=work / f"trained-{c}.pt", categories=[c],
                                             epochs=epochs, **common))["loss_per_epoch"]
              for c in categories}

    model, tokenizer, weights = load_clip(MODEL, None, 0)
    projections = LevelProjections(model.visual.conv1.out_channels, model.visual.output_dim, 4)
    encoder, heads = build_modules(model, None, None, projections)
    cfg, ensemble = preprocess_config(model), load_ensemble("aprillab")
    features = FeatureCache(cache, cache_key(MODEL, weights, encoder.layers, encoder.image_size,
                                             cfg, ensemble))
    rows = {}
    for c in categories:
        samples = load_dataset(eval_data, "mvtec", [c], "test")
        features.fill(samples, encoder, encoder_preprocess(cfg, encoder), 8)
        levels, masks = features.load(samples, encoder.image_size)
        text = features.text(c, lambda n: category_text(model, tokenizer, n, ensemble)[0]
                             ["prototypes"])
        rows[c] = {}
        for name in ("untrained", "trained"):
            ckpt = work / ("untrained.pt" if name == "untrained" else f"trained-{c}.pt")
            state = torch.load(ckpt, map_location="cpu", weights_only=True)[CHECKPOINT_KEY]
            projections.load_state_dict(state)
            with torch.no_grad():
                probs = heads["head_zeroshot"].level_probabilities(levels, text)
            amap = sum(p[:, 1] for p in probs).numpy()
            rows[c][name] = round(pixel_auroc(masks.numpy() > 0.5, amap), 4)
        rows[c]["eval_images"] = len(samples)
    mean = {k: round(sum(r[k] for r in rows.values()) / len(rows), 4)
            for k in ("untrained", "trained")}
    return {"benchmark": "aprillab_training", "model": MODEL, "weights": "random (seed 0)",
            "epochs": epochs, "train_data": f"synthetic, seed {train_seed}, test split",
            "eval_data": f"synthetic, seed {eval_seed}, test split (held-out images)",
            "metric": "pixel AUROC, all pixels of a category pooled, maps and masks at 224x224",
            "pixel_auroc": rows, "mean": mean, "loss_per_epoch": losses,
            "seconds": round(time.perf_counter() - t0)}


def render(r: dict) -> str:
    lines = [f"# AprilLab adapter training on synthetic data ({r['model']}, {r['weights']})", "",
             f"Trained {r['epochs']} epochs on {r['train_data']}, one projection set per "
             f"category; evaluated on {r['eval_data']}. Metric: {r['metric']}.", "",
             f"Command: `{r['command']}`", "",
             "| category | eval images | untrained | trained | training loss, first -> last epoch |",
             "|---|---|---|---|---|"]
    for c, row in r["pixel_auroc"].items():
        loss = r["loss_per_epoch"][c]
        lines.append(f"| {c} | {row['eval_images']} | {row['untrained']:.3f} | "
                     f"{row['trained']:.3f} | {loss[0]:.3f} -> {loss[-1]:.3f} |")
    lines.append(f"| mean | | {r['mean']['untrained']:.3f} | {r['mean']['trained']:.3f} | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, out="benchmarks/results/aprillab_training_synth")
    p.add_argument("--work", required=True, help="scratch folder (datasets, bundles, caches)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train-seed", type=int, default=1)
    p.add_argument("--eval-seed", type=int, default=2)
    add_categories(p, "synthetic categories measured (default: all)")
    args = p.parse_args(argv)
    finish(run(Path(args.work), args.epochs, args.train_seed, args.eval_seed, args.categories),
           args.out, render, script=__file__, argv=argv, placeholders={args.work: "WORK"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
