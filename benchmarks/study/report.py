"""The study's report: one JSON (``study.json``), the same tables as Markdown (``report.md``)
and as a self-contained HTML page (``report.html``, plots inlined), and two plots (accuracy
vs speed, one point per variant; accuracy vs shots; accuracy vs pool size where the study has
pool-scored variants). No torch, no onnxruntime: the writers only read the result dicts, so
they are tested on hand-made ones.
"""

from __future__ import annotations

import base64
import html
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from clipinspect.runtime.core.bundle import atomic_write_bytes

from .spec import Study

ACCURACY = (("image_auroc", "image AUROC"), ("image_ap", "image AP"),
            ("image_f1_max", "image F1-max"), ("pixel_auroc", "pixel AUROC"),
            ("pixel_ap", "pixel AP"), ("pro", "PRO"))
PLOTS = {"accuracy_vs_speed": "accuracy_vs_speed.png", "shots": "shots_curve.png",
         "pools": "pool_sizes.png"}
NO_MATPLOTLIB = ("plots not drawn: matplotlib is not installed (pip install "
                 "'clipinspect[plots]', then rerun the same command: results are reused)")


def assemble(study: Study, per_variant: dict[str, dict], *, data: Path,
             categories: Sequence[str]) -> dict:
    """The report dict written as study.json (shot counts as string keys, as JSON has them;
    a pool-scored variant's zero-shot results at the study's pool sizes under ``pools``, keyed
    by pool size)."""
    from ..report import machine

    variants = []
    for v in study.variants:
        runs = per_variant[v.name]
        entry = {"name": v.name, "variant": v.to_dict(), "strategy": v.strategy,
                 "shots": {str(k): r for k, r in runs.items() if not isinstance(k, tuple)}}
        pools = {str(k[1]): r for k, r in runs.items() if isinstance(k, tuple)}
        variants.append({**entry, **({"pools": pools} if pools else {})})
    files = sorted({v.prompt_file for v in study.variants if v.prompt_file})
    pool_sizes = {"pool_sizes": list(study.pool_sizes)} if study.pool_sizes else {}
    return {"study": {"name": study.name, "note": study.note, "shots": list(study.shots),
                      **pool_sizes,
                      "data": str(Path(data).resolve()), "categories": list(categories),
                      "batch_size": study.batch_size, "pixel_size": study.pixel_size,
                      "timing_images": study.timing_images,
                      "prompt_files": {f: prompt_file_source(f) for f in files}},
            "machine": machine(), "variants": variants}


def prompt_file_source(path: str) -> str:
    """The prompt file's own word on who wrote it (its ``source``), for the report. Read only
    when it is a regular file of at most prompt_format.MAX_FILE_BYTES (a FIFO would hang the
    report, an endless device fill the memory)."""
    from clipinspect.export.prompt_format import PromptFileError, read_prompt_file

    try:
        data = json.loads(read_prompt_file(path).decode("utf-8"))
    except PromptFileError as e:
        return f"source not readable here ({e})"
    except ValueError:
        return "source not readable here (not a JSON file)"
    source = data.get("source") if isinstance(data, dict) else None
    return str(source) if source else "the file does not say who wrote it"


# ------------------------------------------------------------------------------ tables
@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    text: str = ""


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def adapters_note(result: dict, n_categories: int) -> str:
    """What the variant's adapters saw of the evaluated categories, in words."""
    seen = result.get("adapters_seen")
    if seen is None:
        return result.get("adapters_seen_source") or "-"
    if not seen:
        return "untrained (random)"
    marks = [c["seen_by_adapters"] for c in result.get("categories", {}).values()]
    n = sum(bool(m) for m in marks)
    if n == 0:
        return f"cross-domain: trained on {', '.join(seen)}"
    return f"saw {n} of {n_categories} evaluated categories"


def _ok_results(report: dict, pools: bool = True):
    """(variant entry, shots, pool size, result) of every result with metrics, in study order;
    pool size None but for a pool-scored variant's zero-shot at one of the study's pool sizes,
    which follow its 0-shot row (``pools``: with those)."""
    for v in report["variants"]:
        for k, r in v["shots"].items():
            if "categories" in r:
                yield v, int(k), None, r
            if k == "0" and pools:
                for p, rp in v.get("pools", {}).items():
                    if "categories" in rp:
                        yield v, 0, int(p), rp


def _has_pools(report: dict) -> bool:
    """Whether any result is of a pool-scored variant (then the tables have a pool column)."""
    return any(r.get("pool_scored") for *_, r in _ok_results(report))


def pool_cell(k: int, pool: int | None, r: dict, pools: Sequence[int] | None = None) -> str:
    """The pool column: '-' for a method that scores each image alone; zero-shot: 'all' (each
    category's test set one pool) or the pool size, or the category's ``pools`` ('5 + 7');
    k-shot: 'k normal' (each image against k normal training images, streaming)."""
    if not r.get("pool_scored"):
        return "-"
    if k:
        return f"{k} normal"
    if pools:
        return " + ".join(map(str, pools))
    return "all" if pool is None else f"<= {pool}"


POOL_TEXT = ("pool (methods whose images score each other, MuSc): all = each category's test "
             "set scored together, <= P = in consecutive pools of at most P test images (a last "
             "one under 5 joins the one before), k normal = each test image against a pool of "
             "k normal training images (streaming; no batch-1 latency for the zero-shot rows, "
             "whose images are scored together).")


def summary_table(report: dict) -> Table:
    n = len(report["study"]["categories"])
    pooled = _has_pools(report)
    t = Table("Mean over categories", ["variant", "method", "prompts", "precision", "shots"]
              + (["pool"] if pooled else []) + [label for _, label in ACCURACY]
              + ["images/s", "p50 ms", "p99 ms", "GFLOPs/image", "peak RSS MB", "adapters"])
    for v, k, pool, r in _ok_results(report):
        m, lat = r["mean"], r.get("latency") or {}
        t.rows.append([v["name"], r["method"], v["strategy"], v["variant"]["precision"], str(k)]
                      + ([pool_cell(k, pool, r)] if pooled else [])
                      + [_pct(m.get(key)) for key, _ in ACCURACY]
                      + [_num(m.get("images_per_second"), ".2f"), _num(lat.get("p50_ms"), ".0f"),
                         _num(lat.get("p99_ms"), ".0f"), _num(r.get("gflops_per_image"), ".1f"),
                         _num(r.get("peak_rss_mb"), ".0f"), adapters_note(r, n)])
    t.text = ("Metrics in percent. images/s: batched evaluation throughput (encoder + scoring "
              "head, decoding excluded, as in `clipinspect eval`); p50/p99: batch-1 end-to-end "
              "latency (decode to thresholded map); GFLOPs from the runtime's cost model; peak "
              "RSS of the fresh process that evaluated the variant."
              + (" " + POOL_TEXT if pooled else ""))
    return t


def category_table(report: dict, category: str) -> Table:
    pooled = _has_pools(report)
    t = Table(f"Category {category}", ["variant", "shots"] + (["pools"] if pooled else [])
              + [label for _, label in ACCURACY] + ["adapters saw it"])
    for v, k, pool, r in _ok_results(report):
        c = r["categories"].get(category)
        if c is None:
            continue
        seen = c.get("seen_by_adapters")
        mark = "-" if seen is None else ("yes" if seen else "no (cross-domain)")
        t.rows.append([v["name"], str(k)]
                      + ([pool_cell(k, pool, r, c.get("pools"))] if pooled else [])
                      + [_pct(c.get(key)) for key, _ in ACCURACY] + [mark])
    return t


def prompt_table(report: dict) -> Table | None:
    """Prompt strategies side by side for the methods whose variants differ in them."""
    t = Table("Prompt strategies", ["method", "precision", "shots", "prompts", "image AUROC",
                                    "pixel AUROC", "PRO"])
    groups: dict[tuple, list] = {}
    for v, k, _, r in _ok_results(report, pools=False):
        groups.setdefault((v["variant"]["method"], v["variant"]["precision"], k), []).append(
            (v, r))
    for (method, precision, k), rows in groups.items():
        if len({v["strategy"] for v, _ in rows}) < 2:
            continue
        for v, r in rows:
            t.rows.append([method, precision, str(k), v["strategy"]]
                          + [_pct(r["mean"].get(key)) for key in ("image_auroc", "pixel_auroc",
                                                                   "pro")])
    t.text = ("ensemble: the compositional prompt ensemble; prompt file: the descriptions of "
              "the variant's prompt file (see its 'source' for who wrote them); adaptation: "
              "per-image contextual prompt weighting.")
    return t if t.rows else None


def problems_table(report: dict) -> Table | None:
    t = Table("Skipped and failed", ["variant", "shots", "what happened"])
    for v in report["variants"]:
        rows = [*v["shots"].items(), *((f"0 (pool <= {p})", r)
                                       for p, r in v.get("pools", {}).items())]
        for k, r in rows:
            if "skipped" in r:
                t.rows.append([v["name"], k, r["skipped"]])
            elif "error" in r:
                t.rows.append([v["name"], k, "failed: " + r["error"].splitlines()[0][:300]])
    return t if t.rows else None


def tables(report: dict) -> list[Table]:
    out = [summary_table(report)]
    prompts = prompt_table(report)
    out += [prompts] if prompts else []
    out += [category_table(report, c) for c in report["study"]["categories"]]
    problems = problems_table(report)
    return out + ([problems] if problems else [])


def _preamble(report: dict) -> list[str]:
    s, m = report["study"], report["machine"]
    lines = [f"Command: `{report['command']}`"] if report.get("command") else []
    pools = (f"; zero-shot pool sizes {', '.join(map(str, s['pool_sizes']))} (pool-scored "
             "methods)" if s.get("pool_sizes") else "")
    lines += [f"Data `{s['data']}`, categories {', '.join(s['categories'])}; shots "
              f"{', '.join(map(str, s['shots']))}{pools}; pixel metrics at {s['pixel_size']}x"
              f"{s['pixel_size']}, PRO integrated to FPR 0.3. Machine: {m.get('cpu')} "
              f"({m.get('logical_cores')} logical cores)."]
    weights = sorted({r.get("weights") for v in report["variants"] for r in v["shots"].values()
                      if r.get("weights")})
    if "random" in weights:
        lines.append("**Random weights**: some variants use randomly initialised CLIP weights; "
                     "their accuracy says nothing about the methods, only that the pipeline "
                     "runs and how fast.")
    if s.get("note"):
        lines.append(s["note"])
    for path, source in s.get("prompt_files", {}).items():
        lines.append(f"Prompt file `{Path(path).name}`: {source}")
    if report.get("plots_note"):
        lines.append(report["plots_note"])
    return lines


# ------------------------------------------------------------------------------ writers
def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict) -> str:
    lines = [f"# clipinspect study: {report['study']['name']}", ""]
    for p in _preamble(report):
        lines += [p, ""]
    for name, file in PLOTS.items():
        if name in report.get("plots", {}):
            lines += [f"![{name.replace('_', ' ')}]({file})", ""]
    for t in tables(report):
        lines += [f"## {t.title}", "", "| " + " | ".join(t.header) + " |",
                  "|" + "---|" * len(t.header)]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
        lines += ([""] + [t.text] if t.text else []) + [""]
    return "\n".join(lines)


_CSS = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin-bottom:1em}td,th{border:1px solid #ccc;"
        "padding:3px 6px;text-align:right}td:first-child{text-align:left}img{max-width:100%}")


def render_html(report: dict, out: Path) -> str:
    """The report as one page with the plots inlined (no external assets)."""
    e = html.escape
    body = [f"<h1>clipinspect study: {e(report['study']['name'])}</h1>"]
    body += [f"<p>{e(p).replace('**', '')}</p>" for p in _preamble(report)]
    for name, file in PLOTS.items():
        if name in report.get("plots", {}):
            data = base64.b64encode((out / file).read_bytes()).decode("ascii")
            body.append(f'<img alt="{e(name)}" src="data:image/png;base64,{data}">')
    for t in tables(report):
        rows = ["<tr>" + "".join(f"<th>{e(h)}</th>" for h in t.header) + "</tr>"]
        rows += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>"
                 for row in t.rows]
        body += [f"<h2>{e(t.title)}</h2>", "<table>" + "".join(rows) + "</table>"]
        body += [f"<p>{e(t.text)}</p>"] if t.text else []
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>clipinspect study"
            f"</title><style>{_CSS}</style></head><body>" + "".join(body) + "</body></html>\n")


def write_reports(report: dict, out: Path) -> None:
    """study.json, report.md, report.html and the plots (tables only, said in the report and
    on stderr, without matplotlib)."""
    out.mkdir(parents=True, exist_ok=True)
    drawn = plot(report, out)
    if drawn is None:
        report["plots_note"] = NO_MATPLOTLIB
        print(f"clipinspect: {NO_MATPLOTLIB}", file=sys.stderr)
    else:
        report["plots"] = {name: PLOTS[name] for name in drawn}
    atomic_write_bytes(out / "study.json", (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(out / "report.md", render_markdown(report).encode())
    atomic_write_bytes(out / "report.html", render_html(report, out).encode())


def plot(report: dict, out: Path) -> list[str] | None:
    """Draw the plots; -> names drawn, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from .plots import accuracy_vs_speed, pool_curve, shots_curve

    drawn = []
    for name, draw in (("accuracy_vs_speed", accuracy_vs_speed), ("shots", shots_curve),
                       ("pools", pool_curve)):
        if draw(plt, report, out / PLOTS[name]):
            drawn.append(name)
    return drawn
