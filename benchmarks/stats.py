"""Statistics of the benchmarks: latency summaries, warm-up exclusion, interleaved rounds with
their medians and ratios, and the stream (fixed frame rate) simulation. Pure functions of
measured or injected timings, so they are tested with timings known in advance."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

PERCENTILES = (50, 90, 95, 99)


def _say(msg: str) -> None:
    print(msg, flush=True)


def summarize(seconds: Sequence[float], warmup: int = 0, images_per_run: int = 1) -> dict:
    """Latency statistics in milliseconds of the runs after the first ``warmup`` ones, and
    throughput (images per second over the median run).

    Percentiles interpolate linearly between order statistics (numpy's default), so p50 of an
    even count is the mean of the two middle runs."""
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    kept = np.asarray(seconds, dtype=np.float64)[warmup:]
    if kept.size == 0:
        raise ValueError(f"no runs left after excluding {warmup} warm-up run(s) of {len(seconds)}")
    ms = kept * 1e3
    out = {"runs": int(kept.size), "warmup_excluded": int(warmup), "mean_ms": float(ms.mean()),
           "max_ms": float(ms.max()), "min_ms": float(ms.min())}
    out.update({f"p{p}_ms": float(np.percentile(ms, p)) for p in PERCENTILES})
    out["images_per_second"] = images_per_run / float(np.median(kept))
    return out


@dataclass
class StreamResult:
    """Per frame: arrival, start and finish times (s, from the first arrival)."""

    fps: float
    deadline_s: float
    arrival: list[float] = field(default_factory=list)
    start: list[float] = field(default_factory=list)
    finish: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        arrival, start, finish = (np.asarray(a) for a in (self.arrival, self.start, self.finish))
        latency = finish - arrival
        queueing = start - arrival
        misses = int(np.count_nonzero(latency > self.deadline_s))
        out = {"frames": int(arrival.size), "fps": self.fps, "deadline_ms": self.deadline_s * 1e3,
               "deadline_misses": misses, "miss_rate": misses / max(arrival.size, 1),
               "queueing_ms": {"mean": float(queueing.mean() * 1e3),
                               "max": float(queueing.max() * 1e3)},
               "latency_ms": {"mean": float(latency.mean() * 1e3),
                              "max": float(latency.max() * 1e3),
                              **{f"p{p}": float(np.percentile(latency, p) * 1e3)
                                 for p in PERCENTILES}},
               "sustained": bool(finish[-1] - arrival[-1] <= self.deadline_s)}
        return out


def run_stream(process: Callable[[int], None], fps: float, frames: int,
               deadline_s: float | None = None,
               clock: Callable[[], float] = time.perf_counter,
               sleep: Callable[[float], None] = time.sleep) -> StreamResult:
    """A camera delivering ``frames`` frames at ``fps`` to one worker that processes them in
    order with ``process(i)``. Frame i arrives at i / fps; it starts when it has arrived and the
    previous frame is done (frames queue, none is dropped). The deadline (default one frame
    period) applies to arrival-to-finish latency. ``clock`` and ``sleep`` are injectable so the
    accounting can be tested with known timings."""
    if fps <= 0 or frames < 1:
        raise ValueError(f"need fps > 0 and frames >= 1, got fps={fps}, frames={frames}")
    period = 1.0 / fps
    result = StreamResult(fps, period if deadline_s is None else deadline_s)
    t0 = clock()
    for i in range(frames):
        arrival = i * period
        now = clock() - t0
        if now < arrival:
            sleep(arrival - now)
            now = clock() - t0
        result.arrival.append(arrival)
        result.start.append(now)
        process(i)
        result.finish.append(clock() - t0)
    return result


def interleaved_rounds(labels: Sequence[str], run: Callable[[int], object], rounds: int,
                       images_per_round: int, *, clock: Callable[[], float] = time.perf_counter,
                       progress: Callable[[str], None] | None = None
                       ) -> tuple[list[list[float]], list[float]]:
    """Time ``run(i)`` for every variant ``labels[i]`` in turn, ``rounds`` times (after the
    caller's warm-up), so that a drifting machine's noise hits every variant alike ->
    (seconds per round per variant, median images/s per variant)."""
    if rounds < 1 or images_per_round < 1:
        raise ValueError(f"need rounds >= 1 and images_per_round >= 1, got rounds={rounds}, "
                         f"images_per_round={images_per_round}")
    times: list[list[float]] = [[] for _ in labels]
    for r in range(rounds):
        for i, label in enumerate(labels):
            t0 = clock()
            run(i)
            times[i].append(clock() - t0)
            (progress or _say)(f"round {r + 1}/{rounds} {label}: "
                               f"{images_per_round / times[i][-1]:.3f} img/s")
    return times, [images_per_round / statistics.median(t) for t in times]


def ratios(rates: Mapping[str, float], base: str) -> dict[str, float]:
    """Each rate over the rate of ``base`` (a key of ``rates``)."""
    if base not in rates:
        raise ValueError(f"no rate for the base {base!r}; measured: {', '.join(rates)}")
    return {k: v / rates[base] for k, v in rates.items()}
