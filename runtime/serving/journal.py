"""The results journal: every verdict of ``serve`` and ``watch`` in one SQLite file.

One row per inspected image (failures included, with their error): where it came from
(``origin``: ``http``, ``watch:<folder>`` or ``source:<camera>``), its id within that origin, the
time, category, mode, image score, verdict, the threshold used and the bundle identity. An image
id is unique within its origin, which is what lets the watcher process each file exactly once
across restarts. Commits are synchronous (a row that was committed survives a kill or power cut).

A journal that cannot be written for a while (locked by another process, a full or read-only
disk, an I/O error) stops nothing and loses nothing: :meth:`Journal.record` (``watch``) writes
all or none and raises :class:`JournalUnavailable` with the real reason in one line, so the
caller keeps its results and retries; :meth:`Journal.submit` (``serve``) never waits more than
``submit_timeout_s``: results wait in a bounded buffer, in order, written by a background retry
with back-off as soon as the journal takes them, and :meth:`Journal.health` says why meanwhile.

A JSON-lines copy (:class:`JsonlSink`) follows the journal: each line carries the journal row id,
so after a crash the lines the journal has but the file lacks are appended, and none twice.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..core.errors import ClipInspectError
from ..core.inspector import InspectionResult

BUSY_TIMEOUT_S = 5.0  # record/has/rows: how long a lock held by another process is waited for
SUBMIT_TIMEOUT_S = 0.1  # submit: the most it waits for a lock before leaving results pending
MAX_PENDING = 10_000  # submit: results kept in memory while the journal cannot be written
RETRY_S = (0.1, 5.0)  # the background retry of pending results: first and longest wait

# SQLite's primary result codes (the low byte of an extended code)
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY, SQLITE_IOERR = 5, 6, 8, 10
SQLITE_CORRUPT, SQLITE_FULL, SQLITE_CANTOPEN, SQLITE_NOTADB = 11, 13, 14, 26
# Python < 3.11 has no error code on sqlite3 errors: SQLite's messages for the same codes
CODES_BY_MESSAGE = (("locked", SQLITE_BUSY), ("disk is full", SQLITE_FULL),
                    ("readonly", SQLITE_READONLY), ("disk i/o error", SQLITE_IOERR),
                    ("malformed", SQLITE_CORRUPT), ("not a database", SQLITE_NOTADB),
                    ("unable to open", SQLITE_CANTOPEN))

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
# Operator and service events beside the results: promote, rollback, drift alarms, feedback.
EVENTS = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
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


class JournalUnavailable(ClipInspectError):
    """The journal cannot be written (or read) now; the message is the reason, one line with
    what to do. ``transient``: waiting may cure it (a lock, a full or read-only disk, an I/O
    error), unlike a damaged file."""

    def __init__(self, message: str, transient: bool = True):
        super().__init__(message)
        self.reason, self.transient = message, transient


def unavailable(error: sqlite3.Error, path: Path) -> JournalUnavailable:
    """The real reason behind an sqlite3 error on the journal ``path``."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is None:
        text = str(error).lower()
        code = next((c for words, c in CODES_BY_MESSAGE if words in text), 0)
    code &= 0xFF
    name, folder = str(path), str(path.parent)
    if code in (SQLITE_BUSY, SQLITE_LOCKED):
        return JournalUnavailable(
            f"the journal {name!r} is locked by another process ({error}): another clipinspect "
            "or a tool (sqlite3, a backup) holds its write lock; close it, or give each process "
            "its own --journal")
    if code == SQLITE_FULL:
        return JournalUnavailable(f"the journal {name!r} cannot be written: the disk is full "
                                  f"({error}); free space on {folder!r}")
    if code in (SQLITE_READONLY, SQLITE_CANTOPEN, SQLITE_IOERR) and read_only(path.parent):
        return JournalUnavailable(
            f"the journal {name!r} is on a read-only file system ({error}): remount {folder!r} "
            "writable, or give --journal a file on a writable disk")
    if code in (SQLITE_READONLY, SQLITE_CANTOPEN):
        return JournalUnavailable(
            f"the journal {name!r} cannot be opened for writing ({error}): make {folder!r} and "
            "the journal files writable by this user, or give another --journal")
    if code == SQLITE_IOERR:
        return JournalUnavailable(f"the journal {name!r} cannot be written: disk I/O error "
                                  f"({error}); check the disk holding {folder!r}")
    return JournalUnavailable(
        f"the journal {name!r} cannot be used ({error}): it is damaged or not a clipinspect "
        "journal. Move it away (keep it for inspection) and start again with a new one, or give "
        "another file with --journal; the JSON lines keep every result written so far",
        transient=False)


def read_only(folder: Path) -> bool:
    """Whether ``folder`` is on a file system mounted read-only."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # gone, or no statvfs on this platform
        return False


def log(message: str) -> None:
    print(f"clipinspect journal: {message}", file=sys.stderr, flush=True)


class Journal:
    """A results journal file; safe to share between threads of one process.

    ``busy_timeout_s``: how long :meth:`record`, :meth:`has` and :meth:`rows` wait for a lock
    another process holds; ``submit_timeout_s``: the most :meth:`submit` waits; ``max_pending``:
    results :meth:`submit` keeps while the journal cannot be written; ``retry_s``: first and
    longest wait of the background retry of those (doubling in between).
    """

    def __init__(self, path: str | os.PathLike, *, busy_timeout_s: float = BUSY_TIMEOUT_S,
                 submit_timeout_s: float = SUBMIT_TIMEOUT_S, max_pending: int = MAX_PENDING,
                 retry_s: tuple[float, float] = RETRY_S):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_s, self.submit_timeout_s = busy_timeout_s, submit_timeout_s
        self.max_pending, self.retry_s = max_pending, retry_s
        self._lock = threading.Lock()  # the connection
        self._pending_lock = threading.Lock()  # the pending buffer, its failure and the retrier
        self._pending: deque[tuple[Entry, float]] = deque()  # (entry, time submitted)
        self._failure = ""  # why the last write of pending results failed; "" once written
        self._retrier: threading.Thread | None = None
        self._closed = threading.Event()
        self._busy_ms = -1
        if read_only(self.path.parent):
            raise JournalUnavailable(
                f"the journal {str(self.path)!r} is on a read-only file system: remount "
                f"{str(self.path.parent)!r} writable, or give --journal a file on a writable disk")
        if not os.access(self.path.parent, os.W_OK) or (
                self.path.exists() and not os.access(self.path, os.W_OK)):
            raise JournalUnavailable(
                f"the journal {str(self.path)!r} is not writable by this user: make it and "
                f"{str(self.path.parent)!r} writable (SQLite writes files next to it), or give "
                "another --journal")
        try:
            self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, check_same_thread=False,
                                       isolation_level=None)
        except sqlite3.Error as e:
            raise unavailable(e, self.path) from None
        try:
            if self._db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            # Only a new journal needs a write here: an existing one opens while locked.
            if not self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                                    "AND name = 'results'").fetchone():
                self._db.execute(SCHEMA)
                self._db.execute(EVENTS)
            self._db.execute("SELECT count(*) FROM results").fetchone()
        except sqlite3.Error as e:
            self._db.close()
            raise unavailable(e, self.path) from None

    def record(self, entries: Iterable[Entry]) -> list[dict]:
        """Write entries in one transaction; returns them as rows (with id and time).
        Raises sqlite3.IntegrityError (and writes none) if an (origin, image_id) exists, and
        JournalUnavailable (writing none) if the journal cannot be written now."""
        now = time.time()
        items = [(e, now) for e in entries]
        with self._lock:
            return self._write(items, self.busy_timeout_s, strict=True)[0]

    def submit(self, entries: Iterable[Entry]) -> None:
        """Journal entries, time-stamped now, without waiting more than ``submit_timeout_s``:
        they join the pending results, written in order now if the journal takes them, else by
        a background retry. Never raises because the journal cannot be written for a while
        (:meth:`health` says why); raises JournalUnavailable when ``max_pending`` results are
        waiting already (the entries are then not kept)."""
        now = time.time()
        items = [(e, now) for e in entries]
        with self._pending_lock:
            if self._closed.is_set():
                raise JournalUnavailable(f"the journal {str(self.path)!r} is closed",
                                         transient=False)
            if len(self._pending) + len(items) > self.max_pending:
                raise JournalUnavailable(
                    f"{len(self._pending)} results are waiting to be journaled, the most kept "
                    f"(max_pending {self.max_pending}); "
                    f"{self._failure or 'the journal is busy'}")
            self._pending.extend(items)
        self._write_pending(self.submit_timeout_s)
        with self._pending_lock:
            if self._pending and self._retrier is None and not self._closed.is_set():
                self._retrier = threading.Thread(target=self._retry, name="journal-retry",
                                                 daemon=True)
                self._retrier.start()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Try to write the pending results now (waiting at most ``timeout_s``, default
        ``submit_timeout_s``); True when none is pending."""
        return self._write_pending(self.submit_timeout_s if timeout_s is None else timeout_s)

    def health(self) -> tuple[bool, str]:
        """(True, "") or, while pending results cannot be written, (False, the reason)."""
        with self._pending_lock:
            if self._pending and self._failure:
                return False, self._failure
        return True, ""

    @property
    def pending(self) -> int:
        """Results submitted and not yet written."""
        with self._pending_lock:
            return len(self._pending)

    def event(self, kind: str, detail: dict) -> bool:
        """Journal one event (``kind``: promote, rollback, drift, feedback, ...; ``detail`` as
        JSON) at once; False, saying why on stderr, when the journal cannot take it now (an
        event is never worth blocking inspection for)."""
        if not self._lock.acquire(timeout=self.submit_timeout_s):
            log(f"event {kind!r} not journaled: the journal is busy")
            return False
        try:
            self._set_busy_timeout(self.submit_timeout_s)
            with self._db:
                self._db.execute(EVENTS)  # a journal from before events were kept
                self._db.execute("INSERT INTO events (time, kind, detail) VALUES (?, ?, ?)",
                                 (time.time(), kind, json.dumps(detail)))
            return True
        except sqlite3.Error as e:
            log(f"event {kind!r} not journaled: {unavailable(e, self.path).reason}")
            return False
        finally:
            self._lock.release()

    def events(self, kind: str | None = None) -> list[dict]:
        """Journaled events, oldest first."""
        query, args = "SELECT id, time, kind, detail FROM events", ()
        if kind is not None:
            query, args = query + " WHERE kind = ?", (kind,)
        with self._lock:
            if not self._read("SELECT 1 FROM sqlite_master WHERE name = 'events'", ()):
                return []
            rows = self._read(query + " ORDER BY id", args)
        return [{"id": i, "time": t, "kind": k, "detail": json.loads(d)} for i, t, k, d in rows]

    def has(self, origin: str, image_id: str) -> bool:
        with self._lock:
            return self._read("SELECT 1 FROM results WHERE origin = ? AND image_id = ?",
                              (origin, image_id)) != []

    def rows(self, origin: str | None = None, after_id: int = 0) -> list[dict]:
        """Rows (of one origin, or all) with id > after_id, in id order."""
        query = f"SELECT {', '.join(COLUMNS)} FROM results WHERE id > ?"
        args: tuple = (after_id,)
        if origin is not None:
            query += " AND origin = ?"
            args += (origin,)
        with self._lock:
            return [_row(r) for r in self._read(query + " ORDER BY id", args)]

    def close(self) -> None:
        """Stop the retry, write what is pending (waiting up to ``busy_timeout_s``), close; says
        on stderr how many results could not be journaled, and why, if any."""
        with self._pending_lock:
            self._closed.set()
            retrier = self._retrier
        if retrier is not None:
            retrier.join()
        if self.pending and not self._write_pending(self.busy_timeout_s):
            log(f"{self.pending} result(s) could not be journaled before closing: "
                f"{self._failure}")
        with self._lock:
            self._db.close()

    def _read(self, query: str, args: tuple) -> list[tuple]:
        """Caller holds the lock."""
        try:
            self._set_busy_timeout(self.busy_timeout_s)
            return self._db.execute(query, args).fetchall()
        except sqlite3.Error as e:
            raise unavailable(e, self.path) from None

    def _write(self, items: list[tuple[Entry, float]], timeout_s: float,
               strict: bool) -> tuple[list[dict], list[Entry]]:
        """Insert in one transaction (caller holds the lock) -> (rows written, entries whose
        (origin, image_id) was there already: an IntegrityError instead when ``strict``)."""
        insert = (f"INSERT INTO results ({', '.join(COLUMNS[1:])}) "
                  f"VALUES ({', '.join('?' * (len(COLUMNS) - 1))})")
        if not strict:
            insert += " ON CONFLICT (origin, image_id) DO NOTHING"
        rows, duplicates = [], []
        try:
            self._set_busy_timeout(timeout_s)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for e, written in items:
                    values = (e.origin, e.image_id, written, e.category, e.mode, e.image_score,
                              None if e.is_anomalous is None else int(e.is_anomalous),
                              e.threshold, e.bundle, e.precision, e.error)
                    cur = self._db.execute(insert, values)
                    if cur.rowcount == 0:
                        duplicates.append(e)
                    else:
                        rows.append(_row((cur.lastrowid, *values)))
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as e:
            raise unavailable(e, self.path) from None
        return rows, duplicates

    def _rollback(self) -> None:
        # After some errors (a full disk, an I/O error) SQLite has rolled back already; a
        # ROLLBACK then fails ("no transaction is active") and would hide the real error.
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the error that made the transaction fail is the one raised

    def _set_busy_timeout(self, timeout_s: float) -> None:
        ms = max(0, int(timeout_s * 1000))
        if ms != self._busy_ms:
            self._db.execute(f"PRAGMA busy_timeout = {ms}")
            self._busy_ms = ms

    def _write_pending(self, timeout_s: float) -> bool:
        """Write every pending result in one transaction; True when none is left pending."""
        if not self._lock.acquire(timeout=timeout_s):
            return False
        try:
            with self._pending_lock:
                items = list(self._pending)
            if not items:
                return True
            try:
                _, duplicates = self._write(items, timeout_s, strict=False)
            except JournalUnavailable as e:
                with self._pending_lock:
                    if e.reason != self._failure:
                        log(f"{e.reason}; {len(self._pending)} result(s) kept pending and "
                            f"retried (at most every {self.retry_s[1]:g} s)")
                    self._failure = e.reason
                return False
            with self._pending_lock:
                for _ in items:  # only the lock holder removes: these are the oldest
                    self._pending.popleft()
                recovered, self._failure = self._failure, ""
                left = len(self._pending)
        finally:
            self._lock.release()
        if recovered:
            log(f"{str(self.path)!r} is written again: {len(items)} pending result(s) written")
        for e in duplicates:  # written by an earlier try whose commit was reported as failed
            log(f"{e.origin} {e.image_id!r} was journaled already; not written twice")
        return left == 0

    def _retry(self) -> None:
        """Background retry of pending results, doubling the wait up to ``retry_s[1]``."""
        delay = self.retry_s[0]
        while not self._closed.wait(delay):
            self._write_pending(min(self.busy_timeout_s, 1.0))
            with self._pending_lock:
                if not self._pending:
                    self._retrier = None
                    return
            delay = min(2 * delay, self.retry_s[1])


def _row(values: tuple) -> dict:
    row = dict(zip(COLUMNS, values))
    if row["is_anomalous"] is not None:
        row["is_anomalous"] = bool(row["is_anomalous"])
    return row


class JsonlSink:
    """JSON lines of one origin's journal rows, brought up to date with the journal on open.

    Lines that cannot be written (a full disk) are kept, in order, and written first at the
    next :meth:`write`; a line cut off by the failure is removed before."""

    def __init__(self, path: str | os.PathLike, journal: Journal, origin: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        last = _last_id(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           0o666)
        self._size = os.fstat(self._fd).st_size  # up to the last line written whole
        self._backlog: list[dict] = []
        self._failure = ""
        self.write(journal.rows(origin, after_id=last))

    @property
    def pending(self) -> int:
        """Rows kept because the file could not be written."""
        return len(self._backlog)

    def write(self, rows: list[dict]) -> bool:
        """Append the rows (after those kept); False, keeping them, if the file cannot be
        written now."""
        self._backlog.extend(rows)
        if not self._backlog:
            return True
        data = "".join(json.dumps(row) + "\n" for row in self._backlog).encode()
        try:
            if os.fstat(self._fd).st_size != self._size:
                os.ftruncate(self._fd, self._size)
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError as e:
            reason = f"{str(self.path)!r} cannot be written ({e.strerror or e})"
            if reason != self._failure:
                log(f"{reason}; {len(self._backlog)} line(s) kept and written when it can be "
                    "(they are in the journal)")
            self._failure = reason
            return False
        self._size += len(data)
        self._backlog.clear()
        if self._failure:
            log(f"{str(self.path)!r} is written again")
            self._failure = ""
        return True

    def close(self) -> None:
        if self._backlog:
            log(f"{len(self._backlog)} line(s) not yet in {str(self.path)!r}; they are in the "
                "journal and appended at the next start")
        os.close(self._fd)


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
