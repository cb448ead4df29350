"""The INT8 graph with FP16 between its INT8 matrix products: what ``build-engine --precision
int8`` builds its encoder engine from (graph ``encoder_fp16`` of the bundle's int8 variant).

The INT8 QDQ graph quantizes the MatMuls and leaves everything else FP32. A strongly typed
TensorRT engine keeps every tensor's type from the graph, so softmax, LayerNorm, GELU and the
residual adds of that graph run in FP32 and an INT8 engine can be slower than the FP16 one.
This variant is the same QDQ graph, same scales and same quantized weights, converted to FP16
as the FP16 variant is (softmax and LayerNormalization kept FP32 between Casts, FP32 inputs and
outputs), with FP16 scales on the Quantize/DequantizeLinear pairs: FP16 in, INT8 GEMM, FP16 out.

FP16 inputs and scales of Quantize/DequantizeLinear need opset 19; the graphs are exported at
opset 17, and between 17 and 19 only the Reduce operators (except ReduceSum) changed for these
graphs: their ``axes`` moved from an attribute to an input (opset 18), done here. Every other
operator's newer version only adds types or attributes whose defaults keep the old meaning;
an operator outside the list known here stops the conversion with its name.

The CPU runtime never runs this graph (the CPU INT8 variant stays the FP32 QDQ graph);
``quantize`` checks it with onnx.checker and shape inference and measures its agreement with
FP32 through onnxruntime's CPU kernels, which run FP16 Quantize/DequantizeLinear.
"""

from __future__ import annotations

import numpy as np

from clipinspect.runtime.core.manifest import Fp16BetweenQdq, Quantization

GRAPH_NAME = "encoder_fp16"
OPSET = 19
REDUCE_AXES_TO_INPUT = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                        "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
# Operators whose version 18 or 19 means for these graphs what their version 13 to 17 meant.
SAME_MEANING = {
    "Add", "Sub", "Mul", "Div", "MatMul", "Gemm", "Conv", "Relu", "Sigmoid", "Tanh", "Erf",
    "Gelu", "Sqrt", "Pow", "Exp", "Log", "Neg", "Abs", "Max", "Min", "Where", "Less", "Greater",
    "Not", "And", "Or", "Softmax", "LayerNormalization", "Transpose", "Reshape", "Flatten",
    "Squeeze", "Unsqueeze", "Concat", "Split", "Slice", "Gather", "GatherElements", "Expand",
    "Tile", "Shape", "Size", "Constant", "ConstantOfShape", "Identity", "Cast", "Range",
    "ReduceSum", "TopK", "Equal", "Resize", "Pad", "AveragePool", "MaxPool", "GlobalAveragePool",
    "Einsum", "Clip", "Floor", "Ceil", "Round", "Reciprocal", "CumSum", "ArgMax", "ArgMin",
    "QuantizeLinear", "DequantizeLinear", *REDUCE_AXES_TO_INPUT}


class Int8Fp16Error(RuntimeError):
    """The QDQ graph cannot be carried to opset 19 / FP16 as it is."""


def _reduce_axes_to_inputs(model) -> None:
    """Opset 18: Reduce* take ``axes`` as an optional int64 input, no longer an attribute."""
    from onnx import numpy_helper

    taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node
                                                         for o in n.output}
    for node in model.graph.node:
        if node.op_type not in REDUCE_AXES_TO_INPUT:
            continue
        axes = [a for a in node.attribute if a.name == "axes"]
        if not axes:
            continue
        name = f"{node.name or node.output[0]}_axes"
        while name in taken:
            name += "_"
        taken.add(name)
        model.graph.initializer.append(numpy_helper.from_array(
            np.asarray(list(axes[0].ints), np.int64), name))
        node.attribute.remove(axes[0])
        node.input.append(name)


def topologically_sorted(graph) -> None:
    """Order ``graph.node`` so every node comes after the producers of its inputs (the FP16
    converter appends its input Casts at the end; onnx.checker and TensorRT's parser want
    graph order)."""
    known = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise Int8Fp16Error(f"the graph has a cycle or an undefined input at node "
                                f"{pending[0].name or pending[0].op_type}")
        for n in ready:
            known.update(n.output)
        ordered += ready
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    copies = []
    for n in ordered:
        c = type(n)()
        c.CopyFrom(n)
        copies.append(c)
    del graph.node[:]
    graph.node.extend(copies)


def scale_report(model) -> dict:
    """The smallest FP16 scale and how many are FP16 subnormals (< 6.1e-5: fewer bits)."""
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    scales = [numpy_helper.to_array(inits[n.input[1]]).ravel() for n in model.graph.node
              if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[1] in inits
              and inits[n.input[1]].data_type == TensorProto.FLOAT16]
    values = np.concatenate(scales).astype(np.float32) if scales else np.zeros(0, np.float32)
    tiny = float(np.finfo(np.float16).tiny)
    return {"scales": int(values.size), "min_scale": float(values.min()) if values.size else None,
            "subnormal_scales": int((values < tiny).sum())}


def int8_on_fp16(qdq_model, to_fp16):
    """The QDQ graph ``qdq_model`` (opset 17, FP32 between Q/DQ) with FP16 between its INT8
    matrix products, at opset 19; checked by onnx.checker (with shape inference). ``to_fp16``:
    the FP16 variant's converter (calibration.quantize.to_fp16), so both keep the same FP32
    islands."""
    import onnx

    opset = next(o.version for o in qdq_model.opset_import if o.domain in ("", "ai.onnx"))
    unknown = sorted({n.op_type for n in qdq_model.graph.node if n.domain in ("", "ai.onnx")}
                     - SAME_MEANING)
    if unknown or opset > OPSET:
        raise Int8Fp16Error(f"cannot carry the INT8 graph (opset {opset}) to opset {OPSET}: "
                            f"operators {unknown or 'none'} are not known to keep their meaning")
    model = onnx.ModelProto()
    model.CopyFrom(qdq_model)
    _reduce_axes_to_inputs(model)
    model = to_fp16(model)
    topologically_sorted(model.graph)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = OPSET
    report = scale_report(model)
    if report["scales"] and report["min_scale"] <= 0:
        raise Int8Fp16Error("a Q/DQ scale rounds to 0 in FP16; the INT8 graph has a tensor whose "
                            "calibrated range is too small for FP16 scales")
    onnx.checker.check_model(model, full_check=True)
    return model


def make_variant(qdq_model, agreement, to_fp16) -> tuple[bytes, Fp16BetweenQdq]:
    """(serialized graph, record) of the INT8-on-FP16 variant of ``qdq_model``, its agreement
    with FP32 measured by ``agreement`` (calibration.quantize.MapAgreement)."""
    print(f"[5] INT8 with FP16 between the Q/DQ pairs (opset {OPSET}) for TensorRT", flush=True)
    model = int8_on_fp16(qdq_model, to_fp16)
    measured = agreement.agreement(model)
    print(f"    map Pearson {measured.map_pearson_min:.5f}, largest image score difference "
          f"{measured.max_image_score_diff:.2e} (onnxruntime CPU)", flush=True)
    scales = scale_report(model)
    record = Fp16BetweenQdq(GRAPH_NAME, OPSET, measured, scales=scales["scales"],
                            min_scale=scales["min_scale"],
                            subnormal_scales=scales["subnormal_scales"],
                            between_qdq="float16 (softmax and LayerNormalization float32)")
    return model.SerializeToString(), record


def register(bundle, precision: str, entry: dict, record: Quantization, overwrite: bool, *,
             qdq, maps, fp16, fused: dict | None = None) -> None:
    """``bundle.set_precision`` and, for int8, the graph with FP16 between the Q/DQ pairs of
    ``qdq`` (converted by ``fp16``, quantize.to_fp16; measured by ``maps``, quantize's
    MapAgreement) made and measured before anything is registered; ``record`` gets its
    record too. ``fused``: the fused-attention encoder's entry (already written), or None."""
    made = make_variant(qdq, maps, fp16) if precision == "int8" else None
    bundle.set_precision(precision, entry, record.to_dict(), overwrite, fused=fused)
    if made is not None:
        store_variant(bundle, *made)
        record.fp16_between_qdq = made[1]


def store_variant(bundle, data: bytes, record: Fp16BetweenQdq) -> None:
    """Write the graph and register it as ``graphs.int8.encoder_fp16`` (after set_precision
    registered the int8 variant itself), with its record under ``quantization.int8``."""
    from clipinspect.runtime.core.bundle import write_versioned
    from clipinspect.runtime.core.manifest import GraphFile, parse

    rel = write_versioned(bundle.root, "int8", f"{GRAPH_NAME}.onnx", data)
    fp32 = bundle.manifest.graphs["fp32"]["encoder"]
    entry = bundle.file_entry(rel, inputs=fp32.inputs, outputs=fp32.outputs)
    graph = parse(GraphFile, entry, f"bundle {str(bundle.root)!r}", f"graphs.int8.{GRAPH_NAME}")
    with bundle.updating() as m:
        m.graphs["int8"][GRAPH_NAME] = graph
        m.quantization["int8"].fp16_between_qdq = record
