"""Full WinCLIP throughput per precision (FP32, FP16, INT8), side by side in one process.

    python -m clipinspect.benchmarks.precisions BUNDLE --precisions fp32,fp16,int8 \
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

from clipinspect.runtime.core.names import SCORING_MODES

from .report import machine, write_results
from .sidebyside import bundle_with_precisions, end_to_end, interleaved_rounds, synthetic_images


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--precisions", default="fp32,fp16,int8")
    ap.add_argument("--mode", default="few-shot", choices=list(SCORING_MODES))
    ap.add_argument("--shots", type=int, default=4, help="reference images for few-shot")
    ap.add_argument("--images", type=int, default=8, help="images per round")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/precisions_cpu",
                    help="output path without extension (.json and .md are written)")
    args = ap.parse_args(argv)
    return measure(args)


def measure(args: argparse.Namespace) -> dict:
    import onnxruntime

    from clipinspect.runtime import Inspector

    bundle, precisions = bundle_with_precisions(args.bundle, args.precisions)
    category = bundle.categories[0]
    images, refs = synthetic_images(category, args.images, args.shots)
    inspectors = {p: Inspector.open(bundle, p) for p in precisions}
    memories = {p: (insp.build_memory(refs)[0] if args.mode == "few-shot" else None)
                for p, insp in inspectors.items()}

    def run(i: int):
        p = precisions[i]
        return end_to_end(inspectors[p], images, args.batch_size, category, args.mode,
                          memories[p])

    outputs = {p: run(i) for i, p in enumerate(precisions)}  # also the warm-up
    seconds, rates = interleaved_rounds(precisions, run, args.rounds, args.images)
    times, ips = dict(zip(precisions, seconds)), dict(zip(precisions, rates))
    base = "fp32" if "fp32" in ips else precisions[0]
    ref_scores, ref_maps = outputs[base]
    agreement = {p: {"map_pearson": float(np.corrcoef(ref_maps.ravel(), m.ravel())[0, 1]),
                     "max_image_score_diff": float(np.abs(ref_scores - s).max())}
                 for p, (s, m) in outputs.items()}
    result = {
        "benchmark": "precisions", "bundle": bundle.identity,
        "model": bundle.manifest.model.name,
        "weights": bundle.manifest.model.weights.kind, "category": category,
        "mode": args.mode, "shots": args.shots if args.mode == "few-shot" else 0,
        "images_per_round": args.images, "image_size": [256, 256], "batch_size": args.batch_size,
        "rounds": args.rounds, "provider": "cpu",
        "timed": "end to end from decoded RGB: preprocessing, encoder, scoring head, upsampling",
        "seconds_per_round": times, "images_per_second": ips,
        "ratio_to_fp32": {p: v / ips[base] for p, v in ips.items()},
        "agreement_vs_fp32": agreement,
        "versions": {"onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
        "machine": machine(),
    }
    write_results(result, args.out, render)
    return result


def render(r: dict) -> str:
    lines = [f"# Throughput per precision: {r['model']} ({r['weights']} weights), {r['mode']}"
             f"{' ' + str(r['shots']) + '-shot' if r['shots'] else ''}", "",
             f"Machine: {r['machine']['cpu']}, {r['machine']['logical_cores']} logical cores; "
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
