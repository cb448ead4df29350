"""MuSc's blind spot, batch mode against streaming mode: a defect that most parts of a pool carry
finds its matches in the other parts and scores low.

Streams of synthetic ``washer`` parts (calibration/synth.py, rendered at the model's input size),
per seed and repeated defect kind (``--repeated``: a hole, then a stain, by default) two streams.
In the *common* stream a run of consecutive parts, from 40 % of the stream to its end
(``--share`` 0.6 of all parts), carries one repeated defect: the same defect at nearly the same
place. It is painted here, since synth.py draws every defect at a random place: one defect image
of synth.py is the template, and its defect pixels (its ground-truth mask) are copied onto fresh
good renders, moved by up to ``--shift`` px (1) per part and axis; a jitter probe re-runs batch
mode on one stream with other shifts. The other parts are good parts and ``--other-rate`` of
them other, varied defects (synth.py's own, at random places, the other kinds in turn). The
*control* stream is the same with the run ``--control-share`` (5 %) long.

Modes, on the same parts:
- batch, whole stream: the stream is one pool, its parts score each other (RsCIN re-scores the
  image scores; the raw scores, the maps' peaks, are reported too);
- batch, windows: pools of ``--window`` consecutive parts, as a line batching its parts would
  score them (a short last window joins the one before);
- streaming: the category's pool seeded with ``--seed-parts`` normal parts, an image threshold
  at ``--fpr`` on held-out normal parts scored against that seed pool
  (runtime/core/thresholds.threshold_at_fpr), then ``Inspector.stream(size=--pool-size)`` and
  one part at a time in stream order: a part judged normal joins the pool, the oldest leaves.

Batch mode has no threshold a line could set in advance (RsCIN min-max normalises each batch),
so its detection rate is read at an oracle threshold: the same FPR rule on the batch's own good
parts' scores, which knows the labels and favours batch mode. With random weights (no weights
can be downloaded here) the features are not CLIP's: the numbers show the mechanism, not the
accuracy to expect on real parts.

    python benchmarks/experiments/musc_blind_spot.py --seeds 5 \\
        --out benchmarks/results/musc_blind_spot_synth
"""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from clipinspect.benchmarks.harness import finish, linked_copy, parser
from clipinspect.benchmarks.report import load_text, machine_text

CATEGORY = "washer"
TEMPLATE_INDEX = 10_000      # the synth.py defect image whose defect is repeated
RUN_START = 0.4              # the repeated run starts at 40 % of the stream
STREAMS = ("common", "control")
MODES = ("batch_stream", "batch_windows", "streaming")
MODE_TEXT = {"batch_stream": "batch, whole stream", "batch_windows": "batch, windows",
             "streaming": "streaming"}


def log(text: str) -> None:
    print(f"musc_blind_spot: {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- the parts
@dataclass
class Stream:
    """Parts in line order: images (N, H, W, 3) uint8, masks (N, H, W) bool, labels
    ("good", "repeated" or the kind of another defect)."""

    name: str
    share: float
    images: np.ndarray
    masks: np.ndarray
    labels: list[str]
    run: tuple[int, int]
    kinds: np.ndarray = field(init=False)

    def __post_init__(self):
        self.kinds = np.array(["good" if x == "good" else "repeated" if x == "repeated"
                               else "other" for x in self.labels])


def repeated_template(kind: str, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    from clipinspect.calibration.synth import render_sample

    return render_sample(CATEGORY, "test", kind, TEMPLATE_INDEX, seed=seed, image_size=size)


def paste(base: np.ndarray, template: tuple[np.ndarray, np.ndarray], shift: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    """The template's defect pixels (its mask), shifted by ``shift`` (dy, dx), on ``base``."""
    image, mask = (np.roll(a, tuple(int(s) for s in shift), axis=(0, 1)) for a in template)
    out = base.copy()
    out[mask] = image[mask]
    return out, mask


def make_stream(name: str, share: float, seed: int, opts, *, kind: str,
                shift: int | None = None) -> Stream:
    """One stream: the repeated run of ``kind`` at RUN_START (moved by up to +-``shift`` px,
    default ``opts.shift``, from part to part), other defects at random other places. The good
    parts and the places of the other defects depend on the seed and the stream's name only."""
    from clipinspect.calibration.synth import DEFECTS, render_sample

    n, size = opts.length, opts.image_size
    shift = opts.shift if shift is None else shift
    rng = np.random.default_rng([seed, STREAMS.index(name)])
    start = int(round(RUN_START * n))
    run = (start, min(n, start + max(1, int(round(share * n)))))
    rest = [i for i in range(n) if not run[0] <= i < run[1]]
    n_other = max(1, int(round(opts.other_rate * len(rest))))
    others = dict(zip(sorted(rng.choice(rest, n_other, replace=False).tolist()),
                      [k for k in DEFECTS if k != kind] * n))
    template = repeated_template(kind, seed, size)
    offset = 100_000 * (1 + STREAMS.index(name))  # parts of the two streams differ
    images, masks, labels = [], [], []
    for i in range(n):
        if i in others:
            image, mask = render_sample(CATEGORY, "test", others[i], offset + i, seed=seed,
                                        image_size=size)
            label = others[i]
        else:
            image, mask = render_sample(CATEGORY, "test", "good", offset + i, seed=seed,
                                        image_size=size)
            label = "good"
            if run[0] <= i < run[1]:
                image, mask = paste(image, template, rng.integers(-shift, shift + 1, 2))
                label = "repeated"
        images.append(image)
        masks.append(mask)
        labels.append(label)
    return Stream(name, share, np.stack(images), np.stack(masks), labels, run)


def normal_parts(seed: int, first: int, count: int, size: int) -> list[np.ndarray]:
    from clipinspect.calibration.synth import render_sample

    return [render_sample(CATEGORY, "train", "good", i, seed=seed, image_size=size)[0]
            for i in range(first, first + count)]


# ------------------------------------------------------------------------------- the modes
def export(work: Path, model: str, pool_size: int) -> Path:
    from clipinspect.export.exporter import ExportOptions, export_bundle

    out = work / "bundle"
    export_bundle(ExportOptions(out=out, model=model, pretrained=None, categories=[CATEGORY],
                                method="musc", method_options={"pool_size": pool_size},
                                warn_random=False))
    return out


def windows(n: int, size: int) -> list[tuple[int, int]]:
    """Consecutive windows of ``size`` parts; a last one shorter than 5 parts (MuSc's least
    pool) or than ``size`` / 2 joins the one before."""
    spans = [(s, min(s + size, n)) for s in range(0, n, size)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < max(5, size / 2):
        spans[-2:] = [(spans[-2][0], n)]
    return spans


def batch_mode(inspector, stream: Stream, window: int | None) -> dict:
    """Both batch modes (the whole stream only where ``window`` is None) from one encoding of
    the stream's parts -> per mode: RsCIN scores, raw scores (the maps' peaks, before RsCIN),
    maps (N, H, W)."""
    from clipinspect.runtime.core.maps import upsample
    from clipinspect.runtime.methods.musc_scoring import map_peaks

    size = tuple(inspector.manifest.preprocess.size)
    _, _, encoded = inspector.encode_all(list(stream.images))
    out, n = {}, len(stream.labels)
    for mode, spans in (("batch_stream", [(0, n)]),
                        ("batch_windows", windows(n, window) if window else None)):
        if spans is None:
            continue
        scores, raw, maps = [], [], []
        for a, b in spans:
            part = {k: v[a:b] for k, v in encoded.items()}
            s, grids, used = inspector.score(part, CATEGORY, "zero-shot")
            assert used == "zero-shot", used
            scores.append(s)
            raw.append(map_peaks(grids, size))
            maps += [upsample(g, stream.images.shape[1:3]) for g in grids]
        out[mode] = {"scores": np.concatenate(scores), "raw": np.concatenate(raw),
                     "maps": np.stack(maps), "windows": [list(s) for s in spans]}
    return out


def seeded_bundle(base: Path, work: Path, seed: int, opts) -> tuple[Path, dict]:
    """A copy of the bundle whose pool holds the seed parts, with the image threshold for
    fp32/few-shot at ``opts.fpr`` on held-out normal parts scored against that pool."""
    from clipinspect.runtime.core.bundle import Bundle
    from clipinspect.runtime.core.inspector import Inspector
    from clipinspect.runtime.core.thresholds import threshold_at_fpr

    path = linked_copy(base, work / f"seeded-{seed}")
    inspector = Inspector.open(path)
    inspector.add_references(CATEGORY, normal_parts(seed, 0, opts.seed_parts, opts.image_size))
    held_out = normal_parts(seed, opts.seed_parts, opts.calibration, opts.image_size)
    scores = np.array([r.image_score for r in inspector.inspect(held_out, CATEGORY,
                                                                  mode="few-shot")])
    t, measured = threshold_at_fpr(scores, opts.fpr)
    record = {"image": t, "method": "held-out normal parts against the seed pool at a target FPR",
              "target_fpr": opts.fpr, "measured_image_fpr": measured, "images": len(scores),
              "seed_parts": opts.seed_parts}
    Bundle.open(path).set_thresholds(CATEGORY, "fp32/few-shot", record)
    return path, {**record, "held_out_scores": _rounded(scores)}


def streaming_mode(seeded: Path, stream: Stream, work: Path, opts) -> dict:
    """The stream one part at a time against the rolling pool (Inspector.stream) -> scores,
    verdicts, maps, which parts entered the pool, the pool's make-up at the end."""
    from clipinspect.runtime.core.inspector import Inspector

    path = linked_copy(seeded, work / f"stream-{stream.name}-{uuid.uuid4().hex[:8]}")
    inspector = Inspector.open(path)
    learner = inspector.stream(save_every=opts.save_every, size=opts.pool_size)
    pool = ["seed"] * opts.seed_parts  # what the pool holds, oldest first (the learner's rule)
    scores, flags, entered, maps, seconds = [], [], [], [], []
    for i, image in enumerate(stream.images):
        before, t0 = learner.added, time.perf_counter()
        (result,) = inspector.inspect(image, CATEGORY, mode="few-shot")
        seconds.append(time.perf_counter() - t0)
        assert result.ok and result.mode == "few-shot", result
        scores.append(result.image_score)
        flags.append(bool(result.is_anomalous))
        maps.append(result.anomaly_map)
        entered.append(learner.added - before == 1)
        if entered[-1]:
            pool = (pool + [stream.kinds[i]])[-opts.pool_size:]
    inspector.close_stream()
    threshold = inspector.thresholds(CATEGORY, "few-shot")["image"]
    shots = inspector.category_data(CATEGORY).shots
    assert shots == len(pool), (shots, len(pool))
    return {"scores": np.array(scores), "flags": np.array(flags), "maps": np.stack(maps),
            "threshold": threshold,
            "entered": np.array(entered), "pool_at_end": {k: pool.count(k) for k in sorted(
                set(pool))}, "state": learner.state(), "seconds_per_part": float(np.median(
                    seconds))}


# ------------------------------------------------------------------------------- the figures
def auroc(kinds: np.ndarray, scores: np.ndarray, positive: str) -> float | None:
    from clipinspect.calibration.metrics import image_auroc

    keep = (kinds == "good") | (kinds == positive)
    y = kinds[keep] == positive
    return float(image_auroc(y, scores[keep])) if y.any() and not y.all() else None


def pixel_auroc(stream: Stream, maps: np.ndarray) -> float | None:
    """Pixel AUROC over the repeated-defect parts and the good parts (all pixels normal)."""
    from clipinspect.calibration.metrics import pixel_auroc as metric

    keep = (stream.kinds == "good") | (stream.kinds == "repeated")
    return float(metric(stream.masks[keep], maps[keep])) if (stream.kinds == "repeated").any() \
        else None


def figures(stream: Stream, scores: np.ndarray, maps: np.ndarray, *, threshold: float,
            flags: np.ndarray | None = None) -> dict:
    """AUROCs, pixel AUROC, and the verdicts at ``threshold`` (``flags``: the mode's own)."""
    kinds = stream.kinds
    flags = scores >= threshold if flags is None else flags
    rate = (lambda k: float(flags[kinds == k].mean()) if (kinds == k).any() else None)
    return {"auroc_repeated_vs_good": auroc(kinds, scores, "repeated"),
            "auroc_other_vs_good": auroc(kinds, scores, "other"),
            "pixel_auroc_repeated": pixel_auroc(stream, maps), "threshold": float(threshold),
            "detected_repeated": rate("repeated"), "detected_other": rate("other"),
            "false_positive_rate_good": rate("good")}


def oracle_threshold(stream: Stream, scores: np.ndarray, fpr: float) -> float:
    """The FPR rule on the batch's own good parts (knows the labels: favours batch mode)."""
    from clipinspect.runtime.core.thresholds import threshold_at_fpr

    return threshold_at_fpr(scores[stream.kinds == "good"], fpr)[0]


def measure(stream: Stream, batch: dict, streaming: dict, fpr: float) -> dict:
    """Per mode: the figures of one stream (batch modes also on their raw scores)."""
    out = {}
    for mode in ("batch_stream", "batch_windows"):
        b = batch[mode]
        out[mode] = figures(stream, b["scores"], b["maps"],
                            threshold=oracle_threshold(stream, b["scores"], fpr))
        raw = figures(stream, b["raw"], b["maps"],
                      threshold=oracle_threshold(stream, b["raw"], fpr))
        out[mode]["raw"] = {k: raw[k] for k in ("auroc_repeated_vs_good",
                                                "auroc_other_vs_good", "detected_repeated")}
        out[mode]["windows"] = b["windows"]
    s = streaming
    out["streaming"] = {**figures(stream, s["scores"], s["maps"], threshold=s["threshold"],
                                  flags=s["flags"]),
                        "entered_pool": {k: int(s["entered"][stream.kinds == k].sum())
                                         for k in ("good", "repeated", "other")},
                        "first_repeated_entered": first_entered(stream, s),
                        "pool_at_end": s["pool_at_end"], "learner": s["state"],
                        "seconds_per_part": s["seconds_per_part"]}
    return out


def first_entered(stream: Stream, streaming: dict) -> dict | None:
    """The first repeated-defect part that joined the pool: its place in the run (0 = the
    run's first part), its score, and the scores of the run's parts before it."""
    a, b = stream.run
    where = np.flatnonzero(streaming["entered"][a:b])
    if not len(where):
        return None
    k = int(where[0])
    return {"place_in_run": k, "score": float(streaming["scores"][a + k]),
            "scores_before": [float(x) for x in streaming["scores"][a:a + k]]}


def jitter_probe(batch_inspector, opts) -> list[dict]:
    """Batch mode, whole stream, on seed 0's common stream with the repeated defect moved by up
    to +-s px from part to part, for each s of ``--probe-shifts`` (the streams use --shift);
    the first of ``--repeated``."""
    rows = []
    for shift in opts.probe_shifts:
        stream = make_stream("common", opts.share, 0, opts, kind=opts.repeated[0], shift=shift)
        b = batch_mode(batch_inspector, stream, None)["batch_stream"]
        row = {"shift_px": shift}
        for key in ("scores", "raw"):
            f = figures(stream, b[key], b["maps"],
                        threshold=oracle_threshold(stream, b[key], opts.fpr))
            row["rscin" if key == "scores" else "raw"] = {
                k: f[k] for k in ("auroc_repeated_vs_good", "auroc_other_vs_good",
                                  "pixel_auroc_repeated", "detected_repeated")}
        rows.append(row)
        log(f"jitter probe +-{shift} px: batch AUROC repeated vs good "
            f"{_fmt(row['rscin']['auroc_repeated_vs_good'])}")
    return rows


def run_seed(batch_inspector, base: Path, work: Path, seed: int, opts) -> dict:
    """Both streams of one seed per repeated kind, in the three modes (``batch_inspector``: on
    the bundle without a pool); one seed pool and threshold for all of them."""
    here = work / f"seed-{seed}"
    here.mkdir(parents=True, exist_ok=True)
    seeded, threshold = seeded_bundle(base, here, seed, opts)
    out = {"seed": seed, "threshold": threshold,
           "kinds": {kind: run_kind(batch_inspector, seeded, here, seed, opts, kind=kind)
                     for kind in opts.repeated}}
    return out


def run_kind(batch_inspector, seeded: Path, here: Path, seed: int, opts, *, kind: str
             ) -> dict:
    out = {"streams": {}}
    for name, share in zip(STREAMS, (opts.share, opts.control_share)):
        t0 = time.perf_counter()
        stream = make_stream(name, share, seed, opts, kind=kind)
        batch = batch_mode(batch_inspector, stream, opts.window)
        streaming = streaming_mode(seeded, stream, here, opts)
        figs = measure(stream, batch, streaming, opts.fpr)
        out["streams"][name] = {
            "share": share, "run": list(stream.run),
            "other_defects": {str(i): x for i, x in enumerate(stream.labels)
                              if x not in ("good", "repeated")},
            "counts": {k: int((stream.kinds == k).sum()) for k in ("good", "repeated", "other")},
            "figures": figs,
            # per part in line order (rounded): the raw batch scores and the streaming ones
            "scores": {"batch_stream_raw": _rounded(batch["batch_stream"]["raw"]),
                       "streaming": _rounded(streaming["scores"])},
            "entered_pool": np.flatnonzero(streaming["entered"]).tolist()}
        log(f"seed {seed} {kind} {name}: " + ", ".join(
            f"{m} AUROC {_fmt(figs[m]['auroc_repeated_vs_good'])}" for m in MODES)
            + f", repeated parts into the pool {figs['streaming']['entered_pool']['repeated']}"
            f" ({time.perf_counter() - t0:.0f} s)")
    return out


def _rounded(x: np.ndarray) -> list[float]:
    return [round(float(v), 5) for v in x]


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def summary(seeds: list[dict], kinds: list[str]) -> dict:
    """Per repeated kind, stream, mode and figure: mean, min and max over the seeds."""
    return {kind: summary_of([s["kinds"][kind] for s in seeds]) for kind in kinds}


def summary_of(seeds: list[dict]) -> dict:
    out: dict = {}
    for name in STREAMS:
        for mode in MODES:
            rows = [s["streams"][name]["figures"][mode] for s in seeds]
            keys = ["auroc_repeated_vs_good", "auroc_other_vs_good", "pixel_auroc_repeated",
                    "detected_repeated", "detected_other", "false_positive_rate_good"]
            got = {k: [r[k] for r in rows if r[k] is not None] for k in keys}
            if mode != "streaming":
                for k in ("auroc_repeated_vs_good", "detected_repeated"):
                    got[f"raw_{k}"] = [r["raw"][k] for r in rows if r["raw"][k] is not None]
            else:
                for k in ("good", "repeated", "other"):
                    got[f"entered_{k}"] = [r["entered_pool"][k] for r in rows]
            out.setdefault(name, {})[mode] = {
                k: {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}
                if v else None for k, v in got.items()}
    return out


def run(opts) -> dict:
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="musc-blind-spot-") as tmp:
        if opts.work:  # a fresh folder inside it: a second run never meets the first's copies
            Path(opts.work).mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="run-", dir=opts.work)) if opts.work else Path(tmp)
        log(f"exporting {opts.model} (random weights), MuSc, pool {opts.pool_size} ...")
        base = export(work, opts.model, opts.pool_size)
        from clipinspect.runtime.core.inspector import Inspector

        batch_inspector = Inspector.open(base)  # no pool stored: batch mode
        seeds = []
        for seed in range(opts.seeds):
            seeds.append(run_seed(batch_inspector, base, work, seed, opts))
            log(f"seed {seed + 1}/{opts.seeds} done ({time.perf_counter() - t_start:.0f} s)")
        probe = jitter_probe(batch_inspector, opts)
    from clipinspect.benchmarks.report import machine

    return {
        "benchmark": "musc_blind_spot", "model": opts.model,
        "weights": "random (seed 0): not CLIP's features; the mechanism, not the accuracy",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "setup": {"category": CATEGORY, "image_size": opts.image_size, "length": opts.length,
                  "share": opts.share, "control_share": opts.control_share,
                  "run_start": RUN_START, "repeated": opts.repeated, "shift_px": opts.shift,
                  "other_rate": opts.other_rate, "window": opts.window,
                  "pool_size": opts.pool_size, "seed_parts": opts.seed_parts,
                  "calibration": opts.calibration, "fpr": opts.fpr,
                  "save_every": opts.save_every, "seeds": opts.seeds},
        "versions": {k: v for k, v in machine()["versions"].items()
                     if k in ("numpy", "onnxruntime", "torch", "open_clip_torch")},
        "summary": summary(seeds, opts.repeated), "jitter_probe": probe, "per_seed": seeds,
        "wall_s": time.perf_counter() - t_start}


# ------------------------------------------------------------------------------- the report
def _range(x: dict | None, digits: int = 3, pct: bool = False) -> str:
    if x is None:
        return "-"
    f = (lambda v: f"{v:.0%}") if pct else (lambda v: f"{v:.{digits}f}")
    return f"{f(x['mean'])} [{f(x['min'])}, {f(x['max'])}]" if x["min"] != x["max"] \
        else f(x["mean"])


def _share(r: dict, name: str) -> float:
    return r["setup"]["share" if name == "common" else "control_share"]


def headline_rows(r: dict) -> list[str]:
    rows = ["| repeated defect | stream | mode | image AUROC, repeated vs good | image AUROC, "
            "other vs good | pixel AUROC, repeated | repeated detected | other detected | good "
            "flagged | repeated parts into the pool |", "|---|---|---|---|---|---|---|---|---|---|"]
    for kind, by_stream in r["summary"].items():
        for name in STREAMS:
            for mode in MODES:
                x = by_stream[name][mode]
                pool = _range(x["entered_repeated"], 1) if mode == "streaming" else "-"
                rows.append(f"| {kind} | {name} ({_share(r, name):.0%}) | {MODE_TEXT[mode]} | "
                            f"{_range(x['auroc_repeated_vs_good'])} | "
                            f"{_range(x['auroc_other_vs_good'])} | "
                            f"{_range(x['pixel_auroc_repeated'])} | "
                            f"{_range(x['detected_repeated'], pct=True)} | "
                            f"{_range(x['detected_other'], pct=True)} | "
                            f"{_range(x['false_positive_rate_good'], pct=True)} | {pool} |")
    return rows


def _first_text(f: dict | None) -> str:
    if f is None:
        return "none"
    before = ", ".join(f"{x:.3f}" for x in f["scores_before"])
    return (f"part {f['place_in_run'] + 1} of the run, score {f['score']:.3f}"
            + (f" (before it: {before})" if before else ""))


def seed_rows(r: dict) -> list[str]:
    rows = ["| seed | repeated defect | stream | parts (good / repeated / other) | batch, whole "
            "stream: AUROC RsCIN / raw | batch, windows: AUROC RsCIN / raw | streaming: AUROC | "
            "streaming: repeated detected | streaming: into the pool (good / repeated / other) "
            "| streaming threshold | first repeated part into the pool |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in r["per_seed"]:
        for kind, k in s["kinds"].items():
            for name in STREAMS:
                st = k["streams"][name]
                f, c = st["figures"], st["counts"]
                e = f["streaming"]["entered_pool"]
                rows.append(
                    f"| {s['seed']} | {kind} | {name} | {c['good']} / {c['repeated']} / "
                    f"{c['other']} | " + " | ".join(
                        f"{_fmt(f[m]['auroc_repeated_vs_good'])} / "
                        f"{_fmt(f[m]['raw']['auroc_repeated_vs_good'])}"
                        for m in ("batch_stream", "batch_windows"))
                    + f" | {_fmt(f['streaming']['auroc_repeated_vs_good'])} | "
                    f"{f['streaming']['detected_repeated']:.0%} | {e['good']} / "
                    f"{e['repeated']} / {e['other']} | {f['streaming']['threshold']:.3f} | "
                    f"{_first_text(f['streaming']['first_repeated_entered'])} |")
    return rows


def probe_rows(r: dict) -> list[str]:
    """The jitter probe's rows and, for comparison, seed 0's common stream at --shift."""
    kind = r["setup"]["repeated"][0]
    main = r["per_seed"][0]["kinds"][kind]["streams"]["common"]["figures"]["batch_stream"]
    rows = [{"shift_px": r["setup"]["shift_px"], "main": True,
             "rscin": main, "raw": {**main["raw"], "pixel_auroc_repeated": None}},
            *r["jitter_probe"]]
    out = ["| repeated defect moved by up to | image AUROC, repeated vs good (RsCIN / raw) | "
           "repeated detected at the oracle threshold (RsCIN / raw) | pixel AUROC, repeated |",
           "|---|---|---|---|"]
    for row in sorted(rows, key=lambda x: x["shift_px"]):
        a, w = row["rscin"], row["raw"]
        out.append(f"| +-{row['shift_px']} px{' (the streams above)' if row.get('main') else ''}"
                   f" | {_fmt(a['auroc_repeated_vs_good'])} / "
                   f"{_fmt(w['auroc_repeated_vs_good'])} | {a['detected_repeated']:.0%} / "
                   f"{w['detected_repeated']:.0%} | {_fmt(a['pixel_auroc_repeated'])} |")
    return out


def setup_text(r: dict) -> list[str]:
    s = r["setup"]
    start, n_rep = round(s["run_start"] * s["length"]), round(s["share"] * s["length"])
    kinds = ", ".join(f"`{k}`" for k in s["repeated"])
    return [
        f"Streams: {s['length']} synthetic `{s['category']}` parts at {s['image_size']} px per "
        f"stream, {s['seeds']} seeds, for each repeated defect ({kinds}). *common*: parts "
        f"{start + 1} to {start + n_rep} (a run of {s['share']:.0%} of the stream, consecutive) "
        "carry one repeated defect: the defect pixels (ground-truth mask) of one synth.py "
        "image of that kind copied onto fresh good renders, moved by up to "
        f"+-{s['shift_px']} px per part and axis (synth.py places each defect at random, so "
        "the script paints the repetition). *control*: the same with a run of "
        f"{s['control_share']:.0%} ({max(1, round(s['control_share'] * s['length']))} parts). "
        f"The other parts are good parts and {s['other_rate']:.0%} other defects (synth.py's "
        "other kinds in turn, each at its own random place). In a seed, the good parts, the "
        "places of the other defects and the repeated defect's template are the same for "
        "every mode.", "",
        "Modes, on the same parts: *batch, whole stream*: the stream is one pool, its parts "
        "score each other and RsCIN re-scores the image scores (`inspect` with no pool stored; "
        "here `encode_all` then `Inspector.score(..., 'zero-shot')`, its two steps, so that "
        "one encoding serves both batch modes); *batch, windows*: pools of "
        f"{s['window']} consecutive parts; *streaming*: the pool seeded with {s['seed_parts']} "
        "normal parts (`add_references`), `Inspector.stream(size="
        f"{s['pool_size']})`, then `inspect(part, mode='few-shot')` one part at a time in line "
        "order: a part judged normal joins the pool, the oldest leaves beyond "
        f"{s['pool_size']}.", "",
        "Thresholds. Streaming: `threshold_at_fpr` at a target FPR of "
        f"{s['fpr']:.0%} on {s['calibration']} held-out normal parts (neither in the seed "
        "pool nor in the stream) scored against the seed pool, stored as the fp32/few-shot "
        "image threshold before the stream starts: what a line can set in advance. (The seed "
        "parts themselves, scored against a pool that holds them, would each find themselves "
        "at distance 0 and put the threshold too low.) Batch: RsCIN min-max normalises every batch, so no threshold can be set in "
        f"advance; its detection rates are read at an *oracle* threshold, the same "
        f"{s['fpr']:.0%} FPR rule on the batch's own good parts' scores (it knows the labels "
        "and favours batch mode; for the windows, on the scores of all windows of a stream "
        "together).", ""]


def outcomes(r: dict, name: str) -> dict:
    """The streaming pool's outcome on every (seed, kind) stream called ``name``: clean (no
    repeated part entered) or poisoned, with the later copies that followed the first one in."""
    clean, poisoned = [], []
    for seed in r["per_seed"]:
        for kind, k in seed["kinds"].items():
            st = k["streams"][name]
            f = st["figures"]["streaming"]
            first = f["first_repeated_entered"]
            if first is None:
                clean.append(f)
                continue
            a, b = st["run"]
            after = a + first["place_in_run"]
            poisoned.append({**f, "later": b - after - 1,
                             "later_in": sum(1 for i in st["entered_pool"] if after < i < b),
                             "label": f"seed {seed['seed']} {kind}"})
    return {"clean": clean, "poisoned": poisoned}


def reading(r: dict) -> list[str]:
    out = []
    for kind, x in r["summary"].items():
        common = x["common"]["batch_stream"]["auroc_repeated_vs_good"]
        out.append(
            f"- {kind}, batch mode, whole stream: image AUROC of the repeated defect against the "
            f"good parts {_range(x['control']['batch_stream']['auroc_repeated_vs_good'])} when "
            f"it is rare (control), {_range(common)} when it is common"
            + (" (below 0.5: the copies score lower than the good parts)"
               if common and common["mean"] < 0.5 else "")
            + "; detected at the oracle threshold "
            f"{_range(x['control']['batch_stream']['detected_repeated'], pct=True)} against "
            f"{_range(x['common']['batch_stream']['detected_repeated'], pct=True)}.")
    o = outcomes(r, "common")
    n = len(o["clean"]) + len(o["poisoned"])
    if o["clean"]:
        out.append(
            f"- Streaming, common stream: in {len(o['clean'])} of {n} streams (seed x defect) no "
            "copy entered the pool; there the repeated defect's AUROC is "
            f"{np.mean([f['auroc_repeated_vs_good'] for f in o['clean']]):.3f} and "
            f"{np.mean([f['detected_repeated'] for f in o['clean']]):.0%} of the copies were "
            "detected at the threshold set in advance.")
    if o["poisoned"]:
        out.append(
            f"- Streaming, common stream: in {len(o['poisoned'])} of {n} streams the pool was "
            "poisoned: one copy scored under the threshold ("
            + "; ".join(f"{p['label']}: part {p['first_repeated_entered']['place_in_run'] + 1} "
                        "of the run" for p in o["poisoned"])
            + "), joined the pool, and then "
            f"{sum(p['later_in'] for p in o['poisoned'])} of the "
            f"{sum(p['later'] for p in o['poisoned'])} copies after it joined too (each copy "
            "in the pool makes the next one match); AUROC "
            f"{np.mean([p['auroc_repeated_vs_good'] for p in o['poisoned']]):.3f}, detected "
            f"{np.mean([p['detected_repeated'] for p in o['poisoned']]):.0%}. Streaming keeps "
            "a repeated defect out only while its copies score above the threshold against a "
            "clean pool; once one gets in, the copies after it find their match.")
    out += control_link(r)
    out.append(
        "- Batch, windows, RsCIN: min-max normalisation per window spreads the scores of a "
        "window in which every part carries the defect over [0, 1], so pooled over windows "
        "some copies rank above the good parts of another window. That is not detection (an "
        "all-good window is spread the same way); the raw scores show what the matching does.")
    return out


def control_link(r: dict) -> list[str]:
    """Whether the common stream's pool stayed clean, against whether streaming detected every
    copy of the same defect (same seed and kind) in the control stream."""
    pairs = [(k["streams"]["control"]["figures"]["streaming"]["detected_repeated"] == 1.0,
              k["streams"]["common"]["figures"]["streaming"]["first_repeated_entered"] is None)
             for seed in r["per_seed"] for k in seed["kinds"].values()]
    caught = [clean for all_caught, clean in pairs if all_caught]
    missed = [clean for all_caught, clean in pairs if not all_caught]
    if not caught or not missed:
        return []
    better = sum(caught) / len(caught) > sum(missed) / len(missed)
    return [f"- Where streaming detected every copy of the rare defect (control, same seed and "
            f"defect), the common stream's pool stayed clean in {sum(caught)} of {len(caught)}; "
            f"where it missed one, in {sum(missed)} of {len(missed)}"
            + (": streaming protects against a common defect about as well as it detects that "
               "defect when it is rare." if better else ".")]


def render(r: dict) -> str:
    s, v = r["setup"], r["versions"]
    versions = "; ".join(f"{k} {v[k]}" for k in ("numpy", "onnxruntime", "torch",
                                                 "open_clip_torch") if k in v)
    key = "raw_auroc_repeated_vs_good"
    raw = [f"{kind}: {_range(x['common']['batch_stream'][key])} (whole stream) and "
           f"{_range(x['common']['batch_windows'][key])} (windows) on the common stream, "
           f"{_range(x['control']['batch_stream'][key])} and "
           f"{_range(x['control']['batch_windows'][key])} on the control"
           for kind, x in r["summary"].items()]
    cost = np.median([k["streams"][n]["figures"]["streaming"]["seconds_per_part"]
                      for seed in r["per_seed"] for k in seed["kinds"].values() for n in STREAMS])
    lines = [
        f"Command: `{r['command']}`", "",
        f"Machine: {machine_text(r['machine'])}; {versions}; load average "
        f"{load_text(r['load_average'])}; {r['date']}; {r['wall_s']:.0f} s.", "",
        f"# MuSc's blind spot: batch mode against streaming mode ({r['model']}, random weights)",
        "",
        "**Random weights** (no weights can be downloaded here): the features are not CLIP's. "
        "The numbers show the mechanism (what a repeated defect does to mutual scoring, and "
        "whether the rolling pool keeps it out), not the accuracy to expect on real parts.", "",
        *setup_text(r),
        "## Results (mean over seeds [min, max])", "", *headline_rows(r), "",
        "Image AUROC: the repeated-defect parts (or the other defects) against the good parts "
        "of the same stream. Pixel AUROC: every pixel of the repeated-defect and good parts. "
        "'good flagged': the false-positive rate on the stream's good parts at the mode's "
        "threshold. Batch rows use the RsCIN image scores (the product's); on the raw scores "
        "(the maps' peaks, before RsCIN) the AUROC of repeated vs good is "
        + "; ".join(raw) + ".", "",
        "## Reading", "", *reading(r), "",
        "## Per seed", "", *seed_rows(r), "",
        "'first repeated part into the pool': the first part of the run judged normal (below "
        "the threshold), which joined the pool; from then on the copies that follow find a "
        "match in the pool.", "",
        *([f"## Jitter probe (batch mode, whole stream, seed 0's common stream, "
           f"{s['repeated'][0]})", "",
           "How exactly the copies must match: the same stream with the repeated defect moved "
           "from part to part by up to the given number of pixels (each axis, uniform).", "",
           *probe_rows(r), ""] if r["jitter_probe"] else []),
        f"Streaming cost: median {cost:.2f} s per part (encoder and scoring against a pool of "
        f"up to {s['pool_size']}, on a shared machine).", ""]
    return "\n".join(lines)


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, out="benchmarks/results/musc_blind_spot_synth")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--seeds", type=int, default=5, help="streams of each kind (default 5)")
    p.add_argument("--length", type=int, default=40, help="parts per stream (default 40)")
    p.add_argument("--share", type=float, default=0.6,
                   help="the repeated run's share of the common stream (default 0.6)")
    p.add_argument("--control-share", type=float, default=0.05,
                   help="the repeated run's share of the control stream (default 0.05)")
    p.add_argument("--other-rate", type=float, default=0.15,
                   help="share of the other parts that carry other defects (default 0.15)")
    p.add_argument("--repeated", type=_names, default=["hole", "stain"],
                   help="synth.py defect kinds repeated, one pair of streams each "
                   "(default hole,stain)")
    p.add_argument("--shift", type=int, default=1, help="the repeated defect moves by up to "
                   "+-SHIFT px from part to part (default 1)")
    p.add_argument("--probe-shifts", type=_ints, default=[0, 2], help="shifts of the jitter "
                   "probe (batch mode, seed 0's common stream; default 0,2; '' for none)")
    p.add_argument("--window", type=int, default=20,
                   help="parts per batch-mode window (default 20)")
    p.add_argument("--pool-size", type=int, default=16,
                   help="the streaming pool's K (default 16)")
    p.add_argument("--seed-parts", type=int, default=8,
                   help="normal parts the streaming pool is seeded with (default 8)")
    p.add_argument("--calibration", type=int, default=20,
                   help="held-out normal parts the streaming threshold is set on (default 20)")
    p.add_argument("--fpr", type=float, default=0.05, help="target FPR (default 0.05)")
    p.add_argument("--save-every", type=int, default=20,
                   help="pool additions between writes (default 20)")
    p.add_argument("--model", default="ViT-S-16", help="open_clip model (default ViT-S-16)")
    p.add_argument("--image-size", type=int, default=224, help="rendered size (default 224)")
    args = p.parse_args(argv)
    if args.length < 10 or args.seeds < 1 or args.window < 5 or args.seed_parts < 4 \
            or args.pool_size < 4 or args.calibration < 2:
        p.error("--length >= 10, --seeds >= 1, --window >= 5, --seed-parts >= 4, "
                "--pool-size >= 4, --calibration >= 2")
    from clipinspect.calibration.synth import DEFECTS

    if not args.repeated or any(k not in DEFECTS for k in args.repeated):
        p.error(f"--repeated: some of {', '.join(DEFECTS)}, comma-separated")
    placeholders = {args.work: "WORK"} if args.work else None
    finish(run(args), args.out, render, script=__file__, argv=argv, placeholders=placeholders)
    return 0


if __name__ == "__main__":
    sys.exit(main())
