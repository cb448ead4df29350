"""Running a study: every variant on the same images, with calibration's own evaluation.

Bundles are exported (torch) in this process; each variant's evaluation runs in a fresh child
process (no torch there), so that its peak resident memory is the runtime's own and a crash in
one variant cannot take the study down. Each finished (variant, shots) result is written as
its own JSON under ``out``/results and reused on a rerun with the same settings; so is each
zero-shot result of a pool-scored variant (MuSc) at one of the study's pool sizes.

A result's key (``RunKey``) is its shot count, or (0, P) for zero-shot in pools of at most P.
"""

from __future__ import annotations

import dataclasses
import json
import traceback
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Sequence, Union

from clipinspect.runtime.core.bundle import atomic_write_bytes
from clipinspect.runtime.core.errors import UsageError
from clipinspect.runtime.core.progress import Progress

from .spec import Study, Variant, bundle_key, pool_scored, result_folder

#: A result of a variant: its shot count, or (0, pool size) for a pool-scored zero-shot.
RunKey = Union[int, tuple[int, int]]


@dataclass(frozen=True)
class RunOptions:
    """work: bundle cache (default ``out``/work); force: recompute stored results; fmt: dataset
    layout; provider: onnxruntime provider; isolate: evaluate each variant in a child process
    (False only for debugging: peak memory then includes everything before it); command: the
    command line that ran the study, recorded in the report."""

    work: Path | None = None
    force: bool = False
    fmt: str = "auto"
    provider: str = "cpu"
    isolate: bool = True
    command: str | None = None


@dataclass(frozen=True)
class Job:
    """What a child process needs to evaluate one variant at the shot counts (and the
    zero-shot pool sizes) still missing."""

    variant: Variant
    bundle: str
    data: str
    categories: tuple[str, ...]
    shots: tuple[int, ...]
    study: Study
    fmt: str
    provider: str
    pools: tuple[int, ...] = ()


def run_keys(variant: Variant, study: Study) -> list[RunKey]:
    """The results a variant has in the study: one per shot count, and for a pool-scored
    method one zero-shot per pool size (when the study has 0 shots)."""
    keys: list[RunKey] = sorted(set(study.shots))
    if 0 in study.shots and pool_scored(variant.method):
        keys += [(0, p) for p in study.pool_sizes]
    return keys


def result_path(out: Path, variant: Variant, shots: int, pool: int | None = None) -> Path:
    """OUT/results/<folder>/<k>-shot.json (0-shot-pool<P>.json: zero-shot in pools of at most
    P), confined to OUT/results (a folder there that is a link elsewhere is refused, not
    followed)."""
    results = (out / "results").resolve()
    name = f"{int(shots)}-shot" + ("" if pool is None else f"-pool{int(pool)}")
    path = results / result_folder(variant.name) / f"{name}.json"
    if not path.resolve().is_relative_to(results):
        raise UsageError(f"the result file of variant {variant.name!r} would be "
                         f"{str(path.resolve())!r}, outside {str(results)!r} (a link?); "
                         "remove that link or choose another --out")
    return path


def variant_config(variant: Variant, study: Study, data: Path, categories: Sequence[str],
                   options: RunOptions) -> dict:
    """What a stored result must have been computed with to be reused."""
    return {"variant": variant.to_dict(), "bundle_key": bundle_key(variant, categories),
            "data": str(data.resolve()), "format": options.fmt, "categories": list(categories),
            "batch_size": study.batch_size, "pixel_size": study.pixel_size,
            "timing_images": study.timing_images, "provider": options.provider}


def _key_path(out: Path, variant: Variant, key: RunKey) -> Path:
    return result_path(out, variant, *key) if isinstance(key, tuple) else \
        result_path(out, variant, key)


def _key_config(config: dict, key: RunKey) -> dict:
    """A pool result's config names its pool size (the others' stay as they were)."""
    return {**config, "pool_size": key[1]} if isinstance(key, tuple) else config


def stored_result(path: Path, config: dict) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("config") != config or "error" in record.get("result", {}):
        return None
    return record["result"]


class ChildFailed(Exception):
    """A child process that raised, died or ran out of time; ``error`` is what the result
    records ("TypeError: ...", "TimeoutError: ..."), ``traceback`` the child's if it had one."""

    def __init__(self, error: str, trace: str = ""):
        super().__init__(error)
        self.error, self.traceback = error, trace


def _child(target: Callable[[Any], Any], arg: Any, conn) -> None:
    try:
        conn.send(("ok", target(arg)))
    except BaseException as e:  # the parent records it; the child only reports
        conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))
    finally:
        conn.close()


def run_in_child(target: Callable[[Any], Any], arg: Any, timeout_s: float) -> Any:
    """``target(arg)`` in a fresh (spawned) process: its value, or ChildFailed when it raised,
    died without answering, or took more than ``timeout_s`` (then it is killed)."""
    ctx = get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(target, arg, send), daemon=True)
    process.start()
    send.close()  # the child holds the only writing end: its death reads as end of file
    try:
        if not receive.poll(timeout_s):
            raise ChildFailed(f"TimeoutError: the evaluation did not finish within "
                              f"{timeout_s:g} s and was stopped (raise eval.timeout_s in the "
                              "study file, or --variant-timeout)")
        answer = receive.recv()
    except EOFError:
        process.join(5)
        raise ChildFailed(f"ChildProcessError: the evaluation process exited with code "
                          f"{process.exitcode} without a result (out of memory?)") from None
    finally:
        if process.is_alive():
            process.kill()
        process.join(5)
        receive.close()
    if answer[0] == "error":
        raise ChildFailed(answer[1], answer[2])
    return answer[1]


def run_variant(variant: Variant, study: Study, data: Path, out: Path, *,
                categories: Sequence[str], options: RunOptions) -> dict[RunKey, dict]:
    """{key: result} for one variant (``run_keys``): stored ones reused, the rest computed; a
    failure is recorded (error and traceback) for each result it concerns, never raised."""
    config = variant_config(variant, study, data, categories, options)
    keys = run_keys(variant, study)
    results: dict[RunKey, dict] = {}
    for key in keys:
        previous = None if options.force else stored_result(_key_path(out, variant, key),
                                                            _key_config(config, key))
        if previous is not None:
            results[key] = previous
    pending = tuple(key for key in keys if key not in results)
    if not pending:
        return results
    try:
        from .bundles import ensure_bundle

        path = ensure_bundle(variant, categories, options.work or out / "work", data)
        job = Job(variant, str(path), str(data), tuple(categories),
                  tuple(k for k in pending if not isinstance(k, tuple)), study, options.fmt,
                  options.provider, tuple(k[1] for k in pending if isinstance(k, tuple)))
        if options.isolate:
            computed = run_in_child(evaluate_job, job, study.timeout_s)
        else:
            computed = evaluate_job(job)
    except ChildFailed as e:
        computed = {k: {"error": e.error, "traceback": e.traceback} for k in pending}
    except Exception as e:  # one broken variant must not stop the study
        error = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        computed = {k: dict(error) for k in pending}
    for key in pending:
        results[key] = computed[key]
        atomic_write_bytes(_key_path(out, variant, key), (json.dumps(
            {"config": _key_config(config, key), "result": computed[key]}, indent=1) + "\n"
        ).encode())
    return {key: results[key] for key in keys}


def run_study(study: Study, data: str | Path, out: str | Path,
              options: RunOptions = RunOptions()) -> dict:
    """Run (or resume) the study; returns the report dict (``report.assemble``) and writes
    report.json, report.md, report.html and the plots to ``out``."""
    from clipinspect.calibration.datasets import dataset_categories

    from .report import assemble, write_reports

    data, out = Path(data), Path(out)
    categories = list(study.categories or dataset_categories(data, options.fmt))
    per_variant = {}
    with Progress(len(study.variants), "study", unit="variant") as bar:
        for variant in study.variants:
            per_variant[variant.name] = run_variant(variant, study, data, out,
                                                    categories=categories, options=options)
            bar.update(1)
    report = assemble(study, per_variant, data=data, categories=categories)
    if options.command:
        report = {"command": options.command, **report}
    write_reports(report, out)
    return report


def evaluate_job(job: Job) -> dict[RunKey, dict]:
    """Evaluate one variant (in the child process): calibration's ``evaluate_category`` on
    every category (once more per zero-shot pool size), then batch-1 latency, cost and peak
    memory. -> {key: result}."""
    from clipinspect.benchmarks.bench import peak_rss_mb, reset_peak_rss
    from clipinspect.calibration.evaluate import EvalOptions
    from clipinspect.runtime import Bundle, Inspector
    from clipinspect.runtime.core.names import ZERO_SHOT
    from clipinspect.runtime.methods import describe, gflops_per_image

    from .bundles import adapters_seen

    fresh = reset_peak_rss()
    v, precision = job.variant, job.variant.precision
    bundle = Bundle.open(job.bundle)
    seen, seen_source = adapters_seen(v, bundle)
    inspector = Inspector.open(bundle, precision, job.provider)
    pooled = inspector.pool_scored(ZERO_SHOT)
    options = EvalOptions(fmt=job.fmt, precisions=(precision,), shots=job.shots,
                          batch_size=job.study.batch_size, pixel_size=job.study.pixel_size,
                          provider=job.provider, resume=False)
    runs: list[tuple[RunKey, EvalOptions]] = [(k, options) for k in job.shots]
    runs += [((0, p), dataclasses.replace(options, shots=(0,), pool_size=p))
             for p in (job.pools if pooled else ())]
    per_options: dict[int, dict] = {}
    results: dict[RunKey, dict] = {(0, p): {"skipped": f"pool size {p} skipped: the bundle's "
                                            "images do not score each other"}
                                   for p in (() if pooled else job.pools)}
    for key, opts in runs:
        if id(opts) not in per_options:
            per_options[id(opts)] = _per_category(job, inspector, opts, v.name)
        k = key[0] if isinstance(key, tuple) else key
        results[key] = _shot_result(per_options[id(opts)], f"{precision}/{k}-shot", k, seen)
        if "skipped" not in results[key]:
            results[key]["latency"] = _latency(inspector, job, k)
            if pooled and k == 0:
                results[key]["pool_size"] = key[1] if isinstance(key, tuple) else None
    info = {"bundle": job.bundle, "method": describe(bundle.manifest),
            "gflops_per_image": gflops_per_image(bundle.manifest),
            "weights": bundle.manifest.model.weights.kind,
            "adapters_seen": seen, "adapters_seen_source": seen_source,
            **({"pool_scored": True} if pooled else {})}
    memory = {"peak_rss_mb": peak_rss_mb(), "peak_rss_fresh_process": fresh}
    return {k: {**r, **info, **memory} for k, r in results.items()}


def _per_category(job: Job, inspector, options, name: str) -> dict:
    """``evaluate_category``'s record of every category of the job, with ``options``."""
    from clipinspect.calibration.evaluate import evaluate_category

    pool = f", pools of at most {options.pool_size}" if options.pool_size else ""
    per_category = {}
    with Progress(_test_images(job), f"eval {name}{pool}") as bar:
        for c in job.categories:
            per_category[c] = evaluate_category({job.variant.precision: inspector},
                                                Path(job.data), c, options, bar)
    return per_category


def _test_images(job: Job) -> int:
    from clipinspect.calibration.datasets import load_dataset

    return len(load_dataset(job.data, job.fmt, list(job.categories), split="test"))


def _shot_result(per_category: dict, run: str, shots: int, seen: list[str] | None) -> dict:
    """One (variant, shots) result from ``evaluate_category``'s per-category records, or the
    reason the shot count was skipped."""
    from clipinspect.calibration.evaluate import mean_over_categories

    if not all(run in r["runs"] for r in per_category.values()):
        notes = [n for r in per_category.values() for n in r["notes"]
                 if n.startswith(f"{shots}-shot skipped")]
        return {"skipped": notes[0] if notes else f"{shots}-shot not evaluated"}
    categories = {c: {"images": r["images"], "anomalous": r["anomalous"], **r["runs"][run],
                      "seen_by_adapters": c in seen if seen else None,
                      "notes": r["notes"], **({"pools": r["pools"]} if "pools" in r else {})}
                  for c, r in per_category.items()}
    mean = mean_over_categories({c: {"runs": {run: r["runs"][run]}}
                                 for c, r in per_category.items()})[run]
    return {"categories": categories, "mean": mean}


def _latency(inspector, job: Job, shots: int) -> dict:
    """Batch-1 end-to-end latency (decode to thresholded map) on test images of the first
    category, by the benchmark's own timer and statistics; references from its train split.
    None for a pool-scored zero-shot: its images score each other, none is scored alone."""
    from clipinspect.benchmarks.bench import Workload, time_runtime
    from clipinspect.benchmarks.stats import summarize
    from clipinspect.calibration.datasets import load_dataset
    from clipinspect.runtime.core.names import ZERO_SHOT

    if shots == 0 and inspector.pool_scored(ZERO_SHOT):
        return None

    category = job.categories[0]
    test = [Path(s.path) for s in load_dataset(job.data, job.fmt, [category], split="test")]
    train = [Path(s.path) for s in load_dataset(job.data, job.fmt, [category], split="train")
             if not s.is_anomalous][:shots]
    memory = inspector.build_memory(train, category=category)[0] if shots else None
    mode = "few-shot" if shots else "zero-shot"
    warmup = 1  # the benchmark's default: the first run pays for lazy initialisation
    times = time_runtime(inspector, Workload(test, train, category), mode, memory, 1,
                         job.study.timing_images + warmup)
    stats = summarize(times["end_to_end"], warmup=warmup)
    return {"p50_ms": stats["p50_ms"], "p99_ms": stats["p99_ms"],
            "images_per_second": stats["images_per_second"], "runs": stats["runs"],
            "category": category, "batch_size": 1}
