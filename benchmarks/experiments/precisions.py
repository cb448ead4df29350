"""Full WinCLIP throughput per precision (FP32, FP16, INT8), side by side in one process.

    python benchmarks/experiments/precisions.py BUNDLE --precisions fp32,fp16,int8 \
        --out benchmarks/results/precisions_cpu

The bundle needs the precision variants (``clipinspect quantize``). Every precision inspects the
same decoded synthetic images end to end (preprocessing, encoder, scoring head, upsampling to
the image size) in the chosen mode; rounds cycle through the precisions so that machine noise
hits all alike. Reports the median images/s per precision and its ratio to FP32, and how far
each precision's scores and maps are from FP32's on these images.
"""

from __future__ import annotations

import argparse

import numpy as np

from clipinspect.benchmarks.harness import (IMAGE_SIZE, bundle_with_precisions,
                                            end_to_end_rounds, finish, parser, synthetic_images)
from clipinspect.benchmarks.report import machine_text
from clipinspect.benchmarks.stats import ratios
from clipinspect.runtime.core.names import FEW_SHOT, SCORING_MODES


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = parser(__doc__, out="benchmarks/results/precisions_cpu", rounds=5)
    ap.add_argument("bundle")
    ap.add_argument("--precisions", default="fp32,fp16,int8")
    ap.add_argument("--mode", default=FEW_SHOT, choices=list(SCORING_MODES))
    ap.add_argument("--shots", type=int, default=4, help="reference images for few-shot")
    ap.add_argument("--images", type=int, default=8, help="images per round")
    ap.add_argument("--batch-size", type=int, default=8)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    return measure(parse(argv), argv)


def measure(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    from clipinspect.runtime import Inspector

    bundle, precisions = bundle_with_precisions(args.bundle, args.precisions)
    category = bundle.categories[0]
    outputs, seconds, rates = end_to_end_rounds(
        [Inspector.open(bundle, p) for p in precisions], precisions,
        synthetic_images(category, args.images, args.shots), category=category, mode=args.mode,
        batch_size=args.batch_size, rounds=args.rounds)
    outputs, ips = dict(zip(precisions, outputs)), dict(zip(precisions, rates))
    base = "fp32" if "fp32" in ips else precisions[0]
    ref_scores, ref_maps = outputs[base]
    agreement = {p: {"map_pearson": float(np.corrcoef(ref_maps.ravel(), m.ravel())[0, 1]),
                     "max_image_score_diff": float(np.abs(ref_scores - s).max())}
                 for p, (s, m) in outputs.items()}
    result = {
        "benchmark": "precisions", "bundle": bundle.identity,
        "model": bundle.manifest.model.name,
        "weights": bundle.manifest.model.weights.kind, "category": category,
        "mode": args.mode, "shots": args.shots if args.mode == FEW_SHOT else 0,
        "images_per_round": args.images, "image_size": [IMAGE_SIZE, IMAGE_SIZE],
        "batch_size": args.batch_size, "rounds": args.rounds, "provider": "cpu",
        "timed": "end to end from decoded RGB: preprocessing, encoder, scoring head, upsampling",
        "seconds_per_round": dict(zip(precisions, seconds)), "images_per_second": ips,
        "ratio_to_fp32": ratios(ips, base), "agreement_vs_fp32": agreement,
    }
    return finish(result, args.out, render, script=__file__, argv=argv,
                  placeholders={args.bundle: "BUNDLE"})


def render(r: dict) -> str:
    lines = [f"# Throughput per precision: {r['model']} ({r['weights']} weights), {r['mode']}"
             f"{' ' + str(r['shots']) + '-shot' if r['shots'] else ''}", "",
             f"Command: `{r['command']}`", "",
             f"Machine: {machine_text(r['machine'])}; "
             f"onnxruntime {r['versions']['onnxruntime']}, provider {r['provider']}. "
             f"{r['images_per_round']} images of {r['image_size'][0]}x{r['image_size'][1]} per "
             f"round, batch {r['batch_size']}, median of {r['rounds']} rounds cycling through "
             f"the precisions; timed {r['timed']}.", "",
             "| precision | images/s | ratio to FP32 | map Pearson vs FP32 "
             "| max image score diff |",
             "|---|---|---|---|---|"]
    for p, v in r["images_per_second"].items():
        a = r["agreement_vs_fp32"][p]
        lines.append(f"| {p} | {v:.3f} | {r['ratio_to_fp32'][p]:.2f}x | {a['map_pearson']:.5f} | "
                     f"{a['max_image_score_diff']:.2e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
