"""The drift watch of a running service: every inspected part feeds :class:`.drift.DriftMonitor`
(its image score and cheap image statistics, per category and source); an alarm goes to stderr,
the journal's events, ``/metrics`` and the live page (docs/drift.md, docs/operations.md)."""

from __future__ import annotations

import sys
import threading

import numpy as np
from prometheus_client import Counter, Gauge

from ..core.inspector import InspectionResult, LoadedImage
from .drift import DriftMonitor, image_statistics


def tensor_rgb(tensor: np.ndarray, mean, std) -> np.ndarray:
    """The model's input (3, h, w), normalised, back to (h, w, 3) uint8 pixels: the statistics
    are taken on what the model sees, without keeping the decoded image."""
    rgb = (tensor.transpose(1, 2, 0) * np.asarray(std, np.float32)
           + np.asarray(mean, np.float32)) * 255.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


class DriftWatch:
    def __init__(self, registry, journal=None, monitor: DriftMonitor | None = None,
                 name: str = "serve"):
        self.monitor = monitor or DriftMonitor()
        self.journal, self.name = journal, name
        self._lock = threading.Lock()
        self.alarms: list[dict] = []  # the most recent, newest first (the page marks them)
        labels = ["category", "source", "statistic"]
        self.alarm = Gauge("clipinspect_drift_alarm", "1 while a drift alarm is raised",
                           labels, registry=registry)
        self.value = Gauge("clipinspect_drift_statistic", "The drift test's statistic on the "
                           "recent window against the reference", labels, registry=registry)
        self.alarms_raised = Counter("clipinspect_drift_alarms", "Drift alarms raised", labels,
                              registry=registry)

    def observe(self, category: str, source: str, loaded: LoadedImage | None,
                result: InspectionResult, preprocess) -> list:
        """One inspected part (any thread)."""
        if not result.ok:
            return []
        values = {"score": result.image_score}
        if loaded is not None and loaded.tensor is not None:
            values.update(image_statistics(tensor_rgb(loaded.tensor, preprocess.mean,
                                                      preprocess.std)))
        with self._lock:
            raised = self.monitor.update((category, source), values,
                                         judged_ok=result.is_anomalous is not True)
            for row in self.monitor.state():
                key = (row["category"], row["source"], row["statistic"])
                self.alarm.labels(*key).set(1.0 if row["alarm"] else 0.0)
                if row.get("value") is not None:
                    self.value.labels(*key).set(row["value"])
            for a in raised:
                detail = {"category": a.key[0], "source": a.key[1], "statistic": a.statistic,
                          "value": a.value, "p_value": a.p_value, "parts": a.parts,
                          "time": a.time, "detail": a.detail}
                self.alarms.insert(0, detail)
                del self.alarms[50:]
                self.alarms_raised.labels(*a.key, a.statistic).inc()
                print(f"clipinspect {self.name}: DRIFT {a.key[0]}/{a.key[1]}: {a.detail}",
                      file=sys.stderr, flush=True)
                if self.journal is not None:
                    self.journal.event("drift", detail)
        return raised

    def raised(self, key: tuple[str, str]) -> list[str]:
        """The statistics whose alarm is raised now for (category, source)."""
        with self._lock:
            return [row["statistic"] for row in self.monitor.state()
                    if (row["category"], row["source"]) == key and row["alarm"]]

    def state(self) -> dict:
        with self._lock:
            return {"rows": self.monitor.state(), "alarms": list(self.alarms)}


__all__ = ["DriftWatch", "tensor_rgb"]
