"""A dependency-free progress bar on stderr (a live bar on a terminal, sparse lines in logs)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str = "", stream=None, width: int = 28,
                 unit: str = "img"):
        self.total, self.label, self.width, self.unit = max(int(total), 0), label, width, unit
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done = 0
        self.start = time.perf_counter()
        self._last_decile = -1

    def update(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.total) if self.total else self.done + n
        if self.tty:
            self._draw("\r")
        else:
            decile = (10 * self.done // self.total) if self.total else 0
            if decile != self._last_decile:
                self._last_decile = decile
                self._draw("", end="\n")

    def _draw(self, prefix: str, end: str = "") -> None:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(frac * self.width)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        self.stream.write(f"{prefix}{self.label} [{bar:<{self.width}}] {self.done}/{self.total} "
                          f"{rate:.2f} {self.unit}/s, {elapsed:.0f}s elapsed, eta {eta:.0f}s{end}")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
