"""TensorRT engines and the native backend.

Without TensorRT (CI): engine keys, storage and the rebuild errors, the onnxruntime TensorRT
provider options, and the errors a user without TensorRT gets. With TensorRT and a GPU: FP16 and
INT8 engines of ViT-S-16 (random weights) are built, run, and compared with onnxruntime FP32.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipinspect.runtime import Bundle, Inspector
from clipinspect.runtime.tensorrt import engine as te
from clipinspect.runtime.core.onnxruntime_backend import provider_options
from clipinspect.runtime.core.bundle import write_versioned
from clipinspect.runtime.cli import main
from clipinspect.runtime.core.errors import UsageError
from clipinspect.runtime.core.manifest import DeviceRecord
from clipinspect.runtime.tensorrt.compat import BatchRange, CompatibilityError
from conftest import SMALL_GRID

NANO = "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"
HERE = te.Device("Orin", "8.7", "10.3.0.30", sm_count=8, memory_gib=8, board=NANO)
THERE = te.Device("NVIDIA H200", "9.0", "10.15.1", sm_count=132, memory_gib=140)


def test_device_key_is_folder_safe_and_distinguishes_each_part():
    assert HERE.key == ("orin_nvidia-jetson-orin-nano-engineering-reference-developer-kit-super"
                        "_sm87_8sms_8gib_trt10.3.0.30")
    assert THERE.key == "nvidia-h200_sm90_132sms_140gib_trt10.15.1"
    variants = [dict(compute_capability="8.6"), dict(tensorrt="10.4.0"), dict(sm_count=4),
                dict(memory_gib=16), dict(board="NVIDIA Jetson Orin NX Engineering Reference "
                                                 "Developer Kit")]
    keys = {HERE.key, THERE.key, *(dataclasses.replace(HERE, **v).key for v in variants)}
    assert len(keys) == 7 and all("/" not in k and " " not in k for k in keys)
    # Before: one key for every Orin module with this TensorRT.
    assert HERE.legacy_key == dataclasses.replace(HERE, sm_count=4, board="").legacy_key \
        == "orin_sm87_trt10.3.0.30"


def test_board_model_is_read_from_the_device_tree(tmp_path):
    (tmp_path / "model").write_bytes(NANO.encode() + b"\0")
    assert te.board_model(tmp_path / "model") == NANO
    assert te.board_model(tmp_path / "absent") == ""


def _legacy(bundle_path, device: te.Device, tmp_path) -> Path:
    """A copy of the bundle whose engines are recorded as the older clipinspect did."""
    path = shutil.copytree(bundle_path, tmp_path / "legacy")
    b = Bundle.open(path)
    with b.updating() as m:
        entry = m.engines.pop(THERE.key)
        entry.device = DeviceRecord(THERE.gpu, THERE.compute_capability, THERE.tensorrt)
        m.engines[device.legacy_key] = entry
    cache = path / "cache" / "tensorrt" / f"{device.legacy_key}.timing-cache"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(b"timings")
    return path


def test_engines_under_a_legacy_key_are_adopted_where_it_identifies_the_gpu(engine_bundle,
                                                                          tmp_path):
    path = _legacy(engine_bundle, THERE, tmp_path)
    record = te.find_engines(Bundle.open(path), "fp32", THERE)
    assert (path / record.files["encoder"].file).is_file()
    m = Bundle.open(path).manifest
    assert list(m.engines) == [THERE.key] and m.engines[THERE.key].device == THERE.record()
    assert (path / "cache" / "tensorrt" / f"{THERE.key}.timing-cache").read_bytes() == b"timings"


def test_jetson_engines_under_a_legacy_key_must_be_rebuilt(engine_bundle, tmp_path):
    path = _legacy(engine_bundle, HERE, tmp_path)
    with pytest.raises(te.EngineError, match="did not tell Jetson modules apart .* rebuild"):
        te.find_engines(Bundle.open(path), "fp32", HERE)
    assert HERE.legacy_key in Bundle.open(path).manifest.engines  # left as it was


@pytest.fixture(scope="module")
def engine_bundle(small_bundle_path, tmp_path_factory):
    """The small bundle with stand-in fp32 'engines' registered for THERE."""
    path = tmp_path_factory.mktemp("engines") / "bundle"
    shutil.copytree(small_bundle_path, path)
    register(Bundle.open(path), THERE, b"plan")
    return path


def register(bundle: Bundle, device: te.Device, content: bytes) -> dict:
    files = {g: bundle.file_entry(write_versioned(bundle.root, f"engines/{device.key}/fp32",
                                                  f"{g}.plan", content + g.encode()))
             for g in te.GRAPHS}
    record = {**files, "profile": {"batch": [1, 8, 32], "max_shots": 16},
              "source_graphs": {g: bundle.manifest.graphs["fp32"][g].sha256
                                for g in te.GRAPHS}}
    bundle.set_engines(device.key, device.record().to_dict(), "fp32", record)
    return record


def test_engines_are_found_for_their_own_device_only(engine_bundle):
    b = Bundle.open(engine_bundle)
    assert te.find_engines(b, "fp32", THERE).profile.max_shots == 16
    with pytest.raises(te.EngineError, match=r"built for NVIDIA H200 \(sm 9.0, TensorRT 10.15.1\)"
                                             r".*rebuild here with 'clipinspect build-engine"):
        te.find_engines(b, "fp32", HERE)
    with pytest.raises(te.EngineError, match="no fp16 TensorRT engines .* --precision fp16"):
        te.find_engines(b, "fp16", THERE)


def test_engines_of_replaced_graphs_must_be_rebuilt(engine_bundle, tmp_path):
    path = shutil.copytree(engine_bundle, tmp_path / "b")
    b = Bundle.open(path)
    with b.updating() as m:
        m.engines[THERE.key].builds["fp32"].source_graphs["encoder"] = "0" * 64
    with pytest.raises(te.EngineError, match="encoder graph changed .* rebuild"):
        te.find_engines(Bundle.open(path), "fp32", THERE)


def test_rebuilt_engines_replace_the_old_files(engine_bundle, tmp_path):
    path = shutil.copytree(engine_bundle, tmp_path / "b")
    b = Bundle.open(path)
    old = {g: path / b.manifest.engines[THERE.key].builds["fp32"].files[g].file
           for g in te.GRAPHS}
    register(b, THERE, b"rebuilt")
    register(b, HERE, b"other device")
    m = Bundle.open(path).manifest
    assert set(m.engines) == {THERE.key, HERE.key}
    assert all(not p.exists() for p in old.values())
    assert all((path / m.engines[k].builds["fp32"].files[g].file).is_file()
               for k in m.engines for g in te.GRAPHS)
    assert m.engines[HERE.key].device == HERE.record()


def test_ort_tensorrt_options_follow_the_graph_precision(tmp_path):
    profile = {"images": ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224)),
               "text_prototypes": ((2, 384),) * 3}
    [(name, fp16), *_] = provider_options("tensorrt", tmp_path / "c", fp16=True, profile=profile)
    assert name == "TensorrtExecutionProvider"
    assert fp16["trt_fp16_enable"]
    # It only pins decomposed (Pow / ReduceMean) layer norms; the FP16 graph carries its own
    # FP32 LayerNormalization, so the option is not passed at all.
    assert not any("layer_norm" in k for k in fp16)
    assert not fp16["trt_int8_enable"]
    assert fp16["trt_engine_cache_enable"] and fp16["trt_timing_cache_enable"]
    assert fp16["trt_engine_cache_path"] == fp16["trt_timing_cache_path"]
    # A folder of the cache per profile and versions (tests/test_gpu_providers.py).
    assert Path(fp16["trt_engine_cache_path"]).parent == tmp_path / "c"
    assert fp16["trt_profile_min_shapes"] == "images:1x3x224x224,text_prototypes:2x384"
    assert fp16["trt_profile_opt_shapes"] == "images:8x3x224x224,text_prototypes:2x384"
    assert fp16["trt_profile_max_shapes"] == "images:32x3x224x224,text_prototypes:2x384"
    [(_, int8), *_] = provider_options("tensorrt", None, int8=True)
    assert int8["trt_int8_enable"] and not int8["trt_fp16_enable"]
    assert int8["trt_int8_use_native_calibration_table"] is False
    assert "trt_int8_calibration_table_name" not in int8  # QDQ: scales are in the graph
    assert "trt_engine_cache_enable" not in int8 and "trt_profile_min_shapes" not in int8


def test_ort_tensorrt_profiles_follow_batch_size_and_stored_shots(engine_bundle, tmp_path):
    from clipinspect.runtime.core.backends import ort_tensorrt_profiles

    path = shutil.copytree(engine_bundle, tmp_path / "b")
    b = Bundle.open(path)
    p = ort_tensorrt_profiles(b, "fp32", batch_size=4)
    assert p["encoder"]["images"] == ((1, 3, 224, 224), (4, 3, 224, 224), (4, 3, 224, 224))
    rows = SMALL_GRID ** 2  # patch tokens per reference image
    assert p["head_fewshot"]["memory_patch_tokens"] == ((rows, 384), (4 * rows, 384),
                                                        (16 * rows, 384))
    assert ort_tensorrt_profiles(b, "fp32")["encoder"]["images"][2][0] == 32  # not said: 1..32
    b.set_memory("weave", {"memory_patch_tokens": np.zeros((20 * rows, 384), np.float32)},
                 ["x"] * 20, shots=20)
    p = ort_tensorrt_profiles(Bundle.open(path), "fp32", batch_size=2)
    assert p["head_fewshot"]["memory_patch_tokens"] == ((rows, 384), (20 * rows, 384),
                                                        (20 * rows, 384))
    assert all(hi[0] == 2 for name, (_, _, hi) in p["head_zeroshot"].items()
               if not name.startswith("text_"))


TRT_MISSING = importlib.util.find_spec("tensorrt") is None


@pytest.mark.skipif(not TRT_MISSING, reason="tests the message shown where TensorRT is missing")
def test_build_engine_without_tensorrt_says_how_to_install(engine_bundle, capsys):
    assert main(["build-engine", str(engine_bundle), "--precision", "fp32"]) == 2
    err = capsys.readouterr().err
    assert "TensorRT's Python package is not installed" in err and "JetPack" in err
    assert main(["predict", str(engine_bundle), "x.png", "--category", "weave", "--out",
                 "unused", "--provider", "tensorrt-native"]) == 2
    assert "TensorRT's Python package is not installed" in capsys.readouterr().err


def test_build_engine_refuses_bad_requests_before_any_work(engine_bundle, capsys):
    with pytest.raises(UsageError, match="quantize .* --precision int8"):
        te.build_engines(engine_bundle, "int8")
    with pytest.raises(CompatibilityError, match="min 8, opt 4"):
        te.build_engines(engine_bundle, "fp32", BatchRange(8, 4, 16))
    with pytest.raises(UsageError, match="--workspace 8 MB"):
        te.build_engines(engine_bundle, "fp32", workspace_mb=8)
    with pytest.raises(SystemExit):
        main(["build-engine", str(engine_bundle), "--precision", "fp32", "--max-batch", "0"])
    assert "expected a whole number >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------------- GPU only
def _gpu_reason() -> str | None:
    if TRT_MISSING:
        return "TensorRT's Python package is not installed (no TensorRT on this machine)"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA GPU"
    except Exception as e:  # cupy missing or no driver
        return f"no usable CUDA GPU through cupy ({type(e).__name__}: {e})"
    return None


GPU_REASON = _gpu_reason()
# Tolerances against onnxruntime FP32 on the CPU, per image and per grid map:
# FP16 engines: map Pearson >= 0.999, |image score difference| <= 2e-3;
# INT8 engines (QDQ from min-max calibration on synthetic normal images): map Pearson >= 0.98,
# |image score difference| <= 1e-2 (the quantize step itself is checked at 0.99 on CPU).
TOLERANCES = {"fp16": (0.999, 2e-3), "int8": (0.98, 1e-2)}


@pytest.fixture(scope="module")
def gpu_bundle(small_bundle_path, tmp_path_factory):
    if GPU_REASON:
        pytest.skip(GPU_REASON)
    from clipinspect.calibration import quantize as q
    from clipinspect.calibration.synth import generate

    root = tmp_path_factory.mktemp("gpu")
    generate(root / "data", seed=5, categories=["weave"], image_size=128, n_train=4,
             n_test_good=1, n_test_defect_per_type=1)
    path = Path(shutil.copytree(small_bundle_path, root / "bundle"))
    q.quantize_bundle(path, "fp16", holdout=1)
    q.quantize_bundle(path, "int8", root / "data", holdout=1)
    return path


@pytest.mark.skipif(GPU_REASON is not None, reason=GPU_REASON or "")
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engines_agree_with_onnxruntime_fp32(gpu_bundle, precision, rng):
    te.build_engines(gpu_bundle, precision, BatchRange(1, 2, 4), max_shots=2, workspace_mb=1024)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(3)]
    reference = Inspector.open(gpu_bundle, "fp32", "cpu")
    reference.add_references("weave", images[:2])
    engine = Inspector.open(gpu_bundle, precision, "tensorrt-native")
    min_pearson, max_diff = TOLERANCES[precision]
    for mode in ("zero-shot", "few-shot"):
        want = reference.inspect(images, "weave", batch_size=4, mode=mode)
        got = engine.inspect(images, "weave", batch_size=4, mode=mode)
        for w, g in zip(want, got):
            assert abs(w.image_score - g.image_score) <= max_diff
            assert np.corrcoef(w.anomaly_map.ravel(), g.anomaly_map.ravel())[0, 1] >= min_pearson
