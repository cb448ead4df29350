"""A local Triton Inference Server on loopback: the ``tritonserver`` binary inside the
``nvidia-pytriton`` wheel (Triton 2.51, CPU, Python backend only), serving a repository written
by ``clipinspect triton --platform python``. Used by the real-server tests and the Triton vs
``clipinspect serve`` benchmark; not a production launcher (GPU servers run NVIDIA's container).

The server runs from a venv of its own (``server_environment``, made on first use with this
interpreter and its pip): the wheel pins numpy < 2, and the 2.51 Python backend's stub needs it
(with numpy 2 it crashes on string inputs), so the environment running clipinspect and the
tests keeps numpy 2. The Python-backend models of the repository are pointed at that venv's
site-packages (``use_site_packages``) when the server starts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

READY_TIMEOUT_S = 180
PIP_TIMEOUT_S = 1800
# Where the server's venv lives when set; otherwise the folder the caller names.
VENV_ENV = "CLIPINSPECT_TRITON_VENV"
# The wheel with tritonserver, and what the Python-backend models import: numpy
# (categories.py, python_model.py) and onnxruntime (python_model.py); nothing of clipinspect.
WHEEL = "nvidia-pytriton==0.7.0"
# Written last into a finished venv: the requirements it was made with, one a line.
STAMP = "clipinspect-requirements.txt"


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


@dataclass(frozen=True)
class ServerEnvironment:
    """A Python environment holding nvidia-pytriton: its interpreter and site-packages."""

    python: Path
    site_packages: Path
    version: str    # "3.11": which Python-backend stub to run

    @property
    def root(self) -> Path:
        return self.site_packages / "pytriton" / "tritonserver"

    @property
    def libs(self) -> Path:
        return self.site_packages / "nvidia_pytriton.libs"


def supported_platform() -> str | None:
    """None where the wheel exists (Linux x86_64), else why not."""
    if sys.platform == "linux" and platform.machine() == "x86_64":
        return None
    return (f"nvidia-pytriton's tritonserver is built for Linux x86_64 only, not "
            f"{sys.platform} {platform.machine()}")


def server_requirements() -> list[str]:
    """What the server's venv installs. onnxruntime at this environment's version where it has
    one, so the server computes what the runtime here computes."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        onnxruntime = f"onnxruntime=={version('onnxruntime')}"
    except PackageNotFoundError:
        onnxruntime = "onnxruntime"
    return [WHEEL, "numpy<2", onnxruntime]


def _describe(python: Path) -> ServerEnvironment:
    code = ("import sys, sysconfig; print(sysconfig.get_paths()['purelib']); "
            "print('%d.%d' % sys.version_info[:2])")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    site_packages, version = out.stdout.split()
    return ServerEnvironment(python, Path(site_packages), version)


def _run(command: list[str], what: str) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise TritonServerError(f"{what}: no result after {PIP_TIMEOUT_S} s") from e
    if done.returncode != 0:
        raise TritonServerError(f"{what} failed ({done.returncode}): {' '.join(command)}\n"
                                f"{(done.stderr or done.stdout)[-4000:]}")


def server_environment(folder: Path | str | None = None,
                       progress: Callable[[str], None] | None = None) -> ServerEnvironment:
    """The venv tritonserver runs from: ``$CLIPINSPECT_TRITON_VENV`` or ``folder``, reused when
    complete (made with the same requirements), else made with this interpreter (``-m venv``)
    and that venv's pip (which needs the package index, or a pip cache holding the wheels).
    Raises TritonServerError with pip's message when that fails."""
    chosen = os.environ.get(VENV_ENV) or folder
    if not chosen:
        raise TritonServerError(f"no folder for the Triton server's venv: give one or set "
                                f"{VENV_ENV}")
    folder = Path(chosen).absolute()
    why = supported_platform()
    if why is not None:
        raise TritonServerError(why)
    wanted = "\n".join(server_requirements()) + "\n"
    python = folder / "bin" / "python"
    import fcntl  # here: Linux only, like the wheel

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once: one makes it, the other waits
        stamp = folder / STAMP
        if not (python.is_file() and stamp.is_file() and stamp.read_text() == wanted):
            if progress is not None:
                progress(f"making the Triton server's venv in {folder} ({WHEEL}, ~200 MB) ...")
            stamp.unlink(missing_ok=True)
            _run([sys.executable, "-m", "venv", str(folder)], "python -m venv")
            _run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                  *wanted.split("\n")[:-1]], f"pip install into {folder}")
            stamp.write_text(wanted)
    environment = _describe(python)
    if not (environment.root / "bin" / "tritonserver").is_file():
        raise TritonServerError(f"{folder} holds no tritonserver binary; delete the folder "
                                f"to have it made again")
    return environment


def current_environment() -> ServerEnvironment | None:
    """This environment, where nvidia-pytriton is installed in it; else None."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        return None
    found = ServerEnvironment(Path(sys.executable), Path(spec.origin).parent.parent,
                              f"{sys.version_info.major}.{sys.version_info.minor}")
    return found if (found.root / "bin" / "tritonserver").is_file() else None


def tritonserver_dir() -> Path | None:
    """The Triton build inside an nvidia-pytriton wheel installed here, or None without it."""
    found = current_environment()
    return found.root if found is not None else None


# A Python-backend model's site-packages parameter, as python_model.py writes it.
_SITE_PARAMETER = re.compile(r'(key: "(?P<key>[^"]+)"\n  value: \{\n    string_value: )'
                             r'"(?:[^"\\]|\\.)*"')


def use_site_packages(repo: Path, folders: list[str]) -> None:
    """Point every Python-backend model of ``repo`` at ``folders`` (its
    ``clipinspect_site_packages`` parameter): where the server's numpy and onnxruntime are."""
    from .pbtxt import pbtxt_string
    from .python_model import SITE_PACKAGES

    value = pbtxt_string(json.dumps(folders))
    for config in sorted(Path(repo).glob("*/config.pbtxt")):
        text = config.read_text()
        new = _SITE_PARAMETER.sub(
            lambda m: m.group(1) + value if m.group("key") == SITE_PACKAGES else m.group(0),
            text)
        if new != text:
            config.write_text(new)


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


def _launch_env(environment: ServerEnvironment) -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(environment.libs),
                                                           env.get("LD_LIBRARY_PATH")]))
    # The stub's embedded Python ignores PYTHONPATH but finds its prefix from the 'python3' on
    # PATH: the server environment's, so its numpy (which Triton's own Python utilities
    # import) is found.
    env["PATH"] = os.pathsep.join([str(environment.python.parent), env.get("PATH", "")])
    return env


@contextlib.contextmanager
def running_server(repo: Path, workdir: Path,
                   environment: ServerEnvironment | None = None) -> Iterator[Server]:
    """tritonserver of ``environment`` (default: the wheel installed here) serving ``repo``
    until the block ends; then stopped by its PID (it drains in-flight requests first).
    ``workdir`` receives the backends folder and the log. The repository's Python-backend
    models are pointed at the environment's site-packages first."""
    environment = environment or current_environment()
    if environment is None:
        raise TritonServerError("no tritonserver binary here: give the environment of "
                                "server_environment() (a venv with nvidia-pytriton, Linux "
                                "x86_64)")
    root = environment.root
    use_site_packages(repo, [str(environment.site_packages)])
    # The Python backend runs the stub found in its own folder; the wheel ships one per Python
    # version. Copied, so the installed wheel is never modified.
    backends = workdir / "backends"
    if not backends.is_dir():
        shutil.copytree(root / "backends", backends)
    shutil.copy2(root / "python_backend_stubs" / environment.version
                 / "triton_python_backend_stub", backends / "python")
    http, grpc, metrics = free_ports(3)
    log = workdir / "tritonserver.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(root / "bin" / "tritonserver"), f"--model-repository={repo}",
             f"--backend-directory={backends}", "--http-address=127.0.0.1",
             "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
             f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}",
             "--exit-timeout-secs=5"],
            env=_launch_env(environment), stdout=out, stderr=subprocess.STDOUT)
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
