"""Parts: which frame is a part (the trigger), and the part as it moves through the station.

A part is the next frame after a trigger. Free-running (``[trigger] kind = 'free'``), every
``every``-th frame is a part and its latency clock starts at the frame's arrival; otherwise a
trigger (an OPC UA StartSingleJob call, an MQTT message, an HTTP POST, each with the camera's
software trigger when ``kind = 'camera'``) starts the clock and the first frame that arrives
after it is its part. Triggers are served in the order they came; one that gets no frame
within the budget, or is pending when the station stops, still becomes a part, with the
fail-safe verdict (reason ``no frame``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ..core.inspector import LoadedImage
from .sources import Frame


@dataclass
class Part:
    seq: int
    part_id: str
    trigger: str  # free, opcua, mqtt, http, camera
    meas_id: str
    t0: float  # monotonic: the trigger's arrival, or the frame's when free-running
    t0_ns: int  # wall clock of the same moment
    deadline: float
    category: str
    frame: Frame | None = None
    loaded: LoadedImage | None = None
    decoded: float = 0.0  # monotonic: pixels converted and preprocessed
    reason: str = ""  # set when the part cannot be inspected (no frame, overload)
    stamps: dict = field(default_factory=dict)


@dataclass
class Trigger:
    seq: int
    source: str
    meas_id: str
    t0: float
    t0_ns: int


class Triggers:
    """Numbers parts and pairs triggers with frames; thread-safe (triggers arrive on the OPC UA,
    MQTT and HTTP threads, frames on the acquisition thread)."""

    def __init__(self, kind: str, every: int, run_id: str,
                 camera_trigger: Callable[[], None] | None = None):
        self.kind, self.every, self.run_id = kind, every, run_id
        self.camera_trigger = camera_trigger
        self._lock = threading.Lock()
        self._pending: deque[Trigger] = deque()
        self._frames = 0
        self._next = 1
        self.frames_unused = 0

    def part_id(self, seq: int) -> str:
        return f"{self.run_id}-{seq:08d}"

    def _number(self) -> int:
        seq, self._next = self._next, self._next + 1
        return seq

    def fire(self, source: str, meas_id: str = "") -> str:
        """A trigger: -> the id its part will have (OPC UA's job id)."""
        with self._lock:
            t = Trigger(self._number(), source, meas_id, time.monotonic(), time.time_ns())
            self._pending.append(t)
        if self.camera_trigger is not None:
            self.camera_trigger()
        return self.part_id(t.seq)

    def take(self, frame: Frame) -> Trigger | None:
        """The trigger ``frame`` answers, or None if it is not a part."""
        with self._lock:
            if self.kind == "free":
                self._frames += 1
                if (self._frames - 1) % self.every:
                    self.frames_unused += 1
                    return None
                return Trigger(self._number(), "free", "", frame.arrival, frame.arrival_ns)
            if self._pending and self._pending[0].t0 <= frame.arrival:
                return self._pending.popleft()
            self.frames_unused += 1
            return None

    def expired(self, budget_s: float, now: float | None = None) -> list[Trigger]:
        """Triggers older than the budget with no frame yet (every one of them, at a stop:
        ``now = inf``)."""
        now = time.monotonic() if now is None else now
        out = []
        with self._lock:
            while self._pending and now - self._pending[0].t0 > budget_s:
                out.append(self._pending.popleft())
        return out

    @property
    def pending(self) -> int:
        return len(self._pending)
