"""The bundle: the one contract between the export side (torch) and the runtime (no torch).

A bundle is a directory::

    manifest.json                          versioned description, checksums of every file below
    fp32/encoder.onnx                      images -> image / window embeddings, patch tokens
    fp32/head_zeroshot.onnx                embeddings + text prototypes -> scores, grid map
    fp32/head_fewshot.onnx                 ... + reference memory -> scores, grid map
    fp16/encoder-<digest>.onnx             FP16 / INT8 variants of the encoder ('quantize');
    int8/encoder-<digest>.onnx             they use the FP32 heads
    categories/<name>/text-<digest>.npz    prompt-ensemble text embeddings of one category
                                           (+ normalized prompt pools with prompt adaptation)
    categories/<name>/prompts-<digest>.json  the prompts used
    categories/<name>/memory-<digest>.npz  few-shot reference memory (optional)
    engines/<device>/<precision>/*.plan    TensorRT engines ('build-engine'; see trt_engine.py)

Text prototypes and memory are graph *inputs*, never constants, so adding a category or
reference images never touches a graph. Category files are content-addressed and written before
the manifest that points to them (under a lock, atomically renamed); replaced files are deleted
after. An interrupted command therefore leaves the previous, valid bundle behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .errors import did_you_mean
# FORMAT_NAME and BundleError are imported from here by the export side.
from .manifest import (FORMAT_NAME, FORMAT_VERSION, BundleError, Category,  # noqa: F401
                       EngineBuild, EngineDevice, FileEntry, GraphFile, Manifest, MemoryFile,
                       Preprocess, Quantization, is_category_name, parse)
from ..methods import MethodError, method_of

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_mode(directory: bool = False) -> int:
    """Permissions a plain open()/mkdir() would give: mkstemp/mkdtemp make private files, but a
    bundle is often written by one user and served by another."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, default_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_entry(root: Path, relpath: str, **extra: Any) -> dict[str, Any]:
    """Manifest entry of a bundle file (JSON form): relative path, sha256, size."""
    path = root / relpath
    return {"file": relpath, "sha256": sha256_file(path), "bytes": path.stat().st_size, **extra}


def check_category_name(name: str) -> str:
    if not is_category_name(name):
        raise BundleError(
            f"invalid category name {name!r}: use 1-64 letters, digits, spaces, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return name


def category_dir(name: str) -> str:
    return "categories/" + check_category_name(name).replace(" ", "_")


def check_category_dir_free(existing: Iterable[str], name: str) -> None:
    """Two names must not share a folder ("metal nut" / "metal_nut", or "Bottle" / "bottle" on
    case-insensitive file systems). ``existing``: the names already there."""
    folder = category_dir(name).lower()
    for other in existing:
        if other != name and category_dir(other).lower() == folder:
            raise BundleError(f"category {name!r} would share the folder {category_dir(name)!r} "
                              f"with the existing category {other!r}; choose a different name")


@dataclass
class CategoryData:
    """Arrays the scoring head needs for one category.

    text_prototypes: (2, D) float32, rows [normal, anomalous], raw (not normalized) means.
    memory: few-shot reference memory or None; ``memory_X`` holds encoder output X of the K
        reference images, flattened over them (WinCLIP: ``memory_patch_tokens`` (K*P, C),
        ``memory_window_embeddings_<k>`` (K*W_k, D) per scale).
    text: the category's text as head inputs (``head_text_arrays``): text_prototypes, and with
        prompt adaptation text_normal (N_n, D) and text_anomalous (N_a, D).
    """

    name: str
    text_prototypes: np.ndarray
    memory: dict[str, np.ndarray] | None
    shots: int
    thresholds: dict[str, dict[str, Any]]  # "<precision>/<mode>" -> {"image", "pixel", ...}
    text: dict[str, np.ndarray] = field(default_factory=dict)


def head_text_arrays(text_npz) -> dict[str, np.ndarray]:
    """A category's ``text.npz`` -> its arrays under the scoring heads' input names."""
    arrays = {"text_prototypes": text_npz["prototypes"]}
    arrays.update({k: text_npz[k] for k in ("text_normal", "text_anomalous")
                   if k in text_npz.files})
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}


def read_manifest(root: Path) -> Manifest:
    """The validated manifest of the bundle directory ``root`` (migrated to this version)."""
    mpath = root / MANIFEST
    try:
        data = json.loads(mpath.read_text())
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, absurd nesting
        raise BundleError(f"{str(mpath)!r} is not valid JSON ({type(e).__name__}: "
                          f"{str(e)[:80]}); export the bundle again") from e
    return Manifest.from_dict(data, f"bundle {str(root)!r}")


class Bundle:
    """A validated bundle directory. Open with :meth:`Bundle.open`."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = root
        self.manifest = manifest

    # ----------------------------------------------------------------- loading
    @classmethod
    def open(cls, path: str | os.PathLike, verify_checksums: bool = True) -> "Bundle":
        root = Path(path)
        if not root.exists():
            raise BundleError(f"bundle {str(root)!r} does not exist: pass the directory written by "
                              "'clipinspect export'")
        if not root.is_dir():
            raise BundleError(f"bundle {str(root)!r} is a file; a bundle is the directory written "
                              "by 'clipinspect export'")
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{str(mpath)!r} is missing: {str(root)!r} is not a clipinspect bundle "
                              "(or its export was interrupted); export it again")
        bundle = cls(root, read_manifest(root))
        bundle._validate(verify_checksums)
        return bundle

    def _validate(self, verify_checksums: bool) -> None:
        m = self.manifest
        try:
            self.method = method_of(m, f"bundle {str(self.root)!r}")
        except MethodError as e:
            raise BundleError(str(e)) from e
        self.check_confined()
        for precision, graphs in m.graphs.items():
            for name in self.method.graphs:
                if name not in graphs:
                    raise BundleError(f"bundle {str(self.root)!r} lists no {precision} {name} graph; "
                                      "export it again")
                self._check_file(graphs[name], f"{precision} {name} graph", verify_checksums)
        for name, category in m.categories.items():
            for what, entry in category.files().items():
                self._check_file(entry, f"{what} of category {name!r}", verify_checksums)

    def check_confined(self, manifest: Manifest | None = None) -> None:
        """Every file the manifest names must resolve inside the bundle directory, symlinks
        (also of folders) followed: a manifest must never make clipinspect read, or delete,
        anything else."""
        for what, entry in (manifest or self.manifest).files():
            self.confined(entry.file, what)

    def confined(self, rel: str, what: str) -> Path:
        """root / rel, refused unless it resolves inside the bundle directory."""
        root = self.root.resolve()
        path = (self.root / rel).resolve()
        if not path.is_relative_to(root) or path == root:
            raise BundleError(f"bundle {str(self.root)!r}: the {what} {rel!r} resolves to "
                              f"{str(path)!r}, outside the bundle; a bundle names only its own "
                              "files: remove the link or export the bundle again")
        return self.root / rel

    def _check_file(self, entry: FileEntry, what: str, verify: bool) -> None:
        path = self.root / entry.file
        if not path.is_file():
            raise BundleError(f"bundle {str(self.root)!r}: the {what} {entry.file!r} is missing; "
                              "copy the whole bundle directory or export it again")
        if verify:
            digest = sha256_file(path)
            if digest != entry.sha256:
                raise BundleError(
                    f"bundle {str(self.root)!r}: the {what} {entry.file!r} was modified (sha256 "
                    f"{digest[:12]}..., manifest says {entry.sha256[:12]}...); restore it or "
                    "export the bundle again"
                )

    # ------------------------------------------------------------- properties
    @property
    def preprocess(self) -> Preprocess:
        """The bundle's preprocessing: ``bundle.preprocess(rgb) -> (3, H, W) float32``."""
        return self.manifest.preprocess

    @property
    def input_size(self) -> tuple[int, int]:
        return self.manifest.preprocess.size

    @property
    def grid(self) -> tuple[int, int]:
        return self.manifest.grid

    @property
    def scales(self) -> list[int]:
        return list(self.manifest.scales)

    @property
    def categories(self) -> list[str]:
        return sorted(self.manifest.categories)

    @property
    def precisions(self) -> list[str]:
        return sorted(self.manifest.graphs)

    @property
    def identity(self) -> str:
        """Short identity for reports: model, weights and a digest of the fp32 encoder."""
        model = self.manifest.model
        enc = self.manifest.graphs["fp32"]["encoder"].sha256[:12]
        return f"{model.name}/{model.weights.label}/enc-{enc}"

    def graph_path(self, precision: str, name: str) -> Path:
        graphs = self.manifest.graphs
        if precision not in graphs:
            raise BundleError(f"bundle {str(self.root)!r} has no {precision!r} graphs"
                              f"{did_you_mean(precision, graphs)} (it has "
                              f"{', '.join(sorted(graphs))}); choose one of those")
        return self.root / graphs[precision][name].file

    def entry(self, name: str) -> Category:
        """The manifest entry of category ``name``; an error listing the known ones."""
        entries = self.manifest.categories
        if name not in entries:
            known = ", ".join(sorted(entries)) or "none"
            raise BundleError(f"unknown category {name!r}{did_you_mean(name, entries)}. This "
                              f"bundle has: {known}. Add it (needs the export extra, torch) with: "
                              f"clipinspect add-category {shlex.quote(str(self.root))} "
                              f"{shlex.quote(name)}")
        return entries[name]

    def category(self, name: str) -> CategoryData:
        entry = self.entry(name)
        with np.load(self.root / entry.text.file) as npz:
            text = head_text_arrays(npz)
        if self.manifest.adaptation and "text_normal" not in text:
            raise BundleError(f"category {name!r} of bundle {str(self.root)!r} has no prompt pools, "
                              "which its prompt adaptation needs; recompute it with "
                              f"'clipinspect add-category {self.root} {name!r} --replace'")
        memory = None
        shots = 0
        if entry.memory:
            with np.load(self.root / entry.memory.file) as mem:
                memory = {k: np.ascontiguousarray(mem[k], dtype=np.float32) for k in mem.files}
            shots = entry.memory.shots
        return CategoryData(name, text["text_prototypes"], memory, shots, entry.thresholds, text)

    # ----------------------------------------------------------------- writing
    def file_entry(self, relpath: str, **extra: Any) -> dict[str, Any]:
        return file_entry(self.root, relpath, **extra)

    def save_manifest(self) -> None:
        """Write the manifest (in the current format version, also when read from an older)."""
        self.manifest.format_version = FORMAT_VERSION
        atomic_write_bytes(self.root / MANIFEST, (json.dumps(self.manifest.to_dict(), indent=2)
                                                  + "\n").encode())

    @contextlib.contextmanager
    def updating(self) -> Iterator[Manifest]:
        """Read-modify-write of the manifest under an exclusive lock, so two processes adding
        references or categories at once do not lose each other's update. Files an update
        replaces are deleted only after the new manifest is in place, and only inside the
        bundle: the manifest re-read here is checked for paths leaving it before anything."""
        lock_path = self.root / ".lock"
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.manifest = read_manifest(self.root)
                self.check_confined()
                before = _files_of(self.manifest)
                yield self.manifest
                self.manifest = parse(Manifest, self.manifest.to_dict(),
                                      f"bundle {str(self.root)!r} (as updated)")
                self.check_confined()
                self.save_manifest()
                for rel in before - _files_of(self.manifest):
                    self.confined(rel, "replaced file").unlink(missing_ok=True)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def set_memory(self, category: str, arrays: dict[str, np.ndarray], sources: Iterable[str],
                   shots: int) -> None:
        """Store few-shot reference memory for ``category`` (replacing any earlier memory)."""
        self.entry(category)  # unknown category -> error before writing anything
        rel = write_versioned(self.root, category_dir(category), "memory.npz", npz_bytes(arrays))
        entry = parse(MemoryFile, file_entry(self.root, rel, shots=int(shots),
                                             sources=[str(s) for s in sources]),
                      f"bundle {str(self.root)!r}", f"categories.{category}.memory")
        with self.updating() as m:
            if category not in m.categories:
                raise BundleError(f"category {category!r} was removed from the bundle meanwhile")
            m.categories[category].memory = entry

    def set_thresholds(self, category: str, key: str, thresholds: dict[str, Any]) -> None:
        """Store decision thresholds of ``category`` under ``key`` ("<precision>/<mode>"):
        ``image`` and/or ``pixel`` (scores >= threshold are anomalous) plus how they were set."""
        self.entry(category)
        with self.updating() as m:
            if category not in m.categories:
                raise BundleError(f"category {category!r} was removed from the bundle meanwhile")
            m.categories[category].thresholds[key] = thresholds

    def set_category(self, name: str, entry: dict[str, Any] | Category,
                     keep_memory: bool = True) -> None:
        """Add or replace category ``name`` (its files already written); its few-shot memory
        and thresholds are kept when ``keep_memory``."""
        check_category_name(name)
        if not isinstance(entry, Category):
            entry = parse(Category, entry, f"bundle {str(self.root)!r}", f"categories.{name}")
        with self.updating() as m:
            check_category_dir_free(m.categories, name)
            old = m.categories.get(name)
            if old is not None and keep_memory:
                entry.memory, entry.thresholds = old.memory, old.thresholds
            m.categories[name] = entry

    def set_precision(self, precision: str, encoder: dict[str, Any], record: dict[str, Any],
                      overwrite: bool = False) -> None:
        """Register a precision variant: its own encoder graph (already written), the FP32
        scoring heads, and how it was made (``quantization.<precision>``). Thresholds set for an
        earlier graph of this precision no longer apply and are dropped."""
        if precision == "fp32":
            raise BundleError("the fp32 graphs are written by export, not replaced")
        where = f"bundle {str(self.root)!r}"
        encoder_entry = parse(GraphFile, encoder, where, f"graphs.{precision}.encoder")
        quantization = parse(Quantization, record, where, f"quantization.{precision}")
        with self.updating() as m:
            if precision in m.graphs and not overwrite:
                raise BundleError(f"bundle {str(self.root)!r} already has {precision} graphs")
            heads = {k: v for k, v in m.graphs["fp32"].items() if k != "encoder"}
            m.graphs[precision] = {"encoder": encoder_entry, **heads}
            m.quantization[precision] = quantization
            for entry in m.categories.values():
                for key in [k for k in entry.thresholds if k.startswith(precision + "/")]:
                    del entry.thresholds[key]

    def set_engines(self, key: str, device: dict[str, str], precision: str,
                    record: dict[str, Any]) -> None:
        """Register TensorRT engines (already written) of ``precision`` built on the device
        ``key``; the engines they replace are deleted."""
        where = f"bundle {str(self.root)!r}"
        build = parse(EngineBuild, record, where, f"engines.{key}.{precision}")
        with self.updating() as m:
            if key not in m.engines:
                m.engines[key] = parse(EngineDevice, {"device": device}, where, f"engines.{key}")
            m.engines[key].device = device
            m.engines[key].builds[precision] = build


def _files_of(manifest: Manifest) -> set[str]:
    """Relative paths of the category files, graphs and TensorRT engines a manifest points to."""
    return {entry.file for _, entry in manifest.files()}


def write_versioned(root: Path, folder: str, name: str, data: bytes) -> str:
    """Write ``folder/<stem>-<digest><suffix>``: content-addressed, so a file the current
    manifest points to is never overwritten in place. Returns the relative path."""
    stem, dot, suffix = name.partition(".")
    rel = f"{folder}/{stem}-{hashlib.sha256(data).hexdigest()[:16]}{dot}{suffix}"
    atomic_write_bytes(root / rel, data)
    return rel


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()
