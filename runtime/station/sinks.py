"""Where a station's verdicts go. Each sink has its own thread and queue, so a slow or failing
sink never delays inspection or the other sinks: the station only hands it the record.

A sink that fails keeps the record at the head of its queue and tries again, waiting longer
each time (0.1 s doubling to 5 s); records keep their part order. An in-memory backlog is
bounded (``max_backlog``): beyond it the oldest record is dropped and counted, said in the log
and in ``/metrics``. The MQTT sink (mqtt.py) keeps its backlog on disk instead.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..serving.journal import Entry, Journal, JournalUnavailable

RETRY_S = (0.1, 5.0)
MAX_BACKLOG = 100_000


def log(message: str) -> None:
    print(f"clipinspect station: {message}", file=sys.stderr, flush=True)


@dataclass
class Record:
    """One part's verdict as every sink receives it. ``payload`` is the JSON object published
    (docs/station.md has its schema); ``t0`` the monotonic time its latency clock started."""

    seq: int
    payload: dict[str, Any]
    t0: float
    result: Any = None  # the InspectionResult (the live page draws it)
    thresholds: dict = field(default_factory=dict)
    frame: Any = None  # the sources.Frame (the archive keeps its pixels)


Published = Callable[["Sink", Record, float], None]  # (the sink, record, monotonic time)


class Sink:
    """A thread that publishes records in order. Subclasses define :meth:`publish` (raise to
    retry) and may define :meth:`open` and :meth:`close`. A sink that confirms delivery later
    (MQTT: the broker's acknowledgement) sets ``confirms_itself`` and calls ``published``."""

    name = "sink"
    confirms_itself = False
    line = True  # a sink the line reads: its publish counts in a part's trigger-to-publish time

    def __init__(self, *, max_backlog: int = MAX_BACKLOG, retry_s: tuple[float, float] = RETRY_S):
        self.max_backlog, self.retry_s = max_backlog, retry_s
        self._queue: deque[Record] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._abandoned = False  # stop() gave up waiting: the thread ends at its next wait
        self._thread: threading.Thread | None = None
        self.published: Published = lambda sink, record, at: None
        self.up, self.reason = True, ""
        self.count, self.failures, self.dropped = 0, 0, 0

    # ------------------------------------------------------------ station side
    def start(self, published: Published) -> None:
        self.published = published
        self.open()
        self._thread = threading.Thread(target=self._run, name=f"sink-{self.name}", daemon=True)
        self._thread.start()

    def put(self, record: Record) -> None:
        """Queue a record; never blocks."""
        with self._cond:
            if len(self._queue) >= self.max_backlog:
                self._queue.popleft()
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log(f"sink {self.name}: backlog over {self.max_backlog}: {self.dropped} "
                        "oldest record(s) dropped")
            self._queue.append(record)
            self._cond.notify()

    @property
    def backlog(self) -> int:
        return len(self._queue)

    def stop(self, timeout_s: float) -> int:
        """Publish what is queued for at most ``timeout_s``, then stop; -> records left."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._cond:
            self._abandoned = True
            self._cond.notify()
        left = self.backlog
        self.close()
        return left

    def health(self) -> dict:
        return {"up": self.up, "reason": self.reason, "backlog": self.backlog,
                "published": self.count, "failures": self.failures, "dropped": self.dropped}

    # ------------------------------------------------------------ sink side
    def _run(self) -> None:
        wait = 0.0
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue or self._abandoned:
                    return
                record = self._queue[0]
            try:
                self.publish(record)
            except Exception as e:  # kept at the head; tried again after a wait
                self.failures += 1
                reason = f"{type(e).__name__}: {e}"
                if self.up or reason != self.reason:
                    log(f"sink {self.name}: cannot publish ({reason}); {self.backlog} record(s) "
                        "kept, trying again")
                self.up, self.reason = False, reason
                wait = min(max(2 * wait, self.retry_s[0]), self.retry_s[1])
                with self._cond:
                    if self._abandoned:
                        return
                    self._cond.wait(wait)
                continue
            wait = 0.0
            if not self.up and not self.confirms_itself:  # those say when they are up
                log(f"sink {self.name}: publishing again")
                self.up, self.reason = True, ""
            self.count += 1
            with self._cond:
                if self._queue and self._queue[0] is record:
                    self._queue.popleft()
            if not self.confirms_itself:
                self.published(self, record, time.monotonic())

    def open(self) -> None:
        pass

    def publish(self, record: Record) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class JsonlSink(Sink):
    """One JSON object per line, flushed and synced per record."""

    name = "jsonl"

    def __init__(self, path: str | os.PathLike, **kw):
        super().__init__(**kw)
        self.path = Path(path)
        self._file = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def publish(self, record: Record) -> None:
        self._file.write(json.dumps(record.payload, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class JournalSink(Sink):
    """The results journal of serve and watch (SQLite), origin ``station:NAME``."""

    name = "journal"

    def __init__(self, path: str | os.PathLike, station: str, **kw):
        super().__init__(**kw)
        self.path, self.origin = Path(path), f"station:{station}"
        self.journal: Journal | None = None

    def open(self) -> None:
        self.journal = Journal(self.path)

    def publish(self, record: Record) -> None:
        p = record.payload
        entry = Entry(self.origin, p["part_id"], p["category"], p["bundle"], p["precision"],
                      mode=p["mode"], image_score=p["image_score"],
                      is_anomalous={"NG": True, "OK": False}.get(p["verdict"]),
                      threshold=p["threshold"], error=p["reason"] or None)
        try:
            self.journal.record([entry])
        except JournalUnavailable as e:
            raise RuntimeError(e.reason) from None

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()


class SlowSink(Sink):
    """Waits ``delay_s`` before each publish and keeps the records: a slow PLC link, for the
    tests and for trying a station's isolation."""

    name = "slow"

    def __init__(self, delay_s: float, **kw):
        super().__init__(**kw)
        self.delay_s, self.records = delay_s, []

    def publish(self, record: Record) -> None:
        time.sleep(self.delay_s)
        self.records.append(record.payload)


class PageSink(Sink):
    """The live page's feed (its thumbnails are rendered here, off the inspection thread)."""

    name = "page"
    line = False

    def __init__(self, feed, **kw):
        super().__init__(max_backlog=64, **kw)  # the page shows the latest few
        self.feed = feed

    def publish(self, record: Record) -> None:
        if record.result is not None and record.result.ok:
            self.feed.record(record.payload["category"], record.result, record.thresholds,
                             record.payload["latency_ms"]["decision"] / 1e3,
                             verdict=record.payload["verdict"])


class ArchiveSink(Sink):
    """Keeps the frames of parts with the chosen verdicts (default NG and UNKNOWN) in a folder,
    as PNG (lossless) named by part id, or as the file they came in."""

    name = "archive"
    line = False

    def __init__(self, folder: str | os.PathLike, verdicts, **kw):
        super().__init__(**kw)
        self.folder, self.verdicts = Path(folder), set(verdicts)

    def open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def publish(self, record: Record) -> None:
        frame = record.frame
        if frame is None or record.payload["verdict"] not in self.verdicts:
            return
        from PIL import Image

        from ..core.images import EncodedImage
        stem = self.folder / record.payload["part_id"]
        if isinstance(frame.image, EncodedImage):
            target = stem.with_suffix(Path(frame.name).suffix or ".img")
            partial = target.with_name(f".{target.name}.partial")
            partial.write_bytes(frame.image.data)
        else:
            target = stem.with_suffix(".png")
            partial = target.with_name(f".{target.name}.partial")
            Image.fromarray(frame.image).save(partial, format="PNG")
        os.replace(partial, target)
