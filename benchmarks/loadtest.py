"""Loopback load test of ``clipinspect serve``: N concurrent clients for T seconds each phase.

Starts the server on 127.0.0.1 (a free port) as a child process, waits until it is ready, runs
one phase per client count (e.g. 1 then 8 clients, same server, same run), stops the server
(SIGTERM: it finishes what is queued), then inspects every image used offline with the same
bundle, batch size 1, and compares each returned score with it. Reports throughput, latency
percentiles, errors, mean batch size per phase and the largest score difference.

With ``--idle-sockets N`` a last phase repeats the idle-connection attack: N connections from
loopback addresses 127.0.0.2 onwards (16 per address, under the per-address cap) that send
nothing or drip half a header line, each reopened as soon as the server closes it, while a
prober times /healthz, /readyz and a real inspection on fresh connections.

    python -m clipinspect.benchmarks.loadtest BUNDLE --data DATA --clients 1,8 --duration 60 \\
        --out benchmarks/results/loadtest_cpu_s16_winclip/loadtest
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from clipinspect.runtime.cli.options import (add_batch_size, add_bundle, add_categories,
                                             add_precision, add_threads, int_list,
                                             non_negative_int, positive_int)
from clipinspect.runtime.core.images import IMAGE_SUFFIXES

from .report import command_line, machine, machine_text, write_results

HOST = "127.0.0.1"


def pick_images(data: Path, categories: list[str], per_category: int) -> list[tuple[str, Path]]:
    """Test images of each category spread over its good and defect folders."""
    chosen = []
    for category in categories:
        files = sorted(p for p in (data / category / "test").rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SystemExit(f"loadtest: no test images under {data / category / 'test'}")
        step = max(1, len(files) // per_category)
        chosen += [(category, f) for f in files[::step][:per_category]]
    return chosen


def test_images(bundle: str, data: str | None, categories: Sequence[str] | None,
                per_category: int, tmp: Path) -> tuple[list[str], list[tuple[str, Path]]]:
    """(categories, chosen (category, image) pairs) from ``data``, or from the synthetic dataset
    written under ``tmp`` when ``data`` is None."""
    from clipinspect.runtime import Bundle

    known = Bundle.open(bundle, verify_checksums=False).categories
    if data is None:  # the built-in synthetic dataset, written for this run
        from clipinspect.calibration.synth import CATEGORIES, generate

        data = str(tmp / "data")
        generate(data, seed=0, categories=[c for c in known if c in CATEGORIES] or None)
    root = Path(data)
    categories = list(categories or [c for c in known if (root / c / "test").is_dir()])
    if not categories:
        raise SystemExit(f"loadtest: none of the bundle's categories ({', '.join(known)}) "
                         f"has a test folder under {data}")
    return categories, pick_images(root, categories, per_category)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def batch_histogram(port: int) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram."""
    text = get(port, "/metrics")[1]
    total = float(re.search(r"^clipinspect_batch_size_sum (\S+)$", text, re.M).group(1))
    count = float(re.search(r"^clipinspect_batch_size_count (\S+)$", text, re.M).group(1))
    return total, count


def client(port: int, images: list[tuple[str, bytes]], offset: int, end: float,
           records: list) -> None:
    """One client: posts images one after another (keep-alive) until ``end``."""
    conn = http.client.HTTPConnection(HOST, port, timeout=300)
    i = offset
    while time.perf_counter() < end:
        index = i % len(images)
        category, data = images[index]
        t0 = time.perf_counter()
        try:
            conn.request("POST", f"/v1/inspect?category={category}", body=data,
                         headers={"Content-Type": "image/png"})
            response = conn.getresponse()
            body = response.read()
            t1 = time.perf_counter()
            if response.status == 200:
                r = json.loads(body)
                records.append({"image": index, "ok": True, "latency": t1 - t0, "done": t1,
                                "score": r["image_score"], "batch": r["batch_size"]})
            else:
                records.append({"image": index, "ok": False, "latency": t1 - t0, "done": t1,
                                "error": f"{response.status} {body[:200]!r}"})
        except (OSError, http.client.HTTPException, ValueError) as e:
            conn.close()
            conn = http.client.HTTPConnection(HOST, port, timeout=300)
            records.append({"image": index, "ok": False, "latency": time.perf_counter() - t0,
                            "done": time.perf_counter(), "error": f"{type(e).__name__}: {e}"})
        i += 1
    conn.close()


def run_phase(port: int, images: list[tuple[str, bytes]], clients: int, duration: float) -> dict:
    records: list[dict] = []
    before = batch_histogram(port)
    start = time.perf_counter()
    end = start + duration
    threads = [threading.Thread(target=client, args=(port, images, k * len(images) // clients,
                                                     end, records)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = batch_histogram(port)
    ok = [r for r in records if r["ok"]]
    elapsed = max([r["done"] for r in records], default=end) - start
    lat = np.array([r["latency"] for r in ok]) * 1e3
    batches = after[1] - before[1]
    return {
        "clients": clients, "duration_s": duration, "elapsed_s": elapsed,
        "requests_ok": len(ok), "errors": len(records) - len(ok),
        "error_samples": sorted({r["error"] for r in records if not r["ok"]})[:5],
        "throughput_img_s": len(ok) / elapsed if elapsed > 0 else 0.0,
        "latency_ms": ({f"p{q}": float(np.percentile(lat, q)) for q in (50, 90, 99)}
                       | {"max": float(lat.max()), "mean": float(lat.mean())}) if len(ok) else {},
        "mean_batch_size": (after[0] - before[0]) / batches if batches else None,
        "batches": int(batches),
        "_records": records,
    }


# ----------------------------------------------------------------- the idle-connection attack
IDLE_PER_ADDRESS = 16
DRIP_EVERY_S = 2.0
HALF_A_HEADER = b"GET /healthz HTTP/1.1\r\nHo"


class IdleSockets:
    """n connections that send nothing (even ones) or half a header line and one more byte every
    DRIP_EVERY_S (odd ones), from 127.0.0.2, 127.0.0.3, ... (IDLE_PER_ADDRESS each); any the
    server closes is opened again, so the attack lasts until :meth:`stop`."""

    def __init__(self, port: int, n: int):
        self.port, self.n = port, n
        self.socks: list[socket.socket | None] = [None] * n
        self.opened = self.closed_by_server = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, i: int) -> socket.socket:
        s = socket.socket()
        try:
            s.bind((f"127.0.0.{2 + i // IDLE_PER_ADDRESS}", 0))
        except OSError as e:
            s.close()
            raise SystemExit(f"loadtest: --idle-sockets binds 127.0.0.2 and up ({e}); this "
                             "system's loopback does not take those addresses") from None
        s.connect((HOST, self.port))
        if i % 2:
            s.sendall(HALF_A_HEADER)
        self.opened += 1
        return s

    def start(self) -> None:
        self.socks = [self._open(i) for i in range(self.n)]
        self._thread.start()

    def _run(self) -> None:
        next_drip = time.perf_counter() + DRIP_EVERY_S
        while not self._stop.wait(0.2):
            drip = time.perf_counter() >= next_drip
            if drip:
                next_drip += DRIP_EVERY_S
            for i, s in enumerate(self.socks):
                try:
                    if server_closed(s):
                        self.closed_by_server += 1
                        s.close()
                        self.socks[i] = self._open(i)
                    elif drip and i % 2:
                        s.send(b"s")
                except OSError:  # closed under us (a reset): reopen on the next round
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for s in self.socks:
            s.close()


def server_closed(s: socket.socket) -> bool:
    """Whether the server has closed this connection (EOF or a reset; data is read past)."""
    while select.select([s], [], [], 0)[0]:
        try:
            if not s.recv(4096):
                return True
        except OSError:
            return True
    return False


def idle_attack(port: int, image: tuple[str, bytes], n: int, duration: float) -> dict:
    """Probe and request latency on fresh connections while ``n`` idle sockets are held open
    (and reopened) for ``duration`` seconds."""
    category, data = image
    probes = {"healthz": lambda: get(port, "/healthz")[0],
              "readyz": lambda: get(port, "/readyz")[0],
              "inspect": lambda: _post_once(port, category, data)}
    times: dict[str, list[float]] = {name: [] for name in probes}
    failures: list[str] = []
    attack = IdleSockets(port, n)
    attack.start()
    try:
        end = time.perf_counter() + duration
        while time.perf_counter() < end:
            for name, probe in probes.items():
                t0 = time.perf_counter()
                try:
                    status = probe()
                except OSError as e:
                    status = f"{type(e).__name__}: {e}"
                times[name].append(time.perf_counter() - t0)
                if status != 200:
                    failures.append(f"{name}: {status}")
            time.sleep(0.2)
    finally:
        attack.stop()
    return {"idle_sockets": n, "duration_s": duration,
            "addresses": -(-n // IDLE_PER_ADDRESS), "sockets_opened": attack.opened,
            "closed_by_server": attack.closed_by_server, "errors": len(failures),
            "error_samples": sorted(set(failures))[:5],
            "probes": {name: {"n": len(t), "p50_ms": float(np.percentile(t, 50)) * 1e3,
                              "max_ms": max(t) * 1e3} for name, t in times.items() if t}}


def _post_once(port: int, category: str, data: bytes) -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("POST", f"/v1/inspect?category={category}", body=data,
                     headers={"Content-Type": "image/png"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def offline_check(bundle: str, chosen: list[tuple[str, Path]], phases: list[dict],
                  precision: str, threads: int | None, tolerance: float) -> dict:
    """Every returned score against the same image inspected alone, offline."""
    from clipinspect.runtime import Inspector

    inspector = Inspector.open(bundle, precision, threads=threads)
    used = sorted({r["image"] for p in phases for r in p["_records"] if r["ok"]})
    offline = {i: inspector.inspect(chosen[i][1], chosen[i][0], batch_size=1)[0].image_score
               for i in used}
    diffs = np.array([abs(r["score"] - offline[r["image"]])
                      for p in phases for r in p["_records"] if r["ok"]])
    return {"compared": int(diffs.size), "distinct_images": len(used),
            "identical": int((diffs == 0).sum()), "max_abs_diff": float(diffs.max(initial=0.0)),
            "tolerance": tolerance, "mismatches": int((diffs > tolerance).sum())}


@dataclass(frozen=True)
class LoadtestOptions:
    """How ``clipinspect loadtest`` loads the server.

    clients: client counts, one phase of ``duration`` seconds each, in this order.
    per_category: test images chosen per category. categories: None for all the bundle has
    test images of. batch_size, max_wait_ms, precision, threads: the server's settings.
    tolerance: largest accepted |served - offline| score difference. note: stored as is.
    """

    clients: Sequence[int] = (1, 8)
    duration: float = 60.0
    per_category: int = 6
    categories: Sequence[str] | None = None
    batch_size: int = 8
    max_wait_ms: float = 5.0
    precision: str = "fp32"
    threads: int | None = None
    tolerance: float = 0.0
    note: str = ""
    idle_sockets: int = 0

    def command(self, data: str | None, out: str | Path) -> str:
        """The ``clipinspect loadtest`` command that runs these options (the bundle as BUNDLE,
        a dataset as DATA): what a result file records to be reproduced."""
        args = [*(["--data", "DATA"] if data else []), "--out", str(out),
                "--clients", ",".join(map(str, self.clients)), "--duration", f"{self.duration:g}",
                "--images-per-category", str(self.per_category)]
        if self.categories:
            args += ["--categories", ",".join(self.categories)]
        args += ["--batch-size", str(self.batch_size), "--max-wait-ms", f"{self.max_wait_ms:g}",
                 "--precision", self.precision]
        if self.threads is not None:
            args += ["--threads", str(self.threads)]
        if self.tolerance:
            args += ["--tolerance", f"{self.tolerance:g}"]
        if self.note:
            args += ["--note", self.note]
        if self.idle_sockets:
            args += ["--idle-sockets", str(self.idle_sockets)]
        return command_line("clipinspect loadtest BUNDLE", args)


def run_loadtest(bundle: str, data: str | None, out: str,
                 options: LoadtestOptions = LoadtestOptions()) -> dict:
    """Load the server, check its scores, write ``out``.json and .md; ``data`` None: a
    synthetic dataset written for this run."""
    from clipinspect.runtime import Bundle

    data_label = "synthetic, generated for this run (seed 0)" if data is None else Path(data).name
    with tempfile.TemporaryDirectory(prefix="clipinspect-loadtest-") as tmp:
        categories, chosen = test_images(bundle, data, options.categories, options.per_category,
                                         Path(tmp))
        images = [(c, p.read_bytes()) for c, p in chosen]
        phases, attack, load_before, load_after = _serve_and_load(bundle, images, options,
                                                                  Path(tmp))
        print("loadtest: offline check ...", file=sys.stderr, flush=True)
        check = offline_check(bundle, chosen, phases, options.precision, options.threads,
                              options.tolerance)

    for p in phases:
        del p["_records"]
    # Phases with the same client count (--clients 1,8,1,8 interleaves them against the drift
    # of a shared machine) are pooled: all their answers over all their time.
    by_clients = {n: sum(p["requests_ok"] for p in phases if p["clients"] == n)
                  / sum(p["elapsed_s"] for p in phases if p["clients"] == n)
                  for n in dict.fromkeys(p["clients"] for p in phases)}
    result = {
        "benchmark": "loadtest", "command": options.command(data, out), "machine": machine(),
        "note": options.note,
        "load_average_1m": {"before": load_before[0], "after": load_after[0]},
        "config": {"bundle": Bundle.open(bundle, verify_checksums=False).identity,
                   "precision": options.precision, "batch_size": options.batch_size,
                   "max_wait_ms": options.max_wait_ms, "threads": options.threads,
                   "categories": categories, "images": len(chosen), "data": data_label},
        "phases": phases, "idle_attack": attack, "throughput_img_s": by_clients,
        "score_check": check,
        "speedup_vs_1_client": ({n: t / by_clients[1] for n, t in by_clients.items()}
                                if by_clients.get(1) else None),
    }
    write_results(result, out, render)
    return result


def serve_command(bundle: str, port: int, options: LoadtestOptions) -> list[str]:
    cmd = [sys.executable, "-m", "clipinspect.runtime.cli", "serve", bundle, "--host", HOST,
           "--port", str(port), "--batch-size", str(options.batch_size), "--max-wait-ms",
           str(options.max_wait_ms), "--precision", options.precision,
           "--max-queue", str(max(64, 4 * max(options.clients))),
           "--max-connections-per-client", str(max(32, max(options.clients) + 8))]
    return cmd + (["--threads", str(options.threads)] if options.threads else [])


@contextlib.contextmanager
def serve_process(cmd: list[str], port: int, log_path: Path) -> Iterator[subprocess.Popen]:
    """A server started by ``cmd`` on ``port``, ready (/readyz 200) for the block; then stopped
    with SIGTERM (it finishes what is queued)."""
    env = {k: v for k, v in os.environ.items() if k != "CLIPINSPECT_API_KEY"}
    with open(log_path, "w+") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            t0 = time.time()
            while True:
                try:
                    if get(port, "/readyz")[0] == 200:
                        break
                except OSError:
                    pass
                if server.poll() is not None or time.time() - t0 > 600:
                    log.seek(0)
                    raise SystemExit(f"loadtest: the server did not become ready:\n{log.read()}")
                time.sleep(0.5)
            yield server
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(120)
            except subprocess.TimeoutExpired:
                server.kill()


def _serve_and_load(bundle: str, images: list[tuple[str, bytes]], options: LoadtestOptions,
                    tmp: Path) -> tuple[list[dict], dict | None, tuple, tuple]:
    """Start the server, run one phase per client count (and the idle-socket attack), stop it.
    -> (phases, attack or None, load averages before, after)."""
    port = free_port()
    with serve_process(serve_command(bundle, port, options), port, tmp / "server.log"):
        load_before = os.getloadavg()
        phases, attack = [], None
        for n in options.clients:
            print(f"loadtest: {n} client(s) for {options.duration:g} s ...", file=sys.stderr,
                  flush=True)
            phases.append(run_phase(port, images, n, options.duration))
        if options.idle_sockets:
            print(f"loadtest: {options.idle_sockets} idle sockets for {options.duration:g} s "
                  "...", file=sys.stderr, flush=True)
            attack = idle_attack(port, images[0], options.idle_sockets, options.duration)
        load_after = os.getloadavg()
    return phases, attack, load_before, load_after


def render(r: dict) -> str:
    c, s = r["config"], r["score_check"]
    lines = [f"# Loopback load test of clipinspect serve ({c['bundle']}, {c['precision']})", "",
             *([f"Command: `{r['command']}`", ""] if r.get("command") else []),
             f"Machine: {machine_text(r['machine'])}. "
             f"Max batch {c['batch_size']}, max wait {c['max_wait_ms']:g} ms, "
             f"{c['images']} images of {', '.join(c['categories'])}.", ""]
    if r.get("note"):
        lines += [r["note"], ""]
    lines += ["| clients | duration s | ok | errors | img/s | p50 ms | p90 ms | p99 ms | "
              "mean batch |", "|---|---|---|---|---|---|---|---|---|"]
    for p in r["phases"]:
        lat = p["latency_ms"] or {}
        mb = p["mean_batch_size"]
        lines.append(f"| {p['clients']} | {p['elapsed_s']:.1f} | {p['requests_ok']} | "
                     f"{p['errors']} | {p['throughput_img_s']:.2f} | {lat.get('p50', 0):.0f} | "
                     f"{lat.get('p90', 0):.0f} | {lat.get('p99', 0):.0f} | "
                     f"{'-' if mb is None else f'{mb:.2f}'} |")
    lines += ["", f"Scores: {s['compared']} returned scores of {s['distinct_images']} distinct "
                  f"images compared with offline single-image inspection: {s['identical']} "
                  f"identical, max abs difference {s['max_abs_diff']:.3g}, "
                  f"{s['mismatches']} beyond tolerance {s['tolerance']:g}."]
    lines.append("Throughput pooled per client count: " + ", ".join(
        f"{n} client(s) {v:.2f} img/s" for n, v in r["throughput_img_s"].items()) + (
        "; relative to 1 client: " + ", ".join(f"{n}: {v:.2f}x" for n, v in
                                               r["speedup_vs_1_client"].items())
        if r.get("speedup_vs_1_client") else ""))
    lines.append(f"1-minute load average: {r['load_average_1m']['before']:.2f} before, "
                 f"{r['load_average_1m']['after']:.2f} after.")
    if r.get("idle_attack"):
        a = r["idle_attack"]
        lines += ["", f"Idle-connection attack: {a['idle_sockets']} sockets from "
                      f"{a['addresses']} loopback addresses for {a['duration_s']:g} s "
                      f"({a['sockets_opened']} opened, {a['closed_by_server']} closed by the "
                      f"server), {a['errors']} failed probes. Latency on fresh connections: "
                  + ", ".join(f"{name} p50 {p['p50_ms']:.0f} ms, max {p['max_ms']:.0f} ms "
                              f"({p['n']})" for name, p in a["probes"].items()) + "."]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_bundle(p)
    p.add_argument("--data", default=None,
                   help="MVTec-layout dataset (default: synthesize one for this run)")
    p.add_argument("--out", required=True, help="result path without extension (.json, .md)")
    p.add_argument("--clients", type=int_list(1, "1,8"), default=[1, 8],
                   help="client counts, one phase each, in this order (default 1,8); repeat "
                        "them (1,8,1,8) to interleave on a machine whose speed drifts")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    p.add_argument("--images-per-category", type=positive_int, default=6)
    add_categories(p, "categories whose test images are sent (default: all found)")
    add_batch_size(p, help="server max batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    add_precision(p)
    add_threads(p)
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="largest accepted |served - offline| score difference (default 0: equal)")
    p.add_argument("--note", default="", help="free text stored with the result")
    p.add_argument("--idle-sockets", type=non_negative_int, default=0,
                   help="last phase: hold this many idle or dripping connections open (reopened "
                        "when closed) for --duration s while timing probes and one inspection on "
                        "fresh connections (default 0: skip)")


def cmd_loadtest(args: argparse.Namespace) -> int:
    options = LoadtestOptions(clients=args.clients, duration=args.duration,
                              per_category=args.images_per_category,
                              categories=args.categories or None,
                              batch_size=args.batch_size, max_wait_ms=args.max_wait_ms,
                              precision=args.precision, threads=args.threads,
                              tolerance=args.tolerance, note=args.note,
                              idle_sockets=args.idle_sockets)
    r = run_loadtest(args.bundle, args.data, args.out, options)
    failed = (sum(p["errors"] for p in r["phases"]) + r["score_check"]["mismatches"]
              + (r["idle_attack"] or {}).get("errors", 0))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clipinspect.benchmarks.loadtest",
                                description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return cmd_loadtest(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
