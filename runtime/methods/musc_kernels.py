"""The block kernel of MuSc's mutual scoring, as a small onnxruntime graph on the bundle's
provider: the dot products of two blocks of feature rows (one GEMM) and their maxima over each
image's patches, along both axes, so that only (rows, images) numbers come back.

    a (m, C), b (n, C) -> g = a b^T (m, n)
    row_max (m, n / P) = max over the P patches of each image of b
    col_max (m / P, n) = max over the P patches of each image of a    (both=True only)

fp32: MatMul on float32 rows. int8: MatMulInteger on rows quantised with one scale per feature
map (a uint8 with zero point 128, b int8), maxima taken on the int32 products, scaled on the
host; its agreement with fp32 is measured (docs/methods.md#musc-precision), not bounded.

On the CPU this graph ran a block about as fast as numpy's GEMM plus two numpy reductions (the
kernel's own rate is in benchmarks/results/musc_speed_cpu.md); on CUDA it is the accelerator's
GEMM (not run here).
"""

from __future__ import annotations

import threading

import numpy as np

#: One scale per feature map for int8: the largest |component| maps to 127.
INT8_MAX = 127
_SESSIONS: dict[tuple[str, bool, bool], object] = {}
_LOCK = threading.Lock()


def _graph(int8: bool, both: bool) -> bytes:
    from onnx import TensorProto as T
    from onnx import helper

    elem = T.UINT8 if int8 else T.FLOAT
    inputs = [helper.make_tensor_value_info("a", elem, [None, None]),
              helper.make_tensor_value_info("b", T.INT8 if int8 else T.FLOAT, [None, None]),
              helper.make_tensor_value_info("rows_shape", T.INT64, [3])]
    if int8:  # b arrives transposed (C, n): MatMulInteger has no transB
        nodes = [helper.make_node("MatMulInteger", ["a", "b", "zero_point"], ["g"])]
        init = [helper.make_tensor("zero_point", T.UINT8, [], [128])]
    else:
        nodes = [helper.make_node("Gemm", ["a", "b"], ["g"], transB=1)]
        init = []
    nodes += [helper.make_node("Reshape", ["g", "rows_shape"], ["g_rows"]),
              helper.make_node("ReduceMax", ["g_rows"], ["row_max"], axes=[2], keepdims=0)]
    out_type = T.INT32 if int8 else T.FLOAT
    outputs = [helper.make_tensor_value_info("row_max", out_type, [None, None])]
    if both:
        inputs.append(helper.make_tensor_value_info("cols_shape", T.INT64, [3]))
        nodes += [helper.make_node("Reshape", ["g", "cols_shape"], ["g_cols"]),
                  helper.make_node("ReduceMax", ["g_cols"], ["col_max"], axes=[1], keepdims=0)]
        outputs.append(helper.make_tensor_value_info("col_max", out_type, [None, None]))
    graph = helper.make_graph(nodes, "musc_block_max", inputs, outputs, initializer=init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def session(provider: str, int8: bool, both: bool):
    """The kernel's session (made once per process, provider and kind). TensorRT bundles run
    it on CUDA: a kernel this small gains nothing from an engine."""
    from ..core.onnxruntime_backend import make_session

    provider = "cuda" if provider in ("cuda", "tensorrt") else "cpu"
    key = (provider, int8, both)
    with _LOCK:
        if key not in _SESSIONS:
            _SESSIONS[key] = make_session(_graph(int8, both), provider, spinning=False)
        return _SESSIONS[key]


class Quantised:
    """A feature map's rows ready for the kernel: float32 as they are, or int8 with one scale."""

    def __init__(self, rows: np.ndarray, int8: bool, scale: float | None = None):
        self.int8 = int8
        if not int8:
            self.rows = np.ascontiguousarray(rows, np.float32)
            self.scale = 1.0
            return
        self.scale = float(scale if scale is not None else
                           max(float(np.abs(rows).max()), 1e-12) / INT8_MAX)
        q = np.clip(np.rint(rows / self.scale), -INT8_MAX, INT8_MAX).astype(np.int8)
        self.rows = q                                                     # (n, C) int8
        self.as_a = (q.astype(np.int16) + 128).astype(np.uint8)           # zero point 128
        self.as_b = np.ascontiguousarray(q.T)                             # (C, n)

    def a(self, start: int, stop: int) -> np.ndarray:
        return self.as_a[start:stop] if self.int8 else self.rows[start:stop]

    def b(self, start: int, stop: int) -> np.ndarray:
        return (np.ascontiguousarray(self.as_b[:, start:stop]) if self.int8
                else self.rows[start:stop])


def block_max(provider: str, qa: Quantised, qb: Quantised, a_span: tuple[int, int],
              b_span: tuple[int, int], patches: int, *, both: bool
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """Max dot products of rows a_span of ``qa`` with rows b_span of ``qb`` (whole images of
    ``patches`` rows each): (row_max (m, n / P), col_max (m / P, n) or None), float64."""
    m, n = a_span[1] - a_span[0], b_span[1] - b_span[0]
    feeds = {"a": qa.a(*a_span), "b": qb.b(*b_span),
             "rows_shape": np.array([m, n // patches, patches], np.int64)}
    if both:
        feeds["cols_shape"] = np.array([m // patches, patches, n], np.int64)
    out = session(provider, qa.int8, both).run(None, feeds)
    scale = qa.scale * qb.scale
    rows = out[0].astype(np.float64) * scale
    return rows, (out[1].astype(np.float64) * scale if both else None)
