"""The live page of ``clipinspect serve``: ``/ui``, left open next to the camera.

``LiveFeed`` keeps what the page shows (the latest inspections as small overlays, counts per
category, throughput and latency percentiles); ``/ui/state.json`` serves it, and the page
(one HTML file, no build step, no external assets) polls it. With an API key set the state needs
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
                    **{name: get() for name, get in self.providers.items()}}


def _thumbnail(result: InspectionResult, thresholds: dict) -> str:
    """Overlay (colours as in ``predict``), at most THUMB_SIDE pixels, as a PNG data URI."""
    return "data:image/png;base64," + overlay_png(result, thresholds, THUMB_SIDE)


PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>clipinspect live</title>
<style>
body{font-family:sans-serif;margin:1em;background:#111;color:#eee}
#stats span{margin-right:2em;font-size:1.2em}
#grid{display:flex;flex-wrap:wrap;gap:10px;margin-top:1em}
.card{background:#222;padding:6px;border-radius:4px;width:196px}
.card img{width:192px;display:block}
.NG{color:#ff6b6b;font-weight:bold}.OK{color:#69db7c;font-weight:bold}
table{border-collapse:collapse;margin-top:1em}td,th{border:1px solid #444;padding:3px 8px}
#keybox{display:none;margin:1em 0}#status{color:#aaa}
</style></head><body>
<h1>clipinspect live</h1>
<div id="keybox">This server needs its API key: <input id="key" type="password">
<button id="usekey">use</button></div>
<div id="stats"><span>throughput <b id="tput">-</b> img/s</span>
<span>latency p50 <b id="p50">-</b> ms, p99 <b id="p99">-</b> ms</span>
<span id="status">connecting</span></div>
<table id="counts"><thead><tr><th>category</th><th>inspected</th><th>NG</th><th>OK</th></tr>
</thead><tbody></tbody></table>
<table id="health" style="display:none"><thead><tr><th>source / sink</th><th>state</th>
<th>backlog</th><th>detail</th></tr></thead><tbody></tbody></table>
<div id="grid"></div>
<script>
"use strict";
const keyName = "clipinspect-api-key";
let lastSeq = -1;
function cell(text, cls) {
  const td = document.createElement("td"); td.textContent = text;
  if (cls) td.className = cls; return td;
}
function render(s) {
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
  if (s.seq === lastSeq) return;
  lastSeq = s.seq;
  const grid = document.getElementById("grid"); grid.replaceChildren();
  for (const r of s.latest) {
    const card = document.createElement("div"); card.className = "card";
    card.dataset.seq = r.seq;
    if (r.overlay_png) {
      const img = document.createElement("img"); img.src = r.overlay_png;
      img.alt = r.category + " #" + r.seq; card.append(img);
    }
    const p = document.createElement("div");
    const v = document.createElement("span"); v.className = r.verdict; v.textContent = r.verdict;
    const score = r.image_score === null ? "-" : r.image_score.toFixed(4);
    p.append(v, " " + r.category + " score " + score
             + " " + new Date(r.time * 1000).toLocaleTimeString());
    card.append(p); grid.append(card);
  }
}
async function poll() {
  const headers = {};
  const key = sessionStorage.getItem(keyName);
  if (key) headers["X-API-Key"] = key;
  try {
    const r = await fetch("ui/state.json", {headers, cache: "no-store"});
    if (r.status === 401) {
      document.getElementById("keybox").style.display = "block";
      document.getElementById("status").textContent = "API key needed";
    } else if (r.ok) {
      document.getElementById("keybox").style.display = "none";
      render(await r.json());
      document.getElementById("status").textContent =
        "updated " + new Date().toLocaleTimeString();
    } else {
      document.getElementById("status").textContent = "server answered " + r.status;
    }
  } catch (e) {
    document.getElementById("status").textContent = "server unreachable, retrying";
  }
  setTimeout(poll, 1000);
}
document.getElementById("usekey").onclick = () => {
  sessionStorage.setItem(keyName, document.getElementById("key").value);
};
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
