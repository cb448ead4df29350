"""clipinspect watch and the results journal: exactly once per image, across kill -9."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from clipinspect.runtime import Inspector
from clipinspect.runtime.cli import main
from clipinspect.runtime.core.errors import ClipInspectError
from clipinspect.runtime.core.images import EncodedImage
from clipinspect.runtime.serving.journal import Entry, Journal, JsonlSink
from clipinspect.runtime.serving import watch
from clipinspect.runtime.serving.watch import FolderWatcher

CATEGORY = "weave"


def png(seed: int, size: int = 40) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_catches_up_with_the_journal_after_a_crash(tmp_path):
    journal = Journal(tmp_path / "j.sqlite")
    origin = "watch:/line"
    journal.record(Entry(origin, f"img{i}", CATEGORY, "b", "fp32", image_score=0.1 * i)
                   for i in range(3))
    JsonlSink(tmp_path / "r.jsonl", journal, origin).close()
    # A crash after the journal commit, in the middle of writing the line of the next row.
    journal.record([Entry(origin, "img3", CATEGORY, "b", "fp32", image_score=0.3)])
    with open(tmp_path / "r.jsonl", "a") as f:
        f.write('{"id": 4, "orig')
    JsonlSink(tmp_path / "r.jsonl", journal, origin).close()
    rows = jsonl(tmp_path / "r.jsonl")
    assert [r["id"] for r in rows] == [1, 2, 3, 4]
    assert rows[3]["image_id"] == "img3" and rows[3]["image_score"] == 0.3
    # An image id is unique within its origin; a failed batch writes nothing.
    with pytest.raises(sqlite3.IntegrityError):
        journal.record([Entry(origin, "img9", CATEGORY, "b", "fp32"),
                        Entry(origin, "img0", CATEGORY, "b", "fp32")])
    assert len(journal.rows(origin)) == 4
    assert not journal.has(origin, "img9")


def test_file_still_being_written_is_read_once_complete(tiny_bundle_path, tmp_path):
    inspector = Inspector.open(tiny_bundle_path, threads=2)
    folder = tmp_path / "in"
    folder.mkdir()
    journal = Journal(tmp_path / "j.sqlite")
    sink = JsonlSink(tmp_path / "r.jsonl", journal, "watch")
    watcher = FolderWatcher(inspector, folder, CATEGORY, journal, sink, tmp_path / "done",
                            settle=0.5)
    data = png(1)
    with open(folder / "part.png", "wb") as f:
        f.write(data[:len(data) // 2])  # the camera has written half of it
        f.flush()
        assert watcher.poll() == 0  # first sight
        time.sleep(0.3)
        f.write(data[len(data) // 2:])
    assert watcher.poll() == 0  # changed since the last poll
    time.sleep(0.6)
    assert watcher.poll() == 1
    row, = jsonl(tmp_path / "r.jsonl")
    assert row["error"] is None
    assert row["image_score"] == inspector.inspect(EncodedImage(data), CATEGORY)[0].image_score
    assert (tmp_path / "done" / "part.png").read_bytes() == data
    assert not list(folder.iterdir())


def test_kill_9_in_the_middle_then_restart_gives_every_image_exactly_one_result(
        small_bundle_path, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    n = 10
    for i in range(n):
        (folder / f"img{i:02d}.png").write_bytes(png(100 + i))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    old = time.time() - 60  # written a while ago: ready at the second poll
    for p in folder.iterdir():
        os.utime(p, (old, old))
    cmd = [sys.executable, "-m", "clipinspect.runtime.cli", "watch", str(small_bundle_path),
           "--input", str(folder), "--category", CATEGORY, "--batch-size", "2",
           "--settle", "0.1", "--interval", "0.1", "--threads", "2", "--once"]
    journal_path = folder / "journal.sqlite"

    def journaled() -> int:
        if not journal_path.exists():
            return 0
        with sqlite3.connect(f"file:{journal_path}?mode=ro", uri=True) as db:
            try:
                return db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
            except sqlite3.OperationalError:  # table not created yet
                return 0

    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while journaled() < 2 and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = journaled()
    assert 2 <= done_before < n + 1, "the kill did not land in the middle of the folder"

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    with sqlite3.connect(journal_path) as db:
        ids = [r[0] for r in db.execute("SELECT image_id FROM results")]
        errors = [r[0] for r in db.execute("SELECT image_id FROM results WHERE error IS NOT NULL")]
    names = sorted(i.split("@")[0] for i in ids)
    assert names == sorted([f"img{i:02d}.png" for i in range(n)] + ["broken.png"])
    assert [e.split("@")[0] for e in errors] == ["broken.png"]
    lines = jsonl(folder / "results.jsonl")
    assert sorted(r["image_id"] for r in lines) == sorted(ids)
    assert len({r["id"] for r in lines}) == len(lines)
    assert sorted(p.name for p in (folder / "done").iterdir()) == names
    assert not [p for p in folder.iterdir() if p.suffix == ".png"]


def test_source_without_opencv_says_how_to_install(tiny_bundle_path, tmp_path, monkeypatch,
                                                   capsys):
    monkeypatch.setitem(sys.modules, "cv2", None)  # as if OpenCV were not installed
    monkeypatch.chdir(tmp_path)
    assert main(["watch", str(tiny_bundle_path), "--source", "0", "--category",
                 CATEGORY]) == 2
    assert "clipinspect[camera]" in capsys.readouterr().err


def test_source_reads_a_video_file(tiny_bundle_path, tmp_path, monkeypatch):
    cv2 = pytest.importorskip("cv2")
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (40, 40))
    for i in range(5):
        writer.write(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    writer.release()
    monkeypatch.chdir(tmp_path)
    assert main(["watch", str(tiny_bundle_path), "--source", str(video), "--category",
                 CATEGORY, "--every", "2", "--threads", "2"]) == 0
    rows = jsonl(tmp_path / "results.jsonl")
    assert [r["image_id"].split("-")[-1] for r in rows] == ["frame00000001", "frame00000003",
                                                            "frame00000005"]
    assert all(r["origin"] == f"source:{video}" and r["error"] is None for r in rows)
    journal = Journal(tmp_path / "journal.sqlite")
    assert [r["image_score"] for r in journal.rows()] == [r["image_score"] for r in rows]


# ----------------------------------------------------------------- untrusted folder contents
def watcher_for(inspector, tmp_path, **options) -> tuple[FolderWatcher, Journal, object]:
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    journal = Journal(tmp_path / "j.sqlite")
    sink = JsonlSink(tmp_path / "r.jsonl", journal, "watch")
    return FolderWatcher(inspector, folder, CATEGORY, journal, sink, tmp_path / "done",
                         settle=0.05, **options), journal, folder


def settled(folder) -> None:
    old = time.time() - 60
    for p in folder.iterdir():
        if p.is_file():
            os.utime(p, (old, old))


def poll_in_thread(watcher: FolderWatcher) -> int:
    """One poll that must come back (a blocking open would hang it)."""
    out = []
    thread = threading.Thread(target=lambda: out.append(watcher.poll()), daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the watcher blocked"
    return out[0]


@pytest.fixture(scope="module")
def watch_inspector(tiny_bundle_path):
    return Inspector.open(tiny_bundle_path, threads=2)


def test_unusable_files_are_quarantined_and_the_watcher_goes_on(watch_inspector, tmp_path,
                                                                 monkeypatch, capsys):
    watcher, journal, folder = watcher_for(watch_inspector, tmp_path, max_file_bytes=50_000)
    odd = os.fsdecode(b"odd\xff.png")  # not UTF-8: journal and log must still take it
    for name in ("good.png", odd, "new\nline.png", "fifo.png", "link.png", "locked.png"):
        (folder / name).write_bytes(png(1))
    (folder / "huge.png").write_bytes(png(2, 200))
    settled(folder)
    real_read, real_open = watch.read_image_file, os.open

    def swap_then_read(path, max_bytes):
        # The race: the file listed as a regular file is replaced just before it is opened.
        if path.name == "fifo.png":
            path.unlink()
            os.mkfifo(path)
        elif path.name == "link.png":
            path.unlink()
            path.symlink_to("/dev/zero")
        return real_read(path, max_bytes)

    def open_denied(path, flags, *args, **kwargs):  # as a non-root user without read access
        if str(path).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(watch, "read_image_file", swap_then_read)
    monkeypatch.setattr(os, "open", open_denied)
    assert poll_in_thread(watcher) == 0  # first sight
    assert poll_in_thread(watcher) == 7
    monkeypatch.undo()
    rows = {r["image_id"].split("@")[0]: r for r in journal.rows()}
    assert rows.keys() == {"good.png", "odd\\xff.png", "new\\nline.png", "fifo.png",
                           "link.png", "locked.png", "huge.png"}
    for name in ("good.png", "odd\\xff.png", "new\\nline.png"):
        assert rows[name]["error"] is None and rows[name]["image_score"] is not None
    assert "not a regular file" in rows["fifo.png"]["error"]
    assert "cannot be opened" in rows["link.png"]["error"]
    assert "Permission denied" in rows["locked.png"]["error"]
    assert "over the limit of 50000" in rows["huge.png"]["error"]
    assert sorted(os.listdir(folder / "quarantine")) == [
        "fifo.png", "huge.png", "link.png", "locked.png"]
    assert sorted(os.listdir(folder)) == ["quarantine"]
    for line in capsys.readouterr().err.splitlines():
        assert line.startswith("clipinspect watch: ")
    assert len(jsonl(tmp_path / "r.jsonl")) == 7


def test_a_writer_pausing_longer_than_settle_still_gets_its_image_inspected(watch_inspector,
                                                                            tmp_path):
    watcher, journal, folder = watcher_for(watch_inspector, tmp_path, incomplete_s=60)
    data = png(3)
    (folder / "slow.png").write_bytes(data[:len(data) // 2])
    settled(folder)
    assert watcher.poll() == 0 and watcher.poll() == 0  # decoded, found truncated: no verdict
    assert journal.rows() == []
    (folder / "slow.png").write_bytes(data)  # the writer resumes
    settled(folder)
    assert watcher.poll() == 0 and watcher.poll() == 1
    row, = journal.rows()
    assert row["error"] is None
    assert row["image_score"] == watch_inspector.inspect(EncodedImage(data), CATEGORY)[0].image_score


def test_a_file_that_stays_truncated_gets_its_verdict_after_the_wait(watch_inspector, tmp_path):
    watcher, journal, folder = watcher_for(watch_inspector, tmp_path, incomplete_s=0.5)
    data = png(4)
    (folder / "cut.png").write_bytes(data[:len(data) // 2])
    settled(folder)
    watcher.run(interval=0.1, once=True)
    row, = journal.rows()
    assert "truncated" in row["error"]
    assert (tmp_path / "done" / "cut.png").exists()


def test_a_done_folder_on_another_file_system_is_filled_by_copy(watch_inspector, tmp_path,
                                                                monkeypatch):
    watcher, journal, folder = watcher_for(watch_inspector, tmp_path)
    (folder / "a.png").write_bytes(png(5))
    settled(folder)
    real_replace = os.replace

    def cross_device(src, dst):
        if os.path.dirname(src) == str(folder):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", cross_device)
    watcher.poll()
    assert watcher.poll() == 1
    assert os.listdir(tmp_path / "done") == ["a.png"]
    assert (tmp_path / "done" / "a.png").read_bytes() == png(5)
    assert not (folder / "a.png").exists()


def test_a_damaged_journal_is_a_one_line_error(tiny_bundle_path, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "journal.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(ClipInspectError, match="Move it away"):
        Journal(folder / "journal.sqlite")
    assert main(["watch", str(tiny_bundle_path), "--input", str(folder), "--category",
                 CATEGORY, "--once"]) == 2
    err = capsys.readouterr().err.strip()
    assert "journal.sqlite" in err and "Traceback" not in err and len(err.splitlines()) == 1


# ------------------------------------------------- files that race, lie about time or are empty
def test_a_file_swapped_for_a_directory_is_quarantined_and_the_watcher_goes_on(
        watch_inspector, tmp_path, monkeypatch):
    watcher, journal, folder = watcher_for(watch_inspector, tmp_path)
    for name in ("a.png", "swapped.png"):
        (folder / name).write_bytes(png(8))
    settled(folder)
    real_read = watch.read_image_file

    def swap_then_read(path, max_bytes):
        if path.name == "swapped.png":  # listed as a file, a directory when opened
            path.unlink()
            path.mkdir()
        return real_read(path, max_bytes)

    monkeypatch.setattr(watch, "read_image_file", swap_then_read)
    assert watcher.poll() == 0  # first sight
    assert watcher.poll() == 2
    rows = {r["image_id"].split("@")[0]: r for r in journal.rows()}
    assert rows["a.png"]["error"] is None
    assert "swapped.png is not a regular file" in rows["swapped.png"]["error"]
    assert (folder / "quarantine" / "swapped.png").is_dir()


def test_a_file_stamped_in_the_future_is_inspected_and_once_ends(watch_inspector, tmp_path):
    watcher, journal, folder = watcher_for(watch_inspector, tmp_path)
    (folder / "ahead.png").write_bytes(png(9))
    ahead = time.time() + 3600  # a camera whose clock is an hour fast
    os.utime(folder / "ahead.png", (ahead, ahead))
    finished, give_up = threading.Event(), threading.Event()

    def run():
        watcher.run(interval=0.05, once=True, stop=give_up.is_set)
        finished.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ended = finished.wait(30)
    give_up.set()
    thread.join(10)
    assert ended, "--once never ended"
    row, = journal.rows()
    assert row["error"] is None and row["image_id"].startswith("ahead.png@")
    assert (tmp_path / "done" / "ahead.png").exists()


def test_an_empty_file_is_waited_for_like_a_file_being_written(watch_inspector, tmp_path):
    watcher, journal, folder = watcher_for(watch_inspector, tmp_path, incomplete_s=60)
    (folder / "new.png").write_bytes(b"")  # created by the camera, not written yet
    settled(folder)
    assert watcher.poll() == 0 and watcher.poll() == 0
    assert journal.rows() == [] and (folder / "new.png").exists()
    data = png(10)
    (folder / "new.png").write_bytes(data)
    settled(folder)
    assert watcher.poll() == 0 and watcher.poll() == 1
    row, = journal.rows()
    assert row["error"] is None
    assert row["image_score"] == watch_inspector.inspect(EncodedImage(data), CATEGORY)[0].image_score


def test_a_file_that_stays_empty_gets_its_verdict_after_the_wait(watch_inspector, tmp_path):
    watcher, journal, folder = watcher_for(watch_inspector, tmp_path, incomplete_s=0.5)
    (folder / "stays.png").write_bytes(b"")
    settled(folder)
    start = time.monotonic()
    watcher.run(interval=0.05, once=True)
    assert time.monotonic() - start >= 0.5
    row, = journal.rows()
    assert "empty (0 bytes)" in row["error"]
    assert (tmp_path / "done" / "stays.png").exists()


# ----------------------------------------------------- a journal that cannot be written a while
def fill_to_page_limit(journal: Journal) -> int:
    """Make the journal full (SQLITE_FULL, as on a full disk) through SQLite's page limit;
    returns the page count to raise the limit from."""
    db = journal._db
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")
    for i in range(100_000):
        try:
            db.execute("INSERT INTO results (origin, image_id, time, category, bundle, precision)"
                       " VALUES ('filler', ?, 0, 'c', 'b', 'p')", (str(i),))
        except sqlite3.OperationalError as e:
            assert "full" in str(e)
            return pages
    raise AssertionError("the page limit was never reached")


def test_results_wait_for_a_full_journal_and_are_not_inspected_twice(watch_inspector, tmp_path,
                                                                     monkeypatch):
    watcher, journal, folder = watcher_for(watch_inspector, tmp_path, batch_size=2)
    for i in range(3):
        (folder / f"f{i}.png").write_bytes(png(20 + i))
    settled(folder)
    inspected = []
    real_inspect = watch_inspector.inspect_loaded

    def counting(images, *args, **kwargs):
        inspected.append(len(images))
        return real_inspect(images, *args, **kwargs)

    monkeypatch.setattr(watch_inspector, "inspect_loaded", counting)
    pages = fill_to_page_limit(journal)
    assert watcher.poll() == 0  # first sight
    with pytest.raises(ClipInspectError, match="the disk is full") as info:
        watcher.poll()
    assert "cannot rollback" not in str(info.value)
    assert journal.rows(watcher.origin) == []
    assert sorted(p.name for p in folder.iterdir()) == ["f0.png", "f1.png", "f2.png"]
    journal._db.execute(f"PRAGMA max_page_count = {pages * 100}")  # room again
    assert watcher.poll() == 3
    assert sorted(r["image_id"].split("@")[0] for r in journal.rows(watcher.origin)) == [
        "f0.png", "f1.png", "f2.png"]
    assert inspected == [2, 1]  # the batch that waited was journaled, not inspected again
    assert sorted(os.listdir(tmp_path / "done")) == ["f0.png", "f1.png", "f2.png"]
    assert len(jsonl(tmp_path / "r.jsonl")) == 3


def test_watch_waits_for_a_journal_another_process_holds_locked(watch_inspector, tmp_path,
                                                                monkeypatch):
    watcher, journal, folder = watcher_for(watch_inspector, tmp_path)
    for i in range(2):
        (folder / f"l{i}.png").write_bytes(png(30 + i))
    settled(folder)
    logged, errors = [], []
    monkeypatch.setattr(watch, "log", logged.append)

    def run():
        try:
            watcher.run(interval=0.05, once=True)
        except BaseException as e:  # noqa: BLE001 - what the watcher died of is the finding
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    other = sqlite3.connect(journal.path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")  # another process holds the write lock ...
    try:
        thread.start()
        time.sleep(6)  # ... for longer than SQLite's default wait of 5 s
        assert errors == [] and thread.is_alive()
        assert sorted(p.name for p in folder.iterdir()) == ["l0.png", "l1.png"]  # not moved
    finally:
        other.execute("ROLLBACK")
        other.close()
    thread.join(30)
    assert errors == [] and not thread.is_alive()
    assert len(journal.rows()) == 2
    assert sorted(os.listdir(tmp_path / "done")) == ["l0.png", "l1.png"]
    assert any("locked by another process" in line and "trying again" in line
               for line in logged)


class FakeCamera:
    """What watch_source uses of OpenCV: a capture giving ``frames`` BGR frames, then the end."""

    COLOR_BGR2RGB = 4

    def __init__(self, frames: int):
        self.frames = [np.random.default_rng(40 + i).integers(0, 256, (40, 40, 3), np.uint8)
                       for i in range(frames)]

    def VideoCapture(self, source):  # noqa: N802 - OpenCV's name
        frames = iter(self.frames)
        return type("Capture", (), {"isOpened": lambda _: True, "release": lambda _: None,
                                    "read": lambda _: next(((True, f) for f in frames),
                                                           (False, None))})()

    @staticmethod
    def cvtColor(frame, code):  # noqa: N802
        return np.ascontiguousarray(frame[..., ::-1])


def test_camera_results_wait_for_a_full_journal_and_none_is_lost(watch_inspector, tmp_path,
                                                                 monkeypatch):
    """watch --source, like the hot folder: while the journal cannot be written the frame's
    result is kept and tried again, waiting longer each time; the stream goes on after."""
    monkeypatch.setitem(sys.modules, "cv2", FakeCamera(4))
    journal = Journal(tmp_path / "j.sqlite")
    origin = "source:cam"
    sink = JsonlSink(tmp_path / "r.jsonl", journal, origin)
    pages = fill_to_page_limit(journal)
    logged, inspected = [], []
    real_inspect = watch_inspector.inspect_loaded

    def counting(images, *args, **kwargs):
        inspected.append(len(images))
        return real_inspect(images, *args, **kwargs)

    def log(line: str) -> None:
        logged.append(line)
        if sum("trying again" in seen for seen in logged) == 2:  # room again after two tries
            journal._db.execute(f"PRAGMA max_page_count = {pages * 100}")

    monkeypatch.setattr(watch_inspector, "inspect_loaded", counting)
    monkeypatch.setattr(watch, "log", log)
    assert watch.watch_source(watch_inspector, "cam", CATEGORY, journal, sink) == 4
    sink.close()
    rows = journal.rows(origin)
    assert [r["image_id"].split("-")[-1] for r in rows] == [f"frame{i:08d}" for i in (1, 2, 3, 4)]
    assert [r["image_id"] for r in jsonl(tmp_path / "r.jsonl")] == [r["image_id"] for r in rows]
    assert inspected == [1, 1, 1, 1]  # the frame that waited was journaled, not inspected again
    waits = [line for line in logged if "trying again" in line]
    assert len(waits) == 2 and all("full" in line for line in waits)
    assert [float(w.rsplit("in ", 1)[1].split()[0]) for w in waits] == [0.5, 1.0]  # backs off
    assert "the journal is written again" in logged


def test_camera_journal_that_waiting_cannot_cure_still_stops_the_watch(watch_inspector,
                                                                       tmp_path, monkeypatch):
    from clipinspect.runtime.serving.journal import JournalUnavailable

    class Broken(Journal):
        def record(self, entries):
            raise JournalUnavailable("the journal is damaged; move it away", transient=False)

    monkeypatch.setitem(sys.modules, "cv2", FakeCamera(2))
    journal = Broken(tmp_path / "j.sqlite")
    sink = JsonlSink(tmp_path / "r.jsonl", journal, "source:cam")
    with pytest.raises(JournalUnavailable, match="damaged"):
        watch.watch_source(watch_inspector, "cam", CATEGORY, journal, sink)
