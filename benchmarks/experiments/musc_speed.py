"""MuSc scoring speed: ours (the exported ONNX encoder, then the numpy + onnxruntime mutual
scoring of runtime/methods/musc_scoring.py) against an eager reproduction of the published code
(xrli-U/MuSc: open_clip tokens, LNAMD with Unfold and adaptive_avg_pool1d, MSM per image with
torch.cdist in float32, RsCIN), on the same pool of images, in the same process.

    python benchmarks/experiments/musc_speed.py --models ViT-S-16,ViT-B-16-plus-240 \\
        --pools 32,100,200 --out benchmarks/results/musc_speed_cpu

Workload: a random-weight bundle per model (``clipinspect export --method musc``, seed 0; the
same weights are loaded for torch with ``load_clip(model, None, 0)``), synthetic 256 px
``washer`` test images (calibration/synth.py, cycling through good and the defect kinds),
preprocessed once by the bundle (not timed); a pool of N is the first N of them and the N
images score each other (batch mode, zero-shot, RsCIN applied).

Variants, each a full run (features, then scoring) timed per stage:

- ``ours``: features = ``Inspector.backend.encode`` per batch (the encoder graph, aggregation
  included); scoring = ``musc_scoring.batch_scores`` (fast path, fp32 kernel; RsCIN by
  ``musc_scoring.rscin``, as batch_scores does it) and the maps upsampled to the input size;
- ``ours int8``: the same with the int8 block kernel (``int8=True``; the encoder stays fp32);
- ``theirs``: the published order, eagerly: ``MuscReference.tokens`` per batch (open_clip
  ``forward_intermediates``), then per r their LNAMD per batch (``MuscReference.lnamd``) and
  their MSM per layer (:func:`published_msm`, written here as models/modules/_MSM.py reads:
  float32, ``torch.cdist``, topk, the scores concatenated per image), means over layers then r,
  ``F.interpolate`` bilinear with align_corners, the maximum, ``MuscReference.rscin``.

Every repeat runs the three in turn, the order reversed on every other repeat (counted over
the pools of a model too, so that one repeat per pool still alternates) and a ``--settle``
pause before each run (thread pools go idle); medians over repeats. Peak memory: each variant
once more in a fresh interpreter (this script with ``--child``), reading the child's own
``VmHWM`` (/proc/self/status) after its setup (imports, model or sessions, the pool) and after
its run, the high-water mark reset in between (``/proc/self/clear_refs``). Not ``ru_maxrss``
from ``os.wait4``: Linux carries the parent's high-water mark into an exec'd child, so it
reports the parent's size when that is larger.

Equality: max |difference| between ours and theirs of the image scores before and after RsCIN,
of the maps (input size) and of the features; on pools up to ``--exact-max-pool`` both against
our float64 path (``exact=True``) run on each one's own features. The published loop's own
breakdown (cat, cdist, min, topk per image) and the GEMM rates (torch.mm and cdist against our
block kernel) are measured on random unit vectors of the target pool's shape.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np

from clipinspect.benchmarks.harness import finish, parser, synthetic_images
from clipinspect.benchmarks.report import load_text, machine_text

CATEGORY = "washer"
VARIANTS = ("ours", "ours int8", "theirs")
STAGES = ("features", "scoring", "end_to_end")
PROFILE_IMAGES = 3
KERNEL_CALLS = 3


class Output(NamedTuple):
    """One run's results: image scores after RsCIN (N,), before RsCIN (N,), maps (N, H, W)."""

    scores: np.ndarray
    peaks: np.ndarray
    maps: np.ndarray


# ------------------------------------------------------------------------------- ours
class Ours:
    """The deployed path: the bundle's encoder graph and the numpy / onnxruntime scoring."""

    def __init__(self, bundle: Path, threads: int | None):
        from clipinspect.runtime.core.inspector import Inspector

        self.insp = Inspector.open(bundle, threads=threads)
        m = self.insp.manifest
        self.section, self.grid = m.section, tuple(m.grid)
        self.size = tuple(m.preprocess.size)

    def features(self, x: np.ndarray, batch: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        parts = [self.insp.backend.encode(x[s:s + batch]) for s in range(0, len(x), batch)]
        names = self.section.features()
        feats = {n: np.concatenate([p[n] for p in parts]) for n in names}
        return feats, np.concatenate([p["image_embedding"] for p in parts])

    def score(self, feats: dict[str, np.ndarray], emb: np.ndarray, *, int8: bool = False,
              exact: bool = False) -> Output:
        from clipinspect.runtime.methods import musc_scoring as ms

        peaks, grids = ms.batch_scores(feats, emb, self.section, self.grid, self.size,
                                       exact=exact, use_rscin=False, int8=int8)
        scores = ms.rscin(peaks, emb.reshape(len(peaks), -1), self.section.rscin_k)
        return Output(scores.astype(np.float64), peaks, upsampled(grids, self.size))

    def run(self, x: np.ndarray, batch: int, *, int8: bool = False, keep: bool = False
            ) -> tuple[Output, dict[str, float], tuple | None]:
        t0 = time.perf_counter()
        feats, emb = self.features(x, batch)
        t1 = time.perf_counter()
        out = self.score(feats, emb, int8=int8)
        t2 = time.perf_counter()
        return out, {"features": t1 - t0, "scoring": t2 - t1}, (feats, emb) if keep else None


def upsampled(grids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, gh, gw) -> (N, H, W) float64, bilinear with align_corners (the published maps)."""
    from clipinspect.runtime.methods.musc_scoring import bilinear_matrix

    wy, wx = bilinear_matrix(size[0], grids.shape[1]), bilinear_matrix(size[1], grids.shape[2])
    return np.stack([wy @ g @ wx.T for g in grids])


# ----------------------------------------------------------------------------- theirs
def published_msm(Z):
    """models/modules/_MSM.py, ``MSM`` with ``compute_scores_fast`` (topmin_min 0, topmin_max
    0.3), as published: Z (N, P, C) float32 -> (N, P) float64 scores."""
    import torch

    image_num, patch_num, c = Z.shape
    anomaly_scores_matrix = torch.tensor([]).double()
    for i in range(image_num):
        Z_ref = torch.cat((Z[:i], Z[i + 1:]), dim=0)
        patch2image = torch.cdist(Z[i:i + 1], Z_ref.reshape(-1, c)).reshape(
            patch_num, image_num - 1, patch_num)
        patch2image = torch.min(patch2image, -1)[0]
        k_max, k_min = int(patch2image.shape[1] * 0.3), int(patch2image.shape[1] * 0)
        vals, _ = torch.topk(patch2image.float(), k_max, largest=False, sorted=True)
        vals, _ = torch.topk(vals.float(), k_max - k_min, largest=True, sorted=True)
        anomaly_scores_i = torch.mean(vals.clone(), dim=1).unsqueeze(0)
        anomaly_scores_matrix = torch.cat((anomaly_scores_matrix, anomaly_scores_i.double()),
                                          dim=0)
    return anomaly_scores_matrix


class Theirs:
    """The published pipeline, eagerly (MuscReference for the tokens, LNAMD and RsCIN)."""

    def __init__(self, model_name: str, bundle: Path, threads: int | None):
        import torch

        from clipinspect.export.exporter import load_clip
        from clipinspect.export.methods.musc import MuscReference
        from clipinspect.runtime.core.bundle import Bundle

        if threads:
            torch.set_num_threads(threads)
        model = load_clip(model_name, None, 0, warn_random=False)[0]
        self.ref = MuscReference.from_manifest(model, Bundle.open(bundle).manifest)

    def run(self, x: np.ndarray, batch: int, *, keep: bool = False
            ) -> tuple[Output, dict[str, float], tuple | None]:
        """make_category_data's order: all tokens, then per r LNAMD per batch and MSM per
        layer; the features stage is the tokens and LNAMD, the scoring stage the rest."""
        import torch

        from clipinspect.runtime.methods.musc_scoring import feature_name

        ref, t = self.ref, {"features": 0.0, "scoring": 0.0}
        kept: dict[str, np.ndarray] = {}
        with torch.no_grad():
            t0 = time.perf_counter()
            xt = torch.from_numpy(x)
            got = [ref.tokens(xt[s:s + batch]) for s in range(0, len(x), batch)]
            emb = torch.cat([g[0] for g in got]).numpy()
            t["features"] += time.perf_counter() - t0
            per_r = torch.tensor([]).double()
            for r in ref.r_list:
                t0 = time.perf_counter()
                z = [ref.lnamd(g[1], r) for g in got]
                layers = [torch.cat([b[li] for b in z]) for li in range(len(ref.layers))]
                t1 = time.perf_counter()
                t["features"] += t1 - t0
                maps_l = torch.stack([published_msm(zl) for zl in layers]).mean(0)
                per_r = torch.cat((per_r, maps_l.unsqueeze(0)), 0)
                t["scoring"] += time.perf_counter() - t1
                if keep:
                    kept.update({feature_name(n, r): zl.numpy()
                                 for n, zl in zip(ref.layers, layers)})
                del z, layers
            t0 = time.perf_counter()
            out = self.finish(per_r.mean(0), emb)
            t["scoring"] += time.perf_counter() - t0
        return out, t, (kept, emb) if keep else None

    def finish(self, scores, emb: np.ndarray) -> Output:
        """(N, P) scores -> maps at the input size, their maxima, RsCIN (as published)."""
        import torch.nn.functional as F

        n = scores.shape[0]
        maps = F.interpolate(scores.view(n, 1, *self.ref.grid), size=self.ref.size,
                             mode="bilinear", align_corners=True)
        peaks = maps.reshape(n, -1).max(-1).values.numpy()
        rscin = self.ref.rscin(peaks, emb).numpy().astype(np.float64)
        return Output(rscin, peaks, maps[:, 0].numpy())


# ------------------------------------------------------------------------------ setup
def prepare(model: str, work: Path, pool: int) -> tuple[Path, Path]:
    """(the model's MuSc bundle, exported once into ``work``; a .npy of ``pool`` preprocessed
    synthetic images)."""
    from clipinspect.export.exporter import ExportOptions, export_bundle
    from clipinspect.runtime.core.bundle import Bundle

    root = work / model
    bundle, images = root / "bundle", root / f"pool{pool}.npy"
    if not (bundle / "manifest.json").is_file():
        say(f"{model}: exporting the MuSc bundle (random weights) ...")
        export_bundle(ExportOptions(out=bundle, model=model, pretrained=None,
                                    categories=[CATEGORY], method="musc", warn_random=False,
                                    overwrite=True))
    if not images.is_file():
        say(f"{model}: rendering {pool} synthetic {CATEGORY} images ...")
        rgb, _ = synthetic_images(CATEGORY, pool, 0)
        prep = Bundle.open(bundle).preprocess
        np.save(images, np.stack([prep(im) for im in rgb]).astype(np.float32))
    return bundle, images


def say(msg: str) -> None:
    print(f"musc_speed: {msg}", file=sys.stderr, flush=True)


def run_variant(variant: str, runners: dict, x: np.ndarray, batch: int, *, keep: bool = False):
    if variant == "theirs":
        return runners["theirs"].run(x, batch, keep=keep)
    return runners["ours"].run(x, batch, int8=variant == "ours int8",
                               keep=keep and variant == "ours")


def warm_up(runners: dict, x: np.ndarray) -> None:
    """Sessions, kernels and torch's first calls, on 5 images (not timed)."""
    for v in VARIANTS:
        run_variant(v, runners, x[:5], 2)


# -------------------------------------------------------------------------- measuring
def measure_pool(runners: dict, x: np.ndarray, args: argparse.Namespace, turn: int = 0) -> dict:
    """Every variant ``--repeats`` times on the pool ``x``, interleaved (the order reversed
    when ``turn`` + repeat is odd) -> seconds per stage per run, medians, ratios, agreement
    (and the float64 comparison on small pools)."""
    n, exact = len(x), len(x) <= args.exact_max_pool
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    outputs, kept, orders = {}, {}, []
    for rep in range(args.repeats):
        order = VARIANTS if (turn + rep) % 2 == 0 else VARIANTS[::-1]
        orders.append(list(order))
        for v in order:
            time.sleep(args.settle)
            out, t, k = run_variant(v, runners, x, args.batch_size, keep=exact and rep == 0)
            t["end_to_end"] = t["features"] + t["scoring"]
            runs[v].append(t)
            say(f"pool {n}, repeat {rep + 1}/{args.repeats}, {v}: features {t['features']:.1f} s"
                f", scoring {t['scoring']:.1f} s ({n / t['end_to_end']:.2f} images/s)")
            if rep == 0:
                outputs[v] = out
            if k is not None:
                kept[v] = k
    row = {"images": n, "orders": orders, "runs": runs, "speed": speed_of(runs, n),
           "agreement": agreement(outputs)}
    if exact:
        row["exact"] = exact_comparison(runners["ours"], outputs, kept)
    return row


def speed_of(runs: dict[str, list[dict]], n: int) -> dict:
    """Median seconds and images/s per variant and stage; ratios per stage as the median of
    each repeat's ratio (the runs of one repeat are neighbours in time)."""
    out: dict = {"variants": {}, "ratios": {}}
    for v, ts in runs.items():
        out["variants"][v] = {s: {"median_s": statistics.median(t[s] for t in ts),
                                  "images_per_second": n / statistics.median(t[s] for t in ts)}
                              for s in STAGES}
    pairs = {"ours / theirs": ("ours", "theirs"), "ours int8 / theirs": ("ours int8", "theirs"),
             "ours int8 / ours": ("ours int8", "ours")}
    for name, (a, b) in pairs.items():
        out["ratios"][name] = {s: statistics.median(tb[s] / ta[s] for ta, tb in
                                                    zip(runs[a], runs[b])) for s in STAGES}
    return out


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def differences(a: Output, b: Output) -> dict:
    return {"scores": max_diff(a.scores, b.scores),
            "scores_before_rscin": max_diff(a.peaks, b.peaks), "maps": max_diff(a.maps, b.maps)}


def agreement(outputs: dict[str, Output]) -> dict:
    """ours vs theirs (max |difference|), ours int8 vs ours (that and the maps' Pearson)."""
    ours, int8 = outputs["ours"], outputs["ours int8"]
    pearson = float(np.corrcoef(ours.maps.ravel(), int8.maps.ravel())[0, 1])
    return {"ours_vs_theirs": differences(ours, outputs["theirs"]),
            "int8_vs_ours": {**differences(int8, ours), "map_pearson": pearson}}


def exact_comparison(ours: Ours, outputs: dict[str, Output], kept: dict) -> dict:
    """Our float64 path (``exact=True``) on each one's own features; each against it."""
    t0 = time.perf_counter()
    exact_ours = ours.score(*kept["ours"], exact=True)
    seconds = time.perf_counter() - t0
    exact_theirs = ours.score(*kept["theirs"], exact=True)
    return {"ours_vs_exact": differences(outputs["ours"], exact_ours),
            "int8_vs_exact": differences(outputs["ours int8"], exact_ours),
            "theirs_vs_exact": differences(outputs["theirs"], exact_theirs),
            "exact_scoring_s": seconds}


def feature_agreement(runners: dict, x: np.ndarray) -> dict:
    """max |difference| of ours' and theirs' features and embeddings on ``x`` (untimed)."""
    import torch

    from clipinspect.runtime.methods.musc_scoring import feature_name

    feats, emb = runners["ours"].features(x, len(x))
    ref = runners["theirs"].ref
    with torch.no_grad():
        emb_t, tokens = ref.tokens(torch.from_numpy(x))
        worst = 0.0
        for r in ref.r_list:
            for n, z in zip(ref.layers, ref.lnamd(tokens, r)):
                worst = max(worst, max_diff(feats[feature_name(n, r)], z.numpy()))
    return {"images": len(x), "features": worst, "image_embedding": max_diff(emb, emb_t.numpy())}


# ---------------------------------------------------------------- where the time goes
def unit_rows(n: int, p: int, c: int, seed: int = 0) -> np.ndarray:
    z = np.random.default_rng(seed).standard_normal((n, p, c)).astype(np.float32)
    return z / np.linalg.norm(z, axis=-1, keepdims=True)


def timed(fn, *a, **kw) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


def published_breakdown(z: np.ndarray) -> dict:
    """The published loop's steps for the first PROFILE_IMAGES images of one feature z (N, P,
    C): ms per image of the cat, the cdist, the min, the two topk and the mean; the GEMM rate
    of that cdist and of torch.mm on the same (P, C) x (C, (N - 1) P) product."""
    import torch

    Z = torch.from_numpy(z)
    n, p, c = Z.shape
    steps: dict[str, list[float]] = {k: [] for k in ("cat", "cdist", "min", "topk_mean", "mm")}
    for i in range(min(PROFILE_IMAGES + 1, n)):  # the first one warms up, not counted
        ref, t = timed(torch.cat, (Z[:i], Z[i + 1:]), dim=0)
        steps["cat"].append(t)
        d, t = timed(torch.cdist, Z[i:i + 1], ref.reshape(-1, c))
        steps["cdist"].append(t)
        m, t = timed(lambda: torch.min(d.reshape(p, n - 1, p), -1)[0])
        steps["min"].append(t)
        k = int((n - 1) * 0.3)
        _, t = timed(lambda: torch.mean(torch.topk(torch.topk(m, k, largest=False)[0], k)[0],
                                        dim=1))
        steps["topk_mean"].append(t)
        _, t = timed(torch.mm, Z[i], ref.reshape(-1, c).T)
        steps["mm"].append(t)
    gflop = 2.0 * p * (n - 1) * p * c / 1e9
    ms = {k: 1e3 * statistics.median(v[1:] or v) for k, v in steps.items()}
    loop = sum(v for k, v in ms.items() if k != "mm")
    return {"shape": [n, p, c], "images": min(PROFILE_IMAGES, n), "ms_per_image": ms,
            "share_of_loop": {k: v / loop for k, v in ms.items() if k != "mm"},
            "gflop_per_image": gflop, "cdist_gflops_per_s": gflop / ms["cdist"] * 1e3,
            "mm_gflops_per_s": gflop / ms["mm"] * 1e3}


def kernel_rates(z: np.ndarray) -> dict:
    """Our block kernel (musc_kernels.block_max, both directions) on one block of images
    against another, fp32 and int8: GFLOP (GOP) per second of its GEMM, median of calls."""
    from clipinspect.runtime.methods.musc_kernels import Quantised, block_max
    from clipinspect.runtime.methods.musc_scoring import BLOCK_ROWS

    n, p, c = z.shape
    per = max(1, min(BLOCK_ROWS // p, n // 2))
    flat, out = z.reshape(n * p, c), {"block_rows": per * p}
    for name, int8 in (("fp32", False), ("int8", True)):
        q = Quantised(flat, int8)
        block_max("cpu", q, q, (0, per * p), (per * p, 2 * per * p), p, both=True)  # session
        ts = [timed(block_max, "cpu", q, q, (0, per * p), (per * p, 2 * per * p), p,
                    both=True)[1] for _ in range(KERNEL_CALLS)]
        out[f"{name}_gflops_per_s"] = 2.0 * (per * p) ** 2 * c / statistics.median(ts) / 1e9
    return out


def where_time_goes(section, dims: tuple[int, int], pool: int) -> dict:
    """Breakdown and GEMM rates on random unit rows of a pool's shape (one feature), and the
    GEMM work of each scoring: theirs every ordered pair, ours every pair once."""
    from clipinspect.runtime.methods.musc_scoring import pair_gflops

    p, c = dims
    z = unit_rows(pool, p, c)
    features = len(section.features())
    pair = pair_gflops(p, c, features)
    return {"pool": pool, "published": published_breakdown(z), "ours_kernel": kernel_rates(z),
            "scoring_gflop": {"theirs": pair * pool * (pool - 1),
                              "ours": pair * pool * (pool - 1) / 2}}


# ------------------------------------------------------------------------ peak memory
def proc_status() -> dict[str, float]:
    """VmRSS and VmHWM of this process in MiB (Linux /proc/self/status)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child_main(spec: dict) -> int:
    """One variant's run in this fresh interpreter: what its setup (imports, model or
    sessions, the pool) and then its run hold at their peaks, in MiB."""
    started = proc_status()
    x = np.load(spec["images"], mmap_mode="r")[:spec["n"]].copy()
    if spec["variant"] == "theirs":
        runners = {"theirs": Theirs(spec["model"], Path(spec["bundle"]), spec["threads"])}
    else:
        runners = {"ours": Ours(Path(spec["bundle"]), spec["threads"])}
    setup = proc_status()
    was_reset = reset_peak()
    _, t, _ = run_variant(spec["variant"], runners, x, spec["batch"])
    end = proc_status()
    record = {"variant": spec["variant"], "images": spec["n"],
              "start_rss_mib": started["VmRSS"], "setup_rss_mib": setup["VmRSS"],
              "setup_peak_mib": setup["VmHWM"], "peak_reset": was_reset,
              "run_peak_mib": end["VmHWM"] if was_reset else None,
              "peak_mib": max(setup["VmHWM"], end["VmHWM"]), "end_rss_mib": end["VmRSS"],
              "seconds": t, "torch_imported": "torch" in sys.modules}
    Path(spec["out"]).write_text(json.dumps(record))
    return 0


def memory_runs(model: str, files: tuple[Path, Path], n: int, args: argparse.Namespace,
                work: Path) -> dict:
    """Each variant once in a fresh interpreter (this script with --child) -> its record."""
    out = {}
    for v in VARIANTS:
        result = work / f"child-{model}-{n}-{v.replace(' ', '_')}.json"
        spec = {"variant": v, "model": model, "bundle": str(files[0]), "images": str(files[1]),
                "n": n, "batch": args.batch_size, "threads": args.threads, "out": str(result)}
        time.sleep(args.settle)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                               json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the {v} memory run of {model}, pool {n}, failed:\n"
                             f"{proc.stderr[-3000:]}")
        out[v] = json.loads(result.read_text())
        say(f"pool {n}, {v} in a fresh process: peak {out[v]['peak_mib']:.0f} MiB")
    return out


# ----------------------------------------------------------------------------- driver
def measure_model(model: str, args: argparse.Namespace, work: Path) -> dict:
    """Every pool of one model: speed and agreement in this process, memory in children,
    the feature agreement and the breakdown once."""
    files = prepare(model, work, max(args.pools))
    runners = {"ours": Ours(files[0], args.threads),
               "theirs": Theirs(model, files[0], args.threads)}
    x_all = np.load(files[1])
    warm_up(runners, x_all)
    m = runners["ours"].insp.manifest
    row = {"model": model, "encoder_graph": runners["ours"].insp.encoder_graph,
           "patches": int(m.dims.patches), "width": int(m.dims.width),
           "image_size": list(m.preprocess.size), "layers": list(m.section.layers),
           "r_list": list(m.section.r_list), "rscin_k": list(m.section.rscin_k),
           "feature_agreement": feature_agreement(runners, x_all[:min(len(x_all), 8)]),
           "pools": {}}
    for i, n in enumerate(args.pools):
        say(f"{model}: pool {n} ...")
        row["pools"][str(n)] = measure_pool(runners, x_all[:n], args, i * args.repeats)
    prof = min(args.pools, key=lambda n: abs(n - args.target_pool))
    row["breakdown"] = where_time_goes(m.section, (row["patches"], row["width"]), prof)
    del runners
    if not args.no_memory:
        for n in (args.pools if args.memory_pools is None else
                  [n for n in args.pools if n in args.memory_pools]):
            row["pools"][str(n)]["memory"] = memory_runs(model, files, n, args, work)
    return row


def run(args: argparse.Namespace, work: Path) -> dict:
    import torch

    t0 = time.perf_counter()
    load_start = list(os.getloadavg())
    models = [measure_model(m, args, work) for m in args.models]
    verdict = target(models, args)
    from clipinspect.benchmarks.report import environment

    env = environment()
    versions = {**env["versions"], **{k: v for k, v in env["machine"]["versions"].items()
                                      if k in ("torch", "open_clip_torch")}}
    return {"benchmark": "musc_speed", "category": CATEGORY, "weights": "random (seed 0)",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "repeats": args.repeats, "batch_size": args.batch_size, "settle_s": args.settle,
            "threads": {"asked": args.threads, "torch": torch.get_num_threads(),
                        "onnxruntime_kernel": "onnxruntime's default (all cores)"},
            "versions": versions, "load_average_start": load_start,
            "tolerance": args.tolerance, "target_ratio": args.target_ratio,
            "target_pool": args.target_pool, "models": models, "target": verdict,
            "wall_s": time.perf_counter() - t0}


def target(models: list[dict], args: argparse.Namespace) -> dict:
    """The issue's target at ``--target-pool``: ours (fp32) end to end >= ``--target-ratio``
    times theirs, and scores (before and after RsCIN) and maps within ``--tolerance``."""
    per: dict = {}
    for m in models:
        row = m["pools"].get(str(args.target_pool))
        if row is None:
            per[m["model"]] = None
            continue
        ratios = row["speed"]["ratios"]["ours / theirs"]
        diffs = row["agreement"]["ours_vs_theirs"]
        per[m["model"]] = {"ratio": ratios["end_to_end"], "scoring_ratio": ratios["scoring"],
                           "features_ratio": ratios["features"],
                           "fast_enough": ratios["end_to_end"] >= args.target_ratio,
                           "scoring_fast_enough": ratios["scoring"] >= args.target_ratio,
                           "worst_difference": max(diffs.values()),
                           "equal": max(diffs.values()) <= args.tolerance}

    def met(key: str) -> bool:
        return bool(per) and all(v is not None and v[key] and v["equal"] for v in per.values())
    return {"met": met("fast_enough"), "scoring_met": met("scoring_fast_enough"),
            "per_model": per}


# ----------------------------------------------------------------------------- report
def render(r: dict) -> str:
    return "\n".join([*header_lines(r), *verdict_lines(r), *speed_lines(r),
                      *agreement_lines(r), *memory_lines(r), *breakdown_lines(r)]) + "\n"


def header_lines(r: dict) -> list[str]:
    v = r["versions"]
    libs = ", ".join(f"{k} {v[k]}" for k in ("numpy", "onnxruntime", "torch", "open_clip_torch")
                     if k in v)
    first = r["models"][0] if r["models"] else {}
    return [
        "# MuSc scoring speed: ours vs the published loop (eager)", "",
        f"Command: `{r['command']}`", "",
        f"Machine: {machine_text(r['machine'])}; {libs}; load average at the start "
        f"{load_text(r['load_average_start'])}, at the end {load_text(r['load_average'])}; "
        f"{r['date']}; {r['wall_s']:.0f} s.", "",
        f"Workload: {r['weights']} weights, synthetic 256 px `{r['category']}` test images "
        "(good and defect kinds in turn) preprocessed once (not timed); a pool of N images "
        "scores itself (batch mode, RsCIN k " + str(first.get("rscin_k", "")) + "). Encoders "
        f"at batch {r['batch_size']}; torch {r['threads']['torch']} threads, onnxruntime's "
        f"sessions their default. {r['repeats']} repeat(s) per pool, the three variants in "
        "turn, the order reversed on every other repeat (counted over a model's pools; "
        "`orders` in the JSON), a "
        f"{r['settle_s']:g} s pause before each run; medians over repeats, ratios the median "
        "of each repeat's ratio.", "",
        "- ours: `Inspector.backend.encode` (the encoder graph, LNAMD included), then "
        "`musc_scoring.batch_scores` (fp32 block kernel, each pair of images once) and "
        "`musc_scoring.rscin`, maps upsampled to the input size;",
        "- ours int8: the same with the int8 block kernel (`int8=True`; the encoder stays fp32);",
        "- theirs: the published code's order eagerly: open_clip tokens per batch "
        "(`MuscReference.tokens`), per r LNAMD per batch (Unfold + adaptive_avg_pool1d) and "
        "MSM per layer (`published_msm`: per image `torch.cat`, float32 `torch.cdist`, min, "
        "topk, mean), means over layers then r, bilinear align_corners upsampling, max, "
        "RsCIN.", "",
        "Stages: features = encoder (+ LNAMD for theirs); scoring = mutual scoring, maps, "
        "RsCIN.", ""]


def verdict_lines(r: dict) -> list[str]:
    t, tol = r["target"], r["tolerance"]
    lines = [f"## Target: ours >= {r['target_ratio']:g}x theirs at a pool of "
             f"{r['target_pool']}, results equal within {tol:g}", "",
             f"**End to end (features and scoring): {'met' if t['met'] else 'NOT met'}.** "
             f"On the scoring stage alone (our scoring against the published MSM loop, maps "
             f"and RsCIN): {'met' if t['scoring_met'] else 'NOT met'}.", ""]
    for model, v in t["per_model"].items():
        if v is None:
            lines.append(f"- {model}: pool {r['target_pool']} not measured.")
            continue
        lines.append(
            f"- {model}: ours {v['ratio']:.2f}x theirs end to end (features "
            f"{v['features_ratio']:.2f}x, scoring {v['scoring_ratio']:.2f}x): end to end "
            f"{'fast enough' if v['fast_enough'] else 'too slow'}, scoring "
            f"{'fast enough' if v['scoring_fast_enough'] else 'too slow'}; largest difference "
            f"{v['worst_difference']:.1e}: {'equal' if v['equal'] else 'NOT equal'} within "
            f"{tol:g}.")
    lines += ["", *reason_lines(r), ""]
    return lines


def reason_lines(r: dict) -> list[str]:
    """Why the ratio is what it is, from the measured figures of the target pool."""
    out = []
    for m in r["models"]:
        b, row = m["breakdown"], m["pools"].get(str(r["target_pool"]))
        if row is None:
            continue
        pub, kern, g = b["published"], b["ours_kernel"], b["scoring_gflop"]
        sp = row["speed"]["variants"]
        eff = {v: g["ours" if v.startswith("ours") else "theirs"] / sp[v]["scoring"]["median_s"]
               for v in ("ours", "theirs")}
        bound = 2 * kern["fp32_gflops_per_s"] / pub["cdist_gflops_per_s"]
        share = sp["theirs"]["scoring"]["median_s"] / sp["theirs"]["end_to_end"]["median_s"]
        out.append(
            f"{m['model']}, pool {row['images']}: theirs spends {share:.0%} of its time in the "
            f"scoring. Its GEMM work is {g['theirs']:.0f} GFLOP (every ordered pair of images, "
            f"inside cdist), ours {g['ours']:.0f} GFLOP (each pair once, both directions from "
            f"one product): {eff['theirs']:.1f} and {eff['ours']:.1f} GFLOP/s of scoring time "
            f"({1e3 / eff['theirs']:.1f} and {1e3 / eff['ours']:.1f} ms per GFLOP). The GEMMs "
            f"alone (pool {b['pool']}, random unit rows): torch.cdist "
            f"{pub['cdist_gflops_per_s']:.1f} GFLOP/s, torch.mm {pub['mm_gflops_per_s']:.1f}, "
            f"our fp32 block kernel {kern['fp32_gflops_per_s']:.1f} (int8 "
            f"{kern['int8_gflops_per_s']:.1f} GOP/s): each pair once at these rates predicts "
            f"an fp32 scoring ratio near 2 x {kern['fp32_gflops_per_s']:.1f} / "
            f"{pub['cdist_gflops_per_s']:.1f} = {bound:.2f}x; measured "
            f"{row['speed']['ratios']['ours / theirs']['scoring']:.2f}x. "
            + features_sentence(sp))
        out.append(equality_sentence(m, row))
    if out:
        out.insert(0, "Measured figures:" if r["target"]["met"] else
                   "Measured reason (not met):")
    return out


def features_sentence(sp: dict) -> str:
    """The features stage's ratio and the end-to-end ceiling it sets (Amdahl)."""
    ours, theirs = sp["ours"], sp["theirs"]
    ceiling = theirs["end_to_end"]["median_s"] / ours["features"]["median_s"]
    return (f"Features: ours {ours['features']['median_s']:.1f} s (encoder graph), theirs "
            f"{theirs['features']['median_s']:.1f} s (eager tokens + LNAMD): even with a free "
            f"scoring stage ours would be at most {ceiling:.2f}x theirs end to end.")


def equality_sentence(m: dict, row: dict) -> str:
    """The target pool's worst difference, and each one's worst against our float64 path on
    the pools where that ran."""
    worst = max(row["agreement"]["ours_vs_theirs"].values())
    exact = [(n, p["exact"]) for n, p in m["pools"].items() if "exact" in p]
    text = f"Equality ({m['model']}, pool {row['images']}): ours vs theirs at most {worst:.1e}"
    if exact:
        ours = max(max(e["ours_vs_exact"].values()) for _, e in exact)
        theirs = max(max(e["theirs_vs_exact"].values()) for _, e in exact)
        text += (f"; against our float64 path (pools {', '.join(n for n, _ in exact)}, each "
                 f"on its own features) ours at most {ours:.1e}, theirs (float32 cdist) at "
                 f"most {theirs:.1e}")
    return text + "."


def speed_lines(r: dict) -> list[str]:
    lines = ["## Speed (images/s, median over repeats)", "",
             "| model | pool | variant | features | scoring | end to end |",
             "|---|---|---|---|---|---|"]
    for m in r["models"]:
        for n, row in m["pools"].items():
            for v, s in row["speed"]["variants"].items():
                lines.append(f"| {m['model']} | {n} | {v} | "
                             + " | ".join(f"{s[k]['images_per_second']:.3g}" for k in STAGES)
                             + " |")
    lines += ["", "Ratios (speed of the first over the second):", "",
              "| model | pool | ratio | features | scoring | end to end |",
              "|---|---|---|---|---|---|"]
    for m in r["models"]:
        for n, row in m["pools"].items():
            for name, x in row["speed"]["ratios"].items():
                lines.append(f"| {m['model']} | {n} | {name} | "
                             + " | ".join(f"{x[k]:.2f}x" for k in STAGES) + " |")
    return lines + [""]


def diff_cells(d: dict) -> str:
    return f"{d['scores_before_rscin']:.1e} | {d['scores']:.1e} | {d['maps']:.1e}"


def agreement_lines(r: dict) -> list[str]:
    lines = ["## Equality (max |difference|)", "",
             "Each one's own features: ours from the encoder graph, theirs from torch (their "
             "largest difference on the first images: "
             + "; ".join(f"{m['model']} features {m['feature_agreement']['features']:.1e}, "
                         f"embedding {m['feature_agreement']['image_embedding']:.1e}"
                         for m in r["models"]) + "). float32 cdist computes d = sqrt(|a|^2 + "
             "|b|^2 - 2 a.b), whose own error near d = 0 can reach ~1e-3; our fast path "
             "recomputes distances below 0.032 in float64.", "",
             "| model | pool | compared | scores before RsCIN | scores | maps |",
             "|---|---|---|---|---|---|"]
    for m in r["models"]:
        for n, row in m["pools"].items():
            rows = [("ours vs theirs", row["agreement"]["ours_vs_theirs"])]
            ex = row.get("exact")
            if ex:
                rows += [("ours vs float64 (ours' features)", ex["ours_vs_exact"]),
                         ("theirs vs float64 (theirs' features)", ex["theirs_vs_exact"]),
                         ("ours int8 vs float64 (ours' features)", ex["int8_vs_exact"])]
            lines += [f"| {m['model']} | {n} | {name} | {diff_cells(d)} |" for name, d in rows]
    lines += ["", "Our int8 kernel against our fp32 (agreement, not equality):", "",
              "| model | pool | scores before RsCIN | scores | maps | map Pearson |",
              "|---|---|---|---|---|---|"]
    for m in r["models"]:
        for n, row in m["pools"].items():
            d = row["agreement"]["int8_vs_ours"]
            lines.append(f"| {m['model']} | {n} | {diff_cells(d)} | {d['map_pearson']:.6f} |")
    return lines + [""]


def memory_lines(r: dict) -> list[str]:
    if not any("memory" in row for m in r["models"] for row in m["pools"].values()):
        return ["## Peak memory", "", "Not measured.", ""]
    lines = ["## Peak memory (MiB, each run in a fresh interpreter)", "",
             "Each variant once more in a fresh `python` (this script with `--child`): its own "
             "`VmHWM` from /proc/self/status, reset after the setup through "
             "/proc/self/clear_refs. Setup: interpreter, imports, the model (torch) or the "
             "sessions (onnxruntime), the preprocessed pool. Not `ru_maxrss` of `os.wait4`: "
             "Linux carries the parent's high-water mark into an exec'd child.", "",
             "| model | pool | variant | RSS after setup | peak of the run | peak overall | "
             "run adds | torch loaded | seconds (cold, one run) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in r["models"]:
        for n, row in m["pools"].items():
            for v, c in row.get("memory", {}).items():
                run_peak = c["run_peak_mib"]
                adds = "-" if run_peak is None else f"{run_peak - c['setup_rss_mib']:.0f}"
                secs = c["seconds"]["features"] + c["seconds"]["scoring"]
                lines.append(f"| {m['model']} | {n} | {v} | {c['setup_rss_mib']:.0f} | "
                             f"{'-' if run_peak is None else f'{run_peak:.0f}'} | "
                             f"{c['peak_mib']:.0f} | {adds} | "
                             f"{'yes' if c['torch_imported'] else 'no'} | {secs:.1f} |")
    return lines + [""]


def breakdown_lines(r: dict) -> list[str]:
    lines = ["## Where the published loop spends its time", "",
             f"Per image of one feature (random unit rows of the pool's shape, median of "
             f"{PROFILE_IMAGES} images), and the GEMM rates of the same product:", "",
             "| model | pool (P, C) | cat ms | cdist ms | min ms | topk + mean ms | cdist "
             "GFLOP/s | torch.mm GFLOP/s | ours fp32 kernel GFLOP/s | ours int8 kernel GOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in r["models"]:
        b = m["breakdown"]
        p, k = b["published"], b["ours_kernel"]
        ms, sh = p["ms_per_image"], p["share_of_loop"]
        cells = " | ".join(f"{ms[s]:.1f} ({sh[s]:.0%})" for s in ("cat", "cdist", "min",
                                                                    "topk_mean"))
        lines.append(f"| {m['model']} | {b['pool']} ({p['shape'][1]}, {p['shape'][2]}) | "
                     f"{cells} | {p['cdist_gflops_per_s']:.1f} | {p['mm_gflops_per_s']:.1f} | "
                     f"{k['fp32_gflops_per_s']:.1f} | {k['int8_gflops_per_s']:.1f} |")
    return lines + ["", "Our kernel: one call of `musc_kernels.block_max` (both directions) "
                    "on a block of up to BLOCK_ROWS rows against another, median of "
                    f"{KERNEL_CALLS} calls.", ""]


# ------------------------------------------------------------------------------- main
def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = parser(__doc__, out="benchmarks/results/musc_speed_cpu")
    ap.add_argument("--models", default="ViT-S-16,ViT-B-16-plus-240",
                    help="open_clip models, random weights (default ViT-S-16,ViT-B-16-plus-240)")
    ap.add_argument("--pools", type=int_list, default=[32, 100, 200],
                    help="pool sizes, images scoring each other (default 32,100,200)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats (default 1)")
    ap.add_argument("--batch-size", type=int, default=4,
                    help="encoder batch of both (default 4, the published batch_size)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads and the encoder session's (default: each one's own)")
    ap.add_argument("--work", default=None, help="folder for the bundles and the pool "
                    "(reused when there; default a temporary folder)")
    ap.add_argument("--exact-max-pool", type=int, default=32,
                    help="pools up to this size are also compared with the float64 path")
    ap.add_argument("--settle", type=float, default=1.0, help="pause before each run, s")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    ap.add_argument("--memory-pools", type=int_list, default=None,
                    help="pools whose peak memory is measured (default: every pool of --pools)")
    ap.add_argument("--target-ratio", type=float, default=5.0)
    ap.add_argument("--target-pool", type=int, default=100)
    ap.add_argument("--tolerance", type=float, default=1e-4)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.child is None and (not args.pools or min(args.pools) < 5 or args.repeats < 1):
        ap.error("--pools: sizes of at least 5 images (MuSc scores each against >= 4 others); "
                 "--repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child is not None:
        return child_main(json.loads(args.child))
    with tempfile.TemporaryDirectory(prefix="musc-speed-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = run(args, work)
    placeholders = {args.work: "WORK"} if args.work else None
    finish(result, args.out, render, script=__file__, argv=argv, placeholders=placeholders)
    return 0


if __name__ == "__main__":
    sys.exit(main())
