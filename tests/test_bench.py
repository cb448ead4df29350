"""clipinspect bench: statistics with known timings, the stream accounting, out-of-memory
handling, and one small end-to-end sweep."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from clipinspect.benchmarks import bench
from clipinspect.benchmarks.report import command_line
from clipinspect.benchmarks.stats import interleaved_rounds, ratios, run_stream, summarize
from clipinspect.runtime import Bundle, Inspector
from clipinspect.runtime.core.errors import UsageError


def test_summary_excludes_warmup_and_matches_numpy():
    runs = [9.0, 0.010, 0.030, 0.020, 0.040]  # a slow first (warm-up) run
    s = summarize(runs, warmup=1, images_per_run=4)
    kept = np.array(runs[1:]) * 1e3
    assert s["runs"] == 4 and s["warmup_excluded"] == 1
    assert s["mean_ms"] == pytest.approx(25.0) and s["max_ms"] == pytest.approx(40.0)
    assert s["p50_ms"] == pytest.approx(25.0)  # mean of the two middle runs
    for p in (90, 95, 99):
        assert s[f"p{p}_ms"] == pytest.approx(np.percentile(kept, p))
    assert s["p99_ms"] == pytest.approx(30 + 0.97 * 10)  # linear between 30 and 40 ms
    assert s["images_per_second"] == pytest.approx(4 / 0.025)


def test_summary_refuses_to_summarize_nothing():
    with pytest.raises(ValueError, match="no runs left"):
        summarize([0.1, 0.2], warmup=2)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def sleep(self, dt):
        self.now += dt


def test_interleaved_rounds_cycle_through_the_variants_and_take_medians():
    clock, order = FakeClock(), []
    cost = {0: [1.0, 3.0, 2.0], 1: [4.0, 4.0, 10.0]}  # seconds per round of each variant

    def run(i):
        order.append(i)
        clock.sleep(cost[i][order.count(i) - 1])
    seconds, rates = interleaved_rounds(["a", "b"], run, 3, 8, clock=clock,
                                        progress=lambda msg: None)
    assert order == [0, 1, 0, 1, 0, 1]  # a, b, a, b: drift hits both alike
    assert seconds == [cost[0], cost[1]]
    assert rates == [pytest.approx(8 / 2.0), pytest.approx(8 / 4.0)]
    assert ratios(dict(zip("ab", rates)), "a") == {"a": 1.0, "b": pytest.approx(0.5)}
    with pytest.raises(ValueError, match="no rate for the base 'c'"):
        ratios({"a": 1.0}, "c")
    with pytest.raises(ValueError, match="rounds >= 1"):
        interleaved_rounds(["a"], run, 0, 8)


def test_a_result_names_its_command_with_placeholders_for_this_machine_s_paths():
    assert command_line("python benchmarks/experiments/x.py",
                        ["/tmp/b", "--calibration", "/tmp/b/train", "--note", "a b", "--w",
                         "/tmp/bb"], {"/tmp/b": "BUNDLE"}) == (
        "python benchmarks/experiments/x.py BUNDLE --calibration BUNDLE/train --note 'a b' "
        "--w /tmp/bb")
    options = bench.BenchOptions(precisions=("fp32", "int8"), batches=(1, 4), baseline=False,
                                 rss_megapixels=(), stream_fps=0.5)
    assert options.command("out") == (
        "clipinspect bench BUNDLE --out out --backends cpu --precisions fp32,int8 --modes "
        "few-shot --batch-sizes 1,4 --shots 4 --runs 5 --warmup 1 --images 16 --rss-megapixels "
        "none --no-baseline --stream-fps 0.5 --stream-frames 30")


def test_stream_accounting_with_known_service_times():
    clock = FakeClock()
    service = [0.05, 0.25, 0.05, 0.05, 0.05]

    def process(i):
        clock.now += service[i]

    res = run_stream(process, fps=10, frames=5, deadline_s=0.12, clock=clock, sleep=clock.sleep)
    np.testing.assert_allclose(res.start, [0, 0.1, 0.35, 0.40, 0.45], atol=1e-9)
    np.testing.assert_allclose(res.finish, [0.05, 0.35, 0.40, 0.45, 0.50], atol=1e-9)
    s = res.summary()
    assert s["deadline_misses"] == 3  # latencies 0.25, 0.20, 0.15 exceed 0.12
    assert s["queueing_ms"]["max"] == pytest.approx(150)
    assert s["latency_ms"]["max"] == pytest.approx(250)
    assert s["sustained"]  # the last frame is back within its deadline


def test_stream_that_cannot_keep_up_is_reported():
    clock = FakeClock()
    res = run_stream(lambda i: setattr(clock, "now", clock.now + 0.2), fps=10, frames=20,
                     clock=clock, sleep=clock.sleep)
    s = res.summary()
    assert s["deadline_misses"] == 20 and not s["sustained"]  # each frame takes 2 periods
    assert s["queueing_ms"]["max"] == pytest.approx(19 * 100, rel=1e-6)


class SleepyBackend:
    """Encoder 30 ms, head 10 ms per batch: stage times must come out as that."""

    def __init__(self, grid):
        self.grid = grid

    def encode(self, images):
        time.sleep(0.03)
        return {"n": len(images)}

    def score(self, encoded, head, extra):
        time.sleep(0.01)
        n = encoded["n"]
        return {"image_score": np.zeros(n, np.float32),
                "anomaly_grid": np.zeros((n, *self.grid), np.float32)}


def test_stage_times_of_a_backend_with_known_timings(tiny_bundle_path, tmp_path):
    b = Bundle.open(tiny_bundle_path)
    inspector = Inspector(b, SleepyBackend(b.grid), "fp32")
    work = bench.make_workload(b, tmp_path, 3, 0)
    times = bench.time_runtime(inspector, work, "zero-shot", None, 2, 4)
    enc, head = summarize(times["encode"]), summarize(times["score"])
    assert 30 <= enc["p50_ms"] < 45 and 10 <= head["p50_ms"] < 25
    e2e = np.array(times["end_to_end"])
    parts = sum(np.array(times[s]) for s in ("load", "encode", "score", "post"))
    np.testing.assert_allclose(e2e, parts, rtol=1e-6)


def test_stages_are_the_inspector_s_and_old_result_files_still_read():
    inspector_stages = tuple(Inspector(None, None, "fp32").stage_seconds)
    assert bench.STAGES == (*inspector_stages, "end_to_end")
    assert inspector_stages == ("load", "encode", "score", "post")
    old = {"stages": {"decode": {"p50_ms": 1.0}, "encoder": {"p50_ms": 2.0},
                      "head": {"p50_ms": 3.0}, "post": {"p50_ms": 4.0}}}
    assert [bench.stage(old, s)["p50_ms"] for s in inspector_stages] == [1.0, 2.0, 3.0, 4.0]
    committed = Path(__file__).parents[1] / "benchmarks/results/bench_cpu_b16p/bench.json"
    if committed.is_file():  # written before the stage names were one vocabulary
        text = bench.render(json.loads(committed.read_text()))
        assert "| load p50 | encode p50 | score p50 | post p50 |" in text


def test_out_of_memory_stops_larger_batches_cleanly():
    result = {"rows": [], "skipped": []}

    def timer(mode, memory, batch):
        if batch >= 4:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 2: "
                               "out of memory")
        return {s: [0.01 * batch] * 3 for s in bench.STAGES}

    bench._sweep(result, bench.Target("runtime", "cuda", "fp16"),
                 bench.BenchOptions(modes=["zero-shot"], batches=[1, 2, 4, 8], runs=2, warmup=1),
                 lambda mode: None, timer, lambda msg: None)
    assert [r["batch"] for r in result["rows"]] == [1, 2]
    assert result["skipped"] == [{"what": "runtime cuda/fp16/zero-shot batch >= 4",
                                  "reason": "out of memory"}]


def test_other_errors_are_not_mistaken_for_out_of_memory():
    def timer(mode, memory, batch):
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError):
        bench._sweep({"rows": [], "skipped": []}, bench.Target("runtime", "cpu", "fp32"),
                     bench.BenchOptions(modes=["zero-shot"], batches=[1], runs=1, warmup=0),
                     lambda mode: None, timer, lambda msg: None)


def test_bench_end_to_end_with_baseline(small_bundle_path, tmp_path):
    out = tmp_path / "bench"
    r = bench.run_bench(small_bundle_path, out, bench.BenchOptions(
        backends=["cpu", "cuda"], precisions=["fp32", "int8"], modes=["zero-shot", "few-shot"],
        batches=[1, 2], shots=1, runs=2, warmup=0, images=3, stream_fps=50, stream_frames=3,
        rss_megapixels=[1]))
    kinds = {(row["kind"], row["mode"], row["batch"]) for row in r["rows"]}
    assert kinds == {(k, m, b) for k in ("runtime", "pytorch") for m in ("zero-shot", "few-shot")
                     for b in (1, 2)}
    for row in r["rows"]:
        assert row["stages"]["end_to_end"]["runs"] == 2
        assert row["peak_host_rss_mb"] > 0
        if row["kind"] == "runtime":
            assert row["ratio_to_pytorch_fp32"] > 0
    skipped = " ".join(s["what"] for s in r["skipped"])
    assert "backend cuda" in skipped and "cpu/int8" in skipped
    assert [(s["precision"], s["frames"], s["fps"]) for s in r["stream"]] == [("fp32", 3, 50)]
    gflops = r["ceiling"]["gflops_per_image"]
    assert gflops == pytest.approx(bench.gflops_per_image(Bundle.open(small_bundle_path)))
    for row in (row for row in r["rows"] if row["kind"] == "runtime"):
        ceiling = row["cpu_fp32_gemm_peak_gflops_per_second"] / gflops
        assert row["cpu_fp32_ceiling_images_per_second"] == pytest.approx(ceiling)
        assert row["share_of_cpu_fp32_ceiling"] == pytest.approx(row["images_per_second"] / ceiling)
    assert "Ceiling:" in (out / "bench.md").read_text()
    saved = json.loads((out / "bench.json").read_text())
    assert saved["schema"] == "clipinspect-bench/1" and saved["machine"]["logical_cores"] >= 1
    md = (out / "bench.md").read_text()
    assert "| runtime | cpu | fp32 | few-shot | 2 |" in md and "Stream mode:" in md
    assert (out / "bench.png").stat().st_size > 1000
    (rss,) = saved["rss_per_image"]
    assert rss["megapixels"] == 1 and rss["error"] is None and rss["per_image_mb"] >= 0
    assert rss["peak_rss_mb"] >= rss["steady_peak_rss_mb"] > 0
    assert "Peak RSS per image" in md and "| 1 MP | 1155x866 |" in md


def test_bench_refuses_unknown_names(tiny_bundle_path, tmp_path):
    with pytest.raises(UsageError, match="unknown mode 'patch'"):
        bench.run_bench(tiny_bundle_path, tmp_path, bench.BenchOptions(modes=["patch"]))


def test_transformer_depth_from_manifest_or_graph(bundle_copy):
    b = Bundle.open(bundle_copy)
    assert b.manifest.dims.layers == 12 and bench.transformer_layers(b) == 12
    b.manifest.dims.layers = None  # a bundle exported before the depth was recorded
    assert bench.transformer_layers(b) == 12


def test_every_method_has_a_cost_model():
    """bench's CPU ceiling needs one for whatever method a bundle holds."""
    from clipinspect.runtime.core.manifest import Dims
    from clipinspect.runtime.methods import METHODS, gflops_per_image

    from clipinspect.runtime.methods import full_pass_gflops

    from clipinspect.runtime.methods.aprillab import AprilLabSection, Projections
    from clipinspect.runtime.methods.patch import PatchSection
    from clipinspect.runtime.methods.winclip import WinClipSection

    from clipinspect.runtime.methods.musc import MuscSection

    sections = {"winclip": WinClipSection([2], {"2": 169}), "patch": PatchSection(1),
                "alfa": PatchSection(1),
                "aprillab": AprilLabSection([3, 6, 9, 12], Projections("random", seed=0)),
                "musc": MuscSection([3, 6, 9, 12], [1, 3, 5], [1, 2, 3], 0.3, None, 100)}
    assert set(sections) == set(METHODS)
    for name in METHODS:  # each adds its own work to the one ordinary pass
        manifest = SimpleNamespace(dims=Dims(embed=384, width=384, patches=196, layers=12),
                                   grid=(14, 14), patch_size=16, outputs=None, method=name,
                                   section=sections[name])
        if name == "musc":  # one pass; its scoring's cost depends on the pool (pair_gflops)
            assert gflops_per_image(manifest) == full_pass_gflops(manifest, 12)
            continue
        assert gflops_per_image(manifest) > full_pass_gflops(manifest, 12)
    # ViT-L-14-336 at 518 x 518 with APRIL-GAN's four levels: one pass (1,370 tokens) plus
    # four 1024 -> 768 projections of the 1,369 patch tokens.
    manifest = SimpleNamespace(method="aprillab", dims=Dims(embed=768, width=1024, patches=1369),
                               patch_size=14, outputs=None, section=AprilLabSection(
                                   [6, 12, 18, 24], Projections("random", seed=0)))
    one_pass = 24 * (24 * 1370 * 1024 ** 2 + 4 * 1370 ** 2 * 1024) + 2 * 1369 * 1024 * 3 * 14 ** 2
    assert gflops_per_image(manifest, 24) == pytest.approx(
        (one_pass + 4 * 2 * 1369 * 1024 * 768) / 1e9)
