"""The demo's report: contact sheets (one colour scale per category, truth and prediction
outlined), Markdown, and a self-contained HTML page (images inlined as data URIs)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clipinspect.runtime.core.maps import mask_edge
from clipinspect.runtime.predict import colour_bar

TRUTH_COLOUR = (0, 230, 60)  # ground-truth outline; the predicted mask is outlined in white

RANDOM_WEIGHTS_WHY = (
    "Why random weights still find these defects: the few-shot score compares every patch of "
    "a test image with the patches of the reference images, and even a randomly initialised "
    "ViT is a fixed function that maps similar patches to similar embeddings. The synthetic "
    "defects (scratches, holes, stains, cracks painted onto regular textures and parts) are "
    "patches unlike any reference patch, so they stand out; real, subtle defects and the "
    "zero-shot text scores need pretrained weights.")


def contact_sheet(overlay_dir: Path, records: list[dict], out: Path, *,
                  truth_masks: list[np.ndarray], colour_scale: tuple[float, float],
                  thumb: int = 128, columns: int = 6) -> None:
    """One PNG of all overlays of a category: ground truth outlined in green, captioned with
    truth, score and verdict, and the colour bar (shared by all overlays) underneath."""
    rows = (len(records) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * thumb, rows * (thumb + 16) + 30), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (r, truth) in enumerate(zip(records, truth_masks)):
        x, y = (i % columns) * thumb, (i // columns) * (thumb + 16)
        if "overlay" in r:
            with Image.open(overlay_dir / r["overlay"]) as im:
                tile = np.asarray(im.convert("RGB").resize((thumb, thumb))).copy()
            small = np.asarray(Image.fromarray(truth).resize((thumb, thumb), Image.NEAREST))
            tile[mask_edge(small.astype(bool))] = TRUTH_COLOUR
            sheet.paste(Image.fromarray(tile), (x, y))
        verdict = {True: "NG", False: "OK"}.get(r.get("is_anomalous"), "?")
        draw.text((x + 3, y + thumb + 2),
                  f"{r['truth'][:7]} {r.get('image_score', 0):.3f} {verdict}", fill="black")
    middle = f"pixel threshold {(colour_scale[0] + colour_scale[1]) / 2:.3g}"
    sheet.paste(colour_bar(columns * thumb, 30, colour_scale, middle), (0, rows * (thumb + 16)))
    sheet.save(out)


def _warning_lines(r: dict) -> list[str]:
    if r["weights"] != "random":
        return []
    first = r["weights_warning"] or "WARNING: exported with RANDOM weights (--pretrained none)."
    return [first, "", RANDOM_WEIGHTS_WHY, ""]


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def render_markdown(r: dict, console: bool = False) -> str:
    """The report as Markdown; ``console``: without the weights warning (already printed)."""
    lines = ["# clipinspect demo", ""]
    if not console:
        lines += _warning_lines(r)
    parity = (r["parity_fp32"] or {}).get("max_abs_diff", {})
    lines += [f"Model {r['model']} ({r['weights']} weights), bundle `{r['bundle']}`, "
              f"{r['shots']}-shot WinCLIP+.",
              "Export parity, max |onnxruntime - torch|: "
              + (", ".join(f"{k} {v:.1e}" for k, v in parity.items()) or "not recorded"), "",
              "| category | images (defective) | image AUROC | pixel AUROC | TP | FP | FN | TN "
              "| images/s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, c in r["categories"].items():
        d = c["decisions"]
        lines.append(f"| {name} | {c['images']} ({c['anomalous']}) | {_pct(c['image_auroc'])} | "
                     f"{_pct(c['pixel_auroc'])} | {d['TP']} | {d['FP']} | {d['FN']} | "
                     f"{d['TN']} | {c['images_per_second']:.2f} |")
    lines += ["", "Decisions at the image threshold (positive = defective). Thresholds:"]
    for name, c in r["categories"].items():
        t = c["thresholds"]
        lines.append(f"- {name}: image {t['image']:.4g}, pixel {t['pixel']:.4g}: {t['how']}.")
    if not console:
        lines += ["", "Overlays share one colour scale per category (from the median pixel of "
                  "the normal images, threshold in the middle); green: ground truth, white: "
                  "predicted mask.", ""]
        lines += [f"![{name}](overlays_{name}.png)" for name in r["categories"]]
    lines += ["", f"Total time {r['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def histogram_svg(c: dict, width: int = 420, height: int = 160, bins: int = 16) -> str:
    """Good vs defective image scores of one category, with the image threshold as a line."""
    scores = [(d["image_score"], d["truth"] != "good") for d in c["images_detail"]]
    t = c["thresholds"]["image"]
    values = [s for s, _ in scores] + [t]
    lo, hi = min(values), max(values)
    span = max(hi - lo, 1e-9)
    edges = np.linspace(lo, hi + span * 1e-6, bins + 1)
    counts = {k: np.histogram([s for s, bad in scores if bad == k], edges)[0]
              for k in (False, True)}
    top = max(1, int(max(counts[False].max(), counts[True].max())))
    bw, plot_h = width / bins, height - 20
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'class="hist">']
    for bad, colour, kind in ((False, "#2b8a3e", "good"), (True, "#c92a2a", "defective")):
        for i, n in enumerate(counts[bad]):
            h = plot_h * n / top
            x = i * bw + (bw / 2 if bad else 0)
            parts.append(f'<rect x="{x:.1f}" y="{plot_h - h:.1f}" width="{bw / 2:.1f}" '
                         f'height="{h:.1f}" fill="{colour}" data-kind="{kind}"/>')
    tx = width * (t - lo) / span
    parts += [f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="0" y2="{plot_h}" stroke="black" '
              'stroke-dasharray="4 2" class="threshold"/>',
              f'<text x="2" y="{height - 4}" font-size="11">{lo:.3g}</text>',
              f'<text x="{width - 40}" y="{height - 4}" font-size="11">{hi:.3g}</text>',
              f'<text x="{min(tx + 3, width - 90):.1f}" y="12" font-size="11">threshold '
              f'{t:.3g}</text></svg>']
    return "".join(parts)


_CSS = ("body{font-family:sans-serif;max-width:900px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}.warn{background:#fff3bf;padding:8px;border-left:4px solid #f08c00}"
        ".legend span{padding:0 6px}img{max-width:100%}")


def render_html(r: dict, out: Path) -> str:
    """The report as one self-contained HTML page (no external assets)."""
    e = html.escape
    body = ["<h1>clipinspect demo</h1>"]
    warning = _warning_lines(r)
    if warning:
        body.append(f'<div class="warn"><p><b>{e(warning[0])}</b></p><p>{e(warning[2])}</p></div>')
    body.append(f"<p>Model {e(r['model'])} ({e(r['weights'])} weights), bundle "
                f"<code>{e(r['bundle'])}</code>, {r['shots']}-shot WinCLIP+. Total time "
                f"{r['seconds']:.0f} s.</p>")
    rows = ["<tr><th>category</th><th>images (defective)</th><th>image AUROC</th>"
            "<th>pixel AUROC</th><th>TP</th><th>FP</th><th>FN</th><th>TN</th>"
            "<th>image threshold</th></tr>"]
    for name, c in r["categories"].items():
        d = c["decisions"]
        rows.append(f"<tr><td>{e(name)}</td><td>{c['images']} ({c['anomalous']})</td>"
                    f"<td>{_pct(c['image_auroc'])}</td><td>{_pct(c['pixel_auroc'])}</td>"
                    + "".join(f"<td>{d[k]}</td>" for k in ("TP", "FP", "FN", "TN"))
                    + f"<td>{c['thresholds']['image']:.4g}</td></tr>")
    body.append('<table id="summary">' + "".join(rows) + "</table>")
    body.append("<p>Decisions at the image threshold, positive = defective.</p>")
    for name, c in r["categories"].items():
        body += [f'<h2 id="cat-{e(name)}">{e(name)}</h2>',
                 f"<p>Thresholds: {e(c['thresholds']['how'])}.</p>",
                 '<p class="legend">Image scores: <span style="color:#2b8a3e">good</span>'
                 '<span style="color:#c92a2a">defective</span>, dashed: threshold</p>',
                 histogram_svg(c),
                 "<p>Overlays on one colour scale (bar below the sheet); green outline: ground "
                 "truth, white outline: predicted mask; caption: truth, score, verdict.</p>",
                 f'<img class="sheet" alt="overlays of {e(name)}" '
                 f'src="{_data_uri(out / f"overlays_{name}.png")}">']
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>clipinspect demo</title>"
            f"<style>{_CSS}</style></head><body>" + "".join(body) + "</body></html>\n")
