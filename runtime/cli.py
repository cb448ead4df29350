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

from .core.errors import ClipInspectError, UsageError


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
    p.add_argument("--provider", default="cpu",
                   choices=["cpu", "cuda", "tensorrt", "tensorrt-native"],
                   help="onnxruntime execution provider (default cpu), or tensorrt-native: the "
                        "engines of 'clipinspect build-engine' without onnxruntime")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="images per inference batch")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="onnxruntime intra-op threads (default: one per physical core)")


def _images(items: list[str]):
    from .core.images import expand_inputs
    return expand_inputs(items)


def cmd_predict(args: argparse.Namespace) -> int:
    from .core.inspector import Inspector
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
    from .core.inspector import Inspector

    inspector = Inspector.open(args.bundle, args.precision, args.provider, args.threads)
    shots, failed = inspector.add_references(args.category, _images(args.images), args.batch_size)
    for source, error in failed:
        print(f"clipinspect: skipped {error}", file=sys.stderr)
    print(f"stored {shots}-shot reference memory for {args.category!r} in {args.bundle}")
    return 0 if not failed else 1


def cmd_info(args: argparse.Namespace) -> int:
    from .core.bundle import Bundle
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
    for key, engines in (m.get("engines") or {}).items():
        built = ", ".join(sorted(p for p in engines if p != "device"))
        print(f"engines     {key}: {built or 'none'} (TensorRT; 'clipinspect build-engine')")
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
    import importlib.util

    from .core.backends import available_providers, ort_conflict

    # Only whether the packages are there: importing TensorRT takes seconds.
    native = all(importlib.util.find_spec(m) for m in ("tensorrt", "cupy"))
    print(", ".join(available_providers() + (["tensorrt-native"] if native else [])) or "none")
    conflict = ort_conflict()
    if conflict:
        print(f"WARNING: {conflict}", file=sys.stderr)
    return 0


def cmd_build_engine(args: argparse.Namespace) -> int:
    from .tensorrt.compat import BatchRange
    from .tensorrt.engine import build_engines

    build_engines(args.bundle, args.precision, BatchRange(args.min_batch, args.opt_batch,
                                                          args.max_batch),
                  args.max_shots, args.workspace)
    return 0


def cmd_triton(args: argparse.Namespace) -> int:
    from .triton.repository import write_repository

    out = write_repository(args.bundle, args.out, args.platform, args.precision,
                           args.max_batch, args.overwrite, args.categories_only, args.engine_key)
    if args.categories_only:
        print(f"category files in {out} refreshed; a running server reads them on the next "
              "request")
    else:
        print(f"Triton model repository written to {out}; serve it with "
              f"'tritonserver --model-repository {out}'")
    return 0


def _api_key(path: str | None) -> str | None:
    """The key from --api-key-file or CLIPINSPECT_API_KEY (never the command line: ps shows it)."""
    import os

    if path:
        try:
            key = Path(path).read_text().strip()
        except OSError as e:
            raise UsageError(f"--api-key-file {path!r} cannot be read: {e}") from None
        if not key:
            raise UsageError(f"--api-key-file {path!r} is empty")
        return key
    return os.environ.get("CLIPINSPECT_API_KEY") or None


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serving.server import ServeConfig, serve
    except ImportError as e:
        raise UsageError(f"'serve' needs the serve extra ({e}): pip install "
                         "'clipinspect[serve]'") from None
    config = ServeConfig(args.batch_size, args.max_wait_ms, args.max_queue,
                         int(args.max_body_mb * (1 << 20)), _api_key(args.api_key_file),
                         args.journal)
    serve(args.bundle, args.host, args.port, config, args.precision, args.provider, args.threads)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from .core.inspector import Inspector
    from .serving.journal import Journal, JsonlSink
    from .serving.watch import FolderWatcher, opencv, watch_source

    if (args.input is None) == (args.source is None):
        raise UsageError("give exactly one of --input DIR (hot folder) or --source "
                         "CAMERA|URL|VIDEO")
    if args.input is not None:
        base = Path(args.input)
        if not base.is_dir():
            raise UsageError(f"--input {args.input!r} is not a folder")
    else:
        opencv()  # missing OpenCV: say so before loading the model
        base = Path(".")
    journal_path = Path(args.journal or base / "journal.sqlite")
    out = Path(args.out or base / "results.jsonl")
    inspector = Inspector.open(args.bundle, args.precision, args.provider, args.threads)
    inspector.check(args.category, args.mode)
    journal = Journal(journal_path)
    if args.input is not None:
        origin = f"watch:{base.resolve()}"
        sink = JsonlSink(out, journal, origin)
        done = None if args.keep else Path(args.done or base / "done")
        watcher = FolderWatcher(inspector, base, args.category, journal, sink, done, args.mode,
                                args.batch_size, args.settle)
        print(f"clipinspect watch: {base} -> {out} and {journal_path}; inspected files "
              f"{'stay in place' if done is None else f'move to {done}'}"
              f"{'; until every file present is done' if args.once else '; Ctrl-C to stop'}",
              file=sys.stderr, flush=True)
        watcher.run(args.interval, args.once)
    else:
        sink = JsonlSink(out, journal, f"source:{args.source}")
        n = watch_source(inspector, args.source, args.category, journal, sink, args.mode,
                         args.every, args.max_frames)
        print(f"{n} frame(s) inspected; results in {out} and {journal_path}")
    sink.close()
    journal.close()
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

    p = sub.add_parser("serve", help="HTTP inspection service with micro-batching")
    p.add_argument("bundle")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; any other needs an API key)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key-file", default=None,
                   help="file holding the API key clients send in X-API-Key (or set "
                        "CLIPINSPECT_API_KEY); required unless bound to loopback")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long an idle worker waits for more requests to batch (default 5); "
                        "--batch-size is the most images per batch")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests waiting beyond this get 503 + Retry-After (default 64)")
    p.add_argument("--max-body-mb", type=float, default=32.0,
                   help="largest request body accepted, MiB (default 32)")
    p.add_argument("--journal", default=None, help="SQLite results journal (default: none)")
    add_runtime_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("watch", help="inspect a hot folder (or a camera / stream) as images "
                                     "arrive, exactly once each, into a journal")
    p.add_argument("bundle")
    p.add_argument("--input", default=None, help="hot folder: image files written into it")
    p.add_argument("--source", default=None,
                   help="instead: OpenCV camera index, RTSP/HTTP URL or video file")
    p.add_argument("--category", required=True)
    p.add_argument("--mode", default="auto", choices=["auto", "zero-shot", "few-shot"])
    p.add_argument("--journal", default=None,
                   help="SQLite results journal (default INPUT/journal.sqlite)")
    p.add_argument("--out", default=None, help="JSON lines (default INPUT/results.jsonl)")
    p.add_argument("--done", default=None,
                   help="where inspected files are moved (default INPUT/done)")
    p.add_argument("--keep", action="store_true",
                   help="leave inspected files in place (the journal marks them)")
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds a file must stay unchanged before it is read (default 1)")
    p.add_argument("--interval", type=float, default=0.5, help="polling interval, s")
    p.add_argument("--once", action="store_true",
                   help="stop when every file in the folder is done")
    p.add_argument("--every", type=positive_int, default=1, help="--source: every n-th frame")
    p.add_argument("--max-frames", type=positive_int, default=None,
                   help="--source: stop after this many inspected frames")
    add_runtime_options(p)
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("info", help="describe and verify a bundle")
    p.add_argument("bundle")
    p.add_argument("--json", action="store_true", help="print the manifest")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum verification")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("build-engine", help="build TensorRT engines for this GPU into the bundle")
    p.add_argument("bundle")
    p.add_argument("--precision", required=True, choices=["fp32", "fp16", "int8"],
                   help="which graphs to build from (fp16 / int8: made by 'clipinspect quantize')")
    p.add_argument("--min-batch", type=positive_int, default=1)
    p.add_argument("--opt-batch", type=positive_int, default=8,
                   help="the batch size TensorRT tunes for (default 8)")
    p.add_argument("--max-batch", type=positive_int, default=32)
    p.add_argument("--max-shots", type=positive_int, default=16,
                   help="most reference images the few-shot engine accepts (default 16)")
    p.add_argument("--workspace", type=positive_int, default=2048, metavar="MB",
                   help="TensorRT builder workspace in MB (default 2048)")
    p.set_defaults(func=cmd_build_engine)

    p = sub.add_parser("triton", help="write a Triton Inference Server model repository")
    p.add_argument("bundle")
    p.add_argument("--out", required=True, help="model repository directory to write")
    p.add_argument("--platform", default="onnx", choices=["onnx", "tensorrt", "python"],
                   help="onnx: graphs for Triton's onnxruntime backend (default); tensorrt: the "
                        "engines 'build-engine' made on the serving GPU; python: the graphs run "
                        "by onnxruntime in Triton's Python backend, on the CPU (tests, no GPU)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    p.add_argument("--max-batch", type=positive_int, default=32,
                   help="largest batch the encoder's dynamic batcher forms (default 32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing repository")
    p.add_argument("--categories-only", action="store_true",
                   help="only (re)write the category files of an existing repository (after "
                        "add-category or fewshot); no model is touched")
    p.add_argument("--engine-key", default=None,
                   help="with --platform tensorrt: which device's engines, when the bundle has "
                        "several")
    p.set_defaults(func=cmd_triton)

    p = sub.add_parser("providers", help="list the providers installed (onnxruntime's, and "
                                         "tensorrt-native where TensorRT and cupy are)")
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
