"""The FP16 graph carries FP32 LayerNormalization itself (Cast to FP32 in, Cast to FP16 out):
TensorRT's strongly typed engines take each tensor's type from the graph and ignore
LayerNormalization's stash_type, so an FP16 LayerNormalization would compute in FP16."""

from __future__ import annotations

import numpy as np
import pytest

from clipinspect.calibration.quantize import to_fp16

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def block(width: int = 8):
    """x (N, width) -> MatMul -> LayerNormalization -> MatMul -> y: a transformer block's
    shape of the problem, with a residual stream large enough to overflow FP16 variance."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(width, width)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.ones(width, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(width, np.float32), "beta"),
             numpy_helper.from_array(rng.normal(size=(width, width)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"], axis=-1,
                              epsilon=1e-5, stash_type=1),
             helper.make_node("MatMul", ["n", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "block",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def layer_norm_types(model) -> list[tuple[list[int], list[int]]]:
    """Per LayerNormalization node: (its input element types, its output element types)."""
    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    return [([types[i] for i in n.input], [types[o] for o in n.output])
            for n in g.node if n.op_type == "LayerNormalization"]


def test_layer_norm_runs_in_fp32_between_casts():
    model = to_fp16(block())
    [(ins, outs)] = layer_norm_types(model)
    assert ins == [TensorProto.FLOAT] * 3 and outs == [TensorProto.FLOAT]
    norm = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = [n for n in model.graph.node if norm.output[0] in n.input]
    cast_in = producer[norm.input[0]]
    assert cast_in.op_type == "Cast" and helper.get_attribute_value(cast_in.attribute[0]) == \
        TensorProto.FLOAT
    assert [c.op_type for c in consumers] == ["Cast"]
    assert helper.get_attribute_value(consumers[0].attribute[0]) == TensorProto.FLOAT16
    # The matrix products around it are FP16: only the norm was kept.
    weights = {t.name: t.data_type for t in model.graph.initializer}
    assert weights["w1"] == weights["w2"] == TensorProto.FLOAT16


def test_fp16_graph_with_fp32_layer_norm_survives_a_large_residual_stream():
    """Inputs whose squares overflow FP16 (|h| ~ 1e3 -> h^2 ~ 1e6 > 65504): the kept-FP32 norm
    gives the FP32 graph's result to FP16 rounding, not inf / nan."""
    x = np.random.default_rng(1).normal(scale=300, size=(4, 8)).astype(np.float32)
    run = {}
    for name, model in (("fp32", block()), ("fp16", to_fp16(block()))):
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        run[name] = session.run(None, {"x": x})[0]
    assert np.isfinite(run["fp16"]).all()
    np.testing.assert_allclose(run["fp16"], run["fp32"], rtol=2e-2, atol=2e-2)
