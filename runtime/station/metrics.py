"""The station's Prometheus metrics (``/metrics``) and its in-memory latency record."""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

STAGES = ("decode", "queue", "inference", "decision")
BUCKETS = (.005, .01, .025, .05, .1, .15, .2, .3, .5, .75, 1, 1.5, 2, 4, 8)
KEPT = 100_000  # latencies kept per series for percentiles (the benchmark reads them)


class Latencies:
    """Seconds per series (a stage, a sink, ``part``: trigger to the last line sink), the most
    recent ``KEPT`` each."""

    def __init__(self):
        self._lock = threading.Lock()
        self._series: dict[str, deque[float]] = {}

    def add(self, series: str, seconds: float) -> None:
        with self._lock:
            self._series.setdefault(series, deque(maxlen=KEPT)).append(seconds)

    def percentiles(self, series: str, qs=(50, 99)) -> dict[str, float]:
        with self._lock:
            values = np.array(self._series.get(series, ()), np.float64)
        if not values.size:
            return {f"p{q}_ms": float("nan") for q in qs} | {"n": 0}
        return {f"p{q}_ms": float(np.percentile(values, q) * 1e3) for q in qs} | {
            "n": int(values.size), "max_ms": float(values.max() * 1e3)}

    def series(self) -> list[str]:
        with self._lock:
            return sorted(self._series)


class StationMetrics:
    def __init__(self):
        from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                                       disable_created_metrics)
        disable_created_metrics()
        self.registry = r = CollectorRegistry()
        self.parts = Counter("clipinspect_station_parts", "Parts given a verdict, by verdict",
                             ["verdict"], registry=r)
        self.fail_safe = Counter("clipinspect_station_fail_safe",
                                 "Parts given the fail-safe verdict, by reason", ["reason"],
                                 registry=r)
        self.budget_misses = Counter("clipinspect_station_budget_misses",
                                     "Parts whose verdict was not ready within the budget",
                                     registry=r)
        self.stage = Histogram("clipinspect_station_stage_seconds", "Time per stage of a part "
                               "(decode, queue, inference; decision: trigger to verdict)",
                               ["stage"], registry=r, buckets=BUCKETS)
        self.publish = Histogram("clipinspect_station_publish_seconds",
                                 "Trigger to publish, per sink", ["sink"], registry=r,
                                 buckets=BUCKETS)
        self.part = Histogram("clipinspect_station_part_seconds",
                              "Trigger to the last line sink's publish", registry=r,
                              buckets=BUCKETS)
        self.source = Gauge("clipinspect_station_source_frames", "Frames of the source, by kind "
                            "(received, incomplete, dropped, unused, missed_estimate)",
                            ["kind"], registry=r)
        self.reconnects = Gauge("clipinspect_station_source_reconnects",
                                "Times the source was reconnected", registry=r)
        self.source_up = Gauge("clipinspect_station_source_up", "1 while the source is "
                               "connected", registry=r)
        self.queue = Gauge("clipinspect_station_queue_depth", "Parts waiting for inference",
                           registry=r)
        self.sink_up = Gauge("clipinspect_station_sink_up", "1 while a sink publishes",
                             ["sink"], registry=r)
        self.sink_backlog = Gauge("clipinspect_station_sink_backlog",
                                  "Records a sink has not published yet", ["sink"], registry=r)
        self.sink_dropped = Gauge("clipinspect_station_sink_dropped",
                                  "Records a sink dropped (its backlog was full)", ["sink"],
                                  registry=r)
        self.latencies = Latencies()

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)
