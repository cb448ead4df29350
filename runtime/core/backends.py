"""Choosing a backend: :func:`open_backend`, the one place that maps a provider to its class.

Each backend is one file conforming to :class:`~.backend.Backend` and does its own setup in its
``open`` (onnxruntime's TensorRT optimization profiles, the native engines' limits). TensorRT,
cupy and onnx are imported only when a provider that needs them is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import UsageError, did_you_mean
from .names import ORT_PROVIDERS, TENSORRT_NATIVE
from .onnxruntime_backend import (PROVIDERS, OrtBackend, ProfileError, ProviderError,
                                  available_providers, default_threads, ort_conflict,
                                  ort_tensorrt_profiles, stored_shots, trt_cache_dir)

if TYPE_CHECKING:
    from .backend import Backend
    from .bundle import Bundle

__all__ = ["BACKEND_CLASSES", "PROVIDERS", "ProfileError", "ProviderError", "OrtBackend",
           "available_providers", "backend_class", "default_threads", "open_backend",
           "ort_conflict", "ort_tensorrt_profiles", "stored_shots", "trt_cache_dir"]

# provider -> (module, class); modules relative to clipinspect.runtime, imported on demand.
BACKEND_CLASSES = {
    **{name: ("core.onnxruntime_backend", "OrtBackend") for name in ORT_PROVIDERS},
    TENSORRT_NATIVE: ("tensorrt.backend", "TrtBackend"),
}


def backend_class(provider: str) -> type:
    """The class serving ``provider``; importing it imports no TensorRT (that happens when an
    instance is made)."""
    if provider not in BACKEND_CLASSES:
        raise ProviderError(f"unknown provider {provider!r}"
                            f"{did_you_mean(provider, BACKEND_CLASSES)}: choose one of "
                            f"{', '.join(BACKEND_CLASSES)}")
    module, name = BACKEND_CLASSES[provider]
    return getattr(importlib.import_module(f"clipinspect.runtime.{module}"), name)


def open_backend(bundle: "Bundle", precision: str, provider: str = "cpu", *,
                 threads: int | None = None, batch_size: int | None = None,
                 verify_checksums: bool = True) -> "Backend":
    """The backend running ``bundle``'s ``precision`` graphs on ``provider``.

    provider: cpu, cuda or tensorrt (onnxruntime execution providers), or tensorrt-native
    (engines from 'clipinspect build-engine', no onnxruntime). ``batch_size``: the largest
    batch the caller will run (sizes the TensorRT profiles; checked against native engines).
    """
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise UsageError(f"batch size must be a whole number >= 1, got {batch_size!r}")
    return backend_class(provider).open(bundle, precision, provider, threads=threads,
                                        batch_size=batch_size, verify_checksums=verify_checksums)
