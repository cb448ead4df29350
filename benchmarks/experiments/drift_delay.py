"""Drift watch (runtime/serving/drift.py): how many parts it takes to see a drift, and how often
it cries wolf on a stationary line.

Streams of synthetic parts: a pool of normal images of one category is rendered once by the
project's generator (calibration/synth.py, 256 px) and each part is a pool image drawn at
random, flipped at random, with sensor noise (normal, sd 2 grey levels) from a bank of noise
fields. Scores are not computed by a model: good parts' scores are drawn from N(0, 1), and 2 %
of the parts are defective with scores from N(4, 1); a part is judged OK when its score is
under 3. Every stream is watched by a fresh ``DriftMonitor()`` with its defaults.

Drifts, from part ``--onset`` on: (a) a brightness ramp, the scene's intensity falling by 0.1 %
of its value per part; (b) a blur step, the scene blurred by a Gaussian of sigma 1.5 px (before
the noise, as a lens would); (c) and (d) the scores of every part shifted by +0.5 and +1 sd.
The stationary streams have none of them; every alarm they raise is false.

    python benchmarks/experiments/drift_delay.py --parts 3000 --seeds 20 \\
        --out benchmarks/results/drift_delay_cpu
"""

from __future__ import annotations

import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from clipinspect.benchmarks.harness import finish, parser
from clipinspect.benchmarks.report import load_text, machine_text
from clipinspect.runtime.serving import drift
from clipinspect.runtime.serving.drift import DriftMonitor, image_statistics

SIZE = 256
NOISE_SD = 2.0
NOISE_FIELDS = 64
DEFECT_RATE = 0.02
DEFECT_MEAN = 4.0
THRESHOLD = 3.0
RAMP_PER_PART = 0.001
BLUR_SIGMA = 1.5
# drift name -> the statistic it is meant to move
DRIFTS = {"brightness ramp -0.1 %/part": "brightness", "blur step sigma 1.5": "sharpness",
          "score shift +0.5 sd": "score", "score shift +1 sd": "score"}
SCORE_SHIFT = {"score shift +0.5 sd": 0.5, "score shift +1 sd": 1.0}


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an H x W x 3 uint8 image (radius 3 sigma, edges mirrored)."""
    r = int(math.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    f = np.pad(img.astype(np.float32), ((r, r), (r, r), (0, 0)), mode="reflect")
    f = sum(w * f[i:i + img.shape[0]] for i, w in enumerate(k))
    f = sum(w * f[:, i:i + img.shape[1]] for i, w in enumerate(k))
    return np.clip(f + 0.5, 0, 255).astype(np.uint8)


def make_pool(category: str, n: int) -> np.ndarray:
    from clipinspect.calibration.synth import render_sample

    return np.stack([render_sample(category, "train", "good", i, image_size=SIZE)[0]
                     for i in range(n)])


class Parts:
    """The part generator of one run: pool, blurred pool (made on first use), noise bank."""

    def __init__(self, pool: np.ndarray, rng: np.random.Generator):
        self.pool = pool
        self.blurred = None
        self.noise = np.round(rng.normal(0, NOISE_SD, (NOISE_FIELDS, *pool.shape[1:])))
        self.noise = self.noise.astype(np.int16)  # integer noise: half the time of float

    def image(self, rng: np.random.Generator, *, blur: bool = False,
              gain: float = 1.0) -> np.ndarray:
        if blur and self.blurred is None:
            self.blurred = np.stack([gaussian_blur(im, BLUR_SIGMA) for im in self.pool])
        scene = (self.blurred if blur else self.pool)[rng.integers(len(self.pool))]
        if rng.random() < 0.5:
            scene = scene[::-1]
        if rng.random() < 0.5:
            scene = scene[:, ::-1]
        if gain != 1.0:
            f = (scene * np.float32(gain) + np.float32(0.5)).astype(np.int16)
        else:
            f = scene.astype(np.int16)
        f += self.noise[rng.integers(NOISE_FIELDS)]
        return np.clip(f, 0, 255, out=f).astype(np.uint8)


def score(rng: np.random.Generator, shift: float) -> float:
    if rng.random() < DEFECT_RATE:
        return float(rng.normal(DEFECT_MEAN, 1.0)) + shift
    return float(rng.normal(0.0, 1.0)) + shift


def run_stream(parts: Parts, rng: np.random.Generator, n: int, onset: int,
               drift_name: str | None) -> dict:
    """One stream of ``n`` parts; the drift (if any) from part ``onset`` on ->
    {"alarms": [(part index, statistic)], "update_s": time in DriftMonitor.update}."""
    monitor = DriftMonitor()
    key = ("line", "cam")
    alarms, spent = [], 0.0
    for t in range(n):
        on = drift_name is not None and t >= onset
        gain = max(0.0, 1 - RAMP_PER_PART * (t - onset)) if on and "ramp" in drift_name else 1.0
        img = parts.image(rng, blur=on and "blur" in drift_name, gain=gain)
        values = image_statistics(img)
        values["score"] = s = score(rng, SCORE_SHIFT.get(drift_name, 0.0) if on else 0.0)
        t0 = time.perf_counter()
        raised = monitor.update(key, values, s < THRESHOLD, now=float(t))
        spent += time.perf_counter() - t0
        alarms += [(t, a.statistic) for a in raised]
    return {"alarms": alarms, "update_s": spent}


def quantile_text(delays: list[float], q: float, horizon: int) -> str:
    x = float(np.quantile(np.array(delays, dtype=float), q, method="higher"))
    return f"> {horizon}" if math.isinf(x) else f"{x:.0f}"


def poisson_upper(k: int, level: float = 0.95) -> float:
    """The upper one-sided ``level`` confidence bound of a Poisson mean with ``k`` seen."""
    lo, hi = 0.0, 10.0 + 10 * k
    for _ in range(100):
        mid = (lo + hi) / 2
        cdf = sum(math.exp(-mid + i * math.log(mid) - math.lgamma(i + 1)) for i in range(k + 1))
        lo, hi = (mid, hi) if cdf > 1 - level else (lo, mid)
    return hi


def delays_of(streams: list[dict], onset: int, horizon: int) -> dict:
    """Per statistic that fired at or after the onset in any stream: its first alarm's delay
    in each stream (inf where it did not fire within the horizon), and summary figures."""
    fired = sorted({s for st in streams for t, s in st["alarms"] if t >= onset})
    out = {}
    for statistic in fired:
        delays, before = [], 0
        for st in streams:
            times = [t for t, s in st["alarms"] if s == statistic]
            before += any(t < onset for t in times)
            after = [t - onset for t in times if t >= onset]
            delays.append(float(after[0]) if after else math.inf)
        found = [d for d in delays if not math.isinf(d)]
        out[statistic] = {"detected": len(found), "streams": len(streams),
                          "raised_before_onset": before,
                          "median": quantile_text(delays, 0.5, horizon),
                          "p90": quantile_text(delays, 0.9, horizon),
                          "delays": [None if math.isinf(d) else d for d in delays]}
    return out


def false_alarms(streams: list[dict], parts: int) -> dict:
    total = parts * len(streams)
    by_stat = {s: sum(1 for st in streams for _, x in st["alarms"] if x == s)
               for s in drift.STATISTICS}
    k = sum(by_stat.values())
    return {"parts": total, "streams": len(streams), "alarms": k, "by_statistic": by_stat,
            "per_10000_parts": k / total * 1e4,
            "upper_95_per_10000_parts": poisson_upper(k) / total * 1e4}


def costs(pool: np.ndarray, rng: np.random.Generator, repeats: int = 200) -> dict:
    """Median time of image_statistics on a 512 x 512 and a 256 x 256 image (one thread)."""
    big = np.concatenate([np.concatenate([pool[0], pool[-1]], 1)] * 2, 0)
    out = {}
    for name, img in (("512x512", big), ("256x256", pool[0])):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            image_statistics(img)
            times.append(time.perf_counter() - t0)
        out[f"image_statistics_ms_{name}"] = float(np.median(times)) * 1e3
    return out


def run(args) -> dict:
    onset = min(args.onset, args.parts // 2)
    length = min(args.parts, onset + args.horizon)
    t_start = time.perf_counter()
    print(f"drift_delay: rendering {args.pool} normal {args.category} images ...",
          file=sys.stderr, flush=True)
    pool = make_pool(args.category, args.pool)
    parts = Parts(pool, np.random.default_rng(12345))
    stationary, drifted = [], {name: [] for name in DRIFTS}
    spent, n_updates = 0.0, 0
    for seed in range(args.seeds):
        for i, name in enumerate([None, *DRIFTS]):
            n = args.parts if name is None else length
            st = run_stream(parts, np.random.default_rng([seed, i]), n, onset, name)
            (stationary if name is None else drifted[name]).append(st)
            spent, n_updates = spent + st["update_s"], n_updates + n
        print(f"drift_delay: seed {seed + 1}/{args.seeds} done "
              f"({time.perf_counter() - t_start:.0f} s)", file=sys.stderr, flush=True)
    horizon = length - onset
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "setup": {"category": args.category, "pool": args.pool, "image_size": SIZE,
                  "noise_sd": NOISE_SD, "defect_rate": DEFECT_RATE, "threshold": THRESHOLD,
                  "onset": onset, "horizon": horizon, "parts_per_stationary_stream": args.parts,
                  "seeds": args.seeds},
        "monitor": {"reference_size": 200, "window": 100, "alpha": drift.ALPHA,
                    "check_every": drift.CHECK_EVERY, "clear_p": drift.CLEAR_P,
                    "test": "two-sample Kolmogorov-Smirnov, asymptotic p-value"},
        "false_alarms": false_alarms(stationary, args.parts),
        "drifts": {name: {"target": DRIFTS[name], **{"by_statistic": delays_of(
            drifted[name], onset, horizon)}} for name in DRIFTS},
        "costs": {**costs(pool, np.random.default_rng(0)),
                  "update_us_per_part": spent / max(1, n_updates) * 1e6},
        "wall_s": time.perf_counter() - t_start,
    }


def render(r: dict) -> str:
    s, m, fa = r["setup"], r["monitor"], r["false_alarms"]
    lines = [
        "# Drift watch: detection delay and false alarms", "",
        f"Command: `{r['command']}`", "",
        f"Machine: {machine_text(r['machine'])}; numpy {r['versions']['numpy']}; "
        f"load average {load_text(r['load_average'])}; {r['date']}; {r['wall_s']:.0f} s.", "",
        f"Monitor: `DriftMonitor()` defaults: {m['test']}, reference {m['reference_size']} "
        f"parts judged OK, window of the last {m['window']} parts, checked every "
        f"{m['check_every']} parts, alarm at p < {m['alpha']:g}, cleared at p > "
        f"{m['clear_p']:g}.", "",
        f"Parts: a pool of {s['pool']} normal `{s['category']}` images rendered once by "
        f"calibration/synth.py at {s['image_size']} px, each part one of them drawn at random, "
        f"flipped at random, with normal sensor noise (sd {s['noise_sd']:g} grey levels, rounded, one of "
        f"a bank of {NOISE_FIELDS} fields). "
        "Scores are not a model's: good parts' scores are drawn from N(0, 1), "
        f"{s['defect_rate']:.0%} of the parts are defects with scores from N(4, 1), judged OK "
        f"means score < {s['threshold']:g}. Drifts start at part {s['onset']} and are watched "
        f"for {s['horizon']} parts; seeds: {s['seeds']}.", "",
        "## False alarms on a stationary line", "",
        f"{fa['alarms']} alarms in {fa['parts']:,} parts ({fa['streams']} streams of "
        f"{s['parts_per_stationary_stream']:,}): {fa['per_10000_parts']:.2f} per 10,000 parts "
        f"(95 % upper bound {fa['upper_95_per_10000_parts']:.2f}); by statistic: "
        + ", ".join(f"{k} {v}" for k, v in fa["by_statistic"].items()) + ".", "",
        "## Detection delay (parts after the onset)", "",
        "| drift | statistic | detected | median | p90 | raised before onset |",
        "|---|---|---|---|---|---|"]
    for name, d in r["drifts"].items():
        rows = d["by_statistic"] or {d["target"]: None}
        for stat, x in rows.items():
            mark = " (target)" if stat == d["target"] else ""
            lines.append(f"| {name} | {stat}{mark} | " + (
                "0 | - | - | - |" if x is None else
                f"{x['detected']}/{x['streams']} | {x['median']} | {x['p90']} | "
                f"{x['raised_before_onset']} |"))
    c = r["costs"]
    lines += ["", "Median and p90 are over all streams, a stream without an alarm within the "
              f"horizon counting as later than {s['horizon']} (shown '> {s['horizon']}').", "",
              f"Costs: image_statistics {c['image_statistics_ms_512x512']:.2f} ms on 512 x 512 "
              f"(strided), {c['image_statistics_ms_256x256']:.2f} ms on 256 x 256; "
              f"DriftMonitor.update {c['update_us_per_part']:.0f} us per part (four "
              "statistics).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, out=None)
    p.add_argument("--parts", type=int, default=3000,
                   help="parts per stationary stream (default 3000)")
    p.add_argument("--seeds", type=int, default=20, help="streams of each kind (default 20)")
    p.add_argument("--onset", type=int, default=500, help="part where a drift starts "
                   "(default 500; at most half of --parts)")
    p.add_argument("--horizon", type=int, default=600,
                   help="parts watched after the onset (default 600)")
    p.add_argument("--pool", type=int, default=256, help="normal images rendered (default 256)")
    p.add_argument("--category", default="washer", help="synthetic category (default washer)")
    args = p.parse_args(argv)
    if args.parts < 2 or args.seeds < 1 or args.pool < 1:
        p.error("--parts >= 2, --seeds >= 1 and --pool >= 1")
    out = Path(args.out)
    out = out.with_suffix("") if out.suffix == ".json" else out
    finish(run(args), out, render, script=__file__, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
