"""``clipinspect bench``: latency and throughput of the whole inspection pipeline per backend,
precision, mode and batch size, with the PyTorch eager evaluation of the same algorithm in the
same run, and a fixed-frame-rate stream mode.

Stages are timed separately on every run, named as the Inspector names them (names.STAGES):
load (decode and resize on the host), encode (encoder), score (scoring head), post (upsampling
to the image size, thresholding), and end to end. Result files written before these names
(decode, encoder, head) are still read (:func:`stage`). onnxruntime's
``run`` and ``run_with_iobinding`` return when the device work is done, so GPU stage times are
synchronized. Warm-up runs are excluded from every statistic.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from clipinspect.runtime import Bundle, Inspector
from clipinspect.runtime.core.backends import ProviderError, available_providers
from clipinspect.runtime.core.images import to_rgb_array
from clipinspect.runtime.core.maps import upsample
from clipinspect.runtime.core.names import (ATTENTION_CHOICES, ENCODE, END_TO_END, FEW_SHOT,
                                            LOAD, PRECISIONS, SCORE, SCORING_MODES)
from clipinspect.runtime.core.names import STAGES as INSPECTION_STAGES
from clipinspect.runtime.methods import gflops_per_image as method_gflops
from clipinspect.runtime.methods import transformer_layers

from .harness import DEFECTS, IMAGE_SIZE
from .report import command, command_line, machine, machine_text, read_text, write_results
from .rss_probe import render_rss, rss_per_image
from .stats import run_stream, summarize

STAGES = (*INSPECTION_STAGES, END_TO_END)
# The PyTorch baseline is one eager call: its model and post-processing are timed together.
MODEL_AND_POST = "model_and_post"
# Stage names of result files written before the stages had one vocabulary.
OLD_STAGE_NAMES = {LOAD: "decode", ENCODE: "encoder", SCORE: "head"}
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32)
PIXEL_THRESHOLD = 0.5  # thresholding a map is part of post-processing on a line


def log(msg: str) -> None:
    print(msg, flush=True)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux), so each configuration reports
    its own peak. False where that is not possible (the peak then includes earlier ones)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    for line in (read_text("/proc/self/status") or "").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except Exception:
        return None


def gpu_memory_mb() -> float | None:
    """GPU memory this process holds (onnxruntime's arena only grows, so after a configuration
    this is its peak plus what earlier configurations left)."""
    out = command("nvidia-smi", "--query-compute-apps=pid,used_memory",
                   "--format=csv,noheader,nounits")
    if not out:
        return None
    for line in out.splitlines():
        pid, used = (x.strip() for x in line.split(","))
        if pid == str(os.getpid()):
            return float(used)
    return None


def is_out_of_memory(e: BaseException) -> bool:
    text = f"{type(e).__name__}: {e}".lower()
    return isinstance(e, MemoryError) or any(s in text for s in (
        "out of memory", "failed to allocate", "cudaerrormemoryallocation", "bad_alloc"))


def cpu_gemm_peak(repeats: int = 5) -> float:
    """GFLOP/s of one large FP32 matrix product shaped like a window MLP layer (numpy's BLAS,
    all cores, median): the practical FP32 ceiling of this CPU."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6760, 896), dtype=np.float32)
    b = rng.standard_normal((896, 3584), dtype=np.float32)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * 6760 * 896 * 3584 / float(np.median(times)) / 1e9


def gflops_per_image(bundle: Bundle) -> float:
    """Matrix-product GFLOPs the exported encoder executes per image (docs/methods.md#cost-model;
    the cost model of the bundle's method)."""
    return method_gflops(bundle.manifest, transformer_layers(bundle))


# --------------------------------------------------------------------------------- pipeline
@dataclass
class Workload:
    """Images on disk (decoded on every run, as on a line) and their category."""

    paths: list[Path]
    references: list[Path]
    category: str

    def batch(self, run: int, size: int) -> list[Path]:
        return [self.paths[(run * size + j) % len(self.paths)] for j in range(size)]


def make_workload(bundle: Bundle, folder: Path, n_images: int, shots: int) -> Workload:
    from PIL import Image

    from clipinspect.calibration.synth import CATEGORIES, render_sample

    category = next((c for c in bundle.categories if c in CATEGORIES), bundle.categories[0])
    style = category if category in CATEGORIES else "weave"
    paths, refs = [], []
    for i in range(n_images):
        p = folder / f"test_{i:03d}.png"
        Image.fromarray(render_sample(style, "test", DEFECTS[i % len(DEFECTS)], i,
                                      image_size=IMAGE_SIZE)[0]).save(p)
        paths.append(p)
    for i in range(shots):
        p = folder / f"ref_{i:03d}.png"
        Image.fromarray(render_sample(style, "train", "good", i, image_size=IMAGE_SIZE)[0]).save(p)
        refs.append(p)
    return Workload(paths, refs, category)


def time_runtime(inspector: Inspector, work: Workload, mode: str, memory: dict | None,
                 batch: int, runs: int) -> dict[str, list[float]]:
    """Stage seconds of ``runs`` batches through the runtime."""
    times: dict[str, list[float]] = {s: [] for s in STAGES}
    for r in range(runs):
        t0 = time.perf_counter()
        rgbs = [to_rgb_array(p) for p in work.batch(r, batch)]
        x = inspector.bundle.preprocess.batch(rgbs)
        t1 = time.perf_counter()
        encoded = inspector.backend.encode(x)
        t2 = time.perf_counter()
        scores, grids, _ = inspector.score(encoded, work.category, mode, memory)
        t3 = time.perf_counter()
        for im, g in zip(rgbs, grids):
            _ = upsample(g, im.shape[:2]) >= PIXEL_THRESHOLD
        t4 = time.perf_counter()
        for name, dt in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
            times[name].append(dt)
    return times


BASELINE_RANDOM_WEIGHTS = (
    "note: the PyTorch baseline uses the bundle's random weights (seed {seed}), as the bundle "
    "does: its timings are valid, its scores mean nothing")


class TorchBaseline:
    """The PyTorch eager evaluation of the same algorithm (WinClipReference,
    export/methods/winclip.py) on the bundle's weights: FP32 on the CPU; FP32 and FP16 on a CUDA
    GPU."""

    def __init__(self, bundle: Bundle, device: str, dtype: str):
        import torch

        from clipinspect.export.exporter import load_clip
        from clipinspect.export.methods.winclip import WinClipReference

        weights = bundle.manifest.model.weights
        if weights.kind == "random":
            pretrained = None
        elif weights.kind == "tag":
            pretrained = weights.tag
        else:
            pretrained = weights.path
            if not pretrained or not Path(pretrained).is_file():
                raise RuntimeError(f"the bundle's checkpoint {pretrained!r} is not on this machine")
        # Not the exporter's "exporting with RANDOM weights" warning: nothing is exported here
        # (_baselines says what the random weights mean for the baseline).
        model, _, _ = load_clip(bundle.manifest.model.name, pretrained, weights.seed or 0,
                                warn_random=False)
        self.torch = torch
        self.device = torch.device(device)
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
        model = model.to(self.device, self.dtype).eval()
        self.reference = WinClipReference(model, bundle.manifest.section.scales)
        self.bundle = bundle

    def tensor(self, x: np.ndarray):
        return self.torch.from_numpy(x).to(self.device, self.dtype)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def memory(self, work: Workload):
        x = self.bundle.preprocess.batch([to_rgb_array(p) for p in work.references])
        return self.reference.features(self.tensor(x))

    def time(self, work: Workload, mode: str, memory, batch: int, runs: int
             ) -> dict[str, list[float]]:
        data = self.bundle.category(work.category)
        prototypes = self.tensor(data.text_prototypes)
        times: dict[str, list[float]] = {LOAD: [], MODEL_AND_POST: [], END_TO_END: []}
        for r in range(runs):
            t0 = time.perf_counter()
            rgbs = [to_rgb_array(p) for p in work.batch(r, batch)]
            x = self.bundle.preprocess.batch(rgbs)
            t1 = time.perf_counter()
            scores, maps = self.reference(self.tensor(x), prototypes, rgbs[0].shape[:2],
                                          memory if mode == FEW_SHOT else None)
            _ = (maps >= 0.5).cpu()
            self.sync()
            t2 = time.perf_counter()
            times[LOAD].append(t1 - t0)
            times[MODEL_AND_POST].append(t2 - t1)
            times[END_TO_END].append(t2 - t0)
        return times


# ------------------------------------------------------------------------------------ sweep
@dataclass(frozen=True)
class BenchOptions:
    """What ``clipinspect bench`` sweeps, and how long.

    batches: batch sizes, tried in increasing order until out of memory. shots: references for
    few-shot. runs / warmup: timed and untimed runs per row. images: distinct synthetic images.
    baseline: also time the PyTorch eager evaluation. stream_fps: also simulate a camera at this
    frame rate, stream_frames frames, deadline stream_deadline_ms (default one frame period).
    threads: onnxruntime intra-op threads (None: one per physical core). attention: which
    encoder graph onnxruntime runs (auto, fused or standard; each row names the one that ran).
    rss_megapixels: JPEG sizes (megapixels) whose peak RSS per image is measured, each in a
    child process (rss_probe.py); empty: none.
    """

    backends: Sequence[str] = ("cpu",)
    precisions: Sequence[str] = ("fp32",)
    modes: Sequence[str] = ("few-shot",)
    batches: Sequence[int] = DEFAULT_BATCHES
    shots: int = 4
    runs: int = 5
    warmup: int = 1
    images: int = 16
    baseline: bool = True
    stream_fps: float | None = None
    stream_frames: int = 30
    stream_deadline_ms: float | None = None
    threads: int | None = None
    rss_megapixels: Sequence[float] = (1, 12, 64)
    attention: str = "auto"

    def check(self) -> None:
        from clipinspect.runtime.core.backends import PROVIDERS
        from clipinspect.runtime.core.errors import UsageError

        for name, values, known in (("backend", self.backends, PROVIDERS),
                                    ("mode", self.modes, SCORING_MODES),
                                    ("precision", self.precisions, PRECISIONS)):
            bad = [v for v in values if v not in known]
            if bad or not values:
                raise UsageError(f"unknown {name} {bad[0] if bad else '(none given)'!r}: choose "
                                 f"from {', '.join(known)}")
        if self.warmup < 0 or self.runs < 1:
            raise UsageError(f"need --runs >= 1 and --warmup >= 0, got {self.runs} and "
                             f"{self.warmup}")
        if self.attention not in ATTENTION_CHOICES:
            raise UsageError(f"unknown attention {self.attention!r}: choose from "
                             f"{', '.join(ATTENTION_CHOICES)}")

    def command(self, out: str | Path) -> str:
        """The ``clipinspect bench`` command that sweeps these options (the bundle as BUNDLE):
        what a result file records to be reproduced."""
        def joined(values) -> str:
            return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
        args = ["--out", str(out), "--backends", joined(self.backends),
                "--precisions", joined(self.precisions), "--modes", joined(self.modes),
                "--batch-sizes", joined(self.batches), "--shots", str(self.shots),
                "--runs", str(self.runs), "--warmup", str(self.warmup),
                "--images", str(self.images),
                "--rss-megapixels", joined(self.rss_megapixels) or "none"]
        if not self.baseline:
            args.append("--no-baseline")
        if self.stream_fps is not None:
            args += ["--stream-fps", f"{self.stream_fps:g}", "--stream-frames",
                     str(self.stream_frames)]
            if self.stream_deadline_ms is not None:
                args += ["--deadline-ms", f"{self.stream_deadline_ms:g}"]
        if self.threads is not None:
            args += ["--threads", str(self.threads)]
        if self.attention != "auto":
            args += ["--attention", self.attention]
        return command_line("clipinspect bench BUNDLE", args)


@dataclass(frozen=True)
class Target:
    """What a row times: the runtime or the PyTorch baseline, on which backend (device) and
    precision (dtype)."""

    kind: str
    backend: str
    precision: str
    #: The bundle's encoder graph the runtime ran (encoder, or encoder_fused with onnxruntime's
    #: fused attention); None for PyTorch.
    encoder_graph: str | None = None


def _row(target: Target, mode: str, batch: int, times: dict[str, list[float]],
         warmup: int) -> dict:
    return {"kind": target.kind, "backend": target.backend, "precision": target.precision,
            "encoder_graph": target.encoder_graph, "mode": mode, "batch": batch,
            "stages": {s: summarize(v, warmup, batch) for s, v in times.items()},
            "images_per_second": summarize(times[END_TO_END], warmup, batch)["images_per_second"]}


def stage(row: dict, name: str) -> dict:
    """The summary of stage ``name`` in a result row, also of a file written before the stage
    names were the Inspector's (decode, encoder, head)."""
    stages = row["stages"]
    return stages[name] if name in stages else stages[OLD_STAGE_NAMES[name]]


def run_bench(bundle_path: str | Path, out: str | Path, options: BenchOptions = BenchOptions(),
              progress: Callable[[str], None] = log) -> dict:
    """Sweep, write ``out``/bench.json, bench.md and bench.png (with matplotlib; the result's
    ``plot_drawn`` says whether it was), and return the result."""
    options.check()
    bundle = Bundle.open(bundle_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "schema": "clipinspect-bench/1", "command": options.command(out),
        "bundle": bundle.identity,
        "model": bundle.manifest.model.name,
        "weights": bundle.manifest.model.weights.kind,
        "config": {"backends": list(options.backends), "precisions": list(options.precisions),
                   "modes": list(options.modes), "batches": list(options.batches),
                   "shots": options.shots, "runs": options.runs, "warmup": options.warmup,
                   "images": options.images, "image_size": [IMAGE_SIZE, IMAGE_SIZE]},
        "machine": machine(), "rows": [], "skipped": [], "stream": [],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with tempfile.TemporaryDirectory(prefix="clipinspect-bench-") as tmp:
        work = make_workload(bundle, Path(tmp), options.images, options.shots)
        _runtime_rows(result, bundle, work, options, progress)
        if options.baseline:
            _baselines(result, bundle, work, options, progress)
        if options.rss_megapixels:
            progress(f"peak RSS per image for {', '.join(f'{mp:g}' for mp in options.rss_megapixels)}"
                     " MP JPEGs (one child process each)")
            result["rss_per_image"] = rss_per_image(bundle.root, Path(tmp),
                                                    options.rss_megapixels,
                                                    precision=options.precisions[0])
    _ratios(result)
    _ceiling(result, bundle)
    write_results(result, out / "bench", render, indent=1, echo=False)
    result["plot_drawn"] = plot(result, out / "bench.png")  # not in bench.json
    return result


def _runtime_rows(result: dict, bundle: Bundle, work: Workload, options: BenchOptions,
                  progress: Callable[[str], None]) -> None:
    """The runtime's rows (and stream runs) for every backend and precision that can run."""
    try:
        have = set(available_providers())
    except ProviderError:  # onnxruntime not installed: every backend is skipped with a reason
        have = set()
    for backend in options.backends:
        if backend not in have:
            result["skipped"].append({"what": f"backend {backend}", "reason":
                                      f"not available in this onnxruntime "
                                      f"(has: {', '.join(sorted(have)) or 'none'})"})
            continue
        for precision in options.precisions:
            if precision not in bundle.precisions:
                result["skipped"].append({"what": f"{backend}/{precision}", "reason":
                                          f"the bundle has no {precision} graphs ('clipinspect "
                                          f"quantize')"})
                continue
            try:
                inspector = Inspector.open(bundle, precision, backend, options.threads,
                                           attention=options.attention)
            except ProviderError as e:
                result["skipped"].append({"what": f"{backend}/{precision}", "reason": str(e)})
                continue
            target = Target("runtime", backend, precision, inspector.encoder_graph)
            _sweep(result, target, options,
                   lambda mode: (inspector.build_memory(work.references)[0]
                                 if mode == "few-shot" else None),
                   lambda mode, mem, b: time_runtime(inspector, work, mode, mem, b,
                                                     options.warmup + options.runs), progress)
            if options.stream_fps:
                result["stream"].append(_stream(inspector, work, target, options))
                st = result["stream"][-1]
                progress(f"stream   {backend:8s} {precision:5s} {st['fps']:g} frames/s: "
                         f"{st['deadline_misses']}/{st['frames']} deadline misses")


def _ceiling(result: dict, bundle: Bundle) -> None:
    """Each CPU row's share of the FP32 ceiling: the GEMM peak measured before it over the cost
    model's GFLOPs per image."""
    if not any(r.get("cpu_fp32_gemm_peak_gflops_per_second") for r in result["rows"]):
        return
    gflops = gflops_per_image(bundle)
    result["ceiling"] = {"gflops_per_image": gflops, "note": (
        "the FP32 ceiling of a CPU row is the GEMM peak measured just before it divided by "
        "the cost model's GFLOPs per image; INT8 rows can exceed it (integer products are "
        "not bound by the FP32 peak)")}
    for row in result["rows"]:
        peak = row.get("cpu_fp32_gemm_peak_gflops_per_second")
        if peak:
            row["cpu_fp32_ceiling_images_per_second"] = peak / gflops
            row["share_of_cpu_fp32_ceiling"] = row["images_per_second"] * gflops / peak


def _sweep(result: dict, target: Target, options: BenchOptions, memory_for, timer,
           progress: Callable[[str], None]) -> None:
    """One row per mode and batch size of ``target``: ``memory_for(mode)`` builds the few-shot
    memory, ``timer(mode, memory, batch)`` returns the stage times of all runs."""
    kind, backend, precision = target.kind, target.backend, target.precision
    for mode in options.modes:
        memory = memory_for(mode)
        for b in sorted(options.batches):
            # The yardstick is measured right before the row: this machine's speed drifts.
            peak = cpu_gemm_peak(3) if (kind, backend) == ("runtime", "cpu") else None
            reset = reset_peak_rss()
            try:
                times = timer(mode, memory, b)
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                result["skipped"].append({"what": f"{kind} {backend}/{precision}/{mode} batch "
                                                  f">= {b}", "reason": "out of memory"})
                break
            row = _row(target, mode, b, times, options.warmup)
            row["peak_host_rss_mb"] = peak_rss_mb()
            row["peak_rss_is_per_configuration"] = reset
            row["gpu_memory_mb"] = gpu_memory_mb() if backend != "cpu" else None
            if peak:
                row["cpu_fp32_gemm_peak_gflops_per_second"] = peak
            result["rows"].append(row)
            progress(f"{kind:8s} {backend:8s} {precision:5s} {mode:9s} batch {b:3d}: "
                     f"{row['images_per_second']:8.3f} img/s, p50 "
                     f"{stage(row, END_TO_END)['p50_ms']:.0f} ms"
                     + (f" ({target.encoder_graph})" if target.encoder_graph else ""))


def _baselines(result: dict, bundle: Bundle, work: Workload, options: BenchOptions,
               progress: Callable[[str], None]) -> None:
    if bundle.manifest.method != "winclip" or bundle.manifest.adaptation:
        from clipinspect.runtime.methods import describe
        result["skipped"].append({"what": "PyTorch baseline", "reason": (
            "the baseline is the eager reference of plain WinCLIP; this bundle's method is "
            f"{describe(bundle.manifest)}")})
        return
    try:
        import torch
    except ImportError:
        result["skipped"].append({"what": "PyTorch baseline", "reason":
                                  "torch is not installed (pip install 'clipinspect[export]')"})
        return
    targets = [("cpu", "fp32")]
    if any(b in ("cuda", "tensorrt") for b in options.backends):
        if torch.cuda.is_available():
            targets = [("cuda", "fp32"), ("cuda", "fp16")]
        else:
            result["skipped"].append({"what": "PyTorch baseline on the GPU",
                                      "reason": "torch.cuda is not available; baseline on the CPU"})
    weights = bundle.manifest.model.weights
    if weights.kind == "random":
        progress(BASELINE_RANDOM_WEIGHTS.format(seed=weights.seed or 0))
    for device, dtype in targets:
        try:
            base = TorchBaseline(bundle, device, dtype)
        except Exception as e:
            result["skipped"].append({"what": f"PyTorch baseline {device}/{dtype}",
                                      "reason": f"{type(e).__name__}: {e}"})
            continue
        _sweep(result, Target("pytorch", device, dtype), options,
               lambda mode: base.memory(work) if mode == "few-shot" else None,
               lambda mode, mem, b: base.time(work, mode, mem, b, options.warmup + options.runs),
               progress)


def _ratios(result: dict) -> None:
    """Each runtime row's throughput over the PyTorch baseline's at the same mode and batch
    (the FP32 baseline on the same kind of device)."""
    base = {}
    for r in result["rows"]:
        if r["kind"] == "pytorch" and r["precision"] == "fp32":
            base[(r["backend"] == "cpu", r["mode"], r["batch"])] = r["images_per_second"]
    for r in result["rows"]:
        if r["kind"] != "runtime":
            continue
        ref = base.get((r["backend"] == "cpu", r["mode"], r["batch"]))
        r["ratio_to_pytorch_fp32"] = r["images_per_second"] / ref if ref else None


def _stream(inspector: Inspector, work: Workload, target: Target, options: BenchOptions) -> dict:
    """A camera at ``options.stream_fps`` feeding the first mode, one image per frame."""
    mode = options.modes[0]
    memory = inspector.build_memory(work.references)[0] if mode == "few-shot" else None
    time_runtime(inspector, work, mode, memory, 1, 1)  # warm

    def process(i: int) -> None:
        one = Workload([work.paths[i % len(work.paths)]], work.references, work.category)
        time_runtime(inspector, one, mode, memory, 1, 1)

    deadline_ms = options.stream_deadline_ms
    res = run_stream(process, options.stream_fps, options.stream_frames,
                     None if deadline_ms is None else deadline_ms / 1e3)
    return {"backend": target.backend, "precision": target.precision, "mode": mode,
            **res.summary()}


# ----------------------------------------------------------------------------------- output
def _f(v, fmt=".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def render(r: dict) -> str:
    """bench.md: the header (command, machine, what was timed), one table row per
    configuration, then the ceiling, memory per image, what was skipped and the stream runs."""
    lines = _header(r) + [
        "| kind | backend | precision | mode | batch | images/s | ratio to PyTorch FP32 | "
        "p50 | p90 | p95 | p99 | max | load p50 | encode p50 | score p50 | post p50 | "
        "peak RSS MB | GPU MB | encoder graph |", "|" + "---|" * 19]
    lines += [_table_row(row) for row in r["rows"]]
    lines += _ceiling_lines(r)
    lines += render_rss(r.get("rss_per_image") or [])
    if r["skipped"]:
        lines += ["", "Skipped:"] + [f"- {s['what']}: {s['reason']}" for s in r["skipped"]]
    lines += _stream_lines(r.get("stream") or [])
    return "\n".join(lines) + "\n"


def _header(r: dict) -> list[str]:
    m = r["machine"]
    gpu = "; ".join(g["name"] for g in m.get("gpus", [])) or "none"
    return [f"# clipinspect bench: {r['model']} ({r['weights']} weights)", "",
            *([f"Command: `{r['command']}`", ""] if r.get("command") else []),
            f"Machine: {machine_text(m)}; GPU: {gpu}"
            + (f", CUDA {m['cuda']}" if m.get("cuda") else "")
            + (f"; Jetson {m['jetson']['model']}, power mode {m['jetson']['power_mode']}"
               if m.get("jetson") else "") + ".",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
            f"Bundle `{r['bundle']}`. {r['config']['images']} synthetic "
            f"{IMAGE_SIZE}x{IMAGE_SIZE} PNG images decoded on every run; "
            f"{r['config']['runs']} timed runs per row after {r['config']['warmup']} warm-up "
            f"run(s); few-shot uses {r['config']['shots']} references. Latency is per batch, "
            "in ms; images/s = batch / median end-to-end latency; ratio = images/s over the "
            "PyTorch FP32 eager evaluation of the same algorithm on the same kind of device "
            "at the same mode and batch.", ""]


def _table_row(row: dict) -> str:
    e = stage(row, END_TO_END)
    stages = ([_f(stage(row, k)["p50_ms"], ".1f") for k in INSPECTION_STAGES]
              if row["kind"] == "runtime" else
              [_f(stage(row, LOAD)["p50_ms"], ".1f"), "model+post " +
               _f(stage(row, MODEL_AND_POST)["p50_ms"], ".1f"), "", ""])
    ratio = row.get("ratio_to_pytorch_fp32")
    return "| " + " | ".join([
        row["kind"], row["backend"], row["precision"], row["mode"], str(row["batch"]),
        _f(row["images_per_second"]), f"{ratio:.2f}x" if ratio else "",
        *(_f(e[k], ".0f") for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms")),
        *stages, _f(row.get("peak_host_rss_mb"), ".0f"), _f(row.get("gpu_memory_mb"), ".0f"),
        row.get("encoder_graph") or "",
    ]) + " |"


def _ceiling_lines(r: dict) -> list[str]:
    c = r.get("ceiling")
    if not c:
        return []
    shares = ", ".join(f"{row['precision']} batch {row['batch']}: "
                       f"{100 * row['share_of_cpu_fp32_ceiling']:.0f}% of "
                       f"{row['cpu_fp32_ceiling_images_per_second']:.3f} "
                       f"({row['cpu_fp32_gemm_peak_gflops_per_second']:.0f} GFLOP/s)"
                       for row in r["rows"] if "share_of_cpu_fp32_ceiling" in row)
    return ["", f"Ceiling: the encoder executes {c['gflops_per_image']:.0f} GFLOP per "
                "image (cost model); before each CPU row the FP32 GEMM peak of one large "
                "matrix product is measured, and peak / GFLOP is the images/s a perfect "
                "FP32 implementation would reach then. Share of that ceiling reached "
                f"(ceiling images/s, peak): {shares}."]


def _stream_lines(stream: list[dict]) -> list[str]:
    if not stream:
        return []
    st0 = stream[0]
    lines = ["", f"Stream mode: a camera at {st0['fps']:g} frames/s, one image per frame, "
                 f"{st0['frames']} frames, deadline {st0['deadline_ms']:.0f} ms from arrival "
                 f"to result, {st0['mode']}; frames queue (none dropped).", "",
             "| backend | precision | deadline misses | latency p50 | p99 | max | "
             "queueing mean | queueing max | keeps up |", "|" + "---|" * 9]
    for st in stream:
        lat, qd = st["latency_ms"], st["queueing_ms"]
        lines.append(f"| {st['backend']} | {st['precision']} | {st['deadline_misses']}/"
                     f"{st['frames']} | {lat['p50']:.0f} ms | {lat['p99']:.0f} ms | "
                     f"{lat['max']:.0f} ms | {qd['mean']:.0f} ms | {qd['max']:.0f} ms | "
                     f"{'yes' if st['sustained'] else 'NO: the queue grows'} |")
    return lines


def plot(r: dict, path: Path) -> bool:
    """Throughput and p50 / p99 latency against batch size, one line per configuration."""
    from clipinspect.calibration.evaluate import pyplot

    plt = pyplot()
    if plt is None:
        return False
    series: dict[str, list[dict]] = {}
    for row in r["rows"]:
        key = f"{row['kind']} {row['backend']} {row['precision']} {row['mode']}"
        series.setdefault(key, []).append(row)
    if not series:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, rows in series.items():
        bs = [x["batch"] for x in rows]
        style = "--" if key.startswith("pytorch") else "-"
        a.plot(bs, [x["images_per_second"] for x in rows], style, marker="o", label=key)
        line, = b.plot(bs, [stage(x, END_TO_END)["p50_ms"] for x in rows], style, marker="o",
                       label=f"{key} p50")
        b.plot(bs, [stage(x, END_TO_END)["p99_ms"] for x in rows], ":", marker="x",
               color=line.get_color())
    for ax, title, unit in ((a, "throughput", "images/s"), (b, "latency per batch (p50 solid, "
                                                                "p99 dotted)", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    a.legend(fontsize=7)
    fig.suptitle(f"{r['model']} ({r['weights']} weights) on {r['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
