"""The native side of the GPU providers, read without onnxruntime's help: what onnxruntime wrote
to its log while a session was made (the only place it says why a provider's libraries did not
load), and the CUDA driver, CUDA runtime, cuDNN and TensorRT versions, from their libraries
(ctypes) and the installed packages' metadata. Used by make_session's refusal and by
``clipinspect providers`` (provider_probe.py)."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import io
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

# onnxruntime's log line prefix: '2026-... [W:onnxruntime:Default, file.cc:123 Function] '.
_ORT_PREFIX = re.compile(r"^.*?\[[EWF]:onnxruntime:[^\]]*\]\s*")
_REASON = re.compile(r"\[[EWF]:onnxruntime|EP Error|Failed to load|"
                     r"cannot open shared object|CUDA_PATH is set", re.IGNORECASE)
MAX_REASON = 600


_CAPTURE = threading.Lock()   # file descriptor 2 is the process's: one capture at a time


@contextlib.contextmanager
def captured_output(echo: bool = False) -> Iterator[dict[str, str]]:
    """Collect what is written inside the block to file descriptor 2 (onnxruntime's C++ log,
    TensorRT's build messages) and to ``sys.stdout`` (onnxruntime's Python fallback notice);
    ``["text"]`` holds it afterwards. ``echo``: pass the log on to stderr as it comes (an
    engine build can take minutes) and the notice to stdout at the end."""
    got = {"text": ""}
    with _CAPTURE:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        try:
            saved: int | None = os.dup(2)
        except OSError:   # no file descriptor 2 (a daemon): only the Python notice is kept
            saved = None
        chunks: list[bytes] = []
        reader = None
        if saved is not None:
            read_end, write_end = os.pipe()
            reader = threading.Thread(target=_pump, args=(read_end, saved if echo else None,
                                                          chunks), daemon=True)
            reader.start()
            os.dup2(write_end, 2)
            os.close(write_end)
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                yield got
        finally:
            if sys.stderr is not None:
                sys.stderr.flush()
            if saved is not None:
                os.dup2(saved, 2)   # closes the pipe's last write end: the reader ends
                reader.join(timeout=10)   # a child process could hold the pipe open
                os.close(saved)
            got["text"] = b"".join(chunks).decode(errors="replace") + printed.getvalue()
            if echo and printed.getvalue() and sys.stdout is not None:
                sys.stdout.write(printed.getvalue())


def _pump(read_end: int, echo_to: int | None, chunks: list[bytes]) -> None:
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            chunks.append(chunk)
            if echo_to is not None:
                os.write(echo_to, chunk)


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
