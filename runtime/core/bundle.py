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
    engines/<device>/<precision>/*.plan    TensorRT engines ('build-engine'; see tensorrt/engine.py)

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
import math
import os
import shlex
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

import numpy as np

from .errors import did_you_mean
# FORMAT_NAME and BundleError are imported from here by the export side.
from .manifest import (FORMAT_NAME, FORMAT_VERSION, BundleError, Category,  # noqa: F401
                       EngineBuild, EngineDevice, FileEntry, GraphFile, Manifest, MemoryFile,
                       Preprocess, Quantization, Thresholds, category_folder, is_category_name,
                       parse)
from .names import ENCODER, FUSED_ENCODER
from .registry import MethodError, method_of

MANIFEST = "manifest.json"
LOCK = ".lock"


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


def bundle_path(root: Path, relative: str, *, for_write: bool = True) -> Path:
    """``relative`` under the bundle directory ``root``, or a BundleError if it could leave it.

    for_write: every component below the bundle's real root (``root`` with its own links
    resolved) must be a real folder, or the file itself, or not exist yet: no symlink at all,
    so what is written or created lands in the bundle whatever links someone placed in it.
    Otherwise (reading): links are followed, and the result must resolve inside the bundle.
    Always refused: absolute paths, '..', empty or '.' components. Returns the path under the
    real root, checked before anything is written (callers check every target first)."""
    real = Path(os.path.realpath(root))
    parts = relative.split("/")
    if (not relative or "\0" in relative or "\\" in relative
            or PurePosixPath(relative).is_absolute() or any(p in ("", ".", "..") for p in parts)):
        raise BundleError(f"bundle {str(root)!r}: {relative!r} is not a path inside the bundle "
                          "(relative, no '..'); a bundle names only its own files")
    path = real / relative
    if not for_write:
        resolved = Path(os.path.realpath(path))
        if not resolved.is_relative_to(real) or resolved == real:
            raise BundleError(f"bundle {str(root)!r}: {relative!r} resolves to {str(resolved)!r}, "
                              "outside the bundle; a bundle names only its own files: remove "
                              "the link or export the bundle again")
        return path
    here = real
    for i, part in enumerate(parts):
        here = here / part
        try:
            mode = os.lstat(here).st_mode
        except FileNotFoundError:
            break  # created below a real folder by the writer
        last = i == len(parts) - 1
        if stat.S_ISLNK(mode) or not (last or stat.S_ISDIR(mode)):
            kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a folder"
            raise BundleError(
                f"bundle {str(root)!r}: {'/'.join(parts[:i + 1])!r} is {kind}; clipinspect "
                f"writes {relative!r} only inside the bundle's own folders and files: replace "
                "the link by a real folder or file (e.g. copy the bundle with 'cp -rL') and run "
                "the command again")
    return path


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
    return category_folder(check_category_name(name))


def check_category_dir_free(existing: Iterable[str], name: str) -> None:
    """Two names must not share a folder ("metal nut" / "metal_nut", or "Bottle" / "bottle" on
    case-insensitive file systems). ``existing``: the names already there. (A manifest with two
    such names is refused when it is read, by the same folder rule.)"""
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
    thresholds: dict[str, Thresholds]  # "<precision>/<mode>" -> image/pixel thresholds
    text: dict[str, np.ndarray] = field(default_factory=dict)


def head_text_arrays(text_npz) -> dict[str, np.ndarray]:
    """A category's ``text.npz`` (an NpzFile or a dict of its arrays) -> its arrays under the
    scoring heads' input names."""
    names = text_npz.files if hasattr(text_npz, "files") else list(text_npz)
    arrays = {"text_prototypes": text_npz["prototypes"]}
    arrays.update({k: text_npz[k] for k in ("text_normal", "text_anomalous") if k in names})
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}


# ----------------------------------------------------------------------- array files (.npz)
# Shapes: a tuple per array name, None where the manifest does not say (older bundles).
Shape = tuple[int | None, ...]


def expected_text(m: Manifest, entry: Category) -> dict[str, Shape]:
    """The arrays a category's text.npz may hold, as the manifest describes them: prototypes
    (2, D), the prompt embeddings (N_n, D) and (N_a, D), with prompt adaptation the pools of the
    prompts the ambiguity filter kept."""
    d = m.dims.embed
    dropped = entry.ambiguity_filter_dropped or {"normal": [], "anomalous": []}

    def kept(count: int | None, state: str) -> int | None:
        return None if count is None else count - len(dropped[state])
    n, a = entry.n_normal_prompts, entry.n_anomalous_prompts
    return {"prototypes": (2, d), "normal_embeddings": (n, d), "anomalous_embeddings": (a, d),
            "text_normal": (kept(n, "normal"), d), "text_anomalous": (kept(a, "anomalous"), d)}


def expected_memory(m: Manifest, shots: int) -> dict[str, Shape]:
    """The arrays a memory.npz of ``shots`` reference images may hold: ``memory_X``, encoder
    output X of every image flattened over them (shots x rows per image, width), and what the
    method keeps with them (AprilLab: the reference map range, (2,))."""
    method = method_of(m)
    return {**{f"memory_{x}": (shots * rows, width)
               for x, (rows, width) in method.output_shapes(m).items()},
            **method.memory_extras(m)}


def check_npz(path: Path, expected: dict[str, Shape], what: str,
              required: Iterable[str] = ()) -> None:
    """Every array of the .npz file ``path`` must be one of ``expected``, of that shape and a
    float dtype (object arrays never: pickle stays off), stored uncompressed (what np.savez
    writes) and inside the file, so that it never takes more memory than the file has bytes.
    Read from the members' .npy headers without loading any data; BundleError otherwise, also
    when an array named in ``required`` is missing."""
    where = f"{what}: {path.name!r}"
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as z:
            found = set()
            for info in z.infolist():
                name, shape, dtype, header = _npy_header(z, info, where)
                _check_shape(name, shape, expected, where)
                _check_stored(info, name, math.prod(shape) * dtype.itemsize + header, size, where)
                found.add(name)
        missing = [n for n in required if n not in found]
        if missing:
            raise BundleError(f"{where} lacks the array {missing[0]!r}; export the bundle again")
    except BundleError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, SyntaxError) as e:
        raise BundleError(f"{where} is not a readable .npz file ({type(e).__name__}: "
                          f"{str(e)[:80]}); export the bundle again") from None


def _npy_header(z: zipfile.ZipFile, info: zipfile.ZipInfo, where: str
                ) -> tuple[str, tuple[int, ...], np.dtype, int]:
    """(array name, shape, dtype, header bytes) of one member, from its header alone."""
    fmt = np.lib.format
    name = info.filename.removesuffix(".npy")
    if name == info.filename:
        raise BundleError(f"{where} holds {info.filename!r}, not an .npy array; export the "
                          "bundle again")
    with z.open(info) as f:
        version = fmt.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise BundleError(f"{where} member {name!r} is an .npy file of version {version}; "
                              "clipinspect writes versions 1.0 and 2.0: export the bundle again")
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(f)
        header = f.tell()
    if dtype.hasobject or dtype.kind != "f":
        raise BundleError(f"{where} member {name!r} has dtype {dtype}, expected float32 (object "
                          "arrays are never loaded); export the bundle again")
    return name, shape, dtype, header


def _check_shape(name: str, shape: tuple[int, ...], expected: dict[str, Shape], where: str
                 ) -> None:
    want = expected.get(name)
    if want is None:
        raise BundleError(f"{where} holds an array {name!r}, which no scoring head takes "
                          f"(expected {', '.join(sorted(expected))}); export the bundle again")
    if len(shape) != len(want) or any(w is not None and s != w for s, w in zip(shape, want)):
        shown = "(" + ", ".join("any" if w is None else str(w) for w in want) + \
            ("," if len(want) == 1 else "") + ")"
        raise BundleError(f"{where} member {name!r} has shape {shape}, the manifest says "
                          f"{shown}; export the bundle again (or restore it)")


def _check_stored(info: zipfile.ZipInfo, name: str, member_bytes: int, archive_bytes: int,
                  where: str) -> None:
    """A zip directory can claim any size and compression any ratio: the member must be stored
    as it is, inside the file, exactly as large as its header says."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise BundleError(f"{where} member {name!r} is compressed ({member_bytes} bytes from "
                          f"{info.compress_size}); clipinspect writes .npz files uncompressed "
                          "(np.savez) and reads no other: export the bundle again")
    if (info.compress_size != info.file_size or info.file_size != member_bytes
            or info.header_offset + info.file_size > archive_bytes):
        raise BundleError(f"{where} member {name!r} declares {member_bytes} bytes but its zip "
                          f"entry says {info.file_size} in a file of {archive_bytes}; export "
                          "the bundle again")


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
            for name in graphs.keys() - set(self.method.graphs):  # encoder_fused, encoder_fp16
                self._check_file(graphs[name], f"{precision} {name} graph", verify_checksums)
        for name, category in m.categories.items():
            for what, entry in category.files().items():
                self._check_file(entry, f"{what} of category {name!r}", verify_checksums)
            self.check_arrays(name)

    def check_confined(self, manifest: Manifest | None = None) -> None:
        """Every file the manifest names must resolve inside the bundle directory, symlinks
        (also of folders) followed: a manifest must never make clipinspect read, or delete,
        anything else."""
        for what, entry in (manifest or self.manifest).files():
            self.confined(entry.file, what)

    def confined(self, rel: str, what: str) -> Path:
        """root / rel, refused unless it resolves inside the bundle directory."""
        try:
            bundle_path(self.root, rel, for_write=False)
        except BundleError as e:
            raise BundleError(str(e).replace(f": {rel!r}", f": the {what} {rel!r}", 1)) from None
        return self.root / rel

    def check_writable(self, *relatives: str) -> None:
        """Refuse, before any work, an update whose targets would leave the bundle: the files
        or folders ``relatives`` it writes, the lock and the manifest (``bundle_path``)."""
        for rel in (*relatives, LOCK, MANIFEST):
            bundle_path(self.root, rel)

    def _check_file(self, entry: FileEntry, what: str, verify: bool) -> None:
        path = self.root / entry.file
        if not path.is_file():
            raise BundleError(f"bundle {str(self.root)!r}: the {what} {entry.file!r} is missing; "
                              "copy the whole bundle directory or export it again")
        size = path.stat().st_size
        if size != entry.bytes:
            raise BundleError(f"bundle {str(self.root)!r}: the {what} {entry.file!r} was modified "
                              f"({size} bytes, manifest says {entry.bytes}); restore it or "
                              "export the bundle again")
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

    def require_heads(self, what: str) -> None:
        """Refuse ``what`` (a TensorRT engine build, a Triton repository) for a bundle whose
        method scores on the host and has no head graphs (MuSc)."""
        if self.method.scorer is not None:
            raise BundleError(f"{what} needs scoring head graphs, and this {self.manifest.method} "
                              "bundle has none: its images are scored on the host (numpy) after "
                              "the encoder. Run it with onnxruntime instead ('clipinspect "
                              "predict' or 'serve', --provider cpu, cuda or tensorrt)")

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

    def check_arrays(self, name: str) -> None:
        """Shapes and dtypes of category ``name``'s arrays, from their .npy headers, against
        what the manifest says they hold (``expected_text``, ``expected_memory``): a file whose
        checksum is right but whose arrays are not what the head takes is refused before
        anything is loaded, in one line."""
        entry, m = self.entry(name), self.manifest
        check_npz(self.root / entry.text.file, expected_text(m, entry),
                  f"the text embeddings of category {name!r}", required=("prototypes",))
        if entry.memory:
            check_npz(self.root / entry.memory.file, expected_memory(m, entry.memory.shots),
                      f"the few-shot memory of category {name!r}")

    def category(self, name: str) -> CategoryData:
        entry = self.entry(name)
        self.check_arrays(name)
        text = head_text_arrays(self._load(entry.text.file, f"text embeddings of {name!r}"))
        if self.manifest.adaptation and "text_normal" not in text:
            raise BundleError(f"category {name!r} of bundle {str(self.root)!r} has no prompt pools, "
                              "which its prompt adaptation needs; recompute it with "
                              f"'clipinspect add-category {self.root} {name!r} --replace'")
        memory = None
        shots = 0
        if entry.memory:
            memory = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in
                      self._load(entry.memory.file, f"few-shot memory of {name!r}").items()}
            shots = entry.memory.shots
        return CategoryData(name, text["text_prototypes"], memory, shots, entry.thresholds, text)

    def _load(self, rel: str, what: str) -> dict[str, np.ndarray]:
        """Every array of a category's .npz (checked by ``check_arrays``); a file damaged
        behind its checksum (a zip CRC error, a cut-off member) is a one-line error."""
        try:
            with np.load(self.root / rel) as npz:
                return {k: npz[k] for k in npz.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise BundleError(f"bundle {str(self.root)!r}: the {what} {rel!r} cannot be read "
                              f"({type(e).__name__}: {str(e)[:80]}); export the bundle "
                              "again") from None

    # ----------------------------------------------------------------- writing
    def file_entry(self, relpath: str, **extra: Any) -> dict[str, Any]:
        return file_entry(self.root, relpath, **extra)

    def save_manifest(self) -> None:
        """Write the manifest (in the current format version, also when read from an older)."""
        self.manifest.format_version = FORMAT_VERSION
        atomic_write_bytes(bundle_path(self.root, MANIFEST),
                           (json.dumps(self.manifest.to_dict(), indent=2) + "\n").encode())

    @contextlib.contextmanager
    def updating(self) -> Iterator[Manifest]:
        """Read-modify-write of the manifest under an exclusive lock, so two processes adding
        references or categories at once do not lose each other's update. Files an update
        replaces are deleted only after the new manifest is in place, and only inside the
        bundle: the manifest re-read here is checked for paths leaving it before anything."""
        self.check_writable()
        with open_lock(self.root) as lock:
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

    def set_memory(self, category: str, arrays: dict[str, np.ndarray] | bytes | None,
                   sources: Iterable[str], shots: int,
                   thresholds: dict[str, dict[str, Any]] | None = None) -> None:
        """Store few-shot reference memory for ``category`` (replacing any earlier memory; None
        removes it; bytes are a memory file's own, written as they are). ``thresholds`` ("<precision>/<mode>" -> thresholds), when given, replace
        the category's in the same manifest update, so a reader never sees one without the
        other (operator feedback, runtime/core/memory_book.py)."""
        self.entry(category)  # unknown category -> error before writing anything
        self.check_writable(category_dir(category))
        entry = None
        if arrays is not None:
            data = arrays if isinstance(arrays, bytes) else npz_bytes(arrays)
            rel = write_versioned(self.root, category_dir(category), "memory.npz", data)
            entry = parse(MemoryFile, file_entry(self.root, rel, shots=int(shots),
                                                 sources=[str(s) for s in sources]),
                          f"bundle {str(self.root)!r}", f"categories.{category}.memory")
        where = f"bundle {str(self.root)!r}"
        parsed = None if thresholds is None else {
            k: parse(Thresholds, v, where, f"categories.{category}.thresholds.{k}")
            for k, v in thresholds.items()}
        with self.updating() as m:
            if category not in m.categories:
                raise BundleError(f"category {category!r} was removed from the bundle meanwhile")
            m.categories[category].memory = entry
            if parsed is not None:
                m.categories[category].thresholds = parsed

    def set_thresholds(self, category: str, key: str,
                       thresholds: dict[str, Any] | Thresholds) -> None:
        """Store decision thresholds of ``category`` under ``key`` ("<precision>/<mode>"):
        ``image`` and/or ``pixel`` (scores >= threshold are anomalous) plus how they were set."""
        self.entry(category)
        if not isinstance(thresholds, Thresholds):
            thresholds = parse(Thresholds, thresholds, f"bundle {str(self.root)!r}",
                               f"categories.{category}.thresholds.{key}")
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
                      overwrite: bool = False, fused: dict[str, Any] | None = None) -> None:
        """Register a precision variant: its own encoder graph (already written) and, from the
        fused FP32 encoder, its fused one (``fused``), the FP32 scoring heads, and how it was
        made (``quantization.<precision>``). Thresholds set for an earlier graph of this
        precision no longer apply and are dropped."""
        if precision == "fp32":
            raise BundleError("the fp32 graphs are written by export, not replaced")
        where = f"bundle {str(self.root)!r}"
        encoder_entry = parse(GraphFile, encoder, where, f"graphs.{precision}.encoder")
        quantization = parse(Quantization, record, where, f"quantization.{precision}")
        with self.updating() as m:
            if precision in m.graphs and not overwrite:
                raise BundleError(f"bundle {str(self.root)!r} already has {precision} graphs")
            heads = {k: v for k, v in m.graphs["fp32"].items()
                     if k in self.method.graphs and k != ENCODER}
            m.graphs[precision] = {ENCODER: encoder_entry, **heads}
            if fused is not None:
                m.graphs[precision][FUSED_ENCODER] = parse(
                    GraphFile, fused, where, f"graphs.{precision}.{FUSED_ENCODER}")
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
    atomic_write_bytes(bundle_path(root, rel), data)
    return rel


@contextlib.contextmanager
def open_lock(root: Path) -> Iterator[int]:
    """The bundle's lock file, opened without following a link (O_NOFOLLOW): a '.lock' that is
    a symlink would make every update create or open the file it points to."""
    path = bundle_path(root, LOCK)
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise BundleError(f"bundle {str(root)!r}: its lock file {str(path)!r} cannot be opened "
                          f"({e.strerror}); it must be a plain file: remove it and run the "
                          "command again") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BundleError(f"bundle {str(root)!r}: its lock file {str(path)!r} is not a plain "
                              "file; remove it and run the command again")
        yield fd
    finally:
        os.close(fd)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()
