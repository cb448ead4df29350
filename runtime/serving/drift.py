"""Drift watch of a production line: is the recent stream of parts still like the normal one?

For every key (category, source) and every watched statistic (the image score and three cheap
image measures: brightness, contrast, sharpness), a reference sample of good parts is kept and
the last ``window`` parts are compared with it by a two-sample Kolmogorov-Smirnov test every
``check_every`` parts. A test whose p-value falls under ``alpha`` raises an alarm; the alarm
stays raised until the p-value is back over ``clear_p`` (hysteresis), and only then can that
statistic raise again. docs/drift.md says why this test and these constants, and what they
were measured to give.

Pure numpy and the standard library: the serving code calls it for every part, and the runtime
imports neither scipy nor torch.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

STATISTICS: tuple[str, ...] = ("score", "brightness", "contrast", "sharpness")
IMAGE_STATISTICS: tuple[str, ...] = ("brightness", "contrast", "sharpness")

ALPHA = 1e-5
"""p-value under which a check raises an alarm. Small, because the checks are many and their
windows overlap: docs/drift.md has the false alarms this gives per 10,000 stationary parts."""
CHECK_EVERY = 10
"""Parts between two checks of one (key, statistic); at most this many parts of extra delay."""
CLEAR_P = 0.05
"""p-value over which a raised alarm clears (hysteresis: well above ``ALPHA``)."""
REFERENCE_CAP = 10_000
"""At most this many reference values are kept from :meth:`DriftMonitor.set_reference` (more
are thinned to evenly spaced order statistics, which keeps their distribution)."""
MIN_REFERENCE = 5
MAX_KEYS = 1024
"""Keys beyond this many are not watched (counted in ``DriftMonitor.dropped``): a source name
that comes from a client cannot grow the monitor without bound."""

# BT.601 luma weights: what "brightness" means for a camera's RGB image.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
MAX_SAMPLES = 1 << 16
"""image_statistics reads at most about this many pixels: larger images are sampled on a
regular grid of every s-th row and column (s the smallest step that fits)."""


# --------------------------------------------------------------------------- image measures


def image_statistics(rgb: np.ndarray) -> dict[str, float]:
    """Brightness (mean BT.601 luma, 0..255), contrast (standard deviation of luma) and
    sharpness (variance of the 4-neighbour 3x3 Laplacian of luma) of an H x W x 3 uint8 image.

    Images of more than :data:`MAX_SAMPLES` pixels are read on a strided grid (every s-th row
    and column), so a 512 x 512 image costs well under a millisecond; the sharpness of a
    strided image is that of the image seen at 1/s of its resolution, the same for every part
    of one camera, which is all a drift test against that camera's reference needs.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.shape[0] < 3 or rgb.shape[1] < 3:
        raise ValueError(f"image_statistics wants an H x W x 3 image (H, W >= 3), got shape "
                         f"{rgb.shape}")
    step = max(1, math.ceil(math.sqrt(rgb.shape[0] * rgb.shape[1] / MAX_SAMPLES)))
    sample = rgb[::step, ::step, :3]
    luma = (sample[..., 0] * _LUMA[0] + sample[..., 1] * _LUMA[1]
            + sample[..., 2] * _LUMA[2])
    if sample.shape[0] < 3 or sample.shape[1] < 3:  # a thin strip: no Laplacian
        laplacian = np.zeros(1, dtype=np.float32)
    else:
        laplacian = (luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:]
                     - 4 * luma[1:-1, 1:-1])
    # float32 sums (numpy sums pairwise: relative error ~1e-6 at 65,536 values), half the
    # time of float64 ones.
    return {"brightness": float(luma.mean()), "contrast": float(luma.std()),
            "sharpness": float(laplacian.var())}


# --------------------------------------------------------------------------- the test


def kolmogorov_sf(lam: float) -> float:
    """P(K > lam) for the Kolmogorov distribution: the asymptotic p-value of a KS statistic
    scaled to ``lam = sqrt(n_e) * D``. Two series, each used where it converges fast."""
    if lam <= 0:
        return 1.0
    j = np.arange(1, 101, dtype=np.float64)
    if lam < 1.0:  # the theta-function form: 1 - sqrt(2 pi)/lam sum exp(-(2j-1)^2 pi^2 / 8lam^2)
        terms = np.exp(-((2 * j - 1) ** 2) * math.pi ** 2 / (8 * lam * lam))
        p = 1.0 - math.sqrt(2 * math.pi) / lam * float(terms.sum())
    else:  # 2 sum (-1)^(j-1) exp(-2 j^2 lam^2)
        p = 2.0 * float(np.sum((-1.0) ** (j - 1) * np.exp(-2.0 * j * j * lam * lam)))
    return min(1.0, max(0.0, p))


def ks_statistic(reference_sorted: np.ndarray, sample: np.ndarray) -> float:
    """The two-sample KS distance sup |F_ref - F_sample|, ties handled: both empirical CDFs
    are evaluated (right-continuous) at every distinct value of either sample."""
    sample = np.sort(np.asarray(sample, dtype=np.float64))
    points = np.concatenate([reference_sorted, sample])
    f_ref = np.searchsorted(reference_sorted, points, side="right") / reference_sorted.size
    f_win = np.searchsorted(sample, points, side="right") / sample.size
    return float(np.max(np.abs(f_ref - f_win)))


def ks_2samp(reference: Iterable[float], sample: Iterable[float]) -> tuple[float, float]:
    """(D, p): two-sided two-sample KS test with the asymptotic Kolmogorov p-value, Stephens'
    small-sample correction ``lam = (sqrt(n_e) + 0.12 + 0.11 / sqrt(n_e)) * D`` with
    ``n_e = n m / (n + m)``. With ties (repeated values) the p-value is conservative."""
    ref = np.sort(np.asarray(list(reference) if not isinstance(reference, np.ndarray)
                             else reference, dtype=np.float64))
    win = np.asarray(list(sample) if not isinstance(sample, np.ndarray) else sample,
                     dtype=np.float64)
    if ref.size == 0 or win.size == 0:
        raise ValueError("ks_2samp needs two non-empty samples")
    d = ks_statistic(ref, win)
    en = math.sqrt(ref.size * win.size / (ref.size + win.size))
    return d, kolmogorov_sf((en + 0.12 + 0.11 / en) * d)


# --------------------------------------------------------------------------- the monitor


@dataclass
class DriftAlarm:
    key: tuple[str, str]  # (category, source)
    statistic: str  # "score", "brightness", "contrast" or "sharpness"
    value: float  # the KS statistic D when raised
    p_value: float | None
    parts: int  # parts seen for this key when raised
    time: float
    detail: str  # one line for a person


@dataclass
class _Track:
    """One (key, statistic): its reference, its window and its alarm."""
    window: deque
    judged_ng: deque
    reference: list = field(default_factory=list)
    frozen: np.ndarray | None = None  # the sorted reference once complete
    given: bool = False  # set by set_reference (not built from parts)
    skipped: int = 0
    since_check: int = 0
    checks: int = 0
    d: float | None = None
    p: float | None = None
    alarm: bool = False
    raised_at: float | None = None
    raised: int = 0

    def clear(self) -> None:
        self.window.clear()
        self.judged_ng.clear()
        self.reference, self.frozen, self.given = [], None, False
        self.since_check, self.d, self.p = 0, None, None
        self.alarm, self.raised_at = False, None


def _number(x: float) -> str:
    """A mean as a person reads it: 141, 23.4, 0.0123."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


class DriftMonitor:
    """Per (category, source) and statistic: the first ``reference_size`` parts judged OK (or
    the values given to :meth:`set_reference`) against the last ``window`` parts, every part
    whatever its verdict (see docs/drift.md: a window of OK parts only would go blind exactly
    when a drift makes parts look defective; the rank-based test keeps a few real defects from
    moving it far). Thread-safe: one lock around each call."""

    def __init__(self, reference_size: int = 200, window: int = 100, alpha: float = ALPHA,
                 check_every: int = CHECK_EVERY,
                 statistics: Iterable[str] = STATISTICS, *, clear_p: float = CLEAR_P,
                 max_keys: int = MAX_KEYS):
        if reference_size < MIN_REFERENCE or window < MIN_REFERENCE:
            raise ValueError(f"reference_size and window must be >= {MIN_REFERENCE}, got "
                             f"{reference_size} and {window}")
        if not 0 < alpha < clear_p < 1:
            raise ValueError(f"need 0 < alpha < clear_p < 1, got alpha={alpha}, "
                             f"clear_p={clear_p}")
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.statistics = tuple(statistics)
        if not self.statistics or len(set(self.statistics)) != len(self.statistics):
            raise ValueError(f"statistics must be distinct names, got {self.statistics}")
        self.reference_size, self.window = int(reference_size), int(window)
        self.alpha, self.clear_p, self.check_every = float(alpha), float(clear_p), int(check_every)
        self.max_keys = int(max_keys)
        self.dropped = 0  # updates of keys beyond max_keys, not watched
        self._tracks: dict[tuple[tuple[str, str], str], _Track] = {}
        self._parts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ inputs

    def set_reference(self, key, statistic: str, values: Iterable[float]) -> None:
        """Use ``values`` (e.g. the image scores of threshold fitting) as the reference of
        (``key``, ``statistic``) instead of the first parts judged OK. Non-finite values are
        dropped; more than :data:`REFERENCE_CAP` are thinned to evenly spaced order statistics."""
        key = _key(key)
        if statistic not in self.statistics:
            raise ValueError(f"unknown statistic {statistic!r}; watched: "
                             f"{', '.join(self.statistics)}")
        v = np.asarray([x for x in values if _finite(x)], dtype=np.float64)
        if v.size < MIN_REFERENCE:
            raise ValueError(f"a reference needs at least {MIN_REFERENCE} finite values, got "
                             f"{v.size}")
        v.sort()
        if v.size > REFERENCE_CAP:
            v = v[np.linspace(0, v.size - 1, REFERENCE_CAP).round().astype(int)]
        with self._lock:
            track = self._track(key, statistic)
            if track is None:
                raise ValueError(f"more than {self.max_keys} keys are watched already")
            track.reference, track.frozen, track.given = [], v, True

    def update(self, key, values: Mapping[str, float | None], judged_ok: bool,
               now: float | None = None) -> list[DriftAlarm]:
        """One inspected part of ``key``: its statistics (missing, None or NaN ones are skipped
        and counted) and its verdict. Returns the alarms this part newly raised."""
        key = _key(key)
        now = time.time() if now is None else float(now)
        raised = []
        with self._lock:
            if key not in self._parts and len(self._parts) >= self.max_keys:
                self.dropped += 1
                return []
            self._parts[key] = parts = self._parts.get(key, 0) + 1
            for statistic in self.statistics:
                track = self._track(key, statistic)
                value = values.get(statistic)
                if not _finite(value):
                    track.skipped += 1
                    continue
                alarm = self._add(track, float(value), bool(judged_ok))
                if alarm:
                    raised.append(DriftAlarm(key, statistic, track.d, track.p, parts, now,
                                             self._detail(track, statistic)))
                    track.raised_at = now
        return raised

    def reset(self, key=None) -> None:
        """The operator acknowledges a new normal: the references (given ones too) of ``key``,
        or of every key, are rebuilt from the next parts judged OK; windows and alarms cleared."""
        key = None if key is None else _key(key)
        with self._lock:
            for (k, _), track in self._tracks.items():
                if key is None or k == key:
                    track.clear()

    # ------------------------------------------------------------------ outputs

    def state(self) -> list[dict]:
        """One JSON-ready row per (category, source, statistic)."""
        with self._lock:
            rows = []
            for ((category, source), statistic), t in sorted(self._tracks.items()):
                ref = t.frozen if t.frozen is not None else np.asarray(t.reference)
                rows.append({
                    "category": category, "source": source, "statistic": statistic,
                    "reference_n": int(ref.size), "reference_full": t.frozen is not None,
                    "reference_given": t.given, "window_n": len(t.window),
                    "reference_mean": float(ref.mean()) if ref.size else None,
                    "window_mean": float(np.mean(t.window)) if t.window else None,
                    "value": t.d, "p_value": t.p, "alarm": t.alarm, "raised_at": t.raised_at,
                    "alarms_raised": t.raised, "checks": t.checks, "skipped": t.skipped,
                    "parts": self._parts.get((category, source), 0)})
            return rows

    # ------------------------------------------------------------------ inside

    def _track(self, key: tuple[str, str], statistic: str) -> _Track | None:
        track = self._tracks.get((key, statistic))
        if track is None:
            if key not in self._parts and len(self._parts) >= self.max_keys:
                return None
            self._parts.setdefault(key, 0)
            track = self._tracks[(key, statistic)] = _Track(deque(maxlen=self.window),
                                                            deque(maxlen=self.window))
        return track

    def _add(self, track: _Track, value: float, judged_ok: bool) -> bool:
        """Feed one value; True when it raised the alarm."""
        if track.frozen is None:  # still building the reference: good parts only
            if judged_ok:
                track.reference.append(value)
                if len(track.reference) >= self.reference_size:
                    track.frozen = np.sort(np.asarray(track.reference, dtype=np.float64))
                    track.reference = []
            return False
        track.window.append(value)
        track.judged_ng.append(not judged_ok)
        track.since_check += 1
        if len(track.window) < self.window or track.since_check < self.check_every:
            return False
        track.since_check = 0
        track.checks += 1
        track.d, track.p = ks_2samp(track.frozen, np.fromiter(track.window, np.float64,
                                                              len(track.window)))
        if track.alarm:
            if track.p > self.clear_p:
                track.alarm = False
            return False
        if track.p < self.alpha:
            track.alarm = True
            track.raised += 1
            return True
        return False

    def _detail(self, track: _Track, statistic: str) -> str:
        line = (f"{statistic} drifted: window mean {_number(float(np.mean(track.window)))} vs "
                f"reference {_number(float(track.frozen.mean()))} (KS D={track.d:.2f}, "
                f"p={_p_text(track.p)}, last {len(track.window)} parts)")
        if statistic == "score":
            line += f"; {sum(track.judged_ng)} of them judged NG"
        return line


def _p_text(p: float) -> str:
    return f"{p:.1g}" if p > 0 else "<1e-300"


def _key(key) -> tuple[str, str]:
    if not isinstance(key, (tuple, list)) or len(key) != 2:
        raise ValueError(f"a key is (category, source), got {key!r}")
    return str(key[0]), str(key[1])


def _finite(x) -> bool:
    if x is None or isinstance(x, (str, bytes, bool)):
        return False
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
