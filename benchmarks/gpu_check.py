"""One-command check of the GPU path on a machine with an NVIDIA GPU and TensorRT::

    python -m clipinspect.benchmarks.gpu_check [--bundle B] [--out gpu_check.json]

Without --bundle it exports ViT-S-16 with random weights (needs the 'export' extra). Then, in a
few minutes: FP16 and INT8 variants, FP32 / FP16 / INT8 engines (batch 1..4, 2 shots), and per
check one JSON entry {name, passed, detail}:

- engines: device key with SM count and memory, TF32 off in FP32 records
- native backend vs onnxruntime FP32 on the CPU, zero- and few-shot, per precision (map Pearson,
  image score difference; FP32 engines must match closely now that TF32 is off)
- few-shot memory built through the native backend (AttributeError before: no head_io)
- a batch beyond the engines' profile is refused with an error naming the limit
- onnxruntime CUDA / TensorRT providers, where installed, against the same reference
- a Triton repository of the engines gets max_batch_size = the profile's maximum

Exit status 0 when every check passed, 1 when one failed, 2 when the machine cannot run them
(no GPU, TensorRT or cupy): the JSON then holds the reason. Not a timing benchmark.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from clipinspect.runtime import Bundle, Inspector
from clipinspect.runtime.core.errors import ClipInspectError

# (min map Pearson, max |image score difference|) against onnxruntime FP32 on the CPU.
TOLERANCES = {"fp32": (0.99999, 1e-4), "fp16": (0.999, 2e-3), "int8": (0.98, 1e-2)}
BATCH = (1, 2, 4)
SHOTS = 2
CATEGORY = "weave"


class Checks:
    """Collects {name, passed, detail}; a check that raises is a failed check with the error."""

    def __init__(self):
        self.results: list[dict[str, Any]] = []

    def run(self, name: str, check: Callable[[], tuple[bool, Any]]) -> None:
        try:
            passed, detail = check()
        except Exception as e:  # a check's failure is data, the next checks still run
            passed, detail = False, f"{type(e).__name__}: {e}"
            traceback.print_exc()
        self.results.append({"name": name, "passed": bool(passed), "detail": detail})
        print(f"{'PASS' if passed else 'FAIL'}  {name}: {detail}", flush=True)

    @property
    def passed(self) -> bool:
        return all(r["passed"] for r in self.results)


def gpu_unavailable() -> str | None:
    """Why this machine cannot run the checks, or None."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return ("TensorRT's Python package is not installed: pip install "
                "'clipinspect[tensorrt-cu12]' (or -cu13), or on a Jetson use JetPack's")
    try:
        import cupy
    except ImportError:
        return "cupy is not installed: pip install cupy-cuda12x (or cupy-cuda13x)"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver
        return f"no usable CUDA GPU ({type(e).__name__}: {e})"
    return None if count > 0 else "no CUDA GPU"


def agreement(want: list, got: list) -> dict[str, float]:
    """Worst map Pearson and largest image score difference of two result lists."""
    pearson = min(float(np.corrcoef(w.anomaly_map.ravel(), g.anomaly_map.ravel())[0, 1])
                  for w, g in zip(want, got))
    diff = max(abs(w.image_score - g.image_score) for w, g in zip(want, got))
    return {"map_pearson_min": pearson, "max_image_score_diff": float(diff)}


def prepare_bundle(work: Path, bundle: str | None) -> Path:
    """A private copy of ``bundle`` (or a fresh ViT-S-16 random-weights export) with FP16 and
    INT8 variants and the few-shot references of CATEGORY."""
    from clipinspect.calibration import quantize as q
    from clipinspect.calibration.synth import generate

    path = work / "bundle"
    if bundle:
        shutil.copytree(bundle, path)
    else:
        from clipinspect.export.exporter import export_bundle

        export_bundle(path, "ViT-S-16", None, (CATEGORY,), seed=0)
    generate(work / "data", seed=5, categories=[CATEGORY], image_size=128, n_train=4,
             n_test_good=1, n_test_defect_per_type=1)
    b = Bundle.open(path)
    if CATEGORY not in b.categories:
        raise ClipInspectError(f"--bundle needs a category {CATEGORY!r} for the checks")
    for precision in ("fp16", "int8"):
        if precision not in b.precisions:
            q.quantize_bundle(path, precision, work / "data" if precision == "int8" else None,
                              holdout=1)
    return path


def check_precision(checks: Checks, path: Path, precision: str, images: list) -> None:
    from clipinspect.runtime.tensorrt.compat import BatchRange
    from clipinspect.runtime.tensorrt.engine import build_engines

    def build():
        record = build_engines(path, precision, BatchRange(*BATCH), max_shots=SHOTS,
                               workspace_mb=1024)
        return record.get("tf32") is False, {k: record.get(k) for k in ("profile", "tf32",
                                                                         "build_seconds")}
    checks.run(f"build {precision} engines", build)
    reference = Inspector.open(path, "fp32", "cpu")
    native = Inspector.open(path, precision, "tensorrt-native")
    lo, hi = TOLERANCES[precision]
    for mode in ("zero-shot", "few-shot"):
        def compare(mode=mode):
            got = agreement(reference.inspect(images, CATEGORY, batch_size=BATCH[2], mode=mode),
                            native.inspect(images, CATEGORY, batch_size=BATCH[2], mode=mode))
            return (got["map_pearson_min"] >= lo and got["max_image_score_diff"] <= hi,
                    {**got, "tolerance": [lo, hi]})
        checks.run(f"tensorrt-native {precision} {mode} vs onnxruntime fp32 cpu", compare)
    def memory():
        built, _, _ = native.build_memory(images[:SHOTS], batch_size=2)
        wanted = [n for n in native.backend.head_io["head_fewshot"][0] if n.startswith("memory_")]
        return sorted(built) == sorted(wanted), {k: list(v.shape) for k, v in built.items()}
    checks.run(f"few-shot memory through tensorrt-native {precision}", memory)

    def beyond_profile():
        try:
            native.inspect(images * 3, CATEGORY, batch_size=BATCH[2] + 1)
        except ClipInspectError as e:
            return str(BATCH[2]) in str(e), str(e)
        return False, "a batch beyond the profile was accepted"
    checks.run(f"tensorrt-native {precision} refuses a batch beyond the profile", beyond_profile)


def check_onnxruntime(checks: Checks, path: Path, images: list) -> None:
    from clipinspect.runtime.core.backends import available_providers

    reference = Inspector.open(path, "fp32", "cpu")
    for provider in ("cuda", "tensorrt"):
        if provider not in available_providers():
            checks.results.append({"name": f"onnxruntime {provider}", "passed": True,
                                   "detail": "skipped: provider not installed"})
            continue
        for precision in ("fp32", "fp16"):
            def compare(provider=provider, precision=precision):
                other = Inspector.open(path, precision, provider, batch_size=BATCH[2])
                got = agreement(reference.inspect(images, CATEGORY, batch_size=BATCH[2]),
                                other.inspect(images, CATEGORY, batch_size=BATCH[2]))
                lo, hi = TOLERANCES[precision]
                return got["map_pearson_min"] >= lo and got["max_image_score_diff"] <= hi, got
            checks.run(f"onnxruntime {provider} {precision} vs cpu fp32", compare)


def check_triton(checks: Checks, path: Path, work: Path) -> None:
    from clipinspect.runtime.triton.repository import ENCODER, write_repository

    def max_batch():
        out = write_repository(path, work / "triton", platform="tensorrt", precision="fp16")
        text = (out / ENCODER / "config.pbtxt").read_text()
        return f"max_batch_size: {BATCH[2]}\n" in text, text.splitlines()[:3]
    checks.run("triton tensorrt max_batch_size = engine profile maximum", max_batch)


def device_info() -> dict[str, Any]:
    from clipinspect.runtime.tensorrt.engine import current_device, import_tensorrt

    trt, cupy = import_tensorrt()
    device = current_device(trt, cupy)
    return {**device.to_json(), "key": device.key, "cupy": cupy.__version__,
            "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clipinspect.benchmarks.gpu_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", help="a bundle with a 'weave' category (default: export "
                                    "ViT-S-16 with random weights)")
    p.add_argument("--out", default="gpu_check.json", help="the JSON report to write")
    args = p.parse_args(argv)
    report: dict[str, Any] = {"format": "clipinspect-gpu-check", "version": 1,
                              "python": platform.python_version(), "machine": platform.machine()}
    reason = gpu_unavailable()
    if reason:
        report.update(passed=False, error=f"cannot run the GPU checks here: {reason}")
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(report["error"], file=sys.stderr)
        return 2
    checks = Checks()
    report["device"] = device_info()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(3)]
    with tempfile.TemporaryDirectory(prefix="clipinspect-gpu-check-") as tmp:
        work = Path(tmp)
        path = prepare_bundle(work, args.bundle)
        Inspector.open(path, "fp32", "cpu").add_references(CATEGORY, images[:SHOTS])
        for precision in ("fp32", "fp16", "int8"):
            check_precision(checks, path, precision, images)
        check_onnxruntime(checks, path, images)
        check_triton(checks, path, work)
    report.update(passed=checks.passed, checks=checks.results)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'all checks passed' if checks.passed else 'some checks FAILED'}; report: {args.out}")
    return 0 if checks.passed else 1


if __name__ == "__main__":
    sys.exit(main())
