"""What the GPU providers actually run on, and why one fell back: ``clipinspect providers``.

``onnxruntime.get_available_providers()`` lists the providers a build was compiled with, also
when their libraries (CUDA, cuDNN, TensorRT) cannot be loaded; onnxruntime then assigns the
next provider without raising and says why only in its log. So each provider is tried on a
one-node graph built in memory, its session's ``get_providers()`` is what it runs on, and the
log written while the session was made is the loader's reason. The CUDA driver, CUDA runtime,
cuDNN and TensorRT versions are read from their libraries (ctypes) where they load, and from the
installed packages' metadata.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import importlib.util
import io
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

# onnxruntime's log line prefix: '2026-... [W:onnxruntime:Default, file.cc:123 Function] '.
_ORT_PREFIX = re.compile(r"^.*?\[[EWF]:onnxruntime:[^\]]*\]\s*")
_REASON = re.compile(r"\[[EWF]:onnxruntime|EP Error|Failed to load|cannot open shared object|"
                     r"CUDA_PATH is set", re.IGNORECASE)
MAX_REASON = 600


@contextlib.contextmanager
def captured_output() -> Iterator[dict[str, str]]:
    """Collect what is written inside the block to file descriptor 2 (onnxruntime's C++ log)
    and to ``sys.stdout`` (its Python fallback notice); ``["text"]`` holds it afterwards. The
    caller decides whether to pass it on (make_session writes it back to stderr)."""
    got = {"text": ""}
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    printed = io.StringIO()
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            with contextlib.redirect_stdout(printed):
                yield got
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            got["text"] = tmp.read().decode(errors="replace") + printed.getvalue()


def loader_reason(text: str) -> str:
    """The lines of onnxruntime's output that say why a provider was not used, one line."""
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if not line or not _REASON.search(line) or set(line) <= set("* "):
            continue
        line = _ORT_PREFIX.sub("", line)
        if line not in lines:
            lines.append(line)
    reason = " | ".join(lines)
    return reason if len(reason) <= MAX_REASON else reason[:MAX_REASON - 3] + "..."


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


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- library versions
def _cuda_version(v: int) -> str:
    """CUDA's encoding: 12040 -> '12.4'."""
    return f"{v // 1000}.{(v % 1000) // 10}"


def _cudnn_version(v: int) -> str:
    """cuDNN 9 encodes 9.1.0 as 90100; cuDNN 8 encoded 8.9.2 as 8902."""
    if v >= 90000:
        return f"{v // 10000}.{(v % 10000) // 100}.{v % 100}"
    return f"{v // 1000}.{(v % 1000) // 100}.{v % 100}"


def _tensorrt_version(v: int) -> str:
    """TensorRT >= 10 encodes 10.3.0 as 100300; TensorRT 8 encoded 8.6.1 as 8601."""
    if v >= 100000:
        return f"{v // 10000}.{(v % 10000) // 100}.{v % 100}"
    return f"{v // 1000}.{(v % 1000) // 100}.{v % 100}"


def _int_out(symbol) -> int | None:
    """For cuDriverGetVersion / cudaRuntimeGetVersion: an int out-parameter, 0 = success."""
    value = ctypes.c_int(0)
    return value.value if symbol(ctypes.byref(value)) == 0 else None


def _returned(restype):
    def call(symbol) -> int | None:
        symbol.restype = restype
        return int(symbol())
    return call


# what -> (library names to try, newest first; symbol; how it returns; how to decode)
LIBRARIES = {
    "CUDA driver": (("libcuda.so.1",), "cuDriverGetVersion", _int_out, _cuda_version),
    "CUDA runtime": (("libcudart.so.13", "libcudart.so.12", "libcudart.so"),
                     "cudaRuntimeGetVersion", _int_out, _cuda_version),
    "cuDNN": (("libcudnn.so.9", "libcudnn.so.8", "libcudnn.so"), "cudnnGetVersion",
              _returned(ctypes.c_size_t), _cudnn_version),
    "TensorRT": (("libnvinfer.so.10", "libnvinfer.so.11", "libnvinfer.so"), "getInferLibVersion",
                 _returned(ctypes.c_int32), _tensorrt_version),
}
# Where the pip wheels put these libraries (nvidia-cuda-runtime, nvidia-cudnn, tensorrt-cu*).
WHEEL_LIBRARY_DIRS = ("nvidia/*/lib", "nvidia/*/*/lib", "tensorrt_libs")


def wheel_library_dirs() -> list[Path]:
    dirs: list[Path] = []
    for entry in sys.path:
        root = Path(entry or ".")
        for pattern in WHEEL_LIBRARY_DIRS:
            dirs += [d for d in root.glob(pattern) if d.is_dir() and d not in dirs]
    return dirs


def library_version(what: str, dirs: list[Path] | None = None) -> str:
    """'12.4 (libcudart.so.12)' or 'not found (tried ...)'."""
    names, symbol, call, decode = LIBRARIES[what]
    dirs = wheel_library_dirs() if dirs is None else dirs
    for name in names:
        for candidate in [name, *(str(d / name) for d in dirs if (d / name).exists())]:
            try:
                lib = ctypes.CDLL(candidate)
            except OSError:
                continue
            try:
                value = call(getattr(lib, symbol))
            except (AttributeError, OSError) as e:
                return f"{name} loaded, {symbol} failed ({e})"
            if value is None:
                return f"{name} loaded, {symbol} reported an error (no driver or no GPU?)"
            return f"{decode(value)} ({candidate})"
    return f"not found (tried {', '.join(names)})"


GPU_PACKAGES = ("onnxruntime-gpu", "onnxruntime", "tensorrt", "tensorrt-cu12", "tensorrt-cu13",
                "cupy-cuda12x", "cupy-cuda13x", "nvidia-cudnn-cu12", "nvidia-cudnn-cu13",
                "nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime")


def report(providers: tuple[str, ...] = ("cpu", "cuda", "tensorrt")) -> dict[str, Any]:
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
