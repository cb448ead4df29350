"""Choosing and setting up a backend: :func:`open_backend`, the one place that knows providers.

Each backend is one file conforming to :class:`~.backend.Backend`; this module only maps a
provider to its class and does the provider-specific setup (onnxruntime's TensorRT optimization
profiles, the native engines' limits). TensorRT, cupy and onnx are imported only when a provider
that needs them is asked for.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UsageError, did_you_mean
from .onnxruntime_backend import (PROVIDERS, OrtBackend, ProfileError, ProviderError,
                                  available_providers, default_threads, ort_conflict)

if TYPE_CHECKING:
    from .backend import Backend
    from .bundle import Bundle

__all__ = ["BACKEND_CLASSES", "PROVIDERS", "ProfileError", "ProviderError", "OrtBackend",
           "available_providers", "backend_class", "default_threads", "open_backend",
           "ort_conflict", "ort_tensorrt_profiles"]

# provider -> (module, class); modules relative to clipinspect.runtime, imported on demand.
BACKEND_CLASSES = {
    **{name: ("core.onnxruntime_backend", "OrtBackend") for name in PROVIDERS},
    "tensorrt-native": ("tensorrt.backend", "TrtBackend"),
}
HEAD_GRAPHS = ("head_zeroshot", "head_fewshot")


def backend_class(provider: str) -> type:
    """The class serving ``provider``; importing it imports no TensorRT (that happens when an
    instance is made)."""
    if provider not in BACKEND_CLASSES:
        raise ProviderError(f"unknown provider {provider!r}"
                            f"{did_you_mean(provider, BACKEND_CLASSES)}: choose one of "
                            f"{', '.join(BACKEND_CLASSES)}")
    module, name = BACKEND_CLASSES[provider]
    return getattr(importlib.import_module(f"clipinspect.runtime.{module}"), name)


def stored_shots(bundle: "Bundle") -> int:
    """The most reference images any category of the bundle stores (0 if none)."""
    return max((entry.memory.shots for entry in bundle.manifest.categories.values()
                if entry.memory), default=0)


def ort_tensorrt_profiles(bundle: "Bundle", precision: str, batch_size: int | None = None
                          ) -> dict[str, dict[str, tuple[tuple[int, ...], ...]]]:
    """{graph: {input: (min, opt, max) shape}} for onnxruntime's TensorRT provider.

    Batch: 1..``batch_size``, tuned for ``batch_size`` (None: 1..32 tuned for 8, what the
    callers that do not say their batch size get). Few-shot memory: tuned for the most
    reference images a category stores, up to that or compat.DEFAULT_MAX_SHOTS (16), whichever
    is larger, so references added while the Inspector is open still fit. A larger batch or
    memory is refused by OrtBackend with an error naming the limit (ProfileError).
    """
    import onnx

    from ..tensorrt.compat import DEFAULT_MAX_SHOTS, BatchRange, profile_shapes

    batch = BatchRange() if batch_size is None else BatchRange(1, batch_size, batch_size)
    shots = stored_shots(bundle)
    return {name: profile_shapes(bundle, onnx.load(str(bundle.graph_path(precision, name)),
                                                   load_external_data=False),
                                 batch, max(shots, DEFAULT_MAX_SHOTS), opt_shots=shots or 4)
            for name in ("encoder", *HEAD_GRAPHS)}


def trt_cache_dir(bundle: "Bundle") -> Path:
    """The folder onnxruntime's TensorRT provider keeps its engines in, inside the bundle:
    checked like every write into it (a linked ``cache`` folder is refused, not followed)."""
    from .bundle import bundle_path

    return bundle_path(bundle.root, "cache/ort-trt")


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
    cls = backend_class(provider)
    if provider == "tensorrt-native":
        backend = cls(bundle, precision, verify_checksums)
        if batch_size is not None and batch_size > backend.max_batch:
            raise UsageError(f"batch size {batch_size} is larger than the engines' profile "
                             f"allows ({backend.max_batch}); lower --batch-size or rebuild with "
                             f"'{backend.rebuild} --max-batch {batch_size}'")
        return backend
    profiles = ort_tensorrt_profiles(bundle, precision, batch_size) if provider == "tensorrt" \
        else None
    return cls(bundle.graph_path(precision, "encoder"),
               {name: bundle.graph_path(precision, name) for name in HEAD_GRAPHS},
               provider=provider, threads=threads or default_threads(),
               cache_dir=trt_cache_dir(bundle) if provider == "tensorrt" else None, fp16=precision == "fp16",
               int8=precision == "int8", profiles=profiles)
