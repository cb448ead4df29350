"""The station loop: frames in, one verdict per part out to every sink, in part order.

Three kinds of thread. The acquisition thread reads the source (reconnecting with back-off
when it is lost), turns triggered frames into parts, converts and preprocesses their pixels,
and queues them. The inference thread (the caller of :meth:`Station.run`) takes the queued
parts in order, up to ``max_batch`` of one category at a time, inspects them and decides each
verdict; each sink's own thread publishes it (sinks.py), so a slow sink delays nothing else.

The budget: a part's clock starts at its trigger (free-running: its frame's arrival, on the
host). A part whose verdict is not ready within ``budget_ms`` gets the fail-safe verdict
(``fail_safe``, NG by default, never OK) with reason ``timeout``; so does a part that waited
beyond its budget in the queue (not inspected), one whose trigger got no frame in time
(``no frame``), one that could not be inspected (``error: ...``) and one that arrived while
``max_queue`` parts were waiting (``overload``: its pixels are not kept). Every fail-safe is
counted by reason. Publishing is timed separately, per sink, from the same start.

Stopping (:meth:`Station.stop`, SIGTERM): the source is read no more; every part already
acquired is inspected and published; pending triggers become ``no frame`` parts; each sink gets
``drain_s`` to publish what is left (the MQTT outbox keeps the rest on disk).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..core.errors import ClipInspectError
from ..core.inspector import InspectionResult, Inspector
from .metrics import STAGES, StationMetrics
from .parts import Part, Trigger, Triggers
from .sinks import Record, Sink, log
from .sources import Source, SourceEnded, SourceLost

READ_TIMEOUT_S = 0.05


@dataclass
class Settings:
    name: str
    category: str
    mode: str = "auto"
    budget_s: float = 1.0
    fail_safe: str = "NG"
    max_batch: int = 1
    max_queue: int = 16
    drain_s: float = 10.0
    reconnect_max_s: float = 5.0
    frame_rate: float = 0.0  # the configured rate, for the estimate of frames missed while lost
    image_threshold: float | None = None  # overrides the bundle's for ``category``


def image_threshold(inspector: Inspector, category: str, mode: str,
                    override: float | None = None) -> float:
    """The image threshold the station decides ``category`` with: ``override``, else the
    bundle's for this precision and mode; raises if there is none."""
    if override is not None:
        return override
    mode_used = inspector.check(category, mode)
    threshold = inspector.thresholds(category, mode_used).get("image")
    if threshold is None:
        raise ClipInspectError(
            f"category {category!r} has no image threshold for {inspector.precision}/"
            f"{mode_used} in the bundle, so the station cannot decide OK or NG: run 'clipinspect "
            "threshold' on normal images of it, or set [bundle] image_threshold")
    return threshold


class Station:
    def __init__(self, settings: Settings, inspector: Inspector, source: Source,
                 triggers: Triggers, sinks: list[Sink], metrics: StationMetrics | None = None):
        self.settings, self.inspector, self.source = settings, inspector, source
        self.triggers, self.sinks = triggers, sinks
        self.metrics = metrics or StationMetrics()
        self.category = settings.category
        self.mode_used = inspector.check(settings.category, settings.mode)
        self.threshold_of(settings.category)  # raises now if there is none
        self.parts: queue.Queue[Part | None] = queue.Queue()
        self.stopping = threading.Event()
        self.state = "Preoperational"
        self.source_up = False
        self.counts = {"parts": 0, "fail_safe": 0, "budget_misses": 0}
        self._pending_confirmations: dict[int, int] = {}
        self._lock = threading.Lock()
        self.on_state: Callable[[dict], None] = lambda values: None
        self.drift = None  # a serving.drift_watch.DriftWatch (build.py), fed every part
        self._acquirer = threading.Thread(target=self._acquire, name="station-acquisition",
                                          daemon=True)

    # ------------------------------------------------------------------ control
    def threshold_of(self, category: str) -> float:
        s = self.settings
        return image_threshold(self.inspector, category, s.mode,
                               s.image_threshold if category == s.category else None)

    def prepare_product(self, category: str) -> bool:
        """Make ``category`` the active one for the parts acquired from now on (OPC UA's
        PrepareProduct); False if the bundle has no such category or no threshold for it."""
        try:
            self.threshold_of(category)
        except ClipInspectError as e:
            log(f"PrepareProduct {category!r} refused: {e}")
            return False
        self.category = category
        self.on_state({"ActiveProduct": category})
        log(f"active category is now {category!r}")
        return True

    def trigger(self, source: str, meas_id: str = "") -> str:
        return self.triggers.fire(source, meas_id)

    def stop(self) -> None:
        self.stopping.set()

    # ------------------------------------------------------------------ acquisition
    def _acquire(self) -> None:
        wait, lost_at = 0.0, None
        try:
            while not self.stopping.is_set():
                if not self.source_up:
                    wait, lost_at = self._connect(wait, lost_at)
                    continue
                try:
                    frame = self.source.read(READ_TIMEOUT_S)
                except SourceLost as e:
                    log(f"source lost: {e}; reconnecting")
                    self._set_source(False)
                    lost_at = time.monotonic()
                    continue
                except SourceEnded:
                    log("source ended: no more frames")
                    break
                for t in self.triggers.expired(self.settings.budget_s):
                    self._enqueue(t, None, "no frame")
                if frame is None:
                    continue
                t = self.triggers.take(frame)
                if t is not None:
                    self._enqueue(t, frame)
        finally:
            for t in self.triggers.expired(0.0, now=float("inf")):
                self._enqueue(t, None, "no frame")
            self.source.close()
            self._set_source(False)
            self.parts.put(None)

    def _connect(self, wait: float, lost_at: float | None) -> tuple[float, float | None]:
        try:
            self.source.open()
        except SourceLost as e:
            wait = min(max(2 * wait, 0.25), self.settings.reconnect_max_s)
            if wait == 0.25 or wait == self.settings.reconnect_max_s:
                log(f"source unavailable: {e}; trying again every {wait:g} s at most")
            self.stopping.wait(wait)
            return wait, lost_at
        c = self.source.counters
        if lost_at is not None:
            gone = time.monotonic() - lost_at
            c.reconnects += 1
            c.lost_s += gone
            c.missed_estimate += round(gone * self.settings.frame_rate)
            log(f"source reconnected after {gone:.1f} s")
        self._set_source(True)
        return 0.0, None

    def _set_source(self, up: bool) -> None:
        self.source_up = up
        self.state = "Operational" if up else ("Halted" if self.stopping.is_set() else "Error")
        self.on_state({"State": self.state})

    def _enqueue(self, t: Trigger, frame, reason: str = "") -> None:
        part = Part(t.seq, self.triggers.part_id(t.seq), t.source, t.meas_id, t.t0, t.t0_ns,
                    t.t0 + self.settings.budget_s, self.category, frame, reason=reason)
        if frame is not None and not reason:
            if self.parts.qsize() >= self.settings.max_queue:
                part.reason, part.frame = "overload", None
            else:
                part.loaded = self.inspector.load(frame.image, keep_image=True)
                part.decoded = time.monotonic()
        self.parts.put(part)
        self.metrics.queue.set(self.parts.qsize())

    # ------------------------------------------------------------------ inference
    def run(self) -> None:
        """Acquire and inspect until stopped (or a finite source ends), then drain."""
        self._line_sinks = sum(1 for k in self.sinks if k.line)
        for sink in self.sinks:
            sink.start(self._published)
        self._acquirer.start()
        log(f"station {self.settings.name!r} running: {self.source.name} -> "
            f"{', '.join(s.name for s in self.sinks)}; budget "
            f"{self.settings.budget_s * 1e3:g} ms")
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    break
                self._process(batch)
        finally:
            self.stop()
            self._acquirer.join(5)
            self._drain()
            self.inspector.close_stream()

    def _next_batch(self) -> list[Part] | None:
        first = self.parts.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < self.settings.max_batch:
            try:
                nxt = self.parts.queue[0]  # peek: only parts of the same category join
            except IndexError:
                break
            if nxt is None or nxt.category != first.category:
                break
            batch.append(self.parts.get_nowait())
        self.metrics.queue.set(self.parts.qsize())
        return batch

    def _process(self, batch: list[Part]) -> None:
        started = time.monotonic()
        runnable = [p for p in batch if p.loaded is not None and p.loaded.error is None
                    and not p.reason and started < p.deadline]
        results: dict[int, InspectionResult] = {}
        # Operator feedback (memory, thresholds) written since the last batch: this thread is
        # the only one that inspects, so the batch is scored with one memory.
        self.inspector.refresh()
        if runnable:
            out = self.inspector.inspect_loaded([p.loaded for p in runnable], batch[0].category,
                                                self.settings.mode)
            results = {p.seq: r for p, r in zip(runnable, out)}
        finished = time.monotonic()
        for p in batch:
            p.stamps = {"started": started, "finished": finished}
            self._decide(p, results.get(p.seq))

    def _decide(self, p: Part, result: InspectionResult | None) -> None:
        s, now = self.settings, time.monotonic()
        threshold = self.threshold_of(p.category)
        score = result.image_score if result is not None and result.ok else None
        reason = p.reason
        if not reason and p.loaded is not None and p.loaded.error:
            reason = f"error: {p.loaded.error}"
        elif not reason and result is None:
            reason = "timeout"  # waited past its budget in the queue
        elif not reason and now > p.deadline:
            reason = "timeout"
        verdict = s.fail_safe if reason else ("NG" if score >= threshold else "OK")
        record = self._record(p, result, verdict, reason, threshold, now)
        if self.drift is not None:
            key = (p.category, f"station:{s.name}")
            if result is not None and not reason:
                self.drift.observe(*key, p.loaded, result, self.inspector.bundle.preprocess)
            # The statistics in alarm for this part's category and source, on every sink.
            record.payload["drift"] = self.drift.raised(key)
        with self._lock:
            self.counts["parts"] += 1
            if reason:
                self.counts["fail_safe"] += 1
            if reason in ("timeout", "no frame", "overload"):
                self.counts["budget_misses"] += 1
                self.metrics.budget_misses.inc()
            self._pending_confirmations[p.seq] = self._line_sinks
        self.metrics.parts.labels(verdict).inc()
        if reason:
            self.metrics.fail_safe.labels(reason.split(":")[0]).inc()
        for sink in self.sinks:
            sink.put(record)
        self.on_state({"PartsInspected": self.counts["parts"],
                       "BudgetMisses": self.counts["budget_misses"]})
        if p.frame is not None and p.frame.done is not None:
            p.frame.done()

    def _record(self, p: Part, result, verdict: str, reason: str, threshold: float,
                now: float) -> Record:
        st, f = p.stamps, p.frame
        timings = {"decode": (p.decoded - f.arrival) if p.decoded and f else None,
                   "queue": (st["started"] - (p.decoded or p.t0)) if p.loaded else None,
                   "inference": (st["finished"] - st["started"]) if result is not None else None,
                   "decision": now - p.t0}
        for stage in STAGES:
            if timings[stage] is not None:
                self.metrics.stage.labels(stage).observe(timings[stage])
                self.metrics.latencies.add(stage, timings[stage])
        ok = result is not None and result.ok
        score = result.image_score if ok else None
        late = bool(reason) and score is not None
        payload = {
            "schema": "clipinspect.station.result/1", "station": self.settings.name,
            "part": p.seq, "part_id": p.part_id, "trigger": p.trigger, "meas_id": p.meas_id,
            "frame_id": f.frame_id if f else None,
            "camera_timestamp_ns": f.camera_timestamp_ns if f else None,
            "trigger_time_ns": p.t0_ns, "category": p.category,
            "mode": result.mode if ok else None, "verdict": verdict, "reason": reason,
            "image_score": None if late else score,
            "late_image_score": score if late else None,
            "map_max": float(result.anomaly_map.max()) if ok and not late else None,
            "threshold": threshold, "bundle": self.inspector.bundle.identity,
            "precision": self.inspector.precision,
            "latency_ms": {k: None if v is None else round(v * 1e3, 3)
                           for k, v in timings.items()},
        }
        return Record(p.seq, payload, p.t0, result, {"image": threshold}, frame=f)

    def _published(self, sink: Sink, record: Record, at: float) -> None:
        seconds = at - record.t0
        self.metrics.publish.labels(sink.name).observe(seconds)
        self.metrics.latencies.add(f"publish:{sink.name}", seconds)
        if not sink.line:
            return
        with self._lock:
            left = self._pending_confirmations.get(record.seq, 0) - 1
            if left > 0:
                self._pending_confirmations[record.seq] = left
                return
            self._pending_confirmations.pop(record.seq, None)
        self.metrics.part.observe(seconds)
        self.metrics.latencies.add("part", seconds)

    def _drain(self) -> None:
        deadline = time.monotonic() + self.settings.drain_s
        for sink in self.sinks:
            left = sink.stop(max(0.0, deadline - time.monotonic()))
            if left:
                log(f"sink {sink.name}: {left} record(s) not published at shutdown" + (
                    " (kept in the outbox for the next start)" if sink.name == "mqtt" else ""))
        self.state = "Halted"
        log(f"station {self.settings.name!r} stopped: {self.counts['parts']} part(s), "
            f"{self.counts['fail_safe']} fail-safe, {self.counts['budget_misses']} budget "
            "miss(es)")

    # ------------------------------------------------------------------ health
    def refresh_metrics(self) -> None:
        m, c = self.metrics, self.source.counters
        for kind, value in (("received", c.frames), ("incomplete", c.incomplete),
                            ("dropped", c.dropped), ("unused", self.triggers.frames_unused),
                            ("missed_estimate", c.missed_estimate)):
            m.source.labels(kind).set(value)
        m.reconnects.set(c.reconnects)
        m.source_up.set(1 if self.source_up else 0)
        for sink in self.sinks:
            h = sink.health()
            m.sink_up.labels(sink.name).set(1 if h["up"] else 0)
            m.sink_backlog.labels(sink.name).set(h["backlog"])
            m.sink_dropped.labels(sink.name).set(h["dropped"])

    def health(self) -> dict:
        c = self.source.counters
        return {"station": self.settings.name, "state": self.state,
                "category": self.category, "source": {
                    "up": self.source_up, "frames": c.frames, "incomplete": c.incomplete,
                    "dropped": c.dropped, "reconnects": c.reconnects,
                    "missed_estimate": c.missed_estimate},
                "parts": dict(self.counts), "queue": self.parts.qsize(),
                "sinks": {s.name: s.health() for s in self.sinks}}

    def health_rows(self) -> list[dict]:
        """The live page's table: the source, then each sink the line reads."""
        c = self.source.counters
        rows = [{"name": f"source {self.source.name}", "up": self.source_up, "backlog":
                 self.parts.qsize(), "detail": f"{c.frames} frames, {c.incomplete} incomplete, "
                 f"{c.dropped} dropped, {c.reconnects} reconnects; state {self.state}"}]
        for sink in self.sinks:
            if sink.line:
                h = sink.health()
                rows.append({"name": f"sink {sink.name}", "up": h["up"], "backlog": h["backlog"],
                             "detail": h["reason"] or f"{h['published']} published, "
                             f"{h['dropped']} dropped"})
        return rows
