"""Choosing a backend: :func:`open_backend`, the one place that maps a provider to its class.

Each backend is one file conforming to :class:`~.backend.Backend` and does its own setup in its
``open`` (onnxruntime's TensorRT optimization profiles, the native engines' limits). TensorRT,
cupy and onnx are imported only when a provider that needs them is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import UsageError
from .names import ATTENTION_CHOICES, ENCODER, FUSED_ENCODER, ORT_PROVIDERS
from .registry import BACKENDS, backend_loader, register_backend
from .onnxruntime_backend import (PROVIDERS, OrtBackend, ProfileError, ProviderError,
                                  available_providers, default_threads, ort_conflict,
                                  ort_tensorrt_profiles, stored_shots, trt_cache_dir)

if TYPE_CHECKING:
    from .backend import Backend
    from .bundle import Bundle

__all__ = ["BACKENDS", "PROVIDERS", "ProfileError", "ProviderError", "OrtBackend",
           "available_providers", "backend_class", "default_threads", "encoder_graph", "open_backend",
           "ort_conflict", "ort_tensorrt_profiles", "stored_shots", "trt_cache_dir"]


def _ort_backend() -> type:
    return OrtBackend


for _provider in ORT_PROVIDERS:
    register_backend(_provider, _ort_backend)


def backend_class(provider: str) -> type:
    """The class serving ``provider`` (registered in core.registry: onnxruntime's providers
    here, ``tensorrt-native`` by runtime/tensorrt); importing it imports no TensorRT (that
    happens when an instance is made)."""
    return backend_loader(provider, ProviderError)()


def open_backend(bundle: "Bundle", precision: str, provider: str = "cpu", *,
                 threads: int | None = None, batch_size: int | None = None,
                 verify_checksums: bool = True, attention: str = "auto") -> "Backend":
    """The backend running ``bundle``'s ``precision`` graphs on ``provider``.

    provider: cpu, cuda or tensorrt (onnxruntime execution providers), or tensorrt-native
    (engines from 'clipinspect build-engine', no onnxruntime). ``batch_size``: the largest
    batch the caller will run (sizes the TensorRT profiles; checked against native engines).
    ``attention``: which encoder graph onnxruntime runs (:func:`encoder_graph`).
    """
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise UsageError(f"batch size must be a whole number >= 1, got {batch_size!r}")
    graph = encoder_graph(bundle, precision, provider, attention)
    extra = {"encoder_graph": graph} if provider in ORT_PROVIDERS else {}
    if precision == "int8" and provider == "cpu":
        warn_if_int8_clips(bundle)
    return backend_class(provider).open(bundle, precision, provider, threads=threads,
                                        batch_size=batch_size, verify_checksums=verify_checksums,
                                        **extra)


def warn_if_int8_clips(bundle: "Bundle") -> None:
    """Say so, once per process, when a bundle's INT8 weights use the full range on a CPU whose
    onnxruntime INT8 kernels clip such products (int8_kernels.py): its scores here are not what
    its QDQ arithmetic says, and its agreement record may come from kernels that do not clip."""
    import sys

    from .int8_kernels import REDUCED_WEIGHT_MAX, saturates

    record = bundle.manifest.quantization.get("int8")
    weights = (record.scheme.weights or "") if record is not None and record.scheme else ""
    if f"[-{REDUCED_WEIGHT_MAX}, {REDUCED_WEIGHT_MAX}]" in weights or bundle.root in _WARNED:
        return
    if saturates():
        _WARNED.add(bundle.root)
        print(f"clipinspect: warning: bundle {str(bundle.root)!r} has full-range INT8 weights and "
              "this CPU's onnxruntime INT8 kernels clip their products (x86 without VNNI): its "
              "INT8 scores here may be less accurate than its agreement record says. "
              "Quantize it on this machine or with 'clipinspect quantize --weight-range "
              "reduced'", file=sys.stderr)


_WARNED: set = set()


def encoder_graph(bundle: "Bundle", precision: str, provider: str, attention: str = "auto"
                  ) -> str:
    """The encoder graph of ``precision`` a session runs: ``encoder_fused`` (attention as
    onnxruntime's fused operator) for ``attention`` "fused", and for "auto" on onnxruntime's
    CPU provider where the bundle has it; ``encoder`` (standard ONNX operators) otherwise."""
    if attention not in ATTENTION_CHOICES:
        raise UsageError(f"attention {attention!r}: choose one of {', '.join(ATTENTION_CHOICES)}")
    has_fused = FUSED_ENCODER in bundle.manifest.graphs.get(precision, {})
    if attention == "fused":
        if provider != "cpu":
            raise UsageError(f"--attention fused runs on onnxruntime's CPU provider only, not "
                             f"{provider!r} (its graph uses onnxruntime's own fused operator); "
                             "use --attention standard or auto")
        if not has_fused:
            raise UsageError(f"bundle {str(bundle.root)!r} has no fused-attention {precision} "
                             "encoder: export it again with --fused-attention (and quantize "
                             "again), or use --attention standard")
        return FUSED_ENCODER
    return FUSED_ENCODER if attention == "auto" and provider == "cpu" and has_fused else ENCODER
