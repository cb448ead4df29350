"""``clipinspect synth``, ``eval`` and ``threshold``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipinspect.runtime.cli.options import (ORT_PROVIDERS, add_batch_size, add_bundle,
                                             add_categories, add_category, add_dataset_format,
                                             add_max_megapixels, add_mode, add_precision,
                                             add_provider, add_threads, csv_list,
                                             deprecated_alias, int_list, non_negative_int,
                                             positive_int, whole_number)
from clipinspect.runtime.core.names import QUANTIZED_PRECISIONS
from clipinspect.runtime.core.progress import Progress


def cmd_synth(args: argparse.Namespace) -> int:
    from .synth import CATEGORIES, generate

    categories = args.categories or list(CATEGORIES)
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
    from .evaluate import EvalOptions, evaluate, plot_note

    options = EvalOptions(fmt=args.format, categories=args.categories or None,
                          precisions=csv_list(args.precisions), shots=args.shots,
                          batch_size=args.batch_size, pixel_size=args.pixel_size,
                          provider=args.provider, resume=not args.no_resume,
                          threads=args.threads, pool_size=args.pool_size)
    report = evaluate(args.bundle, args.data, args.out, options)
    for p, why in report["skipped_precisions"].items():
        print(f"clipinspect: {p} skipped: {why}", file=sys.stderr)
    skips = {n for r in report["categories"].values() for n in r.get("notes", [])
             if "-shot skipped" in n}
    for note in sorted(skips):
        print(f"clipinspect: {note}", file=sys.stderr)
    failed = [c for c, r in report["categories"].items() if "error" in r]
    for c in failed:
        print(f"clipinspect: category {c!r} failed: {report['categories'][c]['error']}",
              file=sys.stderr)
    note = plot_note("report.png", report["plot_drawn"])
    if note:
        print(f"clipinspect: {note}", file=sys.stderr)
    also = "report.json" + ("" if note else ", report.png")
    print(f"report: {Path(args.out) / 'report.md'} (also {also})")
    return 1 if failed else 0


def cmd_threshold(args: argparse.Namespace) -> int:
    from clipinspect.runtime import Inspector
    from clipinspect.runtime.core.images import expand_input_paths

    from .thresholds import calibrate, describe, references_among, references_warning

    inspector = Inspector.open(args.bundle, args.precision, args.provider, args.threads,
                               batch_size=args.batch_size)
    inspector.bundle.entry(args.category)  # the bundle, the category, then the inputs
    normal = expand_input_paths(args.normal) if args.normal else None
    if normal and args.mode != "zero-shot":
        found = references_among(inspector.bundle, args.category, normal)
        if found:
            print(f"clipinspect: {references_warning(args.category, found)}", file=sys.stderr)
    key, t = calibrate(inspector, args.category, normal=normal, fpr=args.fpr,
                       validation=args.validation, fmt=args.format, mode=args.mode,
                       batch_size=args.batch_size)
    print(describe(args.category, key, t))
    print(f"stored in {args.bundle}; 'clipinspect predict' now reports is_anomalous and masks")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from clipinspect.runtime.core.manifest import Quantization, parse

    from .quantize import quantize_bundle

    record = parse(Quantization, quantize_bundle(
        args.bundle, args.precision, args.calibration, method=args.calibration_method,
        target=args.target, holdout=args.holdout, max_images=args.max_images,
        sensitivity=args.sensitivity, overwrite=args.overwrite, threads=args.threads,
        attention_products=args.attention_products, weight_range=args.weight_range),
        "quantize", f"quantization.{args.precision}")
    a = record.agreement
    print(f"{args.precision}: map Pearson vs FP32 {a.map_pearson_min:.5f} (worst category/mode "
          f"on {a.images} held-out image(s)), largest image score difference "
          f"{a.max_image_score_diff:.2e}")
    excluded = record.sensitivity.excluded_weights if record.sensitivity else []
    if excluded:
        print(f"kept in FP32 by the sensitivity pass: {', '.join(excluded)}")
    print(f"compare accuracy and speed: clipinspect eval {args.bundle} --data ROOT "
          f"--precisions fp32,{args.precision}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    _register_quantize(sub)
    _register_eval(sub)
    _register_threshold(sub)
    _register_synth(sub)


def _register_quantize(sub: argparse._SubParsersAction) -> None:
    from .quantize import (DEFAULT_HOLDOUT, DEFAULT_MAX_IMAGES, DEFAULT_TARGET, METHODS,
                           POOL_HOLDOUT)

    p = sub.add_parser("quantize", help="add FP16 or INT8 graphs to a bundle, checked against FP32")
    add_bundle(p)
    add_precision(p, default=None, choices=QUANTIZED_PRECISIONS)
    p.add_argument("--calibration", help="normal images of the line (a folder, searched "
                   "recursively, or an MVTec AD / VisA root whose train images are used); "
                   "required for int8, optional for fp16 (else synthetic probe images)")
    p.add_argument("--calibration-method", default="minmax", choices=list(METHODS),
                   help="activation calibration (default minmax)")
    # The old spelling; --method is the scoring method in 'export'.
    p.add_argument("--method", dest="calibration_method", choices=list(METHODS),
                   action=deprecated_alias("--calibration-method"), default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    p.add_argument("--target", type=float, default=DEFAULT_TARGET,
                   help=f"map Pearson vs FP32 the INT8 graph must reach on held-out images; the "
                   f"sensitivity pass keeps weights in FP32 until it does (default "
                   f"{DEFAULT_TARGET})")
    p.add_argument("--holdout", type=positive_int, default=None,
                   help=f"images held out of calibration to check the maps (default "
                   f"{DEFAULT_HOLDOUT}; {POOL_HOLDOUT} for musc, whose images score each other)")
    p.add_argument("--max-images", type=positive_int, default=DEFAULT_MAX_IMAGES,
                   help=f"calibration images used at most (default {DEFAULT_MAX_IMAGES})")
    p.add_argument("--sensitivity", default="auto", choices=["auto", "always", "off"],
                   help="auto: only when the fully quantized graph misses --target")
    add_threads(p)
    p.add_argument("--attention-products", action="store_true",
                   help="INT8: also quantize the attention products (QK^T, attention x V); "
                        "measured about 1.2x on the CPU encoder, see docs/precision.md")
    p.add_argument("--weight-range", default="auto", choices=["auto", "full", "reduced"],
                   help="INT8 weights: full [-127, 127], reduced [-63, 63] (no INT8 kernel can "
                        "clip their products), or auto (default): reduced where this CPU's "
                        "onnxruntime kernels clip full-range products (x86 without VNNI)")
    p.add_argument("--overwrite", action="store_true", help="replace existing graphs of this "
                   "precision")
    p.set_defaults(func=cmd_quantize)


def _register_eval(sub: argparse._SubParsersAction) -> None:
    from .evaluate import MIN_POOL

    p = sub.add_parser("eval", help="accuracy, FP32 agreement and speed on MVTec AD / VisA data")
    add_bundle(p)
    p.add_argument("--data", required=True, help="dataset root (MVTec AD or VisA layout)")
    add_dataset_format(p)
    add_categories(p, "categories to evaluate (default: all in the data)")
    p.add_argument("--precisions", default="fp32", help="comma-separated, e.g. fp32,fp16,int8")
    p.add_argument("--shots", type=int_list(0, "0,1,2,4"), default=[0], help="reference shots, e.g. 0,1,2,4")
    p.add_argument("--out", required=True, help="report directory")
    add_batch_size(p)
    p.add_argument("--pixel-size", type=positive_int, default=256,
                   help="resolution of the pixel metrics (default 256)")
    p.add_argument("--pool-size", type=whole_number(MIN_POOL), default=None,
                   help=f"musc zero-shot: score each category's test set in consecutive pools "
                        f"of at most this many images (>= {MIN_POOL}; a smaller last one joins "
                        "the one before); default: the whole test set is one pool")
    add_provider(p, choices=ORT_PROVIDERS)
    add_threads(p)
    add_max_megapixels(p)
    p.add_argument("--no-resume", action="store_true",
                   help="recompute categories already in the report directory")
    p.set_defaults(func=cmd_eval)


def _register_threshold(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("threshold", help="set a category's image and pixel decision thresholds")
    add_bundle(p)
    add_category(p)
    p.add_argument("--normal", nargs="+", help="normal images or directories (with --fpr)")
    p.add_argument("--fpr", type=float, default=0.01,
                   help="target false-positive rate on normal parts (default 0.01)")
    p.add_argument("--validation", help="annotated dataset root whose test split sets F1-max "
                                        "thresholds")
    add_dataset_format(p)
    add_mode(p)
    add_precision(p)
    add_provider(p, choices=ORT_PROVIDERS)
    add_batch_size(p)
    add_threads(p)
    add_max_megapixels(p)
    p.set_defaults(func=cmd_threshold)


def _register_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic defect dataset in MVTec AD layout")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=non_negative_int, default=0)
    add_categories(p, "categories to generate (default: weave,grain,washer,pill; also tile,gear, "
                      "e.g. for a second dataset with disjoint categories)")
    p.add_argument("--size", type=whole_number(32), default=256,
                   help="image side in pixels (>= 32, default 256)")
    p.add_argument("--train", type=positive_int, default=8,
                   help="normal training images per category")
    p.add_argument("--test-good", type=positive_int, default=6,
                   help="normal test images per category")
    p.add_argument("--test-defect", type=positive_int, default=3,
                   help="test images per defect type")
    p.set_defaults(func=cmd_synth)
