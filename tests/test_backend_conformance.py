"""Every backend conforms to the Backend protocol (runtime/core/backend.py).

Statically: each class open_backend knows defines every protocol member (as a method, a class
attribute or an attribute its __init__ assigns), read from its source, so backends that cannot
be instantiated here (native TensorRT without a GPU) are checked too. At run time: every backend
this machine can run goes through the same checks (shapes, the few-shot memory the Inspector
builds from it, scores equal to onnxruntime FP32 on the CPU); the others are skipped, each with
its reason.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import shutil
import textwrap

import numpy as np
import pytest

from clipinspect.runtime import Bundle, Inspector
from clipinspect.runtime.core.backend import Backend, protocol_members
from clipinspect.runtime.core.backends import (BACKENDS, ProfileError, backend_class,
                                               open_backend)


def defined_members(cls: type) -> set[str]:
    """Names a class defines: methods and class attributes, and every ``self.X = ...`` or
    ``self.X: T = ...`` in its methods (instance attributes exist only once it runs)."""
    names = set()
    for klass in cls.__mro__[:-1]:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
        for node in ast.walk(tree):
            targets = (node.targets if isinstance(node, ast.Assign) else
                       [node.target] if isinstance(node, ast.AnnAssign) else [])
            names |= {t.attr for t in targets if isinstance(t, ast.Attribute)
                      and isinstance(t.value, ast.Name) and t.value.id == "self"}
    return names


def missing_members(cls: type) -> list[str]:
    return sorted(set(protocol_members()) - defined_members(cls))


def test_protocol_members_are_what_the_inspector_uses():
    assert protocol_members() == ["encode", "encoder_outputs", "head_io", "max_batch", "open",
                                  "provider", "score", "select_rows", "to_host"]


@pytest.mark.parametrize("provider", sorted(BACKENDS))
def test_every_backend_class_defines_the_whole_protocol(provider):
    cls = backend_class(provider)
    assert missing_members(cls) == [], f"{cls.__name__} ({provider}) lacks these members"


def test_the_static_check_catches_a_missing_member():
    class NoHeadIo:
        provider = "x"

        @classmethod
        def open(cls, bundle, precision, provider, **options):
            return cls()

        def __init__(self):
            self.encoder_outputs = []
            self.max_batch = None

        def select_rows(self, encoded, rows):
            return encoded, rows

        def encode(self, images):
            return {}

        def score(self, encoded, head, extra):
            return {}

        def to_host(self, encoded):
            return {}

    assert missing_members(NoHeadIo) == ["head_io"]


# ------------------------------------------------------------------------------ at run time
def _unavailable(provider: str) -> str | None:
    """Why ``provider`` cannot run on this machine, or None."""
    if provider == "tensorrt-native":
        for module in ("tensorrt", "cupy"):
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed"
        import cupy

        try:
            if cupy.cuda.runtime.getDeviceCount() < 1:
                return "no CUDA GPU"
        except Exception as e:  # no driver
            return f"no usable CUDA GPU ({type(e).__name__}: {e})"
        return None
    from clipinspect.runtime.core.backends import PROVIDERS, available_providers

    if provider not in available_providers():
        return f"onnxruntime here has no {PROVIDERS[provider]}"
    return None


@pytest.fixture(scope="module")
def bundle(tiny_bundle_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("conformance") / "bundle"
    shutil.copytree(tiny_bundle_path, path)
    return Bundle.open(path)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(3)
    return rng.normal(size=(2, 3, 224, 224)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(bundle, images):
    cpu = open_backend(bundle, "fp32", "cpu")
    return cpu, cpu.to_host(cpu.encode(images))


def _backend(bundle, provider):
    reason = _unavailable(provider)
    if reason:
        pytest.skip(f"{provider}: {reason}")
    if provider == "tensorrt-native":
        from clipinspect.runtime.tensorrt.compat import BatchRange
        from clipinspect.runtime.tensorrt.engine import build_engines

        build_engines(bundle.root, "fp32", BatchRange(1, 2, 4), max_shots=2, workspace_mb=1024)
        bundle = Bundle.open(bundle.root)
    return open_backend(bundle, "fp32", provider, batch_size=4)


@pytest.mark.parametrize("provider", sorted(BACKENDS))
def test_backend_runs_the_bundle_like_onnxruntime_on_the_cpu(bundle, images, reference,
                                                             provider):
    backend = _backend(bundle, provider)
    assert isinstance(backend, Backend) and backend.provider == provider
    cpu, want = reference
    assert backend.encoder_outputs == cpu.encoder_outputs
    assert backend.head_io == cpu.head_io
    assert backend.max_batch is None or backend.max_batch >= 4  # opened for batches of 4
    encoded = backend.encode(images)
    assert list(encoded) == backend.encoder_outputs  # nothing else travels with them
    host = backend.to_host(encoded)
    assert set(host) == set(backend.encoder_outputs)
    for name, array in host.items():
        assert isinstance(array, np.ndarray) and array.shape == want[name].shape
        np.testing.assert_allclose(array, want[name], rtol=0, atol=2e-3)
    data = bundle.category("weave")
    memory = {n: want[n[len("memory_"):]][:1].reshape(-1, want[n[len("memory_"):]].shape[-1])
              for n in backend.head_io["head_fewshot"][0] if n.startswith("memory_")}
    for head, extra in (("head_zeroshot", data.text), ("head_fewshot", {**data.text, **memory})):
        got = backend.score(backend.encode(images), head, extra)
        expected = cpu.score(cpu.encode(images), head, extra)
        assert set(got) >= {"image_score", "anomaly_grid"}
        assert got["image_score"].shape == (2,)
        assert got["anomaly_grid"].shape == (2, *bundle.grid)
        np.testing.assert_allclose(got["image_score"], expected["image_score"], atol=2e-3)


@pytest.mark.parametrize("provider", sorted(BACKENDS))
def test_inspector_builds_few_shot_memory_through_each_backend(bundle, provider, rng):
    """The path that ended in AttributeError with the native TensorRT backend (no head_io)."""
    backend = _backend(bundle, provider)
    inspector = Inspector(bundle, backend, "fp32")
    pictures = [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(2)]
    memory, used, failed = inspector.build_memory(pictures, batch_size=2)
    assert len(used) == 2 and failed == []
    wanted = [n for n in backend.head_io["head_fewshot"][0] if n.startswith("memory_")]
    assert sorted(memory) == sorted(wanted)
    for name, array in memory.items():
        assert array.ndim == 2 and array.shape[0] % 2 == 0


@pytest.mark.parametrize("provider", sorted(BACKENDS))
def test_selected_rows_score_like_those_images_alone(bundle, images, reference, provider):
    """select_rows: what the Inspector asks to score a few images of a batch (mixed batches),
    without knowing where the backend keeps the encoder outputs."""
    backend = _backend(bundle, provider)
    extra = bundle.category("weave").text
    alone = backend.score(backend.encode(images[1:]), "head_zeroshot", extra)
    part, keep = backend.select_rows(backend.encode(images), [1])
    got = backend.score(part, "head_zeroshot", extra)
    if keep is not None:
        got = {k: v[keep] for k, v in got.items()}
    for name in ("image_score", "anomaly_grid"):
        assert got[name].shape == alone[name].shape
        np.testing.assert_allclose(got[name], alone[name], rtol=0, atol=1e-4)


def test_the_batch_limit_is_the_tensorrt_profile_s(bundle):
    from clipinspect.runtime.core.onnxruntime_backend import OrtBackend

    assert open_backend(bundle, "fp32", "cpu").max_batch is None
    profile = ((1, 3, 224, 224), (2, 3, 224, 224), (3, 3, 224, 224))
    backend = OrtBackend(bundle.graph_path("fp32", "encoder"), {}, "cpu",
                         profiles={"encoder": {"images": profile}})
    assert backend.max_batch == 3


def test_open_backend_refuses_unknown_providers_and_bad_batch_sizes(bundle):
    from clipinspect.runtime.core.backends import ProviderError
    from clipinspect.runtime.core.errors import UsageError

    with pytest.raises(ProviderError, match="unknown provider 'rocm'.*tensorrt-native"):
        open_backend(bundle, "fp32", "rocm")
    with pytest.raises(UsageError, match="batch size must be a whole number >= 1, got 0"):
        open_backend(bundle, "fp32", "cpu", batch_size=0)


def test_profile_limits_are_errors_naming_the_limit(bundle, images):
    """The onnxruntime backend refuses a batch beyond its TensorRT profile before running."""
    from clipinspect.runtime.core.onnxruntime_backend import OrtBackend

    one = ((1, 3, 224, 224),) * 3
    backend = OrtBackend(bundle.graph_path("fp32", "encoder"), {}, "cpu",
                         profiles={"encoder": {"images": one}})
    with pytest.raises(ProfileError, match=r"batch of shape \(2, 3, 224, 224\) exceeds .* "
                                           r"maximum \(1, 3, 224, 224\).*--batch-size"):
        backend.encode(images)
    backend.encode(images[:1])
