"""``clipinspect build-engine``: TensorRT engines from a bundle's graphs, stored in the bundle.

Engines are built as *strongly typed* networks: the precision of every tensor is the one in the
graph (the FP16 graph, or the INT8 QDQ graph with its calibrated scales), never chosen by the
builder. That is the only mode TensorRT 11 has (it dropped the FP16 / INT8 builder flags and the
implicit INT8 calibrator) and it exists in TensorRT 10, the version JetPack ships, so one code
path serves both. The scoring heads are FP32 graphs in every variant and are built as such.

An engine only runs on the GPU model, compute capability and TensorRT version it was built
with. Engines are therefore stored per device key::

    engines/<key>/<precision>/{encoder,head_zeroshot,head_fewshot}-<digest>.plan
    cache/tensorrt/<key>.timing-cache        reused by the next build on the same device

and the manifest records, under ``engines.<key>``, the device, and per precision the files, the
optimization profile (batch range, most reference images) and the digests of the graphs they
were built from. Loading on another device, or after the graphs were replaced, is an error that
says to rebuild.

tensorrt and cupy are imported only when an engine is built or loaded.
"""

from __future__ import annotations

import datetime as _dt
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import bundle as bundle_files
from ..core.bundle import Bundle, atomic_write_bytes, write_versioned
from ..core.errors import ClipInspectError, UsageError
from ..core.manifest import DeviceRecord, EngineBuild, EngineProfile, FileEntry, parse
from ..core.names import ENCODER, GRAPHS, PRECISIONS
from ..core.progress import Progress
from .compat import DEFAULT_MAX_SHOTS, BatchRange, profile_shapes, require_compatible

DEFAULT_WORKSPACE_MB = 2048


class EngineError(ClipInspectError, RuntimeError):
    """No usable engine (missing, built elsewhere, stale) or TensorRT missing or failing."""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@dataclass(frozen=True)
class Device:
    """What an engine is bound to. Jetson modules of one generation report the same GPU name
    and compute capability (an Orin Nano and an Orin NX are both 'Orin', sm 8.7) but differ in
    SMs, memory and clocks, which the builder's timings depend on: the key also holds the SM
    count, the memory size and, on a Jetson, the board model (/proc/device-tree/model)."""

    gpu: str
    compute_capability: str   # "8.7"
    tensorrt: str             # "10.3.0.30"
    sm_count: int
    memory_gib: int           # total device memory, rounded (a Jetson's shared memory)
    board: str = ""           # e.g. "NVIDIA Jetson Orin NX Engineering Reference Developer Kit"

    @property
    def key(self) -> str:
        """Folder-safe key, e.g. 'orin_nvidia-jetson-orin-nano-..._sm87_8sms_8gib_trt10.3.0.30'."""
        board = f"_{_slug(self.board)}" if self.board else ""
        return (f"{_slug(self.gpu) or 'gpu'}{board}_sm{self.compute_capability.replace('.', '')}"
                f"_{self.sm_count}sms_{self.memory_gib}gib_trt{self.tensorrt}")

    @property
    def legacy_key(self) -> str:
        """The key clipinspect used before it recorded SMs, memory and board (see
        :func:`adopt_legacy_engines`)."""
        return (f"{_slug(self.gpu) or 'gpu'}_sm{self.compute_capability.replace('.', '')}"
                f"_trt{self.tensorrt}")

    def describe(self) -> str:
        board = f" on {self.board}" if self.board else ""
        return (f"{self.gpu}{board} (compute capability {self.compute_capability}, "
                f"{self.sm_count} SMs, {self.memory_gib} GiB), TensorRT {self.tensorrt}")

    def record(self) -> DeviceRecord:
        """What the manifest records of this device (``engines.<key>.device``)."""
        return DeviceRecord(self.gpu, self.compute_capability, self.tensorrt,
                            sm_count=self.sm_count, memory_gib=self.memory_gib, board=self.board)


def import_tensorrt():
    """-> (tensorrt, cupy), or an error that says how to install them."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineError(
            "TensorRT's Python package is not installed: on a Jetson it comes with JetPack "
            "(apt install python3-libnvinfer; use a virtual environment created with "
            "--system-site-packages), on a workstation pip install 'clipinspect[tensorrt-cu12]' "
            "(CUDA 12) or 'clipinspect[tensorrt-cu13]' (CUDA 13). "
            "Without TensorRT use --provider cuda or cpu") from e
    try:
        import cupy
    except ImportError as e:
        raise EngineError("cupy (GPU buffers for the TensorRT backend) is not installed: "
                          "pip install cupy-cuda12x (CUDA 12, JetPack 6) or cupy-cuda13x (CUDA 13, "
                          "JetPack 7)") from e
    return trt, cupy


def board_model(path: Path = Path("/proc/device-tree/model")) -> str:
    """The board model a Jetson reports ('' elsewhere: x86 machines have no device tree)."""
    try:
        return path.read_bytes().rstrip(b"\0").decode(errors="replace").strip()
    except OSError:
        return ""


def current_device(trt, cupy, device_id: int = 0) -> Device:
    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    return Device(name, f"{props['major']}.{props['minor']}", str(trt.__version__),
                  sm_count=int(props["multiProcessorCount"]),
                  memory_gib=round(int(props["totalGlobalMem"]) / (1 << 30)),
                  board=board_model())


def timing_cache_path(bundle: Bundle, device_key: str) -> Path:
    """Where the timing cache of ``device_key`` lives, checked like every write into the bundle
    (a linked cache folder is refused, not followed)."""
    return bundle_files.bundle_path(bundle.root, f"cache/tensorrt/{device_key}.timing-cache")


def adopt_legacy_engines(bundle: Bundle, device: Device) -> bool:
    """Move engines recorded under ``device.legacy_key`` (older clipinspect) to ``device.key``,
    with their timing cache; True if it did. Only where the legacy key identifies the GPU
    model: not on a Jetson, whose legacy key is shared by several modules (those engines stay
    where they are and find_engines says to rebuild)."""
    engines = bundle.manifest.engines
    if device.board or device.key in engines or device.legacy_key not in engines:
        return False
    with bundle.updating() as m:
        entry = m.engines.pop(device.legacy_key)
        entry.device = device.record()
        m.engines[device.key] = entry
    old = timing_cache_path(bundle, device.legacy_key)
    if old.is_file():
        old.replace(timing_cache_path(bundle, device.key))
    return True


# ------------------------------------------------------------------------------ lookup
def find_engines(bundle: Bundle, precision: str, device: Device) -> EngineBuild:
    """The engine record of ``precision`` for ``device``; an error that says how to rebuild
    when there is none, it was built on another device, or its graphs changed since."""
    rebuild = f"clipinspect build-engine {bundle.root} --precision {precision}"
    adopt_legacy_engines(bundle, device)
    engines = bundle.manifest.engines
    entry = engines[device.key].builds.get(precision) if device.key in engines else None
    legacy = engines.get(device.legacy_key)
    if entry is None and device.board and legacy is not None and precision in legacy.builds:
        raise EngineError(f"the {precision} engines in {str(bundle.root)!r} were recorded by an "
                          "older clipinspect that did not tell Jetson modules apart (they may "
                          f"come from another {device.gpu} module); rebuild them here with "
                          f"'{rebuild}'")
    if entry is None:
        elsewhere = [e.device.describe() for e in engines.values() if precision in e.builds]
        if elsewhere:
            raise EngineError(f"the {precision} engines in {str(bundle.root)!r} were built for "
                              f"{'; '.join(elsewhere)}, not for this {device.describe()}; "
                              f"TensorRT engines only run where they were built: rebuild here "
                              f"with '{rebuild}'")
        raise EngineError(f"bundle {str(bundle.root)!r} has no {precision} TensorRT engines for "
                          f"this {device.describe()}; build them with '{rebuild}'")
    graphs = bundle.manifest.graphs[precision]
    # GRAPHS, and the graph the encoder engine was built from where it is another one (the
    # INT8 graph with FP16 between its Q/DQ pairs).
    for name in dict.fromkeys([*GRAPHS, *entry.source_graphs]):
        now = graphs[name].sha256 if name in graphs else None
        if entry.source_graphs.get(name) != now:
            raise EngineError(f"the {precision} {name} graph changed after its engine was built "
                              f"(re-export or quantize --overwrite); rebuild with '{rebuild}'")
    return entry


# ------------------------------------------------------------------------------ building
_LOGGER: list = []   # [(tensorrt module, its Logger)]


def trt_logger(trt):
    """The process's one TensorRT logger: TensorRT warns when several are made, and builder,
    runtime and parser all take it."""
    if not _LOGGER or _LOGGER[0][0] is not trt:
        _LOGGER[:] = [(trt, trt.Logger(trt.Logger.WARNING))]
    return _LOGGER[0][1]


# build-engine --int8-graph: which INT8 graph the encoder engine is built from. fp16: FP16
# between the INT8 matrix products (calibration/quantize_fp16.py), so the layers TensorRT does
# not quantize (softmax, LayerNorm, GELU, residual adds) run in FP16 in a strongly typed
# engine rather than FP32; fp32: the QDQ graph onnxruntime runs on the CPU.
INT8_GRAPHS = {"fp16": "encoder_fp16", "fp32": ENCODER}


def encoder_graph(bundle: Bundle, precision: str, int8_graph: str = "fp16") -> str:
    """The name of the graph of ``precision`` the encoder engine is built from."""
    if precision != "int8":
        return ENCODER
    if int8_graph not in INT8_GRAPHS:
        raise UsageError(f"--int8-graph {int8_graph!r}: choose one of {', '.join(INT8_GRAPHS)}")
    name = INT8_GRAPHS[int8_graph]
    if name not in bundle.manifest.graphs["int8"]:
        raise UsageError(f"bundle {str(bundle.root)!r} has no INT8 graph with FP16 between its "
                         "Q/DQ pairs (quantized by an older clipinspect); make it with "
                         f"'clipinspect quantize {bundle.root} --precision int8 --calibration DIR "
                         "--overwrite', or build from the FP32 QDQ graph with --int8-graph fp32")
    return name


def _profile_json(shapes: dict) -> dict[str, list]:
    return {name: [list(s) for s in spans] for name, spans in shapes.items()}


def shared_head(bundle: Bundle, key: str, name: str, sha: str, shapes: dict
                ) -> FileEntry | None:
    """A head engine already built on this device from the same graph (``sha``), with the
    same profile and TF32 off, by a build of any precision: the heads are the FP32 graphs in
    every variant, so one engine serves them all. Its file entry, or None."""
    entry = bundle.manifest.engines.get(key)
    for build in (entry.builds.values() if entry else ()):
        found = build.files.get(name)
        if (found is not None and build.source_graphs.get(name) == sha
                and build.tf32 is False
                and (build.head_profiles or {}).get(name) == _profile_json(shapes)
                and (bundle.root / found.file).is_file()):
            return found
    return None


def _progress_monitor(trt, stream):
    """A TensorRT IProgressMonitor printing the builder's top-level phases (TensorRT >= 10)."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                print(f"    {phase_name} ({num_steps} steps)", file=stream, flush=True)

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            pass

    return Monitor()


@dataclass(frozen=True)
class BuildSettings:
    """What every engine of one build-engine run is built with."""

    workspace_mb: int = DEFAULT_WORKSPACE_MB
    monitor: Any = None   # a TensorRT IProgressMonitor, or None


def _build_one(trt, logger, path: Path, shapes: dict, *, settings: BuildSettings,
               cache_bytes: bytes) -> tuple[bytes, bytes]:
    """One strongly typed engine from the ONNX file at ``path`` -> (plan, timing cache)."""
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # deprecated (always on) in TensorRT 11, still accepted
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {path.name}: {errors}")
    config = builder.create_builder_config()
    # TF32 is on by default and would run the graphs' FP32 matrix products (the FP32 encoder,
    # the heads in every variant) with 10-bit mantissas: FP32 here means FP32.
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None:
        config.clear_flag(tf32)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_mb) << 20)
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    if settings.monitor is not None:
        config.progress_monitor = settings.monitor
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT failed to build an engine from {path.name} (see the "
                          "TensorRT messages above); a larger --workspace may help")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def _check_request(bundle: Bundle, precision: str, batch: BatchRange, max_shots: int,
                   workspace_mb: int, int8_graph: str) -> str:
    """Refuse what cannot be built before TensorRT is imported; -> the encoder's source graph."""
    bundle.require_heads("'clipinspect build-engine'")
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision not in bundle.manifest.graphs:
        raise UsageError(f"bundle {str(bundle.root)!r} has no {precision} graphs; make them first "
                         f"with 'clipinspect quantize {bundle.root} --precision {precision}'")
    if workspace_mb < 16:
        raise UsageError(f"--workspace {workspace_mb} MB is too small; give at least 16")
    batch.validate()
    encoder = encoder_graph(bundle, precision, int8_graph)
    require_compatible(bundle, [f"{precision}/{encoder}", "fp32/head_zeroshot",
                                "fp32/head_fewshot"], batch=batch, max_shots=max_shots)
    return encoder


@dataclass
class _EngineRun:
    """The engines of one build-engine run: what they are built from and with, and what was
    built (``files``, ``seconds``, ``head_profiles``, ``reused``)."""

    bundle: Bundle
    precision: str
    device: Device
    trt: Any
    settings: BuildSettings
    cache_path: Path
    cache_bytes: bytes
    files: dict[str, FileEntry] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    head_profiles: dict[str, dict[str, list]] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)

    def engine(self, name: str, source: str, batch: BatchRange, max_shots: int) -> None:
        """The engine of graph ``name`` from the graph ``source`` of the precision, or the head
        engine an earlier build made from the same graph with the same profile."""
        import onnx

        path = self.bundle.graph_path(self.precision, source)
        shapes = profile_shapes(self.bundle, onnx.load(str(path), load_external_data=False),
                                batch, max_shots)
        if name != ENCODER:
            self.head_profiles[name] = _profile_json(shapes)
            sha = self.bundle.manifest.graphs[self.precision][name].sha256
            shared = shared_head(self.bundle, self.device.key, name, sha, shapes)
            if shared is not None:
                self.files[name] = shared
                self.reused.append(name)
                return
        t0 = time.perf_counter()
        plan, self.cache_bytes = _build_one(self.trt, trt_logger(self.trt), path, shapes,
                                            settings=self.settings, cache_bytes=self.cache_bytes)
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        # Saved after each engine: an interrupted build keeps the timings measured so far.
        atomic_write_bytes(self.cache_path, self.cache_bytes)
        folder = f"engines/{self.device.key}/{self.precision if name == ENCODER else 'heads'}"
        rel = write_versioned(self.bundle.root, folder, f"{name}.plan", plan)
        self.files[name] = parse(FileEntry, self.bundle.file_entry(rel),
                                 f"bundle {str(self.bundle.root)!r}",
                                 f"engines.{self.device.key}.{self.precision}.{name}")

    def record(self, batch: BatchRange, max_shots: int, encoder: str) -> EngineBuild:
        graphs = self.bundle.manifest.graphs[self.precision]
        return EngineBuild(
            files=dict(self.files), profile=EngineProfile((batch.min, batch.opt, batch.max),
                                                          int(max_shots)),
            workspace_mb=int(self.settings.workspace_mb), tf32=False, encoder_graph=encoder,
            head_profiles=dict(self.head_profiles), heads_reused=list(self.reused),
            source_graphs={n: graphs[n].sha256 for n in dict.fromkeys([*GRAPHS, encoder])},
            built=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            build_seconds=dict(self.seconds))


def build_engines(bundle_path, precision: str, batch: BatchRange = BatchRange(),
                  max_shots: int = DEFAULT_MAX_SHOTS, workspace_mb: int = DEFAULT_WORKSPACE_MB,
                  *, stream=None, int8_graph: str = "fp16") -> dict[str, Any]:
    """Build the encoder engine of ``precision`` and the FP32 head engines for this GPU and
    store them in the bundle (replacing earlier ones of this precision and device). Head
    engines are shared: built once per device, graph and profile, reused by every precision.
    ``int8_graph``: see INT8_GRAPHS. Returns the manifest record (its JSON form)."""
    stream = stream or sys.stderr
    bundle = Bundle.open(bundle_path)
    encoder = _check_request(bundle, precision, batch, max_shots, workspace_mb, int8_graph)
    trt, cupy = import_tensorrt()
    device = current_device(trt, cupy)
    adopt_legacy_engines(bundle, device)
    cache_path = timing_cache_path(bundle, device.key)
    run = _EngineRun(bundle, precision, device, trt,
                     BuildSettings(workspace_mb, _progress_monitor(trt, stream)), cache_path,
                     cache_path.read_bytes() if cache_path.is_file() else b"")
    print(f"building {precision} TensorRT engines for {device.describe()}: batch "
          f"{batch.min}/{batch.opt}/{batch.max}, up to {max_shots} reference images, workspace "
          f"{workspace_mb} MB, encoder from the {precision} {encoder} graph"
          f"{', reusing the timing cache' if run.cache_bytes else ''}", file=stream, flush=True)
    with Progress(len(GRAPHS), "build-engine", stream=stream, unit="engine") as bar:
        for name in GRAPHS:
            run.engine(name, encoder if name == ENCODER else name, batch, max_shots)
            bar.update()
    record = run.record(batch, max_shots, encoder)
    bundle.set_engines(device.key, device.record().to_dict(), precision, record.to_dict())
    print(f"{precision} engines stored under {bundle.root / 'engines' / device.key}"
          f"{' (head engines shared with an earlier build)' if run.reused else ''}",
          file=stream, flush=True)
    return record.to_dict()
