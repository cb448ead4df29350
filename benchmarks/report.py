"""What every benchmark result carries: the machine it ran on, the command that reproduces it,
and how it is written (JSON for programs, Markdown for people)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


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


def environment() -> dict:
    """The record every measurement stores next to its figures: the machine, its load average at
    the time (a shared machine's figures are read with it) and the versions that did the work."""
    import numpy

    versions = {"numpy": numpy.__version__}
    try:
        import onnxruntime

        versions = {"onnxruntime": onnxruntime.__version__, **versions}
    except ImportError:
        pass
    return {"machine": machine(), "load_average": list(os.getloadavg()), "versions": versions}


def command_line(program: str, argv: Sequence[str] | None = None,
                 placeholders: Mapping[str, str] | None = None) -> str:
    """The command that reproduces a result: ``program`` and its arguments (``sys.argv[1:]`` by
    default), with the paths of this machine written as the placeholders the docs use
    (``{"/tmp/b": "BUNDLE"}`` turns ``/tmp/b`` and ``/tmp/b/x`` into ``BUNDLE``, ``BUNDLE/x``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    swaps = sorted((placeholders or {}).items(), key=lambda kv: -len(str(kv[0])))

    def placed(arg: str) -> str:
        for path, name in swaps:
            root = str(path).rstrip("/")
            if arg == root or arg.startswith(root + "/"):
                return name + arg[len(root):]
        return arg
    return " ".join([program, shlex.join(placed(a) for a in args)]).strip()


def command_of(parser: argparse.ArgumentParser, args: argparse.Namespace, program: str,
               placeholders: Mapping[str, str] | None = None) -> str:
    """The command line that gives ``args`` to ``parser`` again: every option whose value
    differs from its default (lists comma-separated), positionals in their place."""
    words: list[str] = []
    for action in parser._actions:
        if action.dest in ("help", argparse.SUPPRESS) or action.help == argparse.SUPPRESS:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default or value is None:
            continue
        flag = action.option_strings[:1]
        if isinstance(action, argparse._StoreTrueAction):
            words += flag
        elif isinstance(action, argparse._AppendAction):
            words += [w for v in value for w in (*flag, str(v))]
        else:
            text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            words += [*flag, text]
    return command_line(program, words, placeholders)


def machine_text(m: Mapping[str, Any]) -> str:
    """``CPU, N logical cores``: how every Markdown result names its machine."""
    return f"{m['cpu']}, {m['logical_cores']} logical cores"


def load_text(load: Sequence[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in load)


def write_json(result: dict, path: str | Path, indent: int = 2) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=indent) + "\n")


def write_results(result: dict, out: str | Path, render: Callable[[dict], str], *,
                  indent: int = 2, echo: bool = True) -> None:
    """``out``.json and ``out``.md (``out`` is a path without extension); the Markdown printed
    too unless ``echo`` is false."""
    out = Path(out)
    text = render(result)
    write_json(result, out.with_suffix(".json"), indent)
    out.with_suffix(".md").write_text(text)
    if echo:
        print(text)
