"""INT8 against FP32 end to end through ``Inspector.inspect``, few-shot, at several batch sizes,
with the accuracy bounds of the INT8 graphs checked on a synthetic annotated set.

    python benchmarks/experiments/int8_speedup.py BUNDLE \
        --out benchmarks/results/int8_speedup_cpu_b16p

Speed: the bundle is copied to a temporary folder (graphs hard-linked), ``--shots`` normal
synthetic images are stored as the category's reference memory (by the FP32 encoder, as
``clipinspect fewshot`` does), and both precisions inspect the same decoded synthetic images
with ``Inspector.inspect`` (load stage in worker threads, encoder, few-shot head, maps upsampled
to the image size); rounds cycle through every (batch size, precision) so that machine noise
hits all alike; medians of the rounds. Accuracy: every category of the bundle that the synthetic
generator draws is evaluated as ``clipinspect eval`` does (image and pixel AUROC, map Pearson
against FP32) on a generated set (``--seed``), with ``--shots`` references per precision.
Bounds (issue 3): image and pixel AUROC within ``--auroc-points`` of FP32, map Pearson >=
``--min-pearson``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from clipinspect.benchmarks.harness import (IMAGE_SIZE, finish, linked_copy, parser,
                                            synthetic_images)
from clipinspect.benchmarks.report import load_text, machine_text
from clipinspect.benchmarks.stats import interleaved_rounds
from clipinspect.runtime.core.names import FEW_SHOT, ZERO_SHOT


def speed(bundle_path: Path, category: str, args: argparse.Namespace) -> dict:
    """Median images/s per (batch size, precision) through Inspector.inspect."""
    from clipinspect.runtime import Inspector

    images, refs = synthetic_images(category, args.images, args.shots)
    Inspector.open(bundle_path, "fp32").add_references(category, refs)
    inspectors = {f"{p} {a}": Inspector.open(bundle_path, p, threads=args.threads, attention=a)
                  for p in ("fp32", "int8") for a in attention_variants(bundle_path, p)}
    labels = [(b, v) for b in args.batch_sizes for v in inspectors]

    def run(i: int):
        batch, variant = labels[i]
        results = inspectors[variant].inspect(images, category, batch_size=batch,
                                              mode=args.mode)
        if not all(r.ok for r in results):
            raise SystemExit(f"{variant}: {next(r.error for r in results if not r.ok)}")
    for i in range(len(labels)):  # warm-up
        run(i)
    seconds, rates = interleaved_rounds([f"{v} batch {b}" for b, v in labels], run, args.rounds,
                                        args.images)
    out: dict = {}
    for (b, v), t, r in zip(labels, seconds, rates):
        out.setdefault(str(b), {})[v] = {"images_per_second": r, "seconds_per_round": t,
                                         "encoder_graph": inspectors[v].encoder_graph}
    for row in out.values():
        # INT8 (the graph onnxruntime's CPU provider runs by default) against the fastest FP32.
        fp32 = max((k for k in row if k.startswith("fp32")),
                   key=lambda k: row[k]["images_per_second"])
        int8 = "int8 auto"
        row["ratio"] = row[int8]["images_per_second"] / row[fp32]["images_per_second"]
        row["compared"] = [int8, fp32]
    return out


def attention_variants(bundle_path: Path, precision: str) -> list[str]:
    """The encoder graphs of ``precision`` to time: the default (auto: fused where the bundle
    has it) and, where that is the fused one, the standard one beside it."""
    from clipinspect.runtime import Bundle
    from clipinspect.runtime.core.names import FUSED_ENCODER

    fused = FUSED_ENCODER in Bundle.open(bundle_path).manifest.graphs[precision]
    return ["auto", "standard"] if fused else ["auto"]


def accuracy(bundle_path: Path, categories: list[str], args: argparse.Namespace,
             data: Path) -> dict:
    """Per category: FP32 and INT8 image / pixel AUROC (percent), their differences and the
    map Pearson of INT8 against FP32, ``--shots``-shot."""
    from clipinspect.calibration.datasets import load_dataset
    from clipinspect.calibration.evaluate import EvalOptions, evaluate_category
    from clipinspect.calibration.synth import generate
    from clipinspect.runtime import Inspector
    from clipinspect.runtime.core.progress import Progress

    generate(data, seed=args.seed, categories=categories)
    inspectors = {p: Inspector.open(bundle_path, p, threads=args.threads) for p in ("fp32", "int8")}
    options = EvalOptions(precisions=("fp32", "int8"), shots=(args.shots,))
    out = {}
    for c in categories:
        images = len(load_dataset(data, options.fmt, [c], split="test")) * len(inspectors)
        with Progress(images, f"accuracy {c}") as bar:
            runs = evaluate_category(inspectors, data, c, options, bar)["runs"]
        fp32, int8 = runs[f"fp32/{args.shots}-shot"], runs[f"int8/{args.shots}-shot"]
        row = {"map_pearson": int8["map_pearson_vs_fp32"]}
        for m in ("image_auroc", "pixel_auroc"):
            row[m] = {"fp32": 100 * fp32[m], "int8": 100 * int8[m],
                      "diff_points": 100 * (int8[m] - fp32[m])}
        row["within_bounds"] = bool(
            row["map_pearson"] >= args.min_pearson and
            all(abs(row[m]["diff_points"]) <= args.auroc_points
                for m in ("image_auroc", "pixel_auroc")))
        out[c] = row
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = parser(__doc__, out="benchmarks/results/int8_speedup_cpu", rounds=5)
    ap.add_argument("bundle")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--images", type=int, default=8, help="images per round")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic accuracy set")
    ap.add_argument("--auroc-points", type=float, default=1.0)
    ap.add_argument("--min-pearson", type=float, default=0.98)
    ap.add_argument("--target-ratio", type=float, default=3.0)
    ap.add_argument("--mode", choices=(FEW_SHOT, ZERO_SHOT), default=FEW_SHOT,
                    help="scoring mode timed (default few-shot, --shots references)")
    args = ap.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    return args


def main(argv: list[str] | None = None) -> dict:
    from clipinspect.calibration.synth import CATEGORIES
    from clipinspect.runtime import Bundle

    args = parse(argv)
    bundle = Bundle.open(args.bundle)
    if "int8" not in bundle.precisions:
        raise SystemExit(f"the bundle has no int8 graphs; make them with 'clipinspect quantize "
                         f"{args.bundle} --precision int8 --calibration DIR'")
    categories = [c for c in bundle.categories if c in CATEGORIES]
    if not categories:
        raise SystemExit(f"none of the bundle's categories ({', '.join(bundle.categories)}) has "
                         f"synthetic images; add one of {', '.join(CATEGORIES)} with "
                         "'clipinspect add-category'")
    with tempfile.TemporaryDirectory(prefix="clipinspect-int8-") as tmp:
        copy = linked_copy(bundle.root, Path(tmp) / "bundle")
        timing = speed(copy, categories[0], args)
        acc = accuracy(copy, categories, args, Path(tmp) / "data")
    result = {"benchmark": "int8_speedup", "bundle": bundle.identity,
              "model": bundle.manifest.model.name, "weights": bundle.manifest.model.weights.kind,
              "category": categories[0], "shots": args.shots, "images_per_round": args.images,
              "image_size": [IMAGE_SIZE, IMAGE_SIZE], "rounds": args.rounds,
              "threads": args.threads,
              "timed": f"Inspector.inspect from decoded RGB, {args.mode} (load, encoder, head, "
                       "maps)", "mode": args.mode,
              "speed": timing, "accuracy": acc,
              "bounds": {"auroc_points": args.auroc_points, "min_pearson": args.min_pearson},
              "target_ratio": args.target_ratio,
              "target_met": all(r["ratio"] >= args.target_ratio for r in timing.values()),
              "accuracy_bounds_held": all(r["within_bounds"] for r in acc.values())}
    return finish(result, args.out, render, script=__file__, argv=argv,
                  placeholders={args.bundle: "BUNDLE"})


def render(r: dict) -> str:
    lines = [f"# INT8 vs FP32 end to end: {r['model']} ({r['weights']} weights), "
             f"{r['shots']}-shot", "", f"Command: `{r['command']}`", "",
             f"Machine: {machine_text(r['machine'])}, "
             f"load average at the end {load_text(r['load_average'])}; "
             f"onnxruntime {r['versions']['onnxruntime']}. {r['images_per_round']} synthetic "
             f"{r['image_size'][0]}x{r['image_size'][1]} images of {r['category']} per round, "
             f"median of {r['rounds']} rounds cycling through every batch size and precision; "
             f"timed: {r['timed']}.", "",
             "Variants: precision and encoder graph (`auto` is what onnxruntime's CPU provider "
             "runs by default: the fused-attention encoder where the bundle has one; `standard` "
             "the standard-operator encoder that TensorRT and Triton run). The ratio is INT8 "
             "`auto` against the fastest FP32 variant.", "",
             "| batch | variant | encoder graph | images/s |", "|---|---|---|---|"]
    for b, row in r["speed"].items():
        for v, cell in row.items():
            if isinstance(cell, dict):
                lines.append(f"| {b} | {v} | {cell['encoder_graph']} | "
                             f"{cell['images_per_second']:.3f} |")
    lines += ["", "| batch | INT8 / fastest FP32 | compared |", "|---|---|---|"]
    for b, row in r["speed"].items():
        lines.append(f"| {b} | {row['ratio']:.2f}x | {' vs '.join(row['compared'])} |")
    lines += ["", f"Target {r['target_ratio']:g}x at every batch size: "
                  f"{'met' if r['target_met'] else 'NOT met'}.", "",
              f"Accuracy ({r['shots']}-shot, synthetic set, each precision's `auto` encoder "
              f"graph), bounds: AUROC within "
              f"{r['bounds']['auroc_points']:g} point of FP32, map Pearson >= "
              f"{r['bounds']['min_pearson']:g}: "
              f"{'held' if r['accuracy_bounds_held'] else 'NOT held'}.", "",
              "| category | image AUROC FP32 / INT8 | pixel AUROC FP32 / INT8 | map Pearson | "
              "within bounds |", "|---|---|---|---|---|"]
    for c, a in r["accuracy"].items():
        i, p = a["image_auroc"], a["pixel_auroc"]
        lines.append(f"| {c} | {i['fp32']:.1f} / {i['int8']:.1f} | {p['fp32']:.1f} / "
                     f"{p['int8']:.1f} | {a['map_pearson']:.4f} | "
                     f"{'yes' if a['within_bounds'] else 'NO'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
