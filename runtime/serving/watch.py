"""``clipinspect watch``: a hot folder (or a camera / stream) inspected as images arrive.

Hot folder: the image files directly in the input folder are inspected once each, in batches,
when they have stopped changing for ``settle`` seconds (camera software may still be writing a
file when it is first seen; a time stamp in the future counts from when the watcher first saw
it). An image is known by its name and a digest of its bytes; its result is committed to the
journal first, then appended to the JSON lines, then the file is moved to the done folder (or
left in place with ``--keep``). A kill at any point therefore loses nothing and repeats
nothing: on restart, files the journal already has are only moved, and JSON lines the journal
has but the file lacks are appended. While the journal cannot be written (locked by another
process, a full or read-only disk), the results of the last batch are kept and their files left
in place; the watcher says why and retries, waiting longer each time (up to ``retry_max_s``).

Untrusted folder contents: a file is opened without following links and without blocking, and
only a regular file of at most ``max_file_bytes`` is read (checked on the open descriptor, so a
file swapped for a FIFO, a link or a device between listing and reading is caught). A file that
cannot be used (unreadable, not regular, too large, a name that cannot be stored) is moved to the
quarantine folder with its reason in the journal, and the watcher goes on. A decode that fails as
corrupt or truncated, or an empty file, is retried while the file keeps changing and given its
verdict only after the file has stayed unchanged for ``incomplete_s`` (a writer may pause longer
than ``settle``, or create the file before writing it).
Names are shown with control characters and undecodable bytes escaped (one log line per file).

Camera / stream (``--source``): frames from OpenCV (a device index, an RTSP/HTTP URL or a video
file), every n-th inspected, results to the journal and the JSON lines (frames are not kept).
While the journal cannot be written, the frame's result is kept and tried again as in the hot
folder (the same waits, the same log lines). No frame is read meanwhile: a video file waits; a
live camera's frames of that time wait in OpenCV's buffer as far as it holds them, and the rest
are not inspected.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sqlite3
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core.errors import ClipInspectError, UsageError
from ..core.images import CORRUPT, IMAGE_SUFFIXES, EncodedImage
from ..core.inspector import Inspector, InspectionResult
from .journal import Entry, Journal, JournalUnavailable, JsonlSink

MAX_FILE_BYTES = 256 << 20
RETRY_MAX_S = 10.0  # longest wait between tries while the journal cannot be written


@dataclass
class Pending:
    path: Path
    image_id: str
    data: bytes
    key: tuple[int, int]  # (size, mtime_ns) when read


class Unusable(Exception):
    """A file the watcher cannot inspect; the message is the reason journaled."""


def log(message: str) -> None:
    print(f"clipinspect watch: {message}", file=sys.stderr, flush=True)


def shown(name: str) -> str:
    """A file name as text that is safe in a log line and a journal: bytes that are not UTF-8
    become \\xNN, control characters (newlines included) their escapes."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def read_image_file(path: Path, max_bytes: int) -> tuple[bytes, tuple[int, int]]:
    """The bytes of a regular file of at most ``max_bytes`` and its (size, mtime_ns); raises
    Unusable otherwise, FileNotFoundError if it is gone. Never follows a link or blocks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:  # ELOOP: a symbolic link; EACCES: unreadable
        raise Unusable(f"cannot be opened: {e.strerror or e}") from None
    try:  # checked before any buffered reader sees it (a directory raises IsADirectoryError)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Unusable("is not a regular file")
        if st.st_size > max_bytes:
            raise Unusable(f"is {st.st_size} bytes, over the limit of {max_bytes}")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise Unusable(f"cannot be read: {e.strerror or e}") from None
    if len(data) > max_bytes:  # grew while being read
        raise Unusable(f"is over the limit of {max_bytes} bytes")
    return data, (st.st_size, st.st_mtime_ns)


def move(path: Path, folder: Path) -> Path:
    """Move a file into ``folder`` under a free name; copy and unlink across file systems."""
    target = folder / path.name
    n = 1
    while os.path.lexists(target):  # an earlier file of the same name: keep both
        target = folder / f"{path.stem}.{n}{path.suffix}"
        n += 1
    try:
        os.replace(path, target)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        partial = folder / f".{target.name}.partial"
        shutil.copy2(path, partial, follow_symlinks=False)
        os.replace(partial, target)  # appears complete or not at all
        os.unlink(path)
    return target


class Backoff:
    """The waits between tries while the journal cannot be written: ``first_s``, doubled at
    each failure up to ``max_s``; each failure is logged with its reason and what is kept, and
    the first success after them too."""

    def __init__(self, first_s: float, max_s: float):
        self.first_s, self.max_s, self.wait = first_s, max_s, 0.0

    def failed(self, error: JournalUnavailable, kept: str) -> None:
        """Wait before the next try; raises ``error`` if waiting cannot cure it."""
        if not error.transient:
            raise error
        self.wait = min(max(2 * self.wait, self.first_s), self.max_s)
        log(f"{error.reason}; {kept}; trying again in {self.wait:g} s")
        time.sleep(self.wait)

    def succeeded(self) -> None:
        if self.wait:
            log("the journal is written again")
            self.wait = 0.0


class FolderWatcher:
    def __init__(self, inspector: Inspector, input_dir: str | os.PathLike, category: str,
                 journal: Journal, sink: JsonlSink, done_dir: str | os.PathLike | None, *,
                 mode: str = "auto", batch_size: int = 8, settle: float = 1.0,
                 quarantine_dir: str | os.PathLike | None = None,
                 max_file_bytes: int = MAX_FILE_BYTES, incomplete_s: float = 30.0,
                 retry_max_s: float = RETRY_MAX_S):
        self.inspector, self.category, self.mode = inspector, category, mode
        self.input = Path(input_dir)
        if not self.input.is_dir():
            raise UsageError(f"--input {str(self.input)!r} is not a folder")
        self.done = Path(done_dir) if done_dir is not None else None
        if self.done is not None:
            self.done.mkdir(parents=True, exist_ok=True)
        self.quarantine = Path(quarantine_dir or self.input / "quarantine")  # made when needed
        self.journal, self.sink = journal, sink
        self.batch_size, self.settle = batch_size, settle
        self.max_file_bytes, self.incomplete_s = max_file_bytes, incomplete_s
        self.retry_max_s = retry_max_s
        self.origin = f"watch:{self.input.resolve()}"
        inspector.stream()  # line mode: a MuSc pool learns from the parts judged normal
        self.mode_used = inspector.check(category, mode)
        self.threshold = inspector.thresholds(category, self.mode_used).get("image")
        self._last_stat: dict[str, tuple[int, int]] = {}
        # name -> ((size, mtime), monotonic time it was first seen so)
        self._seen_since: dict[str, tuple[tuple[int, int], float]] = {}
        # inspected, with their journal entries, not yet journaled (the journal was unavailable)
        self._waiting: list[tuple[Pending, InspectionResult, Entry]] = []
        # (name, size, mtime) of files already journaled and kept in place (--keep), or that
        # could not be moved to quarantine: not looked at again while unchanged
        self._kept: set[tuple[str, int, int]] = set()
        # name -> ((size, mtime) that failed as corrupt or truncated, first seen failing)
        self._incomplete: dict[str, tuple[tuple[int, int], float]] = {}

    def ready_files(self) -> list[Path]:
        """Image files unchanged since the previous poll and for at least ``settle`` seconds:
        by their time stamp, or as seen by this watcher (a time stamp in the future)."""
        now, seen_now = time.time(), time.monotonic()
        ready, seen, seen_since = [], {}, {}
        for entry in sorted(os.scandir(self.input), key=lambda e: e.name):
            if (entry.name.startswith(".") or not entry.is_file(follow_symlinks=False)
                    or Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            key = (st.st_size, st.st_mtime_ns)
            seen[entry.name] = key
            first = self._seen_since.get(entry.name)
            seen_since[entry.name] = first if first and first[0] == key else (key, seen_now)
            if (entry.name, *key) in self._kept:
                continue
            failed, since = self._incomplete.get(entry.name, (None, 0.0))
            if failed == key and now - since < self.incomplete_s:
                continue  # failed to decode as it is: wait for a change or for the verdict
            if self._last_stat.get(entry.name) == key and (
                    now - st.st_mtime >= self.settle
                    or seen_now - seen_since[entry.name][1] >= self.settle):
                ready.append(Path(entry.path))
        self._last_stat, self._seen_since = seen, seen_since
        self._incomplete = {k: v for k, v in self._incomplete.items() if k in seen}
        return ready

    def poll(self) -> int:
        """Process the files that are ready; returns how many were handled. Raises
        JournalUnavailable while the journal cannot be written: the results not journaled are
        kept (written first at the next poll) and their files left in place."""
        handled = self._journal_waiting()
        if self.sink.pending:
            self.sink.write([])
        pending: list[Pending] = []
        for path in self.ready_files():
            try:
                data, key = read_image_file(path, self.max_file_bytes)
            except FileNotFoundError:  # taken away meanwhile
                continue
            except Unusable as e:
                handled += self._quarantine(path, str(e))
                continue
            image_id = f"{shown(path.name)}@{hashlib.sha256(data).hexdigest()[:16]}"
            if self.journal.has(self.origin, image_id):
                self._finish(path)  # inspected before a crash or restart: only move it
                handled += 1
                continue
            pending.append(Pending(path, image_id, data, key))
            if len(pending) == self.batch_size:
                handled += self._inspect(pending)
                pending = []
        if pending:
            handled += self._inspect(pending)
        return handled

    def _inspect(self, batch: list[Pending]) -> int:
        if self.inspector.refresh():  # operator feedback since the last batch
            self.threshold = self.inspector.thresholds(self.category, self.mode_used).get("image")
        loaded = [self.inspector.load(EncodedImage(p.data, shown(p.path.name))) for p in batch]
        results = self.inspector.inspect_loaded(loaded, self.category, self.mode)
        self._waiting = [(p, r, Entry.of(r, self.origin, p.image_id, self.category,
                                          bundle=self.inspector.bundle.identity,
                                          precision=self.inspector.precision,
                                          threshold=self.threshold))
                         for p, r in zip(batch, results) if not self._still_incomplete(p, r)]
        return self._journal_waiting()

    def _journal_waiting(self) -> int:
        """Journal the results inspected and not yet journaled, then move their files."""
        if not self._waiting:
            return 0
        self._record([e for _, _, e in self._waiting])  # raises, keeping them, if it cannot
        done, self._waiting = self._waiting, []
        for p, r, _ in done:
            verdict = ("error: " + r.error if not r.ok else f"score {r.image_score:.4f}" + (
                "" if r.is_anomalous is None else
                " ANOMALOUS" if r.is_anomalous else " ok"))
            log(f"{shown(p.path.name)}: {verdict}")
            self._incomplete.pop(p.path.name, None)
            self._finish(p.path)
        return len(done)

    def _still_incomplete(self, p: Pending, r: InspectionResult) -> bool:
        """A corrupt or truncated decode, or an empty file, is only final once the file has
        stayed the same for ``incomplete_s``; until then it is tried again at each poll that
        finds it settled."""
        if r.ok or (p.data and CORRUPT not in (r.error or "")):
            return False
        key, since = self._incomplete.get(p.path.name, (None, 0.0))
        if key != p.key:
            self._incomplete[p.path.name] = (p.key, time.time())
            return self.incomplete_s > 0
        return time.time() - since < self.incomplete_s

    def _record(self, entries: list[Entry]) -> None:
        try:
            rows = self.journal.record(entries)
        except sqlite3.IntegrityError:
            # Another watcher on the same folder and journal got there first; one at a time.
            raise ClipInspectError(f"another 'clipinspect watch' is journaling {self.input} "
                                   f"into {self.journal.path}; run only one per folder") from None
        self.sink.write(rows)

    def _quarantine(self, path: Path, reason: str) -> int:
        """Journal why a file cannot be inspected and move it aside; never raises for it."""
        name = shown(path.name)
        image_id = f"{name}@quarantined-{time.time_ns()}"
        self._record([Entry(self.origin, image_id, self.category, self.inspector.bundle.identity,
                            self.inspector.precision, error=f"{name} {reason}")])
        try:
            self.quarantine.mkdir(parents=True, exist_ok=True)
            target = move(path, self.quarantine)
            log(f"{name}: {reason}; moved to {shown(str(target))}")
        except FileNotFoundError:
            pass
        except OSError as e:  # cannot even be moved: leave it, and skip it while unchanged
            log(f"{name}: {reason}; cannot be moved to quarantine ({e.strerror or e})")
            key = self._last_stat.get(path.name)
            if key is not None:
                self._kept.add((path.name, *key))
        return 1

    def _finish(self, path: Path) -> None:
        try:
            if self.done is not None:
                move(path, self.done)
                return
            st = path.stat(follow_symlinks=False)
        except FileNotFoundError:
            return
        except OSError as e:  # journaled already; leave the file rather than stop the line
            log(f"{shown(path.name)}: cannot be moved to {shown(str(self.done))} "
                f"({e.strerror or e}); left in place")
            st = path.stat(follow_symlinks=False)
        self._kept.add((path.name, st.st_size, st.st_mtime_ns))

    def run(self, interval: float = 0.5, once: bool = False,
            stop: Callable[[], bool] = lambda: False) -> None:
        """Poll until interrupted; with ``once``, until nothing is left or changing. While the
        journal cannot be written, says why and tries again after ``interval``, doubling the
        wait up to ``retry_max_s``."""
        backoff = Backoff(interval, self.retry_max_s)
        try:
            while not stop():
                try:
                    handled = self.poll()
                except JournalUnavailable as e:
                    backoff.failed(e, f"{len(self._waiting)} result(s) kept, their files left "
                                   "in place")
                    continue
                backoff.succeeded()
                if once and not handled and not self._changing():
                    return
                if not handled:
                    time.sleep(interval)
        finally:
            self.inspector.close_stream()

    def _changing(self) -> bool:
        """Results or JSON lines not yet written, or image files present that are not finished
        (still being written or settling)."""
        return bool(self._waiting or self.sink.pending) or any(
            (name, *key) not in self._kept for name, key in self._last_stat.items())


def opencv():
    try:
        import cv2
    except ImportError:
        raise UsageError("--source needs OpenCV, which is not installed: "
                         "pip install 'clipinspect[camera]' (opencv-python-headless)") from None
    return cv2


def journal_entry(journal: Journal, entry: Entry, backoff: Backoff) -> list[dict]:
    """Record ``entry``, trying again while the journal cannot be written; -> its rows."""
    while True:
        try:
            rows = journal.record([entry])
        except JournalUnavailable as e:
            backoff.failed(e, f"the result of {entry.image_id} kept, no frame read meanwhile")
            continue
        backoff.succeeded()
        return rows


def watch_source(inspector: Inspector, source: str, category: str, journal: Journal,
                 sink: JsonlSink, *, mode: str = "auto", every: int = 1,
                 max_frames: int | None = None, retry_first_s: float = 0.5,
                 retry_max_s: float = RETRY_MAX_S) -> int:
    """Inspect frames of a camera, stream or video file; returns the number inspected. While
    the journal cannot be written, the frame's result waits (:class:`Backoff`: ``retry_first_s``
    doubling up to ``retry_max_s``) and the next frame is read once it is journaled."""
    cv2 = opencv()
    capture = cv2.VideoCapture(int(source) if source.isdigit() else source)
    if not capture.isOpened():
        raise UsageError(f"--source {source!r} cannot be opened by OpenCV: check the device "
                         "index, the URL (and its credentials) or the file path")
    origin = f"source:{source}"
    inspector.stream()  # line mode: a MuSc pool learns from the parts judged normal
    mode_used = inspector.check(category, mode)
    threshold = inspector.thresholds(category, mode_used).get("image")
    started = time.strftime("%Y%m%dT%H%M%S")
    backoff = Backoff(retry_first_s, retry_max_s)
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
            if inspector.refresh():  # operator feedback since the last frame
                threshold = inspector.thresholds(category, mode_used).get("image")
            result = inspector.inspect_loaded([inspector.load(rgb)], category, mode)[0]
            # A restart begins a new series: frame numbers are unique within one run.
            image_id = f"{started}-frame{frame_no:08d}"
            sink.write(journal_entry(journal, Entry.of(result, origin, image_id, category,
                                                       bundle=inspector.bundle.identity,
                                                       precision=inspector.precision,
                                                       threshold=threshold), backoff))
            inspected += 1
            log(f"frame {frame_no}: " + (f"score {result.image_score:.4f}" if result.ok
                                          else f"error: {result.error}"))
    finally:
        capture.release()
        inspector.close_stream()
    return inspected
