"""The fused-attention encoder: what export writes, which graph each provider runs, and the
choice refused where it cannot be honoured. Its parity with the eager reference is checked with
the standard one's in test_parity.py and test_quantize.py (both graphs, every test)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from clipinspect.runtime import Bundle, Inspector
from clipinspect.runtime.core.backends import encoder_graph
from clipinspect.runtime.core.errors import UsageError


def _ops(bundle: Bundle, graph: str) -> list[onnx.NodeProto]:
    return list(onnx.load(str(bundle.graph_path("fp32", graph))).graph.node)


def test_fused_encoder_replaces_each_attention_by_one_operator(small_bundle_path):
    bundle = Bundle.open(small_bundle_path)
    layers = bundle.manifest.dims.layers
    fused, standard = _ops(bundle, "encoder_fused"), _ops(bundle, "encoder")
    mha = [n for n in fused if n.op_type == "MultiHeadAttention"]
    # WinCLIP: every block of the full-image pass and of each window scale's pass.
    passes = 1 + len(bundle.manifest.section.windows)
    assert len(mha) == layers * passes
    assert all(n.domain == "com.microsoft" for n in mha)
    assert not [n for n in fused if n.op_type == "Softmax"]
    assert len([n for n in standard if n.op_type == "Softmax"]) == layers * passes
    # The standard graph is what TensorRT and Triton get: standard ONNX operators only.
    assert {n.domain for n in standard} <= {"", "ai.onnx"}
    assert len([n for n in fused if n.op_type == "MatMul"]) < len(
        [n for n in standard if n.op_type == "MatMul"])


def test_export_writes_the_fused_encoder_only_when_asked(patch_bundle_path):
    """Off by default (test_methods checks the default bundle's parity record lists no fused
    encoder); small_bundle_path asks for it."""
    from clipinspect.runtime.cli import build_parser

    parse = build_parser().parse_args
    base = ["export", "--model", "ViT-S-32", "--out", "x"]
    assert parse(base + ["--fused-attention"]).fused_attention is True
    assert parse(base).fused_attention is False
    assert "encoder_fused" not in Bundle.open(patch_bundle_path).manifest.graphs["fp32"]
    assert Inspector.open(patch_bundle_path).encoder_graph == "encoder"


@pytest.mark.parametrize("attention, provider, expected", [
    ("auto", "cpu", "encoder_fused"), ("standard", "cpu", "encoder"),
    ("fused", "cpu", "encoder_fused"), ("auto", "cuda", "encoder"),
    ("auto", "tensorrt", "encoder"), ("auto", "tensorrt-native", "encoder")])
def test_which_encoder_each_provider_runs(small_bundle_path, attention, provider, expected):
    assert encoder_graph(Bundle.open(small_bundle_path), "fp32", provider, attention) == expected


@pytest.mark.parametrize("attention, provider, match", [
    ("fused", "tensorrt", "CPU provider only"), ("fused", "tensorrt-native", "CPU provider only"),
    ("fast", "cpu", "choose one of auto, fused, standard")])
def test_a_choice_that_cannot_be_honoured_is_refused(small_bundle_path, attention, provider,
                                                     match):
    with pytest.raises(UsageError, match=match):
        encoder_graph(Bundle.open(small_bundle_path), "fp32", provider, attention)


def test_fused_asked_of_a_bundle_without_it_names_the_fix(tiny_bundle_path):
    with pytest.raises(UsageError, match="no fused-attention fp32 encoder: export it again"):
        Inspector.open(tiny_bundle_path, attention="fused")
    assert Inspector.open(tiny_bundle_path).encoder_graph == "encoder"


def test_both_encoders_give_the_same_maps(small_bundle_path, rng):
    images = [rng.integers(0, 256, (160, 200, 3), dtype=np.uint8) for _ in range(2)]
    fused, standard = (Inspector.open(small_bundle_path, attention=a).inspect(images, "weave")
                       for a in ("fused", "standard"))
    for a, b in zip(fused, standard):
        assert abs(a.image_score - b.image_score) <= 1e-5
        assert np.abs(a.anomaly_map - b.anomaly_map).max() <= 1e-5
