"""The drift watch (runtime/serving/drift.py): the image measures, the KS test and its p-value,
and the monitor's reference, window, alarms and hysteresis."""

from __future__ import annotations

import importlib.util
import json
import math
import re

import numpy as np
import pytest

from clipinspect.runtime.serving import drift
from clipinspect.runtime.serving.drift import (DriftMonitor, image_statistics, kolmogorov_sf,
                                               ks_2samp, ks_statistic)

KEY = ("weave", "cam1")


# --------------------------------------------------------------------------- image measures


def texture(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A sharp random texture around mid grey, with a little sensor noise."""
    base = rng.integers(60, 190, (size, size, 3)).astype(np.float32)
    return np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8)


def box_blur(img: np.ndarray) -> np.ndarray:
    f = img.astype(np.float32)
    p = np.pad(f, ((1, 1), (1, 1), (0, 0)), mode="edge")
    out = sum(p[i:i + f.shape[0], j:j + f.shape[1]] for i in range(3) for j in range(3)) / 9
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def test_a_flat_image_has_its_grey_as_brightness_and_no_contrast_or_sharpness():
    s = image_statistics(np.full((40, 50, 3), 100, np.uint8))
    assert s["brightness"] == pytest.approx(100, abs=1e-3)
    assert s["contrast"] == pytest.approx(0, abs=1e-4)
    assert s["sharpness"] == pytest.approx(0, abs=1e-4)


def test_brightness_is_luma_and_follows_the_light():
    green = np.zeros((8, 8, 3), np.uint8)
    green[..., 1] = 255
    assert image_statistics(green)["brightness"] == pytest.approx(0.587 * 255, abs=0.01)
    img = texture(np.random.default_rng(0))
    brighter = np.clip(img.astype(int) + 30, 0, 255).astype(np.uint8)
    assert image_statistics(brighter)["brightness"] > image_statistics(img)["brightness"] + 25


def test_blur_lowers_sharpness_and_contrast_measures_spread():
    img = texture(np.random.default_rng(1))
    sharp, blurred = image_statistics(img), image_statistics(box_blur(img))
    assert blurred["sharpness"] < 0.3 * sharp["sharpness"]
    half = (img // 2 + 64).astype(np.uint8)  # same mean area, half the spread
    assert image_statistics(half)["contrast"] == pytest.approx(sharp["contrast"] / 2, rel=0.05)


def test_a_large_image_is_read_on_a_strided_grid():
    img = texture(np.random.default_rng(2), size=512)
    assert 512 * 512 > drift.MAX_SAMPLES >= 256 * 256
    assert image_statistics(img) == image_statistics(np.ascontiguousarray(img[::2, ::2]))
    with pytest.raises(ValueError):
        image_statistics(np.zeros((10, 10), np.uint8))


# --------------------------------------------------------------------------- the test


@pytest.mark.parametrize("lam, p", [(0.5, 0.963945), (1.0, 0.269999), (1.3581, 0.05),
                                    (1.6276, 0.01), (1.9495, 0.001)])
def test_the_kolmogorov_tail_matches_its_table(lam, p):
    assert kolmogorov_sf(lam) == pytest.approx(p, rel=2e-3)


def test_the_two_series_meet_at_one():
    assert kolmogorov_sf(1 - 1e-9) == pytest.approx(kolmogorov_sf(1 + 1e-9), rel=1e-6)
    assert kolmogorov_sf(0) == 1.0 and kolmogorov_sf(50) == 0.0


def test_the_ks_distance_with_and_without_ties():
    assert ks_statistic(np.array([1.0, 2, 3]), np.array([4.0, 5, 6])) == 1.0
    # Ties across samples: F_a(1) = 1/2, F_b(1) = 1/4; at 2 both are 1.
    assert ks_statistic(np.array([1.0, 1, 2, 2]), np.array([1.0, 2, 2, 2])) == 0.25
    assert ks_statistic(np.array([1.0, 1, 1]), np.array([1.0, 1])) == 0.0


def test_p_values_are_uniform_under_the_null():
    rng = np.random.default_rng(3)
    p = np.array([ks_2samp(rng.standard_normal(200), rng.standard_normal(100))[1]
                  for _ in range(3000)])
    assert 0.035 < np.mean(p < 0.05) < 0.065
    assert 0.004 < np.mean(p < 0.01) < 0.017


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None,
                    reason="scipy is not installed (no extra of the project needs it)")
def test_the_p_value_is_close_to_scipys_exact_one():
    from scipy import stats

    rng = np.random.default_rng(4)
    for shift in (0.0, 0.3, 0.6, 0.9):
        a, b = rng.standard_normal(200), np.round(rng.standard_normal(100) + shift, 2)
        d, p = ks_2samp(a, b)
        ref = stats.ks_2samp(a, b)
        assert d == pytest.approx(ref.statistic, abs=1e-12)
        assert 0.7 < p / ref.pvalue < 1.3, (shift, p, ref.pvalue)


# --------------------------------------------------------------------------- the monitor


def feed(monitor: DriftMonitor, values: dict[str, np.ndarray], ok=None, key=KEY,
         start: int = 0) -> list:
    """Every part of ``values`` (one array per statistic) -> (part index, alarm) pairs."""
    n = len(next(iter(values.values())))
    out = []
    for i in range(n):
        part = {k: float(v[i]) for k, v in values.items()}
        good = True if ok is None else bool(ok[i])
        out += [(start + i, a) for a in monitor.update(key, part, good, now=float(start + i))]
    return out


def stationary(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {"score": rng.standard_normal(n), "brightness": rng.normal(120, 4, n),
            "contrast": rng.gamma(9, 3, n), "sharpness": rng.lognormal(5, 0.3, n)}


def test_a_stationary_stream_raises_nothing():
    rng = np.random.default_rng(5)
    monitor = DriftMonitor()
    assert feed(monitor, stationary(rng, 6000)) == []
    rows = monitor.state()
    assert [r["statistic"] for r in rows] == sorted(drift.STATISTICS)
    assert all(r["checks"] > 500 and not r["alarm"] for r in rows)
    json.dumps(rows)  # JSON-ready as it is


@pytest.mark.parametrize("seed", [6, 7, 8])
def test_a_score_mean_shift_of_one_sd_is_found_within_150_parts(seed):
    rng = np.random.default_rng(seed)
    values = stationary(rng, 1000)
    values["score"][500:] += 1.0
    alarms = feed(DriftMonitor(), values)
    assert [a.statistic for _, a in alarms] == ["score"]
    part, alarm = alarms[0]
    assert 500 <= part < 650
    assert alarm.key == KEY and alarm.parts == part + 1 and alarm.time == part
    assert alarm.p_value < drift.ALPHA and 0 < alarm.value <= 1
    assert alarm.detail.startswith("score drifted: window mean ")
    assert "KS D=" in alarm.detail and "judged NG" in alarm.detail


def image_stream(rng: np.random.Generator, n: int, change=None, start: int = 400) -> dict:
    rows = []
    for i in range(n):
        img = texture(rng)
        if change is not None and i >= start:
            img = change(img)
        rows.append(image_statistics(img))
    return {k: np.array([r[k] for r in rows]) for k in drift.IMAGE_STATISTICS}


def test_brightness_and_blur_raise_their_own_statistic():
    monitor = DriftMonitor(statistics=drift.IMAGE_STATISTICS)
    lighter = feed(monitor, image_stream(np.random.default_rng(9), 600,
                                         lambda im: (im.astype(np.uint8) + 8)), key=("a", "b"))
    assert {a.statistic for _, a in lighter} == {"brightness"}
    assert "brightness drifted" in lighter[0][1].detail
    blurred = feed(monitor, image_stream(np.random.default_rng(10), 600, box_blur),
                   key=("a", "c"))
    assert "sharpness" in {a.statistic for _, a in blurred}
    assert "brightness" not in {a.statistic for _, a in blurred}
    assert all(p < 500 for p, _ in lighter + blurred)


def test_an_alarm_is_raised_once_then_clears_and_can_be_raised_again():
    rng = np.random.default_rng(11)
    score = np.concatenate([rng.standard_normal(500), rng.standard_normal(1000) + 2,
                            rng.standard_normal(500), rng.standard_normal(500) + 2])
    monitor = DriftMonitor(statistics=("score",))
    first = feed(monitor, {"score": score[:1500]})
    assert len(first) == 1 and monitor.state()[0]["alarm"]  # once over 1000 drifted parts
    feed(monitor, {"score": score[1500:2000]}, start=1500)
    row = monitor.state()[0]
    assert not row["alarm"] and row["p_value"] > drift.CLEAR_P  # back, cleared
    again = feed(monitor, {"score": score[2000:]}, start=2000)
    assert len(again) == 1 and again[0][0] >= 2000
    assert monitor.state()[0]["alarms_raised"] == 2


def test_hysteresis_keeps_the_alarm_between_alpha_and_clear_p(monkeypatch):
    """A p-value back over alpha but not over clear_p keeps the alarm raised."""
    monitor = DriftMonitor(reference_size=5, window=5, check_every=1, statistics=("score",))
    p_values = iter([0.5, 1e-7, 1e-3, 0.01, 0.2, 1e-7])
    monkeypatch.setattr(drift, "ks_2samp", lambda a, b: (0.5, next(p_values)))
    for i in range(5):
        monitor.update(KEY, {"score": float(i)}, True)
    raised, alarm = [], []
    for i in range(10):
        raised.append(len(monitor.update(KEY, {"score": float(i)}, True)))
        alarm.append(monitor.state()[0]["alarm"])
    assert raised[4:] == [0, 1, 0, 0, 0, 1]
    assert alarm[4:] == [False, True, True, True, False, True]


def test_missing_none_and_nan_values_are_skipped_and_counted():
    monitor = DriftMonitor(reference_size=5, window=5, statistics=("score", "brightness"))
    for x in (1.0, None, float("nan"), math.inf):
        monitor.update(KEY, {"score": x}, True)
    rows = {r["statistic"]: r for r in monitor.state()}
    assert rows["score"]["skipped"] == 3 and rows["score"]["reference_n"] == 1
    assert rows["brightness"]["skipped"] == 4 and rows["brightness"]["parts"] == 4


def test_parts_judged_ng_stay_out_of_the_reference_but_count_in_the_window():
    rng = np.random.default_rng(12)
    monitor = DriftMonitor(statistics=("score",))
    feed(monitor, {"score": rng.standard_normal(300) + 6}, ok=np.zeros(300))  # all NG
    assert monitor.state()[0]["reference_n"] == 0
    feed(monitor, {"score": rng.standard_normal(300)}, start=300)
    row = monitor.state()[0]
    assert row["reference_full"] and abs(row["reference_mean"]) < 0.3
    # A drift that makes every part look defective is still seen (a window of OK parts only
    # would be empty).
    shifted = feed(monitor, {"score": rng.standard_normal(200) + 3}, ok=np.zeros(200),
                   start=600)
    assert len(shifted) == 1
    ng = re.search(r"; (\d+) of them judged NG$", shifted[0][1].detail)
    assert ng and int(ng.group(1)) >= 10, shifted[0][1].detail


def test_a_key_appearing_late_builds_its_own_reference():
    rng = np.random.default_rng(13)
    monitor = DriftMonitor(statistics=("score",))
    feed(monitor, {"score": rng.standard_normal(1000)})
    late = feed(monitor, {"score": rng.standard_normal(500) + 5}, key=("washer", "cam2"))
    assert late == []  # its own reference is its own (shifted) normal
    rows = {(r["category"], r["source"]): r for r in monitor.state()}
    assert rows[("washer", "cam2")]["reference_mean"] > 4 and rows[KEY]["parts"] == 1000
    assert rows[("washer", "cam2")]["parts"] == 500


def test_memory_is_bounded_and_keys_are_capped():
    rng = np.random.default_rng(14)
    monitor = DriftMonitor(reference_size=50, window=30, statistics=("score",), max_keys=2)
    feed(monitor, {"score": rng.standard_normal(3000)})
    row = monitor.state()[0]
    assert row["reference_n"] == 50 and row["window_n"] == 30
    monitor.update(("b", "s"), {"score": 0.0}, True)
    assert monitor.update(("c", "s"), {"score": 0.0}, True) == [] and monitor.dropped == 1
    assert len(monitor.state()) == 2
    big = np.arange(drift.REFERENCE_CAP * 3, dtype=float)
    monitor.set_reference(KEY, "score", big)
    ref = next(r for r in monitor.state() if r["category"] == KEY[0])
    assert ref["reference_n"] == drift.REFERENCE_CAP
    assert ref["reference_mean"] == pytest.approx(big.mean(), rel=1e-3)


def test_a_given_reference_is_used_until_a_reset_rebuilds_it():
    rng = np.random.default_rng(15)
    monitor = DriftMonitor(statistics=("score",))
    monitor.set_reference(KEY, "score", list(rng.standard_normal(40)) + [None, float("nan")])
    row = monitor.state()[0]
    assert row["reference_given"] and row["reference_n"] == 40
    alarms = feed(monitor, {"score": rng.standard_normal(300) + 2})
    assert alarms and alarms[0][0] < 120  # tested from the first window on
    monitor.reset(KEY)
    row = monitor.state()[0]
    assert (row["reference_n"], row["window_n"], row["alarm"]) == (0, 0, False)
    assert not row["reference_given"]
    assert feed(monitor, {"score": rng.standard_normal(800) + 2}) == []  # the new normal
    with pytest.raises(ValueError):
        monitor.set_reference(KEY, "focus", [1.0] * 10)
    with pytest.raises(ValueError):
        monitor.set_reference(KEY, "score", [1.0, 2.0])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        DriftMonitor(alpha=0.1)  # over clear_p: no hysteresis
    with pytest.raises(ValueError):
        DriftMonitor(check_every=0)
    with pytest.raises(ValueError):
        DriftMonitor().update("weave", {}, True)
