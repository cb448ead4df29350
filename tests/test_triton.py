"""The Triton model repository: every config.pbtxt parses with Triton's own ModelConfig schema,
and running the repository's models with onnxruntime (and the categories model with a stand-in
for Triton's Python-backend module) in the order the ensembles define gives the runtime's
scores and maps. No Triton server is run here."""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from clipinspect.runtime import Bundle, BundleError, Inspector
from clipinspect.runtime.triton import repository as triton
from clipinspect.runtime.core.errors import UsageError
from clipinspect.runtime.core.maps import upsample

ort = pytest.importorskip("onnxruntime")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import json_format, text_format  # noqa: E402
from tinybundle import GRID  # noqa: E402

CATEGORY_WITH_MEMORY = "weave"


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(7)
    # Different sizes: the runtime resizes each, so the maps come back at each image's size.
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((200, 240), (160, 300))]


@pytest.fixture(scope="module")
def bundle_path(tiny_bundle_path, tmp_path_factory, images):
    path = tmp_path_factory.mktemp("triton") / "bundle"
    shutil.copytree(tiny_bundle_path, path)
    Inspector.open(path).add_references(CATEGORY_WITH_MEMORY, images[:1])
    return path


@pytest.fixture(scope="module")
def inspector(bundle_path):
    return Inspector.open(bundle_path)


@pytest.fixture(scope="module")
def repo(bundle_path, tmp_path_factory):
    return triton.write_repository(bundle_path, tmp_path_factory.mktemp("repo") / "models",
                                   max_batch=16)


@pytest.fixture(scope="module")
def patch_served(tiny_patch_bundle_path, tmp_path_factory, images):
    """The patch-only method with prompt adaptation: its heads take per-category prompt pools
    whose length varies, and its memory is made of other encoder outputs than WinCLIP's."""
    path = tmp_path_factory.mktemp("triton-patch") / "bundle"
    shutil.copytree(tiny_patch_bundle_path, path)
    Inspector.open(path).add_references(CATEGORY_WITH_MEMORY, images[:1])
    return triton.write_repository(path, tmp_path_factory.mktemp("repo") / "models",
                                   max_batch=16), Inspector.open(path)


@pytest.fixture(params=["winclip", "patch+adaptation"])
def served(request):
    """(repository, Inspector of the same bundle), for each method."""
    if request.param == "winclip":
        return request.getfixturevalue("repo"), request.getfixturevalue("inspector")
    return request.getfixturevalue("patch_served")


@functools.lru_cache(maxsize=None)
def session(path: str):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def parse(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def configs(repo: Path) -> dict:
    return {d.name: parse(d / "config.pbtxt") for d in sorted(repo.iterdir())}


def test_every_config_parses_with_tritons_schema(served):
    repo = served[0]
    cfgs = configs(repo)
    assert set(cfgs) == {triton.ENCODER, triton.CATEGORIES, *triton.HEADS.values(),
                         *triton.ENSEMBLES.values()}
    for name, cfg in cfgs.items():
        assert cfg.name == name and (repo / name / "1").is_dir()
    enc = cfgs[triton.ENCODER]
    assert enc.platform == "onnxruntime_onnx" and enc.max_batch_size == 16
    assert list(enc.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert list(enc.input[0].dims) == [3, 224, 224]
    assert cfgs[triton.CATEGORIES].backend == "python"
    assert cfgs[triton.CATEGORIES].input[0].data_type == model_config_pb2.TYPE_STRING
    for name in triton.ENSEMBLES.values():
        assert cfgs[name].platform == "ensemble"
        assert {s.model_name for s in cfgs[name].ensemble_scheduling.step} <= set(cfgs)


def test_ensemble_steps_name_real_inputs_and_outputs(served):
    repo = served[0]
    cfgs = configs(repo)
    for name in triton.ENSEMBLES.values():
        for step in cfgs[name].ensemble_scheduling.step:
            model = cfgs[step.model_name]
            assert set(step.input_map) == {i.name for i in model.input}
            assert set(step.output_map) <= {o.name for o in model.output}


# --------------------------------------------------------------- running the ensembles
class _Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class _Response:
    def __init__(self, output_tensors, error=None):
        self.output_tensors, self.error = output_tensors, error


class _Request:
    def __init__(self, inputs, outputs):
        self.inputs, self.outputs = inputs, outputs

    def requested_output_names(self):
        return list(self.outputs)


@pytest.fixture(scope="module")
def pb_utils():
    """The parts of Triton's triton_python_backend_utils the categories model uses."""
    stub = types.ModuleType("triton_python_backend_utils")
    stub.Tensor = _Tensor
    stub.InferenceResponse = _Response
    stub.TritonError = lambda message: RuntimeError(message)
    stub.get_input_tensor_by_name = lambda request, name: _Tensor(name, request.inputs[name])
    sys.modules["triton_python_backend_utils"] = stub
    yield stub
    del sys.modules["triton_python_backend_utils"]


def python_model(repo: Path, name: str):
    spec = importlib.util.spec_from_file_location(f"triton_model_{name}",
                                                  repo / name / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_repository": str(repo / name), "model_version": "1"})
    return model


def check_dims(cfg, tensors: dict[str, np.ndarray]) -> None:
    """Each tensor fits the config's dims (-1 = any; a batching model adds the batch axis)."""
    for spec in cfg.input:
        dims = ([-1] if cfg.max_batch_size > 0 else []) + list(spec.dims)
        shape = tensors[spec.name].shape
        assert len(shape) == len(dims) and all(d in (-1, s) for d, s in zip(dims, shape)), \
            (cfg.name, spec.name, shape, dims)


def run_ensemble(repo: Path, ensemble: str, feeds: dict, pb_utils) -> dict[str, np.ndarray]:
    """Execute the ensemble's steps as Triton schedules them: each as soon as its inputs exist."""
    cfgs = configs(repo)
    tensors = dict(feeds)
    check_dims(cfgs[ensemble], tensors)
    pending = list(cfgs[ensemble].ensemble_scheduling.step)
    while pending:
        ready = [s for s in pending if all(v in tensors for v in s.input_map.values())]
        assert ready, "ensemble steps wait on tensors no step produces"
        step = ready[0]
        pending.remove(step)
        cfg = cfgs[step.model_name]
        inputs = {k: tensors[v] for k, v in step.input_map.items()}
        check_dims(cfg, inputs)
        wanted = list(step.output_map)
        if cfg.backend == "python":
            [response] = python_model(repo, cfg.name).execute([_Request(inputs, wanted)])
            assert response.error is None, response.error
            outputs = {t.name(): t.as_numpy() for t in response.output_tensors}
        else:
            assert cfg.platform == "onnxruntime_onnx"
            run = session(str(repo / cfg.name / "1" / "model.onnx")).run
            outputs = dict(zip(wanted, run(wanted, inputs)))
        for k, v in step.output_map.items():
            tensors[v] = outputs[k]
    return {o.name: tensors[o.name] for o in cfgs[ensemble].output}


@pytest.mark.parametrize("mode", ["zeroshot", "fewshot"])
def test_ensemble_gives_the_runtimes_scores_and_maps(served, images, pb_utils, mode):
    repo, inspector = served
    from clipinspect.runtime.triton.client import prepare, preprocessing_from_config

    enc = json_format.MessageToDict(parse(repo / triton.ENCODER / "config.pbtxt"))
    batch = prepare(images, preprocessing_from_config(enc))
    out = run_ensemble(repo, triton.ENSEMBLES[mode], {
        "images": batch, "category": np.array([CATEGORY_WITH_MEMORY.encode()], dtype=object)},
        pb_utils)
    expected = inspector.inspect(
        images, CATEGORY_WITH_MEMORY, mode={"zeroshot": "zero-shot", "fewshot": "few-shot"}[mode])
    assert out["anomaly_grid"].shape == (len(images), *GRID)
    np.testing.assert_allclose(out["image_score"], [r.image_score for r in expected],
                               rtol=0, atol=1e-6)
    for grid, r, img in zip(out["anomaly_grid"], expected, images):
        np.testing.assert_allclose(upsample(grid, img.shape[:2]), r.anomaly_map, rtol=0,
                                   atol=1e-6)
    if mode == "fewshot":  # not the zero-shot numbers by accident
        zero = inspector.inspect(images, CATEGORY_WITH_MEMORY, mode="zero-shot")
        assert np.abs(out["image_score"] - [r.image_score for r in zero]).max() > 1e-4


def test_categories_model_errors_are_per_request(repo, pb_utils):
    model = python_model(repo, triton.CATEGORIES)
    requests = [_Request({"category": np.array([b"nonexistent"], dtype=object)},
                         ["text_prototypes"]),
                _Request({"category": np.array([b"../weave"], dtype=object)}, ["text_prototypes"]),
                _Request({"category": np.array([b"washer"], dtype=object)},
                         ["text_prototypes", "memory_patch_tokens"]),
                _Request({"category": np.array([b"washer"], dtype=object)}, ["text_prototypes"])]
    responses = model.execute(requests)
    assert "unknown category 'nonexistent'" in str(responses[0].error)
    assert "invalid category name" in str(responses[1].error)
    assert "no reference images" in str(responses[2].error)
    assert responses[3].error is None and responses[3].output_tensors[0].as_numpy().shape == (2,
                                                                                              384)


def test_new_references_reach_a_running_categories_model(bundle_path, repo, tmp_path, pb_utils,
                                                        images):
    path = shutil.copytree(bundle_path, tmp_path / "b")
    live = shutil.copytree(repo, tmp_path / "models")
    model = python_model(live, triton.CATEGORIES)
    ask = [_Request({"category": np.array([b"washer"], dtype=object)}, ["memory_patch_tokens"])]
    assert model.execute(ask)[0].error is not None
    Inspector.open(path).add_references("washer", images[1:])
    triton.write_repository(path, live, categories_only=True)
    [response] = model.execute(ask)  # same model instance: no restart
    assert response.error is None
    assert response.output_tensors[0].as_numpy().shape == (GRID[0] * GRID[1], 384)
    memory = Bundle.open(path).category("washer").memory
    np.testing.assert_array_equal(response.output_tensors[0].as_numpy(),
                                  memory["memory_patch_tokens"])


def test_repository_errors(bundle_path, repo, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(UsageError, match="not a clipinspect model repository"):
        triton.write_repository(bundle_path, other)
    with pytest.raises(UsageError, match="--overwrite"):
        triton.write_repository(bundle_path, repo)
    with pytest.raises(UsageError, match="build-engine .* --precision fp32"):
        triton.write_repository(bundle_path, tmp_path / "trt", platform="tensorrt")
    with pytest.raises(UsageError, match="without --categories-only"):
        triton.write_repository(bundle_path, tmp_path / "none", categories_only=True)
    assert not (tmp_path / "trt").exists() and (other / "keep.txt").exists()


def test_client_request_is_what_the_ensemble_declares(repo):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from clipinspect.runtime.triton.client import make_inputs

    cfg = parse(repo / triton.ENSEMBLES["zeroshot"] / "config.pbtxt")
    inputs = make_inputs(grpcclient, np.zeros((2, 3, 224, 224), np.float32), "metal nut")
    declared = {i.name: model_config_pb2.DataType.Name(i.data_type) for i in cfg.input}
    assert {i.name(): i.datatype() for i in inputs} == {"images": "FP32", "category": "BYTES"}
    assert declared == {"images": "TYPE_FP32", "category": "TYPE_STRING"}
    assert inputs[0].shape() == [2, 3, 224, 224] and inputs[1].shape() == [1]


def test_cli_writes_and_refreshes_a_repository(bundle_path, tmp_path, capsys):
    from clipinspect.runtime.cli import main

    out = tmp_path / "models"
    assert main(["triton", str(bundle_path), "--out", str(out), "--max-batch", "4"]) == 0
    assert "tritonserver --model-repository" in capsys.readouterr().out
    assert parse(out / triton.ENCODER / "config.pbtxt").max_batch_size == 4
    assert main(["triton", str(bundle_path), "--out", str(out), "--categories-only"]) == 0
    assert "refreshed" in capsys.readouterr().out
    assert main(["triton", str(bundle_path), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


# ------------------------------------------------------- TensorRT platform and bundle identity
def _with_engines(bundle_path: Path, tmp_path: Path, batch=(1, 2, 4)) -> Path:
    """A copy of the bundle with stand-in fp32 engine files registered (no TensorRT here: the
    writer only places the files and reads the record)."""
    from clipinspect.runtime.core.bundle import write_versioned
    from clipinspect.runtime.tensorrt.engine import GRAPHS

    path = Path(shutil.copytree(bundle_path, tmp_path / "engines"))
    b = Bundle.open(path)
    files = {g: b.file_entry(write_versioned(path, "engines/gpu/fp32", f"{g}.plan", g.encode()))
             for g in GRAPHS}
    device = {"gpu": "stand-in", "compute_capability": "9.0", "tensorrt": "10.0"}
    b.set_engines("gpu", device, "fp32", {
        **files, "profile": {"batch": list(batch), "max_shots": 2},
        "source_graphs": {g: b.manifest.graphs["fp32"][g].sha256 for g in GRAPHS}})
    return path


def test_tensorrt_max_batch_defaults_to_the_engine_profile_and_never_exceeds_it(bundle_path,
                                                                              tmp_path):
    path = _with_engines(bundle_path, tmp_path)
    out = triton.write_repository(path, tmp_path / "models", platform="tensorrt")
    enc = parse(out / triton.ENCODER / "config.pbtxt")
    assert enc.platform == "tensorrt_plan" and enc.max_batch_size == 4
    assert list(enc.dynamic_batching.preferred_batch_size) == [4]
    assert (out / triton.ENCODER / "1" / "model.plan").read_bytes() == b"encoder"
    smaller = triton.write_repository(path, tmp_path / "m2", platform="tensorrt", max_batch=3)
    assert parse(smaller / triton.ENCODER / "config.pbtxt").max_batch_size == 3
    with pytest.raises(UsageError, match="--max-batch 8 exceeds the engines' profile maximum 4"
                                         ".*--max-batch 4 or less"):
        triton.write_repository(path, tmp_path / "m3", platform="tensorrt", max_batch=8)
    onnx = triton.write_repository(bundle_path, tmp_path / "onnx-default")
    assert parse(onnx / triton.ENCODER / "config.pbtxt").max_batch_size == 32


def test_tensorrt_engines_whose_profile_starts_above_one_are_refused(bundle_path, tmp_path):
    path = _with_engines(bundle_path, tmp_path, batch=(2, 4, 8))
    with pytest.raises(UsageError, match="profile starts at batch 2.*--min-batch 1"):
        triton.write_repository(path, tmp_path / "models", platform="tensorrt")


def test_engine_files_are_checked_against_the_bundle_record(bundle_path, tmp_path):
    path = _with_engines(bundle_path, tmp_path)
    b = Bundle.open(path)
    record = b.manifest.engines["gpu"].builds["fp32"]
    (path / record.files["encoder"].file).write_bytes(b"another engine")
    with pytest.raises(UsageError, match="encoder engine file .* does not match the checksum"):
        triton.write_repository(path, tmp_path / "m1", platform="tensorrt")
    outside = tmp_path / "outside.plan"
    outside.write_bytes(b"head_zeroshot")
    # A manifest naming a file outside the bundle is refused when the bundle is opened (a
    # typed manifest confines its paths), before anything is copied into a repository.
    manifest = json.loads((path / "manifest.json").read_text())
    entry = manifest["engines"]["gpu"]["fp32"]
    entry["encoder"]["sha256"] = triton.sha256_file(path / entry["encoder"]["file"])
    entry["head_zeroshot"]["file"] = "../outside.plan"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="head_zeroshot.file' is '../outside.plan', expected a "
                                          "relative path inside the bundle"):
        triton.write_repository(path, tmp_path / "m2", platform="tensorrt")
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()


def test_categories_only_refuses_another_bundle(bundle_path, repo, tmp_path):
    live = Path(shutil.copytree(repo, tmp_path / "models"))
    identity = json.loads((live / triton.CATEGORIES / triton.IDENTITY_FILE).read_text())
    served = Bundle.open(bundle_path)
    assert {k: identity[k] for k in ("bundle", "platform", "precision", "heads")} == {
        "bundle": served.identity, "platform": "onnx", "precision": "fp32",
        "heads": {h: served.manifest.graphs["fp32"][h].sha256
                  for h in ("head_zeroshot", "head_fewshot")}}
    other = Path(shutil.copytree(bundle_path, tmp_path / "other"))
    with Bundle.open(other).updating() as m:
        m.model.name = "ViT-B-16-plus-240"   # e.g. a 640-d bundle
    before = {p: p.read_bytes() for p in (live / triton.CATEGORIES).rglob("*.npz")}
    with pytest.raises(UsageError, match="serves bundle 'tiny-test/.*', not 'ViT-B-16-plus-240/"):
        triton.write_repository(other, live, categories_only=True)
    assert {p: p.read_bytes() for p in (live / triton.CATEGORIES).rglob("*.npz")} == before
    (live / triton.CATEGORIES / triton.IDENTITY_FILE).unlink()
    with pytest.raises(UsageError, match="does not record which bundle .* new --out"):
        triton.write_repository(bundle_path, live, categories_only=True)
