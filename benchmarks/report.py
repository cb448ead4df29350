"""What every benchmark result carries: the machine it ran on, and how it is written."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Callable


def read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def command(*args: str) -> str | None:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine() -> dict:
    """CPU, GPU (name, driver, CUDA), Jetson model and power mode, package versions."""
    cpu = platform.processor()
    for line in (read_text("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    info: dict[str, Any] = {"cpu": cpu, "logical_cores": os.cpu_count(),
                            "platform": platform.platform(), "python": platform.python_version()}
    smi = command("nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                   "--format=csv,noheader")
    if smi:
        fields = ("name", "driver", "memory")
        info["gpus"] = [dict(zip(fields, (x.strip() for x in line.split(","))))
                        for line in smi.splitlines()]
        header = command("nvidia-smi") or ""
        if "CUDA Version:" in header:
            info["cuda"] = header.split("CUDA Version:", 1)[1].split()[0]
    tegra = read_text("/etc/nv_tegra_release")
    if tegra:
        info["jetson"] = {"release": tegra.splitlines()[0],
                          "model": (read_text("/proc/device-tree/model") or "").strip("\x00"),
                          "power_mode": command("nvpmodel", "-q")}
    versions = {}
    for name in ("numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "open_clip_torch",
                 "tensorrt"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    info["versions"] = versions
    return info


def write_results(result: dict, out: str | Path, render: Callable[[dict], str]) -> None:
    """``out``.json and ``out``.md (``out`` is a path without extension); the table printed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(result))
    print(render(result))
