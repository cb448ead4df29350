"""The results journal when its disk or its lock is not available: nothing is lost, the real
reason is what is reported, and nobody waits on it for long (``serve``'s submit, ``watch``).

A full disk is simulated two ways: a real one (a small tmpfs, needs root; skipped otherwise) and
SQLite's own page limit (``PRAGMA max_page_count``, which gives the same SQLITE_FULL error, runs
everywhere). A read-only disk is a tmpfs remounted read-only (root), else a folder without write
permission. A lock is a second SQLite connection holding ``BEGIN EXCLUSIVE``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import threading
import time

import pytest

from clipinspect.runtime.cli import main
from clipinspect.runtime.core.errors import ClipInspectError
from clipinspect.runtime.serving import journal as journal_module
from clipinspect.runtime.serving.journal import Entry, Journal, JsonlSink

CATEGORY = "weave"


def entries(n: int, start: int = 0, origin: str = "http") -> list[Entry]:
    return [Entry(origin, f"img{i}", CATEGORY, "b", "fp32", image_score=0.01 * i)
            for i in range(start, start + n)]


def wait_until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@contextlib.contextmanager
def locked(path):
    """Another process's view of the journal: a connection holding the write lock."""
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")
    try:
        yield other
    finally:
        if other.in_transaction:
            other.execute("ROLLBACK")
        other.close()


@contextlib.contextmanager
def tmpfs(path, size_kib: int):
    """A small real file system at ``path`` (a tmpfs); skips the test where it cannot mount."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs",
                              str(path)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(disk) -> os.PathLike:
    """Fill the file system of ``disk`` to the last byte; returns the filler file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == 28  # ENOSPC
    finally:
        os.close(fd)
    return filler


# ------------------------------------------------------------------------------- submit/health
def test_submit_does_not_wait_for_a_locked_journal_and_writes_once_it_is_released(tmp_path):
    path = tmp_path / "j.sqlite"
    journal = Journal(path, retry_s=(0.05, 0.2))
    assert journal.health() == (True, "")
    with locked(path):
        start = time.monotonic()
        journal.submit(entries(2))
        journal.submit(entries(3, start=2))
        elapsed = time.monotonic() - start
        assert elapsed < 1.0  # 2 x submit_timeout_s (0.1 s) and the write, not 5 s of busy wait
        assert journal.pending == 5
        ok, reason = journal.health()
        assert not ok and "locked by another process" in reason and str(path) in reason
        assert journal.flush() is False
        submitted = time.time()
    # Released: the background retry writes them, in order, with the time they were submitted.
    assert wait_until(lambda: journal.pending == 0)
    assert journal.health() == (True, "")
    rows = journal.rows()
    assert [r["image_id"] for r in rows] == [f"img{i}" for i in range(5)]
    assert all(r["time"] <= submitted for r in rows)
    journal.close()


def test_the_pending_buffer_is_bounded_and_says_why_it_is_full(tmp_path):
    path = tmp_path / "j.sqlite"
    journal = Journal(path, max_pending=3, retry_s=(5.0, 5.0))
    with locked(path):
        journal.submit(entries(3))
        with pytest.raises(journal_module.JournalUnavailable,
                           match="3 results are waiting.*max_pending 3.*locked by another"):
            journal.submit(entries(1, start=3))
        assert journal.pending == 3  # the refused one is not kept
    assert journal.flush(timeout_s=2.0) is True
    assert [r["image_id"] for r in journal.rows()] == ["img0", "img1", "img2"]
    journal.close()


def test_submit_from_many_threads_while_health_is_polled_loses_and_repeats_nothing(tmp_path):
    path = tmp_path / "j.sqlite"
    journal = Journal(path, retry_s=(0.02, 0.1))
    stop = threading.Event()
    unhealthy = []

    def probe():
        while not stop.is_set():
            ok, reason = journal.health()
            if not ok:
                unhealthy.append(reason)
            time.sleep(0.005)

    def worker(k: int):
        for i in range(50):
            journal.submit(entries(2, start=1000 * k + 2 * i))

    threads = [threading.Thread(target=probe)] + [
        threading.Thread(target=worker, args=(k,)) for k in range(4)]
    with locked(path):
        for t in threads:
            t.start()
        time.sleep(0.3)  # some batches arrive while another process holds the lock
    for t in threads[1:]:
        t.join(30)
    assert wait_until(lambda: journal.pending == 0)
    stop.set()
    threads[0].join(5)
    ids = [r["image_id"] for r in journal.rows()]
    assert len(ids) == len(set(ids)) == 400
    assert unhealthy and all("locked by another process" in r for r in unhealthy)
    assert journal.health() == (True, "")
    journal.close()


def test_close_writes_what_is_pending(tmp_path):
    path = tmp_path / "j.sqlite"
    journal = Journal(path, retry_s=(5.0, 5.0))
    with locked(path):
        journal.submit(entries(2))
        assert journal.pending == 2
    journal.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM results").fetchone()[0] == 2


def test_close_says_how_many_results_it_could_not_journal_and_why(tmp_path, capsys):
    path = tmp_path / "j.sqlite"
    journal = Journal(path, busy_timeout_s=0.2, retry_s=(5.0, 5.0))
    with locked(path):
        journal.submit(entries(2))
        journal.close()
    err = capsys.readouterr().err
    assert "2 result(s) could not be journaled before closing" in err
    assert "locked by another process" in err


# ------------------------------------------------------------------------------------ full disk
def test_a_full_journal_is_reported_as_full_and_writes_again_when_there_is_room(tmp_path):
    # SQLite's page limit: the same SQLITE_FULL ("database or disk is full") as a full disk.
    journal = Journal(tmp_path / "j.sqlite")
    journal.record(entries(1))
    pages = journal._db.execute("PRAGMA page_count").fetchone()[0]
    journal._db.execute(f"PRAGMA max_page_count = {pages}")
    many = [Entry("watch", f"big{i}", CATEGORY, "b", "fp32", error="x" * 2000)
            for i in range(20)]
    with pytest.raises(ClipInspectError, match="the disk is full") as info:
        journal.record(many)
    assert "cannot rollback" not in str(info.value) and len(str(info.value).splitlines()) == 1
    assert len(journal.rows()) == 1  # none of the batch written
    if hasattr(journal, "submit"):
        journal.submit(many[:5])
        ok, reason = journal.health()
        assert not ok and "the disk is full" in reason and journal.pending == 5
    journal._db.execute(f"PRAGMA max_page_count = {pages * 100}")
    assert len(journal.record(many[5:])) == 15
    if hasattr(journal, "submit"):
        assert wait_until(lambda: journal.pending == 0)
        assert journal.health() == (True, "")
    assert len(journal.rows()) == 21


def test_a_journal_on_a_really_full_disk(tmp_path):
    with tmpfs(tmp_path / "disk", 512) as disk:
        journal = Journal(disk / "j.sqlite")
        sink = JsonlSink(disk / "r.jsonl", journal, "watch")
        journal.record(entries(1, origin="watch"))
        filler = fill(disk)
        with pytest.raises(ClipInspectError, match="the disk is full") as info:
            journal.record(entries(1, start=5, origin="watch"))
        assert "cannot rollback" not in str(info.value)
        journal.submit(entries(3, start=10))
        assert journal.health()[0] is False and "the disk is full" in journal.health()[1]
        assert sink.write(journal.rows("watch")) is False and sink.pending == 1
        os.unlink(filler)
        assert wait_until(lambda: journal.pending == 0)
        assert sink.write([]) is True and sink.pending == 0
        assert journal.health() == (True, "")
        assert len(journal.rows()) == 4
        assert (disk / "r.jsonl").read_text().count("\n") == 1
        sink.close()
        journal.close()


# ------------------------------------------------------------------------------- read-only disk
@pytest.fixture
def read_only_journal(tmp_path):
    """A journal (with one row) on a disk that can no longer be written."""
    def make(folder):
        journal = Journal(folder / "j.sqlite")
        journal.record(entries(1))
        journal.close()

    if os.geteuid() == 0:
        with tmpfs(tmp_path / "disk", 512) as disk:
            make(disk)
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
            yield disk / "j.sqlite"
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        make(folder)
        for p in folder.iterdir():
            p.chmod(0o444)
        folder.chmod(0o555)
        yield folder / "j.sqlite"
        folder.chmod(0o755)


def test_a_journal_on_a_read_only_disk_is_reported_as_read_only(read_only_journal, tmp_path,
                                                                tiny_bundle_path, capsys):
    with pytest.raises(ClipInspectError) as info:
        Journal(read_only_journal)
    message = str(info.value)
    assert "writable" in message and str(read_only_journal) in message
    assert "damaged" not in message and "Move it away" not in message
    if os.geteuid() == 0:
        assert "read-only file system" in message
    folder = tmp_path / "in"
    folder.mkdir()
    assert main(["watch", str(tiny_bundle_path), "--input", str(folder), "--category",
                 CATEGORY, "--journal", str(read_only_journal), "--once"]) == 2
    err = capsys.readouterr().err.strip()
    assert "writable" in err and "damaged" not in err and len(err.splitlines()) == 1
