"""Throughput per scoring method (bundles of the same model exported with different --method),
side by side in one process.

    python -m clipinspect.benchmarks.methods BUNDLE_WINCLIP BUNDLE_PATCH --mode few-shot \
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

import numpy as np

from clipinspect.runtime.methods import gflops_per_image, transformer_layers
from clipinspect.runtime.core.names import SCORING_MODES

from .report import machine, write_results
from .sidebyside import end_to_end, interleaved_rounds, synthetic_images


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="+", help="bundles to compare; ratios are to the first")
    ap.add_argument("--mode", default="few-shot", choices=list(SCORING_MODES))
    ap.add_argument("--shots", type=int, default=2, help="reference images for few-shot")
    ap.add_argument("--images", type=int, default=8, help="images per round")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/methods_cpu",
                    help="output path without extension (.json and .md are written)")
    return measure(ap.parse_args(argv))


def measure(args: argparse.Namespace) -> dict:
    import onnxruntime

    from clipinspect.runtime import Bundle, Inspector
    from clipinspect.runtime.methods import describe

    bundles = [Bundle.open(b) for b in args.bundles]
    models = {(b.manifest.model.name, json_key(b.manifest.model.weights.to_dict()))
              for b in bundles}
    if len(models) > 1:
        raise SystemExit("the bundles come from different models or weights; compare methods on "
                         "bundles exported from the same ones")
    labels = [f"{describe(b.manifest)} ({b.root.name})" for b in bundles]
    category = sorted(set.intersection(*(set(b.categories) for b in bundles)))
    if not category:
        raise SystemExit("the bundles share no category; export them with the same --categories")
    category = category[0]
    images, refs = synthetic_images(category, args.images, args.shots)
    inspectors = [Inspector.open(b, "fp32") for b in bundles]
    memories = [insp.build_memory(refs)[0] if args.mode == "few-shot" else None
                for insp in inspectors]

    def run(i: int):
        return end_to_end(inspectors[i], images, args.batch_size, category, args.mode,
                          memories[i])

    for i in range(len(bundles)):  # warm-up
        run(i)
    times, ips = interleaved_rounds(labels, run, args.rounds, args.images)
    rows = [{"bundle": label, "method": b.manifest.method,
             "adaptation": b.manifest.adaptation.to_dict() if b.manifest.adaptation else None,
             "gflops_per_image": gflops_per_image(b.manifest, transformer_layers(b)),
             "seconds_per_round": t, "images_per_second": v, "ratio_to_first": v / ips[0]}
            for label, b, t, v in zip(labels, bundles, times, ips)]
    result = {
        "benchmark": "methods", "model": bundles[0].manifest.model.name,
        "weights": bundles[0].manifest.model.weights.kind, "category": category,
        "mode": args.mode, "shots": args.shots if args.mode == "few-shot" else 0,
        "images_per_round": args.images, "image_size": [256, 256], "batch_size": args.batch_size,
        "rounds": args.rounds, "provider": "cpu", "precision": "fp32",
        "timed": "end to end from decoded RGB: preprocessing, encoder, scoring head, upsampling",
        "rows": rows,
        "versions": {"onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
        "machine": machine(),
    }
    write_results(result, args.out, render)
    return result


def json_key(value: dict) -> str:
    return json.dumps(value, sort_keys=True)


def render(r: dict) -> str:
    lines = [f"# Throughput per method: {r['model']} ({r['weights']} weights), {r['mode']}"
             f"{' ' + str(r['shots']) + '-shot' if r['shots'] else ''}, FP32", "",
             f"Machine: {r['machine']['cpu']}, {r['machine']['logical_cores']} logical cores; "
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
