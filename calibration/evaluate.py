"""``clipinspect eval``: accuracy, agreement with FP32 and speed per category, precision and
number of reference shots, on MVTec AD or VisA style data.

Test images are encoded once per precision and scored for every shot count. Pixel metrics are
computed at ``pixel_size`` x ``pixel_size`` (maps upsampled from the patch grid, masks resized
nearest-neighbour), as common in the literature, to bound memory. Each category's result is
written as soon as it is done; a rerun with the same settings reuses it (``resume``), and a
failure in one category is recorded without losing the others.

A method whose zero-shot images score each other (MuSc, ``Inspector.pool_scored``) is scored
in zero-shot once the category's whole test set is encoded: the test set is the pool, as in the
published batch mode; ``pool_size`` splits it into consecutive pools of at most that many
images (``pool_spans``). Its k-shot runs score each test image against a pool of k normal
training images (streaming mode), batch by batch like every other method.
"""

from __future__ import annotations

import json
import shlex
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from clipinspect.runtime import Bundle, Inspector
from clipinspect.runtime.core.bundle import atomic_write_bytes
from clipinspect.runtime.core.errors import UsageError, did_you_mean
from clipinspect.runtime.core.maps import upsample
from clipinspect.runtime.core.names import ZERO_SHOT
from clipinspect.runtime.core.progress import Progress
from clipinspect.runtime.methods.musc_scoring import MIN_OTHERS

from .datasets import dataset_categories, load_dataset, load_mask
from .metrics import average_precision, f1_max, image_auroc, pixel_auroc, pro_auc

METRICS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max",
           "pro")
#: The fewest images a pool-scored method scores together: each against MIN_OTHERS others.
MIN_POOL = MIN_OTHERS + 1


@dataclass(frozen=True)
class EvalOptions:
    """What ``clipinspect eval`` measures, and how.

    fmt: dataset layout, "auto", "mvtec" or "visa". categories: None for all in the data.
    shots: reference counts (0 = zero-shot). pixel_size: side of the pixel metrics' grid.
    resume: reuse categories already in the report directory with the same settings.
    pool_size: for a method whose zero-shot images score each other (MuSc), the most test
    images in one pool (None: each category's whole test set is one pool); refused for others.
    """

    fmt: str = "auto"
    categories: Sequence[str] | None = None
    precisions: Sequence[str] = ("fp32",)
    shots: Sequence[int] = (0,)
    batch_size: int = 8
    pixel_size: int = 256
    provider: str = "cpu"
    resume: bool = True
    threads: int | None = None  # onnxruntime intra-op threads (None: one per physical core)
    pool_size: int | None = None


def _safe(fn, *args) -> float | None:
    """A metric that is undefined for this data (one class only) is reported as None."""
    try:
        return float(fn(*args))
    except ValueError:
        return None


def metrics(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray) -> dict:
    """labels (N,), scores (N,), masks (N, S, S) bool, maps (N, S, S) -> the METRICS."""
    return {"image_auroc": _safe(image_auroc, labels, scores),
            "image_ap": _safe(average_precision, labels, scores),
            "image_f1_max": _safe(f1_max, labels, scores),
            "pixel_auroc": _safe(pixel_auroc, masks, maps),
            "pixel_ap": _safe(average_precision, masks, maps),
            "pixel_f1_max": _safe(f1_max, masks, maps),
            "pro": _safe(pro_auc, masks, maps)}


def shots_refused(inspector: Inspector, shots: int) -> str | None:
    """Why ``inspector`` cannot score with ``shots`` reference images (None if it can), as the
    bundle's method says (AprilLab's few-shot score, normalised by the references' own map
    spread, needs two of them; MuSc's pool at least 4 parts), starting '<shots>-shot skipped'
    (the study and ``clipinspect eval`` find the reason by these words)."""
    refused = inspector.bundle.method.shots_refused(shots)
    prefix = f"{shots}-shot skipped"
    if refused is None or refused.startswith(prefix):
        return refused
    return f"{prefix}: {refused}"


def pool_spans(n: int, pool_size: int | None) -> list[tuple[int, int]]:
    """The consecutive pools [start, end) ``n`` test images are scored in by a pool-scored
    method: at most ``pool_size`` each (None: one pool of all), a last one of fewer than
    MIN_POOL images merged into the one before (as the published ``divide_num`` splits a test
    set, here by size)."""
    size = n if pool_size is None else max(int(pool_size), 1)
    spans = [(s, min(s + size, n)) for s in range(0, n, max(size, 1))]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < MIN_POOL:
        spans[-2:] = [(spans[-2][0], n)]
    return spans


def pools_note(sizes: Sequence[int], pool_size: int | None) -> str | None:
    """What ``pool_spans`` did, in words, when it split or merged (None for one whole pool)."""
    if pool_size is None or (len(sizes) == 1 and sizes[0] <= pool_size):
        return None
    text = (f"0-shot: the {sum(sizes)} test images scored in {len(sizes)} pool(s) of at most "
            f"{pool_size} ({' + '.join(map(str, sizes))})")
    if sizes[-1] > pool_size:
        text += (f"; the last {sizes[-1] - pool_size} merged into the pool before, since a pool "
                 f"scores at least {MIN_POOL} images together")
    return text


def _memories(inspector: Inspector, options: EvalOptions, train: list, notes: list[str]
              ) -> dict[int, dict | None]:
    """{shots: reference memory (None for zero-shot)} of the shot counts that can run; the
    others are noted with the reason."""
    memories: dict[int, dict | None] = {}
    for k in sorted(set(options.shots)):
        refused = shots_refused(inspector, k)
        if k == 0:
            memories[0] = None
        elif refused:
            if refused not in notes:
                notes.append(refused)
        elif k > len(train):
            notes.append(f"{k}-shot skipped: only {len(train)} normal training images")
        else:
            memories[k] = inspector.build_memory([s.path for s in train[:k]],
                                                 options.batch_size)[0]
    return memories


@dataclass
class Scored:
    """One precision's scores of a category's test set: per shot count, image scores (NaN where
    unscored), maps at the pixel metrics' size and seconds; ``seconds["encode"]``; unreadable
    images; zero-shot pool sizes (pool-scored methods) and shot counts that could not run."""

    scores: dict[int, np.ndarray]
    maps: dict[int, np.ndarray]
    seconds: dict
    failed: list[str]
    pools: list[int] | None = None
    skipped: dict[int, str] = field(default_factory=dict)

    def put(self, k: int, rows: Sequence[int], scores: np.ndarray, grids: np.ndarray) -> None:
        size = self.maps[k].shape[1:]
        for j, i in enumerate(rows):
            self.scores[k][i] = scores[j]
            self.maps[k][i] = upsample(grids[j], size)


def score_test_set(inspector: Inspector, category: str, paths: list, memories: dict,
                   options: EvalOptions, bar: Progress) -> Scored:
    """Encode the test images once and score them for every shot count: batch by batch, except
    a pool-scored method's zero-shot, which waits for the whole set (``score_pools``)."""
    n, size = len(paths), (options.pixel_size, options.pixel_size)
    done = Scored({k: np.full(n, np.nan) for k in memories},
                  {k: np.zeros((n, *size), np.float32) for k in memories},
                  {k: 0.0 for k in memories}, [])
    pooled = 0 in memories and inspector.pool_scored(ZERO_SHOT)
    rows: list[int] = []
    chunks: dict[str, list[np.ndarray]] = {}
    encode_before = inspector.stage_seconds["encode"]
    for batch, good, encoded in inspector.iter_encoded(paths, options.batch_size):
        done.failed += [f"{b.source}: {b.error}" for b in batch if b.error]
        if pooled and encoded is not None:
            for key, value in inspector.backend.to_host(encoded).items():
                chunks.setdefault(key, []).append(value)
            rows += [b.index for b in good]
        for k, memory in memories.items():
            if encoded is None or (pooled and k == 0):
                continue
            t0 = time.perf_counter()
            s, grids, _ = inspector.score(encoded, category,
                                          "few-shot" if k else "zero-shot", memory)
            done.seconds[k] += time.perf_counter() - t0
            done.put(k, [b.index for b in good], s, grids)
        bar.update(len(batch))
    done.seconds["encode"] = inspector.stage_seconds["encode"] - encode_before
    if pooled:
        score_pools(inspector, category, rows, chunks, options.pool_size, done)
    return done


def score_pools(inspector: Inspector, category: str, rows: list[int], chunks: dict,
                pool_size: int | None, done: Scored) -> None:
    """Zero-shot of a pool-scored method: the usable test images ``rows`` (their encoder
    outputs in ``chunks``, in order) scored pool by pool (``pool_spans``), each pool's images
    against each other; fewer than MIN_POOL usable images cannot be scored."""
    if len(rows) < MIN_POOL:
        done.skipped[0] = (f"0-shot skipped: {len(rows)} usable test image(s); "
                           f"{inspector.manifest.method} scores at least {MIN_POOL} together")
        return
    outputs = {key: np.concatenate(parts) for key, parts in chunks.items()}
    spans = pool_spans(len(rows), pool_size)
    for start, end in spans:
        t0 = time.perf_counter()
        s, grids, _ = inspector.score({key: v[start:end] for key, v in outputs.items()},
                                      category, "zero-shot")
        done.seconds[0] += time.perf_counter() - t0
        done.put(0, rows[start:end], s, grids)
    done.pools = [end - start for start, end in spans]


def evaluate_category(inspectors: dict[str, Inspector], root: Path, category: str,
                      options: EvalOptions, bar: Progress) -> dict:
    fmt = options.fmt
    test = load_dataset(root, fmt, [category], split="test")
    train = [s for s in load_dataset(root, fmt, [category], split="train") if not s.is_anomalous]
    size = (options.pixel_size, options.pixel_size)
    labels = np.array([s.is_anomalous for s in test])
    masks = np.stack([load_mask(s, size=size) for s in test])
    out: dict = {"images": len(test), "anomalous": int(labels.sum()), "runs": {}, "notes": []}
    fp32_maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for precision, inspector in inspectors.items():
        memories = _memories(inspector, options, train, out["notes"])
        done = score_test_set(inspector, category, [s.path for s in test], memories, options,
                              bar)
        scores, maps, seconds = done.scores, done.maps, done.seconds
        if done.failed:
            out["notes"].append(f"{precision}: {len(done.failed)} unreadable image(s) left "
                                f"out, e.g. {done.failed[0]}")
        _note_pools(out, done, options.pool_size)
        for k in memories:
            if k in done.skipped:
                continue
            ok = ~np.isnan(scores[k])
            run = metrics(labels[ok], scores[k][ok], masks[ok], maps[k][ok])
            run["images_per_second"] = int(ok.sum()) / max(seconds["encode"] + seconds[k], 1e-9)
            if precision == "fp32":
                fp32_maps[k] = (scores[k], maps[k])
            elif k in fp32_maps:
                ref_scores, ref_maps = fp32_maps[k]
                run["map_pearson_vs_fp32"] = float(np.corrcoef(ref_maps[ok].ravel(),
                                                               maps[k][ok].ravel())[0, 1])
                run["max_image_score_diff_vs_fp32"] = float(np.abs(ref_scores[ok] -
                                                                   scores[k][ok]).max())
            out["runs"][f"{precision}/{k}-shot"] = run
    return out


def _note_pools(out: dict, done: Scored, pool_size: int | None) -> None:
    """A pool-scored zero-shot's pools (``out["pools"]``, their sizes) and what splitting or a
    too-small test set did, noted once per category."""
    notes = list(done.skipped.values())
    if done.pools is not None:
        out["pools"] = done.pools
        notes.append(pools_note(done.pools, pool_size))
    for note in notes:
        if note and note not in out["notes"]:
            out["notes"].append(note)


def check_categories(b: Bundle, categories: Sequence[str]) -> None:
    """Refuse categories the bundle has no text embeddings for, each with the bundle's closest
    name (a typo) and the command that adds it."""
    known = b.manifest.categories
    missing = [c for c in categories if c not in known]
    if missing:
        named = ", ".join(f"{c!r}{did_you_mean(c, known)}" for c in missing)
        command = shlex.join(["clipinspect", "add-category", str(b.root), *missing])
        raise UsageError(f"the bundle has no text embeddings for {named}; add them with: "
                         f"{command}; or pass --categories with the bundle's: "
                         f"{', '.join(sorted(known)) or 'none'}")


def check_pool_size(b: Bundle, pool_size: int | None) -> bool:
    """Whether the bundle's method scores zero-shot images against each other (as
    ``Inspector.pool_scored``); a pool size is refused for the other methods, and below
    MIN_POOL."""
    pooled = b.method.scorer is not None
    if pool_size is None:
        return pooled
    if not pooled:
        raise UsageError(f"--pool-size {pool_size}: only a method whose images score each "
                         f"other (musc) is scored in pools; this bundle's method is "
                         f"{b.manifest.method!r}, which scores each image alone: drop "
                         "--pool-size")
    if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < MIN_POOL:
        raise UsageError(f"--pool-size {pool_size!r}: a pool scores at least {MIN_POOL} images "
                         f"together (each against {MIN_OTHERS} others); give {MIN_POOL} or "
                         "more, or leave it out for the whole test set")
    return pooled


def evaluate(bundle: str | Path, data: str | Path, out: str | Path,
             options: EvalOptions = EvalOptions()) -> dict:
    """Evaluate, write ``out``/report.json, report.md, report.png (with matplotlib; the returned
    report's ``plot_drawn`` says whether it was) and one file per category under
    ``out``/categories, and return the report."""
    fmt, provider = options.fmt, options.provider
    out = Path(out)
    (out / "categories").mkdir(parents=True, exist_ok=True)
    b = Bundle.open(bundle)
    categories = list(options.categories or dataset_categories(data, fmt))
    check_categories(b, categories)
    pooled = check_pool_size(b, options.pool_size)
    # FP32 first: the other precisions are compared against it.
    wanted = sorted(dict.fromkeys(options.precisions), key=lambda p: p != "fp32")
    skipped = {p: f"the bundle has no {p} graphs" for p in wanted if p not in b.precisions}
    inspectors = {p: Inspector.open(b, p, provider, options.threads) for p in wanted
                  if p not in skipped}
    config = {"bundle": b.identity, "data": str(Path(data).resolve()), "format": fmt,
              "precisions": list(inspectors), "shots": sorted(set(options.shots)),
              "batch_size": options.batch_size, "pixel_size": options.pixel_size,
              "provider": provider,
              # Only when set: speed depends on it, and reports without it still resume.
              **({"threads": options.threads} if options.threads else {}),
              # Only for a pool-scored method (None: each category's whole test set).
              **({"pool_size": options.pool_size} if pooled else {})}
    report = {"config": config, "skipped_precisions": skipped, "categories": {}}
    todo = []
    for c in categories:
        path = out / "categories" / f"{c.replace(' ', '_')}.json"
        previous = json.loads(path.read_text()) if options.resume and path.is_file() else None
        if previous and previous.get("config") == config and "error" not in previous:
            report["categories"][c] = previous["result"]
        else:
            todo.append((c, path))
    total = sum(len(load_dataset(data, fmt, [c], "test")) for c, _ in todo) * len(inspectors)
    with Progress(total, "eval") as bar:
        for c, path in todo:
            try:
                result = evaluate_category(inspectors, Path(data), c, options, bar)
                record = {"config": config, "result": result}
            except Exception as e:  # one broken category must not lose the others
                result = {"error": f"{type(e).__name__}: {e}"}
                record = {"config": config, "result": result, "error": traceback.format_exc()}
            atomic_write_bytes(path, (json.dumps(record, indent=1) + "\n").encode())
            report["categories"][c] = result
    report["mean"] = mean_over_categories(report["categories"])
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(out / "report.md", render_markdown(report).encode())
    report["plot_drawn"] = chart(report, out / "report.png")  # not in report.json
    return report


def mean_over_categories(categories: dict) -> dict:
    runs: dict[str, dict[str, list[float]]] = {}
    for result in categories.values():
        for name, run in result.get("runs", {}).items():
            for key, value in run.items():
                if value is not None:
                    runs.setdefault(name, {}).setdefault(key, []).append(value)
    return {name: {k: float(np.mean(v)) for k, v in values.items()} for name, values in runs.items()}


def _fmt(value, pct: bool = True) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}" if pct else f"{value:.3g}"


def _fmt4(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def render_markdown(report: dict) -> str:
    c = report["config"]
    lines = ["# clipinspect evaluation", "",
             f"Bundle `{c['bundle']}`, data `{c['data']}` ({c['format']}), provider {c['provider']}, "
             f"batch {c['batch_size']}, pixel metrics at {c['pixel_size']}x{c['pixel_size']}. "
             "Metrics in percent; PRO integrated to FPR 0.3 (official MVTec definition); "
             "images/s = encoder + scoring head, decoding excluded.", ""]
    if "pool_size" in c:
        lines += [pools_text(report), ""]
    for p, why in report["skipped_precisions"].items():
        lines.append(f"- {p} skipped: {why}")
    header = ("| category | run | image AUROC | image AP | image F1-max | pixel AUROC | pixel AP | "
              "pixel F1-max | PRO | images/s | map Pearson vs FP32 | max score diff vs FP32 |")
    lines += ["", header, "|" + "---|" * 12]
    rows = list(report["categories"].items()) + [("**mean**", {"runs": report["mean"]})]
    for name, result in rows:
        if "error" in result:
            lines.append(f"| {name} | failed: {result['error']} |" + " |" * 10)
            continue
        for run_name, r in result["runs"].items():
            lines.append("| " + " | ".join([name, run_name] + [_fmt(r.get(m)) for m in METRICS] + [
                _fmt(r.get("images_per_second"), False), _fmt4(r.get("map_pearson_vs_fp32")),
                _fmt(r.get("max_image_score_diff_vs_fp32"), False)]) + " |")
    notes = [f"- {n}: {note}" for n, r in report["categories"].items() for note in r.get("notes", [])]
    return "\n".join(lines + ([""] + notes if notes else []) + [""])


def pools_text(report: dict) -> str:
    """How a pool-scored method's images were scored, with each category's pools."""
    size = report["config"]["pool_size"]
    where = ("each category's whole test set in one pool" if size is None else
             f"each category's test set in consecutive pools of at most {size} images")
    pools = [f"{name} {' + '.join(map(str, r['pools']))}"
             for name, r in report["categories"].items() if r.get("pools")]
    return (f"Zero-shot: the images score each other (batch mode), {where}"
            + (f" (pools: {', '.join(pools)})" if pools else "") + "; k-shot: each test image "
            "scored against a pool of k normal training images (streaming mode).")


PLOTS_EXTRA = "install the plots extra (pip install 'clipinspect[plots]')"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend; None where matplotlib (the plots extra) is
    not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_note(name: str, drawn: bool) -> str | None:
    """None where the plot ``name`` was drawn, else one line saying why not (so that a command
    never lists a picture it did not write)."""
    if drawn:
        return None
    why = PLOTS_EXTRA if pyplot() is None else "nothing to plot"
    return f"{name} not drawn: {why}"


def chart(report: dict, path: Path) -> bool:
    """Grouped bars of the mean image AUROC, pixel AUROC and PRO per run; False without
    matplotlib (the Markdown and JSON reports are written regardless)."""
    plt = pyplot()
    if plt is None:
        return False
    runs = report["mean"]
    names = list(runs)
    keys = [("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("pro", "PRO")]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(names) + 2), 3.6))
    for i, (key, label) in enumerate(keys):
        values = [100 * (runs[n].get(key) or 0) for n in names]
        ax.bar(x + (i - 1) * 0.27, values, 0.27, label=label)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylabel("mean over categories (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"clipinspect eval: {report['config']['bundle']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
