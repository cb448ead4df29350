"""``clipinspect eval``: accuracy, agreement with FP32 and speed per category, precision and
number of reference shots, on MVTec AD or VisA style data.

Test images are encoded once per precision and scored for every shot count. Pixel metrics are
computed at ``pixel_size`` x ``pixel_size`` (maps upsampled from the patch grid, masks resized
nearest-neighbour), as common in the literature, to bound memory. Each category's result is
written as soon as it is done; a rerun with the same settings reuses it (``resume``), and a
failure in one category is recorded without losing the others.
"""

from __future__ import annotations

import json
import shlex
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from clipinspect.runtime import Bundle, Inspector
from clipinspect.runtime.core.bundle import atomic_write_bytes
from clipinspect.runtime.core.errors import UsageError, did_you_mean
from clipinspect.runtime.core.maps import upsample
from clipinspect.runtime.core.progress import Progress

from .datasets import dataset_categories, load_dataset, load_mask
from .metrics import average_precision, f1_max, image_auroc, pixel_auroc, pro_auc

METRICS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max",
           "pro")


@dataclass(frozen=True)
class EvalOptions:
    """What ``clipinspect eval`` measures, and how.

    fmt: dataset layout, "auto", "mvtec" or "visa". categories: None for all in the data.
    shots: reference counts (0 = zero-shot). pixel_size: side of the pixel metrics' grid.
    resume: reuse categories already in the report directory with the same settings.
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
    """Why ``inspector`` cannot score with ``shots`` reference images (None if it can): a
    the bundle's method says (AprilLab's few-shot score, normalised by the references' own map
    spread, needs two of them)."""
    return inspector.bundle.method.shots_refused(shots)


def evaluate_category(inspectors: dict[str, Inspector], root: Path, category: str,
                      options: EvalOptions, bar: Progress) -> dict:
    fmt, batch_size = options.fmt, options.batch_size
    test = load_dataset(root, fmt, [category], split="test")
    train = [s for s in load_dataset(root, fmt, [category], split="train") if not s.is_anomalous]
    size = (options.pixel_size, options.pixel_size)
    labels = np.array([s.is_anomalous for s in test])
    masks = np.stack([load_mask(s, size=size) for s in test])
    out: dict = {"images": len(test), "anomalous": int(labels.sum()), "runs": {}, "notes": []}
    fp32_maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for precision, inspector in inspectors.items():
        memories: dict[int, dict | None] = {}
        for k in sorted(set(options.shots)):
            refused = shots_refused(inspector, k)
            if k == 0:
                memories[0] = None
            elif refused:
                if refused not in out["notes"]:
                    out["notes"].append(refused)
            elif k > len(train):
                out["notes"].append(f"{k}-shot skipped: only {len(train)} normal training images")
            else:
                memories[k] = inspector.build_memory([s.path for s in train[:k]], batch_size)[0]
        scores = {k: np.full(len(test), np.nan) for k in memories}
        maps = {k: np.zeros((len(test), *size), np.float32) for k in memories}
        seconds = {k: 0.0 for k in memories}
        encode_before = inspector.stage_seconds["encode"]
        failed = []
        for batch, good, encoded in inspector.iter_encoded([s.path for s in test], batch_size):
            failed += [f"{b.source}: {b.error}" for b in batch if b.error]
            for k, memory in memories.items():
                if encoded is None:
                    continue
                t0 = time.perf_counter()
                s, grids, _ = inspector.score(encoded, category,
                                              "few-shot" if k else "zero-shot", memory)
                seconds[k] += time.perf_counter() - t0
                for j, b in enumerate(good):
                    scores[k][b.index] = s[j]
                    maps[k][b.index] = upsample(grids[j], size)
            bar.update(len(batch))
        seconds["encode"] = inspector.stage_seconds["encode"] - encode_before
        if failed:
            out["notes"].append(f"{precision}: {len(failed)} unreadable image(s) left out, e.g. "
                                f"{failed[0]}")
        for k in memories:
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
              **({"threads": options.threads} if options.threads else {})}
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
