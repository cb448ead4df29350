"""The live page of ``clipinspect serve``: ``/ui``, left open next to the camera.

``LiveFeed`` keeps what the page shows (the latest inspections as small overlays, counts per
category, throughput and latency percentiles, each category's threshold and score history, the
bundle, and what providers add: drift, shadow); ``/ui/state.json`` serves it, and the page
(one HTML file, no build step, no external assets) polls it. On ``serve`` the page's cards take
an operator's feedback (``v1/feedback``) and each category's memory change can be undone
(``v1/memory/undo``), with the same key. With an API key set the state needs
the key like ``/metrics``; the page asks for it once and keeps it for the browser tab only.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

import numpy as np
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..core.inspector import InspectionResult
from .heatmap import overlay_png

THUMB_SIDE = 192  # pixels, longest side of an overlay on the page
THROUGHPUT_WINDOW_S = 60.0
HISTORY = 300  # points per category on the score-over-time chart
# Overlays are rendered only while someone polls the page: a line without a screen open pays
# nothing per request beyond the counters.
WATCHED_S = 30.0


class LiveFeed:
    """Thread-safe record of the service's inspections for the live page."""

    wants_images = True  # the page shows every inspection's overlay: keep image and map

    def __init__(self, latest: int = 12, latencies: int = 1000,
                 health: Callable[[], list[dict]] | None = None):
        # health: rows {"name", "up", "backlog", "detail"} the page shows as a table (the
        # station's source and sinks); None for serve
        self.health = health
        self._lock = threading.Lock()
        self._latest: deque[dict] = deque(maxlen=latest)
        self._latencies: deque[float] = deque(maxlen=latencies)
        # Times of the inspections of the last THROUGHPUT_WINDOW_S, trimmed on every record, so
        # a line running without a page open holds one window's worth, not its whole history.
        self._times: deque[float] = deque()
        self._counts: dict[str, dict[str, int]] = {}
        self._seq = 0
        self._started = time.time()
        self._polled = float("-inf")
        self.bundle: dict = {}  # identity, precision, model, weights of the active bundle
        # name -> function giving a part of the state (drift, shadow): the page shows each
        self.providers: dict[str, Callable[[], object]] = {}
        self._history: dict[str, deque] = {}
        self._thresholds: dict[str, dict] = {}
        # True once a result came with an image id (serve's): its card can take feedback
        self._operations = False

    def record(self, category: str, result: InspectionResult, thresholds: dict,
               seconds: float, verdict: str | None = None, image_id: str | None = None) -> None:
        """One finished inspection (a worker thread: the thumbnail is rendered here);
        ``verdict`` where the caller decided it (the station's fail-safe), else the result's."""
        watched = time.time() - self._polled < WATCHED_S
        thumb = (_thumbnail(result, thresholds)
                 if watched and result.image is not None else None)
        verdict = verdict or {True: "NG", False: "OK"}.get(result.is_anomalous, "no threshold")
        now = time.time()
        with self._lock:
            self._seq += 1
            self._latest.appendleft({"seq": self._seq, "category": category, "time": now,
                                     "image_score": result.image_score, "verdict": verdict,
                                     "threshold": thresholds.get("image"),
                                     "overlay_png": thumb, "image_id": image_id,
                                     "feedback": None})
            self._thresholds[category] = dict(thresholds)
            self._operations = self._operations or image_id is not None
            if result.image_score is not None:
                self._history.setdefault(category, deque(maxlen=HISTORY)).append(
                    (round(now, 3), result.image_score, verdict))
            self._latencies.append(seconds)
            self._times.append(now)
            self._trim(now)
            c = self._counts.setdefault(category, {"inspected": 0, "NG": 0, "OK": 0})
            c["inspected"] += 1
            if verdict in c:
                c[verdict] += 1

    def mark(self, image_id: str, label: str, change: dict) -> None:
        """An operator's feedback on a shown result: its card says so (and the memory after)."""
        after = change.get("after") or {}
        with self._lock:
            self._seq += 1  # the page redraws its cards
            for item in self._latest:
                if item["image_id"] == image_id:
                    item["feedback"] = {"label": label, "id": change.get("id"),
                                        "memory": (after.get("memory") or "")[:12],
                                        "shots": after.get("shots")}

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] < now - THROUGHPUT_WINDOW_S:
            self._times.popleft()

    def state(self) -> dict:
        """What the page shows, as JSON."""
        now = time.time()
        with self._lock:
            self._polled = now
            self._trim(now)
            window = min(THROUGHPUT_WINDOW_S, max(now - self._started, 1e-3))
            lat = np.array(self._latencies) * 1e3
            return {"seq": self._seq, "latest": list(self._latest),
                    "counts": {k: dict(v) for k, v in sorted(self._counts.items())},
                    "throughput_per_s": len(self._times) / window,
                    "throughput_window_s": round(window, 1),
                    "latency_ms": ({"p50": float(np.percentile(lat, 50)),
                                    "p99": float(np.percentile(lat, 99)), "n": int(lat.size)}
                                   if lat.size else None),
                    "health": self.health() if self.health else None,
                    "bundle": self.bundle,
                    "thresholds": {k: dict(v) for k, v in sorted(self._thresholds.items())},
                    "history": {k: list(v) for k, v in sorted(self._history.items())},
                    "operations": self._operations,
                    **{name: get() for name, get in self.providers.items()}}


def _thumbnail(result: InspectionResult, thresholds: dict) -> str:
    """Overlay (colours as in ``predict``), at most THUMB_SIDE pixels, as a PNG data URI."""
    return "data:image/png;base64," + overlay_png(result, thresholds, THUMB_SIDE)


PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>clipinspect live</title>
<style>
body{font-family:sans-serif;margin:1em;background:#111;color:#eee}
header{display:flex;align-items:baseline;gap:1.5em;flex-wrap:wrap}
h1{margin:0.2em 0}h2{font-size:1.05em;margin:0.2em 0}
#bundle{color:#bbb}
#random{display:none;background:#c92a2a;color:#fff;font-weight:bold;padding:8px 12px;
margin:0.5em 0;border-radius:4px;font-size:1.1em}
#stats span{margin-right:2em;font-size:1.2em}
#grid{display:flex;flex-wrap:wrap;gap:10px;margin-top:1em}
.card{background:#222;padding:6px;border-radius:4px;width:196px;font-size:0.9em}
.card img{width:192px;display:block}
button{margin:3px 3px 0 0;font-size:0.85em}
.answer{color:#8ce99a}.answer.error{color:#ff8787}.card .answer{margin-top:3px}
.NG{color:#ff6b6b;font-weight:bold}.OK{color:#69db7c;font-weight:bold}.other{color:#adb5bd}
table{border-collapse:collapse;margin-top:1em}td,th{border:1px solid #444;padding:3px 8px}
#keybox{display:none;margin:1em 0}#status{color:#aaa}
#categories{display:flex;flex-wrap:wrap;gap:12px;margin-top:1em}
.category{background:#1b1b1b;border:1px solid #333;border-radius:4px;padding:6px 10px}
.cbar{height:10px;width:360px;margin-top:4px;background:linear-gradient(to right,
rgb(0,0,160) 0%,rgb(0,200,255) 35%,rgb(255,230,0) 65%,rgb(220,0,0) 100%)}
.cbar-labels{display:flex;justify-content:space-between;width:360px;font-size:0.8em;color:#bbb}
svg.chart{background:#0b0b0b;display:block;margin-top:4px}
svg.chart circle{fill:currentColor}svg.chart text{fill:#888;font-size:10px}
svg.chart line.threshold{stroke:#ffd43b;stroke-dasharray:5 3}
svg.chart line.drift-alarm{stroke:#f76707;stroke-width:2}
#shadow,#drift{display:none;margin-top:1em}
#shadow-summary span{margin-right:1.5em}
tr.alarm td{color:#ff8787;font-weight:bold}
</style></head><body>
<header><h1>clipinspect live</h1><span id="bundle"></span></header>
<div id="random">RANDOM weights: scores mean nothing for inspection</div>
<div id="keybox">This server needs its API key: <input id="key" type="password">
<button id="usekey">use</button></div>
<div id="stats"><span>throughput <b id="tput">-</b> img/s</span>
<span>latency p50 <b id="p50">-</b> ms, p99 <b id="p99">-</b> ms</span>
<span id="status">connecting</span></div>
<div id="operator" style="display:none">operator (journaled with feedback):
<input id="who" size="14" placeholder="name, optional"></div>
<table id="counts"><thead><tr><th>category</th><th>inspected</th><th>NG</th><th>OK</th></tr>
</thead><tbody></tbody></table>
<table id="health" style="display:none"><thead><tr><th>source / sink</th><th>state</th>
<th>backlog</th><th>detail</th></tr></thead><tbody></tbody></table>
<div id="categories"></div>
<div id="grid"></div>
<div id="shadow"><h2>shadow bundle <span id="shadow-bundle"></span></h2>
<div id="shadow-summary"><span>verdict agreement <b id="agreement">-</b></span>
<span>score correlation <b id="correlation">-</b></span>
<span>scored <b id="shadow-scored">-</b></span><span>dropped <b id="shadow-dropped">-</b></span>
<span>failed <b id="shadow-failed">-</b></span></div>
<table id="disagreements"><thead><tr><th>time</th><th>category</th><th>image</th>
<th>active</th><th>shadow</th></tr></thead><tbody></tbody></table></div>
<div id="drift"><h2>drift</h2><table id="drift-table"><thead></thead><tbody></tbody></table>
</div>
<svg id="svgns" width="0" height="0" style="position:absolute"></svg>
<script>
"use strict";
const keyName = "clipinspect-api-key", whoName = "clipinspect-operator";
const SVG = document.getElementById("svgns").namespaceURI;
const LABELS = {false_alarm: "false alarm", confirmed_defect: "confirmed defect",
                missed_defect: "missed defect"};
const W = 360, H = 130, PAD = 8;
const DRIFT_COLUMNS = ["category", "source", "statistic", "reference_n", "window_n", "value",
                       "p_value", "alarm", "raised_at"];
let lastSeq = -1, lastState = null;
const answers = {};  // image id -> what this page was answered (the state's feedback wins)
const busy = new Set();  // image ids with feedback on its way
const panels = {};  // category -> its elements, made once (an undo answer survives redraws)

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function cell(text, cls) { return el("td", text, cls); }
function sig(x, n) {
  if (x === null || x === undefined) return "-";
  return typeof x === "number" ? String(Number(x.toPrecision(n || 4))) : String(x);
}
function seconds(t) { return typeof t === "number" ? t : Date.parse(t) / 1000; }
function clock(t) { return t ? new Date(seconds(t) * 1000).toLocaleTimeString() : "-"; }
function verdictClass(v) { return v === "NG" || v === "OK" ? v : "other"; }
function svg(tag, attrs, cls) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (cls) e.setAttribute("class", cls);
  return e;
}
function tip(e, text) { const t = document.createElementNS(SVG, "title"); t.textContent = text;
  e.append(t); return e; }
function memoryText(m) {
  m = m || {};
  const refs = m.shots === null || m.shots === undefined ? "" : " (" + m.shots + " refs)";
  return "memory " + String(m.memory || "").slice(0, 12) + "…" + refs;
}
function requestHeaders(json) {
  const h = {};
  const key = sessionStorage.getItem(keyName);
  if (key) h["X-API-Key"] = key;
  if (json) h["Content-Type"] = "application/json";
  return h;
}
async function send(path, body) {
  const who = document.getElementById("who").value.trim();
  if (who) { body.who = who; sessionStorage.setItem(whoName, who); }
  let r, data = null;
  try {
    r = await fetch(path, {method: "POST", headers: requestHeaders(true),
                           body: JSON.stringify(body), cache: "no-store"});
  } catch (e) { return {error: "server unreachable"}; }
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) {
    return {error: (data && data.error && data.error.message) || "server answered " + r.status};
  }
  return {row: data || {}};
}

async function give(r, label) {
  busy.add(r.image_id); drawCards();
  const got = await send("v1/feedback", {image_id: r.image_id, label});
  busy.delete(r.image_id);
  answers[r.image_id] = got.error
    ? {text: LABELS[label] + " refused: " + got.error, error: true}
    : {text: LABELS[label] + ": " + memoryText(got.row.after), error: false};
  drawCards();
}
function card(r) {
  const c = el("div", null, "card"); c.dataset.seq = r.seq;
  if (r.image_id) c.dataset.imageId = r.image_id;
  if (r.overlay_png) {
    const img = document.createElement("img"); img.src = r.overlay_png;
    img.alt = r.category + " #" + r.seq; c.append(img);
  }
  const p = el("div");
  const v = el("span", r.verdict, verdictClass(r.verdict)); v.classList.add("verdict");
  const score = r.image_score === null ? "-" : r.image_score.toFixed(4);
  p.append(v, " " + r.category + " score " + score + " " + clock(r.time));
  c.append(p);
  const fb = r.feedback, local = answers[r.image_id];
  if (r.image_id && (r.verdict === "NG" || r.verdict === "OK")) {
    const row = el("div", null, "actions");
    for (const label of r.verdict === "NG" ? ["false_alarm", "confirmed_defect"]
                                           : ["missed_defect"]) {
      const b = el("button", LABELS[label], "feedback"); b.dataset.label = label;
      b.disabled = Boolean(fb) || busy.has(r.image_id) || Boolean(local && !local.error);
      b.onclick = () => give(r, label);
      row.append(b);
    }
    c.append(row);
  }
  let answer = local;
  if (fb) answer = {text: (LABELS[fb.label] || fb.label) + ": " + memoryText(fb), error: false};
  else if (busy.has(r.image_id)) answer = {text: "sending…", error: false};
  if (answer) c.append(el("div", answer.text, "answer" + (answer.error ? " error" : "")));
  return c;
}
function drawCards() {
  if (lastState) document.getElementById("grid").replaceChildren(...lastState.latest.map(card));
}

async function undo(name, p) {
  p.undo.disabled = true; p.answer.className = "answer"; p.answer.textContent = "sending…";
  const got = await send("v1/memory/undo", {category: name});
  p.undo.disabled = false;
  p.answer.className = "answer" + (got.error ? " error" : "");
  p.answer.textContent = got.error ? "undo refused: " + got.error
    : "undone: " + memoryText(got.row.after) + ", was "
      + String((got.row.before || {}).memory || "").slice(0, 12) + "…";
}
function panel(name) {
  if (panels[name]) return panels[name];
  const p = {root: el("div", null, "category"), info: el("div", null, "info"),
             bar: el("div", null, "cbar"), labels: el("div", null, "cbar-labels"),
             chart: svg("svg", {width: W, height: H, viewBox: "0 0 " + W + " " + H}, "chart"),
             undo: el("button", "undo last memory change", "undo"),
             answer: el("span", null, "answer")};
  p.root.dataset.category = name;
  p.undo.onclick = () => undo(name, p);
  const actions = el("div", null, "memory"); actions.append(p.undo, " ", p.answer);
  p.root.append(el("h2", name), p.info, p.bar, p.labels, p.chart, actions);
  document.getElementById("categories").append(p.root);
  panels[name] = p;
  return p;
}
function drawCategory(name, s, alarms) {
  const p = panel(name);
  const t = (s.thresholds || {})[name] || {};
  p.info.textContent = "image threshold "
    + (t.image === null || t.image === undefined ? "none: no verdicts" : sig(t.image));
  if (typeof t.pixel === "number") {
    const median = typeof t.pixel_median === "number" ? t.pixel_median : 0.5 * t.pixel;
    const lo = Math.min(median, t.pixel), hi = 2 * t.pixel - lo;
    p.labels.replaceChildren(el("span", sig(lo, 3)),
                             el("span", "pixel threshold " + sig(t.pixel, 3)),
                             el("span", sig(hi, 3)));
  } else {
    p.labels.replaceChildren(el("span", "low"),
                             el("span", "no pixel threshold: each overlay its own range"),
                             el("span", "high"));
  }
  p.undo.parentNode.style.display = s.operations ? "block" : "none";
  drawChart(p.chart, (s.history || {})[name] || [], t.image,
            alarms.filter(a => a.category === name));
}
function drawChart(chart, points, threshold, alarms) {
  chart.replaceChildren();
  if (!points.length) {
    chart.append(svg("text", {x: PAD, y: H / 2})); chart.lastChild.textContent = "no scores yet";
    return;
  }
  const first = points[0][0];
  alarms = alarms.filter(a => a.time >= first - 1);  // the chart's period (times rounded)
  const times = points.map(q => q[0]).concat(alarms.map(a => a.time));
  const scores = points.map(q => q[1]);
  const hasLine = typeof threshold === "number";
  if (hasLine) scores.push(threshold);
  let t0 = Math.min(...times), t1 = Math.max(...times), y0 = Math.min(...scores),
      y1 = Math.max(...scores);
  if (t1 - t0 < 1) { t0 -= 1; t1 += 1; }
  const margin = (y1 - y0) * 0.1 || Math.abs(y1) * 0.1 || 1;
  y0 -= margin; y1 += margin;
  const x = t => PAD + (t - t0) / (t1 - t0) * (W - 2 * PAD);
  const y = v => H - PAD - (v - y0) / (y1 - y0) * (H - 2 * PAD);
  for (const a of alarms) {
    chart.append(tip(svg("line", {x1: x(a.time), x2: x(a.time), y1: 0, y2: H}, "drift-alarm"),
                     "drift alarm " + a.what + " at " + clock(a.time)));
  }
  if (hasLine) {
    chart.append(tip(svg("line", {x1: 0, x2: W, y1: y(threshold), y2: y(threshold)},
                         "threshold"), "image threshold " + sig(threshold)));
  }
  for (const [t, v, verdict] of points) {
    chart.append(tip(svg("circle", {cx: x(t), cy: y(v), r: 3}, "point " + verdictClass(verdict)),
                     verdict + " " + sig(v) + " at " + clock(t)));
  }
  const top = svg("text", {x: 2, y: 10}); top.textContent = sig(y1, 3);
  const bottom = svg("text", {x: 2, y: H - 2}); bottom.textContent = sig(y0, 3);
  chart.append(top, bottom);
}

function driftRows(d) {
  if (d === null || d === undefined) return null;
  if (Array.isArray(d)) return d;
  return Array.isArray(d.rows) ? d.rows : [];
}
function driftAlarms(d) {
  const found = [], seen = new Set();
  const add = (category, t, what) => {
    const key = category + " " + t + " " + what;
    if (t && !seen.has(key)) { seen.add(key); found.push({category, time: seconds(t), what}); }
  };
  for (const r of driftRows(d) || []) {
    if (r.alarm) add(r.category, r.raised_at, r.statistic + " (" + r.source + ")");
  }
  const extra = d && !Array.isArray(d) && Array.isArray(d.alarms) ? d.alarms : [];
  for (const a of extra) {
    add(a.category, a.raised_at || a.time, a.statistic + " (" + a.source + ")");
  }
  return found;
}
function driftCell(key, v) {
  if (typeof v === "boolean") return key === "alarm" ? (v ? "ALARM" : "ok") : String(v);
  if (v && (key === "raised_at" || key === "time")) return clock(v);
  if (v !== null && typeof v === "object") return JSON.stringify(v);
  return sig(v);
}
function drawDrift(d) {
  const box = document.getElementById("drift"), rows = driftRows(d);
  box.style.display = rows ? "block" : "none";
  if (!rows) return;
  const keys = [];
  for (const r of rows) for (const k of Object.keys(r)) if (!keys.includes(k)) keys.push(k);
  const main = DRIFT_COLUMNS.filter(k => keys.includes(k));
  const cols = main.length ? main : keys;
  const head = el("tr");
  for (const k of cols) head.append(el("th", k));
  box.querySelector("thead").replaceChildren(head);
  const body = box.querySelector("tbody"); body.replaceChildren();
  if (!rows.length) {
    const tr = el("tr"), td = cell("no drift statistics yet"); td.colSpan = cols.length || 1;
    tr.append(td); body.append(tr);
  }
  for (const r of rows) {
    const tr = el("tr", null, r.alarm ? "alarm" : "");
    for (const k of cols) tr.append(cell(driftCell(k, r[k])));
    body.append(tr);
  }
}
function drawShadow(sh) {
  const box = document.getElementById("shadow");
  box.style.display = sh ? "block" : "none";
  if (!sh) return;
  const set = (id, text) => { document.getElementById(id).textContent = text; };
  set("shadow-bundle", sh.bundle || "");
  set("agreement", typeof sh.verdict_agreement === "number"
      ? (100 * sh.verdict_agreement).toFixed(1) + " % of " + sh.verdicts_compared
      : "- (no verdicts compared yet)");
  set("correlation", sig(sh.score_correlation, 3));
  set("shadow-scored", sig(sh.scored)); set("shadow-dropped", sig(sh.dropped));
  set("shadow-failed", sig(sh.failed));
  const body = document.querySelector("#disagreements tbody"); body.replaceChildren();
  if (!(sh.disagreements || []).length) {
    const tr = el("tr"), td = cell("no disagreements"); td.colSpan = 5;
    tr.append(td); body.append(tr);
  }
  for (const g of (sh.disagreements || []).slice(-10).reverse()) {
    const side = x => (x ? x.verdict + " " + sig(x.score) : "-");
    const tr = el("tr");
    tr.append(cell(clock(g.time)), cell(g.category), cell(String(g.image_id || "").slice(0, 12)),
              cell(side(g.active)), cell(side(g.shadow)));
    body.append(tr);
  }
}

function render(s) {
  lastState = s;
  const b = s.bundle || {};
  document.getElementById("bundle").textContent = b.identity
    ? "bundle " + b.identity + " · " + b.precision + " · " + b.model + " · weights " + b.weights
    : "";
  document.getElementById("random").style.display = b.weights === "random" ? "block" : "none";
  document.getElementById("operator").style.display = s.operations ? "block" : "none";
  document.getElementById("tput").textContent = s.throughput_per_s.toFixed(2);
  document.getElementById("p50").textContent = s.latency_ms ? s.latency_ms.p50.toFixed(0) : "-";
  document.getElementById("p99").textContent = s.latency_ms ? s.latency_ms.p99.toFixed(0) : "-";
  const body = document.querySelector("#counts tbody"); body.replaceChildren();
  for (const [name, c] of Object.entries(s.counts)) {
    const tr = document.createElement("tr");
    tr.append(cell(name), cell(c.inspected), cell(c.NG, "NG"), cell(c.OK, "OK"));
    body.append(tr);
  }
  const health = document.getElementById("health");
  health.style.display = s.health ? "table" : "none";
  if (s.health) {
    const rows = health.querySelector("tbody"); rows.replaceChildren();
    for (const h of s.health) {
      const tr = document.createElement("tr");
      tr.append(cell(h.name), cell(h.up ? "up" : "DOWN", h.up ? "OK" : "NG"), cell(h.backlog),
                cell(h.detail));
      rows.append(tr);
    }
  }
  const names = new Set([...Object.keys(s.counts), ...Object.keys(s.thresholds || {}),
                         ...Object.keys(s.history || {})]);
  const alarms = driftAlarms(s.drift);
  for (const name of [...names].sort()) drawCategory(name, s, alarms);
  drawShadow(s.shadow);
  drawDrift(s.drift);
  if (s.seq === lastSeq) return;
  lastSeq = s.seq;
  drawCards();
}
async function poll() {
  const status = document.getElementById("status");
  let r = null;
  try {
    r = await fetch("ui/state.json", {headers: requestHeaders(false), cache: "no-store"});
  } catch (e) {
    status.textContent = "server unreachable, retrying";
  }
  if (r && r.status === 401) {
    document.getElementById("keybox").style.display = "block";
    status.textContent = "API key needed";
  } else if (r && r.ok) {
    document.getElementById("keybox").style.display = "none";
    try {
      render(await r.json());
      status.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) {
      status.textContent = "could not show the state: " + e;
    }
  } else if (r) {
    status.textContent = "server answered " + r.status;
  }
  setTimeout(poll, 1000);
}
document.getElementById("usekey").onclick = () => {
  sessionStorage.setItem(keyName, document.getElementById("key").value);
};
document.getElementById("who").value = sessionStorage.getItem(whoName) || "";
poll();
</script></body></html>
"""


def ui_routes(feed: LiveFeed, endpoint) -> list[Route]:
    """``/ui`` (the page: public, it holds no data) and ``/ui/state.json`` (the data: needs the
    API key where one is set). ``endpoint(name, handler, auth)`` wraps a handler as the server
    does (metrics, errors, the key check)."""
    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE)

    async def state(request: Request) -> Response:
        return JSONResponse(feed.state(), headers={"Cache-Control": "no-store"})

    return [Route("/ui", endpoint("ui", page), methods=["GET"]),
            Route("/ui/state.json", endpoint("ui_state", state, auth=True), methods=["GET"])]
