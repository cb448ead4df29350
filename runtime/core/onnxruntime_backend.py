"""The onnxruntime backend (providers cpu, cuda, tensorrt): one :class:`~.backend.Backend`.

Providers are never silently swapped: asking for one that is not installed, or that onnxruntime
does not actually assign, is an error. The TensorRT provider's optimization profiles are chosen
by :meth:`OrtBackend.open` (:func:`ort_tensorrt_profiles`); a batch or a reference memory beyond
them is refused here with an error that names the limit, instead of letting onnxruntime build
another engine.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ClipInspectError, UsageError, did_you_mean
from .names import ENCODER, HEADS, ORT_PROVIDERS

if TYPE_CHECKING:
    from .bundle import Bundle

#: Our provider names -> onnxruntime's.
PROVIDERS = dict(zip(ORT_PROVIDERS, ("CPUExecutionProvider", "CUDAExecutionProvider",
                                     "TensorrtExecutionProvider")))


class ProviderError(ClipInspectError, RuntimeError):
    """A provider that is unknown, not installed or not assigned by onnxruntime."""


class ProfileError(UsageError):
    """An input larger than the TensorRT optimization profile the session was made with."""


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ProviderError(
            "onnxruntime is not installed: pip install 'clipinspect[cpu]' (CPU) or "
            "'clipinspect[gpu]' (CUDA / TensorRT) - one of the two, never both") from e
    return ort


def ort_conflict() -> str | None:
    """Both onnxruntime and onnxruntime-gpu installed: they fight over the same module."""
    names = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            importlib.metadata.version(dist)
            names.append(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    if len(names) == 2:
        return ("both onnxruntime and onnxruntime-gpu are installed; they provide the same module "
                "and one silently shadows the other. Uninstall both, then install one "
                "('clipinspect[cpu]' or 'clipinspect[gpu]')")
    return None


def available_providers() -> list[str]:
    ort = _import_ort()
    names = {v: k for k, v in PROVIDERS.items()}
    return [names[p] for p in ort.get_available_providers() if p in names]


def _shapes_option(shapes: dict[str, tuple[int, ...]]) -> str:
    """onnxruntime's profile-shape syntax: 'images:1x3x224x224,text_prototypes:2x640'."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims)}" for name, dims in shapes.items())


# Provider options that not every onnxruntime knows, with the first release that does (an
# unknown option makes the provider fail to register). use_tf32: onnxruntime PRs 19357 (cuBLAS
# GEMMs) and 19426 (cuDNN convolutions), released in 1.18.
OPTION_SINCE = {"use_tf32": (1, 18)}


def _version_tuple(text: str | None) -> tuple[int, ...]:
    parts = re.findall(r"\d+", str(text or "").split("+")[0])[:3]
    return tuple(int(p) for p in parts)


def installed_ort_version() -> str | None:
    """The installed onnxruntime's version, from package metadata (no import)."""
    for dist in ("onnxruntime-gpu", "onnxruntime"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def knows_option(option: str, ort_version: str | None) -> bool:
    since = OPTION_SINCE.get(option)
    return since is None or _version_tuple(ort_version) >= since


def cuda_options(ort_version: str | None) -> dict[str, Any]:
    """The CUDA provider's options, also for the CUDA provider under the TensorRT one.
    use_tf32 0: onnxruntime turns TF32 on by default (Ampere and later), which runs FP32
    matrix products and convolutions with 10-bit mantissas; FP32 here means FP32, for the FP32
    encoder and for the scoring heads (FP32 in every variant). cuDNN's algorithm search is
    about speed, not accuracy: HEURISTIC avoids minutes of exhaustive search on a Jetson."""
    opts: dict[str, Any] = {"cudnn_conv_algo_search": "HEURISTIC"}
    if knows_option("use_tf32", ort_version):
        opts["use_tf32"] = 0
    return opts


def tensorrt_version() -> str:
    """'trt10.13.3.9' from the installed TensorRT wheel's metadata ('trt-unknown' without one:
    a JetPack TensorRT has no pip metadata; its version is then read from the library)."""
    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_libs",
                 "tensorrt-cu13-libs", "tensorrt-cu12-libs"):
        try:
            return f"trt{importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            pass
    from .gpu_libraries import library_version

    found = library_version("TensorRT").split(" ")[0]
    return f"trt{found}" if found[:1].isdigit() else "trt-unknown"


def engine_cache_key(profile: dict | None, fp16: bool, int8: bool,
                     ort_version: str | None, trt_version: str) -> str:
    """Folder of onnxruntime's TensorRT engine cache for one session: its profile, precision
    flags and the onnxruntime / TensorRT versions, so a changed batch range or an upgrade
    never finds an engine built for something else."""
    text = json.dumps({"profile": {k: [list(s) for s in v] for k, v in (profile or {}).items()},
                       "fp16": bool(fp16), "int8": bool(int8)}, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return f"ort{ort_version or 'unknown'}_{trt_version}_{digest}"


def provider_options(provider: str, cache_dir: Path | None = None, fp16: bool = False,
                     int8: bool = False,
                     profile: dict[str, tuple[tuple[int, ...], ...]] | None = None, *,
                     ort_version: str | None = None) -> list[Any]:
    """onnxruntime provider list for ``provider`` (cpu|cuda|tensorrt).

    TensorRT: ``fp16`` lets it run the FP16 graph's layers in FP16 (the graph keeps softmax and
    LayerNormalization in FP32 with casts around them: see calibration/quantize.py); ``int8``:
    the graph is explicitly quantized (QDQ), so TensorRT takes its scales from the graph and
    needs no calibration table. None of onnxruntime's TensorRT provider options (1.31) keeps
    the graph's types: it builds weakly typed networks with TF32 allowed and has no option to
    change either, and trt_layer_norm_fp32_fallback only pins Pow + Reduce pairs (a decomposed
    LayerNorm), not the LayerNormalization op these graphs use, so it is not passed. Its
    results are therefore held to stated bounds (TF32 for FP32 unless NVIDIA_TF32_OVERRIDE=0,
    FP16 for FP16: docs/deployment.md), which benchmarks/gpu_check.py enforces.
    ``profile`` {input: (min, opt, max) shape} is the optimization profile, so one engine
    serves the whole batch range instead of a rebuild for each new batch size. Engines and
    timing caches are kept in a folder of ``cache_dir`` named by :func:`engine_cache_key`.
    ``ort_version``: the installed onnxruntime's (default: read off its metadata).
    """
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    ort_version = ort_version or installed_ort_version()
    cuda = ("CUDAExecutionProvider", cuda_options(ort_version))
    if provider == "cuda":
        return [cuda, "CPUExecutionProvider"]
    if provider == "tensorrt":
        opts: dict[str, Any] = {"trt_fp16_enable": bool(fp16), "trt_int8_enable": bool(int8)}
        if int8:
            opts["trt_int8_use_native_calibration_table"] = False
        if cache_dir is not None:
            folder = cache_dir / engine_cache_key(profile, fp16, int8, ort_version,
                                                  tensorrt_version())
            folder.mkdir(parents=True, exist_ok=True)
            opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(folder),
                        trt_timing_cache_enable=True, trt_timing_cache_path=str(folder))
        if profile:
            for i, which in enumerate(("min", "opt", "max")):
                opts[f"trt_profile_{which}_shapes"] = _shapes_option(
                    {name: shapes[i] for name, shapes in profile.items()})
        return [("TensorrtExecutionProvider", opts), cuda, "CPUExecutionProvider"]
    raise ProviderError(f"unknown provider {provider!r}{did_you_mean(provider, PROVIDERS)}: "
                        f"choose one of {', '.join(PROVIDERS)}")


def session_options(threads: int | None = None, profile_prefix: str | None = None,
                    spinning: bool = True):
    """onnxruntime session options of every session the runtime opens. ``profile_prefix``:
    write onnxruntime's per-node profile (a JSON trace) to ``<prefix>_<date>.json``.
    ``spinning`` False: the intra-op threads sleep as soon as a run ends instead of
    busy-waiting for the next one."""
    ort = _import_ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def make_session(path: Path | bytes, provider: str, *, threads: int | None = None,
                 cache_dir: Path | None = None, fp16: bool = False, int8: bool = False,
                 profile: dict[str, tuple[tuple[int, ...], ...]] | None = None,
                 profile_prefix: str | None = None, spinning: bool = True):
    """An onnxruntime session for the graph at ``path`` (``fp16`` / ``int8``: the graph's
    precision, ``profile``: its TensorRT optimization profile; for the TensorRT provider;
    ``profile_prefix`` and ``spinning``: see :func:`session_options`). ``path`` may be a
    serialized graph made in memory (MuSc's block kernel)."""
    ort = _import_ort()
    source = path if isinstance(path, bytes) else str(path)
    name = "an in-memory graph" if isinstance(path, bytes) else path.name
    if provider not in PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r}{did_you_mean(provider, PROVIDERS)}: "
                            f"choose one of {', '.join(PROVIDERS)}")
    installed = ort.get_available_providers()
    if PROVIDERS[provider] not in installed:
        have = ", ".join(available_providers()) or "none"
        hint = (" (install 'clipinspect[gpu]' instead of 'clipinspect[cpu]' for CUDA/TensorRT)"
                if provider != "cpu" else "")
        raise ProviderError(f"provider {provider!r} ({PROVIDERS[provider]}) is not available in this "
                            f"onnxruntime; available: {have}{hint}")
    if provider != "cpu" and not knows_option("use_tf32", ort.__version__):
        warnings.warn(f"onnxruntime {ort.__version__}'s CUDA provider has no use_tf32 option: "
                      "FP32 matrix products run in TF32 (10-bit mantissas) on Ampere and later "
                      "GPUs; install onnxruntime-gpu >= 1.18 (see docs/deployment.md) or set "
                      "NVIDIA_TF32_OVERRIDE=0", RuntimeWarning, stacklevel=2)
    so = session_options(threads, profile_prefix, spinning)
    providers = provider_options(provider, cache_dir, fp16, int8, profile,
                                 ort_version=ort.__version__)
    from .gpu_libraries import captured_output, loader_reason

    log = {"text": ""}
    if provider == "cpu":
        session = ort.InferenceSession(source, sess_options=so, providers=providers)
    else:
        # onnxruntime says why a provider's libraries did not load only in its log: keep it
        # for the error while it goes to stderr as usual.
        with captured_output(echo=True) as log:
            session = ort.InferenceSession(source, sess_options=so, providers=providers)
    if PROVIDERS[provider] not in session.get_providers():
        # E.g. onnxruntime-gpu whose CUDA libraries fail to load: it falls back to the CPU.
        reason = loader_reason(log["text"]) or "onnxruntime printed no reason"
        raise ProviderError(f"onnxruntime did not register {PROVIDERS[provider]} for {name} "
                            f"(got {session.get_providers()}); onnxruntime said: {reason}. "
                            "'clipinspect providers' shows the CUDA, cuDNN and TensorRT "
                            "libraries found")
    return session


def _prefix(prefix: str | None, graph: str) -> str | None:
    return f"{prefix}_{graph}" if prefix else None


def stored_shots(bundle: "Bundle") -> int:
    """The most reference images any category of the bundle stores (0 if none)."""
    return max((entry.memory.shots for entry in bundle.manifest.categories.values()
                if entry.memory), default=0)


def ort_tensorrt_profiles(bundle: "Bundle", precision: str, batch_size: int | None = None
                          ) -> dict[str, dict[str, tuple[tuple[int, ...], ...]]]:
    """{graph: {input: (min, opt, max) shape}} for onnxruntime's TensorRT provider.

    Batch: 1..``batch_size``, tuned for ``batch_size`` (None: 1..32 tuned for 8, what the
    callers that do not say their batch size get). Few-shot memory: tuned for the most
    reference images a category stores, up to that or profiles.DEFAULT_MAX_SHOTS (16), whichever
    is larger, so references added while the Inspector is open still fit. A larger batch or
    memory is refused by OrtBackend with an error naming the limit (ProfileError).
    """
    import onnx

    from .profiles import DEFAULT_MAX_SHOTS, BatchRange, profile_shapes

    batch = BatchRange() if batch_size is None else BatchRange(1, batch_size, batch_size)
    shots = stored_shots(bundle)
    return {name: profile_shapes(bundle, onnx.load(str(bundle.graph_path(precision, name)),
                                                   load_external_data=False),
                                 batch, max(shots, DEFAULT_MAX_SHOTS), opt_shots=shots or 4)
            for name in (ENCODER, *HEADS) if name in bundle.method.graphs}


def trt_cache_dir(bundle: "Bundle") -> Path:
    """The folder onnxruntime's TensorRT provider keeps its engines in, inside the bundle:
    checked like every write into it (a linked ``cache`` folder is refused, not followed)."""
    from .bundle import bundle_path

    return bundle_path(bundle.root, "cache/ort-trt")


class OrtBackend:
    """Encoder + scoring heads on onnxruntime (``profiles``: {graph: TensorRT profile};
    ``profile_prefix``: onnxruntime's profiler on, one trace per graph, ``<prefix>_<graph>_*``).

    On CUDA and TensorRT, IO binding keeps the encoder outputs on the device and hands them to
    the head without a host round trip; category arrays are uploaded once and cached.
    """

    def __init__(self, encoder_path: Path, head_paths: dict[str, Path], provider: str = "cpu", *,
                 threads: int | None = None, cache_dir: Path | None = None, fp16: bool = False,
                 int8: bool = False, profiles: dict[str, dict] | None = None,
                 profile_prefix: str | None = None):
        conflict = ort_conflict()
        if conflict:
            warnings.warn(conflict, RuntimeWarning, stacklevel=2)
        self.provider = provider
        #: Which of the bundle's encoder graphs runs (``open`` sets it; reported by bench).
        self.encoder_graph = ENCODER
        self.profiles = profiles or {}
        self.encoder = make_session(encoder_path, provider, threads=threads, cache_dir=cache_dir,
                                    fp16=fp16, int8=int8, profile=self.profiles.get(ENCODER),
                                    profile_prefix=_prefix(profile_prefix, ENCODER))
        # The heads are FP32 graphs in every variant: TensorRT must not lower them to FP16.
        # Their threads do not spin: a head runs for a millisecond between two encoder runs,
        # and on a 2-core CPU its spinning threads took the cores from the next encoder run
        # (patch-only INT8 at batch 1: benchmarks/results/int8_notes_cpu_b16p.md, issue 27).
        self.heads = {name: make_session(p, provider, threads=threads, cache_dir=cache_dir,
                                         profile=self.profiles.get(name),
                                         profile_prefix=_prefix(profile_prefix, name),
                                         spinning=False)
                      for name, p in head_paths.items()}
        # Where IO binding keeps tensors; None = plain numpy in and out (CPU provider).
        self.device: str | None = "cuda" if provider in ("cuda", "tensorrt") else None
        self._device_cache: dict[str, tuple[np.ndarray, Any]] = {}
        self.encoder_outputs = [o.name for o in self.encoder.get_outputs()]
        self.head_io = {name: ([i.name for i in s.get_inputs()], [o.name for o in s.get_outputs()])
                        for name, s in self.heads.items()}
        images = self.profiles.get(ENCODER, {}).get("images")
        self.max_batch: int | None = int(images[2][0]) if images else None

    @classmethod
    def open(cls, bundle: "Bundle", precision: str, provider: str = "cpu", *,
             threads: int | None = None, batch_size: int | None = None,
             verify_checksums: bool = True, encoder_graph: str = ENCODER) -> "OrtBackend":
        """``bundle``'s ``precision`` graphs on ``provider`` (the encoder ``encoder_graph``:
        ``encoder``, or ``encoder_fused`` on the CPU); for TensorRT with optimization
        profiles for batches up to ``batch_size`` and an engine cache in the bundle. The graphs'
        checksums were verified when the bundle was opened (``verify_checksums`` is for the
        backends that load other files)."""
        tensorrt = provider == "tensorrt"
        backend = cls(bundle.graph_path(precision, encoder_graph),
                   {name: bundle.graph_path(precision, name) for name in HEADS
                    if name in bundle.method.graphs},  # a host-scored method has none
                   provider=provider, threads=threads or default_threads(),
                   cache_dir=trt_cache_dir(bundle) if tensorrt else None,
                   fp16=precision == "fp16", int8=precision == "int8",
                   profiles=ort_tensorrt_profiles(bundle, precision, batch_size) if tensorrt
                   else None)
        backend.encoder_graph = encoder_graph
        return backend

    def _within_profile(self, graph: str, arrays: dict[str, np.ndarray]) -> None:
        """A host array beyond the TensorRT profile is an error naming it, not a silent engine
        rebuild (minutes on a Jetson) in the middle of a production run. Encoder outputs need
        no check: their batch axis is the images' one."""
        for name, (_, _, hi) in (self.profiles.get(graph) or {}).items():
            if name in arrays and any(s > h for s, h in zip(arrays[name].shape, hi)):
                what = ("the batch" if name == "images" else
                        "the reference memory (shots x rows)" if name.startswith("memory_") else
                        f"input {name!r}")
                raise ProfileError(
                    f"{graph}: {what} of shape {tuple(arrays[name].shape)} exceeds the TensorRT "
                    f"optimization profile's maximum {tuple(hi)}; open the Inspector with a "
                    "larger batch_size (--batch-size), or store fewer reference images")

    def encode(self, images: np.ndarray) -> dict[str, Any]:
        """images (B, 3, H, W) float32 -> encoder outputs (numpy on CPU, OrtValues on device)."""
        self._within_profile(ENCODER, {"images": images})
        if self.device is None:
            return dict(zip(self.encoder_outputs, self.encoder.run(None, {"images": images})))
        binding = self.encoder.io_binding()
        binding.bind_cpu_input("images", images)
        for name in self.encoder_outputs:
            binding.bind_output(name, self.device, 0)
        self.encoder.run_with_iobinding(binding)
        return dict(zip(self.encoder_outputs, binding.get_outputs()))

    def score(self, encoded: dict[str, Any], head: str, extra: dict[str, np.ndarray]
              ) -> dict[str, np.ndarray]:
        session = self.heads[head]
        names, outputs = self.head_io[head]
        self._within_profile(head, extra)
        if self.device is None:
            feeds = {n: (encoded[n] if n in encoded else extra[n]) for n in names}
            return dict(zip(outputs, session.run(None, feeds)))
        binding = session.io_binding()
        for n in names:
            if n in encoded:
                binding.bind_ortvalue_input(n, encoded[n])
            else:
                binding.bind_ortvalue_input(n, self._on_device(n, extra[n]))
        for n in outputs:
            binding.bind_output(n, "cpu")
        session.run_with_iobinding(binding)
        return dict(zip(outputs, binding.copy_outputs_to_cpu()))

    def _on_device(self, name: str, arr: np.ndarray):
        """Category arrays (text prototypes, memory) are uploaded once per input name and
        replaced, freeing the old copy, when the category or its memory changes."""
        cached = self._device_cache.get(name)
        if cached is None or cached[0] is not arr:
            ort = _import_ort()
            cached = (arr, ort.OrtValue.ortvalue_from_numpy(arr, self.device, 0))
            self._device_cache[name] = cached
        return cached[1]

    def to_host(self, encoded: dict[str, Any]) -> dict[str, np.ndarray]:
        return {k: (v if isinstance(v, np.ndarray) else v.numpy()) for k, v in encoded.items()}

    def select_rows(self, encoded: dict[str, Any], rows: list[int]
                    ) -> tuple[dict[str, Any], list[int] | None]:
        if self.device is None:
            return {k: v[rows] for k, v in encoded.items()}, None
        # OrtValues on the device have no row indexing without a host round trip: the head
        # scores the whole batch and the caller keeps the rows.
        return encoded, rows


def default_threads() -> int | None:
    value = os.environ.get("CLIPINSPECT_THREADS")
    return int(value) if value else None
