"""Runtime (onnxruntime FP32) against the PyTorch eager reference, same images, one process.

    python -m clipinspect.benchmarks.winclip_vs_torch --model ViT-B-16-plus-240 \
        --out benchmarks/results/winclip_vs_torch_cpu

Both sides start from the same decoded RGB images and include preprocessing and upsampling to
the image size; rounds alternate runtime / reference so that machine noise hits both alike.
Reports images/s (median over rounds), the ratio, the largest output differences, and the
throughput in GFLOP/s of the WinCLIP cost model (docs/methods.md#cost-model).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from clipinspect.runtime.methods.winclip import cost as winclip_gflops
from clipinspect.runtime.core.names import SCORING_MODES

from .report import machine, write_results


def gemm_peak(repeats: int = 5) -> float:
    """GFLOP/s of one large FP32 matrix product shaped like a window MLP layer (median):
    the practical FP32 ceiling of this machine with the same thread count."""
    import torch

    a, b = torch.randn(6760, 896), torch.randn(896, 3584)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * 6760 * 896 * 3584 / statistics.median(times) / 1e9


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-16-plus-240")
    ap.add_argument("--bundle", default=None,
                    help="existing random-weights bundle of --model (default: export one); "
                         "its first category's few-shot memory is replaced")
    ap.add_argument("--images", type=int, default=8, help="test images per round")
    ap.add_argument("--shots", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/winclip_vs_torch_cpu",
                    help="output path without extension (.json and .md are written)")
    args = ap.parse_args(argv)

    from clipinspect.export.exporter import ExportOptions, export_bundle
    from clipinspect.runtime import Inspector

    with tempfile.TemporaryDirectory(prefix="clipinspect-bench-") as work:
        bundle_path = Path(args.bundle) if args.bundle else Path(work) / "bundle"
        if not args.bundle:
            export_bundle(ExportOptions(bundle_path, args.model, None, ["weave"], seed=0))
        return measure(args, Inspector.open(bundle_path))


def _check_bundle(bundle) -> None:
    """Only a random-weights plain WinCLIP bundle has an eager reference this can rebuild."""
    if bundle.manifest.model.weights.kind != "random":
        raise SystemExit("this benchmark rebuilds the same weights from the seed: use a bundle "
                         "exported with --pretrained none")
    if bundle.manifest.method != "winclip" or bundle.manifest.adaptation:
        raise SystemExit("this benchmark compares plain WinCLIP with its eager reference; the "
                         "bundle's method is " + bundle.manifest.method
                         + (" with prompt adaptation" if bundle.manifest.adaptation else "")
                         + " (compare methods with python -m clipinspect.benchmarks.methods)")


def measure(args: argparse.Namespace, inspector) -> dict:
    import onnxruntime
    import torch

    from clipinspect.calibration.synth import render_sample
    from clipinspect.export.exporter import load_clip
    from clipinspect.export.methods.winclip import WinClipReference

    bundle = inspector.bundle
    _check_bundle(bundle)
    model, _, _ = load_clip(args.model, None, bundle.manifest.model.weights.seed)
    reference = WinClipReference(model, bundle.scales)
    category = bundle.categories[0]

    defects = ["good", "scratch", "hole", "stain", "crack"]
    images = [render_sample("weave", "test", defects[i % 5], i, image_size=256)[0]
              for i in range(args.images)]
    refs = [render_sample("weave", "train", "good", i, image_size=256)[0] for i in range(args.shots)]
    inspector.add_references(category, refs)
    data = bundle.category(category)
    prototypes = torch.from_numpy(data.text_prototypes)
    def to_tensor(batch):
        return torch.from_numpy(bundle.preprocess.batch(batch))

    memory = reference.features(to_tensor(refs))

    def run_runtime(mode):
        res = inspector.inspect(images, category, args.batch_size, mode=mode)
        return np.array([r.image_score for r in res]), [r.anomaly_map for r in res]

    def run_reference(mode):
        scores, maps = [], []
        for i in range(0, len(images), args.batch_size):
            batch = images[i:i + args.batch_size]
            s, m = reference(to_tensor(batch), prototypes, batch[0].shape[:2],
                             memory if mode == "few-shot" else None)
            scores.append(s.numpy())
            maps += list(m.numpy())
        return np.concatenate(scores), maps

    # Equal outputs first (zero-shot and few-shot), then timing rounds of the few-shot mode.
    diffs = {}
    for mode in SCORING_MODES:
        (s1, m1), (s2, m2) = run_runtime(mode), run_reference(mode)
        diffs[mode] = {"image_score": float(np.abs(s1 - s2).max()),
                       "anomaly_map": float(max(np.abs(a - b).max() for a, b in zip(m1, m2)))}
    times = {"runtime": [], "reference": []}
    for r in range(args.rounds):
        for name, fn in (("runtime", run_runtime), ("reference", run_reference)):
            t0 = time.perf_counter()
            fn("few-shot")
            times[name].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{args.rounds} {name}: {args.images / times[name][-1]:.3f} img/s",
                  flush=True)
    peak = gemm_peak()
    layers = len(model.visual.transformer.resblocks)
    cost = winclip_gflops(bundle.manifest, layers)
    ips = {k: args.images / statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "winclip_vs_torch", "model": args.model, "weights": "random (seeded)",
        "mode": f"WinCLIP+ {args.shots}-shot (timed); zero-shot and few-shot checked for equality",
        "images_per_round": args.images, "batch_size": args.batch_size, "rounds": args.rounds,
        "image_size": list(images[0].shape[:2]), "seconds_per_round": times,
        "images_per_second": ips, "ratio_runtime_over_reference": ips["runtime"] / ips["reference"],
        "max_abs_diff": diffs, "gflops_per_image_cost_model": cost,
        "gflops_per_second": {k: v * cost["total"] for k, v in ips.items()},
        "gemm_peak_gflops_per_second": peak,
        "threads": {"torch": torch.get_num_threads(), "onnxruntime": "default (physical cores)"},
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "numpy": np.__version__},
        "machine": machine(), "bundle": bundle.identity,
    }
    write_results(result, args.out, render)
    return result


def render(r: dict) -> str:
    ips, gf = r["images_per_second"], r["gflops_per_second"]
    d = r["max_abs_diff"]
    return "\n".join([
        f"# WinCLIP runtime vs PyTorch eager: {r['model']}",
        "",
        f"Machine: {r['machine']['cpu']}, {r['machine']['logical_cores']} logical cores. "
        f"{r['mode']}; batch {r['batch_size']}, {r['images_per_round']} images of "
        f"{r['image_size'][0]}x{r['image_size'][1]} per round, median of {r['rounds']} "
        "alternating rounds.",
        "",
        "| | images/s | GFLOP/s (cost model) |",
        "|---|---|---|",
        f"| runtime (onnxruntime FP32) | {ips['runtime']:.3f} | {gf['runtime']:.0f} |",
        f"| PyTorch eager reference | {ips['reference']:.3f} | {gf['reference']:.0f} |",
        "",
        f"Ratio runtime / reference: **{r['ratio_runtime_over_reference']:.2f}x**. This CPU's "
        f"FP32 matrix-product peak, measured in the same run: "
        f"{r['gemm_peak_gflops_per_second']:.0f} GFLOP/s. Cost model: "
        f"{r['gflops_per_image_cost_model']['total']:.0f} GFLOPs per image "
        f"({r['gflops_per_image_cost_model']['encode']:.1f} encode + "
        f"{r['gflops_per_image_cost_model']['windows']:.0f} windows); the runtime executes "
        f"{r['gflops_per_image_cost_model']['executed_by_runtime']:.0f} of them (exact "
        "shortcut in the last block of the window passes), i.e. "
        f"{ips['runtime'] * r['gflops_per_image_cost_model']['executed_by_runtime']:.0f} "
        "GFLOP/s actually executed.",
        "",
        f"Max |runtime - reference|: zero-shot score {d['zero-shot']['image_score']:.1e}, map "
        f"{d['zero-shot']['anomaly_map']:.1e}; few-shot score {d['few-shot']['image_score']:.1e}, "
        f"map {d['few-shot']['anomaly_map']:.1e}.",
        "",
    ])


if __name__ == "__main__":
    main()
