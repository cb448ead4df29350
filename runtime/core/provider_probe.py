"""What the GPU providers actually run on, and why one fell back: ``clipinspect providers``.

``onnxruntime.get_available_providers()`` lists the providers a build was compiled with, also
when their libraries (CUDA, cuDNN, TensorRT) cannot be loaded; onnxruntime then assigns the
next provider without raising and says why only in its log. So each provider is tried on a
one-node graph built in memory, its session's ``get_providers()`` is what it runs on, and the
log written while the session was made is the loader's reason (gpu_libraries.py), with the CUDA
driver, CUDA runtime, cuDNN and TensorRT versions found.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

from .gpu_libraries import (LIBRARIES, captured_output, library_version, loader_reason,
                            package_version)
from .names import ORT_PROVIDERS


def tiny_model() -> bytes:
    """One Add node on (1, 8) float tensors: enough for a provider to take the graph."""
    import onnx
    from onnx import TensorProto, helper

    x, y, z = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8]) for n in "xyz")
    graph = helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"])], "probe", [x, y], [z])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # opset 17's IR: every onnxruntime the extras admit reads it
    onnx.checker.check_model(model)
    return model.SerializeToString()


def probe_provider(provider: str) -> dict[str, Any]:
    """{provider, onnxruntime_name, available, runs_on, fell_back, reason} for one of cpu,
    cuda, tensorrt: a session on :func:`tiny_model` with the options the runtime uses."""
    from .onnxruntime_backend import PROVIDERS, _import_ort, provider_options

    ort = _import_ort()
    name = PROVIDERS[provider]
    out: dict[str, Any] = {"provider": provider, "onnxruntime_name": name,
                           "available": name in ort.get_available_providers(), "runs_on": [],
                           "fell_back": False, "reason": ""}
    if not out["available"]:
        out["reason"] = f"not built into this onnxruntime ({ort_distribution()})"
        return out
    with tempfile.TemporaryDirectory(prefix="clipinspect-probe-") as tmp:
        with captured_output() as log:
            try:
                session = ort.InferenceSession(
                    tiny_model(), providers=provider_options(provider, cache_dir=Path(tmp)))
                out["runs_on"] = session.get_providers()
            except Exception as e:  # the probe reports the failure instead of raising it
                out["reason"] = f"{type(e).__name__}: {e}"
    out["fell_back"] = name not in out["runs_on"]
    if out["fell_back"] and not out["reason"]:
        out["reason"] = loader_reason(log["text"]) or "onnxruntime printed no reason"
    return out


def ort_distribution() -> str:
    """'onnxruntime-gpu 1.31.1' (or the CPU package), from the installed metadata."""
    found = [f"{d} {package_version(d)}" for d in ("onnxruntime-gpu", "onnxruntime")
             if package_version(d)]
    return ", ".join(found) or "onnxruntime not installed"


GPU_PACKAGES = ("onnxruntime-gpu", "onnxruntime", "tensorrt", "tensorrt-cu12", "tensorrt-cu13",
                "cupy-cuda12x", "cupy-cuda13x", "nvidia-cudnn-cu12", "nvidia-cudnn-cu13",
                "nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime")


def report(providers: tuple[str, ...] = ORT_PROVIDERS) -> dict[str, Any]:
    """Everything ``clipinspect providers`` prints, as data."""
    return {"onnxruntime": ort_distribution(),
            "providers": [probe_provider(p) for p in providers],
            "tensorrt_native": {m: importlib.util.find_spec(m) is not None
                                for m in ("tensorrt", "cupy")},
            "libraries": {what: library_version(what) for what in LIBRARIES},
            "packages": {d: v for d in GPU_PACKAGES if (v := package_version(d))}}


def report_lines(data: dict[str, Any]) -> list[str]:
    lines = [f"onnxruntime      {data['onnxruntime']}"]
    for p in data["providers"]:
        if not p["available"]:
            state = f"unavailable: {p['reason']}"
        elif p["fell_back"]:
            state = (f"FELL BACK to {', '.join(p['runs_on']) or 'nothing'}: {p['reason']}")
        else:
            state = f"runs on {', '.join(p['runs_on'])}"
        lines.append(f"{p['provider']:<16} {state}")
    missing = [m for m, found in data["tensorrt_native"].items() if not found]
    lines.append(f"{'tensorrt-native':<16} " + (f"unavailable: {' and '.join(missing)} not "
                                                 "installed" if missing else
                                                 "tensorrt and cupy installed (engines: "
                                                 "'clipinspect build-engine')"))
    lines += [f"{what:<16} {found}" for what, found in data["libraries"].items()]
    lines.append("packages         " + (", ".join(f"{d} {v}" for d, v in data["packages"].items())
                                        or "none of the GPU packages"))
    return lines
