"""The INT8 graph with FP16 between its Q/DQ pairs (calibration/quantize_fp16.py), the one
'build-engine --precision int8' builds from by default: a valid ONNX graph (checker, strict shape
inference), FP16 where the FP16 variant is FP16, FP16 scales on INT8 Q/DQ, accepted by the static
TensorRT checks, run by onnxruntime's CPU kernels and within the FP16 bound of the FP32 QDQ
graph it comes from. TensorRT itself is not run (none here)."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest

from clipinspect.runtime import Bundle
from clipinspect.runtime.core.errors import UsageError
from clipinspect.runtime.tensorrt import compat
from clipinspect.runtime.tensorrt import engine as te

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

FP16_BOUND = (0.999, 2e-3)   # map Pearson, image score: the FP16 bound of benchmarks/gpu_check


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle_path, tmp_path_factory):
    from clipinspect.calibration import quantize as q
    from clipinspect.calibration.synth import generate

    work = tmp_path_factory.mktemp("int8fp16")
    path = shutil.copytree(tiny_bundle_path, work / "bundle")
    generate(work / "data", seed=5, categories=["weave"], image_size=64, n_train=6,
             n_test_good=1, n_test_defect_per_type=1)
    q.quantize_bundle(path, "int8", work / "data", holdout=2)
    return path


def _load(bundle, name):
    return onnx.load(str(bundle.root / bundle.manifest.graphs["int8"][name].file))


def test_quantize_int8_also_writes_the_fp16_between_qdq_graph(int8_bundle):
    bundle = Bundle.open(int8_bundle)  # every checksum verified
    model = _load(bundle, "encoder_fp16")
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert next(o.version for o in model.opset_import if o.domain == "") == 19
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(types[n.input[1]] == TensorProto.FLOAT16 for n in qdq)
    dq_out = {n.output[0] for n in qdq if n.op_type == "DequantizeLinear"}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and dq_out & set(n.input)]
    assert matmuls and all(types[i] == TensorProto.FLOAT16 for n in matmuls for i in n.input)
    # Inputs and outputs stay FP32: the runtime feeds and reads the same arrays.
    assert {types[v.name] for v in [*model.graph.input, *model.graph.output]} == {
        TensorProto.FLOAT}
    assert compat.check_model(model) == []


def test_its_agreement_with_fp32_is_measured_and_within_the_fp16_bound(int8_bundle):
    m = Bundle.open(int8_bundle).manifest
    record = m.quantization["int8"].fp16_between_qdq
    assert record.graph == "encoder_fp16" and record.subnormal_scales == 0
    fp16_agreement = record.agreement
    int8_agreement = m.quantization["int8"].agreement
    # Against FP32 it is about as close as the FP32 QDQ graph is; the FP16 rounding between
    # the Q/DQ pairs costs no more than the FP16 bound.
    assert fp16_agreement.map_pearson_min >= int8_agreement.map_pearson_min - (
        1 - FP16_BOUND[0])
    assert fp16_agreement.max_image_score_diff <= (int8_agreement.max_image_score_diff
                                                   + FP16_BOUND[1])


def test_it_runs_on_onnxruntime_cpu_close_to_the_fp32_qdq_graph(int8_bundle):
    bundle = Bundle.open(int8_bundle)
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    run = {name: ort.InferenceSession(_load(bundle, name).SerializeToString(),
                                      providers=["CPUExecutionProvider"]).run(None,
                                                                              {"images": x})
           for name in ("encoder", "encoder_fp16")}
    for qdq32, qdq16 in zip(run["encoder"], run["encoder_fp16"]):
        assert qdq16.dtype == np.float32 and qdq16.shape == qdq32.shape
        r = np.corrcoef(qdq32.ravel(), qdq16.ravel())[0, 1]
        assert r >= FP16_BOUND[0], r


def test_the_cpu_int8_graph_is_unchanged(int8_bundle):
    """The CPU runtime keeps running the FP32 QDQ graph: no FP16 in it."""
    bundle = Bundle.open(int8_bundle)
    assert bundle.graph_path("int8", "encoder") != bundle.graph_path("int8", "encoder_fp16")
    model = onnx.load(str(bundle.graph_path("int8", "encoder")))
    assert not any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)


# ------------------------------------------------------------- the conversion on a small graph
def _block(opset=17):
    """x (2, 8) -> MatMul W -> ReduceMean(axes attr) centring -> LayerNorm -> Softmax."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32) * 0.3, "w")
    scale = numpy_helper.from_array(np.ones(8, np.float32), "g")
    bias = numpy_helper.from_array(np.zeros(8, np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("ReduceMean", ["h"], ["mu"], axes=[-1], keepdims=1, name="rm"),
             helper.make_node("Sub", ["h", "mu"], ["c"], name="sub"),
             helper.make_node("LayerNormalization", ["c", "g", "b"], ["n"], axis=-1, name="ln"),
             helper.make_node("Softmax", ["n"], ["y"], axis=-1, name="sm")]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [2, 8])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [2, 8])], [w, scale, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def test_reduce_axes_move_to_an_input_and_the_fp32_islands_stay():
    from clipinspect.calibration import quantize as q
    from clipinspect.calibration.quantize_fp16 import int8_on_fp16

    from clipinspect.runtime.core.int8_kernels import weight_max

    fp32 = _block()
    # Weights in the range this CPU's INT8 kernels compute exactly (reduced where they clip).
    qdq = q.quantize_int8(fp32, q.weight_groups(fp32), {"x": 3.0}, weight_max=weight_max("auto"))
    model = int8_on_fp16(qdq, q.to_fp16)
    reduce = next(n for n in model.graph.node if n.op_type == "ReduceMean")
    assert not any(a.name == "axes" for a in reduce.attribute) and len(reduce.input) == 2
    axes = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}[reduce.input[1]]
    assert axes.tolist() == [-1]
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.output]}
    for op in ("LayerNormalization", "Softmax"):   # FP32 between Casts, as in the FP16 graph
        node = next(n for n in model.graph.node if n.op_type == op)
        assert types[node.input[0]] == types[node.output[0]] == TensorProto.FLOAT, op
    assert types["h"] == TensorProto.FLOAT16   # the INT8 MatMul's output: FP16
    x = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32)
    want, got = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                 .run(None, {"x": x})[0] for m in (qdq, model))
    assert np.abs(want - got).max() < 2e-3


def test_an_operator_of_unknown_meaning_at_opset_19_stops_the_conversion():
    from clipinspect.calibration.quantize import to_fp16
    from clipinspect.calibration.quantize_fp16 import Int8Fp16Error, int8_on_fp16

    model = _block()
    model.graph.node[1].op_type = "ReduceL1"   # known, moved like ReduceMean
    int8_on_fp16(model, to_fp16)
    model.graph.node.append(helper.make_node("Upsample", ["y"], ["z"]))
    with pytest.raises(Int8Fp16Error, match=r"\['Upsample'\]"):
        int8_on_fp16(model, to_fp16)


# --------------------------------------------- build-engine --precision int8 builds from it
def _fake_build(monkeypatch):
    built: list = []

    def build_one(trt, logger, path, shapes, *, settings, cache_bytes):
        built.append(path.name.split("-")[0].split(".")[0])
        return f"plan of {path.name} {sorted(shapes.items())}".encode(), b"timings"

    trt = type("trt", (), {"Logger": type("Logger", (), {"WARNING": 2,
                                                         "__init__": lambda s, lvl: None})})
    device = te.Device("NVIDIA L4", "8.9", "10.13.3.9", sm_count=58, memory_gib=22)
    monkeypatch.setattr(te, "import_tensorrt", lambda: (trt, None))
    monkeypatch.setattr(te, "current_device", lambda trt, cupy: device)
    monkeypatch.setattr(te, "_build_one", build_one)
    return built, device


def test_build_engine_int8_uses_the_fp16_between_qdq_graph_by_default(int8_bundle, tmp_path,
                                                                      monkeypatch):
    path = shutil.copytree(int8_bundle, tmp_path / "b")
    built, device = _fake_build(monkeypatch)
    record = te.build_engines(path, "int8", te.BatchRange(1, 2, 4), max_shots=2,
                              workspace_mb=64, stream=io.StringIO())
    assert built[0] == "encoder_fp16" and record["encoder_graph"] == "encoder_fp16"
    graphs = Bundle.open(path).manifest.graphs["int8"]
    assert record["source_graphs"]["encoder_fp16"] == graphs["encoder_fp16"].sha256
    assert record["source_graphs"]["encoder"] == graphs["encoder"].sha256
    te.find_engines(Bundle.open(path), "int8", device)   # accepted as current
    record = te.build_engines(path, "int8", te.BatchRange(1, 2, 4), max_shots=2,
                              workspace_mb=64, stream=io.StringIO(), int8_graph="fp32")
    assert built[-1] == "encoder" and record["encoder_graph"] == "encoder"


def test_an_int8_bundle_without_it_says_how_to_get_it(int8_bundle, tmp_path, monkeypatch):
    path = shutil.copytree(int8_bundle, tmp_path / "b")
    bundle = Bundle.open(path)
    with bundle.updating() as m:
        del m.graphs["int8"]["encoder_fp16"]
    _fake_build(monkeypatch)
    with pytest.raises(UsageError, match=r"quantize .* --overwrite', or build from the FP32 QDQ "
                                         r"graph with --int8-graph fp32"):
        te.build_engines(path, "int8", te.BatchRange(1, 2, 4), max_shots=2, workspace_mb=64,
                         stream=io.StringIO())
