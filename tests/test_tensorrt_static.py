"""Static TensorRT compatibility of every graph a bundle holds (no TensorRT needed), and the
checker itself on small graphs that break one rule each."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from clipinspect.runtime import Bundle
from clipinspect.runtime.tensorrt import compat as tc

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from conftest import SMALL_GRID  # noqa: E402


@pytest.fixture(scope="module")
def variant_bundle(small_bundle_path, tmp_path_factory):
    """The small bundle with an FP16 and an INT8 (QDQ) encoder made the way 'quantize' makes
    them, without the calibration and agreement passes (unit ranges stand in for calibrated
    ones: the structure, not the accuracy, is under test here)."""
    from clipinspect.calibration import quantize as q
    from clipinspect.runtime.core.bundle import write_versioned

    path = tmp_path_factory.mktemp("trt-static") / "bundle"
    shutil.copytree(small_bundle_path, path)
    b = Bundle.open(path)
    clean = q.clean_graph(b.graph_path("fp32", "encoder"))
    groups = q.weight_groups(clean)
    amax = {n.input[0]: 1.0 for n in clean.graph.node if n.op_type == "MatMul"}
    fp32 = b.manifest.graphs["fp32"]["encoder"].to_dict()
    record = {"agreement_vs_fp32": {"map_pearson_min": 1.0, "max_image_score_diff": 0.0,
                                    "images": 1}}  # not measured: these graphs are not scored
    for precision, model in (("fp16", q.to_fp16(clean)), ("int8", q.quantize_int8(clean, groups,
                                                                                   amax))):
        rel = write_versioned(path, precision, "encoder.onnx", model.SerializeToString())
        b.set_precision(precision, b.file_entry(rel, inputs=fp32["inputs"],
                                                outputs=fp32["outputs"]), record)
    return path


def test_every_graph_of_the_bundle_passes(variant_bundle):
    b = Bundle.open(variant_bundle)
    report = tc.check_bundle(b)
    # Not the fused-attention encoders: onnxruntime's own operator, never built by TensorRT.
    assert set(report) == {"fp32/encoder", "fp32/head_zeroshot", "fp32/head_fewshot",
                           "fp16/encoder", "int8/encoder"}
    assert "encoder_fused" in b.manifest.graphs["fp32"]
    assert report == {k: [] for k in report}


def test_the_variants_are_what_the_checks_claim_to_cover(variant_bundle):
    b = Bundle.open(variant_bundle)
    int8 = onnx.load(str(b.graph_path("int8", "encoder")))
    assert sum(n.op_type == "DequantizeLinear" for n in int8.graph.node) > 100
    fp16 = onnx.load(str(b.graph_path("fp16", "encoder")))
    assert any(t.data_type == TensorProto.FLOAT16 for t in fp16.graph.initializer)
    assert any(n.op_type == "LayerNormalization" for n in fp16.graph.node)


def test_profiles_cover_batch_and_memory(variant_bundle):
    b = Bundle.open(variant_bundle)
    head = onnx.load(str(b.graph_path("fp32", "head_fewshot")))
    shapes = tc.profile_shapes(b, head, tc.BatchRange(2, 4, 6), max_shots=3, opt_shots=2)
    w, p = (SMALL_GRID - 1) ** 2, SMALL_GRID ** 2  # windows of scale 2, patches per image
    assert shapes["window_embeddings_2"] == ((2, w, 384), (4, w, 384), (6, w, 384))
    assert shapes["memory_patch_tokens"] == ((p, 384), (2 * p, 384), (3 * p, 384))
    assert shapes["text_prototypes"] == ((2, 384),) * 3
    with pytest.raises(tc.CompatibilityError, match="min 4, opt 2"):
        tc.profile_shapes(b, head, tc.BatchRange(4, 2, 8))


def test_patch_method_with_prompt_pools_passes_and_gets_profiles(patch_bundle_path):
    """Other methods are covered through their graphs: the patch-only heads take prompt pools
    of per-category length and memory made of the encoder's patch tokens."""
    b = Bundle.open(patch_bundle_path)
    assert tc.check_bundle(b) == {k: [] for k in ("fp32/encoder", "fp32/head_zeroshot",
                                                  "fp32/head_fewshot")}
    head = onnx.load(str(b.graph_path("fp32", "head_fewshot")))
    shapes = tc.profile_shapes(b, head, tc.BatchRange(1, 2, 4), max_shots=2, opt_shots=1)
    # At least top-k (6) prompts: the adaptation's TopK needs them.
    assert shapes["text_normal"] == ((6, 384), (256, 384), (2048, 384))
    p = SMALL_GRID ** 2
    assert shapes["patch_embeddings"] == ((1, p, 384), (2, p, 384), (4, p, 384))
    assert shapes["memory_patch_tokens"] == ((p, 384), (p, 384), (2 * p, 384))


# ------------------------------------------------------------------- the checker on small graphs
def _model(nodes, inits=(), opset=17, inputs=None, outputs=("y",)):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])]
    graph = helper.make_graph(
        nodes, "g", inputs,
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _qdq(scale, zero):
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s")]
    names = ["x", "s"]
    if zero is not None:
        inits.append(numpy_helper.from_array(np.array(zero), "z"))
        names.append("z")
    return _model([helper.make_node("QuantizeLinear", names, ["q"]),
                   helper.make_node("DequantizeLinear", ["q", *names[1:]], ["y"])], inits)


def test_clean_small_graph_passes():
    assert tc.check_model(_qdq(0.1, np.int8(0))) == []


@pytest.mark.parametrize("model, match", [
    (_qdq(0.0, np.int8(0)), "scale has values <= 0"),
    (_qdq(0.1, np.int8(3)), "zero point is not 0"),
    (_qdq(0.1, np.uint8(0)), "zero point type uint8"),
    (_qdq(0.1, None), "no zero point"),
    (_model([helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])],
            outputs=("y", "s", "z")), "DynamicQuantizeLinear node .*not in TensorRT"),
    (_model([helper.make_node("Relu", ["x"], ["y"])], opset=16), "opset 16"),
    (_model([helper.make_node("Relu", ["x"], ["y"])], opset=23), "opset 23"),
    (_model([helper.make_node("FusedMatMul", ["x", "x"], ["y"], domain="com.microsoft")]),
     "custom domain"),
    (_model([helper.make_node("RMSNormalization", ["x", "w"], ["y"])],
            [numpy_helper.from_array(np.ones(4, np.float32), "w")]), "only from TensorRT 10.15"),
    (_model([helper.make_node("LayerNormalization", ["x", "w"], ["y", "mean"])],
            [numpy_helper.from_array(np.ones(4, np.float32), "w")], outputs=("y", "mean")),
     "only the first output"),
    (_model([helper.make_node("Shape", ["x"], ["a"]),
             helper.make_node("Slice", ["a", "one", "two"], ["ax"]),
             helper.make_node("ReduceSum", ["x", "ax"], ["y"])],
            [numpy_helper.from_array(np.array([0]), "one"),
             numpy_helper.from_array(np.array([1]), "two")]), "axes come from a computed"),
])
def test_each_rule_is_enforced(model, match):
    problems = tc.check_model(model)
    assert any(__import__("re").search(match, p) for p in problems), problems


def test_a_newer_target_accepts_newer_operators():
    model = _model([helper.make_node("RMSNormalization", ["x", "w"], ["y"])],
                   [numpy_helper.from_array(np.ones(4, np.float32), "w")])
    assert tc.check_model(model, target="10.15") == []
    assert tc.opset_range("10.3") == (9, 20) and tc.opset_range("10.15") == (9, 24)


def test_dynamic_feature_axis_cannot_be_profiled(small_bundle_path):
    b = Bundle.open(small_bundle_path, verify_checksums=False)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "features"])
    model = _model([helper.make_node("Relu", ["x"], ["y"])], inputs=[x])
    with pytest.raises(tc.CompatibilityError, match="'x' axis 1 is dynamic"):
        tc.profile_shapes(b, model, tc.BatchRange())


def test_operator_table_states_its_source():
    table = tc.operator_table()
    assert "onnx/onnx-tensorrt" in table["source"] and table["table_version"] == "10.15"
    assert "LayerNormalization" in table["supported"]
    assert "DynamicQuantizeLinear" in table["unsupported"]
    assert not set(table["supported"]) & set(table["unsupported"])


def test_prompt_pool_profile_starts_at_the_adaptations_top_k(tiny_patch_bundle_path):
    """The adaptation's TopK over a category's prompts needs at least k rows: a profile
    starting at 1 would let TensorRT build for pools the graph cannot take."""
    b = Bundle.open(tiny_patch_bundle_path)
    assert b.manifest.adaptation.top_k == 6
    head = onnx.load(str(b.graph_path("fp32", "head_zeroshot")))
    shapes = tc.profile_shapes(b, head, tc.BatchRange(1, 2, 4))
    pools = {n: s for n, s in shapes.items() if n.startswith("text_")}
    assert pools and all(lo[0] == 6 and hi[0] == 2048 for lo, _, hi in pools.values())
