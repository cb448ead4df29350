"""Whether this CPU's onnxruntime INT8 matrix products saturate on full-range int8 weights.

On x86 CPUs without VNNI (AVX2 only, or AVX-512 without VNNI) onnxruntime's INT8 MatMul kernels
multiply unsigned 8-bit activations (a signed activation is shifted by 128) with signed 8-bit
weights through VPMADDUBSW, which adds each pair of products into a signed 16-bit value: with
activations near 255 and weights near +-127 the pair exceeds 32767 and is clipped. onnxruntime's
own documentation names the cause and the cures (a reduced weight range, or U8U8). With weights
in [-63, 63] ("reduced", 7 bits) no pair can exceed 2 x 255 x 64 = 32640, so the INT8 graph
computes what its QDQ arithmetic says on every CPU.

:func:`saturates` measures it rather than reading CPU flags: a tiny QDQ MatMul built to
saturate, run with onnxruntime's INT8 kernels and with its QDQ arithmetic in FP32 (graph
optimisations off); they differ only where the kernel clips.
"""

from __future__ import annotations

import functools

FULL_WEIGHT_MAX = 127
REDUCED_WEIGHT_MAX = 63


@functools.lru_cache(maxsize=None)
def saturates() -> bool:
    """True where onnxruntime's CPU INT8 MatMul clips full-range int8 weight products."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k = 16
    w = np.full((k, 4), 127, np.int8)
    inits = [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.ones(4, np.float32),
                                                                         "w_s"),
             numpy_helper.from_array(np.zeros(4, np.int8), "w_z"),
             numpy_helper.from_array(np.array(1.0, np.float32), "x_s"),
             numpy_helper.from_array(np.array(0, np.int8), "x_z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, k])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = np.full((1, k), 127.0, np.float32)
    outputs = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                  ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), so,
                                       providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"x": x})[0])
    return not np.array_equal(outputs[0], outputs[1])


def weight_max(weight_range: str) -> int:
    """The largest |int8 weight| of ``weight_range``: full (127), reduced (63), or auto
    (reduced where :func:`saturates`)."""
    if weight_range == "auto":
        return REDUCED_WEIGHT_MAX if saturates() else FULL_WEIGHT_MAX
    return {"full": FULL_WEIGHT_MAX, "reduced": REDUCED_WEIGHT_MAX}[weight_range]
