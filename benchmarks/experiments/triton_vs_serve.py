"""A real Triton Inference Server against ``clipinspect serve`` on the same bundle and images, in
one run, interleaved phases: throughput and p50/p99 latency side by side per concurrency.

Per method (ViT-S-16, random weights): export the bundle, write the synthetic dataset, write a
``--platform python`` model repository, start tritonserver (the nvidia-pytriton wheel's, in a
venv of its own under WORK or ``$CLIPINSPECT_TRITON_VENV``, via runtime/triton/local_server.py)
and ``clipinspect serve`` (benchmarks/loadtest.py), then for
each round and concurrency run perf_analyzer against the zero-shot ensemble (gRPC, real
preprocessed images as ``--input-data``), then our HTTP client against serve (PNG bodies decoded by
the server). perf_analyzer is the binary of the ``tritonclient==2.40.0`` wheel, installed by this
script in its own venv under WORK (it also needs libb64: ``apt-get install libb64-0d``). If it
cannot run, the reason is recorded and Triton is driven by our own gRPC client instead.

    python benchmarks/experiments/triton_vs_serve.py --work /tmp/tvs \\
        --out benchmarks/results/triton_vs_serve_cpu_s16/triton_vs_serve
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from clipinspect.benchmarks.harness import finish, parser
from clipinspect.benchmarks.loadtest import (LoadtestOptions, free_port, offline_check,
                                             pick_images, run_phase, serve_command,
                                             serve_process)
from clipinspect.benchmarks.report import machine_text
from clipinspect.runtime.cli.options import csv_list, int_list, positive_int

MODEL = "ViT-S-16"
CATEGORY = "weave"
METHODS = {"winclip": [], "patch": ["--method", "patch"]}
PERF_ANALYZER = "tritonclient==2.40.0"


def prepare_method(work: Path, method: str) -> tuple[Path, Path]:
    """(bundle, python-platform repository) under ``work``, exported once and reused."""
    from clipinspect.runtime.triton.repository import write_repository

    bundle = work / "bundles" / method
    if not (bundle / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "clipinspect.runtime.cli", "export", "--model",
                        MODEL, "--pretrained", "none", "--categories", CATEGORY, "--seed", "0",
                        "--out", str(bundle), "--overwrite", *METHODS[method]], check=True)
    repo = work / "repos" / method
    write_repository(bundle, repo, platform="python", max_batch=8, overwrite=True)
    return bundle, repo


def perf_analyzer(work: Path) -> tuple[list[str] | None, dict, str | None]:
    """(command prefix, environment, None) for perf_analyzer in its own venv under ``work``
    (created on first use), or (None, {}, why it cannot run)."""
    venv = work / "perf_analyzer-venv"
    binary = venv / "bin" / "perf_analyzer"
    if not binary.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", PERF_ANALYZER,
                              "nvidia-cuda-runtime-cu12"], capture_output=True, text=True)
        if pip.returncode != 0 or not binary.is_file():
            return None, {}, f"pip install {PERF_ANALYZER} failed: {pip.stderr[-2000:]}"
    libs = list(venv.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(
        [str(p) for p in libs] + [os.environ.get("LD_LIBRARY_PATH", "")]))
    probe = subprocess.run([str(binary), "--version"], capture_output=True, text=True, env=env)
    if probe.returncode != 0:
        return None, {}, (f"perf_analyzer --version exited {probe.returncode}: "
                          f"{(probe.stderr or probe.stdout)[-2000:]} (libb64: apt-get install "
                          "libb64-0d; libcudart: pip package nvidia-cuda-runtime-cu12)")
    return [str(binary)], env, None


def input_data(bundle: Path, chosen: list[Path], path: Path) -> None:
    """perf_analyzer's --input-data: each image preprocessed as the runtime does, (1, 3, H, W)."""
    from clipinspect.runtime import Bundle
    from clipinspect.runtime.core.images import to_rgb_array

    b = Bundle.open(bundle, verify_checksums=False)
    data = []
    for p in chosen:
        x = b.preprocess(to_rgb_array(p)).astype(np.float32)
        data.append({"images": {"content": x.reshape(-1).tolist(), "shape": [1, *x.shape]},
                     "category": {"content": [CATEGORY], "shape": [1]}})
    path.write_text(json.dumps({"data": data}))


def encoder_batches(http: str) -> tuple[int, int]:
    """(images, executions) of the Triton encoder so far."""
    from clipinspect.runtime.triton.repository import ENCODER

    with urllib.request.urlopen(f"http://{http}/v2/models/{ENCODER}/stats", timeout=10) as r:
        [model] = json.loads(r.read())["model_stats"]
    stats = model.get("batch_stats", [])
    return (sum(int(b["batch_size"]) * int(b["compute_infer"]["count"]) for b in stats),
            sum(int(b["compute_infer"]["count"]) for b in stats))


def perf_phase(cmd: list[str], env: dict, server, data: Path, *, concurrency: int,
               duration: float, tmp: Path) -> dict:
    """One perf_analyzer measurement: three windows of duration/3 (stability not required, so
    the phase takes a known time on a noisy machine). Each window must see requests complete:
    choose ``duration`` of at least about 10 x the p99 latency."""
    from clipinspect.runtime.triton.repository import ENSEMBLES

    out = tmp / f"pa_{concurrency}_{time.monotonic_ns()}.csv"
    before = encoder_batches(server.http)
    t0 = time.perf_counter()
    run = subprocess.run(cmd + ["-m", ENSEMBLES["zeroshot"], "-u", server.grpc, "-i", "grpc",
                                "--concurrency-range", f"{concurrency}:{concurrency}",
                                "--input-data", str(data), "--measurement-mode", "time_windows",
                                "-p", str(int(duration * 1000 / 3)),
                                "--stability-percentage", "1000", "--max-trials", "3",
                                "-f", str(out)], capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - t0
    after = encoder_batches(server.http)
    if run.returncode != 0 or not out.is_file():
        return {"clients": concurrency, "error": f"perf_analyzer exited {run.returncode}: "
                                                 f"{(run.stderr or run.stdout)[-1500:]}"}
    with open(out) as f:
        row = next(csv.DictReader(f))
    images, executions = after[0] - before[0], after[1] - before[1]
    return {"clients": concurrency, "elapsed_s": elapsed, "driver": "perf_analyzer",
            "throughput_img_s": float(row["Inferences/Second"]),
            "latency_ms": {f"p{q}": float(row[f"p{q} latency"]) / 1e3 for q in (50, 90, 99)},
            "mean_batch_size": images / executions if executions else None,
            "server_queue_ms": float(row["Server Queue"]) / 1e3,
            "server_compute_ms": float(row["Server Compute Infer"]) / 1e3}


def grpc_phase(server, bundle: Path, chosen: list[Path], concurrency: int,
               duration: float) -> dict:
    """Our own gRPC load on the ensemble (where perf_analyzer cannot run): ``concurrency``
    threads, each sending one preprocessed image at a time for ``duration`` seconds."""
    import tritonclient.grpc as grpcclient

    from clipinspect.runtime import Bundle
    from clipinspect.runtime.core.images import to_rgb_array
    from clipinspect.runtime.triton.client import make_inputs
    from clipinspect.runtime.triton.repository import ENSEMBLES

    b = Bundle.open(bundle, verify_checksums=False)
    tensors = [b.preprocess(to_rgb_array(p))[None].astype(np.float32) for p in chosen]
    latencies: list[float] = []
    errors: list[str] = []
    end = time.perf_counter() + duration

    def client(k: int) -> None:
        c = grpcclient.InferenceServerClient(server.grpc)
        i = k
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                c.infer(ENSEMBLES["zeroshot"], make_inputs(grpcclient, tensors[i % len(tensors)],
                                                           CATEGORY))
                latencies.append(time.perf_counter() - t0)
            except Exception as e:  # recorded per phase, the load goes on
                errors.append(f"{type(e).__name__}: {e}")
            i += 1

    before, t0 = encoder_batches(server.http), time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed, after = time.perf_counter() - t0, encoder_batches(server.http)
    lat = np.array(latencies) * 1e3
    return {"clients": concurrency, "elapsed_s": elapsed, "driver": "own gRPC client",
            "throughput_img_s": len(lat) / elapsed, "errors": len(errors),
            "latency_ms": {f"p{q}": float(np.percentile(lat, q)) for q in (50, 90, 99)}
            if len(lat) else {},
            "mean_batch_size": ((after[0] - before[0]) / (after[1] - before[1])
                                if after[1] > before[1] else None)}


def run_method(method: str, work: Path, args: argparse.Namespace, pa: tuple,
               environment) -> dict:
    """Both servers up on one bundle; phases interleaved (Triton, serve) per round and
    concurrency. ``environment``: the venv tritonserver runs from."""
    from clipinspect.runtime.triton.local_server import running_server

    bundle, repo = prepare_method(work, method)
    chosen = [p for _, p in pick_images(work / "data", [CATEGORY], args.images)]
    data = work / f"input_data_{method}.json"
    input_data(bundle, chosen, data)
    images = [(CATEGORY, p.read_bytes()) for p in chosen]
    options = LoadtestOptions(clients=args.concurrency, batch_size=8, max_wait_ms=5.0,
                              threads=args.threads)
    port = free_port()
    phases = []
    tmp = work / "logs" / method
    tmp.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        server = stack.enter_context(running_server(repo, tmp, environment))
        stack.enter_context(serve_process(serve_command(str(bundle), port, options), port,
                                          tmp / "serve.log"))
        for r in range(args.rounds):
            for n in args.concurrency:
                print(f"triton_vs_serve: {method}, round {r + 1}/{args.rounds}, concurrency "
                      f"{n}, {args.duration:g} s each ...", file=sys.stderr, flush=True)
                load = os.getloadavg()[0]
                triton = (perf_phase(pa[0], pa[1], server, data, concurrency=n,
                                     duration=args.duration, tmp=tmp)
                          if pa[0] else grpc_phase(server, bundle, chosen, n, args.duration))
                phases.append({"server": "triton", "round": r + 1, "load_average_1m": load,
                               **triton})
                load = os.getloadavg()[0]
                served = run_phase(port, images, n, args.duration)
                phases.append({"server": "serve", "round": r + 1, "load_average_1m": load,
                               "driver": "loadtest HTTP client", **served})
    check = offline_check(str(bundle), [(CATEGORY, p) for p in chosen],
                          [p for p in phases if p["server"] == "serve"], "fp32", args.threads,
                          0.0)
    for p in phases:
        p.pop("_records", None)
        p.pop("duration_s", None)
    return {"bundle": bundle.name, "phases": phases, "serve_score_check": check}


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    from clipinspect.calibration.synth import generate

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data" / CATEGORY).is_dir():
        generate(str(work / "data"), seed=0, categories=[CATEGORY])
    cmd, env, why = perf_analyzer(work) if not args.own_client else (None, {}, "--own-client")
    result = {"benchmark": "triton_vs_serve",
              "note": args.note, "load_average_1m": {"before": os.getloadavg()[0]},
              "config": {"model": f"{MODEL} (random weights)", "category": CATEGORY,
                         "mode": "zero-shot", "images": args.images, "duration_s": args.duration,
                         "rounds": args.rounds, "concurrency": args.concurrency,
                         "triton": "tritonserver 2.51 (nvidia-pytriton wheel), --platform "
                                   "python, encoder max_batch 8, queue delay 2 ms",
                         "serve": "clipinspect serve, max batch 8, max wait 5 ms",
                         "threads": args.threads},
              "triton_driver": "perf_analyzer 2.40.0 (gRPC)" if cmd else "own gRPC client",
              "perf_analyzer_unavailable": why, "methods": {}}
    from clipinspect.runtime.triton.local_server import server_environment

    environment = server_environment(work / "triton-venv", progress=lambda msg: print(
        f"triton_vs_serve: {msg}", file=sys.stderr, flush=True))
    for method in args.methods:
        result["methods"][method] = run_method(method, work, args, (cmd, env), environment)
    result["load_average_1m"]["after"] = os.getloadavg()[0]
    return finish(result, args.out, render, script=__file__, argv=argv,
                  placeholders={args.work: "WORK", str(work): "WORK"})


def render(r: dict) -> str:
    c, m = r["config"], r["machine"]
    lines = ["# Triton Inference Server vs clipinspect serve, same bundle and images", "",
             f"Command: `{r['command']}`", "",
             f"Machine: {machine_text(m)}, {m['platform']}; "
             f"1-minute load average {r['load_average_1m']['before']:.2f} before, "
             f"{r['load_average_1m']['after']:.2f} after. {c['model']}, category "
             f"{c['category']}, {c['mode']}, {c['images']} synthetic images, {c['duration_s']:g} s "
             f"per phase, {c['rounds']} round(s). Triton: {c['triton']}, driven by "
             f"{r['triton_driver']} (preprocessed tensors). serve: {c['serve']}, driven by our "
             "HTTP client (PNG bodies, decoded by the server).", ""]
    if r.get("note"):
        lines += [r["note"], ""]
    if r.get("perf_analyzer_unavailable"):
        lines += [f"perf_analyzer not used: {r['perf_analyzer_unavailable']}", ""]
    for method, res in r["methods"].items():
        lines += [f"## {method}", "", "| round | concurrency | server | img/s | p50 ms | p99 ms | "
                  "mean batch | load avg |", "|---|---|---|---|---|---|---|---|"]
        for p in res["phases"]:
            lat, mb = p.get("latency_ms") or {}, p.get("mean_batch_size")
            if "error" in p:
                error = " ".join(p["error"].split())[-300:].replace("|", "/")
                lines.append(f"| {p['round']} | {p['clients']} | {p['server']} | error: {error} "
                             "| | | | |")
                continue
            lines.append(f"| {p['round']} | {p['clients']} | {p['server']} | "
                         f"{p['throughput_img_s']:.2f} | {lat.get('p50', 0):.0f} | "
                         f"{lat.get('p99', 0):.0f} | {'-' if mb is None else f'{mb:.2f}'} | "
                         f"{p['load_average_1m']:.2f} |")
        s = res["serve_score_check"]
        lines += ["", f"serve's scores vs offline inspection: {s['identical']} of "
                      f"{s['compared']} identical, max abs difference {s['max_abs_diff']:.3g}. "
                      "(Triton's match the runtime within 1e-5: tests/test_triton_server.py.)",
                  ""]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__, out=None, prog="python benchmarks/experiments/triton_vs_serve.py")
    p.add_argument("--work", required=True, help="folder for bundles, data, repositories, the "
                                                 "perf_analyzer venv and logs (reused)")
    p.add_argument("--methods", default="winclip,patch", help="comma-separated: winclip,patch")
    p.add_argument("--concurrency", type=int_list(1, "1,2,4,8"), default=[1, 2, 4, 8])
    p.add_argument("--duration", type=float, default=30.0, help="seconds per phase")
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="repeat the interleaved phases (a drifting machine)")
    p.add_argument("--images", type=positive_int, default=8, help="distinct test images")
    p.add_argument("--threads", type=positive_int, default=None, help="serve's onnxruntime "
                                                                      "threads")
    p.add_argument("--own-client", action="store_true",
                   help="drive Triton with our gRPC client instead of perf_analyzer")
    p.add_argument("--note", default="", help="free text stored with the result")
    args = p.parse_args(argv)
    args.methods = [m for m in csv_list(args.methods) if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    r = run(parse(argv), argv)
    failed = [p for res in r["methods"].values() for p in res["phases"]
              if "error" in p or p.get("errors")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
