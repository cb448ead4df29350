"""One-command check of the GPU path on a machine with an NVIDIA GPU::

    python -m clipinspect.benchmarks.gpu_check [--bundle B] [--out gpu_check.json]

Without --bundle it exports ViT-S-16 with random weights (needs the 'export' extra). It makes the
FP16 and INT8 variants, then runs every group of checks this machine can run and says which
groups it skipped and why, so onnxruntime-gpu alone already gives a full verdict on the
onnxruntime CUDA path. One JSON entry {name, passed, detail} per check:

- onnxruntime CUDA provider (onnxruntime-gpu): FP32 against onnxruntime FP32 on the CPU, maps
  and image scores within 1e-4 with TF32 off (the session's use_tf32 option is read back),
  FP16 within its bound, INT8 within its bound, zero- and few-shot; throughput (images/s, encoder
  and head) at batch 1, 8 and 32 per precision with the GPU memory in use
- onnxruntime TensorRT provider (onnxruntime-gpu and TensorRT 10): the same agreement checks;
  FP32 held to the TF32 bound unless NVIDIA_TF32_OVERRIDE=0 (its TensorRT provider has no TF32
  option: docs/deployment.md), FP16 to the FP16 bound
- native TensorRT (TensorRT and cupy): engines per precision (device key, TF32 off, the INT8
  encoder from the FP16-between-Q/DQ graph, shared head engines), native results against
  onnxruntime FP32 on the CPU per precision and mode, few-shot memory through the native
  backend, a batch beyond the profile refused, a Triton repository's max_batch_size

Exit status 0 when every check that ran passed, 1 when one failed, 2 when no group can run here
(no usable GPU provider, no TensorRT): the JSON then holds each group's reason.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import time
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from clipinspect.runtime import Bundle, Inspector
from clipinspect.runtime.core.errors import ClipInspectError
from clipinspect.runtime.core.names import HEADS, PRECISIONS, QUANTIZED_PRECISIONS, SCORING_MODES

from .report import command_line, environment, write_json

# (min map Pearson, max |image score difference|) against onnxruntime FP32 on the CPU.
TOLERANCES = {"fp32": (0.99999, 1e-4), "fp16": (0.999, 2e-3), "int8": (0.98, 1e-2)}
# FP32 with TF32 matrix products (onnxruntime's TensorRT provider: no option turns TF32 off).
TF32_TOLERANCE = (0.9999, 1e-3)
BATCH = (1, 2, 4)
THROUGHPUT_BATCHES = (1, 8, 32)
SHOTS = 2
CATEGORY = "weave"


def ort_tolerance(provider: str, precision: str, environ=os.environ) -> tuple[float, float]:
    """The bound an onnxruntime GPU provider's results are held to (docs/deployment.md)."""
    if (provider == "tensorrt" and precision == "fp32"
            and environ.get("NVIDIA_TF32_OVERRIDE") != "0"):
        return TF32_TOLERANCE
    return TOLERANCES[precision]


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
        """Every check that ran passed, and at least one ran."""
        return bool(self.results) and all(r["passed"] for r in self.results)


def gpu_unavailable() -> str | None:
    """Why this machine cannot run the native TensorRT checks, or None."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return ("TensorRT's Python package is not installed: pip install "
                "'clipinspect[gpu-tensorrt-cu13]' (or -cu12), or on a Jetson use JetPack's")
    try:
        import cupy
    except ImportError:
        return "cupy is not installed: pip install cupy-cuda13x (or cupy-cuda12x)"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver
        return f"no usable CUDA GPU ({type(e).__name__}: {e})"
    return None if count > 0 else "no CUDA GPU"


def capabilities() -> dict[str, str | None]:
    """{group of checks: None where it can run here, else why not}. The onnxruntime providers
    are tried on a one-node session: listed by onnxruntime is not the same as loading."""
    from clipinspect.runtime.core.provider_probe import probe_provider

    groups: dict[str, str | None] = {}
    for provider in ("cuda", "tensorrt"):
        try:
            got = probe_provider(provider)
        except ClipInspectError as e:   # no onnxruntime at all
            groups[f"onnxruntime {provider}"] = str(e)
            continue
        runs = got["available"] and not got["fell_back"]
        groups[f"onnxruntime {provider}"] = None if runs else (got["reason"] or "not usable")
    groups["native tensorrt"] = gpu_unavailable()
    return groups


def open_inspector(path: Path, precision: str, provider: str, batch_size: int | None = None):
    return Inspector.open(path, precision, provider, batch_size=batch_size)


def cuda_provider_options(inspector) -> dict[str, str]:
    """The options onnxruntime's CUDA provider runs the encoder session with (as it reports
    them: strings)."""
    return inspector.backend.encoder.get_provider_options().get("CUDAExecutionProvider", {})


def gpu_memory_used_mib() -> float | str:
    """Device memory in use (all processes and contexts, this check's own included), from the
    CUDA runtime's cudaMemGetInfo; a string saying why where it cannot be read."""
    from clipinspect.runtime.core.gpu_libraries import LIBRARIES, wheel_library_dirs

    dirs = wheel_library_dirs()
    for name in LIBRARIES["CUDA runtime"][0]:
        for candidate in [name, *(str(d / name) for d in dirs if (d / name).exists())]:
            try:
                lib = ctypes.CDLL(candidate)
            except OSError:
                continue
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            if lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) != 0:
                return f"not measured: cudaMemGetInfo failed ({candidate})"
            return round((total.value - free.value) / 2 ** 20, 1)
    return "not measured: no CUDA runtime library found"


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
    for precision in QUANTIZED_PRECISIONS:
        # An INT8 variant from before the FP16-between-Q/DQ graph is made again (a private copy).
        stale = precision == "int8" and "encoder_fp16" not in b.manifest.graphs.get("int8", {})
        if precision not in b.precisions or stale:
            q.quantize_bundle(path, precision, work / "data" if precision == "int8" else None,
                              holdout=1, overwrite=True)
    return path


def check_precision(checks: Checks, path: Path, precision: str, images: list) -> None:
    from clipinspect.runtime.tensorrt.compat import BatchRange
    from clipinspect.runtime.tensorrt.engine import build_engines

    def build():
        record = build_engines(path, precision, BatchRange(*BATCH), max_shots=SHOTS,
                               workspace_mb=1024)
        ok = record.get("tf32") is False
        if precision == "int8":   # INT8 engines come from the FP16-between-Q/DQ graph
            ok = ok and record.get("encoder_graph") == "encoder_fp16"
        if precision != "fp32":   # built after fp32 with the same profile: heads shared
            ok = ok and record.get("heads_reused") == list(HEADS)
        return ok, {k: record.get(k) for k in ("profile", "tf32", "encoder_graph",
                                               "heads_reused", "build_seconds")}
    checks.run(f"build {precision} engines", build)
    reference = Inspector.open(path, "fp32", "cpu")
    native = Inspector.open(path, precision, "tensorrt-native")
    lo, hi = TOLERANCES[precision]
    for mode in SCORING_MODES:
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


def check_onnxruntime(checks: Checks, path: Path, images: list, provider: str) -> None:
    """onnxruntime ``provider`` (cuda or tensorrt) per precision and mode against onnxruntime
    FP32 on the CPU, within :func:`ort_tolerance`; CUDA FP32 also needs use_tf32 0."""
    reference = open_inspector(path, "fp32", "cpu")
    for precision in PRECISIONS:
        opened: dict[str, Any] = {}
        lo, hi = ort_tolerance(provider, precision)
        for mode in SCORING_MODES:
            def compare(precision=precision, mode=mode, lo=lo, hi=hi):
                if "inspector" not in opened:
                    opened["inspector"] = open_inspector(path, precision, provider, BATCH[2])
                other = opened["inspector"]
                got = agreement(reference.inspect(images, CATEGORY, batch_size=BATCH[2], mode=mode),
                                other.inspect(images, CATEGORY, batch_size=BATCH[2], mode=mode))
                ok = got["map_pearson_min"] >= lo and got["max_image_score_diff"] <= hi
                detail = {**got, "tolerance": [lo, hi]}
                if provider == "cuda" and precision == "fp32":
                    detail["use_tf32"] = cuda_provider_options(other).get("use_tf32")
                    ok = ok and detail["use_tf32"] == "0"
                return ok, detail
            checks.run(f"onnxruntime {provider} {precision} {mode} vs cpu fp32", compare)


def throughput(inspector, batch: int, repeats: int = 5) -> dict[str, Any]:
    """Images per second through encoder and zero-shot head at ``batch`` (median of
    ``repeats`` after two warm-up runs; results come back to the host, so each run is
    complete when timed) and the GPU memory in use afterwards."""
    rng = np.random.default_rng(batch)
    rgb = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    x = inspector.bundle.preprocess.batch([rgb] * batch)

    def once() -> float:
        t0 = time.perf_counter()
        inspector.score(inspector.backend.encode(x), CATEGORY, "zero-shot")
        return time.perf_counter() - t0

    once(), once()
    median = float(np.median([once() for _ in range(repeats)]))
    return {"batch": batch, "median_s": round(median, 6),
            "images_per_s": round(batch / median, 1), "gpu_memory_used_mib": gpu_memory_used_mib()}


def check_throughput(checks: Checks, path: Path, provider: str) -> None:
    for precision in PRECISIONS:
        def measure(precision=precision):
            inspector = open_inspector(path, precision, provider, max(THROUGHPUT_BATCHES))
            rows = [throughput(inspector, b) for b in THROUGHPUT_BATCHES]
            return all(r["images_per_s"] > 0 for r in rows), rows
        checks.run(f"throughput onnxruntime {provider} {precision} (batch "
                   f"{'/'.join(map(str, THROUGHPUT_BATCHES))})", measure)


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


def run_checks(checks: Checks, groups: dict[str, str | None], args, images: list,
               report: dict[str, Any]) -> None:
    """Every group of checks ``groups`` says can run, on a bundle made in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="clipinspect-gpu-check-") as tmp:
        work = Path(tmp)
        path = prepare_bundle(work, args.bundle)
        open_inspector(path, "fp32", "cpu").add_references(CATEGORY, images[:SHOTS])
        for provider in ("cuda", "tensorrt"):
            if groups[f"onnxruntime {provider}"] is None:
                check_onnxruntime(checks, path, images, provider)
        if groups["onnxruntime cuda"] is None:
            check_throughput(checks, path, "cuda")
        if groups["native tensorrt"] is None:
            report["device"] = device_info()
            for precision in PRECISIONS:
                check_precision(checks, path, precision, images)
            check_triton(checks, path, work)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clipinspect.benchmarks.gpu_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", help="a bundle with a 'weave' category (default: export "
                                    "ViT-S-16 with random weights)")
    p.add_argument("--out", default="gpu_check.json", help="the JSON report to write")
    args = p.parse_args(argv)
    report: dict[str, Any] = {"format": "clipinspect-gpu-check", "version": 2,
                              "command": command_line("python -m clipinspect.benchmarks.gpu_check",
                                                      argv, {args.bundle: "BUNDLE"}
                                                      if args.bundle else None),
                              "python": platform.python_version(), "machine": platform.machine(),
                              "environment": environment()}
    groups = capabilities()
    report["groups"] = {g: "ran" if why is None else f"skipped: {why}" for g, why in
                        groups.items()}
    for group, why in groups.items():
        print(f"{'RUN ' if why is None else 'SKIP'}  {group}" + (f": {why}" if why else ""),
              flush=True)
    if all(why is not None for why in groups.values()):
        report.update(passed=False, error="cannot run the GPU checks here: " + "; ".join(
            f"{g}: {why}" for g, why in groups.items()))
        write_json(report, args.out)
        print(report["error"], file=sys.stderr)
        return 2
    checks = Checks()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(3)]
    run_checks(checks, groups, args, images, report)
    report.update(passed=checks.passed, checks=checks.results)
    write_json(report, args.out)
    skipped = [g for g, why in groups.items() if why is not None]
    print(f"{'all checks that ran passed' if checks.passed else 'some checks FAILED'}"
          f"{' (skipped: ' + ', '.join(skipped) + ')' if skipped else ''}; report: {args.out}")
    return 0 if checks.passed else 1


if __name__ == "__main__":
    sys.exit(main())
