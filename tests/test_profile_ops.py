"""The INT8 speed tools: the profile summary per operator and stage (benchmarks/experiments/
profile_ops.py), the attention products of the INT8 graph, and the bundle copy the end-to-end
benchmark stores its memory in (the harness's linked_copy)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from experiment_scripts import load

from clipinspect.benchmarks.harness import linked_copy
from clipinspect.runtime import Bundle

profile_ops = load("profile_ops")

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def trace(runs: list[list[tuple[str, float]]]) -> list[dict]:
    """A chrome trace as onnxruntime writes it: per run a model_run event and its node kernels
    (op type, microseconds)."""
    events, ts = [], 0
    for nodes in runs:
        start = ts
        for i, (op, dur) in enumerate(nodes):
            events.append({"cat": "Node", "name": f"n{i}_kernel_time", "ts": ts, "dur": dur,
                           "args": {"op_name": op}})
            ts += dur
        events.append({"cat": "Session", "name": "model_run", "ts": start, "dur": ts - start})
        ts += 1
    return events


def test_trace_summary_per_operator_skips_the_warmup(tmp_path):
    path = tmp_path / "t.json"
    warm = [("MatMul", 10_000.0)]
    run = [("MatMulIntegerToFloat", 3000.0), ("QuantizeLinear", 1000.0), ("Add", 1000.0),
           ("MatMulIntegerToFloat", 3000.0)]
    path.write_text(json.dumps(trace([warm, run, run])))
    s = profile_ops.summarise_trace(path, warmup=1)
    assert s["runs"] == 2 and "MatMul" not in s["ops"]
    assert s["ops"]["MatMulIntegerToFloat"] == pytest.approx(
        {"ms_per_run": 6.0, "share": 0.75, "nodes_per_run": 2, "class": "integer"})
    assert s["class_share"] == pytest.approx({"integer": 0.75, "quantize/dequantize": 0.125,
                                              "fp32": 0.125})
    assert s["kernel_ms_per_run"] == pytest.approx(8.0)
    with pytest.raises(SystemExit, match="no profiled run"):
        profile_ops.summarise_trace(path, warmup=3)


def test_profile_of_a_bundle_leaves_no_trace_behind(tiny_bundle_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = SimpleNamespace(threads=1, mode="few-shot", shots=2, batch_size=2, warmup=1, runs=1,
                           category="weave", attention="auto")
    bundle = Bundle.open(tiny_bundle_path)
    work = profile_ops._images("weave", 2, 2, tmp_path)
    traces = tmp_path / "traces"
    traces.mkdir()
    r = profile_ops.profile_precision(bundle, "fp32", work, args=args, trace_dir=traces)
    assert set(r["stage_ms"]) == set(profile_ops.STAGES)
    assert sum(r["stage_share"].values()) == pytest.approx(1.0)
    assert set(r["graphs"]) == {"encoder", "head_fewshot"}
    assert r["encoder_graph"] == "encoder"  # the tiny bundle has no fused-attention encoder
    assert r["graphs"]["encoder"]["runs"] == 1 and r["graphs"]["encoder"]["ops"]
    assert not list(tmp_path.glob("onnxruntime_profile_*.json"))
    # The two used graphs, in the caller's (temporary) folder; the unused head's is removed.
    assert sorted(p.name.split("_2")[0] for p in traces.glob("*.json")) == [
        "fp32_encoder", "fp32_head_fewshot"]
    text = profile_ops.render({"command": "python benchmarks/experiments/profile_ops.py BUNDLE",
                               "model": "m", "weights": "random", "mode": "few-shot",
                               "shots": 2, "batch_size": 2, "machine": {"cpu": "c",
                               "logical_cores": 2}, "load_average": [1.0, 1.0, 1.0],
                               "versions": {"onnxruntime": "x"}, "runs": 1, "warmup": 1,
                               "precisions": {"fp32": r}})
    assert "| fp32 |" in text and "## fp32 encoder" in text
    assert "Command: `python benchmarks/experiments/profile_ops.py BUNDLE`" in text


def test_attention_products_are_the_activation_matmuls():
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["q"], name="proj"),
             helper.make_node("Transpose", ["q"], ["qt"], perm=[1, 0], name="t"),
             helper.make_node("MatMul", ["q", "qt"], ["a"], name="qk")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [4, 4])],
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [4, 4])],
                              [w])
    model = helper.make_model(graph)
    from clipinspect.calibration import quantize as q

    assert q.activation_products(model) == ["qk"]
    amax = {"x": 1.0, "q": 4.0, "qt": 4.0}
    out = q.quantize_int8(model, q.weight_groups(model), amax, products=["qk"])
    qk = next(n for n in out.graph.node if n.name == "qk")
    producers = {o: n.op_type for n in out.graph.node for o in n.output}
    assert [producers[i] for i in qk.input] == ["DequantizeLinear", "DequantizeLinear"]
    # q feeds both the product and the transpose: one QDQ pair for it, shared.
    assert sum(n.op_type == "QuantizeLinear" for n in out.graph.node) == 3
    plain = q.quantize_int8(model, q.weight_groups(model), amax)
    assert [producers.get(i) for i in next(n for n in plain.graph.node
                                           if n.name == "qk").input] != ["DequantizeLinear"] * 2
    with pytest.raises(q.QuantizeError, match="no calibration range for 'qt'"):
        q.quantize_int8(model, q.weight_groups(model), {"x": 1.0, "q": 4.0}, products=["qk"])


def test_linked_copy_never_touches_the_original_manifest(tiny_bundle_path, tmp_path):
    before = (tiny_bundle_path / "manifest.json").read_bytes()
    copy = linked_copy(tiny_bundle_path, tmp_path / "copy")
    (copy / "manifest.json").write_text("{}")
    assert (tiny_bundle_path / "manifest.json").read_bytes() == before
    assert Bundle.open(tiny_bundle_path).categories


def test_the_quantize_command_passes_the_attention_products_option(monkeypatch, tmp_path):
    from clipinspect.calibration import quantize as q
    from clipinspect.runtime.cli import main

    seen = {}

    def fake(bundle, precision, calibration, **kwargs):
        seen.update(kwargs, precision=precision)
        return {"agreement_vs_fp32": {"map_pearson_min": 1.0, "images": 1,
                                      "max_image_score_diff": 0.0}}
    monkeypatch.setattr(q, "quantize_bundle", fake)
    assert main(["quantize", str(tmp_path), "--precision", "int8", "--calibration",
                 str(tmp_path), "--attention-products"]) == 0
    assert seen["precision"] == "int8" and seen["attention_products"] is True
    main(["quantize", str(tmp_path), "--precision", "int8", "--calibration", str(tmp_path)])
    assert seen["attention_products"] is False
