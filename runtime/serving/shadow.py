"""A shadow bundle: a candidate scores the same traffic as the active bundle, off the critical
path, so that it can be judged on the line before it is promoted.

After each batch has been answered, the inference worker offers it to the shadow (the loaded
inputs, already decoded). The shadow has its own thread and its own bounded backlog: an offer is
taken only when fewer than ``max_pending`` batches wait, else it is dropped and counted, so the
shadow never delays or changes a served verdict (on a machine short of cores it does compete for
them: docs/operations.md). For each part it compares the two bundles: verdict agreement (where
both have an image threshold), the Pearson correlation of image scores, and the parts whose
verdicts differ, kept (the most recent ``keep``) for review.

:meth:`Shadow.swap` makes the shadow the active bundle and the active one the shadow, between two
batches of the inference worker, after the shadow's backlog has run out; a request queued
meanwhile waits, none is dropped.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from ..core.inspector import InspectionResult, Inspector, LoadedImage


class Shadow:
    def __init__(self, inspector: Inspector, max_pending: int = 2, keep: int = 50):
        self.inspector = inspector
        self.max_pending = max_pending
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="clipinspect-shadow")
        self._lock = threading.Lock()  # the counters, and offers against a swap
        self._pending = 0
        self._swapping = False
        self.scored = self.dropped = self.failed = 0
        self.compared = self.agreed = 0
        self._sums = [0.0] * 5  # n, sum x, sum y, sum xx, sum yy ... and xy below
        self._xy = 0.0
        self.disagreements: deque[dict] = deque(maxlen=keep)

    def offer(self, items: list[tuple[LoadedImage, str, str, str, InspectionResult]]) -> bool:
        """A served batch, as (input, category, mode, image id, active result) per part; False
        when dropped (backlog full, or a swap under way)."""
        with self._lock:
            if self._swapping or self._pending >= self.max_pending:
                self.dropped += len(items)
                return False
            self._pending += 1
        self.worker.submit(self._score, items)
        return True

    def _score(self, items) -> None:
        try:
            inspector = self.inspector
            inspector.refresh()
            results = inspector.inspect_mixed([i[0] for i in items], [(i[1], i[2]) for i in items])
            with self._lock:
                for (loaded, category, _, image_id, active), shadow in zip(items, results):
                    self._compare(category, image_id, active, shadow)
        except Exception:  # the shadow must never take the service down
            with self._lock:
                self.failed += len(items)
        finally:
            with self._lock:
                self._pending -= 1

    def _compare(self, category: str, image_id: str, active: InspectionResult,
                 shadow: InspectionResult) -> None:
        """Caller holds the lock."""
        if not (active.ok and shadow.ok):
            self.failed += 1
            return
        self.scored += 1
        x, y = active.image_score, shadow.image_score
        n, sx, sy, sxx, syy = self._sums
        self._sums = [n + 1, sx + x, sy + y, sxx + x * x, syy + y * y]
        self._xy += x * y
        if active.is_anomalous is None or shadow.is_anomalous is None:
            return
        self.compared += 1
        if active.is_anomalous == shadow.is_anomalous:
            self.agreed += 1
            return
        verdict = {True: "NG", False: "OK"}
        self.disagreements.appendleft({
            "image_id": image_id, "category": category, "time": time.time(),
            "active": {"score": x, "verdict": verdict[active.is_anomalous]},
            "shadow": {"score": y, "verdict": verdict[shadow.is_anomalous]}})

    def correlation(self) -> float | None:
        """Pearson correlation of active and shadow image scores (None below 3 parts or for a
        constant score)."""
        n, sx, sy, sxx, syy = self._sums
        if n < 3:
            return None
        vx, vy = sxx - sx * sx / n, syy - sy * sy / n
        if vx <= 0 or vy <= 0:
            return None
        return (self._xy - sx * sy / n) / math.sqrt(vx * vy)

    def state(self) -> dict:
        with self._lock:
            return {"bundle": self.inspector.bundle.identity, "scored": self.scored,
                    "dropped": self.dropped, "failed": self.failed,
                    "verdicts_compared": self.compared,
                    "verdict_agreement": (self.agreed / self.compared if self.compared
                                          else None),
                    "score_correlation": self.correlation(),
                    "disagreements": list(self.disagreements)}

    def reset(self) -> None:
        with self._lock:
            self.scored = self.dropped = self.failed = self.compared = self.agreed = 0
            self._sums, self._xy = [0.0] * 5, 0.0
            self.disagreements.clear()

    def swap(self, active: Inspector) -> Inspector:
        """Run on the inference worker's thread, between two batches: wait for the shadow's
        backlog, then hand back the shadow's inspector as the new active one and keep
        ``active`` as the shadow. The comparison starts again."""
        with self._lock:
            self._swapping = True
        try:
            self.worker.submit(lambda: None).result()  # everything offered before is scored
            promoted, self.inspector = self.inspector, active
            self.reset()
            return promoted
        finally:
            with self._lock:
                self._swapping = False

    def close(self) -> None:
        self.worker.shutdown(wait=True)
