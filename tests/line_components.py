"""Real line components on loopback for the station tests: Aravis's fake GigE Vision camera, a
mosquitto broker, and a subscriber that is not ours (mosquitto_sub). Each is a child process
started and killed by the test, so faults are real: a killed broker, an unplugged camera."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

FAKE_CAMERA = "arv-fake-gv-camera-0.8"
MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto"
                                          if Path("/usr/sbin/mosquitto").exists() else None)
MOSQUITTO_SUB = shutil.which("mosquitto_sub")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def aravis_missing() -> str | None:
    """Why the fake camera cannot run here, or None."""
    if shutil.which(FAKE_CAMERA) is None:
        return f"{FAKE_CAMERA} not installed (Debian: apt-get install aravis-tools)"
    try:
        from clipinspect.runtime.station.aravis import aravis_module
        aravis_module()
    except Exception as e:
        return str(e)
    return None


class Broker:
    """mosquitto on 127.0.0.1:port, persistent (a restart keeps queued messages of persistent
    sessions, as a line's broker would)."""

    def __init__(self, folder: Path):
        self.folder, self.port = Path(folder), free_port()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.conf = self.folder / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                             f"persistence true\npersistence_location {self.folder}/\n")
        self.proc = None

    def start(self) -> "Broker":
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        return self

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)


class Subscriber:
    """mosquitto_sub on ``topic`` with a persistent session at QoS 1: the JSON results in
    ``messages``, every (topic, payload) in ``received``; it reconnects by itself after a
    broker restart."""

    def __init__(self, broker: Broker, topic: str, client_id: str = "line-reader"):
        self.messages: list[dict] = []
        self.received: list[tuple[str, str]] = []
        self.proc = subprocess.Popen(
            [MOSQUITTO_SUB, "-h", "127.0.0.1", "-p", str(broker.port), "-t", topic, "-q", "1",
             "-c", "-i", client_id, "-v"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            topic, _, payload = line.rstrip("\n").partition(" ")
            self.received.append((topic, payload))
            if topic.endswith("/result"):
                self.messages.append(json.loads(payload))

    def wait_for(self, n: int, timeout_s: float = 30.0, every: bool = False) -> list:
        """The results once ``n`` have come (every message with ``every``)."""
        seen = self.received if every else self.messages
        deadline = time.monotonic() + timeout_s
        while len(seen) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(seen)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


class FakeCamera:
    def __init__(self, serial: str = "GV01"):
        self.serial, self.proc = serial, None

    def start(self) -> "FakeCamera":
        self.proc = subprocess.Popen([FAKE_CAMERA, "-i", "127.0.0.1", "-s", self.serial],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # it answers discovery once its sockets are bound
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
