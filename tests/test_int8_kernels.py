"""INT8 weights in the range this CPU's onnxruntime kernels compute exactly: the probe of
clipping kernels, the reduced range, and the warning for a full-range bundle where they clip."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from clipinspect.calibration import quantize as q
from clipinspect.runtime.core import backends, int8_kernels


def block(k: int = 64):
    """x (4, k) -> MatMul W (k, 8): large weights and activations, where clipping shows."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((k, 8)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "b",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                              [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def kernels_and_arithmetic(model, x):
    """(onnxruntime's INT8 kernels, the QDQ arithmetic in FP32) on ``x``."""
    out = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                  ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        out.append(ort.InferenceSession(model.SerializeToString(), so,
                                        providers=["CPUExecutionProvider"]).run(None, {"x": x})[0])
    return out


def test_reduced_weights_are_computed_exactly_on_every_cpu_and_the_probe_tells_full_apart():
    fp32 = block()
    x = np.abs(np.random.default_rng(4).standard_normal((4, 64))).astype(np.float32) * 3
    amax = {"x": float(np.abs(x).max())}
    reduced = q.quantize_int8(fp32, q.weight_groups(fp32), amax, weight_max=63)
    weights = [numpy_helper.to_array(t) for t in reduced.graph.initializer
               if t.data_type == TensorProto.INT8 and t.dims and len(t.dims) == 2]
    assert weights and max(int(np.abs(w).max()) for w in weights) == 63
    kernel, arithmetic = kernels_and_arithmetic(reduced, x)
    assert np.allclose(kernel, arithmetic, rtol=0, atol=1e-4)
    full = q.quantize_int8(fp32, q.weight_groups(fp32), amax)
    kernel, arithmetic = kernels_and_arithmetic(full, x)
    # Where the probe says the kernels clip, they do on real weights too; elsewhere they agree.
    assert (np.abs(kernel - arithmetic).max() > 1e-2) == int8_kernels.saturates()


def test_auto_takes_the_reduced_range_exactly_where_kernels_clip(monkeypatch):
    assert int8_kernels.weight_max("full") == 127 and int8_kernels.weight_max("reduced") == 63
    monkeypatch.setattr(int8_kernels, "saturates", lambda: True)
    assert int8_kernels.weight_max("auto") == 63
    monkeypatch.setattr(int8_kernels, "saturates", lambda: False)
    assert int8_kernels.weight_max("auto") == 127
    with pytest.raises(q.UsageError, match="--weight-range 'half': choose one of auto, full"):
        q.QuantizeOptions("int8", weight_range="half").validate()


class Record:
    def __init__(self, weights):
        self.scheme = type("S", (), {"weights": weights})()


class FakeBundle:
    def __init__(self, root, weights):
        self.root = root
        self.manifest = type("M", (), {"quantization": {"int8": Record(weights)}})()


def test_a_full_range_bundle_on_clipping_kernels_is_said_once(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(int8_kernels, "saturates", lambda: True)
    backends.warn_if_int8_clips(FakeBundle(tmp_path / "r", q.weights_scheme(63)))
    assert capsys.readouterr().err == ""
    full = FakeBundle(tmp_path / "f", q.weights_scheme(127))
    backends.warn_if_int8_clips(full)
    backends.warn_if_int8_clips(full)
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "--weight-range reduced" in err
    monkeypatch.setattr(int8_kernels, "saturates", lambda: False)
    backends.warn_if_int8_clips(FakeBundle(tmp_path / "g", q.weights_scheme(127)))
    assert capsys.readouterr().err == ""
