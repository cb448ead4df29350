"""Where the time goes, per stage and per operator type, for each precision of a bundle.

    python benchmarks/experiments/profile_ops.py BUNDLE --precisions fp32,int8 \
        --batch-size 8 --out benchmarks/results/profile_ops_cpu_b16p

Every precision inspects the same synthetic PNG files: the host stage (decode, resize,
normalize), the encoder graph, the scoring head graph and the upsampling of the maps to the
image size are timed separately (wall clock, median over the runs, after a warm-up run).
onnxruntime's profiler (``SessionOptions.enable_profiling``) records every node of the encoder
and head graphs; its trace is summarised per operator type and per class of operator (integer
kernels, quantize/dequantize, FP32), so the FP32 share left in the INT8 graph is a number. The
traces are written to a temporary folder and deleted: only the summary is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from clipinspect.benchmarks.harness import (IMAGE_SIZE, bundle_with_precisions, finish, parser,
                                            synthetic_category, synthetic_images)
from clipinspect.benchmarks.report import load_text, machine_text
from clipinspect.runtime.core.names import FEW_SHOT, SCORING_MODES

# Operator types onnxruntime's CPU provider runs in integer arithmetic after its QDQ fusions.
INTEGER_OPS = {"MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul", "QGemm",
               "QLinearConv", "ConvInteger", "DynamicQuantizeMatMul", "QAttention",
               "QLinearSoftmax", "QLinearAdd", "QLinearMul"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
STAGES = ("host", "encoder", "heads", "maps")


def op_class(op: str) -> str:
    return "integer" if op in INTEGER_OPS else "quantize/dequantize" if op in QDQ_OPS else "fp32"


def summarise_trace(path: str | Path, warmup: int) -> dict:
    """One onnxruntime profile (chrome trace JSON) -> per operator type {ms per run, share,
    nodes run per run} and the class totals, over the runs after the first ``warmup``."""
    events = json.loads(Path(path).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    kept = runs[warmup:]
    if not kept:
        raise SystemExit(f"{path}: no profiled run after the {warmup} warm-up run(s)")
    start = kept[0]["ts"]
    per_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        if (e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
                and e["ts"] >= start):
            slot = per_op[e["args"]["op_name"]]
            slot[0] += e["dur"] / 1000.0
            slot[1] += 1
    n = len(kept)
    total = sum(ms for ms, _ in per_op.values()) or 1.0
    ops = {op: {"ms_per_run": ms / n, "share": ms / total, "nodes_per_run": count / n,
                "class": op_class(op)}
           for op, (ms, count) in sorted(per_op.items(), key=lambda kv: -kv[1][0])}
    classes: dict[str, float] = defaultdict(float)
    for v in ops.values():
        classes[v["class"]] += v["share"]
    return {"runs": n, "model_run_ms": statistics.median(e["dur"] / 1000.0 for e in kept),
            "kernel_ms_per_run": total / n, "ops": ops, "class_share": dict(classes)}


def _images(category: str, n: int, shots: int, folder: Path) -> tuple[list[Path], list[Path]]:
    from PIL import Image

    images, refs = synthetic_images(category, n, shots)
    paths = []
    for i, rgb in enumerate(images + refs):
        paths.append(folder / f"{'test' if i < n else 'ref'}_{i:03d}.png")
        Image.fromarray(rgb).save(paths[-1])
    return paths[:n], paths[n:]


def profile_precision(bundle, precision: str, work: tuple[list[Path], list[Path]], *,
                      args: argparse.Namespace, trace_dir: Path) -> dict:
    """Stage times and operator summaries of one precision (few-shot with ``args.shots``
    references, or zero-shot)."""
    from clipinspect.runtime import Inspector
    from clipinspect.runtime.core.images import to_rgb_array
    from clipinspect.runtime.core.maps import upsample
    from clipinspect.runtime.core.names import HEADS
    from clipinspect.runtime.core.onnxruntime_backend import OrtBackend

    from clipinspect.runtime.core.backends import encoder_graph

    graph = encoder_graph(bundle, precision, "cpu", args.attention)
    backend = OrtBackend(bundle.graph_path(precision, graph),
                         {h: bundle.graph_path(precision, h) for h in HEADS},
                         "cpu", threads=args.threads, int8=precision == "int8",
                         profile_prefix=str(trace_dir / precision))
    inspector = Inspector(bundle, backend, precision)
    paths, refs = work
    category = args.category
    memory = inspector.build_memory(refs)[0] if args.mode == FEW_SHOT else None
    # build_memory ran the encoder: those runs count as warm-up runs of its trace.
    encoder_warmup = -(-len(refs) // 8) if memory is not None else 0
    stage_ms: dict[str, list[float]] = {s: [] for s in STAGES}
    for r in range(args.warmup + args.runs):
        batch = [paths[(r * args.batch_size + j) % len(paths)] for j in range(args.batch_size)]
        t0 = time.perf_counter()
        rgbs = [to_rgb_array(p) for p in batch]
        x = bundle.preprocess.batch(rgbs)
        t1 = time.perf_counter()
        encoded = backend.encode(x)
        t2 = time.perf_counter()
        _, grids, _ = inspector.score(encoded, category, args.mode, memory)
        t3 = time.perf_counter()
        _ = [upsample(g, im.shape[:2]) for im, g in zip(rgbs, grids)]
        t4 = time.perf_counter()
        if r >= args.warmup:
            for s, dt in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                stage_ms[s].append(dt * 1000.0)
    head = "head_fewshot" if memory is not None else "head_zeroshot"
    graphs = {"encoder": summarise_trace(backend.encoder.end_profiling(),
                                         args.warmup + encoder_warmup),
              head: summarise_trace(backend.heads[head].end_profiling(), args.warmup)}
    for name, session in backend.heads.items():
        if name != head:
            os.remove(session.end_profiling())
    medians = {s: statistics.median(v) for s, v in stage_ms.items()}
    total = sum(medians.values())
    return {"stage_ms": medians, "stage_share": {s: v / total for s, v in medians.items()},
            "total_ms": total, "graphs": graphs, "encoder_graph": graph}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = parser(__doc__, out="benchmarks/results/profile_ops_cpu")
    ap.add_argument("bundle")
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--mode", default=FEW_SHOT, choices=list(SCORING_MODES))
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3, help="profiled runs after the warm-up")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--attention", default="auto", choices=("auto", "fused", "standard"),
                    help="encoder graph profiled (auto: the fused-attention one where the "
                         "bundle has it, as onnxruntime's CPU provider runs by default)")
    ap.add_argument("--category", default=None, help="default: the bundle's first category "
                                                    "with synthetic images")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    bundle, precisions = bundle_with_precisions(args.bundle, args.precisions)
    args.category = synthetic_category(bundle, args.category)
    with tempfile.TemporaryDirectory(prefix="clipinspect-profile-") as tmp:
        work = _images(args.category, max(args.batch_size, 8), args.shots, Path(tmp))
        per = {p: profile_precision(bundle, p, work, args=args, trace_dir=Path(tmp))
               for p in precisions}
    result = {"benchmark": "profile_ops", "bundle": bundle.identity,
              "model": bundle.manifest.model.name, "weights": bundle.manifest.model.weights.kind,
              "category": args.category, "mode": args.mode,
              "shots": args.shots if args.mode == FEW_SHOT else 0,
              "batch_size": args.batch_size, "runs": args.runs, "warmup": args.warmup,
              "threads": args.threads, "image_size": [IMAGE_SIZE, IMAGE_SIZE],
              "precisions": per}
    return finish(result, args.out, render, script=__file__, argv=argv,
                  placeholders={args.bundle: "BUNDLE"})


def render(r: dict, top: int = 12) -> str:
    per = r["precisions"]
    lines = [f"# Profile per stage and operator: {r['model']} ({r['weights']} weights), "
             f"{r['mode']}{' ' + str(r['shots']) + '-shot' if r['shots'] else ''}, "
             f"batch {r['batch_size']}", "", f"Command: `{r['command']}`", "",
             f"Machine: {machine_text(r['machine'])}, "
             f"load average at the end {load_text(r['load_average'])}; "
             f"onnxruntime {r['versions']['onnxruntime']}. Medians of {r['runs']} runs after "
             f"{r['warmup']} warm-up; operator times from onnxruntime's profiler.", "",
             "## Stages (ms per batch, share of the batch)", "",
             "| precision | " + " | ".join(STAGES) + " | total |",
             "|---|" + "---|" * (len(STAGES) + 1)]
    for p, v in per.items():
        lines.append(f"| {p} | " + " | ".join(
            f"{v['stage_ms'][s]:.0f} ({100 * v['stage_share'][s]:.0f}%)" for s in STAGES)
            + f" | {v['total_ms']:.0f} |")
    for p, v in per.items():
        for graph, g in v["graphs"].items():
            share = ", ".join(f"{k} {100 * s:.1f}%" for k, s in sorted(g["class_share"].items()))
            name = v.get("encoder_graph", "encoder") if graph == "encoder" else graph
            lines += ["", f"## {p} {name}: {g['kernel_ms_per_run']:.0f} ms of kernels per run "
                          f"(run {g['model_run_ms']:.0f} ms); {share}", "",
                      "| operator | ms per run | share | nodes per run | class |",
                      "|---|---|---|---|---|"]
            for op, o in list(g["ops"].items())[:top]:
                lines.append(f"| {op} | {o['ms_per_run']:.1f} | {100 * o['share']:.1f}% | "
                             f"{o['nodes_per_run']:.0f} | {o['class']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
