"""clipinspect serve against hostile or broken surroundings: idle and dripping connections
(header deadline, per-address cap, room made by closing idle ones), a live page nobody watches
(bounded memory), an inference that never returns (readiness watchdog), a journal that cannot
write (results still answered, kept pending, readiness says why), and what the docs promise."""

from __future__ import annotations

import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from clipinspect.benchmarks.loadtest import server_closed  # noqa: E402
from clipinspect.runtime import Inspector  # noqa: E402
from clipinspect.runtime.core.errors import UsageError  # noqa: E402
from clipinspect.runtime.serving.server import ServeConfig, create_app  # noqa: E402
from test_serve import CATEGORY, KEY, Live, png, post  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"


def configured(**settings) -> ServeConfig:
    """A ServeConfig with these fields set after construction (so that this file also runs,
    and fails on what it checks, against code that predates a field)."""
    config = ServeConfig()
    for name, value in settings.items():
        setattr(config, name, value)
    return config


@pytest.fixture(scope="module")
def inspector(tiny_bundle_path):
    return Inspector.open(tiny_bundle_path, threads=2)


# ----------------------------------------------------------------- connections
def needs_other_loopback_addresses() -> None:
    """The attack tests come from 127.0.0.2 and up (Linux routes all of 127/8 to loopback)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.2", 0))
        except OSError as e:
            pytest.skip(f"this system's loopback does not take 127.0.0.2 ({e})")


def open_idle(port: int, n: int, addresses: int) -> list[socket.socket]:
    """n connections from 127.0.0.2 .. 127.0.0.(1 + addresses): even ones send nothing, odd
    ones half a header line (and more of it while :func:`drip` runs)."""
    socks = []
    for i in range(n):
        s = socket.socket()
        s.bind((f"127.0.0.{2 + i % addresses}", 0))
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        if i % 2:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        socks.append(s)
    return socks


def drip(socks: list[socket.socket], stop: threading.Event, every_s: float = 2.0) -> None:
    """One more header byte on every odd socket each ``every_s`` seconds, until ``stop``."""
    while not stop.wait(every_s):
        for s in socks[1::2]:
            try:
                s.send(b"s")
            except OSError:  # closed by the server
                pass


def read_answer(s: socket.socket) -> bytes:
    """One whole HTTP answer with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(4096)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
    while len(body) < length:
        body += s.recv(4096)
    return head + b"\r\n\r\n" + body


def timed(call) -> tuple[float, httpx.Response]:
    t0 = time.perf_counter()
    r = call()
    return time.perf_counter() - t0, r


def test_260_idle_and_dripping_sockets_do_not_lock_out_probes_or_requests(inspector):
    """The attack of issue 24 in small: 260 sockets (more than --max-connections 256) from ten
    addresses (26 each, under the per-address cap), half silent, half dripping a header line.
    Probes and a real inspection are answered within 2 s while they are open, and every one of
    them is closed once the header deadline (here 3 s) has passed."""
    header_timeout = 3.0
    needs_other_loopback_addresses()
    server = Live(inspector, configured(header_timeout_s=header_timeout))
    stop = threading.Event()
    socks: list[socket.socket] = []
    try:
        socks = open_idle(server.port, 260, addresses=10)
        dripper = threading.Thread(target=drip, args=(socks, stop, 1.0), daemon=True)
        dripper.start()
        opened = time.perf_counter()
        for path in ("/healthz", "/readyz"):
            seconds, r = timed(lambda: httpx.get(server.url + path, timeout=10))
            assert r.status_code == 200 and seconds < 2, (path, r.status_code, seconds)
        seconds, r = timed(lambda: post(server.url, png(1), None))
        assert r.status_code == 200 and seconds < 2, (r.status_code, r.text[:200], seconds)
        assert r.json()["category"] == CATEGORY
        assert time.perf_counter() - opened < header_timeout  # all of that while they were open
        deadline = opened + header_timeout + 5
        open_ = list(socks)
        while open_ and time.perf_counter() < deadline:
            open_ = [s for s in open_ if not server_closed(s)]
            time.sleep(0.2)
        assert not open_, f"{len(open_)} of 260 idle sockets still open after the deadline"
        metrics = httpx.get(server.url + "/metrics").text
        timeouts = re.search(r'clipinspect_connections_closed_total\{reason="header_timeout"\} '
                             r'(\S+)', metrics)
        assert timeouts and float(timeouts.group(1)) >= 250
    finally:
        stop.set()
        for s in socks:
            s.close()
        server.stop()


def test_one_address_gets_503_beyond_its_connection_cap(inspector):
    needs_other_loopback_addresses()
    server = Live(inspector, configured(max_connections_per_client=4, header_timeout_s=20.0))
    held = open_idle(server.port, 4, addresses=1)  # 4 silent-or-dripping from 127.0.0.2
    try:
        extra = socket.socket()
        extra.bind(("127.0.0.2", 0))
        extra.settimeout(5)
        extra.connect(("127.0.0.1", server.port))
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := extra.recv(4096):
            answer += chunk
        extra.close()
        assert answer.startswith(b"HTTP/1.1 503"), answer[:100]
        assert b"too_many_connections" in answer and b"127.0.0.2" in answer
        # Another address is not affected.
        assert httpx.get(server.url + "/healthz").status_code == 200
    finally:
        for s in held:
            s.close()
        server.stop()


def test_a_keep_alive_connection_trickling_bytes_after_an_answer_is_closed(inspector):
    """uvicorn's keep-alive timer restarts on every byte; the header deadline does not."""
    server = Live(inspector, configured(header_timeout_s=2.0))
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(conn).startswith(b"HTTP/1.1 200")
        t0 = time.perf_counter()
        closed = False
        while time.perf_counter() - t0 < 8 and not closed:
            try:
                conn.send(b"G")  # a next request head that never completes
            except OSError:
                closed = True
                break
            closed = server_closed(conn)
            time.sleep(0.5)
        assert closed and time.perf_counter() - t0 < 4.5
    finally:
        conn.close()
        server.stop()


@pytest.mark.parametrize("field, value", [("header_timeout_s", 0.0),
                                          ("header_timeout_s", float("inf")),
                                          ("max_connections_per_client", 0)])
def test_connection_limits_out_of_range_are_refused_at_start(inspector, field, value):
    with pytest.raises(UsageError, match="header-timeout|per client"):
        create_app(inspector, configured(**{field: value}))


# ----------------------------------------------------------------- docs
def test_openapi_needs_the_key_where_one_is_set_and_the_docs_say_so(inspector):
    server = Live(inspector, ServeConfig(api_key=KEY))
    try:
        assert httpx.get(server.url + "/openapi.json").status_code == 401
        assert httpx.get(server.url + "/openapi.json",
                         headers={"X-API-Key": KEY}).status_code == 200
    finally:
        server.stop()
    auth = (DOCS / "service.md").read_text().split("## Auth", 1)[1].split("\n## ", 1)[0]
    assert "/openapi.json" in auth
    assert not re.search(r"/openapi\.json`?\s+stays?\s+open", auth), auth
    assert re.search(r"`/openapi\.json`[^;]*need", auth), auth


# ----------------------------------------------------------------- the live page, unwatched
def test_the_live_feed_holds_bounded_memory_while_no_page_is_open(monkeypatch):
    """A line inspecting for hours without the page open: the feed keeps one throughput window
    of times (plus fixed-size latest and latency lists), not every inspection's time."""
    import tracemalloc
    from types import SimpleNamespace

    from clipinspect.runtime.core.inspector import InspectionResult
    from clipinspect.runtime.serving import ui

    clock = [1_000_000.0]
    monkeypatch.setattr(ui, "time", SimpleNamespace(time=lambda: clock[0]))
    feed = ui.LiveFeed()
    result = InspectionResult("x", image_score=0.5, is_anomalous=False)

    def inspect(n: int) -> None:
        for _ in range(n):
            clock[0] += 0.5  # two inspections a second, for hours
            feed.record(CATEGORY, result, {"image": 1.0}, 0.01)

    inspect(2_000)  # past every window and fixed-size list
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    inspect(40_000)
    grown = sum(d.size_diff for d in tracemalloc.take_snapshot().compare_to(before, "filename")
                if d.traceback[0].filename == ui.__file__)
    tracemalloc.stop()
    assert grown < 20_000, f"the feed grew by {grown} bytes over 40000 unwatched inspections"
    s = feed.state()  # and what the page shows is still right
    assert s["counts"][CATEGORY]["inspected"] == 42_000
    assert s["throughput_per_s"] == pytest.approx(2.0, rel=0.05)


# ----------------------------------------------------------------- inference watchdog
class Hanging:
    """A stand-in inspector: the real one, except that while ``hang`` is set a batch does not
    return until ``release`` is set (a backend that hangs)."""

    def __init__(self, inner: Inspector):
        self.inner, self.hang, self.release = inner, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def inspect_mixed(self, *args, **kwargs):
        if self.hang.is_set():
            self.release.wait(60)
        return self.inner.inspect_mixed(*args, **kwargs)


def ready(url: str) -> httpx.Response:
    return httpx.get(url + "/readyz", timeout=5)


def wait_for(check, seconds: float):
    deadline = time.perf_counter() + seconds
    while not (value := check()) and time.perf_counter() < deadline:
        time.sleep(0.1)
    return value


def test_readiness_turns_503_while_a_batch_never_returns_and_recovers(inspector):
    stand_in = Hanging(inspector)
    server = Live(lambda: stand_in, configured(inference_timeout_s=1.0))
    pool = ThreadPoolExecutor(1)
    try:
        time.sleep(1.5)  # idle longer than the timeout: no work, so nothing is stalled
        assert ready(server.url).status_code == 200
        stand_in.hang.set()
        answer = pool.submit(post, server.url, png(1), None)
        r = wait_for(lambda: (r := ready(server.url)).status_code == 503 and r, 6)
        assert r, "readiness stayed 200 while the batch hung"
        error = r.json()["error"]
        assert error["code"] == "inference_stalled"
        assert "no progress" in error["message"] and "--inference-timeout 1" in error["message"]
        stand_in.release.set()
        assert answer.result(30).status_code == 200  # the batch came back: answered
        assert wait_for(lambda: ready(server.url).status_code == 200, 3)
    finally:
        stand_in.release.set()
        pool.shutdown()
        server.stop()


def test_inference_timeout_out_of_range_is_refused(inspector):
    with pytest.raises(UsageError, match="inference-timeout"):
        create_app(inspector, configured(inference_timeout_s=-1.0))


# ----------------------------------------------------------------- a journal that cannot write
LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")  # the write lock, held until killed
print("locked", flush=True)
time.sleep(120)
"""


def test_a_locked_journal_does_not_fail_requests_and_readiness_says_why(inspector, tmp_path,
                                                                       capfd):
    import subprocess
    import sys

    from clipinspect.runtime.serving.journal import Journal

    path = tmp_path / "journal.sqlite"
    server = Live(inspector, ServeConfig(journal=path))
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        seconds, r = timed(lambda: post(server.url, png(2), None))
        assert r.status_code == 200 and seconds < 3, (r.status_code, r.text[:300], seconds)
        image_id = r.json()["image_id"]
        r = ready(server.url)
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "journal_unavailable" and "locked" in error["message"]
        assert "1 result(s) pending" in error["message"]
        locker.kill()
        locker.wait(10)
        assert wait_for(lambda: ready(server.url).status_code == 200, 15)
        rows = Journal(path).rows("http")
        assert [row["image_id"] for row in rows] == [image_id]  # written later, once
        assert "locked by another process" in capfd.readouterr().err  # the real error, logged
    finally:
        locker.kill()
        server.stop()


class FullJournal:
    """A stand-in journal whose pending buffer is full: it refuses every result."""

    pending = 10_000

    def __init__(self, unavailable: type[Exception]):
        self.unavailable = unavailable

    def submit(self, entries) -> None:
        raise self.unavailable("10000 results are waiting to be journaled, the most kept; "
                               "the journal is locked by another process")

    record = submit

    def health(self) -> tuple[bool, str]:
        return False, "the journal is locked by another process"


def test_results_that_cannot_be_kept_for_the_journal_get_503_not_500(inspector):
    import asyncio

    from clipinspect.runtime.core.errors import ClipInspectError
    from clipinspect.runtime.serving import journal
    from clipinspect.runtime.serving.batcher import Batcher, Job
    from clipinspect.runtime.serving.errors import HTTPError
    from clipinspect.runtime.serving.metrics import Metrics

    unavailable = getattr(journal, "JournalUnavailable", ClipInspectError)
    config = ServeConfig()
    batcher = Batcher(inspector, config, Metrics(config.max_batch), FullJournal(unavailable))

    async def scenario():
        batcher.start()
        job = Job(inspector.load(png(3)), CATEGORY, "auto", "id",
                  asyncio.get_running_loop().create_future())
        batcher.submit(job)
        try:
            return await asyncio.wait_for(job.future, 30)
        except Exception as e:
            return e
        finally:
            await batcher.stop()

    outcome = asyncio.run(scenario())
    assert isinstance(outcome, HTTPError), outcome
    assert (outcome.status, outcome.code) == (503, "journal_unavailable")
    assert "locked by another process" in outcome.message


def test_the_load_tests_idle_socket_phase_reopens_what_the_server_closes(inspector):
    """benchmarks/loadtest.py --idle-sockets, in small: it keeps the attack going (sockets the
    server closes are opened again) and every probe is answered."""
    from clipinspect.benchmarks.loadtest import idle_attack

    needs_other_loopback_addresses()
    server = Live(inspector, configured(header_timeout_s=1.0))
    try:
        attack = idle_attack(server.port, (CATEGORY, png(4)), 40, 3.0)
    finally:
        server.stop()
    assert attack["errors"] == 0, attack["error_samples"]
    assert attack["closed_by_server"] >= 40 and attack["sockets_opened"] >= 80
    assert set(attack["probes"]) == {"healthz", "readyz", "inspect"}
    assert all(p["n"] >= 1 and p["max_ms"] < 2000 for p in attack["probes"].values())


@pytest.mark.parametrize("flag", ["--header-timeout", "--inference-timeout"])
def test_the_serve_command_takes_the_new_limits_and_checks_them(tiny_bundle_path, capsys, flag):
    from clipinspect.runtime.cli import main

    assert main(["serve", str(tiny_bundle_path), flag, "0"]) == 2  # refused before loading
    assert f"{flag} 0.0: give a positive number of seconds" in capsys.readouterr().err
