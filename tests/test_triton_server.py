"""A real Triton Inference Server (the ``tritonserver`` binary of the nvidia-pytriton wheel, CPU,
bound to loopback) serving repositories written by ``clipinspect triton --platform python``:
every model loads, the ensembles give the runtime's scores and maps over HTTP and gRPC, a
category added with ``--categories-only`` is served without a restart, the encoder's dynamic
batcher really batches (requests of different categories together), bad requests fail alone,
and /metrics answers.

One server per bundle (two per module); they start in about 10 s each once the bundles exist.
The server runs from a venv of its own (numpy < 2, which nvidia-pytriton pins; the test
environment keeps numpy 2): ``.venv-triton`` in the repository, or ``$CLIPINSPECT_TRITON_VENV``,
made on the first run (a few minutes, from the package index or pip's cache) and reused after.
If it cannot be made, the tests fail with pip's message; they skip only off Linux x86_64.
"""

from __future__ import annotations

import contextlib
import shutil
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from clipinspect.runtime import Inspector
from clipinspect.runtime.cli import main
from clipinspect.runtime.core.maps import upsample
from clipinspect.runtime.triton import local_server
from clipinspect.runtime.triton import repository as triton
from clipinspect.runtime.triton.client import make_inputs, prepare, preprocessing_from_config
from clipinspect.runtime.triton.local_server import Server

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402
from conftest import SMALL_GRID  # noqa: E402

CATEGORY = "weave"
MODES = {"zeroshot": "zero-shot", "fewshot": "few-shot"}


UNSUPPORTED = local_server.supported_platform()
pytestmark = pytest.mark.skipif(UNSUPPORTED is not None, reason=str(UNSUPPORTED))


@pytest.fixture(scope="session")
def server_environment(pytestconfig) -> local_server.ServerEnvironment:
    """The venv tritonserver runs from, made once (runtime/triton/local_server.py). A venv that
    cannot be made (no package index, say) fails every test here with pip's message."""
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    try:
        return local_server.server_environment(
            pytestconfig.rootpath / ".venv-triton",
            progress=None if reporter is None else lambda msg: reporter.write_line(msg))
    except local_server.TritonServerError as e:
        pytest.fail(f"the Triton server's venv could not be made: {e}", pytrace=False)


@contextlib.contextmanager
def running_server(repo: Path, workdir: Path, environment: local_server.ServerEnvironment):
    """The shared launcher (runtime/triton/local_server.py), failed with the server's log where
    it does not start."""
    try:
        with local_server.running_server(repo, workdir, environment) as server:
            yield server
    except local_server.TritonServerError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(11)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((200, 240), (160, 300))]


def served_bundle(source: Path, tmp_path_factory, images, name: str) -> tuple[Path, Path]:
    """(bundle with reference images for CATEGORY, its python-platform repository)."""
    path = tmp_path_factory.mktemp(name) / "bundle"
    shutil.copytree(source, path)
    Inspector.open(path).add_references(CATEGORY, images[:1])
    repo = path.parent / "models"
    assert main(["triton", str(path), "--out", str(repo), "--platform", "python",
                 "--max-batch", "8"]) == 0
    return path, repo


@pytest.fixture(scope="module")
def winclip(small_bundle_path, tmp_path_factory, images, server_environment):
    path, repo = served_bundle(small_bundle_path, tmp_path_factory, images, "winclip")
    with running_server(repo, path.parent, server_environment) as server:
        yield path, server


@pytest.fixture(scope="module")
def patch(patch_bundle_path, tmp_path_factory, images, server_environment):
    path, repo = served_bundle(patch_bundle_path, tmp_path_factory, images, "patch")
    with running_server(repo, path.parent, server_environment) as server:
        yield path, server


@pytest.fixture(scope="module")
def runtime(images):
    """(bundle, category, mode) -> ``Inspector.inspect`` on the test images, computed once."""
    cache = {}

    def results(path: Path, category: str, mode: str):
        key = (str(path), category, mode)
        if key not in cache:
            cache[key] = Inspector.open(path).inspect(images, category, mode=MODES[mode])
        return cache[key]

    return results


@pytest.fixture(params=["winclip", "patch+adaptation"])
def served(request):
    return request.getfixturevalue({"winclip": "winclip", "patch+adaptation": "patch"}[
        request.param])


def grpc_client(server: Server):
    return grpcclient.InferenceServerClient(server.grpc)


def batch_for(server: Server, images) -> np.ndarray:
    config = grpc_client(server).get_model_config(triton.ENCODER, as_json=True)["config"]
    return prepare(images, preprocessing_from_config(config))


def infer(server: Server, protocol: str, images: np.ndarray, category: str, mode: str):
    """-> (image scores (B,), anomaly grids (B, gh, gw)) from an ensemble."""
    module = {"grpc": grpcclient, "http": httpclient}[protocol]
    client = (grpc_client(server) if protocol == "grpc"
              else httpclient.InferenceServerClient(server.http))
    outputs = [module.InferRequestedOutput(n) for n in ("image_score", "anomaly_grid")]
    result = client.infer(triton.ENSEMBLES[mode], make_inputs(module, images, category),
                          outputs=outputs)
    return result.as_numpy("image_score"), result.as_numpy("anomaly_grid")


def assert_matches_runtime(scores, grids, expected, images) -> None:
    np.testing.assert_allclose(scores, [r.image_score for r in expected], rtol=0, atol=1e-5)
    for grid, r, img in zip(grids, expected, images):
        np.testing.assert_allclose(upsample(grid, img.shape[:2]), r.anomaly_map, rtol=0,
                                   atol=1e-5)


def test_every_model_and_ensemble_is_ready(served):
    _, server = served
    client = grpc_client(server)
    names = {triton.ENCODER, triton.CATEGORIES, *triton.HEADS.values(), *triton.ENSEMBLES.values()}
    index = {m.name: m.state for m in client.get_model_repository_index().models}
    assert index == {n: "READY" for n in names}
    assert all(client.is_model_ready(n) for n in names)
    assert client.get_model_config(triton.ENCODER).config.backend == "python"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("mode", ["zeroshot", "fewshot"])
def test_ensembles_give_the_runtimes_scores_and_maps(served, images, runtime, protocol, mode):
    path, server = served
    scores, grids = infer(server, protocol, batch_for(server, images), CATEGORY, mode)
    assert scores.shape == (len(images),) and grids.shape == (len(images), SMALL_GRID, SMALL_GRID)
    assert_matches_runtime(scores, grids, runtime(path, CATEGORY, mode), images)
    if mode == "fewshot":  # not the zero-shot numbers by accident
        zero = runtime(path, CATEGORY, "zeroshot")
        assert np.abs(scores - [r.image_score for r in zero]).max() > 1e-4


def test_a_category_added_later_is_served_without_a_restart(winclip, images, runtime):
    from clipinspect.export.exporter import add_categories

    path, server = winclip
    batch = batch_for(server, images)
    with pytest.raises(InferenceServerException, match="unknown category 'grain'"):
        infer(server, "grpc", batch, "grain", "zeroshot")
    add_categories(path, ["grain"], progress=lambda msg: None)
    triton.write_repository(path, server.repo, categories_only=True)
    # The categories model re-reads a category's files when they change: same server process,
    # no model control call.
    scores, grids = infer(server, "grpc", batch, "grain", "zeroshot")
    assert_matches_runtime(scores, grids, runtime(path, "grain", "zeroshot"), images)


def batch_stats(server: Server) -> dict[int, int]:
    """{batch size: executions} of the encoder so far."""
    stats = grpc_client(server).get_inference_statistics(triton.ENCODER, as_json=True)
    [model] = stats["model_stats"]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"])
            for b in model.get("batch_stats", [])}


def test_concurrent_requests_of_two_categories_share_encoder_batches(winclip, images, runtime):
    """The encoder's dynamic batcher joins requests whatever their category (the category enters
    only at the heads): one encoder execution serves several categories, scores unchanged."""
    path, server = winclip
    batch = batch_for(server, images)
    requests = [(i % len(images), ("weave", "washer")[(i // 2) % 2]) for i in range(6)]
    before = batch_stats(server)
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(
            lambda r: infer(server, "grpc", batch[r[0]][None], r[1], "zeroshot")[0], requests))
    after = batch_stats(server)
    grew = {size: after[size] - before.get(size, 0) for size in after
            if after[size] > before.get(size, 0)}
    assert sum(size * n for size, n in grew.items()) == len(requests)
    assert max(grew) > 1, f"no execution with more than one image: {grew}"
    expected = {c: [r.image_score for r in runtime(path, c, "zeroshot")]
                for c in ("weave", "washer")}
    np.testing.assert_allclose(np.concatenate(results), [expected[c][i] for i, c in requests],
                               rtol=0, atol=1e-5)
    assert abs(expected["weave"][0] - expected["washer"][0]) > 1e-4


def raw_input(name: str, array: np.ndarray, datatype: str):
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


@pytest.mark.parametrize("case, message", [
    ("unknown category", "unknown category 'nonexistent'"),
    ("wrong shape", "shape"),
    ("wrong dtype", "FP64"),
    ("missing input", "missing"),
])
def test_bad_requests_fail_and_the_server_keeps_serving(winclip, images, runtime, case, message):
    path, server = winclip
    batch = batch_for(server, images)
    name = np.array([CATEGORY.encode()], dtype=np.object_)
    inputs = {
        "unknown category": make_inputs(grpcclient, batch, "nonexistent"),
        "wrong shape": [raw_input("images", batch[:, :, :100, :100].copy(), "FP32"),
                        raw_input("category", name, "BYTES")],
        "wrong dtype": [raw_input("images", batch.astype(np.float64), "FP64"),
                        raw_input("category", name, "BYTES")],
        "missing input": [raw_input("images", batch, "FP32")],
    }[case]
    client = grpc_client(server)
    with pytest.raises(InferenceServerException, match=message):
        client.infer(triton.ENSEMBLES["zeroshot"], inputs)
    assert client.is_server_live() and client.is_server_ready()
    scores, grids = infer(server, "grpc", batch, CATEGORY, "zeroshot")
    assert_matches_runtime(scores, grids, runtime(path, CATEGORY, "zeroshot"), images)


def test_metrics_endpoint_counts_inferences(winclip, images):
    _, server = winclip
    infer(server, "http", batch_for(server, images), CATEGORY, "zeroshot")
    with urllib.request.urlopen(f"http://{server.metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert r.status == 200
    line = next(x for x in text.splitlines() if x.startswith("nv_inference_request_success")
                and f'model="{triton.ENSEMBLES["zeroshot"]}"' in x)
    assert float(line.rsplit(" ", 1)[1]) >= 1


# ------------------------------------------------------------------ the server's venv, no server
def test_python_models_are_pointed_at_the_servers_site_packages(tiny_bundle_path, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from clipinspect.runtime.triton import python_model

    out = triton.write_repository(tiny_bundle_path, tmp_path / "models", platform="python")
    local_server.use_site_packages(out, ["/srv/triton venv/site-packages"])
    python_models = {triton.ENCODER, triton.CATEGORIES, *triton.HEADS.values()}
    for config in out.glob("*/config.pbtxt"):
        cfg = text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())
        params = {k: v.string_value for k, v in cfg.parameters.items()}
        if cfg.name in python_models:
            assert params[python_model.SITE_PACKAGES] == '["/srv/triton venv/site-packages"]'
            assert python_model.PROVIDERS in params or cfg.name == triton.CATEGORIES
        else:
            assert python_model.SITE_PACKAGES not in params


class FakeMaker:
    """local_server's subprocess steps recorded; pip fails while ``fail`` is set."""

    def __init__(self, monkeypatch, tmp_path):
        self.calls, self.fail = [], False
        root = tmp_path / "site" / "pytriton" / "tritonserver" / "bin"
        root.mkdir(parents=True)
        (root / "tritonserver").touch()
        monkeypatch.setattr(local_server, "_run", self.run)
        monkeypatch.setattr(local_server, "_describe", lambda python: (
            local_server.ServerEnvironment(python, tmp_path / "site", "3.11")))
        monkeypatch.delenv(local_server.VENV_ENV, raising=False)

    def run(self, command, what):
        self.calls.append(what)
        if what.startswith("pip") and self.fail:
            raise local_server.TritonServerError(f"{what} failed (1): no network")
        if what == "python -m venv":  # (pip's 'what' names the folder, which may end in venv)
            (Path(command[-1]) / "bin").mkdir(parents=True, exist_ok=True)
            (Path(command[-1]) / "bin" / "python").touch()


def test_the_servers_venv_is_made_once_and_reused_when_complete(monkeypatch, tmp_path):
    maker = FakeMaker(monkeypatch, tmp_path)
    venv = tmp_path / "venv"
    maker.fail = True
    with pytest.raises(local_server.TritonServerError, match="no network"):
        local_server.server_environment(venv)
    assert not (venv / local_server.STAMP).exists()  # not taken for complete next time
    maker.fail = False
    environment = local_server.server_environment(venv)
    assert environment.root == tmp_path / "site" / "pytriton" / "tritonserver"
    assert (venv / local_server.STAMP).read_text().splitlines() == \
        local_server.server_requirements()
    maker.calls.clear()
    local_server.server_environment(venv)
    assert maker.calls == []  # reused
    monkeypatch.setattr(local_server, "server_requirements", lambda: ["nvidia-pytriton==0.7.1"])
    local_server.server_environment(venv)
    assert len(maker.calls) == 2  # other requirements: made again
    monkeypatch.setenv(local_server.VENV_ENV, str(tmp_path / "elsewhere"))
    elsewhere = local_server.server_environment(venv).python
    assert elsewhere == tmp_path / "elsewhere" / "bin" / "python"
