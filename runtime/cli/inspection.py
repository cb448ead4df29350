"""``clipinspect predict``, ``fewshot``, ``serve`` and ``watch``: commands that inspect images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.errors import UsageError
from .options import (add_bundle, add_category, add_mode, add_runtime_options, positive_int,
                      whole_number)


def _images(items: list[str]):
    from ..core.images import expand_input_paths
    return expand_input_paths(items)


def cmd_predict(args: argparse.Namespace) -> int:
    from ..core.inspector import Inspector
    from ..predict import predict_to_dir

    inspector = Inspector.open(args.bundle, args.precision, args.provider, args.threads,
                               batch_size=args.batch_size, attention=args.attention)
    inspector.bundle.entry(args.category)  # the bundle, the category, then the inputs
    images = _images(args.images)
    results = predict_to_dir(inspector, images, args.category, args.out, args.batch_size,
                             mode=args.mode, smoothing_sigma=args.smooth,
                             overlays=not args.no_overlays, save_maps=args.save_maps)
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"clipinspect: skipped: {r.error}", file=sys.stderr)
    if not args.no_overlays and not (Path(args.out) / "colour_bar.png").exists():
        print(f"note: {args.category!r} has no pixel threshold, so each overlay is coloured by "
              "its own range and hot spots do not compare across images; set thresholds with "
              "'clipinspect threshold' for one shared scale", file=sys.stderr)
    ok = len(results) - len(failed)
    mode = next((r.mode for r in results if r.ok), "none")
    print(f"{ok} image(s) inspected ({mode}), {len(failed)} failed; "
          f"results in {Path(args.out) / 'results.jsonl'}")
    return 0 if not failed else (2 if ok == 0 else 1)


def cmd_fewshot(args: argparse.Namespace) -> int:
    from ..core.inspector import Inspector

    inspector = Inspector.open(args.bundle, args.precision, args.provider, args.threads,
                               batch_size=args.batch_size, attention=args.attention)
    inspector.bundle.entry(args.category)  # the bundle, the category, then the inputs
    shots, failed = inspector.add_references(args.category, _images(args.images), args.batch_size)
    for source, error in failed:
        print(f"clipinspect: skipped: {error}", file=sys.stderr)
    print(f"stored {shots}-shot reference memory for {args.category!r} in {args.bundle}")
    return 0 if not failed else 1


MAX_API_KEY_FILE = 4096  # bytes: a key, not a document


def _api_key(path: str | None) -> str | None:
    """The key from --api-key-file or CLIPINSPECT_API_KEY (never the command line: ps shows it)."""
    import os

    if path:
        try:
            if not Path(path).is_file():  # a FIFO would block, a device never end
                raise UsageError(f"--api-key-file {path!r} is not a regular file; write the key "
                                 "into a file")
            with open(path, "rb") as f:
                data = f.read(MAX_API_KEY_FILE + 1)
        except OSError as e:
            raise UsageError(f"--api-key-file {path!r} cannot be read: {e}") from None
        if len(data) > MAX_API_KEY_FILE:
            raise UsageError(f"--api-key-file {path!r} is larger than {MAX_API_KEY_FILE} bytes; "
                             "it must hold only the key")
        try:
            key = data.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise UsageError(f"--api-key-file {path!r} is not UTF-8 text (byte {e.start}: "
                             f"{data[e.start:e.start + 1]!r}); write the key as text") from None
        if not key:
            raise UsageError(f"--api-key-file {path!r} is empty")
        return key
    return os.environ.get("CLIPINSPECT_API_KEY") or None


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from ..serving.server import ServeConfig, serve
    except ImportError as e:
        raise UsageError(f"'serve' needs the serve extra ({e}): pip install "
                         "'clipinspect[serve]'") from None
    config = ServeConfig(args.batch_size, args.max_wait_ms, args.max_queue,
                         int(args.max_body_mb * (1 << 20)), _api_key(args.api_key_file),
                         args.journal, max_map_side=args.max_map_side,
                         body_timeout_s=args.body_timeout, max_connections=args.max_connections,
                         max_connections_per_client=args.max_connections_per_client,
                         header_timeout_s=args.header_timeout,
                         inference_timeout_s=args.inference_timeout,
                         feedback_results=args.feedback_results, memory_max=args.memory_max,
                         threshold_policy=args.threshold_policy,
                         drift_reference=args.drift_reference, drift_window=args.drift_window)
    serve(args.bundle, args.host, args.port, config, precision=args.precision,
          provider=args.provider, threads=args.threads, attention=args.attention,
          shadow=args.shadow)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from ..core.inspector import Inspector
    from ..serving.journal import Journal, JsonlSink
    from ..serving.watch import FolderWatcher, opencv, watch_source

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
    inspector = Inspector.open(args.bundle, args.precision, args.provider, args.threads,
                               batch_size=args.batch_size, attention=args.attention)
    inspector.check(args.category, args.mode)
    journal = Journal(journal_path)
    if args.input is not None:
        origin = f"watch:{base.resolve()}"
        sink = JsonlSink(out, journal, origin)
        done = None if args.keep else Path(args.done or base / "done")
        watcher = FolderWatcher(inspector, base, args.category, journal, sink, done,
                                mode=args.mode, batch_size=args.batch_size, settle=args.settle)
        print(f"clipinspect watch: {base} -> {out} and {journal_path}; inspected files "
              f"{'stay in place' if done is None else f'move to {done}'}"
              f"{'; until every file present is done' if args.once else '; Ctrl-C to stop'}",
              file=sys.stderr, flush=True)
        watcher.run(args.interval, args.once)
    else:
        sink = JsonlSink(out, journal, f"source:{args.source}")
        n = watch_source(inspector, args.source, args.category, journal, sink, mode=args.mode,
                         every=args.every, max_frames=args.max_frames)
        print(f"{n} frame(s) inspected; results in {out} and {journal_path}")
    sink.close()
    journal.close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="inspect images: JSON lines + heat-map overlays")
    add_bundle(p)
    p.add_argument("images", nargs="+", help="image files or directories")
    add_category(p)
    p.add_argument("--out", required=True, help="output directory")
    add_mode(p)
    p.add_argument("--smooth", type=float, default=0.0,
                   help="Gaussian smoothing sigma in pixels (default 0: off, as the reference)")
    p.add_argument("--no-overlays", action="store_true")
    p.add_argument("--save-maps", action="store_true", help="also write maps/*.npy")
    add_runtime_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("fewshot", help="store few-shot reference memory from normal images")
    add_bundle(p)
    p.add_argument("images", nargs="+", help="normal images or directories of them")
    add_category(p)
    add_runtime_options(p)
    p.set_defaults(func=cmd_fewshot)
    _register_serve(sub)
    _register_watch(sub)


def _register_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="HTTP inspection service with micro-batching")
    add_bundle(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; any other needs an API key)")
    p.add_argument("--port", type=whole_number(0), default=8080,
                   help="TCP port (default 8080; 0: any free port)")
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
    p.add_argument("--max-map-side", type=positive_int, default=1024,
                   help="longest side of the heat map returned, pixels (default 1024)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request body may take to arrive, else 408 (default 30)")
    p.add_argument("--max-connections", type=positive_int, default=256,
                   help="open connections; beyond, the one idle longest is closed, or 503 when "
                        "all are inside a request (default 256)")
    p.add_argument("--max-connections-per-client", type=positive_int, default=32,
                   help="open connections of one client address; more get 503 (default 32)")
    p.add_argument("--header-timeout", type=float, default=5.0,
                   help="seconds a connection may take to send a request head, from connecting "
                        "or from the previous answer; else it is closed (default 5)")
    p.add_argument("--inference-timeout", type=float, default=60.0,
                   help="seconds without inference progress, with requests waiting, after which "
                        "/readyz answers 503 (default 60)")
    p.add_argument("--shadow", default=None, metavar="BUNDLE",
                   help="a candidate bundle that scores the same traffic off the critical path "
                        "(GET /v1/shadow; 'clipinspect promote URL' swaps the two)")
    p.add_argument("--feedback-results", type=whole_number(0), default=64,
                   help="recent results whose images are kept for operator feedback "
                        "(default 64; 0: none)")
    p.add_argument("--memory-max", type=positive_int, default=32,
                   help="most few-shot reference images; when full the oldest added by "
                        "feedback leaves (default 32)")
    p.add_argument("--threshold-policy", default="keep", choices=("keep", "refit"),
                   help="after a false alarm joins the memory: keep the thresholds (default) "
                        "or refit them from their normal images")
    p.add_argument("--drift-reference", type=positive_int, default=200,
                   help="parts judged OK that form the drift watch's reference (default 200)")
    p.add_argument("--drift-window", type=positive_int, default=100,
                   help="recent parts the drift watch tests against it (default 100)")
    add_runtime_options(p)
    p.set_defaults(func=cmd_serve)


def _register_watch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("watch", help="inspect a hot folder (or a camera / stream) as images "
                                     "arrive, exactly once each, into a journal")
    add_bundle(p)
    p.add_argument("--input", default=None, help="hot folder: image files written into it")
    p.add_argument("--source", default=None,
                   help="instead: OpenCV camera index, RTSP/HTTP URL or video file")
    add_category(p)
    add_mode(p)
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
