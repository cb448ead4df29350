"""The results journal: every verdict of ``serve`` and ``watch`` in one SQLite file.

One row per inspected image (failures included, with their error): where it came from
(``origin``: ``http``, ``watch:<folder>`` or ``source:<camera>``), its id within that origin, the
time, category, mode, image score, verdict, the threshold used and the bundle identity. An image
id is unique within its origin, which is what lets the watcher process each file exactly once
across restarts. Commits are synchronous (a row that was committed survives a kill or power cut).

A JSON-lines copy (:class:`JsonlSink`) follows the journal: each line carries the journal row id,
so after a crash the lines the journal has but the file lacks are appended, and none twice.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..core.errors import ClipInspectError
from ..core.inspector import InspectionResult

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY,
    origin TEXT NOT NULL,
    image_id TEXT NOT NULL,
    time REAL NOT NULL,
    category TEXT NOT NULL,
    mode TEXT,
    image_score REAL,
    is_anomalous INTEGER,
    threshold REAL,
    bundle TEXT NOT NULL,
    precision TEXT NOT NULL,
    error TEXT,
    UNIQUE (origin, image_id)
)
"""
COLUMNS = ("id", "origin", "image_id", "time", "category", "mode", "image_score", "is_anomalous",
           "threshold", "bundle", "precision", "error")


@dataclass
class Entry:
    """One journal row before it is written (``id`` and ``time`` are set by :meth:`record`)."""

    origin: str
    image_id: str
    category: str
    bundle: str
    precision: str
    mode: str | None = None
    image_score: float | None = None
    is_anomalous: bool | None = None
    threshold: float | None = None
    error: str | None = None

    @classmethod
    def of(cls, result: InspectionResult, origin: str, image_id: str, category: str, *,
           bundle: str, precision: str, threshold: float | None) -> "Entry":
        return cls(origin, image_id, category, bundle, precision, result.mode, result.image_score,
                   result.is_anomalous, threshold if result.ok else None, result.error)


class Journal:
    """A results journal file; safe to share between threads of one process."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(SCHEMA)
            self._db.execute("SELECT count(*) FROM results").fetchone()
        except sqlite3.DatabaseError as e:
            raise ClipInspectError(
                f"the journal {str(self.path)!r} cannot be used ({e}): it is damaged or not a "
                "clipinspect journal. Move it away (keep it for inspection) and start again with "
                "a new one, or give another file with --journal; the JSON lines keep every "
                "result written so far") from None

    def record(self, entries: Iterable[Entry]) -> list[dict]:
        """Write entries in one transaction; returns them as rows (with id and time).
        Raises sqlite3.IntegrityError (and writes none) if an (origin, image_id) exists."""
        now = time.time()
        rows = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for e in entries:
                    values = (e.origin, e.image_id, now, e.category, e.mode, e.image_score,
                              None if e.is_anomalous is None else int(e.is_anomalous),
                              e.threshold, e.bundle, e.precision, e.error)
                    cur = self._db.execute(
                        f"INSERT INTO results ({', '.join(COLUMNS[1:])}) "
                        f"VALUES ({', '.join('?' * len(values))})", values)
                    rows.append(_row((cur.lastrowid, *values)))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return rows

    def has(self, origin: str, image_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM results WHERE origin = ? AND image_id = ?",
                                    (origin, image_id)).fetchone() is not None

    def rows(self, origin: str | None = None, after_id: int = 0) -> list[dict]:
        """Rows (of one origin, or all) with id > after_id, in id order."""
        query = f"SELECT {', '.join(COLUMNS)} FROM results WHERE id > ?"
        args: tuple = (after_id,)
        if origin is not None:
            query += " AND origin = ?"
            args += (origin,)
        with self._lock:
            return [_row(r) for r in self._db.execute(query + " ORDER BY id", args)]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _row(values: tuple) -> dict:
    row = dict(zip(COLUMNS, values))
    if row["is_anomalous"] is not None:
        row["is_anomalous"] = bool(row["is_anomalous"])
    return row


class JsonlSink:
    """JSON lines of one origin's journal rows, brought up to date with the journal on open."""

    def __init__(self, path: str | os.PathLike, journal: Journal, origin: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        last = _last_id(self.path)
        self._file = open(self.path, "a")
        self.write(journal.rows(origin, after_id=last))

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _last_id(path: Path) -> int:
    """Journal id of the last complete line; a partial last line (a crash while writing) is cut
    off first, since its row is written again from the journal."""
    if not path.exists():
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        tail = b""
        pos = size
        # Read backwards until the tail holds the whole last complete line.
        while pos > 0:
            end = tail.rfind(b"\n")
            if end >= 0 and tail.rfind(b"\n", 0, end) >= 0:
                break
            step = min(pos, 1 << 16)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
        end = tail.rfind(b"\n") + 1
        if pos + end < size:
            f.truncate(pos + end)
        lines = tail[:end].splitlines()
        if not lines:
            return 0
        try:
            return int(json.loads(lines[-1])["id"])
        except (ValueError, KeyError, TypeError) as e:
            raise ClipInspectError(f"{str(path)!r} does not end with a journal line ({e}); move it "
                             "away and start again: its rows are all in the journal") from None
