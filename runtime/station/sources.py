"""Where a station's frames come from: one small protocol (:class:`Source`), one class per kind.

A source's ``read`` returns the next :class:`Frame` or ``None`` when none came within the
timeout; it raises :class:`SourceLost` when the device is gone (the station closes it and opens
it again with back-off) and :class:`SourceEnded` at the end of a finite source (a video file, a
folder read once). Each frame carries the host's arrival time, taken as the frame is received,
and, where the device gives them, its own frame id and time stamp. ``counters`` count what
arrived, what arrived incomplete, what the frame ids say was dropped, and reconnections.
The GigE Vision source is in aravis.py.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from ..core.errors import ClipInspectError, UsageError
from ..core.images import IMAGE_SUFFIXES, EncodedImage


class SourceLost(ClipInspectError):
    """The device is gone or stopped delivering; the station reconnects."""


class SourceEnded(Exception):
    """A finite source has no more frames."""


@dataclass
class Frame:
    image: np.ndarray | EncodedImage  # (H, W, 3) uint8 RGB, or an image file's bytes
    arrival: float  # time.monotonic() when the host received it
    arrival_ns: int  # time.time_ns() of the same moment
    frame_id: int | None = None  # the device's, where it gives one
    camera_timestamp_ns: int | None = None  # the device's own clock, where it gives one
    name: str = ""
    done: Callable[[], None] | None = None  # called once the part's verdict is published


@dataclass
class Counters:
    frames: int = 0
    incomplete: int = 0  # arrived with a status other than success (not inspected)
    dropped: int = 0  # frame ids skipped within one connection
    reconnects: int = 0
    lost_s: float = 0.0  # time spent without a connection
    missed_estimate: int = 0  # lost_s x the configured frame rate (ids restart on reconnect)


class Source(Protocol):
    name: str
    counters: Counters

    def open(self) -> None: ...

    def read(self, timeout_s: float) -> Frame | None: ...

    def close(self) -> None: ...


def arrived(image, **kw) -> Frame:
    return Frame(image, time.monotonic(), time.time_ns(), **kw)


@dataclass
class FolderSource:
    """Image files put in a folder, inspected once each in name order when they have stopped
    changing for ``settle_s``; after its verdict is published a file is moved to ``done`` (or
    remembered, if no done folder is set: then a restart inspects it again). With ``loop``, the
    folder's files are read again and again (a replay for trying a station)."""

    folder: Path
    done: Path | None = None
    settle_s: float = 1.0
    loop: bool = False
    name: str = "folder"
    counters: Counters = field(default_factory=Counters)

    def __post_init__(self):
        self.folder = Path(self.folder)
        self._taken: set[str] = set()
        self._ready: list[Path] = []

    def open(self) -> None:
        if not self.folder.is_dir():
            raise UsageError(f"[source] folder {str(self.folder)!r} is not a folder")
        if self.done is not None:
            Path(self.done).mkdir(parents=True, exist_ok=True)

    def _scan(self) -> list[Path]:
        now, files = time.time(), []
        for entry in sorted(os.scandir(self.folder), key=lambda e: e.name):
            if (entry.name.startswith(".") or not entry.is_file(follow_symlinks=False)
                    or Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES
                    or entry.name in self._taken):
                continue
            if now - entry.stat(follow_symlinks=False).st_mtime >= self.settle_s:
                files.append(Path(entry.path))
        return files

    def read(self, timeout_s: float) -> Frame | None:
        if not self._ready:
            self._ready = self._scan()
            if not self._ready and self.loop and self._taken:
                self._taken.clear()
                self._ready = self._scan()
        if not self._ready:
            time.sleep(timeout_s)
            return None
        path = self._ready.pop(0)
        self._taken.add(path.name)
        try:
            data = path.read_bytes()
        except OSError:
            return None  # taken away meanwhile
        self.counters.frames += 1
        return arrived(EncodedImage(data, path.name), name=path.name,
                       done=(lambda: self._finish(path)) if self.done is not None else None)

    def _finish(self, path: Path) -> None:
        from ..serving.watch import move
        try:
            move(path, Path(self.done))
        except FileNotFoundError:
            pass

    def close(self) -> None:
        pass


@dataclass
class OpenCVSource:
    """A device index, an RTSP/HTTP URL or a video file, through OpenCV (the camera extra)."""

    url: str
    name: str = "opencv"
    counters: Counters = field(default_factory=Counters)

    def __post_init__(self):
        self._capture = None
        self._live = not Path(self.url).is_file()

    def open(self) -> None:
        from ..serving.watch import opencv
        cv2 = opencv()
        capture = cv2.VideoCapture(int(self.url) if self.url.isdigit() else self.url)
        if not capture.isOpened():
            raise SourceLost(f"{self.url!r} cannot be opened by OpenCV: check the device index, "
                             "the URL (and its credentials) or the file path")
        self._capture, self._cv2 = capture, cv2

    def read(self, timeout_s: float) -> Frame | None:
        ok, frame = self._capture.read()
        if not ok:
            if self._live:
                raise SourceLost(f"{self.url!r} stopped delivering frames")
            raise SourceEnded
        self.counters.frames += 1
        return arrived(self._cv2.cvtColor(frame, self._cv2.COLOR_BGR2RGB))

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None
