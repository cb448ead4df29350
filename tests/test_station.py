"""The station loop on an in-process source: one verdict per part, in order, equal to offline
inspection; the budget's fail-safe; a slow sink delays nothing; triggers; SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from PIL import Image

from clipinspect.runtime import Inspector
from clipinspect.runtime.station.build import build
from clipinspect.runtime.station.config import parse
from clipinspect.runtime.station.sources import Counters, SourceEnded, SourceLost, arrived

CATEGORY = "weave"


def frames(n: int, seed: int = 0, size=(48, 64)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), np.uint8) for _ in range(n)]


@dataclass
class ListSource:
    """Frames from a list, at most one per ``period_s``; ``lose_at``: frame numbers after which
    the source is lost once (reconnecting costs ``gone_s``)."""

    images: list
    period_s: float = 0.0
    lose_at: tuple = ()
    gone_s: float = 0.0
    name: str = "list"
    counters: Counters = field(default_factory=Counters)

    def __post_init__(self):
        self.i, self.opens, self._lost, self._next = 0, 0, set(), 0.0

    def open(self):
        self.opens += 1
        if self.opens > 1 and self.gone_s:
            time.sleep(self.gone_s)

    def read(self, timeout_s):
        if self.i in self.lose_at and self.i not in self._lost:
            self._lost.add(self.i)
            raise SourceLost("unplugged")
        if self.i >= len(self.images):
            raise SourceEnded
        wait = self._next - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, timeout_s))
            if self._next > time.monotonic():
                return None
        self._next = time.monotonic() + self.period_s
        self.i += 1
        self.counters.frames += 1
        return arrived(self.images[self.i - 1], frame_id=self.i)

    def close(self):
        pass


def station_file(tmp_path, extra: str = "", budget_ms: float = 60_000, **source) -> dict:
    text = textwrap.dedent(f"""
        [station]
        name = "t1"
        budget_ms = {budget_ms}
        [bundle]
        path = "bundle"
        category = "{CATEGORY}"
        image_threshold = 0.5
        [source]
        kind = "folder"
        folder = "in"
        [sinks.jsonl]
        path = "out.jsonl"
        [sinks.journal]
        path = "journal.sqlite"
        """) + textwrap.dedent(extra)
    import tomllib
    return parse(tomllib.loads(text), tmp_path / "station.toml")


@pytest.fixture(scope="module")
def inspector(tiny_bundle_path):
    return Inspector.open(tiny_bundle_path)


def run(config, inspector, source, until=None):
    built = build(config, inspector, source)
    station = built.station
    if until is not None:
        def stopper():
            while not until(station):
                time.sleep(0.01)
            station.stop()
        threading.Thread(target=stopper, daemon=True).start()
    station.run()
    return station


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_part_once_in_order_with_offline_scores(tmp_path, inspector):
    images = frames(7)
    station = run(station_file(tmp_path), inspector, ListSource(images))
    out = lines(tmp_path / "out.jsonl")
    assert [r["part"] for r in out] == list(range(1, 8))
    assert [r["frame_id"] for r in out] == list(range(1, 8))
    offline = [r.image_score for r in inspector.inspect(images, CATEGORY, batch_size=1)]
    assert [r["image_score"] for r in out] == offline  # bitwise: same precision and batch of 1
    assert all(r["verdict"] == ("NG" if s >= 0.5 else "OK") for r, s in zip(out, offline))
    assert {r["reason"] for r in out} == {""}
    assert station.counts == {"parts": 7, "fail_safe": 0, "budget_misses": 0}
    from clipinspect.runtime.serving.journal import Journal
    rows = Journal(tmp_path / "journal.sqlite").rows("station:t1")
    assert [r["image_id"] for r in rows] == [r["part_id"] for r in out]
    assert [r["image_score"] for r in rows] == offline
    # Latencies: every stage and the trigger-to-last-line-sink time, per part.
    assert station.metrics.latencies.percentiles("part")["n"] == 7
    assert set(out[0]["latency_ms"]) == {"decode", "queue", "inference", "decision"}


def test_past_the_budget_a_part_gets_the_fail_safe_never_a_late_ok(tmp_path, inspector):
    config = station_file(tmp_path, budget_ms=0.001)
    station = run(config, inspector, ListSource(frames(3)))
    out = lines(tmp_path / "out.jsonl")
    assert [r["verdict"] for r in out] == ["NG"] * 3
    assert {r["reason"] for r in out} == {"timeout"}
    assert all(r["image_score"] is None and r["map_max"] is None for r in out)
    assert station.counts["budget_misses"] == 3
    config = station_file(tmp_path / "u", budget_ms=0.001)
    config["station"]["fail_safe"] = "UNKNOWN"
    run(config, inspector, ListSource(frames(2)))
    assert [r["verdict"] for r in lines(tmp_path / "u" / "out.jsonl")] == ["UNKNOWN"] * 2


def test_a_slow_sink_delays_neither_inspection_nor_the_other_sinks(tmp_path, inspector):
    config = station_file(tmp_path, extra="[sinks.slow]\ndelay_s = 0.5\n")
    config["station"]["drain_s"] = 0.2
    t0 = time.monotonic()
    station = run(config, inspector, ListSource(frames(6)))
    assert time.monotonic() - t0 < 2.5  # six parts through a 0.5 s sink would take 3 s
    assert len(lines(tmp_path / "out.jsonl")) == 6
    slow = next(s for s in station.sinks if s.name == "slow")
    assert slow.count < 6 and station.counts["fail_safe"] == 0
    jsonl = station.metrics.latencies.percentiles("publish:jsonl")
    assert jsonl["n"] == 6 and jsonl["max_ms"] < 400


def test_a_lost_source_is_reconnected_and_its_outage_counted(tmp_path, inspector):
    config = station_file(tmp_path)
    config["source"]["frame_rate"] = 20.0
    source = ListSource(frames(5), lose_at=(2,), gone_s=0.3)
    station = run(config, inspector, source)
    assert [r["frame_id"] for r in lines(tmp_path / "out.jsonl")] == [1, 2, 3, 4, 5]
    c = source.counters
    assert c.reconnects == 1 and c.lost_s >= 0.3 and c.missed_estimate >= 6
    assert station.health()["source"]["reconnects"] == 1


def test_triggered_parts_take_the_next_frame_and_a_trigger_without_one_is_fail_safe(
        tmp_path, inspector):
    config = station_file(tmp_path, budget_ms=300, extra="[trigger]\nkind = 'http'\n")
    source = ListSource(frames(40), period_s=0.02)
    built = build(config, inspector, source)
    station = built.station
    worker = threading.Thread(target=station.run)
    worker.start()
    time.sleep(0.1)
    ids = [station.trigger("http", f"m{i}") for i in range(3)]
    while station.counts["parts"] < 3:
        time.sleep(0.01)
    station.stop()
    worker.join()
    out = lines(tmp_path / "out.jsonl")
    assert [r["part_id"] for r in out] == ids and [r["meas_id"] for r in out] == ["m0", "m1",
                                                                                  "m2"]
    assert len({r["frame_id"] for r in out}) == 3  # three triggers, three distinct frames
    times = [r["trigger_time_ns"] for r in out]
    assert times == sorted(times)
    # A trigger when no frame comes: a verdict anyway, after the budget.
    config = station_file(tmp_path / "b", budget_ms=100, extra="[trigger]\nkind = 'http'\n")
    built = build(config, inspector, ListSource([], period_s=0.0))
    station = built.station
    station.trigger("http", "lonely")
    station.run()  # the empty source ends at once: the pending trigger becomes a part
    (r,) = lines(tmp_path / "b" / "out.jsonl")
    assert (r["verdict"], r["reason"], r["meas_id"]) == ("NG", "no frame", "lonely")


def test_prepare_product_switches_category_and_refuses_unknown(tmp_path, inspector):
    built = build(station_file(tmp_path), inspector, ListSource(frames(1)))
    station = built.station
    assert not station.prepare_product("nope")
    assert not station.prepare_product("washer")  # no threshold fitted for it in the bundle
    assert station.category == CATEGORY


def test_sigterm_lets_every_acquired_part_finish(tiny_bundle_path, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, rgb in enumerate(frames(4)):
        Image.fromarray(rgb).save(folder / f"p{i}.png")
    (tmp_path / "station.toml").write_text(textwrap.dedent(f"""
        [station]
        name = "sig"
        [bundle]
        path = "{tiny_bundle_path}"
        category = "{CATEGORY}"
        image_threshold = 0.5
        [source]
        kind = "folder"
        folder = "in"
        done = "done"
        settle_s = 0
        [sinks.jsonl]
        path = "out.jsonl"
        [http]
        port = 0
        """))
    proc = subprocess.Popen([sys.executable, "-m", "clipinspect.runtime.cli", "station",
                             str(tmp_path / "station.toml")], stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list((tmp_path / "done").glob("*.png"))) < 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "SIGTERM: finishing the parts acquired" in err
    assert [r["part"] for r in lines(tmp_path / "out.jsonl")] == [1, 2, 3, 4]
    assert sorted(os.listdir(tmp_path / "done")) == [f"p{i}.png" for i in range(4)]


def test_http_side_health_metrics_and_trigger(tmp_path, inspector):
    import httpx

    from clipinspect.runtime.station.http import HttpThread, create_app

    config = station_file(tmp_path, budget_ms=2000, extra="[trigger]\nkind = 'http'\n")
    built = build(config, inspector, ListSource(frames(200), period_s=0.02))
    station = built.station
    http = HttpThread(create_app(station, built.feed, "k3y", True), "127.0.0.1", 0)
    port = http.start()
    url = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{url}/readyz").status_code == 503  # no source connected yet
    worker = threading.Thread(target=station.run)
    worker.start()
    try:
        wait_until = time.monotonic() + 10
        while httpx.get(f"{url}/readyz").status_code != 200 and time.monotonic() < wait_until:
            time.sleep(0.05)
        ready = httpx.get(f"{url}/readyz").json()
        assert ready["status"] == "ready" and ready["sinks"]["jsonl"]["up"]
        assert httpx.post(f"{url}/v1/trigger").status_code == 401  # the key is set
        part = httpx.post(f"{url}/v1/trigger", params={"meas_id": "h1"},
                          headers={"X-API-Key": "k3y"}).json()["part_id"]
        while station.counts["parts"] < 1:
            time.sleep(0.01)
        scrape = httpx.get(f"{url}/metrics", headers={"X-API-Key": "k3y"}).text
        assert 'clipinspect_station_parts_total{verdict=' in scrape
        assert 'clipinspect_station_sink_up{sink="jsonl"} 1.0' in scrape
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        # The live page shows the source and each sink's health.
        page = httpx.get(f"{url}/ui/state.json", headers={"X-API-Key": "k3y"}).json()
        assert [h["name"] for h in page["health"]] == ["source list", "sink jsonl",
                                                       "sink journal"]
        assert all(h["up"] for h in page["health"])
    finally:
        station.stop()
        worker.join()
        http.stop()
    (r,) = lines(tmp_path / "out.jsonl")
    assert (r["part_id"], r["meas_id"], r["trigger"]) == (part, "h1", "http")
