"""The native TensorRT backend (provider ``tensorrt-native``): engines from 'build-engine', GPU
buffers from cupy, no onnxruntime and no torch.

Encoder and heads share device memory two ways: the encoder's outputs stay on the GPU and are
bound as the head's inputs as they are (no copy, no host round trip), and the three execution
contexts share one scratch block of the largest size any of them needs, since they run one after
the other on one CUDA stream. Category arrays (text prototypes, reference memory) are uploaded
once and cached until the category or its memory changes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.bundle import Bundle, sha256_file
from ..core.errors import UsageError
from ..core.names import ENCODER, GRAPHS, HEAD_FEWSHOT, HEADS, TENSORRT_NATIVE
from .engine import EngineError, current_device, find_engines, import_tensorrt, trt_logger


def _memory_size(engine) -> int:
    """Scratch memory the engine needs. device_memory_size_v2 (TensorRT >= 10.1) also counts
    what weight streaming needs; TensorRT 11 has only it, and 0 is a valid answer there."""
    size = getattr(engine, "device_memory_size_v2", None)
    return int(engine.device_memory_size if size is None else size)


class DeviceOutputs(dict):
    """Encoder outputs on the GPU ({name: cupy array}, exactly the encoder's outputs), holding
    the images they were computed from (``inputs``) until the stream has used them."""

    inputs: Any = None


class TrtBackend:
    """A :class:`~clipinspect.runtime.core.backend.Backend` on TensorRT engines (one per graph:
    encoder, head_zeroshot, head_fewshot), made by ``open_backend(..., "tensorrt-native")``."""

    provider = TENSORRT_NATIVE
    device = "cuda"

    @classmethod
    def open(cls, bundle: Bundle, precision: str, provider: str = TENSORRT_NATIVE, *,
             threads: int | None = None, batch_size: int | None = None,
             verify_checksums: bool = True) -> "TrtBackend":
        """The engines built for this GPU; a ``batch_size`` beyond their profile is refused now,
        not at the first batch (``threads``: onnxruntime's, not used here)."""
        bundle.require_heads("the native TensorRT provider (tensorrt-native)")
        backend = cls(bundle, precision, verify_checksums)
        if batch_size is not None and batch_size > backend.max_batch:
            raise UsageError(f"batch size {batch_size} is larger than the engines' profile "
                             f"allows ({backend.max_batch}); lower --batch-size or rebuild with "
                             f"'{backend.rebuild} --max-batch {batch_size}'")
        return backend

    def __init__(self, bundle: Bundle, precision: str, verify_checksums: bool = True):
        trt, cp = import_tensorrt()
        self.trt, self.cp = trt, cp
        self.record = find_engines(bundle, precision, current_device(trt, cp))
        self.max_batch = self.record.profile.max_batch
        self.max_shots = self.record.profile.max_shots
        self.rebuild = f"clipinspect build-engine {bundle.root} --precision {precision}"
        self.logger = trt_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engines = {}
        for name in GRAPHS:
            entry = self.record.files[name]
            path = bundle.root / entry.file
            if not path.is_file() or (verify_checksums and sha256_file(path) != entry.sha256):
                raise EngineError(f"engine file {entry.file!r} is missing or modified; "
                                  f"rebuild with '{self.rebuild}'")
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise EngineError(f"TensorRT could not load {entry.file!r} (built by another "
                                  f"TensorRT version or GPU?); rebuild with '{self.rebuild}'")
            self.engines[name] = engine
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.scratch = cp.cuda.alloc(max(_memory_size(e) for e in self.engines.values()) or 1)
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.contexts = {}
        for name, engine in self.engines.items():
            context = engine.create_execution_context(strategy)
            if hasattr(context, "set_device_memory"):   # TensorRT >= 10.1
                context.set_device_memory(self.scratch.ptr, _memory_size(engine))
            else:
                context.device_memory = self.scratch.ptr
            self.contexts[name] = context
        # {graph: ([inputs], [outputs])} from the engines' I/O tensors, as OrtBackend reads
        # them off its sessions; head_io is the heads' part, which the Inspector reads.
        self.io = {name: self._io(engine) for name, engine in self.engines.items()}
        self.encoder_outputs = self.io[ENCODER][1]
        self.head_io = {name: self.io[name] for name in HEADS}
        self._device_cache: dict[str, tuple[np.ndarray, Any]] = {}

    def _io(self, engine) -> tuple[list[str], list[str]]:
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        return inputs, [n for n in names if n not in inputs]

    def _run(self, name: str, feeds: dict[str, Any]) -> dict[str, Any]:
        """Bind device arrays ``feeds``, allocate the outputs, enqueue; nothing synchronizes."""
        engine, context = self.engines[name], self.contexts[name]
        inputs, outputs = self.io[name]
        for n in inputs:
            arr = feeds[n]
            self._check_dtype(name, n, arr)
            if not context.set_input_shape(n, tuple(arr.shape)):
                lo, _, hi = engine.get_tensor_profile_shape(n, 0)
                raise EngineError(f"the {name} engine refused input {n!r} of shape "
                                  f"{tuple(arr.shape)}: its profile takes {tuple(lo)} to "
                                  f"{tuple(hi)}; rebuild with '{self.rebuild}' and a wider "
                                  "--max-batch / --max-shots")
            context.set_tensor_address(n, arr.data.ptr)
        result = {}
        for n in outputs:
            dtype = self.trt.nptype(engine.get_tensor_dtype(n))
            result[n] = self.cp.empty(tuple(context.get_tensor_shape(n)), dtype=dtype)
            self._check_dtype(name, n, result[n])
            context.set_tensor_address(n, result[n].data.ptr)
        if not context.execute_async_v3(self.stream.ptr):
            raise EngineError(f"TensorRT failed to run the {name} engine")
        return result

    def _check_dtype(self, graph: str, tensor: str, arr) -> None:
        """TensorRT reads a bound buffer as the engine's type, whatever was put there: a
        float32 array bound to an FP16 input would be read as garbage, not converted."""
        want = np.dtype(self.trt.nptype(self.engines[graph].get_tensor_dtype(tensor)))
        if np.dtype(arr.dtype) != want:
            raise EngineError(f"the {graph} engine's {tensor!r} is {want}, the array bound to it "
                              f"is {np.dtype(arr.dtype)}; the engine was built from another "
                              f"graph than this clipinspect feeds: rebuild with '{self.rebuild}'")

    def encode(self, images: np.ndarray) -> dict[str, Any]:
        if len(images) > self.max_batch:
            raise UsageError(f"batch of {len(images)} images, the engines take at most "
                             f"{self.max_batch}: lower --batch-size or rebuild with --max-batch "
                             f"(with '{self.rebuild} --max-batch N')")
        with self.stream:
            x = self.cp.asarray(np.ascontiguousarray(images, dtype=np.float32))
            out = DeviceOutputs(self._run(ENCODER, {"images": x}))
        out.inputs = x
        return out

    def score(self, encoded: dict[str, Any], head: str, extra: dict[str, np.ndarray]
              ) -> dict[str, np.ndarray]:
        inputs, _ = self.io[head]
        feeds = {n: encoded[n] if n in encoded else self._on_device(n, extra[n]) for n in inputs}
        with self.stream:
            out = self._run(head, feeds)
            host = {n: self.cp.asnumpy(v, stream=self.stream) for n, v in out.items()}
        self.stream.synchronize()
        return host

    def _on_device(self, name: str, arr: np.ndarray):
        if name.startswith("memory_"):
            rows = self.engines[HEAD_FEWSHOT].get_tensor_profile_shape(name, 0)[2][0]
            if arr.shape[0] > rows:
                raise UsageError(f"the reference memory has more images than the engines take "
                                 f"({self.max_shots}); rebuild with '{self.rebuild} "
                                 "--max-shots N' or store fewer references")
        cached = self._device_cache.get(name)
        if cached is None or cached[0] is not arr:
            with self.stream:
                cached = (arr, self.cp.asarray(np.ascontiguousarray(arr, dtype=np.float32)))
            self._device_cache[name] = cached
        return cached[1]

    def to_host(self, encoded: dict[str, Any]) -> dict[str, np.ndarray]:
        host = {k: self.cp.asnumpy(v, stream=self.stream) for k, v in encoded.items()}
        self.stream.synchronize()
        return host

    def select_rows(self, encoded: dict[str, Any], rows: list[int]
                    ) -> tuple[dict[str, Any], list[int] | None]:
        # The head scores the whole batch on the device and the caller keeps the rows.
        return encoded, rows
