"""A local Triton Inference Server on loopback: the ``tritonserver`` binary inside the
``nvidia-pytriton`` wheel (Triton 2.51, CPU, Python backend only), serving a repository written
by ``clipinspect triton --platform python``. Used by the real-server tests and the Triton vs
``clipinspect serve`` benchmark; not a production launcher (GPU servers run NVIDIA's container).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

READY_TIMEOUT_S = 180


class TritonServerError(RuntimeError):
    """tritonserver exited or did not become ready; the message ends with its log."""


@dataclass
class Server:
    repo: Path
    http: str      # host:port
    grpc: str
    metrics: str
    log: Path
    pid: int


def tritonserver_dir() -> Path | None:
    """The Triton build inside the installed nvidia-pytriton wheel, or None without it."""
    spec = importlib.util.find_spec("pytriton")
    root = Path(spec.origin).parent / "tritonserver" if spec and spec.origin else None
    return root if root is not None and (root / "bin" / "tritonserver").is_file() else None


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_ready(proc: subprocess.Popen, url: str, log: Path,
               timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TritonServerError(f"tritonserver exited with {proc.returncode}:\n"
                                    f"{log.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TritonServerError(f"tritonserver not ready after {timeout_s:g} s:\n"
                            f"{log.read_text()[-6000:]}")


@contextlib.contextmanager
def running_server(repo: Path, workdir: Path) -> Iterator[Server]:
    """tritonserver serving ``repo`` until the block ends; then stopped by its PID (it drains
    in-flight requests first). ``workdir`` receives the backends folder and the log."""
    root = tritonserver_dir()
    if root is None:
        raise TritonServerError("no tritonserver binary: pip install nvidia-pytriton (Linux "
                                "x86_64; in the dev extra)")
    # The Python backend runs the stub found in its own folder; the wheel ships one per Python
    # version. Copied, so the installed wheel is never modified.
    backends = workdir / "backends"
    if not backends.is_dir():
        shutil.copytree(root / "backends", backends)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy2(root / "python_backend_stubs" / version / "triton_python_backend_stub",
                 backends / "python")
    env = dict(os.environ)
    libs = root.parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libs),
                                                           env.get("LD_LIBRARY_PATH")]))
    # The stub's embedded Python ignores PYTHONPATH but finds its prefix from the 'python3' on
    # PATH: this environment's, so numpy (which Triton's own Python utilities import) is found.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    http, grpc, metrics = free_ports(3)
    log = workdir / "tritonserver.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(root / "bin" / "tritonserver"), f"--model-repository={repo}",
             f"--backend-directory={backends}", "--http-address=127.0.0.1",
             "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
             f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}",
             "--exit-timeout-secs=5"],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, f"127.0.0.1:{http}", log)
        yield Server(repo, f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", f"127.0.0.1:{metrics}", log,
                     proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
