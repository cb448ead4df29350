"""Argument plumbing of the native TensorRT code against stand-ins for TensorRT and cupy that
record what they are asked. They prove which calls are made with which arguments, never numerics
(those are the GPU-gated tests in test_tensorrt.py and benchmarks/gpu_check.py).

The stand-in engines have the I/O tensors of the small bundle's graphs, as engines built from
them would.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from clipinspect.runtime import Bundle, Inspector
from clipinspect.runtime.core.backend import Backend
from clipinspect.runtime.core.manifest import EngineBuild, EngineProfile, FileEntry
from clipinspect.runtime.tensorrt import backend as tb
from clipinspect.runtime.tensorrt import engine as te

onnx = pytest.importorskip("onnx")


# ------------------------------------------------------------------------- cupy stand-in
class FakeArray:
    """A 'device' array: numpy data plus the .data.ptr TensorRT is given."""

    _next = 0x1000

    def __init__(self, array: np.ndarray):
        self.array = array
        FakeArray._next += 0x1000
        self.data = types.SimpleNamespace(ptr=FakeArray._next)
        self.shape, self.dtype = array.shape, array.dtype


class FakeStream:
    ptr = 7

    def __init__(self, non_blocking: bool = False):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        pass


def fake_cupy(calls: list) -> types.SimpleNamespace:
    def alloc(size):
        calls.append(("alloc", size))
        return types.SimpleNamespace(ptr=0xBEEF)

    cuda = types.SimpleNamespace(Stream=FakeStream, alloc=alloc)
    return types.SimpleNamespace(
        cuda=cuda, asarray=lambda a: FakeArray(np.asarray(a)),
        empty=lambda shape, dtype: FakeArray(np.zeros(shape, dtype)),
        asnumpy=lambda a, stream=None: a.array)


# --------------------------------------------------------------------- TensorRT stand-in
class FakeEngine:
    """I/O of one graph; the profile spans batch 1..max_batch and memory 1..2 shots' rows.
    device_memory_size_v2 is 0 and device_memory_size absent, as TensorRT 11 can answer."""

    def __init__(self, graph, max_batch: int, rows: dict[str, int], known: dict[str, list]):
        # Where the graph leaves an axis symbolic, the heads' inputs give it (batch only).
        self.inputs = {v.name: known.get(v.name, te_dims(v)) for v in graph.input}
        self.outputs = {v.name: known.get(v.name, te_dims(v)) for v in graph.output}
        self.names = [*self.inputs, *self.outputs]
        self.num_io_tensors = len(self.names)
        self.device_memory_size_v2 = 0
        self.max_batch, self.rows = max_batch, rows

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "in" if name in self.inputs else "out"

    def get_tensor_dtype(self, name):
        return "float"

    def get_tensor_profile_shape(self, name, profile):
        dims = self.inputs[name]
        first = (self.rows[name], 2 * self.rows[name]) if name in self.rows else \
            (1, 2048) if name.startswith("text_") else (1, self.max_batch)
        lo = tuple(first[0] if d is None else d for d in dims)
        hi = tuple(first[1] if d is None else d for d in dims)
        return lo, hi, hi

    def create_execution_context(self, strategy):
        return FakeContext(self, strategy)


def te_dims(value) -> list[int | None]:
    from clipinspect.runtime.tensorrt.compat import value_dims

    return value_dims(value)


class FakeContext:
    def __init__(self, engine: FakeEngine, strategy):
        self.engine, self.strategy = engine, strategy
        self.calls: list = []
        self.batch = 1

    def set_device_memory(self, ptr, size):
        self.calls.append(("set_device_memory", ptr, size))

    def set_input_shape(self, name, shape):
        self.calls.append(("set_input_shape", name, shape))
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        if name in ("images", *[n for n in self.engine.inputs if not n.startswith(("text_",
                                                                                   "memory_"))]):
            self.batch = shape[0]
        return all(a <= s <= b for a, s, b in zip(lo, shape, hi)) and len(shape) == len(lo)

    def set_tensor_address(self, name, ptr):
        self.calls.append(("set_tensor_address", name, ptr))

    def get_tensor_shape(self, name):
        dims = self.engine.outputs[name]
        return tuple(self.batch if d is None else d for d in dims)

    def execute_async_v3(self, stream):
        self.calls.append(("execute_async_v3", stream))
        return True


def fake_tensorrt(engines: dict[str, FakeEngine]) -> types.SimpleNamespace:
    by_plan = {name.encode(): e for name, e in engines.items()}

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            return by_plan[plan]

    return types.SimpleNamespace(
        __version__="11.4.0.106", Runtime=Runtime,
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        ExecutionContextAllocationStrategy=types.SimpleNamespace(USER_MANAGED="user"),
        TensorIOMode=types.SimpleNamespace(INPUT="in", OUTPUT="out"),
        nptype=lambda dtype: np.float32)


@pytest.fixture(scope="module")
def stand_in(tiny_bundle_path, tmp_path_factory):
    """(bundle, engine record, stand-in engines) with plan files holding each graph's name."""
    from clipinspect.runtime.tensorrt.compat import dynamic_rows, head_inputs

    bundle = Bundle.open(tiny_bundle_path)
    root = tmp_path_factory.mktemp("plans")
    # Built directly, not parsed: the stand-in plans lie outside the bundle, unchecked.
    record = EngineBuild(files={}, source_graphs={},
                         profile=EngineProfile((1, 2, 4), max_shots=2))
    engines = {}
    for name in te.GRAPHS:
        graph = onnx.load(str(bundle.graph_path("fp32", name)), load_external_data=False).graph
        engines[name] = FakeEngine(graph, 4, dynamic_rows(bundle), head_inputs(bundle))
        (root / f"{name}.plan").write_bytes(name.encode())
        record.files[name] = FileEntry(str(root / f"{name}.plan"), "unchecked", len(name))
    return bundle, record, engines


@pytest.fixture
def backend(stand_in, monkeypatch):
    bundle, record, engines = stand_in
    calls: list = []
    monkeypatch.setattr(tb, "import_tensorrt", lambda: (fake_tensorrt(engines),
                                                         fake_cupy(calls)))
    monkeypatch.setattr(tb, "current_device", lambda trt, cp: None)
    monkeypatch.setattr(tb, "find_engines", lambda b, precision, device: record)
    made = tb.TrtBackend(bundle, "fp32", verify_checksums=False)
    made.fake_calls = calls
    return made


def test_head_io_is_read_off_the_engines(backend, stand_in):
    bundle = stand_in[0]
    assert isinstance(backend, Backend)
    for name in ("head_zeroshot", "head_fewshot"):
        graph = onnx.load(str(bundle.graph_path("fp32", name)), load_external_data=False).graph
        assert backend.head_io[name] == ([v.name for v in graph.input],
                                         [v.name for v in graph.output])
    assert set(backend.head_io) == {"head_zeroshot", "head_fewshot"}
    assert backend.encoder_outputs == [v.name for v in onnx.load(str(bundle.graph_path(
        "fp32", "encoder")), load_external_data=False).graph.output]


def test_zero_scratch_memory_is_not_mistaken_for_a_missing_answer(backend):
    """TensorRT 11 has only device_memory_size_v2; 0 there must not fall back to the removed
    device_memory_size (AttributeError before)."""
    assert ("alloc", 1) in backend.fake_calls
    for context in backend.contexts.values():
        assert context.strategy == "user"
        assert context.calls[0] == ("set_device_memory", 0xBEEF, 0)


def test_inspector_builds_few_shot_memory_on_the_native_backend(backend, stand_in, rng):
    """'clipinspect fewshot --provider tensorrt-native' ended in AttributeError (no head_io)."""
    inspector = Inspector(stand_in[0], backend, "fp32")
    pictures = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    memory, used, failed = inspector.build_memory(pictures, batch_size=2)
    wanted = [n for n in backend.head_io["head_fewshot"][0] if n.startswith("memory_")]
    assert sorted(memory) == sorted(wanted) and len(used) == 3 and failed == []
    rows = stand_in[2]["head_fewshot"].rows
    assert all(memory[n].shape[0] == 3 * rows[n] for n in wanted)


def test_a_shape_the_profile_refuses_is_an_error_naming_input_shape_and_range(backend):
    backend.max_batch = 8  # a record claiming more than the engine's profile (4)
    with pytest.raises(te.EngineError, match=r"refused input 'images' of shape \(6, 3, 224, "
                                             r"224\): its profile takes \(1, 3, 224, 224\) to "
                                             r"\(4, 3, 224, 224\); rebuild"):
        backend.encode(np.zeros((6, 3, 224, 224), np.float32))
    encoder = backend.contexts["encoder"]
    assert not any(c[0] == "execute_async_v3" for c in encoder.calls)


# ------------------------------------------------------------------------------- building
class Recorder:
    """Any attribute is a callable recording its call and returning another Recorder."""

    def __init__(self, log: list, name: str = "trt"):
        self._log, self._name = log, name

    def __getattr__(self, attr):
        return Recorder(self._log, f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        self._log.append((self._name.split(".", 1)[-1], args, kwargs))
        return Recorder(self._log, f"{self._name}()")

    def __int__(self):
        return 0

    def __bytes__(self):
        return b"bytes"

    def __bool__(self):
        return True


def test_fp32_means_fp32_tf32_is_cleared(tmp_path):
    log: list = []
    trt = Recorder(log)
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    trt.BuilderFlag = types.SimpleNamespace(TF32="TF32")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    shapes = {"images": ((1, 3, 224, 224), (2, 3, 224, 224), (4, 3, 224, 224))}
    plan, cache = te._build_one(trt, None, tmp_path / "encoder.onnx", shapes,
                                settings=te.BuildSettings(workspace_mb=64), cache_bytes=b"")
    calls = [(name.rsplit(".", 1)[-1], args) for name, args, _ in log]
    assert ("clear_flag", ("TF32",)) in calls
    assert ("create_network", (1,)) in calls  # strongly typed
    assert ("set_memory_pool_limit", ("WORKSPACE", 64 << 20)) in calls
    assert ("set_shape", ("images", *shapes["images"])) in calls
    assert plan == cache == b"bytes"


# ----------------------------------------------------------- binding types, one logger a process
def test_a_binding_of_another_dtype_is_refused_before_execute(stand_in, monkeypatch):
    """TensorRT reads a buffer as the engine's type: a float32 array bound to an FP16 input
    would be read as garbage. The check names the engine, the tensor and both types."""
    bundle, record, engines = stand_in
    trt = fake_tensorrt(engines)
    trt.nptype = lambda dtype: np.float16 if dtype == "half" else np.float32
    monkeypatch.setattr(engines["encoder"], "get_tensor_dtype",
                        lambda name: "half" if name == "images" else "float")
    monkeypatch.setattr(tb, "import_tensorrt", lambda: (trt, fake_cupy([])))
    monkeypatch.setattr(tb, "current_device", lambda trt, cp: None)
    monkeypatch.setattr(tb, "find_engines", lambda b, precision, device: record)
    made = tb.TrtBackend(bundle, "fp32", verify_checksums=False)
    with pytest.raises(te.EngineError, match=r"the encoder engine's 'images' is float16, the "
                                             r"array bound to it is float32; .*rebuild") as err:
        made.encode(np.zeros((1, 3, 224, 224), np.float32))
    assert "\n" not in str(err.value)
    assert not any(c[0] == "execute_async_v3" for c in made.contexts["encoder"].calls)


def test_one_tensorrt_logger_per_process(stand_in, monkeypatch):
    bundle, record, engines = stand_in
    trt = fake_tensorrt(engines)
    made: list = []
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, lvl: made.append(s)})
    monkeypatch.setattr(tb, "import_tensorrt", lambda: (trt, fake_cupy([])))
    monkeypatch.setattr(tb, "current_device", lambda trt, cp: None)
    monkeypatch.setattr(tb, "find_engines", lambda b, precision, device: record)
    first = tb.TrtBackend(bundle, "fp32", verify_checksums=False)
    second = tb.TrtBackend(bundle, "fp32", verify_checksums=False)
    assert len(made) == 1 and first.logger is second.logger is te.trt_logger(trt)


# ------------------------------------------------- head engines built once, shared by precision
DEVICE = te.Device("NVIDIA H100", "9.0", "10.13.3.9", sm_count=132, memory_gib=80)


@pytest.fixture
def fake_builds(tiny_bundle_copy, monkeypatch):
    """build_engines with TensorRT's builder replaced: records which graphs it builds. The
    bundle gets an 'fp16' variant whose encoder is a copy of the FP32 one (graph contents do
    not matter to the plumbing)."""
    from clipinspect.runtime.core.bundle import write_versioned

    bundle = Bundle.open(tiny_bundle_copy)
    data = bundle.graph_path("fp32", "encoder").read_bytes()
    fp32 = bundle.manifest.graphs["fp32"]["encoder"]
    entry = bundle.file_entry(write_versioned(bundle.root, "fp16", "encoder.onnx", data),
                              inputs=fp32.inputs, outputs=fp32.outputs)
    bundle.set_precision("fp16", entry, {"agreement_vs_fp32": {
        "map_pearson_min": 1.0, "max_image_score_diff": 0.0, "images": 1}})
    built: list = []

    def build_one(trt, logger, path, shapes, *, settings, cache_bytes):
        built.append(path.name.split("-")[0].split(".")[0])
        return f"plan of {path.name} {sorted(shapes.items())}".encode(), b"timings"

    trt = types.SimpleNamespace(Logger=type("Logger", (), {"WARNING": 2,
                                                           "__init__": lambda s, lvl: None}))
    monkeypatch.setattr(te, "import_tensorrt", lambda: (trt, None))
    monkeypatch.setattr(te, "current_device", lambda trt, cupy: DEVICE)
    monkeypatch.setattr(te, "_build_one", build_one)
    return tiny_bundle_copy, built


def _build(path, precision, batch=(1, 2, 4)):
    import io

    return te.build_engines(path, precision, te.BatchRange(*batch), max_shots=2, workspace_mb=64,
                            stream=io.StringIO())


def test_head_engines_are_built_once_and_shared_across_precisions(fake_builds):
    path, built = fake_builds
    fp32 = _build(path, "fp32")
    assert built == ["encoder", "head_zeroshot", "head_fewshot"]
    assert all(fp32[h]["file"].startswith(f"engines/{DEVICE.key}/heads/")
               for h in ("head_zeroshot", "head_fewshot"))
    fp16 = _build(path, "fp16")
    assert built[3:] == ["encoder"]                     # the heads were not rebuilt
    assert fp16["heads_reused"] == ["head_zeroshot", "head_fewshot"]
    for head in ("head_zeroshot", "head_fewshot"):
        assert fp16[head] == fp32[head]
    # Both records load: find_engines accepts them, the shared files exist once.
    bundle = Bundle.open(path)
    for precision in ("fp32", "fp16"):
        entry = te.find_engines(bundle, precision, DEVICE)
        assert (bundle.root / entry.files["head_fewshot"].file).is_file()


def test_a_head_engine_of_another_profile_is_not_shared(fake_builds):
    path, built = fake_builds
    fp32 = _build(path, "fp32")
    fp16 = _build(path, "fp16", batch=(1, 4, 8))
    assert built == ["encoder", "head_zeroshot", "head_fewshot"] * 2
    assert fp16["heads_reused"] == [] and fp16["head_fewshot"] != fp32["head_fewshot"]
    # The fp32 record keeps its own head engines.
    bundle = Bundle.open(path)
    assert (bundle.root / te.find_engines(bundle, "fp32", DEVICE).files["head_fewshot"].file
            ).is_file()


# ------------------------------------------------------- caches are written inside the bundle
def test_a_linked_timing_cache_folder_is_refused_and_nothing_is_written_outside(fake_builds,
                                                                                  tmp_path):
    from clipinspect.runtime.core.manifest import BundleError

    path, built = fake_builds
    outside = tmp_path / "outside"
    outside.mkdir()
    (path / "cache").mkdir(exist_ok=True)
    (path / "cache" / "tensorrt").symlink_to(outside)
    with pytest.raises(BundleError, match="symbolic link"):
        _build(path, "fp32")
    assert built == [] and list(outside.iterdir()) == []


def test_the_onnxruntime_tensorrt_cache_folder_is_confined_to_the_bundle(tiny_bundle_copy,
                                                                         tmp_path):
    from clipinspect.runtime.core.backends import trt_cache_dir
    from clipinspect.runtime.core.manifest import BundleError

    bundle = Bundle.open(tiny_bundle_copy)
    assert trt_cache_dir(bundle) == bundle.root.resolve() / "cache" / "ort-trt"
    (tmp_path / "outside").mkdir()
    (bundle.root / "cache").mkdir(exist_ok=True)
    (bundle.root / "cache" / "ort-trt").symlink_to(tmp_path / "outside")
    with pytest.raises(BundleError, match="symbolic link"):
        trt_cache_dir(bundle)
