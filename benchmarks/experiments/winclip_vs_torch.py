"""Runtime (onnxruntime FP32) against the PyTorch eager reference, same images, one process.

    python benchmarks/experiments/winclip_vs_torch.py --model ViT-B-16-plus-240 \
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

from clipinspect.benchmarks.harness import finish, parser, synthetic_images
from clipinspect.benchmarks.report import machine_text
from clipinspect.benchmarks.stats import interleaved_rounds
from clipinspect.runtime.core.names import FEW_SHOT, SCORING_MODES
from clipinspect.runtime.methods.winclip import cost as winclip_gflops

SIDES = ("runtime", "reference")


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


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = parser(__doc__, out="benchmarks/results/winclip_vs_torch_cpu", rounds=3)
    ap.add_argument("--model", default="ViT-B-16-plus-240")
    ap.add_argument("--bundle", default=None,
                    help="existing random-weights bundle of --model (default: export one); "
                         "its first category's few-shot memory is replaced")
    ap.add_argument("--images", type=int, default=8, help="test images per round")
    ap.add_argument("--shots", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from clipinspect.export.exporter import ExportOptions, export_bundle
    from clipinspect.runtime import Inspector

    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="clipinspect-bench-") as work:
        bundle_path = Path(args.bundle) if args.bundle else Path(work) / "bundle"
        if not args.bundle:
            export_bundle(ExportOptions(bundle_path, args.model, None, ["weave"], seed=0))
        return measure(args, Inspector.open(bundle_path), argv)


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


class Sides:
    """The runtime and the eager reference on the same images and references: ``run(side,
    mode)`` -> (image scores (N,), maps [(H, W)])."""

    def __init__(self, args: argparse.Namespace, inspector, model):
        import torch

        from clipinspect.export.methods.winclip import WinClipReference

        bundle = self.bundle = inspector.bundle
        self.inspector, self.batch_size = inspector, args.batch_size
        self.reference = WinClipReference(model, bundle.manifest.section.scales)
        self.category = bundle.categories[0]
        self.images, refs = synthetic_images("weave", args.images, args.shots)
        inspector.add_references(self.category, refs)
        self.prototypes = torch.from_numpy(bundle.category(self.category).text_prototypes)
        self.memory = self.reference.features(self.tensor(refs))

    def tensor(self, batch):
        import torch

        return torch.from_numpy(self.bundle.preprocess.batch(batch))

    def run(self, side: str, mode: str):
        if side == "runtime":
            res = self.inspector.inspect(self.images, self.category, self.batch_size, mode=mode)
            return np.array([r.image_score for r in res]), [r.anomaly_map for r in res]
        scores, maps = [], []
        for i in range(0, len(self.images), self.batch_size):
            batch = self.images[i:i + self.batch_size]
            s, m = self.reference(self.tensor(batch), self.prototypes, batch[0].shape[:2],
                                  self.memory if mode == FEW_SHOT else None)
            scores.append(s.numpy())
            maps += list(m.numpy())
        return np.concatenate(scores), maps

    def differences(self) -> dict:
        """Largest |runtime - reference| of scores and maps, per scoring mode."""
        diffs = {}
        for mode in SCORING_MODES:
            (s1, m1), (s2, m2) = (self.run(side, mode) for side in SIDES)
            diffs[mode] = {"image_score": float(np.abs(s1 - s2).max()),
                           "anomaly_map": float(max(np.abs(a - b).max()
                                                    for a, b in zip(m1, m2)))}
        return diffs


def measure(args: argparse.Namespace, inspector, argv: list[str] | None = None) -> dict:
    """Equal outputs first (zero-shot and few-shot), then timing rounds of the few-shot mode,
    alternating runtime and reference; the GEMM peak and the cost model to read them against."""
    from clipinspect.export.exporter import load_clip

    bundle = inspector.bundle
    _check_bundle(bundle)
    model, _, _ = load_clip(args.model, None, bundle.manifest.model.weights.seed)
    sides = Sides(args, inspector, model)
    diffs = sides.differences()
    seconds, rates = interleaved_rounds(SIDES, lambda i: sides.run(SIDES[i], FEW_SHOT),
                                        args.rounds, args.images)
    cost = winclip_gflops(bundle.manifest, len(model.visual.transformer.resblocks))
    result = _result(args, dict(zip(SIDES, seconds)), dict(zip(SIDES, rates)), cost)
    result.update(image_size=list(sides.images[0].shape[:2]), max_abs_diff=diffs,
                  bundle=bundle.identity)
    return finish(result, args.out, render, script=__file__, argv=argv,
                  placeholders={args.bundle: "BUNDLE"} if args.bundle else None)


def _result(args: argparse.Namespace, times: dict, ips: dict, cost: dict) -> dict:
    import onnxruntime
    import torch

    return {
        "benchmark": "winclip_vs_torch", "model": args.model, "weights": "random (seeded)",
        "mode": f"WinCLIP+ {args.shots}-shot (timed); zero-shot and few-shot checked for equality",
        "images_per_round": args.images, "batch_size": args.batch_size, "rounds": args.rounds,
        "seconds_per_round": times, "images_per_second": ips,
        "ratio_runtime_over_reference": ips["runtime"] / ips["reference"],
        "gflops_per_image_cost_model": cost,
        "gflops_per_second": {k: v * cost["total"] for k, v in ips.items()},
        "gemm_peak_gflops_per_second": gemm_peak(),
        "threads": {"torch": torch.get_num_threads(), "onnxruntime": "default (physical cores)"},
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "numpy": np.__version__},
    }


def render(r: dict) -> str:
    ips, gf = r["images_per_second"], r["gflops_per_second"]
    d = r["max_abs_diff"]
    return "\n".join([
        f"# WinCLIP runtime vs PyTorch eager: {r['model']}",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Machine: {machine_text(r['machine'])}. "
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
