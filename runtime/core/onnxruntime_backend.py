"""The onnxruntime backend (providers cpu, cuda, tensorrt): one :class:`~.backend.Backend`.

Providers are never silently swapped: asking for one that is not installed, or that onnxruntime
does not actually assign, is an error. The TensorRT provider's optimization profiles are chosen
by :func:`~.backends.open_backend`; a batch or a reference memory beyond them is refused here
with an error that names the limit, instead of letting onnxruntime build another engine.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ClipInspectError, UsageError, did_you_mean

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


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


def provider_options(provider: str, cache_dir: Path | None = None, fp16: bool = False,
                     int8: bool = False,
                     profile: dict[str, tuple[tuple[int, ...], ...]] | None = None) -> list[Any]:
    """onnxruntime provider list for ``provider`` (cpu|cuda|tensorrt).

    TensorRT: ``fp16`` lets it run the FP16 graph's layers in FP16 (the graph itself keeps
    LayerNormalization in FP32 with casts around it: see calibration/quantize.py); ``int8``:
    the graph is explicitly quantized (QDQ), so TensorRT takes its scales from the graph and
    needs no calibration table.
    ``profile`` {input: (min, opt, max) shape} is the optimization profile, so one engine
    serves the whole batch range instead of a rebuild for each new batch size. Engines and
    timing caches are kept in ``cache_dir``.
    """
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        return [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}),
                "CPUExecutionProvider"]
    if provider == "tensorrt":
        opts: dict[str, Any] = {"trt_fp16_enable": bool(fp16), "trt_int8_enable": bool(int8)}
        if int8:
            opts["trt_int8_use_native_calibration_table"] = False
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir),
                        trt_timing_cache_enable=True, trt_timing_cache_path=str(cache_dir))
        if profile:
            for i, which in enumerate(("min", "opt", "max")):
                opts[f"trt_profile_{which}_shapes"] = _shapes_option(
                    {name: shapes[i] for name, shapes in profile.items()})
        return [("TensorrtExecutionProvider", opts), "CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ProviderError(f"unknown provider {provider!r}{did_you_mean(provider, PROVIDERS)}: "
                        f"choose one of {', '.join(PROVIDERS)}")


def session_options(threads: int | None = None, profile_prefix: str | None = None):
    """onnxruntime session options of every session the runtime opens. ``profile_prefix``:
    write onnxruntime's per-node profile (a JSON trace) to ``<prefix>_<date>.json``."""
    ort = _import_ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def make_session(path: Path, provider: str, *, threads: int | None = None,
                 cache_dir: Path | None = None, fp16: bool = False, int8: bool = False,
                 profile: dict[str, tuple[tuple[int, ...], ...]] | None = None,
                 profile_prefix: str | None = None):
    """An onnxruntime session for the graph at ``path`` (``fp16`` / ``int8``: the graph's
    precision, ``profile``: its TensorRT optimization profile; for the TensorRT provider;
    ``profile_prefix``: see :func:`session_options`)."""
    ort = _import_ort()
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
    so = session_options(threads, profile_prefix)
    session = ort.InferenceSession(str(path), sess_options=so,
                                   providers=provider_options(provider, cache_dir, fp16, int8,
                                                              profile))
    if PROVIDERS[provider] not in session.get_providers():
        # E.g. onnxruntime-gpu whose CUDA libraries fail to load: it falls back to the CPU.
        raise ProviderError(f"onnxruntime did not register {PROVIDERS[provider]} for {path.name} "
                            f"(got {session.get_providers()}); check the CUDA/TensorRT installation")
    return session


def _prefix(prefix: str | None, graph: str) -> str | None:
    return f"{prefix}_{graph}" if prefix else None


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
        self.profiles = profiles or {}
        self.encoder = make_session(encoder_path, provider, threads=threads, cache_dir=cache_dir,
                                    fp16=fp16, int8=int8, profile=self.profiles.get("encoder"),
                                    profile_prefix=_prefix(profile_prefix, "encoder"))
        # The heads are FP32 graphs in every variant: TensorRT must not lower them to FP16.
        self.heads = {name: make_session(p, provider, threads=threads, cache_dir=cache_dir,
                                         profile=self.profiles.get(name),
                                         profile_prefix=_prefix(profile_prefix, name))
                      for name, p in head_paths.items()}
        # Where IO binding keeps tensors; None = plain numpy in and out (CPU provider).
        self.device: str | None = "cuda" if provider in ("cuda", "tensorrt") else None
        self._device_cache: dict[str, tuple[np.ndarray, Any]] = {}
        self.encoder_outputs = [o.name for o in self.encoder.get_outputs()]
        self.head_io = {name: ([i.name for i in s.get_inputs()], [o.name for o in s.get_outputs()])
                        for name, s in self.heads.items()}

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
        self._within_profile("encoder", {"images": images})
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


def default_threads() -> int | None:
    value = os.environ.get("CLIPINSPECT_THREADS")
    return int(value) if value else None
