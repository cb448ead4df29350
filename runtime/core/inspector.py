"""The Inspector: images in, image scores and anomaly maps out. numpy + onnxruntime only.

Stages (names.STAGES, the names bench and serve time too), each nameable and timeable on its own:
  load      decode + resize + normalize on the host (worker threads, overlapping inference)
  encode    encoder graph: image embedding and the method's embeddings (WinCLIP: window
            embeddings per scale and patch tokens; patch-only: patch embeddings and tokens)
  score     scoring head graph: image scores and the anomaly map on the patch grid
  post      upsampling of the grid map to each input's size, optional smoothing, thresholds
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .backend import Backend
from .backends import open_backend
from .bundle import MANIFEST, Bundle, BundleError, CategoryData, read_manifest
from .manifest import Manifest
from .errors import UsageError
from .images import EncodedImage, ImageError, ImageInput, decode, describe, jpeg_draft
from .maps import gaussian_blur, upsample
from .names import (ENCODE, ENCODER, FEW_SHOT, HEAD_FEWSHOT, HEAD_OF_MODE, LOAD, MODES, POST,
                    SCORE, STAGES, ZERO_SHOT)


def threshold_key(precision: str, mode: str) -> str:
    """Thresholds depend on the graphs and the scoring: stored per precision and mode."""
    return f"{precision}/{mode}"


@dataclass
class InspectionResult:
    """Result for one input image. ``error`` is set (and the rest None) if it could not be used.

    anomaly_map: (H, W) float32 at the input image's own size, higher = more anomalous.
    mask: (H, W) bool, where the bundle has a pixel threshold for the category.
    """

    source: str
    image_score: float | None = None
    anomaly_map: np.ndarray | None = None
    is_anomalous: bool | None = None
    mask: np.ndarray | None = None
    error: str | None = None
    mode: str | None = None
    image: np.ndarray | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        out = {"source": self.source, "image_score": self.image_score, "mode": self.mode}
        if self.anomaly_map is not None:
            out["map_max"] = float(self.anomaly_map.max())
            out["size"] = list(self.anomaly_map.shape)
        if self.is_anomalous is not None:
            out["is_anomalous"] = bool(self.is_anomalous)
        if self.mask is not None:
            out["mask_pixels"] = int(self.mask.sum())
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class LoadedImage:
    """One input after the load stage; ``error`` set (tensor None) if it could not be used."""

    index: int
    source: str
    tensor: np.ndarray | None = None   # (3, h, w) float32
    size: tuple[int, int] | None = None
    image: np.ndarray | None = None
    error: str | None = None


class Inspector:
    """Runs a bundle. Create with :meth:`Inspector.open`."""

    def __init__(self, bundle: Bundle, backend: Backend, precision: str):
        self.bundle = bundle
        self.backend = backend
        self.precision = precision
        self.stage_seconds = dict.fromkeys(STAGES, 0.0)
        self._categories: dict[str, object] = {}
        self._prepared: tuple[str, dict, dict] | None = None
        # The manifest as this Inspector's cached category data knows it (``refresh``); the
        # bundle's own is replaced by every update this process makes through it.
        self._manifest_seen = _stamp(bundle.root / MANIFEST) if bundle is not None else None
        self._manifest_used = getattr(bundle, "manifest", None)
        # Line mode (``stream``): the method's learner, which sees every batch scored against
        # a category's memory (MuSc: the rolling pool); None = nothing learns.
        self.learner = None
        self.line = False
        # Called with 1 per feature map a host scorer finishes (MuSc's batch mode), or None.
        self.scoring_progress: Callable[[int], None] | None = None

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    @classmethod
    def open(cls, bundle: str | Path | Bundle, precision: str = "fp32", provider: str = "cpu",
             threads: int | None = None, verify_checksums: bool = True, *,
             batch_size: int | None = None, attention: str = "auto") -> "Inspector":
        """provider: cpu, cuda or tensorrt (onnxruntime execution providers), or
        tensorrt-native (engines from 'clipinspect build-engine', no onnxruntime).
        ``batch_size``: the largest batch that will be run (sizes TensorRT's profiles).
        ``attention``: auto, fused or standard, which encoder graph onnxruntime runs
        (backends.encoder_graph; ``encoder_graph`` says which one did)."""
        if not isinstance(bundle, Bundle):
            bundle = Bundle.open(bundle, verify_checksums=verify_checksums)
        bundle.graph_path(precision, ENCODER)  # unknown precision -> error naming the others
        return cls(bundle, open_backend(bundle, precision, provider, threads=threads,
                                        batch_size=batch_size, verify_checksums=verify_checksums,
                                        attention=attention), precision)

    @property
    def encoder_graph(self) -> str:
        """The bundle's encoder graph this Inspector runs: ``encoder`` or ``encoder_fused``."""
        return getattr(self.backend, "encoder_graph", ENCODER)

    def refresh(self) -> list[str]:
        """Take up few-shot memory and threshold changes made to the bundle since it was opened
        or last refreshed (operator feedback, by this process or another). Costs one read of the
        manifest when nothing changed; call it between batches, from the thread that inspects,
        so that a batch never mixes two memories. Returns the categories that changed; the
        changed ones are loaded (and their memory checksummed) before anything is replaced."""
        for attempt in range(3):
            stamp = _stamp(self.bundle.root / MANIFEST)
            if stamp == self._manifest_seen:
                return []
            new = read_manifest(self.bundle.root)
            old = self._manifest_used
            changed = sorted({name for name in {*new.categories, *old.categories}
                              if name not in new.categories or name not in old.categories
                              or new.categories[name].to_dict() != old.categories[name].to_dict()})
            fresh = Bundle(self.bundle.root, new)
            try:
                loaded = {}
                for name in changed:
                    if name in new.categories:
                        if new.categories[name].memory is not None:
                            fresh._check_file(new.categories[name].memory,
                                              f"few-shot memory of category {name!r}", True)
                        loaded[name] = fresh.category(name)
            except BundleError:
                if attempt == 2:  # changed again while being read, three times over
                    raise
                continue
            self.bundle.manifest, self._manifest_seen, self._manifest_used = new, stamp, new
            for name in changed:
                self._categories.pop(name, None)
            self._categories.update(loaded)
            if changed:
                self._prepared = None
            return changed
        raise AssertionError("unreachable: the last attempt returns or raises")

    @contextlib.contextmanager
    def using_memory(self, category: str, memory: dict[str, np.ndarray]) -> Iterator[None]:
        """Inspect ``category`` with ``memory`` (as the method prepares it) instead of the
        stored one inside the block: a threshold refit scores with a memory not yet written."""
        data = self._categories.get(category) or self.bundle.category(category)
        self._categories[category] = dataclasses.replace(data, memory=memory)
        self._prepared = None
        try:
            yield
        finally:
            self._categories[category] = data
            self._prepared = None

    def stream(self, **options) -> object | None:
        """Line mode (serve, watch, the station): a method that learns from the parts it
        judges (MuSc's rolling pool of normal parts) does so from now on, between batches on
        the inspecting thread; nothing changes for the other methods. Returns the learner."""
        factory = self.bundle.method.learner
        self.learner = factory(self, **options) if factory is not None else None
        self.line = True
        return self.learner

    def close_stream(self) -> None:
        """Write what the learner holds that is not written yet (the line stops)."""
        if self.learner is not None:
            self.learner.close()

    def category_data(self, category: str) -> CategoryData:
        """The category's data as this Inspector scores with it (loaded once, cached)."""
        if category not in self._categories:
            self._categories[category] = self.bundle.category(category)
        return self._categories[category]

    def swap_memory(self, category: str, memory: dict[str, np.ndarray], shots: int) -> None:
        """Score ``category`` with ``memory`` from the next batch on (a learner's update; call
        between batches, on the inspecting thread). The bundle is not written."""
        data = self.category_data(category)
        self._categories[category] = dataclasses.replace(data, memory=memory, shots=shots)
        self._prepared = None

    def memory_digest(self, category: str) -> str | None:
        """sha256 of the category's few-shot memory file as loaded (None: no memory)."""
        entry = self.bundle.manifest.categories.get(category)
        return entry.memory.sha256 if entry is not None and entry.memory else None

    # --------------------------------------------------------------- loading
    def _load_one(self, index: int, item: ImageInput, keep_image: bool) -> LoadedImage:
        """Never raises: whatever goes wrong with one image becomes that image's error."""
        source = describe(item)
        try:
            # Reduced JPEG decoding only when asked for (it changes the model's input slightly);
            # a kept image is drawn under its map, so it is decoded at the map's size.
            reduced = jpeg_draft() and not keep_image
            decoded = decode(item, max(self.bundle.preprocess.size) if reduced else None)
            tensor = self.bundle.preprocess(decoded.rgb)
        except ImageError as e:
            return LoadedImage(index, source, error=str(e))
        except Exception as e:  # e.g. MemoryError on a huge image: still only this image
            return LoadedImage(index, source, error=f"{source}: {type(e).__name__}: {e}")
        return LoadedImage(index, source, tensor, decoded.size,
                           decoded.rgb if keep_image else None)

    def _batches(self, items: Sequence[ImageInput], batch_size: int, keep_image: bool,
                 workers: int = 2) -> Iterator[list[LoadedImage]]:
        """Yield loaded batches; the next batch decodes while the caller runs the current one."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"batch size must be a whole number >= 1, got {batch_size!r}")
        starts = range(0, len(items), batch_size)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clipinspect-load") as pool:
            def submit(start: int) -> list[Future]:
                return [pool.submit(self._load_one, i, items[i], keep_image)
                        for i in range(start, min(start + batch_size, len(items)))]
            pending = submit(0) if len(items) else []
            for n, _ in enumerate(starts):
                t0 = time.perf_counter()
                current = [f.result() for f in pending]
                self.stage_seconds[LOAD] += time.perf_counter() - t0
                pending = submit(starts[n + 1]) if n + 1 < len(starts) else []
                yield current

    # ------------------------------------------------------------ embeddings
    def iter_encoded(self, images: Sequence[ImageInput], batch_size: int = 8,
                     keep_images: bool = False
                     ) -> Iterator[tuple[list[LoadedImage], list[LoadedImage], dict | None]]:
        """Per batch: (all loaded inputs, the usable ones, their encoder outputs or None).

        The encoder outputs can be scored several ways (:meth:`score`) without encoding again.
        """
        for batch in self._batches(list(images), batch_size, keep_images):
            good = [b for b in batch if b.error is None]
            yield batch, good, self._encode(good)

    def _encode(self, good: list[LoadedImage]) -> dict | None:
        if not good:
            return None
        t0 = time.perf_counter()
        encoded = self.backend.encode(np.stack([b.tensor for b in good]))
        self.stage_seconds[ENCODE] += time.perf_counter() - t0
        return encoded

    def build_memory(self, images: Sequence[ImageInput], batch_size: int = 8, *,
                     category: str | None = None
                     ) -> tuple[dict[str, np.ndarray], list[str], list[tuple[str, str]]]:
        """Few-shot reference memory from normal images, without storing it.

        Returns (memory arrays for the few-shot head, sources used, [(source, error)]). With a
        ``category``, the memory is prepared by the bundle's method as its few-shot head takes
        it (AprilLab adds the references' map range); otherwise that happens when it is used.
        """
        chunks: dict[str, list[np.ndarray]] = {}
        used: list[str] = []
        failed: list[tuple[str, str]] = []
        for batch, good, encoded in self.iter_encoded(images, batch_size):
            failed += [(b.source, b.error) for b in batch if b.error is not None]
            if encoded is not None:
                for k, v in self.backend.to_host(encoded).items():
                    chunks.setdefault(k, []).append(v)
                used += [b.source for b in good]
        if not used:
            detail = "; ".join(f"{s}: {e}" for s, e in failed[:3])
            raise ImageError(f"no usable reference image: {detail or 'none given'}")
        outputs = {k: np.concatenate(v) for k, v in chunks.items()}
        # The few-shot head says what memory it takes: memory_X is encoder output X (a method
        # scored on the host, without heads, keeps every output: MuSc's pool).
        names = ([n for n in self.backend.head_io[HEAD_FEWSHOT][0] if n.startswith("memory_")]
                 if HEAD_FEWSHOT in self.backend.head_io else
                 [f"memory_{n}" for n in self.bundle.method.outputs(self.manifest)])
        memory = {n: np.ascontiguousarray(outputs[n[len("memory_"):]].reshape(
            -1, outputs[n[len("memory_"):]].shape[-1])) for n in names}
        if category is not None:
            memory = self.bundle.method.prepare_memory(self, category, memory)
        return memory, used, failed

    # The method's memory hook (core.registry.MemoryContext) sees the Inspector through these.
    def run_head(self, head: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A scoring head on explicit inputs (no encoder outputs, no category)."""
        return self.backend.score({}, head, feeds)

    def category_text(self, category: str) -> dict[str, np.ndarray]:
        """The category's text inputs of the heads."""
        return self._category_inputs(category, ZERO_SHOT)[1]

    def _prepared_memory(self, category: str, memory: dict[str, np.ndarray]
                         ) -> dict[str, np.ndarray]:
        """The memory as the method's few-shot head takes it, kept for the last memory asked
        about: an evaluation scores many batches against one memory."""
        last = self._prepared
        if last is None or last[0] != category or last[1] is not memory:
            last = self._prepared = (category, memory,
                                     self.bundle.method.prepare_memory(self, category, memory))
        return last[2]

    def add_references(self, category: str, images: Sequence[ImageInput], batch_size: int = 8
                       ) -> tuple[int, list[tuple[str, str]]]:
        """Compute few-shot reference memory from normal images and store it in the bundle.

        Replaces earlier memory of the category. Returns (shots stored, failed images).
        """
        self.bundle.category(category)  # unknown category -> error before any work
        memory, used, failed = self.build_memory(images, batch_size, category=category)
        self.bundle.set_memory(category, memory, used, shots=len(used))
        self._categories.pop(category, None)
        return len(used), failed

    # ------------------------------------------------------------- inspection
    def check(self, category: str, mode: str = "auto") -> str:
        """Validate a category and mode before any work; returns the mode that will be used.
        On a line (``stream``) a part is scored as it comes, so a method whose images score
        each other needs the category's pool there."""
        used = self._category_inputs(category, mode)[0]
        if self.line and self.pool_scored(used):
            raise UsageError(f"category {category!r}: a {self.manifest.method} bundle scores each "
                             "part on a line against the category's pool of normal parts, and "
                             "this category has none" + (" (mode zero-shot asks for batch mode)"
                                                         if mode == ZERO_SHOT else "") +
                             f"; seed it with 'clipinspect fewshot {self.bundle.root} --category "
                             f"{category} DIR' (4 or more normal parts), or score a folder "
                             "offline with 'clipinspect predict' (batch mode)")
        return used

    def _category_inputs(self, category: str, mode: str,
                         memory: dict[str, np.ndarray] | None = None
                         ) -> tuple[str, dict[str, np.ndarray], CategoryData]:
        """-> (mode used, extra head inputs, category data). ``memory`` replaces the stored
        reference memory (evaluation of several shot counts without touching the bundle)."""
        if mode not in MODES:
            raise UsageError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
        data = self.category_data(category)
        memory = data.memory if memory is None else memory
        if mode == FEW_SHOT and memory is None:
            raise BundleError(f"category {category!r} has no reference images; add them with "
                              f"'clipinspect fewshot {self.bundle.root} --category {category} DIR'")
        use_fewshot = memory is not None and mode != ZERO_SHOT
        if use_fewshot:
            memory = self._prepared_memory(category, memory)
        extra = {**data.text, **(memory if use_fewshot else {})}
        return (FEW_SHOT if use_fewshot else ZERO_SHOT), extra, data

    def score(self, encoded: dict, category: str, mode: str = "auto",
              memory: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, str]:
        """Encoder outputs of a batch -> (image scores (B,), grid maps (B, gh, gw), mode used)."""
        mode_used, extra, _ = self._category_inputs(category, mode, memory)
        t0 = time.perf_counter()
        scorer = self.bundle.method.scorer
        if scorer is not None:  # scored on the host (MuSc): no head graph
            pool = {k: v for k, v in extra.items() if k.startswith("memory_")} \
                if mode_used == FEW_SHOT else None
            scores, grids = scorer(self, self.backend.to_host(encoded), pool)
            self.stage_seconds[SCORE] += time.perf_counter() - t0
            return scores, grids, mode_used
        out = self.backend.score(encoded, HEAD_OF_MODE[mode_used], extra)
        self.stage_seconds[SCORE] += time.perf_counter() - t0
        return out["image_score"], out["anomaly_grid"], mode_used

    def pool_scored(self, mode_used: str) -> bool:
        """Whether images inspected in ``mode_used`` score each other (MuSc's batch mode): then
        everything inspected together is one pool, scored once all of it is encoded."""
        return self.bundle.method.scorer is not None and mode_used == ZERO_SHOT

    def encode_all(self, images: Sequence[ImageInput], batch_size: int = 8,
                   keep_images: bool = False, progress: Callable[[int], None] | None = None
                   ) -> tuple[list[LoadedImage], list[LoadedImage], dict | None]:
        """Every input loaded and the usable ones encoded, in batches, their outputs
        concatenated on the host: (all inputs, usable ones, outputs or None)."""
        images = list(images)
        batches, goods, out = [], [], {}
        for batch, good, encoded in self.iter_encoded(images, batch_size, keep_images):
            start = len(goods)
            batches += batch
            goods += good
            for k, v in (self.backend.to_host(encoded) if encoded is not None else {}).items():
                if k not in out:  # filled in place: the pool is held once, not twice
                    out[k] = np.empty((len(images), *v.shape[1:]), v.dtype)
                out[k][start:start + len(v)] = v
            if progress:
                progress(len(batch))
        return batches, goods, ({k: v[:len(goods)] for k, v in out.items()} or None)

    def thresholds(self, category: str, mode_used: str) -> dict[str, float]:
        """Thresholds stored for this category, precision and mode ({} if none)."""
        entry = self.bundle.manifest.categories.get(category)
        found = entry.thresholds.get(threshold_key(self.precision, mode_used)) if entry else None
        return found.values() if found else {}

    def inspect(self, images: Sequence[ImageInput] | ImageInput, category: str,
                batch_size: int = 8, mode: str = "auto", *, smoothing_sigma: float = 0.0,
                keep_images: bool = False,
                progress: Callable[[int], None] | None = None) -> list[InspectionResult]:
        """Inspect images of one category; one result per input, in order.

        images: paths, PIL images or HxW(x3|x4) uint8 arrays, any size; a single one is accepted.
        mode: "auto" (few-shot when the category has references), "zero-shot" or "few-shot".
        smoothing_sigma: Gaussian smoothing of the upsampled map in pixels (0 = off, as the
            reference). One unusable image yields a result with ``error`` set; the rest proceed.
        """
        return list(self.iter_inspect(images, category, batch_size, mode,
                                      smoothing_sigma=smoothing_sigma, keep_images=keep_images,
                                      progress=progress))

    def iter_inspect(self, images: Sequence[ImageInput] | ImageInput, category: str,
                     batch_size: int = 8, mode: str = "auto", *, smoothing_sigma: float = 0.0,
                     keep_images: bool = False, progress: Callable[[int], None] | None = None
                     ) -> Iterator[InspectionResult]:
        """Like :meth:`inspect`, yielding results in input order as each batch completes, so a
        long run can be written out as it goes with memory bounded by a few batches."""
        if (isinstance(images, (str, Path, np.ndarray, EncodedImage))
                or hasattr(images, "getpixel")):
            images = [images]
        mode_used = self.check(category, mode)
        thresholds = self.thresholds(category, mode_used)
        if self.pool_scored(mode_used):  # the images score each other: all of them first
            batch, good, encoded = self.encode_all(images, batch_size, keep_images, progress)
            bar = None
            if progress is not None and encoded is not None:  # a caller that shows progress
                from .progress import Progress
                bar = Progress(len(self.bundle.method.outputs(self.manifest)) - 1,
                               f"mutual scoring of {len(good)}", unit="maps")
            self.scoring_progress = bar.update if bar else None
            try:
                results = self._results(batch, good, encoded, category, mode=mode,
                                        mode_used=mode_used, thresholds=thresholds,
                                        sigma=smoothing_sigma)
            finally:
                self.scoring_progress = None
                if bar:
                    bar.close()
            yield from results
            return
        for batch, good, encoded in self.iter_encoded(images, batch_size, keep_images):
            results = self._results(batch, good, encoded, category, mode=mode,
                                    mode_used=mode_used, thresholds=thresholds,
                                    sigma=smoothing_sigma)
            if progress:
                progress(len(batch))
            yield from results

    def load(self, item: ImageInput, keep_image: bool = False) -> LoadedImage:
        """The load stage of one input, callable from any thread (a server decodes each request
        as it arrives); never raises: an unusable input comes back with ``error`` set."""
        return self._load_one(0, item, keep_image)

    def inspect_loaded(self, batch: Sequence[LoadedImage], category: str, mode: str = "auto",
                       smoothing_sigma: float = 0.0) -> list[InspectionResult]:
        """Inspect inputs already through :meth:`load` as one batch; one result per input."""
        self.check(category, mode)  # also for an empty batch
        return self.inspect_mixed(batch, [(category, mode)] * len(batch), smoothing_sigma)

    def inspect_mixed(self, batch: Sequence[LoadedImage], keys: Sequence[tuple[str, str]],
                      smoothing_sigma: float = 0.0) -> list[InspectionResult]:
        """Inspect inputs of several categories and modes as one batch; ``keys[i]`` is
        (category, mode) of ``batch[i]``. The encoder does not depend on the category, so every
        usable input is encoded in one pass; each (category, mode) group is then scored by its
        head on its own rows. Results equal :meth:`inspect_loaded` called per group."""
        if len(keys) != len(batch):
            raise UsageError(f"{len(batch)} inputs but {len(keys)} (category, mode) keys: give "
                             "one key per input")
        groups: dict[tuple[str, str], list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        used = {key: self.check(*key) for key in groups}  # every key valid before any work
        row = {i: r for r, i in enumerate(i for i, b in enumerate(batch) if b.error is None)}
        encoded = self._encode([batch[i] for i in row])
        results: list[InspectionResult] = [None] * len(batch)  # type: ignore[list-item]
        for (category, mode), members in groups.items():
            rows = [row[i] for i in members if i in row]
            part, keep = self._rows(encoded, rows, len(row)) if rows else (None, None)
            out = self._results([batch[i] for i in members], [batch[i] for i in members
                                                              if i in row], part, category,
                                mode=mode, mode_used=used[category, mode], keep=keep,
                                thresholds=self.thresholds(category, used[category, mode]),
                                sigma=smoothing_sigma)
            for i, r in zip(members, out):
                results[i] = r
        return results

    def _rows(self, encoded: dict, rows: list[int], total: int) -> tuple[dict, list[int] | None]:
        """(encoder outputs a group's head runs on, rows of that head's outputs to keep)."""
        if len(rows) == total:
            return encoded, None
        return self.backend.select_rows(encoded, rows)

    def _results(self, batch: list[LoadedImage], good: list[LoadedImage], encoded: dict | None,
                 category: str, *, mode: str, mode_used: str, thresholds: dict, sigma: float,
                 keep: list[int] | None = None) -> list[InspectionResult]:
        done: dict[int, InspectionResult] = {}
        if encoded is not None:
            scores, grids, _ = self.score(encoded, category, mode)
            if keep is not None:
                scores, grids = scores[keep], grids[keep]
            t0 = time.perf_counter()
            for j, b in enumerate(good):
                done[id(b)] = self._finish(b, float(scores[j]), grids[j], thresholds, sigma,
                                           mode_used)
            self.stage_seconds[POST] += time.perf_counter() - t0
            if self.learner is not None and mode_used == FEW_SHOT:
                self.learner.judged(category, self.backend.to_host(encoded),
                                    keep or list(range(len(good))), [done[id(b)] for b in good])
        return [done.get(id(b)) or InspectionResult(b.source, error=b.error) for b in batch]

    @staticmethod
    def _finish(b: LoadedImage, score: float, grid: np.ndarray, thresholds: dict, sigma: float,
                mode: str) -> InspectionResult:
        amap = upsample(grid, b.size)
        if sigma > 0:
            amap = gaussian_blur(amap, sigma)
        result = InspectionResult(b.source, score, amap, mode=mode, image=b.image)
        if "image" in thresholds:
            result.is_anomalous = score >= thresholds["image"]
        if "pixel" in thresholds:
            result.mask = amap >= thresholds["pixel"]
        return result


def _stamp(path: Path) -> bytes | None:
    """The manifest's bytes: a few kB read per batch. Its inode, size and time stamp do not
    tell two quick updates apart (an inode is reused, time stamps are coarse, a new memory
    file's name has the same length)."""
    try:
        return path.read_bytes()
    except OSError:
        return None
