"""Throughput per scoring method (bundles of the same model exported with different --method),
side by side in one process.

    python benchmarks/experiments/methods.py BUNDLE_WINCLIP BUNDLE_PATCH --mode few-shot \
        --out benchmarks/results/methods_cpu

Every bundle inspects the same decoded synthetic images end to end (preprocessing, encoder,
scoring head, upsampling to the image size), FP32, onnxruntime CPU; rounds cycle through the
bundles so that machine noise hits all alike. Reports the median images/s per bundle, its ratio
to the first bundle, and each method's matrix-product GFLOPs per image from the cost model
(``clipinspect.runtime.methods.gflops_per_image``).
"""

from __future__ import annotations

import argparse
import json

from clipinspect.benchmarks.harness import (IMAGE_SIZE, end_to_end_rounds, finish, parser,
                                            synthetic_images)
from clipinspect.benchmarks.report import machine_text
from clipinspect.runtime.core.names import FEW_SHOT, SCORING_MODES
from clipinspect.runtime.methods import gflops_per_image, transformer_layers


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = parser(__doc__, out="benchmarks/results/methods_cpu", rounds=5)
    ap.add_argument("bundles", nargs="+", help="bundles to compare; ratios are to the first")
    ap.add_argument("--mode", default=FEW_SHOT, choices=list(SCORING_MODES))
    ap.add_argument("--shots", type=int, default=2, help="reference images for few-shot")
    ap.add_argument("--images", type=int, default=8, help="images per round")
    ap.add_argument("--batch-size", type=int, default=8)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    return measure(parse(argv), argv)


def shared_category(bundles) -> str:
    """The first category every bundle has; exits where the bundles cannot be compared."""
    models = {(b.manifest.model.name, json.dumps(b.manifest.model.weights.to_dict(),
                                                 sort_keys=True)) for b in bundles}
    if len(models) > 1:
        raise SystemExit("the bundles come from different models or weights; compare methods on "
                         "bundles exported from the same ones")
    shared = sorted(set.intersection(*(set(b.categories) for b in bundles)))
    if not shared:
        raise SystemExit("the bundles share no category; export them with the same --categories")
    return shared[0]


def measure(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    from clipinspect.runtime import Bundle, Inspector
    from clipinspect.runtime.methods import describe

    bundles = [Bundle.open(b) for b in args.bundles]
    category = shared_category(bundles)
    labels = [f"{describe(b.manifest)} ({b.root.name})" for b in bundles]
    _, times, ips = end_to_end_rounds(
        [Inspector.open(b, "fp32") for b in bundles], labels,
        synthetic_images(category, args.images, args.shots), category=category, mode=args.mode,
        batch_size=args.batch_size, rounds=args.rounds)
    rows = [{"bundle": label, "method": b.manifest.method,
             "adaptation": b.manifest.adaptation.to_dict() if b.manifest.adaptation else None,
             "gflops_per_image": gflops_per_image(b.manifest, transformer_layers(b)),
             "seconds_per_round": t, "images_per_second": v, "ratio_to_first": v / ips[0]}
            for label, b, t, v in zip(labels, bundles, times, ips)]
    result = {
        "benchmark": "methods", "model": bundles[0].manifest.model.name,
        "weights": bundles[0].manifest.model.weights.kind, "category": category,
        "mode": args.mode, "shots": args.shots if args.mode == FEW_SHOT else 0,
        "images_per_round": args.images, "image_size": [IMAGE_SIZE, IMAGE_SIZE],
        "batch_size": args.batch_size, "rounds": args.rounds, "provider": "cpu",
        "precision": "fp32",
        "timed": "end to end from decoded RGB: preprocessing, encoder, scoring head, upsampling",
        "rows": rows,
    }
    return finish(result, args.out, render, script=__file__, argv=argv,
                  placeholders={b: Bundle.open(b).root.name for b in args.bundles})


def render(r: dict) -> str:
    lines = [f"# Throughput per method: {r['model']} ({r['weights']} weights), {r['mode']}"
             f"{' ' + str(r['shots']) + '-shot' if r['shots'] else ''}, FP32", "",
             f"Command: `{r['command']}`", "",
             f"Machine: {machine_text(r['machine'])}; "
             f"onnxruntime {r['versions']['onnxruntime']}, provider {r['provider']}. "
             f"{r['images_per_round']} images of {r['image_size'][0]}x{r['image_size'][1]} per "
             f"round, batch {r['batch_size']}, median of {r['rounds']} rounds cycling through "
             f"the bundles; timed {r['timed']}.", "",
             "| method (bundle) | GFLOPs per image (cost model) | images/s | ratio to first |",
             "|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['bundle']} | {row['gflops_per_image']:.1f} | "
                     f"{row['images_per_second']:.3f} | {row['ratio_to_first']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
