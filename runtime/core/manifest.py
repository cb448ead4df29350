"""The bundle manifest (``manifest.json``) as typed, validated data: the one contract between
the export side, which writes it, and everything that reads a bundle.

``Manifest.from_dict(d, where)`` checks every field it reads and raises :class:`ManifestError`
with one line naming the key, its value, what was expected and what to do; ``to_dict()`` writes
it back. Keys this version does not know (written by a later feature) are kept in ``extra`` so
a rewrite never drops them.

Format versions:
  1  preprocessing under ``input``; migrated in memory on load.
  2  preprocessing under ``preprocess`` (size, mean, std, resize, layout): it says how images
     must be prepared, not only what the graph takes. Commands that rewrite the manifest
     write version 2.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Callable, Sequence

import numpy as np

from .errors import ClipInspectError

FORMAT_NAME = "clipinspect-bundle"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# The only resizing the runtime implements (images.preprocess); a bundle asking for another
# would silently get different maps.
RESIZE = "bicubic-antialiased, whole image, no crop"
LAYOUT = "NCHW float32 RGB"
# Category names become folder names: no '/', never '.' first, so no path can escape. The
# Triton categories model (runtime/triton/categories.py) mirrors this pattern; a test keeps
# the two equal.
CATEGORY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.\-]{0,63}")
# Names a manifest gives that reach generated files (Triton's config.pbtxt, folder names): a
# strict character set, so that no quote, newline or brace can change what those files say.
# Tensor names: what the exports produce (image_embedding, window_embeddings_2, memory_..., and
# ONNX's own "/visual/Add_output_0" style names); graph and precision names: encoder,
# head_fewshot, fp16; model names: the CLIP model's (ViT-B-16-plus-240, hf-hub:org/name);
# engine keys: build-engine's device keys (gpu_sm87_16sms_8gib_trt10.3.0.30).
TENSOR_NAME = re.compile(r"[A-Za-z_/][A-Za-z0-9_.:/-]{0,127}")
GRAPH_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.:/@+=-]{0,199}")
ENGINE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}")
# Whole numbers a manifest may hold: int64, what numpy and onnxruntime take (a larger one would
# end in an OverflowError far from the manifest).
MAX_INT = 2**63 - 1
# Largest input side a bundle may ask for (each image is resized to it: 4096 x 4096 is already
# 200 MB of float32 input per image; CLIP exports use 224-518).
MAX_INPUT_SIDE = 4096
FIX = "export the bundle again (or restore its manifest.json)"


class BundleError(ClipInspectError, ValueError):
    """A bundle that cannot be used as it is; the message says what to do."""


class ManifestError(BundleError):
    """A manifest.json that does not have the structure this clipinspect reads."""


def is_category_name(name: object) -> bool:
    return isinstance(name, str) and CATEGORY_NAME.fullmatch(name) is not None


def category_folder(name: str) -> str:
    """The folder of category ``name`` (a valid category name), relative to the bundle and, the
    same, inside the Triton categories model: spaces become '_'. Two names whose folders are
    equal ignoring case share a folder (case-insensitive file systems)."""
    return "categories/" + name.replace(" ", "_")


def _is_name(pattern: re.Pattern) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and pattern.fullmatch(v) is not None


_TENSOR_RULE = "tensor names of letters, digits, '_', '.', ':', '/' or '-' (at most 128)"
_GRAPH_RULE = "names of letters, digits, '_' or '-' (at most 64), starting with a letter"


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value).replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class _At:
    """Where in the manifest a value is, for error messages."""

    where: str
    path: str = ""

    def __truediv__(self, key: Any) -> "_At":
        return _At(self.where, f"{self.path}.{key}" if self.path else str(key))

    def error(self, value: Any, expected: str, fix: str = FIX) -> ManifestError:
        return ManifestError(f"{self.where}: manifest key {self.path!r} is {_show(value)}, "
                             f"expected {expected}; {fix}")

    def missing(self, expected: str) -> ManifestError:
        return ManifestError(f"{self.where}: manifest lacks the key {self.path!r} ({expected}); "
                             f"{FIX}")


_MISSING = object()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -MAX_INT <= v <= MAX_INT


def _is_real(v: Any) -> bool:
    return _is_int(v) or isinstance(v, float)


def _is_positive_int(v: Any) -> bool:
    return _is_int(v) and v > 0


def _is_num(v: Any) -> bool:
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _beyond(v: Any) -> str:
    """What an error adds for a whole number too large for any array (JSON has no limit)."""
    values = v if isinstance(v, list) else [v]
    big = any(isinstance(x, int) and not isinstance(x, bool) and abs(x) > MAX_INT for x in values)
    return " (at most 2^63 - 1)" if big else ""


def _take(d: dict, key: str, at: _At, expected: str, ok: Callable[[Any], bool],
          optional: bool = False) -> Any:
    """``d[key]`` checked with ``ok``; None when absent (or null) and ``optional``."""
    value = d.get(key, _MISSING)
    if value is _MISSING or (value is None and optional):
        if optional:
            return None
        raise (at / key).missing(expected)
    if not ok(value):
        raise (at / key).error(value, expected + _beyond(value))
    return value


def _dict(d: dict, key: str, at: _At, optional: bool = False) -> dict | None:
    return _take(d, key, at, "an object", lambda v: isinstance(v, dict), optional)


def _str(d: dict, key: str, at: _At, optional: bool = False) -> str | None:
    return _take(d, key, at, "a string", lambda v: isinstance(v, str), optional)


def _int(d: dict, key: str, at: _At, optional: bool = False, minimum: int = 0) -> int | None:
    return _take(d, key, at, f"a whole number >= {minimum}",
                 lambda v: _is_int(v) and v >= minimum, optional)


def _num(d: dict, key: str, at: _At, optional: bool = False) -> float | None:
    return _take(d, key, at, "a finite number", _is_num, optional)


def _list(d: dict, key: str, at: _At, expected: str, item: Callable[[Any], bool], *,
          length: int | None = None, optional: bool = False) -> list | None:
    def ok(v):
        return (isinstance(v, list) and all(item(x) for x in v)
                and (length is None or len(v) == length))
    return _take(d, key, at, expected, ok, optional)


def _strings(d: dict, key: str, at: _At, optional: bool = False) -> list[str] | None:
    return _list(d, key, at, "a list of strings", lambda x: isinstance(x, str), optional=optional)


def _tensor_names(d: dict, key: str, at: _At) -> list[str] | None:
    """An optional list of graph input or output names, each of the strict character set."""
    return _list(d, key, at, "a list of " + _TENSOR_RULE, _is_name(TENSOR_NAME), optional=True)


def _check_keys(d: dict, at: _At, pattern: re.Pattern, rule: str) -> dict:
    for key in d:
        if not _is_name(pattern)(key):
            raise at.error(key, rule)
    return d


def _records(d: dict, key: str, at: _At) -> dict[str, dict]:
    """An optional object of objects (``parity``, ``quantization``), {} when absent."""
    value = _dict(d, key, at, optional=True) or {}
    for name, record in value.items():
        if not isinstance(record, dict):
            raise (at / key / name).error(record, "an object")
    return value


def _rest(d: dict, known: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in known}


def _drop_none(d: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not (k in keys and v is None)}


# ----------------------------------------------------------------------------- file entries
def check_relative_path(rel: str, at: _At) -> str:
    """A path a manifest names must stay inside the bundle: relative, no '..' and no empty or
    '.' components (symlinks are checked against the directory by the bundle)."""
    parts = rel.split("/")
    if (not rel or rel.startswith("/") or "\\" in rel or PurePosixPath(rel).is_absolute()
            or re.match(r"[A-Za-z]:", rel) or any(p in ("", ".", "..") for p in parts)
            or "\0" in rel):
        raise at.error(rel, "a relative path inside the bundle (no leading '/', no '..')",
                       "a manifest must only name files of its own bundle: " + FIX)
    return rel


@dataclass
class FileEntry:
    """A file of the bundle: its path relative to the bundle root, sha256 and size."""

    file: str
    sha256: str
    bytes: int
    extra: dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("file", "sha256", "bytes")

    @classmethod
    def _base(cls, d: Any, at: _At) -> dict[str, Any]:
        if not isinstance(d, dict):
            raise at.error(d, "an object with file, sha256 and bytes")
        return {"file": check_relative_path(_str(d, "file", at), at / "file"),
                "sha256": _take(d, "sha256", at, "64 hex digits",
                                lambda v: isinstance(v, str)
                                and re.fullmatch(r"[0-9a-f]{64}", v) is not None),
                "bytes": _int(d, "bytes", at)}

    @classmethod
    def from_dict(cls, d: Any, at: _At) -> "FileEntry":
        return cls(**cls._base(d, at), extra=_rest(d, cls._KNOWN))

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "bytes": self.bytes, **self.extra}


@dataclass
class GraphFile(FileEntry):
    """An ONNX graph with the names of its inputs and outputs."""

    inputs: list[str] | None = None
    outputs: list[str] | None = None

    _KNOWN = ("file", "sha256", "bytes", "inputs", "outputs")

    @classmethod
    def from_dict(cls, d: Any, at: _At) -> "GraphFile":
        base = cls._base(d, at)
        return cls(**base, inputs=_tensor_names(d, "inputs", at),
                   outputs=_tensor_names(d, "outputs", at), extra=_rest(d, cls._KNOWN))

    def to_dict(self) -> dict[str, Any]:
        return _drop_none({**super().to_dict(), "inputs": self.inputs, "outputs": self.outputs},
                          ("inputs", "outputs"))


@dataclass
class MemoryFile(FileEntry):
    """Few-shot reference memory: how many reference images (shots) and which."""

    shots: int = 0
    sources: list[str] = field(default_factory=list)

    _KNOWN = ("file", "sha256", "bytes", "shots", "sources")

    @classmethod
    def from_dict(cls, d: Any, at: _At) -> "MemoryFile":
        base = cls._base(d, at)
        return cls(**base, shots=_int(d, "shots", at, minimum=1),
                   sources=_strings(d, "sources", at, optional=True) or [],
                   extra=_rest(d, cls._KNOWN))

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "shots": self.shots, "sources": list(self.sources)}


# ------------------------------------------------------------------------------ model, input
@dataclass
class Weights:
    """Where the CLIP weights came from: kind "tag" (a pretrained tag), "file" (checkpoint path
    and sha256) or "random" (seed); text_probe fingerprints the text tower (add-category checks
    that it loaded the same weights)."""

    kind: str
    tag: str | None = None
    path: str | None = None
    sha256: str | None = None
    seed: int | None = None
    text_probe: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("kind", "tag", "path", "sha256", "seed", "text_probe")

    @classmethod
    def from_dict(cls, d: dict, at: _At) -> "Weights":
        kind = _take(d, "kind", at, "one of tag, file, random",
                     lambda v: v in ("tag", "file", "random"))
        need = {"tag": "tag", "file": "sha256", "random": "seed"}[kind]
        return cls(kind=kind, tag=_str(d, "tag", at, optional=need != "tag"),
                   path=_str(d, "path", at, optional=True),
                   sha256=_str(d, "sha256", at, optional=need != "sha256"),
                   seed=_take(d, "seed", at, "a whole number", _is_int, optional=need != "seed"),
                   text_probe=_list(d, "text_probe", at, "a list of numbers", _is_num),
                   extra=_rest(d, cls._KNOWN))

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind, "tag": self.tag, "path": self.path, "sha256": self.sha256,
               "seed": self.seed, "text_probe": self.text_probe, **self.extra}
        return _drop_none(out, self._KNOWN)

    @property
    def label(self) -> str:
        """Short name for reports: the tag, the checkpoint digest or the kind."""
        return self.tag or (self.sha256 or "")[:12] or self.kind


@dataclass
class Model:
    name: str
    weights: Weights

    @classmethod
    def from_dict(cls, d: dict, at: _At) -> "Model":
        name = _take(d, "name", at, "a CLIP model name (letters, digits, ' ', '_', '.', "
                     "':', '/', '@', '+', '=' or '-', at most 200)", _is_name(MODEL_NAME))
        return cls(name, Weights.from_dict(_dict(d, "weights", at), at / "weights"))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weights": self.weights.to_dict()}


@dataclass
class Preprocess:
    """How an image becomes the encoder's input: resized whole to ``size`` (H, W) (bicubic,
    antialiased, no crop), scaled to [0, 1], normalized with ``mean`` and ``std`` per RGB
    channel. Call it: ``preprocess(rgb (H, W, 3) uint8) -> (3, size_h, size_w) float32``."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = RESIZE
    layout: str = LAYOUT
    extra: dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("size", "mean", "std", "resize", "layout")

    @classmethod
    def from_dict(cls, d: dict, at: _At) -> "Preprocess":
        size = _list(d, "size", at, f"[height, width] in pixels (1 to {MAX_INPUT_SIDE} each)",
                     lambda v: _is_int(v) and 0 < v <= MAX_INPUT_SIDE, length=2)
        mean = _list(d, "mean", at, "3 numbers (R, G, B)", _is_num, length=3)
        std = _list(d, "std", at, "3 positive numbers (R, G, B)",
                    lambda v: _is_num(v) and v > 0, length=3)
        resize = _str(d, "resize", at, optional=True) or RESIZE
        if resize != RESIZE:
            raise (at / "resize").error(resize, repr(RESIZE), "this clipinspect resizes only "
                                        "that way; upgrade clipinspect or export the bundle again")
        return cls(tuple(size), tuple(float(v) for v in mean), tuple(float(v) for v in std),
                   resize, _str(d, "layout", at, optional=True) or LAYOUT, _rest(d, cls._KNOWN))

    def to_dict(self) -> dict[str, Any]:
        return {"size": list(self.size), "mean": list(self.mean), "std": list(self.std),
                "resize": self.resize, "layout": self.layout, **self.extra}

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        from .images import preprocess

        return preprocess(rgb, self.size, self.mean, self.std)

    def batch(self, rgbs: Sequence[np.ndarray]) -> np.ndarray:
        """RGB uint8 images of any sizes -> (B, 3, H, W) float32."""
        return np.stack([self(rgb) for rgb in rgbs])


@dataclass
class Dims:
    """embed: joint embedding D; width: transformer width C; patches: P = grid h * w; layers:
    transformer depth (None in bundles exported before it was recorded)."""

    embed: int
    width: int
    patches: int
    layers: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, at: _At) -> "Dims":
        return cls(_int(d, "embed", at, minimum=1), _int(d, "width", at, minimum=1),
                   _int(d, "patches", at, minimum=1), _int(d, "layers", at, optional=True,
                                                            minimum=1),
                   _rest(d, ("embed", "width", "patches", "layers")))

    def to_dict(self) -> dict[str, Any]:
        return _drop_none({"embed": self.embed, "width": self.width, "patches": self.patches,
                           "layers": self.layers, **self.extra}, ("layers",))


@dataclass
class Adaptation:
    """Contextual prompt adaptation in the heads: temperature tau, top_k prompts per state
    (None = all)."""

    kind: str
    tau: float
    top_k: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, at: _At) -> "Adaptation":
        return cls(_take(d, "kind", at, "'contextual'", lambda v: v == "contextual"),
                   _take(d, "tau", at, "a number > 0", lambda v: _is_num(v) and v > 0),
                   _int(d, "top_k", at, optional=True, minimum=1),
                   _rest(d, ("kind", "tau", "top_k")))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "tau": self.tau, "top_k": self.top_k, **self.extra}

    def describe(self) -> str:
        top_k = f", top-k {self.top_k}" if self.top_k else ""
        return f"contextual prompt adaptation (tau {self.tau:g}{top_k})"


# ------------------------------------------------------------------------- records, engines
@dataclass
class Parity:
    """Measured max |onnxruntime - torch| per graph of one precision, and the tolerance."""

    max_abs_diff: dict[str, float]
    tolerance: float
    passed: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, at: _At) -> "Parity":
        diffs = _take(d, "max_abs_diff", at, "an object of graph -> number",
                      lambda v: isinstance(v, dict) and all(map(_is_real, v.values())))
        return cls(diffs, _num(d, "tolerance", at),
                   _take(d, "passed", at, "true or false", lambda v: isinstance(v, bool),
                         optional=True), _rest(d, ("max_abs_diff", "tolerance", "passed")))

    def to_dict(self) -> dict[str, Any]:
        return _drop_none({"max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                           "passed": self.passed, **self.extra}, ("passed",))


@dataclass
class Quantization:
    """How a precision variant was made and how closely it agrees with FP32 (``agreement``:
    map_pearson_min, max_image_score_diff, images, ...). ``calibration`` and ``sensitivity``
    exist for INT8."""

    agreement: dict[str, Any]
    calibration: dict[str, Any] | None = None
    sensitivity: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, at: _At) -> "Quantization":
        agreement = _dict(d, "agreement_vs_fp32", at)
        a = at / "agreement_vs_fp32"
        for key in ("map_pearson_min", "max_image_score_diff"):
            _take(agreement, key, a, "a number", _is_real)
        _int(agreement, "images", a)
        calibration = _dict(d, "calibration", at, optional=True)
        if calibration is not None:
            _str(calibration, "method", at / "calibration")
            _int(calibration, "images", at / "calibration")
        sensitivity = _dict(d, "sensitivity", at, optional=True)
        if sensitivity is not None:
            _list(sensitivity, "excluded_weights", at / "sensitivity", "a list", lambda v: True)
        return cls(agreement, calibration, sensitivity,
                   _rest(d, ("agreement_vs_fp32", "calibration", "sensitivity")))

    def to_dict(self) -> dict[str, Any]:
        out = {**self.extra, "agreement_vs_fp32": self.agreement,
               "calibration": self.calibration, "sensitivity": self.sensitivity}
        return _drop_none(out, ("calibration", "sensitivity"))


@dataclass
class EngineBuild:
    """TensorRT engines of one precision built on one device: a plan file per graph, the
    sha256 of the ONNX graphs they were built from, the optimization profile (``batch``:
    [min, opt, max], ``max_shots``) and how they were built (workspace, times, ...)."""

    files: dict[str, FileEntry]
    source_graphs: dict[str, str]
    profile: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, at: _At) -> "EngineBuild":
        files = {k: FileEntry.from_dict(v, at / k) for k, v in d.items()
                 if isinstance(v, dict) and "file" in v}
        sources = _take(d, "source_graphs", at, "an object of graph -> sha256",
                        lambda v: isinstance(v, dict)
                        and all(isinstance(x, str) for x in v.values()))
        profile = _dict(d, "profile", at)
        _list(profile, "batch", at / "profile", "[min, opt, max] batch sizes",
              lambda v: _is_int(v) and v > 0, length=3)
        _int(profile, "max_shots", at / "profile")
        return cls(files, sources, profile, _rest(d, (*files, "source_graphs", "profile")))

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v.to_dict() for k, v in self.files.items()}, "profile": self.profile,
                "source_graphs": self.source_graphs, **self.extra}


@dataclass
class EngineDevice:
    """Engines built on one device (key: GPU, compute capability, TensorRT version)."""

    device: dict[str, str]
    builds: dict[str, EngineBuild]  # precision -> engines

    @classmethod
    def from_dict(cls, d: dict, at: _At) -> "EngineDevice":
        device = _take(d, "device", at, "an object with gpu, compute_capability and tensorrt",
                       lambda v: isinstance(v, dict) and all(
                           isinstance(v.get(k), str)
                           for k in ("gpu", "compute_capability", "tensorrt")))
        builds = {}
        for precision, record in d.items():
            if precision != "device":
                if not _is_name(GRAPH_NAME)(precision):
                    raise at.error(precision, "precision " + _GRAPH_RULE)
                if not isinstance(record, dict):
                    raise (at / precision).error(record, "an object (an engine record)")
                builds[precision] = EngineBuild.from_dict(record, at / precision)
        return cls(device, builds)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, **{p: b.to_dict() for p, b in self.builds.items()}}


# ------------------------------------------------------------------------------- categories
def _thresholds(d: dict, at: _At) -> dict[str, dict[str, Any]]:
    """"<precision>/<mode>" -> {"image": t, "pixel": t, ...}; {} when there are none."""
    value = _dict(d, "thresholds", at, optional=True) or {}
    for key, record in value.items():
        here = at / "thresholds" / key
        if not isinstance(record, dict):
            raise here.error(record, "an object with image and/or pixel thresholds")
        _num(record, "image", here, optional=True)
        _num(record, "pixel", here, optional=True)
    return value


@dataclass
class Category:
    """One category: prompt-ensemble text embeddings and the prompts used, optional few-shot
    memory, and decision thresholds per "<precision>/<mode>"."""

    text: FileEntry
    prompts: FileEntry
    memory: MemoryFile | None = None
    thresholds: dict[str, dict[str, Any]] = field(default_factory=dict)
    n_normal_prompts: int | None = None
    n_anomalous_prompts: int | None = None
    prompt_file: dict[str, Any] | None = None
    ambiguity_filter_dropped: dict[str, list[str]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("text", "prompts", "memory", "thresholds", "n_normal_prompts",
              "n_anomalous_prompts", "prompt_file", "ambiguity_filter_dropped")

    @classmethod
    def from_dict(cls, d: Any, at: _At) -> "Category":
        if not isinstance(d, dict):
            raise at.error(d, "an object (the category's files)")
        memory = _dict(d, "memory", at, optional=True)
        dropped = _take(d, "ambiguity_filter_dropped", at, "lists 'normal' and 'anomalous'",
                        lambda v: isinstance(v, dict) and all(
                            isinstance(v.get(k), list) for k in ("normal", "anomalous")),
                        optional=True)
        return cls(text=FileEntry.from_dict(_dict(d, "text", at), at / "text"),
                   prompts=FileEntry.from_dict(_dict(d, "prompts", at), at / "prompts"),
                   memory=None if not memory else MemoryFile.from_dict(memory, at / "memory"),
                   thresholds=_thresholds(d, at),
                   n_normal_prompts=_int(d, "n_normal_prompts", at, optional=True),
                   n_anomalous_prompts=_int(d, "n_anomalous_prompts", at, optional=True),
                   prompt_file=_dict(d, "prompt_file", at, optional=True),
                   ambiguity_filter_dropped=dropped, extra=_rest(d, cls._KNOWN))

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text.to_dict(), "prompts": self.prompts.to_dict(),
                "n_normal_prompts": self.n_normal_prompts,
                "n_anomalous_prompts": self.n_anomalous_prompts,
                "prompt_file": self.prompt_file,
                "ambiguity_filter_dropped": self.ambiguity_filter_dropped,
                "memory": self.memory.to_dict() if self.memory else None,
                "thresholds": self.thresholds or None, **self.extra}

    def files(self) -> dict[str, FileEntry]:
        """What -> file entry, for checks and clean-up."""
        return {"text embeddings": self.text, "prompts": self.prompts,
                **({"few-shot memory": self.memory} if self.memory else {})}


# --------------------------------------------------------------------------------- manifest
@dataclass
class Manifest:
    """The whole manifest. ``graphs``: precision -> graph name -> file; ``parity``: precision ->
    measured parity; ``quantization``: precision (fp16, int8) -> how it was made; ``engines``:
    device key -> TensorRT engines; ``method_options``: the method's export options;
    ``aprillab``: the AprilLab section (levels, projections) of aprillab bundles."""

    model: Model
    preprocess: Preprocess
    grid: tuple[int, int]
    scales: list[int]
    dims: Dims
    graphs: dict[str, dict[str, GraphFile]]
    categories: dict[str, Category]
    method: str = "winclip"
    method_options: dict[str, Any] = field(default_factory=dict)
    adaptation: Adaptation | None = None
    outputs: list[str] | None = None
    windows: dict[str, int] | None = None
    patch_size: int | None = None
    temperature: float | None = None
    opset: int | None = None
    created: str | None = None
    parity: dict[str, Parity] = field(default_factory=dict)
    quantization: dict[str, Quantization] = field(default_factory=dict)
    engines: dict[str, EngineDevice] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    aprillab: dict[str, Any] | None = None
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("format", "format_version", "method", "method_options", "adaptation", "created",
              "model", "preprocess", "grid", "patch_size", "scales", "windows", "outputs",
              "dims", "temperature", "opset", "graphs", "parity", "quantization", "engines",
              "versions", "aprillab", "categories")

    @classmethod
    def from_dict(cls, d: Any, where: str = "bundle") -> "Manifest":
        """Validate (and migrate to the current version) a manifest read from JSON."""
        at = _At(where)
        if not isinstance(d, dict):
            raise at.error(d, "a JSON object")
        manifest = cls._fields(migrate(d, where), at)
        _check_geometry(manifest, at)
        return manifest

    @classmethod
    def _fields(cls, d: dict, at: _At) -> "Manifest":
        positive = _is_positive_int
        adaptation = _dict(d, "adaptation", at, optional=True)
        method = _str(d, "method", at, optional=True) or "winclip"
        return cls(
            model=Model.from_dict(_dict(d, "model", at), at / "model"),
            preprocess=Preprocess.from_dict(_dict(d, "preprocess", at), at / "preprocess"),
            grid=tuple(_list(d, "grid", at, "[rows, columns] of the patch grid", positive,
                             length=2)),
            scales=_list(d, "scales", at, "a list of window sizes (whole numbers > 0)", positive),
            dims=Dims.from_dict(_dict(d, "dims", at), at / "dims"),
            graphs=_graphs(d, at), categories=_categories(d, at),
            method=method, method_options=_dict(d, "method_options", at, optional=True) or {},
            adaptation=Adaptation.from_dict(adaptation, at / "adaptation") if adaptation else None,
            outputs=_tensor_names(d, "outputs", at),
            windows=_take(d, "windows", at, "an object of scale -> number of windows",
                          lambda v: isinstance(v, dict) and all(map(positive, v.values()))
                          and all(k.isdigit() and k.isascii() for k in v), optional=True),
            patch_size=_int(d, "patch_size", at, optional=True, minimum=1),
            temperature=_num(d, "temperature", at, optional=True),
            opset=_int(d, "opset", at, optional=True, minimum=1),
            created=_str(d, "created", at, optional=True),
            parity={k: Parity.from_dict(v, at / "parity" / k)
                    for k, v in _records(d, "parity", at).items()},
            quantization={k: Quantization.from_dict(v, at / "quantization" / k)
                          for k, v in _records(d, "quantization", at).items()},
            engines={k: EngineDevice.from_dict(v, at / "engines" / k)
                     for k, v in _check_keys(_records(d, "engines", at), at / "engines",
                                             ENGINE_KEY, "device keys of letters, digits, '_', "
                                             "'.', '+' or '-'").items()},
            versions=_dict(d, "versions", at, optional=True) or {},
            aprillab=_aprillab(d, at, method), format=d["format"],
            format_version=d["format_version"], extra=_rest(d, cls._KNOWN))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (current format version)."""
        out = {
            "format": self.format, "format_version": self.format_version, "method": self.method,
            "method_options": self.method_options,
            "adaptation": self.adaptation.to_dict() if self.adaptation else None,
            "created": self.created, "model": self.model.to_dict(),
            "preprocess": self.preprocess.to_dict(), "grid": list(self.grid),
            "patch_size": self.patch_size, "scales": list(self.scales), "windows": self.windows,
            "outputs": self.outputs, "dims": self.dims.to_dict(), "aprillab": self.aprillab,
            "temperature": self.temperature, "opset": self.opset,
            "graphs": {p: {n: g.to_dict() for n, g in gs.items()} for p, gs in self.graphs.items()},
            "parity": {p: r.to_dict() for p, r in self.parity.items()},
            "quantization": {p: r.to_dict() for p, r in self.quantization.items()} or None,
            "engines": {k: e.to_dict() for k, e in self.engines.items()} or None,
            "versions": self.versions,
            "categories": {n: c.to_dict() for n, c in self.categories.items()},
            **self.extra}
        optional = ("created", "patch_size", "windows", "outputs", "aprillab", "temperature",
                    "opset", "quantization", "engines")
        return _drop_none(out, optional)

    def files(self) -> list[tuple[str, FileEntry]]:
        """(what, entry) for every file the manifest names: graphs, category files, engines."""
        out = [(f"{p} {n} graph", g) for p, gs in self.graphs.items() for n, g in gs.items()]
        for name, category in self.categories.items():
            out += [(f"{what} of category {name!r}", e) for what, e in category.files().items()]
        for key, device in self.engines.items():
            out += [(f"{p} {n} TensorRT engine ({key})", e)
                    for p, build in device.builds.items() for n, e in build.files.items()]
        return out


def migrate(d: dict, where: str) -> dict:
    """A manifest of any readable version -> the current structure (a new dict; ``d`` is not
    changed). Version 1 kept the preprocessing under ``input``."""
    at = _At(where)
    if d.get("format") != FORMAT_NAME:
        raise ManifestError(f"{where}: manifest.json is not a clipinspect manifest "
                            f"(format={_show(d.get('format'))}); pass a bundle directory "
                            "written by 'clipinspect export'")
    version = d.get("format_version")
    if version not in READABLE_VERSIONS:
        newer = _is_int(version) and version > FORMAT_VERSION
        hint = "upgrade clipinspect" if newer else "export the bundle again with this version"
        raise ManifestError(f"{where}: bundle format version {_show(version)} is not supported "
                            f"(this clipinspect reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))}): {hint}")
    d = dict(d)
    if version == 1:
        if "preprocess" in d:
            raise (at / "preprocess").error(d["preprocess"], "no such key in a version 1 "
                                            "manifest (it keeps preprocessing under 'input')")
        d = {("preprocess" if k == "input" else k): v for k, v in d.items()}
        d["format_version"] = FORMAT_VERSION
    return d


def _graphs(d: dict, at: _At) -> dict[str, dict[str, GraphFile]]:
    graphs = _check_keys(_dict(d, "graphs", at), at / "graphs", GRAPH_NAME,
                         "precision " + _GRAPH_RULE)
    if "fp32" not in graphs:
        raise (at / "graphs").error(sorted(graphs), "an object with fp32 graphs at least")
    out = {}
    for precision, entries in graphs.items():
        if not isinstance(entries, dict):
            raise (at / "graphs" / precision).error(entries, "an object of graph name -> file")
        _check_keys(entries, at / "graphs" / precision, GRAPH_NAME, "graph " + _GRAPH_RULE)
        out[precision] = {name: GraphFile.from_dict(e, at / "graphs" / precision / name)
                          for name, e in entries.items()}
    return out


def _categories(d: dict, at: _At) -> dict[str, Category]:
    out = {}
    for name, entry in _dict(d, "categories", at).items():
        if not is_category_name(name):
            raise (at / "categories").error(name, "category names of 1-64 letters, digits, "
                                            "spaces, '_', '-' or '.', starting with a letter "
                                            "or digit")
        out[name] = Category.from_dict(entry, at / "categories" / name)
    folders: dict[str, str] = {}
    for name in out:
        other = folders.setdefault(category_folder(name).lower(), name)
        if other != name:
            raise (at / "categories").error(
                name, f"names with folders of their own, but {name!r} and {other!r} share the "
                f"folder {category_folder(name)!r} (spaces become '_', case is ignored)",
                "rename one of them (or restore its manifest.json)")
    return out


def _check_geometry(m: "Manifest", at: _At) -> None:
    """Sizes that must agree with each other (the encoder was traced with them): the patch grid
    of the input size, P = rows x columns, window scales that fit the grid and their window
    counts (every k x k window, stride 1)."""
    size, grid, patch = m.preprocess.size, m.grid, m.patch_size
    if patch and [s // patch for s in size] != list(grid):
        low = [g * patch for g in grid]
        raise (at / "preprocess" / "size").error(
            list(size), f"the size of the {grid[0]}x{grid[1]} patch grid in patches of {patch} "
            f"({low[0]}-{low[0] + patch - 1} x {low[1]}-{low[1] + patch - 1}), what the encoder "
            "was exported for")
    if any(g > s for g, s in zip(grid, size)):
        raise (at / "grid").error(list(grid), f"at most the input size {list(size)}")
    if m.dims.patches != grid[0] * grid[1]:
        raise (at / "dims" / "patches").error(m.dims.patches, f"{grid[0] * grid[1]}, the "
                                              f"{grid[0]}x{grid[1]} patch grid")
    for k in m.scales:
        if k > min(grid):
            raise (at / "scales").error(m.scales, f"window sizes from 1 to {min(grid)} (the grid)")
        count = (grid[0] - k + 1) * (grid[1] - k + 1)
        if m.windows is not None and str(k) in m.windows and m.windows[str(k)] != count:
            raise (at / "windows" / k).error(m.windows[str(k)], f"{count}, the {k}x{k} windows "
                                             f"of the {grid[0]}x{grid[1]} grid")


def _aprillab(d: dict, at: _At, method: str) -> dict[str, Any] | None:
    section = _dict(d, "aprillab", at, optional=method != "aprillab")
    if section is not None:
        _list(section, "layers", at / "aprillab", "a list of transformer block numbers",
              lambda v: _is_int(v) and v >= 0)
    return section


def parse(kind: type, d: Any, where: str, path: str = "") -> Any:
    """A part of a manifest (``Category``, ``GraphFile``, ``Quantization``, ``EngineBuild``, ...)
    from its JSON form, validated like a whole manifest; ``path`` names it in errors."""
    return kind.from_dict(d, _At(where, path))
