"""Line rate of ``clipinspect station``: the highest camera frame rate a bundle sustains with
zero budget misses and zero lost results, against Aravis's fake GigE Vision camera.

The fake camera (``arv-fake-gv-camera-0.8`` on 127.0.0.1, started here) free-runs at the trial's
frame rate; every frame is a part (``[trigger] kind = 'free'``), inspected by the station and
published to a JSON-lines file and, where mosquitto is installed, to a loopback broker read back
by a subscriber. A trial of ``--duration`` seconds passes when every frame the camera sent
became a part (none incomplete, none dropped by frame id), every part got a verdict within the
budget (no fail-safe) and every result reached every reader. The search starts near the rate
one inspection's time allows and moves by ``--step`` (up after a pass, down after a failure)
until it has a passing rate next to a failing one; the result has every trial with its p50/p99
trigger-to-publish latency (the trigger is the frame's arrival at the host: free-running). A
rate tried twice counts as sustained only if both trials passed.

    python benchmarks/experiments/station_line_rate.py BUNDLE --precision int8 \\
        --budget-ms 1000 --duration 60 --out benchmarks/results/station_line_rate_cpu_s16_patch
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tomllib
from pathlib import Path

import numpy as np

from clipinspect.benchmarks.harness import finish, parser
from clipinspect.benchmarks.report import machine_text
from clipinspect.runtime.cli.options import add_bundle, add_threads, positive_int
from clipinspect.runtime.core.int8_kernels import saturates

FAKE_CAMERA = "arv-fake-gv-camera-0.8"


def arguments(argv=None):
    p = parser(__doc__, out=None)
    add_bundle(p)
    p.add_argument("--precision", default="int8")
    p.add_argument("--category", default=None, help="default: the bundle's first")
    p.add_argument("--budget-ms", type=float, default=1000.0)
    p.add_argument("--duration", type=float, default=60.0, help="seconds per trial")
    p.add_argument("--step", type=float, default=1.25, help="rate factor between trials")
    p.add_argument("--max-trials", type=positive_int, default=6)
    p.add_argument("--side", type=positive_int, default=512, help="camera frame side, pixels")
    add_threads(p)
    return p.parse_args(argv)


def start_camera():
    if shutil.which(FAKE_CAMERA) is None:
        raise SystemExit(f"{FAKE_CAMERA} is not installed (Debian: apt-get install aravis-tools)")
    proc = subprocess.Popen([FAKE_CAMERA, "-i", "127.0.0.1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc


def start_broker(folder: Path):
    """mosquitto on a free loopback port, or (None, None) where it is not installed."""
    import socket
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        return None, None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = folder / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, port


class Reader:
    """A paho subscriber counting results by part id."""

    def __init__(self, port: int, topic: str):
        import paho.mqtt.client as mqtt
        self.parts: list[int] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="line-rate-reader")
        self.client.on_message = lambda c, u, m: self.parts.append(json.loads(m.payload)["part"])
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        time.sleep(0.3)

    def stop(self):
        self.client.loop_stop()
        self.client.disconnect()


def station_config(work: Path, args, rate: float, threshold: float, broker_port):
    mqtt = (f"[sinks.mqtt]\nport = {broker_port}\ntopic = \"bench/line\"\n"
            if broker_port else "")
    text = textwrap.dedent(f"""
        [station]
        name = "bench"
        budget_ms = {args.budget_ms}
        max_queue = 64
        [bundle]
        path = "{args.bundle}"
        category = "{args.category}"
        precision = "{args.precision}"
        mode = "zero-shot"
        threads = {args.threads or 0}
        image_threshold = {threshold}
        [source]
        kind = "aravis"
        pixel_format = "RGB8"
        frame_rate = {rate}
        region = [0, 0, {args.side}, {args.side}]
        [sinks.jsonl]
        path = "out.jsonl"
        """) + mqtt
    from clipinspect.runtime.station.config import parse
    return parse(tomllib.loads(text), work / "station.toml")


def trial(args, inspector, rate: float, threshold: float, broker_port) -> dict:
    from clipinspect.runtime.station.build import build
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        reader = Reader(broker_port, "bench/line/result") if broker_port else None
        station = build(station_config(work, args, rate, threshold, broker_port),
                        inspector).station
        worker = threading.Thread(target=station.run, daemon=True)
        worker.start()
        deadline = time.monotonic() + 30
        while not station.source_up and time.monotonic() < deadline:
            time.sleep(0.05)
        t0, frames0 = time.monotonic(), station.source.counters.frames
        time.sleep(args.duration)
        station.stop()
        elapsed = time.monotonic() - t0
        worker.join(120)
        time.sleep(0.5)
        if reader:
            reader.stop()
        c = station.source.counters
        published = len((work / "out.jsonl").read_text().splitlines())
        parts = station.counts["parts"]
        lat = station.metrics.latencies
        row = {"frame_rate": rate, "seconds": round(elapsed, 1),
               "frames_per_s": round((c.frames - frames0) / elapsed, 2), "parts": parts,
               "fail_safe": station.counts["fail_safe"],
               "budget_misses": station.counts["budget_misses"], "incomplete": c.incomplete,
               "dropped": c.dropped, "published_jsonl": published,
               "received_mqtt": len(set(reader.parts)) if reader else None,
               "part_latency": lat.percentiles("part"),
               "inference": lat.percentiles("inference")}
        lost = (parts - published) + ((parts - row["received_mqtt"]) if reader else 0)
        row["lost"] = lost + c.incomplete + c.dropped
        row["sustained"] = row["lost"] == 0 and row["fail_safe"] == 0 and parts > 0
        return row


def first_rate(inspector, category: str, side: int) -> float:
    """0.8 / the median time of one inspection: where the search starts."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (side, side, 3), np.uint8)
    times = []
    for _ in range(4):
        t = time.perf_counter()
        inspector.inspect([image], category, mode="zero-shot")
        times.append(time.perf_counter() - t)
    return round(max(0.2, 0.8 / float(np.median(times[1:]))), 1)


def search(args, inspector, threshold, broker_port) -> list[dict]:
    rate, trials = first_rate(inspector, args.category, args.side), []
    for _ in range(args.max_trials):
        row = trial(args, inspector, rate, threshold, broker_port)
        trials.append(row)
        print(f"  {rate:g} frames/s: {'sustained' if row['sustained'] else 'not sustained'} "
              f"({row['parts']} parts, {row['fail_safe']} fail-safe, {row['lost']} lost, p99 "
              f"{row['part_latency']['p99_ms']:.0f} ms)", file=sys.stderr, flush=True)
        best, failed = sustained_rate(trials), [t["frame_rate"] for t in trials
                                                if not t["sustained"]]
        if best and failed and min(failed) <= best * args.step * 1.05:
            break
        rate = round(rate * args.step if row["sustained"] else rate / args.step, 2)
    return trials


def sustained_rate(trials: list[dict]) -> float | None:
    """The highest rate every trial of which passed (one that passed once and failed once does
    not count)."""
    rates = {t["frame_rate"] for t in trials}
    good = [r for r in rates if all(t["sustained"] for t in trials if t["frame_rate"] == r)]
    return max(good, default=None)


def summarize(trials: list[dict]) -> dict:
    best = sustained_rate(trials)
    return {"sustained_frame_rate": best,
            "bounded": any(not t["sustained"] and t["frame_rate"] > (best or 0) for t in trials)}


def render(r: dict) -> str:
    best = r["sustained_frame_rate"]
    lines = [f"# Station line rate: {r['bundle']['model']} {r['bundle']['method']} "
             f"{r['precision'].upper()}", "", f"Command: `{r['command']}`", "",
             f"Machine: {machine_text(r['machine'])}; onnxruntime {r['versions']['onnxruntime']}"
             f"; encoder graph {r['encoder_graph']}; camera: Aravis's fake GigE Vision camera, "
             f"{r['side']} x {r['side']} RGB8 on loopback; budget {r['budget_ms']:g} ms; "
             f"{r['duration_s']:g} s per trial; sinks: {', '.join(r['sinks'])}.", "",
             (f"**Highest rate sustained: {best:g} parts/s**" + (
                 "" if r["bounded"] else " (the search ended at --max-trials before a rate "
                 "failed: the line rate may be higher)")) if best else
             "**No rate tried was sustained in every trial at it.**", "",
             f"onnxruntime's INT8 kernels on this CPU clip full-range weight products: "
             f"{'yes' if r['int8_kernels_clip'] else 'no'} (docs/precision.md, --weight-range).",
             "",
             "| frames/s asked | received/s | parts | fail-safe | lost | p50 ms | p99 ms | "
             "inference p50 ms | sustained |", "|---|---|---|---|---|---|---|---|---|"]
    for t in r["trials"]:
        lines.append(f"| {t['frame_rate']:g} | {t['frames_per_s']:g} | {t['parts']} | "
                     f"{t['fail_safe']} | {t['lost']} | {t['part_latency']['p50_ms']:.0f} | "
                     f"{t['part_latency']['p99_ms']:.0f} | {t['inference']['p50_ms']:.0f} | "
                     f"{'yes' if t['sustained'] else 'no'} |")
    lines += ["", "Latency: trigger (the frame's arrival at the host) to the last line sink's "
              "publish (JSON lines and MQTT's broker acknowledgement). Lost: frames incomplete "
              "or dropped by frame id, plus results missing from a reader."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = arguments(argv)
    from clipinspect.runtime import Inspector
    inspector = Inspector.open(args.bundle, args.precision, threads=args.threads)
    args.category = args.category or inspector.bundle.categories[0]
    threshold = inspector.thresholds(args.category, inspector.check(args.category,
                                                                     "zero-shot")).get("image")
    camera = start_camera()
    work = Path(tempfile.mkdtemp())
    broker, port = start_broker(work)
    try:
        trials = search(args, inspector, 0.5 if threshold is None else threshold, port)
    finally:
        camera.kill()
        if broker:
            broker.terminate()
    m = inspector.bundle.manifest
    result = {"bundle": {"model": m.model.name, "method": m.method,
                         "identity": inspector.bundle.identity},
              "precision": args.precision, "encoder_graph": inspector.encoder_graph,
              "budget_ms": args.budget_ms, "duration_s": args.duration, "side": args.side,
              "sinks": ["jsonl"] + (["mqtt"] if port else []),
              "threshold": threshold, **summarize(trials), "int8_kernels_clip": saturates(),
              "trials": trials}
    finish(result, args.out, render, script=__file__, argv=argv,
           placeholders={args.bundle: "BUNDLE"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
