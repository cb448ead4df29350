"""FP16 and INT8 variants: graph structure, agreement with FP32, the sensitivity pass, the
exact CPU rewrite, storage in the bundle and the errors a user can hit."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from clipinspect.calibration import quantize as q
from clipinspect.calibration.synth import generate
from clipinspect.runtime import Bundle, Inspector
from clipinspect.runtime.core.errors import UsageError
from clipinspect.runtime.core.manifest import Agreement

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402


@pytest.fixture(scope="module")
def normal_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibration")
    generate(root, seed=5, categories=["weave", "washer"], image_size=128, n_train=3,
             n_test_good=2, n_test_defect_per_type=1)
    return root


@pytest.fixture(scope="module")
def quantized(small_bundle_path, normal_images, tmp_path_factory):
    """The small bundle with FP16 and INT8 graphs (the INT8 maps meet the default target, so
    no weight is kept in FP32)."""
    path = tmp_path_factory.mktemp("quantized") / "bundle"
    shutil.copytree(small_bundle_path, path)
    q.quantize_bundle(path, "int8", normal_images, holdout=1)
    q.quantize_bundle(path, "fp16", holdout=2)
    return path


@pytest.fixture(scope="module")
def test_images(small_bundle_path):
    b = Bundle.open(small_bundle_path)
    return q.probe_images(b, 6)[2:]  # not the held-out images the quantizer checked


def maps_of(bundle, precision, images, category="weave", attention="auto"):
    inspector = Inspector.open(bundle, precision, attention=attention)
    scores, grids, _ = inspector.score(inspector.backend.encode(images), category, "zero-shot")
    return scores, grids


# ------------------------------------------------------------------------------- INT8 graph
@pytest.mark.parametrize("graph", ["encoder", "encoder_fused"])
def test_int8_graph_is_portable_qdq(quantized, graph):
    """Signed 8-bit, zero points 0, per-channel weight scales, positive scales: the form
    TensorRT explicit quantization accepts; every weight MatMul reads dequantized operands.
    The fused-attention encoder is quantized the same way, MatMul for MatMul."""
    m = Bundle.open(quantized).manifest.to_dict()
    model = onnx.load(str(quantized / m["graphs"]["int8"][graph]["file"]))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for n in qdq:
        assert inits[n.input[1]].min() > 0
        assert inits[n.input[2]].dtype == np.int8 and not inits[n.input[2]].any()
        if n.input[0] in inits:  # a weight
            assert inits[n.input[0]].dtype == np.int8
            assert n.op_type == "DequantizeLinear" and inits[n.input[1]].ndim == 1
            assert {a.name: a.i for a in n.attribute}["axis"] == 1
    assert not any(n.op_type == "DynamicQuantizeLinear" for n in model.graph.node)
    dq_outputs = {n.output[0] for n in qdq if n.op_type == "DequantizeLinear"}
    weighted = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in dq_outputs]
    assert len(weighted) == m["quantization"]["int8"]["quantized_nodes"] > 100
    assert all(n.input[0] in dq_outputs for n in weighted)


def test_int8_record(quantized):
    record = Bundle.open(quantized).manifest.to_dict()["quantization"]["int8"]
    s = record["sensitivity"]
    assert not s["ran"] and s["excluded_nodes"] == [] and record["fp32_nodes"] == 0
    assert record["all_quantized_agreement"]["map_pearson_min"] >= s["target"] == 0.99
    a = record["agreement_vs_fp32"]
    assert a["map_pearson_min"] > 0.99 and a["images"] == 1
    assert record["calibration"] == {"method": "minmax", "images": 5}
    # Weights in the range this CPU's INT8 kernels compute exactly (--weight-range auto).
    from clipinspect.calibration.quantize import weights_scheme
    from clipinspect.runtime.core.int8_kernels import weight_max
    assert record["scheme"]["weights"] == weights_scheme(weight_max("auto"))
    fused = record["fused_agreement_vs_fp32"]
    assert fused["map_pearson_min"] > 0.99 and fused["images"] == 1


@pytest.mark.parametrize("attention", ["fused", "standard"])
def test_int8_maps_agree_with_fp32_on_unseen_images(quantized, test_images, attention):
    s32, m32 = maps_of(quantized, "fp32", test_images, attention="standard")
    s8, m8 = maps_of(quantized, "int8", test_images, attention=attention)
    assert np.corrcoef(m32.ravel(), m8.ravel())[0, 1] > 0.99
    assert np.abs(s32 - s8).max() < 5e-3


def test_fp16_graph_keeps_softmax_layer_norm_and_io_in_fp32(quantized, test_images):
    m = Bundle.open(quantized).manifest
    model = onnx.load(str(quantized / m.graphs["fp16"]["encoder"].file))
    f32 = onnx.TensorProto.FLOAT
    io = [*model.graph.input, *model.graph.output]
    assert all(v.type.tensor_type.elem_type == f32 for v in io)
    half = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    total = sum(t.ByteSize() for t in model.graph.initializer)
    assert sum(t.ByteSize() for t in half) > 0.9 * total
    model = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert softmax and all(types[n.output[0]] == f32 for n in softmax)
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    # FP32 in the graph itself: TensorRT's strongly typed engines ignore stash_type.
    assert norms and all(types[n.output[0]] == f32 for n in norms)
    s32, m32 = maps_of(quantized, "fp32", test_images)
    s16, m16 = maps_of(quantized, "fp16", test_images)
    assert np.corrcoef(m32.ravel(), m16.ravel())[0, 1] > 0.9999
    assert np.abs(s32 - s16).max() < 1e-3


def test_variants_share_the_fp32_heads_and_validate(quantized):
    b = Bundle.open(quantized)  # checksums of every graph verified
    g = b.manifest.graphs
    assert b.precisions == ["fp16", "fp32", "int8"]
    for p in ("fp16", "int8"):
        assert g[p]["head_fewshot"] == g["fp32"]["head_fewshot"]
        assert g[p]["encoder"].file.startswith(f"{p}/encoder-")
        assert g[p]["encoder"].outputs == g["fp32"]["encoder"].outputs
    # The fused-attention encoder is made for int8 (onnxruntime's CPU provider), not fp16, and
    # never borrowed from fp32.
    assert g["int8"]["encoder_fused"].file.startswith("int8/encoder_fused-")
    assert "encoder_fused" not in g["fp16"]


def test_sensitivity_pass_keeps_weights_fp32_until_an_unmet_target(
        small_bundle_path, normal_images, tmp_path, monkeypatch):
    """End to end on the real graph, restricted to 3 weights to stay quick: a target the fully
    quantized graph misses makes the pass rank them and keep the most harmful in FP32, and
    the stored graph and the manifest say which."""
    path = shutil.copytree(small_bundle_path, tmp_path / "b")
    every = q.weight_groups
    monkeypatch.setattr(q, "weight_groups", lambda model: every(model)[:3])
    record = q.quantize_bundle(path, "int8", normal_images, holdout=1, target=0.9999999)
    s = record["sensitivity"]
    assert s["ran"] and len(s["ranking"]) == 3
    gains = [e["gain"] for e in s["ranking"]]
    assert gains == sorted(gains, reverse=True)
    assert s["excluded_weights"] == [e["weight"] for e in s["ranking"][:len(s["excluded_weights"])]]
    assert 1 <= len(s["excluded_weights"]) <= 3 and record["fp32_nodes"] == len(s["excluded_nodes"])
    m = Bundle.open(path).manifest.to_dict()
    model = onnx.load(str(path / m["graphs"]["int8"]["encoder"]["file"]))
    inits = {t.name for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    assert all(nodes[n].input[1] in inits for n in s["excluded_nodes"])  # float weight
    assert m["quantization"]["int8"]["sensitivity"]["excluded_nodes"] == s["excluded_nodes"]


# ----------------------------------------------------------------------- graph operations
@pytest.fixture(scope="module")
def clean(small_bundle_path):
    return q.clean_graph(Bundle.open(small_bundle_path).graph_path("fp32", "encoder"))


def test_weight_groups_cover_every_weight_matmul_once(clean):
    groups = q.weight_groups(clean)
    nodes = [n for g in groups for n in g.nodes]
    assert len(nodes) == len(set(nodes)) and len({g.weight for g in groups}) == len(groups)
    inits = {t.name for t in clean.graph.initializer}
    weighted = {n.name for n in clean.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    assert set(nodes) == weighted
    # most weights are read by the image pass and the window passes of both scales
    assert len(weighted) > 100 and sum(len(g.nodes) == 3 for g in groups) > 40


def test_excluded_weights_stay_fp32(clean):
    groups = q.weight_groups(clean)
    amax = {n.input[0]: 1.0 for n in clean.graph.node if n.op_type == "MatMul"}
    keep = {groups[0].weight, groups[7].weight}
    model = q.quantize_int8(clean, groups, amax, keep)
    by_name = {n.name: n for n in model.graph.node}
    inits = {t.name for t in model.graph.initializer}
    for g in groups:
        for name in g.nodes:
            assert (by_name[name].input[1] == g.weight) == (g.weight in keep)
            assert (g.weight in inits) == (g.weight in keep)


def test_sensitivity_pass_keeps_the_most_harmful_weights_until_the_target():
    groups = [q.WeightGroup(i, f"w{i}", [f"n{i}"], (4, 4)) for i in range(5)]
    harm = {"w0": 0.001, "w1": 0.02, "w2": 0.0, "w3": 0.01, "w4": 0.005}
    calls = []

    def measure(kept):
        calls.append(set(kept))
        return Agreement(1.0 - sum(v for k, v in harm.items() if k not in kept), 0.0, 1)

    full = measure(set())
    ranking, kept, last = q.sensitivity_pass(groups, measure, full, target=0.99)
    assert [e.weight.split()[0] for e in ranking] == ["#01", "#03", "#04", "#00", "#02"]
    assert [g.weight for g in kept] == ["w1", "w3"]  # 0.964 -> 0.984 -> 0.994 >= 0.99
    assert last.map_pearson_min == pytest.approx(0.994)
    assert len(calls) == 1 + 5 + 2


def test_calibration_methods_clip_no_more_than_minmax(clean, normal_images, small_bundle_path,
                                                      tmp_path):
    path = tmp_path / "clean.onnx"
    onnx.save(clean, str(path))
    images = q.load_tensors(Bundle.open(small_bundle_path), q.find_images(normal_images)[:2])
    ranges = {m: q.activation_ranges(path, images, m) for m in ("minmax", "percentile")}
    inputs = {n.input[0] for n in clean.graph.node if n.op_type == "MatMul"}
    assert inputs <= set(ranges["minmax"])
    assert all(0 < ranges["percentile"][t] <= ranges["minmax"][t] * (1 + 1e-6) for t in inputs)
    assert any(ranges["percentile"][t] < 0.9 * ranges["minmax"][t] for t in inputs)


# ------------------------------------------------------------------------- bundle storage
def test_overwrite_replaces_the_graph_and_drops_its_thresholds(quantized, tmp_path):
    path = shutil.copytree(quantized, tmp_path / "b")
    b = Bundle.open(path)
    b.set_thresholds("weave", "fp16/zero-shot", {"image": 0.5})
    b.set_thresholds("weave", "fp32/zero-shot", {"image": 0.4})
    old = path / b.manifest.graphs["fp16"]["encoder"].file
    with pytest.raises(UsageError, match="--overwrite"):
        q.quantize_bundle(path, "fp16", holdout=1)
    # a different probe set changes nothing in the graph: same content, same file
    q.quantize_bundle(path, "fp16", holdout=1, overwrite=True)
    m = Bundle.open(path).manifest
    assert old.is_file()
    assert m.graphs["fp16"]["encoder"].file == old.relative_to(path).as_posix()
    assert set(m.categories["weave"].thresholds) == {"fp32/zero-shot"}


def test_replaced_variant_file_is_deleted(quantized, tmp_path):
    path = shutil.copytree(quantized, tmp_path / "b")
    b = Bundle.open(path)
    old = path / b.manifest.graphs["fp16"]["encoder"].file
    entry = b.manifest.graphs["fp16"]["encoder"].to_dict()
    other = path / "fp16" / "encoder-other.onnx"
    shutil.copy(old, other)
    entry["file"] = "fp16/encoder-other.onnx"
    agreement = {"map_pearson_min": 1.0, "max_image_score_diff": 0.0, "images": 1}
    b.set_precision("fp16", entry, {"agreement_vs_fp32": agreement}, overwrite=True)
    assert other.is_file() and not old.exists()
    Bundle.open(path)


# --------------------------------------------------------------------------------- errors
def test_int8_needs_calibration_images(bundle_copy):
    with pytest.raises(UsageError, match="--calibration"):
        q.quantize_bundle(bundle_copy, "int8")


def test_too_few_calibration_images(bundle_copy, tmp_path):
    d = tmp_path / "few"
    d.mkdir()
    generate(tmp_path / "gen", categories=["pill"], image_size=64, n_train=1, n_test_good=1,
             n_test_defect_per_type=1)
    shutil.copy(next((tmp_path / "gen" / "pill" / "train" / "good").iterdir()), d / "a.png")
    with pytest.raises(UsageError, match="found 1 images .* at least 5"):
        q.quantize_bundle(bundle_copy, "int8", d, holdout=3)


def test_corrupt_calibration_image_is_named(bundle_copy, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(UsageError, match="broken.png"):
        q.quantize_bundle(bundle_copy, "fp16", d, holdout=1)


@pytest.mark.parametrize("kwargs, match", [
    ({"precision": "int4"}, "choose one of fp16, int8"),
    ({"precision": "fp16", "target": 1.5}, "not a correlation"),
    ({"precision": "fp16", "sensitivity": "sometimes"}, "auto, always or off"),
    ({"precision": "fp16", "holdout": 0}, "at least 1"),
])
def test_bad_options_are_refused(bundle_copy, kwargs, match):
    with pytest.raises(UsageError, match=match):
        q.quantize_bundle(bundle_copy, **kwargs)


def test_unknown_calibration_method(clean, tmp_path):
    with pytest.raises(UsageError, match="minmax, entropy, percentile"):
        q.activation_ranges(tmp_path / "x.onnx", np.zeros((1, 3, 2, 2), np.float32), "kl")


def test_eval_compares_the_variants_with_fp32(quantized, normal_images, tmp_path):
    from clipinspect.calibration.evaluate import EvalOptions, evaluate

    report = evaluate(quantized, normal_images, tmp_path / "r", EvalOptions(
        categories=["weave"], precisions=["int8", "fp16", "fp32"], shots=[0, 1], batch_size=4))
    runs = report["categories"]["weave"]["runs"]
    assert list(runs)[:2] == ["fp32/0-shot", "fp32/1-shot"]
    for p in ("fp16", "int8"):
        assert runs[f"{p}/1-shot"]["map_pearson_vs_fp32"] > 0.99
    assert "int8/1-shot" in (tmp_path / "r" / "report.md").read_text()
    assert json.loads((tmp_path / "r" / "report.json").read_text())["config"]["precisions"] == [
        "fp32", "int8", "fp16"]
