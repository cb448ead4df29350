"""``clipinspect info``, ``providers``, ``build-engine`` and ``triton``: commands about a bundle
and where it runs, not about images."""

from __future__ import annotations

import argparse
import json
import sys

from .options import PRECISIONS, add_bundle, add_precision, positive_int


def cmd_info(args: argparse.Namespace) -> int:
    from ..core.bundle import Bundle
    from ..methods import describe

    bundle = Bundle.open(args.bundle, verify_checksums=not args.no_verify)
    m = bundle.manifest
    if args.json:
        print(json.dumps(m.to_dict(), indent=2))
        return 0
    weights = m.model.weights
    print(f"bundle      {bundle.root} (format {m.format_version}, {describe(m)})")
    print(f"model       {m.model.name}, weights {weights.kind}"
          f"{': ' + weights.tag if weights.kind == 'tag' else ''}"
          f"{'  <-- RANDOM WEIGHTS, not for inspection' if weights.kind == 'random' else ''}")
    print(f"input       {m.preprocess.size[0]}x{m.preprocess.size[1]}, grid "
          f"{m.grid[0]}x{m.grid[1]}, {m.section.summary()}")
    print(f"precisions  {', '.join(bundle.precisions)}")
    for precision, parity in m.parity.items():
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in parity.max_abs_diff.items())
        print(f"parity      {precision}: {diffs} (tolerance {parity.tolerance:g})")
    for precision, q in m.quantization.items():
        print(f"parity      {precision} vs fp32: {q.describe()}")
    for key, engines in m.engines.items():
        built = ", ".join(sorted(engines.builds))
        print(f"engines     {key}: {built or 'none'} (TensorRT; 'clipinspect build-engine')")
    for name in bundle.categories:
        entry = m.categories[name]
        dropped = entry.ambiguity_filter_dropped
        kept = (f" ({len(dropped['normal'])}+{len(dropped['anomalous'])} dropped as ambiguous)"
                if dropped else "")
        print(f"category    {name}: {entry.n_normal_prompts}+{entry.n_anomalous_prompts} "
              f"prompts{kept}{', prompt file' if entry.prompt_file else ''}, "
              f"{entry.memory.shots if entry.memory else 0}-shot memory")
    for line in threshold_table(m):
        print(line)
    return 0


THRESHOLD_COLUMNS = ("category", "key", "image", "pixel", "method", "images")


def threshold_table(m) -> list[str]:
    """The thresholds of every category as an aligned table (one row per precision/mode key),
    under the 'thresholds' label of ``info``; one line saying how to set them if there are
    none."""
    def number(value) -> str:
        return "-" if value is None else f"{value:.6g}"

    rows = [(name, key, number(t.image), number(t.pixel), str(t.extra.get("method", "-")),
             str(t.extra.get("images", "-")))
            for name in sorted(m.categories) for key, t in m.categories[name].thresholds.items()]
    if not rows:
        return ["thresholds  none (set them with 'clipinspect threshold')"]
    table = [THRESHOLD_COLUMNS, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(THRESHOLD_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    return [f"{'thresholds' if i == 0 else '':12s}{line}" for i, line in enumerate(lines)]


def cmd_providers(args: argparse.Namespace) -> int:
    from ..core.backends import ort_conflict
    from ..core.provider_probe import report, report_lines

    # Each provider opens a one-node session: what it runs on, not what onnxruntime lists.
    data = report()
    print(json.dumps(data, indent=2) if args.json else "\n".join(report_lines(data)))
    conflict = ort_conflict()
    if conflict:
        print(f"WARNING: {conflict}", file=sys.stderr)
    return 0


def cmd_build_engine(args: argparse.Namespace) -> int:
    from ..tensorrt.compat import BatchRange
    from ..tensorrt.engine import build_engines

    build_engines(args.bundle, args.precision, BatchRange(args.min_batch, args.opt_batch,
                                                          args.max_batch),
                  args.max_shots, args.workspace, int8_graph=args.int8_graph)
    return 0


def cmd_triton(args: argparse.Namespace) -> int:
    from ..triton.repository import write_repository

    out = write_repository(args.bundle, args.out, platform=args.platform,
                           precision=args.precision, max_batch=args.max_batch,
                           overwrite=args.overwrite, categories_only=args.categories_only,
                           engine_key=args.engine_key)
    if args.categories_only:
        print(f"category files in {out} refreshed; a running server reads them on the next "
              "request")
    else:
        print(f"Triton model repository written to {out}; serve it with "
              f"'tritonserver --model-repository {out}'")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe and verify a bundle")
    add_bundle(p)
    p.add_argument("--json", action="store_true", help="print the manifest")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum verification")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("build-engine", help="build TensorRT engines for this GPU into the bundle")
    add_bundle(p)
    add_precision(p, default=None, choices=PRECISIONS,
                  help="which graphs to build from (fp16 / int8: made by 'clipinspect quantize')")
    p.add_argument("--min-batch", type=positive_int, default=1)
    p.add_argument("--opt-batch", type=positive_int, default=8,
                   help="the batch size TensorRT tunes for (default 8)")
    p.add_argument("--max-batch", type=positive_int, default=32)
    p.add_argument("--max-shots", type=positive_int, default=16,
                   help="most reference images the few-shot engine accepts (default 16)")
    p.add_argument("--workspace", type=positive_int, default=2048, metavar="MB",
                   help="TensorRT builder workspace in MB (default 2048)")
    p.add_argument("--int8-graph", choices=["fp16", "fp32"], default="fp16",
                   help="with --precision int8: build the encoder from the INT8 graph with FP16 "
                        "between its Q/DQ pairs (default; faster on a GPU) or from the FP32 QDQ "
                        "graph")
    p.set_defaults(func=cmd_build_engine)

    p = sub.add_parser("triton", help="write a Triton Inference Server model repository")
    add_bundle(p)
    p.add_argument("--out", required=True, help="model repository directory to write")
    p.add_argument("--platform", default="onnx", choices=["onnx", "tensorrt", "python"],
                   help="onnx: graphs for Triton's onnxruntime backend (default); tensorrt: the "
                        "engines 'build-engine' made on the serving GPU; python: the graphs run "
                        "by onnxruntime in Triton's Python backend, on the CPU (tests, no GPU)")
    add_precision(p, choices=PRECISIONS)
    p.add_argument("--max-batch", type=positive_int, default=None,
                   help="largest batch the encoder's dynamic batcher forms (default 32 for "
                        "onnx; for tensorrt the engines' profile maximum, never more)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing repository")
    p.add_argument("--categories-only", action="store_true",
                   help="only (re)write the category files of an existing repository (after "
                        "add-category or fewshot); no model is touched")
    p.add_argument("--engine-key", default=None,
                   help="with --platform tensorrt: which device's engines, when the bundle has "
                        "several")
    p.set_defaults(func=cmd_triton)

    p = sub.add_parser("providers", help="what each provider actually runs on (a one-node "
                                         "session each), why one fell back, and the CUDA, "
                                         "cuDNN and TensorRT versions found")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_providers)
