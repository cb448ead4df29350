"""``clipinspect synth`` (more calibration commands come with the precision work)."""

from __future__ import annotations

import argparse

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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic defect dataset in MVTec AD layout")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--categories", default="", help="comma-separated (default: all)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--train", type=int, default=8, help="normal training images per category")
    p.add_argument("--test-good", type=int, default=6, help="normal test images per category")
    p.add_argument("--test-defect", type=int, default=3, help="test images per defect type")
    p.set_defaults(func=cmd_synth)
