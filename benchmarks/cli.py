"""``clipinspect bench``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipinspect.runtime.cli.options import (add_attention, add_bundle, add_threads, csv_list,
                                             int_list, non_negative_int, positive_int)


def cmd_bench(args: argparse.Namespace) -> int:
    from clipinspect.calibration.evaluate import plot_note

    from .bench import BenchOptions, run_bench

    options = BenchOptions(backends=csv_list(args.backends), precisions=csv_list(args.precisions),
                           modes=csv_list(args.modes), batches=args.batch_sizes, shots=args.shots,
                           runs=args.runs, warmup=args.warmup, images=args.images,
                           baseline=not args.no_baseline, stream_fps=args.stream_fps,
                           stream_frames=args.stream_frames,
                           stream_deadline_ms=args.deadline_ms, threads=args.threads,
                           rss_megapixels=args.rss_megapixels, attention=args.attention)
    result = run_bench(args.bundle, args.out, options)
    for s in result["skipped"]:
        print(f"skipped: {s['what']}: {s['reason']}")
    note = plot_note("bench.png", result["plot_drawn"])
    if note:
        print(f"clipinspect: {note}", file=sys.stderr)
    also = "bench.json" + ("" if note else ", bench.png")
    print(f"results: {Path(args.out) / 'bench.md'} (also {also})")
    return 0


def _megapixel_list(text: str) -> list[float]:
    if text.strip().lower() == "none":
        return []
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected megapixels > 0 separated by "
                                         "commas, e.g. 1,12,64, or 'none'")
    return values


def cmd_loadtest(args: argparse.Namespace) -> int:
    from .loadtest import cmd_loadtest as run

    return run(args)


def register(sub: argparse._SubParsersAction) -> None:
    from .bench import DEFAULT_BATCHES
    from .loadtest import add_arguments as loadtest_arguments
    from .study.cli import add_arguments as study_arguments
    from .study.cli import cmd_study

    p = sub.add_parser("study", help="methods x prompts x shots x precisions on the same data: "
                                     "one report (accuracy, speed, cost, memory)")
    study_arguments(p)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("loadtest", help="loopback load test of 'clipinspect serve': clients, "
                                        "throughput, latency, scores checked against offline")
    loadtest_arguments(p)
    p.set_defaults(func=cmd_loadtest)

    p = sub.add_parser("bench", help="latency and throughput per backend, precision, mode and "
                                     "batch size, with the PyTorch baseline in the same run")
    add_bundle(p)
    p.add_argument("--out", required=True, help="directory for bench.json, bench.md, bench.png")
    p.add_argument("--backends", default="cpu", help="comma-separated: cpu,cuda,tensorrt")
    p.add_argument("--precisions", default="fp32", help="comma-separated: fp32,fp16,int8")
    p.add_argument("--modes", default="few-shot", help="comma-separated: zero-shot,few-shot")
    p.add_argument("--batch-sizes", type=int_list(1, ",".join(map(str, DEFAULT_BATCHES))),
                   default=list(DEFAULT_BATCHES),
                   help="default 1,2,4,8,16,32 (stops cleanly at out-of-memory)")
    p.add_argument("--shots", type=positive_int, default=4, help="references for few-shot")
    p.add_argument("--runs", type=positive_int, default=5, help="timed runs per configuration")
    p.add_argument("--warmup", type=non_negative_int, default=1,
                   help="untimed runs first (default 1)")
    p.add_argument("--images", type=positive_int, default=16, help="distinct synthetic images")
    p.add_argument("--no-baseline", action="store_true", help="skip the PyTorch eager baseline")
    p.add_argument("--stream-fps", type=float, default=None,
                   help="also simulate a camera at this frame rate (one image per frame)")
    p.add_argument("--stream-frames", type=positive_int, default=30)
    p.add_argument("--deadline-ms", type=float, default=None,
                   help="per-frame deadline in stream mode (default: one frame period)")
    p.add_argument("--rss-megapixels", type=_megapixel_list, default=[1.0, 12.0, 64.0],
                   help="JPEG sizes whose peak RSS per image is measured, each in a child "
                        "process (default 1,12,64; 'none' to skip)")
    add_threads(p)
    add_attention(p)
    p.set_defaults(func=cmd_bench)
