"""What the runtime asks onnxruntime's CUDA and TensorRT providers for, and what it reports when
one falls back, checked against a stand-in onnxruntime that records the providers and options it
is given and fails to load its CUDA libraries the way onnxruntime-gpu does (a log line on file
descriptor 2, the CPU assigned instead). No GPU is used; the real CPU onnxruntime runs the probe
on this machine."""

from __future__ import annotations

import json
import os
import types

import pytest

from clipinspect.runtime.core import onnxruntime_backend as ob

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
CUDA_LOAD_FAILURE = (
    "2026-12-03 08:00:00.000 [E:onnxruntime:Default, provider_bridge_ort.cc:2251 "
    "TryGetProviderInfo_CUDA] Failed to load library libonnxruntime_providers_cuda.so with "
    "error: libcublasLt.so.13: cannot open shared object file: No such file or directory\n")


def fake_ort(version: str = "1.31.1", assigned=("CPUExecutionProvider",), log: str = ""):
    """An onnxruntime whose sessions record their providers and get ``assigned``."""
    made: list = []

    class Session:
        def __init__(self, model, sess_options=None, providers=None):
            made.append(providers)
            if log:
                os.write(2, log.encode())
            self._providers = list(assigned)

        def get_providers(self):
            return self._providers

    class SessionOptions:
        pass

    ort = types.SimpleNamespace(
        __version__=version, InferenceSession=Session, SessionOptions=SessionOptions,
        GraphOptimizationLevel=types.SimpleNamespace(ORT_ENABLE_ALL=99),
        get_available_providers=lambda: list(ALL))
    ort.made = made
    return ort


def options_of(providers, name):
    return next(p[1] for p in providers if isinstance(p, tuple) and p[0] == name)


# ------------------------------------------------------------------- 1. FP32 means FP32 on CUDA
def test_cuda_provider_turns_tf32_off():
    providers = ob.provider_options("cuda")  # the installed onnxruntime (>= 1.18) knows it
    assert options_of(providers, "CUDAExecutionProvider")["use_tf32"] == 0
    assert providers[-1] == "CPUExecutionProvider"


def test_the_cuda_provider_under_tensorrt_turns_tf32_off_too():
    for fp16 in (False, True):
        providers = ob.provider_options("tensorrt", fp16=fp16)
        assert [p[0] if isinstance(p, tuple) else p for p in providers] == ALL
        assert options_of(providers, "CUDAExecutionProvider")["use_tf32"] == 0


def test_an_onnxruntime_without_use_tf32_is_not_given_it_and_the_user_is_warned(tmp_path):
    """onnxruntime < 1.18 rejects the unknown option (the provider would not register): it is
    left out, and make_session says that FP32 runs in TF32 there."""
    providers = ob.provider_options("cuda", ort_version="1.17.1")
    assert "use_tf32" not in options_of(providers, "CUDAExecutionProvider")
    ort = fake_ort("1.17.1", assigned=("CUDAExecutionProvider", "CPUExecutionProvider"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ob, "_import_ort", lambda: ort)
        with pytest.warns(RuntimeWarning, match="no use_tf32 option.*TF32"):
            ob.make_session(tmp_path / "g.onnx", "cuda")
    assert "use_tf32" not in options_of(ort.made[0], "CUDAExecutionProvider")


def test_make_session_passes_the_options_to_onnxruntime(tmp_path, monkeypatch):
    ort = fake_ort(assigned=("CUDAExecutionProvider", "CPUExecutionProvider"))
    monkeypatch.setattr(ob, "_import_ort", lambda: ort)
    ob.make_session(tmp_path / "g.onnx", "cuda")
    assert options_of(ort.made[0], "CUDAExecutionProvider")["use_tf32"] == 0


# ---------------------------------------- 2. the TensorRT provider: only options it really has
def test_tensorrt_provider_is_given_only_options_it_has():
    """onnxruntime 1.31's TensorRT provider has no TF32 or strong-typing option; an invented
    key would make it fail to register. Everything passed is one of its documented options."""
    known = {"trt_fp16_enable", "trt_int8_enable", "trt_int8_use_native_calibration_table",
             "trt_layer_norm_fp32_fallback", "trt_engine_cache_enable", "trt_engine_cache_path",
             "trt_timing_cache_enable", "trt_timing_cache_path", "trt_profile_min_shapes",
             "trt_profile_opt_shapes", "trt_profile_max_shapes"}
    profile = {"images": ((1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))}
    for fp16, int8 in ((False, False), (True, False), (False, True)):
        opts = options_of(ob.provider_options("tensorrt", None, fp16, int8, profile),
                          "TensorrtExecutionProvider")
        assert set(opts) <= known, set(opts) - known


# ------------------------------------------------ 8. engine cache keyed by profile and versions
def test_engine_cache_folder_is_keyed_by_profile_and_versions(tmp_path, monkeypatch):
    monkeypatch.setattr(ob, "tensorrt_version", lambda: "trt10.13.3.9", raising=False)
    monkeypatch.setattr(ob, "installed_ort_version", lambda: "1.31.1", raising=False)
    small = {"images": ((1, 3, 8, 8), (8, 3, 8, 8), (32, 3, 8, 8))}
    large = {"images": ((1, 3, 8, 8), (8, 3, 8, 8), (64, 3, 8, 8))}

    def folder(profile, version=None, fp16=False):
        extra = {"ort_version": version} if version else {}
        opts = options_of(ob.provider_options("tensorrt", tmp_path, fp16, False, profile,
                                              **extra), "TensorrtExecutionProvider")
        assert opts["trt_engine_cache_path"] == opts["trt_timing_cache_path"]
        return opts["trt_engine_cache_path"]

    a = folder(small)
    assert os.path.dirname(a) == str(tmp_path) and os.path.isdir(a)
    assert "ort1.31.1" in a and "trt10.13.3.9" in a
    assert folder(small) == a                     # the same session finds its engines again
    assert len({a, folder(large), folder(small, "1.31.0"), folder(small, fp16=True)}) == 4


# --------------------------------------------- 4. a fallen-back provider: the loader's reason
def test_make_session_refusal_carries_the_loaders_reason(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(ob, "_import_ort", lambda: fake_ort(log=CUDA_LOAD_FAILURE))
    with pytest.raises(ob.ProviderError) as err:
        ob.make_session(tmp_path / "encoder.onnx", "cuda")
    message = str(err.value)
    assert "\n" not in message
    assert "libcublasLt.so.13: cannot open shared object file" in message
    assert "got ['CPUExecutionProvider']" in message
    # onnxruntime's own message still reaches the terminal.
    assert "Failed to load library libonnxruntime_providers_cuda.so" in capfd.readouterr().err


def test_the_python_fallback_notice_is_a_reason_too(tmp_path, monkeypatch):
    """onnxruntime's Python layer prints 'EP Error ... Falling back' when a provider raises."""
    ort = fake_ort()
    session = ort.InferenceSession

    def noisy(*a, **k):
        print("*************** EP Error ***************")
        print("EP Error [ONNXRuntimeError] : 1 : FAIL : TensorRT EP failed to create engine "
              "from network when using ['TensorrtExecutionProvider']")
        return session(*a, **k)

    ort.InferenceSession = noisy
    monkeypatch.setattr(ob, "_import_ort", lambda: ort)
    with pytest.raises(ob.ProviderError, match="TensorRT EP failed to create engine"):
        ob.make_session(tmp_path / "encoder.onnx", "tensorrt")


def test_probe_reports_what_a_provider_runs_on_and_why_it_fell_back(monkeypatch):
    from clipinspect.runtime.core import provider_probe as pp

    monkeypatch.setattr(ob, "_import_ort", lambda: fake_ort(log=CUDA_LOAD_FAILURE))
    got = pp.probe_provider("cuda")
    assert got["available"] is True and got["fell_back"] is True
    assert got["runs_on"] == ["CPUExecutionProvider"]
    assert got["reason"].startswith("Failed to load library libonnxruntime_providers_cuda.so")
    line = pp.report_lines({"onnxruntime": "x", "providers": [got],
                            "tensorrt_native": {"tensorrt": False, "cupy": True},
                            "libraries": {}, "packages": {}})[1]
    assert line.startswith("cuda") and "FELL BACK to CPUExecutionProvider: Failed" in line


def test_probe_with_the_real_cpu_onnxruntime():
    from clipinspect.runtime.core import provider_probe as pp

    got = pp.probe_provider("cpu")
    assert got["runs_on"] == ["CPUExecutionProvider"] and not got["fell_back"]


def test_library_versions_are_decoded_as_each_library_encodes_them():
    from clipinspect.runtime.core import gpu_libraries as pp

    assert pp._cuda_version(12040) == "12.4" and pp._cuda_version(13000) == "13.0"
    assert pp._cudnn_version(90100) == "9.1.0" and pp._cudnn_version(8902) == "8.9.2"
    assert pp._tensorrt_version(101303) == "10.13.3" and pp._tensorrt_version(8601) == "8.6.1"


def test_library_version_is_read_through_ctypes(monkeypatch, tmp_path):
    from clipinspect.runtime.core import gpu_libraries as pp

    class Lib:
        def __init__(self, name):
            if not name.endswith("libcudart.so.12"):
                raise OSError(f"{name}: cannot open shared object file")

        def cudaRuntimeGetVersion(self, out):
            out._obj.value = 12060
            return 0

    monkeypatch.setattr(pp.ctypes, "CDLL", Lib)
    assert pp.library_version("CUDA runtime", dirs=[]) == "12.6 (libcudart.so.12)"
    assert pp.library_version("TensorRT", dirs=[]) == ("not found (tried libnvinfer.so.10, "
                                                       "libnvinfer.so.11, libnvinfer.so)")


def test_providers_command_on_this_machine(capsys):
    from clipinspect.runtime.cli import main

    assert main(["providers"]) == 0
    out = capsys.readouterr().out
    assert "cpu              runs on CPUExecutionProvider" in out
    for what in ("CUDA driver", "CUDA runtime", "cuDNN", "TensorRT", "tensorrt-native"):
        assert any(line.startswith(what) for line in out.splitlines()), what
    assert main(["providers", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {p["provider"] for p in data["providers"]} == {"cpu", "cuda", "tensorrt"}
