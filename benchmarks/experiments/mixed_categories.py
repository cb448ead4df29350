"""Mixed-category load on ``clipinspect serve``: one encoder pass per micro-batch against one pass
per (category, mode) group, side by side in one run.

Two servers on the same bundle run at once (loopback, free ports), one per code path
(``ServeConfig.one_encoder_pass``); phases alternate between them, for each client count and
round, so that a drifting machine's noise hits both alike. The clients post test images of two
categories interleaved (consecutive requests alternate categories), so micro-batches mix them.
Every returned score is then compared with the image inspected alone, offline.

    python benchmarks/experiments/mixed_categories.py BUNDLE --clients 4,8 --rounds 2 \\
        --duration 30 --out benchmarks/results/mixed_categories_cpu_s16/mixed
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
from pathlib import Path

from clipinspect.benchmarks.harness import finish, parser
from clipinspect.benchmarks.loadtest import (HOST, LoadtestOptions, free_port, offline_check,
                                             run_phase, serve_process, test_images)
from clipinspect.benchmarks.report import machine_text
from clipinspect.runtime.cli.options import (add_batch_size, add_bundle, add_threads, csv_list,
                                             int_list, positive_int)

VARIANTS = {"per-group": False, "one-pass": True}  # label -> ServeConfig.one_encoder_pass


def interleave(chosen: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """Alternate categories: a, b, a, b, ... (images of one category stay in their order)."""
    by_category: dict[str, list] = {}
    for pair in chosen:
        by_category.setdefault(pair[0], []).append(pair)
    mixed = itertools.zip_longest(*by_category.values())
    return [pair for row in mixed for pair in row if pair is not None]


def child_command(bundle: str, port: int, options: LoadtestOptions, one_pass: bool) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), bundle,
           "--serve-port", str(port), "--one-encoder-pass", str(int(one_pass)),
           "--batch-size", str(options.batch_size), "--max-wait-ms", str(options.max_wait_ms)]
    return cmd + (["--threads", str(options.threads)] if options.threads else [])


def serve_child(args: argparse.Namespace) -> int:
    """The server of one variant: ``clipinspect serve`` with the grouping chosen."""
    from clipinspect.runtime.serving.server import ServeConfig, serve

    serve(args.bundle, HOST, args.serve_port,
          ServeConfig(max_batch=args.batch_size, max_wait_ms=args.max_wait_ms, max_queue=256,
                      one_encoder_pass=bool(args.one_encoder_pass)), threads=args.threads)
    return 0


def run(bundle: str, out: str, options: LoadtestOptions, rounds: int,
        argv: list[str] | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="clipinspect-mixed-") as tmp:
        categories, chosen = test_images(bundle, None, options.categories, options.per_category,
                                         Path(tmp))
        if len(categories) < 2:
            raise SystemExit(f"mixed_categories: needs two categories, got {categories}")
        chosen = interleave(chosen)
        images = [(c, p.read_bytes()) for c, p in chosen]
        ports = {label: free_port() for label in VARIANTS}
        phases = []
        with (serve_process(child_command(bundle, ports["per-group"], options, False),
                            ports["per-group"], Path(tmp) / "per-group.log"),
              serve_process(child_command(bundle, ports["one-pass"], options, True),
                            ports["one-pass"], Path(tmp) / "one-pass.log")):
            load_before = os.getloadavg()
            for r, n, label in itertools.product(range(rounds), options.clients, VARIANTS):
                print(f"mixed_categories: round {r + 1}/{rounds}, {label}, {n} client(s) for "
                      f"{options.duration:g} s ...", file=sys.stderr, flush=True)
                phases.append({"variant": label, "round": r + 1,
                               **run_phase(ports[label], images, n, options.duration)})
            load_after = os.getloadavg()
        check = offline_check(bundle, chosen, phases, "fp32", options.threads, 0.0)
    for p in phases:
        del p["_records"]
    pooled = {label: {n: sum(p["requests_ok"] for p in phases if (p["variant"], p["clients"])
                             == (label, n))
                      / sum(p["elapsed_s"] for p in phases if (p["variant"], p["clients"])
                            == (label, n)) for n in options.clients} for label in VARIANTS}
    result = {
        "benchmark": "mixed_categories",
        "load_average_1m": {"before": load_before[0], "after": load_after[0]},
        "config": {"bundle": bundle_identity(bundle), "batch_size": options.batch_size,
                   "max_wait_ms": options.max_wait_ms, "threads": options.threads,
                   "categories": categories, "images": len(chosen), "rounds": rounds,
                   "data": "synthetic, generated for this run (seed 0)"},
        "phases": phases, "throughput_img_s": pooled, "score_check": check,
        "gain_one_pass_vs_per_group": {n: pooled["one-pass"][n] / pooled["per-group"][n]
                                       for n in options.clients if pooled["per-group"][n]},
    }
    # The bundle by identity (config), not by its path on this machine.
    return finish(result, out, render, script=__file__, argv=argv,
                  placeholders={bundle: "BUNDLE"})


def bundle_identity(bundle: str) -> str:
    from clipinspect.runtime import Bundle

    return Bundle.open(bundle, verify_checksums=False).identity


def render(r: dict) -> str:
    c, s = r["config"], r["score_check"]
    lines = [f"# Mixed categories on clipinspect serve: one encoder pass vs one per category "
             f"({c['bundle']})", "", f"Command: `{r['command']}`", "",
             f"Machine: {machine_text(r['machine'])}; "
             f"1-minute load average {r['load_average_1m']['before']:.2f} before, "
             f"{r['load_average_1m']['after']:.2f} after. Max batch {c['batch_size']}, max wait "
             f"{c['max_wait_ms']:g} ms; {c['images']} images of {', '.join(c['categories'])}, "
             "requests alternating categories.", "",
             "| clients | variant | img/s (pooled) | gain |", "|---|---|---|---|"]
    for n in r["throughput_img_s"]["one-pass"]:
        for label in VARIANTS:
            gain = r["gain_one_pass_vs_per_group"].get(n) if label == "one-pass" else None
            lines.append(f"| {n} | {label} | {r['throughput_img_s'][label][n]:.2f} | "
                         f"{'-' if gain is None else f'{gain:.2f}x'} |")
    lines += ["", "| round | clients | variant | ok | errors | img/s | p50 ms | p99 ms | "
                  "mean batch |", "|---|---|---|---|---|---|---|---|---|"]
    for p in r["phases"]:
        lat, mb = p["latency_ms"] or {}, p["mean_batch_size"]
        lines.append(f"| {p['round']} | {p['clients']} | {p['variant']} | {p['requests_ok']} | "
                     f"{p['errors']} | {p['throughput_img_s']:.2f} | {lat.get('p50', 0):.0f} | "
                     f"{lat.get('p99', 0):.0f} | {'-' if mb is None else f'{mb:.2f}'} |")
    lines += ["", f"Scores: {s['compared']} returned scores ({s['distinct_images']} distinct "
                  f"images) against offline single-image inspection: {s['identical']} identical, "
                  f"max abs difference {s['max_abs_diff']:.3g}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, out="", prog="python benchmarks/experiments/mixed_categories.py")
    add_bundle(p)
    p.add_argument("--clients", type=int_list(1, "4,8"), default=[4, 8],
                   help="client counts, one phase per variant each (default 4,8)")
    p.add_argument("--rounds", type=positive_int, default=2, help="alternations (default 2)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per phase")
    p.add_argument("--images-per-category", type=positive_int, default=6)
    p.add_argument("--categories", default=None, help="two of the bundle's, comma-separated")
    add_batch_size(p, help="server max batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    add_threads(p)
    p.add_argument("--serve-port", type=int, help=argparse.SUPPRESS)  # a variant's server
    p.add_argument("--one-encoder-pass", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_port is not None:
        return serve_child(args)
    if not args.out:
        p.error("--out is required")
    options = LoadtestOptions(clients=args.clients, duration=args.duration,
                              per_category=args.images_per_category,
                              categories=csv_list(args.categories or "") or None,
                              batch_size=args.batch_size, max_wait_ms=args.max_wait_ms,
                              threads=args.threads)
    r = run(args.bundle, args.out, options, args.rounds, argv)
    failed = sum(p["errors"] for p in r["phases"]) + r["score_check"]["mismatches"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
