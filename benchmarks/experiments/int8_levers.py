"""INT8 speed levers measured side by side on a bundle's encoder: each candidate graph or session
setting against the bundle's FP32 and INT8 encoders, in interleaved rounds (medians), with the
map agreement of each candidate graph with FP32.

    python benchmarks/experiments/int8_levers.py BUNDLE --calibration DIR \
        --out benchmarks/results/int8_levers_cpu_b16p

Candidates: the INT8 graph with the attention products (QK^T, attention x V) quantized too
(calibrated on ``--calibration`` images, as ``clipinspect quantize`` does); the bundle's INT8
graph without onnxruntime's thread spinning (``session.intra_op.allow_spinning`` 0); and with
one intra-op thread; where the bundle has them, its fused-attention FP32 and INT8 encoders (the
latter also without spinning). The encoder alone is timed: it is where the levers act.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from clipinspect.benchmarks.harness import finish, parser
from clipinspect.benchmarks.report import load_text, machine_text
from clipinspect.benchmarks.stats import interleaved_rounds, ratios
from clipinspect.runtime.core.names import FUSED_ENCODER


def _session(model, *, threads: int | None, spinning: bool = True):
    import onnxruntime as ort

    from clipinspect.runtime.core.onnxruntime_backend import session_options

    so = session_options(threads)
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def candidates(bundle, calibration: str, args: argparse.Namespace, agreement) -> tuple[dict, dict]:
    """{label: session} and {label: map agreement with FP32} of every candidate."""
    import onnx

    from clipinspect.calibration import quantize as q

    fp32 = str(bundle.graph_path("fp32", "encoder"))
    int8 = str(bundle.graph_path("int8", "encoder"))
    sessions = {"fp32": _session(fp32, threads=args.threads),
                "int8": _session(int8, threads=args.threads),
                "int8, no spinning": _session(int8, threads=args.threads, spinning=False),
                "int8, 1 thread": _session(int8, threads=1)}
    model = q.clean_graph(bundle.graph_path("fp32", "encoder"))
    images = q.load_tensors(bundle, q.find_images(calibration)[:args.calibration_images])
    with tempfile.TemporaryDirectory(prefix="clipinspect-levers-") as tmp:
        clean = Path(tmp) / "clean.onnx"
        onnx.save(model, str(clean))
        amax = q.activation_ranges(clean, images, "minmax")
    groups = q.weight_groups(model)
    products = q.activation_products(model)
    variant = q.quantize_int8(model, groups, amax, products=products)
    sessions["int8 + attention products"] = _session(variant, threads=args.threads)
    agree = {"int8 + attention products": agreement.measure(variant),
             "int8": agreement.measure(onnx.load(int8))}
    agree["int8 + attention products"]["quantized_products"] = len(products)
    if FUSED_ENCODER in bundle.manifest.graphs["int8"]:
        # The fused-attention encoders (onnxruntime's CPU default), beside the standard ones.
        fused = str(bundle.graph_path("int8", FUSED_ENCODER))
        sessions["fp32 fused attention"] = _session(str(bundle.graph_path("fp32", FUSED_ENCODER)),
                                                    threads=args.threads)
        sessions["int8 fused attention"] = _session(fused, threads=args.threads)
        sessions["int8 fused attention, no spinning"] = _session(fused, threads=args.threads,
                                                                 spinning=False)
        agree["int8 fused attention"] = agreement.measure(onnx.load(fused))
    return sessions, agree


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = parser(__doc__, out="benchmarks/results/int8_levers_cpu", rounds=5)
    ap.add_argument("bundle")
    ap.add_argument("--calibration", required=True, help="normal images for the candidates' "
                                                          "activation ranges")
    ap.add_argument("--calibration-images", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from clipinspect.calibration.quantize import MapAgreement, probe_images
    from clipinspect.runtime import Bundle

    args = parse(argv)
    bundle = Bundle.open(args.bundle)
    agreement = MapAgreement(bundle, probe_images(bundle, 3), args.threads)
    sessions, agree = candidates(bundle, args.calibration, args, agreement)
    labels = list(sessions)
    x = probe_images(bundle, args.batch_size)
    for s in sessions.values():  # warm-up
        s.run(None, {"images": x})
    seconds, rates = interleaved_rounds(
        labels, lambda i: sessions[labels[i]].run(None, {"images": x}), args.rounds,
        args.batch_size)
    ips = dict(zip(labels, rates))
    result = {"benchmark": "int8_levers", "bundle": bundle.identity,
              "model": bundle.manifest.model.name, "batch_size": args.batch_size,
              "rounds": args.rounds, "threads": args.threads, "timed": "encoder graph alone",
              "seconds_per_round": dict(zip(labels, seconds)), "images_per_second": ips,
              "ratio_to_fp32": ratios(ips, "fp32"), "agreement_vs_fp32": agree}
    return finish(result, args.out, render, script=__file__, argv=argv,
                  placeholders={args.bundle: "BUNDLE", args.calibration: "DIR"})


def render(r: dict) -> str:
    lines = [f"# INT8 levers on the encoder: {r['model']}, batch {r['batch_size']}", "",
             f"Command: `{r['command']}`", "",
             f"Machine: {machine_text(r['machine'])}, "
             f"load average at the end {load_text(r['load_average'])}; "
             f"onnxruntime {r['versions']['onnxruntime']}. Median of {r['rounds']} interleaved "
             f"rounds; timed: {r['timed']}.", "",
             "| candidate | images/s | ratio to FP32 | ratio to INT8 | map Pearson vs FP32 |",
             "|---|---|---|---|---|"]
    ips = r["images_per_second"]
    for label, v in ips.items():
        a = r["agreement_vs_fp32"].get(label)
        graph = label.split(",")[0]  # "int8, no spinning" runs the graph of "int8"
        pearson = (f"{a['map_pearson_min']:.5f}" if a else
                   "1 (reference)" if label == "fp32" else
                   f"as {graph} (same graph)" if graph in r["agreement_vs_fp32"] else
                   "FP32 (checked against PyTorch at export)")
        lines.append(f"| {label} | {v:.3f} | {r['ratio_to_fp32'][label]:.2f}x | "
                     f"{v / ips['int8']:.2f}x | {pearson} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
