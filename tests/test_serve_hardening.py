"""clipinspect serve against hostile or broken surroundings: idle and dripping connections
(header deadline, per-address cap, room made by closing idle ones), a live page nobody watches
(bounded memory), an inference that never returns (readiness watchdog), a journal that cannot
write (results still answered, kept pending, readiness says why), and what the docs promise."""

from __future__ import annotations

import re
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

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


def closed_by_server(s: socket.socket) -> bool:
    """Whether the server has closed (or answered and is closing) this idle connection."""
    readable, _, _ = select.select([s], [], [], 0)
    if readable:  # EOF, a reset, or a 503 followed by EOF: the server acted on it
        try:
            s.recv(4096)
        except OSError:
            pass
    return bool(readable)


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
            open_ = [s for s in open_ if not closed_by_server(s)]
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
        assert conn.recv(4096).startswith(b"HTTP/1.1 200")
        t0 = time.perf_counter()
        closed = False
        while time.perf_counter() - t0 < 8 and not closed:
            try:
                conn.send(b"G")  # a next request head that never completes
            except OSError:
                closed = True
                break
            closed = closed_by_server(conn)
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
