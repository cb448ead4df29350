"""The typed quantization and TensorRT engine records of the manifest: what they accept, the
errors they give, and that a record written before they were typed reads and writes back the
same, unknown keys included."""

from __future__ import annotations

import copy

import pytest

from clipinspect.runtime.core.manifest import (Agreement, DeviceRecord, EngineDevice,
                                               ManifestError, Quantization, parse)

SHA = "ab" * 32
AGREEMENT = {"map_pearson_min": 0.991, "map_pearson": {"weave/zero-shot": 0.991},
             "max_image_score_diff": 0.004, "images": 3, "source": "/data/normal",
             "target": 0.99, "measured_on": "patch-grid maps of held-out normal images"}
# An INT8 record as quantize wrote it before the records were typed (plus a later key).
INT8 = {
    "scheme": {"format": "QDQ", "ops": ["MatMul"], "attention_products": 0,
               "weights": "int8, symmetric, per output channel, zero point 0",
               "activations": "int8, symmetric, per tensor, zero point 0"},
    "calibration": {"method": "minmax", "images": 5},
    "quantized_nodes": 120, "fp32_nodes": 3,
    "all_quantized_agreement": {"map_pearson_min": 0.95, "map_pearson": {"weave/zero-shot": 0.95},
                                "max_image_score_diff": 0.02, "images": 3},
    "sensitivity": {"ran": True, "mode": "auto", "target": 0.99,
                    "ranking": [{"weight": "#01 MatMul_1 (4x4, 1 node)", "nodes": ["MatMul_1"],
                                 "map_pearson_if_fp32": 0.97, "gain": 0.02}],
                    "excluded_weights": ["#01 MatMul_1 (4x4, 1 node)"],
                    "excluded_nodes": ["MatMul_1"]},
    "created": "2026-01-01T00:00:00+00:00",
    "agreement_vs_fp32": AGREEMENT,
    "versions": {"onnx": "1.17.0", "onnxruntime": "1.20.1"},
    "fp16_between_qdq": {"graph": "encoder_fp16", "opset": 19, "scales": 10,
                         "min_scale": 1e-3, "subnormal_scales": 0,
                         "between_qdq": "float16 (softmax and LayerNormalization float32)",
                         "agreement_vs_fp32": {"map_pearson_min": 0.99,
                                               "max_image_score_diff": 0.005, "images": 3}},
    "written_by_a_later_version": {"kept": True},
}
ENGINES = {
    "device": {"gpu": "NVIDIA H200", "compute_capability": "9.0", "tensorrt": "10.15.1"},
    "fp32": {
        "encoder": {"file": "engines/k/fp32/encoder-0.plan", "sha256": SHA, "bytes": 4},
        "profile": {"batch": [1, 8, 32], "max_shots": 16},
        "source_graphs": {"encoder": SHA},
        "workspace_mb": 2048, "tf32": False, "encoder_graph": "encoder",
        "head_profiles": {"head_zeroshot": {"text_prototypes": [[2, 4], [2, 4], [2, 4]]}},
        "heads_reused": [], "built": "2026-01-01T00:00:00+00:00",
        "build_seconds": {"encoder": 12.5}, "later": 1},
}


def test_an_old_quantization_record_reads_typed_and_writes_back_the_same():
    q = parse(Quantization, copy.deepcopy(INT8), "bundle", "quantization.int8")
    assert q.agreement.map_pearson_min == 0.991 and q.agreement.source == "/data/normal"
    assert (q.calibration.method, q.calibration.images) == ("minmax", 5)
    assert q.sensitivity.excluded_weights == ["#01 MatMul_1 (4x4, 1 node)"]
    assert q.sensitivity.ranking[0].gain == 0.02 and q.scheme.format == "QDQ"
    assert q.fp16_between_qdq.agreement.images == 3
    assert q.extra == {"written_by_a_later_version": {"kept": True}}
    assert q.to_dict() == INT8


def test_absent_optional_keys_stay_absent():
    fp16 = {"agreement_vs_fp32": {"map_pearson_min": 1.0, "max_image_score_diff": 0.0,
                                  "images": 1}}
    assert parse(Quantization, fp16, "bundle").to_dict() == fp16
    legacy = {"device": ENGINES["device"],
              "fp32": {k: ENGINES["fp32"][k] for k in ("encoder", "profile", "source_graphs")}}
    assert parse(EngineDevice, copy.deepcopy(legacy), "bundle").to_dict() == legacy


def test_an_engine_record_reads_typed_and_writes_back_the_same():
    e = parse(EngineDevice, copy.deepcopy(ENGINES), "bundle", "engines.k")
    build = e.builds["fp32"]
    assert e.device.describe() == "NVIDIA H200 (sm 9.0, TensorRT 10.15.1)"
    assert e.device.sm_count is None
    assert build.profile.batch == (1, 8, 32) and build.profile.max_batch == 32
    assert build.profile.min_batch == 1 and build.profile.max_shots == 16
    assert build.tf32 is False and build.files["encoder"].sha256 == SHA
    assert build.extra == {"later": 1}
    assert e.to_dict() == ENGINES


def test_a_device_given_in_its_json_form_is_parsed():
    e = parse(EngineDevice, copy.deepcopy(ENGINES), "bundle", "engines.k")
    e.device = {"gpu": "NVIDIA L4", "compute_capability": "8.9", "tensorrt": "10.13",
                "sm_count": 58, "memory_gib": 22, "board": ""}
    assert e.device == DeviceRecord("NVIDIA L4", "8.9", "10.13", 58, 22, "")
    with pytest.raises(ManifestError, match="lacks the key 'device.gpu'"):
        e.device = {"compute_capability": "8.9", "tensorrt": "10.13"}


def _broken(record: dict, path: list, value) -> dict:
    record = copy.deepcopy(record)
    here = record
    for key in path[:-1]:
        here = here[key]
    if value is KeyError:
        del here[path[-1]]
    else:
        here[path[-1]] = value
    return record


@pytest.mark.parametrize("path, value, message", [
    (["agreement_vs_fp32"], KeyError, "lacks the key 'quantization.int8.agreement_vs_fp32'"),
    (["agreement_vs_fp32", "map_pearson_min"], "high",
     "'quantization.int8.agreement_vs_fp32.map_pearson_min' is 'high', expected a number"),
    (["agreement_vs_fp32", "images"], -1, "expected a whole number >= 0"),
    (["calibration", "method"], 3, "'quantization.int8.calibration.method' is 3, expected a "
                                   "string"),
    (["sensitivity", "excluded_weights"], [1], "expected a list of strings"),
    (["sensitivity", "ranking", 0, "gain"], None, "ranking.0.gain' is None, expected a number"),
    (["scheme", "format"], KeyError, "lacks the key 'quantization.int8.scheme.format'"),
    (["fp16_between_qdq", "graph"], "bad name!", "expected a graph name"),
    (["versions"], {"onnx": 1}, "expected an object of package -> version string"),
])
def test_a_broken_quantization_record_is_refused_naming_the_key(path, value, message):
    with pytest.raises(ManifestError, match=r"^bundle: .*" + _escaped(message) + ".*; export"):
        parse(Quantization, _broken(INT8, path, value), "bundle", "quantization.int8")


@pytest.mark.parametrize("path, value, message", [
    (["device", "tensorrt"], KeyError, "lacks the key 'engines.k.device.tensorrt'"),
    (["fp32", "profile", "batch"], [1, 8], "expected [min, opt, max] batch sizes"),
    (["fp32", "profile", "max_shots"], KeyError, "lacks the key 'engines.k.fp32.profile.max_"),
    (["fp32", "tf32"], "no", "'engines.k.fp32.tf32' is 'no', expected true or false"),
    (["fp32", "heads_reused"], "head_zeroshot", "expected a list of strings"),
    (["fp32", "build_seconds"], {"encoder": "long"}, "expected an object of graph -> number"),
    (["fp32", "source_graphs"], KeyError, "lacks the key 'engines.k.fp32.source_graphs'"),
])
def test_a_broken_engine_record_is_refused_naming_the_key(path, value, message):
    with pytest.raises(ManifestError, match=_escaped(message)):
        parse(EngineDevice, _broken(ENGINES, path, value), "bundle", "engines.k")


def _escaped(text: str) -> str:
    import re

    return re.escape(text)


def test_the_info_line_and_the_records_agree():
    q = parse(Quantization, copy.deepcopy(INT8), "bundle")
    assert q.describe() == ("map Pearson 0.99100, image score diff 4.0e-03 (3 held-out images; "
                            "minmax calibration on 5 images, 1 weight(s) kept FP32)")
    assert q.agreement.map_pearson_min == 0.991 and q.calibration.method == "minmax"
    assert q.to_dict() == INT8  # typed both ways: no JSON-key reads left on the records
    assert Agreement(1.0, 0.0, 1).to_dict() == {"map_pearson_min": 1.0,
                                                "max_image_score_diff": 0.0, "images": 1}
