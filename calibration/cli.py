"""``clipinspect synth``, ``eval`` and ``threshold``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipinspect.runtime.cli import csv_list, int_list, positive_int
from clipinspect.runtime.progress import Progress


def cmd_synth(args: argparse.Namespace) -> int:
    from .synth import CATEGORIES, generate

    categories = [c.strip() for c in args.categories.split(",") if c.strip()] or list(CATEGORIES)
    with Progress(0, "synth") as bar:
        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.done)

        summary = generate(args.out, seed=args.seed, categories=categories,
                           image_size=args.size, n_train=args.train, n_test_good=args.test_good,
                           n_test_defect_per_type=args.test_defect, progress=advance)
    for name, counts in summary.items():
        defects = sum(counts["test_defect"].values())
        print(f"{name}: {counts['train']} train, {counts['test_good']} good + {defects} defective test")
    print(f"synthetic dataset (MVTec AD layout) written to {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    report = evaluate(args.bundle, args.data, args.out, args.format,
                      csv_list(args.categories) or None, csv_list(args.precisions), args.shots,
                      args.batch_size, args.pixel_size, args.provider, resume=not args.no_resume)
    for p, why in report["skipped_precisions"].items():
        print(f"clipinspect: {p} skipped: {why}", file=sys.stderr)
    failed = [c for c, r in report["categories"].items() if "error" in r]
    for c in failed:
        print(f"clipinspect: category {c!r} failed: {report['categories'][c]['error']}",
              file=sys.stderr)
    print(f"report: {Path(args.out) / 'report.md'} (also report.json, report.png)")
    return 1 if failed else 0


def cmd_threshold(args: argparse.Namespace) -> int:
    from clipinspect.runtime import Inspector
    from clipinspect.runtime.images import expand_inputs

    from .thresholds import calibrate, describe

    inspector = Inspector.open(args.bundle, args.precision, args.provider)
    normal = expand_inputs(args.normal) if args.normal else None
    key, t = calibrate(inspector, args.category, normal, args.fpr, args.validation, args.format,
                       args.mode, args.batch_size)
    print(describe(args.category, key, t))
    print(f"stored in {args.bundle}; 'clipinspect predict' now reports is_anomalous and masks")
    return 0


def register(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser("eval", help="accuracy, FP32 agreement and speed on MVTec AD / VisA data")
    p.add_argument("bundle")
    p.add_argument("--data", required=True, help="dataset root (MVTec AD or VisA layout)")
    p.add_argument("--format", default="auto", choices=["auto", "mvtec", "visa"])
    p.add_argument("--categories", default="", help="comma-separated (default: all in the data)")
    p.add_argument("--precisions", default="fp32", help="comma-separated, e.g. fp32,fp16,int8")
    p.add_argument("--shots", type=int_list(0, "0,1,2,4"), default=[0], help="reference shots, e.g. 0,1,2,4")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--pixel-size", type=positive_int, default=256,
                   help="resolution of the pixel metrics (default 256)")
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"])
    p.add_argument("--no-resume", action="store_true",
                   help="recompute categories already in the report directory")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("threshold", help="set a category's image and pixel decision thresholds")
    p.add_argument("bundle")
    p.add_argument("--category", required=True)
    p.add_argument("--normal", nargs="+", help="normal images or directories (with --fpr)")
    p.add_argument("--fpr", type=float, default=0.01,
                   help="target false-positive rate on normal parts (default 0.01)")
    p.add_argument("--validation", help="annotated dataset root whose test split sets F1-max "
                                        "thresholds")
    p.add_argument("--format", default="auto", choices=["auto", "mvtec", "visa"])
    p.add_argument("--mode", default="auto", choices=["auto", "zero-shot", "few-shot"])
    p.add_argument("--precision", default="fp32")
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"])
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.set_defaults(func=cmd_threshold)


    p = sub.add_parser("synth", help="write a synthetic defect dataset in MVTec AD layout")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--categories", default="", help="comma-separated (default: all)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--train", type=int, default=8, help="normal training images per category")
    p.add_argument("--test-good", type=int, default=6, help="normal test images per category")
    p.add_argument("--test-defect", type=int, default=3, help="test images per defect type")
    p.set_defaults(func=cmd_synth)
