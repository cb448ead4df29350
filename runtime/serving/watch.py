"""``clipinspect watch``: a hot folder (or a camera / stream) inspected as images arrive.

Hot folder: the image files directly in the input folder are inspected once each, in batches,
when they have stopped changing for ``settle`` seconds (camera software may still be writing a
file when it is first seen). An image is known by its name and a digest of its bytes; its
result is committed to the journal first, then appended to the JSON lines, then the file is
moved to the done folder (or left in place with ``--keep``). A kill at any point therefore
loses nothing and repeats nothing: on restart, files the journal already has are only moved,
and JSON lines the journal has but the file lacks are appended.

Camera / stream (``--source``): frames from OpenCV (a device index, an RTSP/HTTP URL or a video
file), every n-th inspected, results to the journal and the JSON lines (frames are not kept).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core.errors import ClipInspectError, UsageError
from ..core.images import IMAGE_SUFFIXES, EncodedImage
from ..core.inspector import Inspector
from .journal import Entry, Journal, JsonlSink


@dataclass
class Pending:
    path: Path
    image_id: str
    data: bytes


def log(message: str) -> None:
    print(f"clipinspect watch: {message}", file=sys.stderr, flush=True)


class FolderWatcher:
    def __init__(self, inspector: Inspector, input_dir: str | os.PathLike, category: str,
                 journal: Journal, sink: JsonlSink, done_dir: str | os.PathLike | None,
                 mode: str = "auto", batch_size: int = 8, settle: float = 1.0):
        self.inspector, self.category, self.mode = inspector, category, mode
        self.input = Path(input_dir)
        if not self.input.is_dir():
            raise UsageError(f"--input {str(self.input)!r} is not a folder")
        self.done = Path(done_dir) if done_dir is not None else None
        if self.done is not None:
            self.done.mkdir(parents=True, exist_ok=True)
        self.journal, self.sink = journal, sink
        self.batch_size, self.settle = batch_size, settle
        self.origin = f"watch:{self.input.resolve()}"
        self.mode_used = inspector.check(category, mode)
        self.threshold = inspector.thresholds(category, self.mode_used).get("image")
        self._last_stat: dict[str, tuple[int, int]] = {}
        # (name, size, mtime) of files already journaled and kept in place (--keep)
        self._kept: set[tuple[str, int, int]] = set()

    def ready_files(self) -> list[Path]:
        """Image files unchanged since the previous poll and for at least ``settle`` seconds."""
        now = time.time()
        ready, seen = [], {}
        for entry in sorted(os.scandir(self.input), key=lambda e: e.name):
            if (entry.name.startswith(".") or not entry.is_file(follow_symlinks=False)
                    or Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES):
                continue
            st = entry.stat()
            key = (st.st_size, st.st_mtime_ns)
            seen[entry.name] = key
            if (entry.name, *key) in self._kept:
                continue
            if self._last_stat.get(entry.name) == key and now - st.st_mtime >= self.settle:
                ready.append(Path(entry.path))
        self._last_stat = seen
        return ready

    def poll(self) -> int:
        """Process the files that are ready; returns how many were handled."""
        pending: list[Pending] = []
        handled = 0
        for path in self.ready_files():
            try:
                data = path.read_bytes()
            except FileNotFoundError:  # taken away meanwhile
                continue
            image_id = f"{path.name}@{hashlib.sha256(data).hexdigest()[:16]}"
            if self.journal.has(self.origin, image_id):
                self._finish(path)  # inspected before a crash or restart: only move it
                handled += 1
                continue
            pending.append(Pending(path, image_id, data))
            if len(pending) == self.batch_size:
                handled += self._inspect(pending)
                pending = []
        if pending:
            handled += self._inspect(pending)
        return handled

    def _inspect(self, batch: list[Pending]) -> int:
        loaded = [self.inspector.load(EncodedImage(p.data, p.path.name)) for p in batch]
        results = self.inspector.inspect_loaded(loaded, self.category, self.mode)
        entries = [Entry.of(r, self.origin, p.image_id, self.category,
                            self.inspector.bundle.identity, self.inspector.precision,
                            self.threshold) for p, r in zip(batch, results)]
        try:
            rows = self.journal.record(entries)
        except sqlite3.IntegrityError:
            # Another watcher on the same folder and journal got there first; one at a time.
            raise ClipInspectError(f"another 'clipinspect watch' is journaling {self.input} "
                                   f"into {self.journal.path}; run only one per folder") from None
        self.sink.write(rows)
        for p, r in zip(batch, results):
            verdict = ("error: " + r.error if not r.ok else f"score {r.image_score:.4f}" + (
                "" if r.is_anomalous is None else
                " ANOMALOUS" if r.is_anomalous else " ok"))
            log(f"{p.path.name}: {verdict}")
            self._finish(p.path)
        return len(batch)

    def _finish(self, path: Path) -> None:
        if self.done is None:
            st = path.stat()
            self._kept.add((path.name, st.st_size, st.st_mtime_ns))
            return
        target = self.done / path.name
        n = 1
        while target.exists():  # an earlier image of the same name: keep both
            target = self.done / f"{path.stem}.{n}{path.suffix}"
            n += 1
        os.replace(path, target)

    def run(self, interval: float = 0.5, once: bool = False,
            stop: Callable[[], bool] = lambda: False) -> None:
        """Poll until interrupted; with ``once``, until nothing is left or changing."""
        while not stop():
            handled = self.poll()
            if once and not handled and not self._changing():
                return
            if not handled:
                time.sleep(interval)

    def _changing(self) -> bool:
        """Image files present that are not finished (still being written or settling)."""
        return any((name, *key) not in self._kept for name, key in self._last_stat.items())


def opencv():
    try:
        import cv2
    except ImportError:
        raise UsageError("--source needs OpenCV, which is not installed: "
                         "pip install 'clipinspect[camera]' (opencv-python-headless)") from None
    return cv2


def watch_source(inspector: Inspector, source: str, category: str, journal: Journal,
                 sink: JsonlSink, mode: str = "auto", every: int = 1,
                 max_frames: int | None = None) -> int:
    """Inspect frames of a camera, stream or video file; returns the number inspected."""
    cv2 = opencv()
    capture = cv2.VideoCapture(int(source) if source.isdigit() else source)
    if not capture.isOpened():
        raise UsageError(f"--source {source!r} cannot be opened by OpenCV: check the device "
                         "index, the URL (and its credentials) or the file path")
    origin = f"source:{source}"
    mode_used = inspector.check(category, mode)
    threshold = inspector.thresholds(category, mode_used).get("image")
    started = time.strftime("%Y%m%dT%H%M%S")
    frame_no = inspected = 0
    try:
        while max_frames is None or inspected < max_frames:
            ok, frame = capture.read()
            if not ok:
                log(f"{source}: end of stream after {frame_no} frames")
                break
            frame_no += 1
            if (frame_no - 1) % every:
                continue
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            result = inspector.inspect_loaded([inspector.load(rgb)], category, mode)[0]
            # A restart begins a new series: frame numbers are unique within one run.
            image_id = f"{started}-frame{frame_no:08d}"
            sink.write(journal.record([Entry.of(result, origin, image_id, category,
                                                inspector.bundle.identity, inspector.precision,
                                                threshold)]))
            inspected += 1
            log(f"frame {frame_no}: " + (f"score {result.image_score:.4f}" if result.ok
                                          else f"error: {result.error}"))
    finally:
        capture.release()
    return inspected
