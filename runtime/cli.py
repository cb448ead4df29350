"""The ``clipinspect`` command.

Runtime commands live here. The other subpackages contribute theirs through the
``clipinspect.cli`` entry-point group (each a ``register(subparsers)`` function that imports
nothing heavy), so this module never imports torch, export or calibration by itself.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path

from .errors import ClipInspectError


def csv_list(text: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']."""
    return [t.strip() for t in text.split(",") if t.strip()]


def int_list(minimum: int, example: str):
    """argparse type for comma-separated whole numbers >= minimum (e.g. scales, shot counts)."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in csv_list(text)]
        except ValueError:
            values = []
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated whole numbers "
                                             f">= {minimum}, e.g. {example}")
        return values
    return parse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    return value


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="fp32",
                   help="graph precision: fp32 (default), or fp16 / int8 after 'clipinspect "
                        "quantize'")
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"],
                   help="onnxruntime execution provider (default cpu)")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="images per inference batch")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="onnxruntime intra-op threads (default: one per physical core)")


def _images(items: list[str]):
    from .images import expand_inputs
    return expand_inputs(items)


def cmd_predict(args: argparse.Namespace) -> int:
    from .inspector import Inspector
    from .predict import predict_to_dir

    inspector = Inspector.open(args.bundle, args.precision, args.provider, args.threads)
    images = _images(args.images)
    results = predict_to_dir(inspector, images, args.category, args.out, args.batch_size,
                             args.mode, args.smooth, overlays=not args.no_overlays,
                             save_maps=args.save_maps)
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"clipinspect: skipped {r.error}", file=sys.stderr)
    ok = len(results) - len(failed)
    mode = next((r.mode for r in results if r.ok), "none")
    print(f"{ok} image(s) inspected ({mode}), {len(failed)} failed; "
          f"results in {Path(args.out) / 'results.jsonl'}")
    return 0 if not failed else (2 if ok == 0 else 1)


def cmd_fewshot(args: argparse.Namespace) -> int:
    from .inspector import Inspector

    inspector = Inspector.open(args.bundle, args.precision, args.provider, args.threads)
    shots, failed = inspector.add_references(args.category, _images(args.images), args.batch_size)
    for source, error in failed:
        print(f"clipinspect: skipped {error}", file=sys.stderr)
    print(f"stored {shots}-shot reference memory for {args.category!r} in {args.bundle}")
    return 0 if not failed else 1


def cmd_info(args: argparse.Namespace) -> int:
    from .bundle import Bundle
    from .methods import describe

    bundle = Bundle.open(args.bundle, verify_checksums=not args.no_verify)
    m = bundle.manifest
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    weights = m["model"]["weights"]
    print(f"bundle      {bundle.root} (format {m['format_version']}, {describe(m)})")
    print(f"model       {m['model']['name']}, weights {weights['kind']}"
          f"{': ' + weights.get('tag', '') if weights['kind'] == 'tag' else ''}"
          f"{'  <-- RANDOM WEIGHTS, not for inspection' if weights['kind'] == 'random' else ''}")
    print(f"input       {m['input']['size'][0]}x{m['input']['size'][1]}, grid "
          f"{m['grid'][0]}x{m['grid'][1]}, scales {m['scales']}")
    print(f"precisions  {', '.join(bundle.precisions)}")
    for precision, parity in m.get("parity", {}).items():
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in parity["max_abs_diff"].items())
        print(f"parity      {precision}: {diffs} (tolerance {parity['tolerance']:g})")
    for precision, q in m.get("quantization", {}).items():
        a = q["agreement_vs_fp32"]
        how = ""
        if "calibration" in q:
            kept = q["sensitivity"]["excluded_weights"]
            how = (f"; {q['calibration']['method']} calibration on {q['calibration']['images']} "
                   f"images, {len(kept)} weight(s) kept FP32")
        print(f"parity      {precision} vs fp32: map Pearson {a['map_pearson_min']:.5f}, image "
              f"score diff {a['max_image_score_diff']:.1e} ({a['images']} held-out images{how})")
    for name in bundle.categories:
        entry = m["categories"][name]
        mem = entry.get("memory")
        dropped = entry.get("ambiguity_filter_dropped")
        kept = (f" ({len(dropped['normal'])}+{len(dropped['anomalous'])} dropped as ambiguous)"
                if dropped else "")
        print(f"category    {name}: {entry['n_normal_prompts']}+{entry['n_anomalous_prompts']} "
              f"prompts{kept}{', prompt file' if entry.get('prompt_file') else ''}, "
              f"{mem['shots'] if mem else 0}-shot memory, thresholds "
              f"{entry.get('thresholds') or 'none'}")
    return 0


def cmd_providers(args: argparse.Namespace) -> int:
    from .backends import available_providers, ort_conflict

    print(", ".join(available_providers()) or "none")
    conflict = ort_conflict()
    if conflict:
        print(f"WARNING: {conflict}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipinspect", description="CLIP zero-/few-shot anomaly detection, exported and fast.")
    try:
        version = importlib.metadata.version("clipinspect")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    parser.add_argument("--version", action="version", version=f"clipinspect {version}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("predict", help="inspect images: JSON lines + heat-map overlays")
    p.add_argument("bundle")
    p.add_argument("images", nargs="+", help="image files or directories")
    p.add_argument("--category", required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--mode", default="auto", choices=["auto", "zero-shot", "few-shot"])
    p.add_argument("--smooth", type=float, default=0.0,
                   help="Gaussian smoothing sigma in pixels (default 0: off, as the reference)")
    p.add_argument("--no-overlays", action="store_true")
    p.add_argument("--save-maps", action="store_true", help="also write maps/*.npy")
    add_runtime_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("fewshot", help="store few-shot reference memory from normal images")
    p.add_argument("bundle")
    p.add_argument("images", nargs="+", help="normal images or directories of them")
    p.add_argument("--category", required=True)
    add_runtime_options(p)
    p.set_defaults(func=cmd_fewshot)

    p = sub.add_parser("info", help="describe and verify a bundle")
    p.add_argument("bundle")
    p.add_argument("--json", action="store_true", help="print the manifest")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum verification")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("providers", help="list the onnxruntime providers installed")
    p.set_defaults(func=cmd_providers)

    for ep in sorted(importlib.metadata.entry_points(group="clipinspect.cli"), key=lambda e: e.name):
        try:
            ep.load()(sub)
        except ImportError as e:  # a subpackage missing from this installation
            print(f"clipinspect: '{ep.name}' commands unavailable: {e}", file=sys.stderr)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ClipInspectError as e:
        print(f"clipinspect: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clipinspect: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
