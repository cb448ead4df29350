"""Memory under hostile load: many concurrent 40-megapixel requests against ``clipinspect serve``.

Starts the server on 127.0.0.1 (a free port) as a child process with a small queue, waits until
it is ready, then sends ``--requests`` large-image requests at once (heat maps asked for), and a
burst of connections that declare a large body and send two bytes. It samples the server's
resident memory (peak: VmHWM from /proc) and times every answer. Memory is the figure to read;
timings on a shared CPU are only indicative. Loopback only; every loop is bounded.

    python benchmarks/experiments/memload.py BUNDLE --category weave --requests 64 \\
        --megapixels 40 --max-queue 4 --batch-size 2 --out benchmarks/results/memload_cpu_s16
"""

from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from clipinspect.benchmarks.harness import finish, parser

HOST = "127.0.0.1"


def large_jpeg(megapixels: float) -> tuple[bytes, tuple[int, int]]:
    """A smooth picture of ``megapixels`` (4:3), as JPEG: a small body that decodes huge."""
    h = int((megapixels * 1e6 * 3 / 4) ** 0.5)
    w = int(megapixels * 1e6 // h)
    small = np.random.default_rng(0).integers(0, 256, (h // 64, w // 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(buf, "JPEG",
                                                                          quality=85)
    return buf.getvalue(), (w, h)


def rss_kib(pid: int) -> tuple[int, int]:
    """(current, peak) resident set of a process, KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def request(port: int, category: str, body: bytes, records: list, timeout: float) -> None:
    url = f"http://{HOST}:{port}/v1/inspect?category={category}&heatmap=true"
    t0 = time.perf_counter()
    try:
        req = urllib.request.Request(url, body, {"Content-Type": "image/jpeg"}, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status = r.status
            r.read()
    except urllib.error.HTTPError as e:
        status = e.code
        e.read()
    except OSError as e:
        status = f"{type(e).__name__}"
    records.append({"status": status, "seconds": time.perf_counter() - t0})


def slow_bodies(port: int, n: int, hold_s: float) -> dict:
    """n connections that declare 10 MB and send 2 bytes: how many are answered within hold_s."""
    conns = []
    for _ in range(n):
        try:
            c = socket.create_connection((HOST, port), timeout=hold_s)
            c.sendall(b"POST /v1/inspect?category=x HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      b"image/png\r\nContent-Length: 10000000\r\n\r\nab")
            conns.append(c)
        except OSError:
            pass
    answered, deadline = 0, time.monotonic() + hold_s
    for c in conns:
        c.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if c.recv(64).startswith(b"HTTP/1.1"):
                answered += 1
        except OSError:
            pass
        c.close()
    return {"connections": n, "opened": len(conns), "answered_within_s": hold_s,
            "answered": answered}


def summarize(records: list[dict]) -> dict:
    out: dict = {}
    for status in sorted({str(r["status"]) for r in records}):
        s = np.array([r["seconds"] for r in records if str(r["status"]) == status])
        out[status] = {"count": int(s.size), "median_s": float(np.median(s)),
                       "max_s": float(s.max())}
    return out


def run(args: argparse.Namespace) -> dict:
    if args.image:  # a given file (another format or mode; --megapixels unused)
        body = Path(args.image).read_bytes()
        with Image.open(io.BytesIO(body)) as im:
            (w, h), image_format = im.size, f"{im.format} {im.mode}"
    else:
        (body, (w, h)), image_format = large_jpeg(args.megapixels), "JPEG"
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "clipinspect.runtime.cli", "serve", args.bundle, "--port",
           str(port), "--max-queue", str(args.max_queue), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads), "--body-timeout", str(args.body_timeout)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://{HOST}:{port}/readyz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            raise SystemExit("memload: the server did not become ready in 300 s")
        idle_rss = rss_kib(server.pid)[0]
        records: list[dict] = []
        threads = [threading.Thread(target=request, args=(port, args.category, body, records,
                                                          args.timeout))
                   for _ in range(args.requests)]
        samples, t0 = [], time.perf_counter()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads) and time.perf_counter() - t0 < args.timeout:
            samples.append(rss_kib(server.pid)[0])
            time.sleep(0.05)
        for t in threads:
            t.join()
        burst_s = time.perf_counter() - t0
        slow = slow_bodies(port, args.slow_connections, args.body_timeout + 5)
        peak = rss_kib(server.pid)[1]
    finally:
        server.terminate()
        server.wait(60)
    return {"server_command": " ".join(["clipinspect serve BUNDLE --port PORT", *cmd[7:]]),
            "image": {"width": w, "height": h, "format": image_format, "bytes": len(body)},
            "requests": args.requests, "heatmap": True,
            "rss_mib": {"idle_ready": idle_rss / 1024, "peak_sampled": max(samples) / 1024,
                        "peak_vmhwm": peak / 1024},
            "rss_bound_mib": args.rss_bound_mib,
            "within_bound": peak / 1024 < args.rss_bound_mib,
            "answers": summarize(records), "burst_s": burst_s, "slow_bodies": slow}


def render(r: dict) -> str:
    rows = "\n".join(f"| {status} | {a['count']} | {a['median_s']:.2f} | {a['max_s']:.2f} |"
                     for status, a in r["answers"].items())
    rss = r["rss_mib"]
    s = r["slow_bodies"]
    return (f"# Memory under load: {r['requests']} concurrent {r['image']['width']}x"
            f"{r['image']['height']} {r['image']['format']} requests with heat maps\n\n"
            f"Command: `{r['command']}`\n\nServer: `{r['server_command']}`\n\n"
            f"Server RSS: idle (ready) {rss['idle_ready']:.0f} MiB, peak during the burst "
            f"{rss['peak_sampled']:.0f} MiB, peak over the whole run (VmHWM) "
            f"{rss['peak_vmhwm']:.0f} MiB: "
            f"{'within' if r['within_bound'] else 'OVER'} the bound of {r['rss_bound_mib']} MiB."
            "\n\n"
            "| status | answers | median s | max s |\n|---|---|---|---|\n" + rows + "\n\n"
            f"Slow bodies: {s['opened']} of {s['connections']} connections opened, "
            f"{s['answered']} answered within {s['answered_within_s']:g} s.\n\n"
            f"Timings measured on a CPU shared with other work ({r['machine']['logical_cores']} "
            "logical cores): indicative only. Memory is the figure this run checks.\n")


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, out=None, prog="memload")
    p.add_argument("bundle")
    p.add_argument("--category", required=True)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--megapixels", type=float, default=40.0)
    p.add_argument("--image", default=None,
                   help="send this image file instead of a generated --megapixels JPEG")
    p.add_argument("--max-queue", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--body-timeout", type=float, default=10.0)
    p.add_argument("--slow-connections", type=int, default=300)
    p.add_argument("--rss-bound-mib", type=float, default=2048,
                   help="the peak RSS the run must stay under (default 2048)")
    p.add_argument("--timeout", type=float, default=600.0, help="per request, s")
    args = p.parse_args(argv)
    result = finish(run(args), args.out, render, script=__file__, argv=argv,
                    placeholders={args.bundle: "BUNDLE",
                                  **({args.image: "IMAGE"} if args.image else {})})
    return 0 if result["within_bound"] else 1


if __name__ == "__main__":
    sys.exit(main())
