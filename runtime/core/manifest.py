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

from . import registry
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


def _record(kind: type, d: dict, key: str, at: _At) -> Any:
    """The optional object ``d[key]`` parsed as ``kind``; None when absent."""
    value = _dict(d, key, at, optional=True)
    return None if value is None else kind.from_dict(value, at / key)


def _numbers_by_name(d: dict, key: str, at: _At, what: str) -> dict[str, float] | None:
    return _take(d, key, at, f"an object of {what} -> number",
                 lambda v: isinstance(v, dict) and all(map(_is_real, v.values())), optional=True)


def _opt_strings(d: dict, key: str, at: _At) -> list[str] | None:
    return _strings(d, key, at, optional=True)


@dataclass
class Agreement:
    """How closely a precision variant agrees with FP32 on held-out normal images: the smallest
    Pearson correlation of the patch-grid anomaly maps over the (category, mode) runs
    (``map_pearson``: per "<category>/<mode>"), the largest image-score difference and how many
    images. A stored variant's record adds where the images came from (``source``), the map
    Pearson ``target`` and what was measured (``measured_on``)."""

    map_pearson_min: float
    max_image_score_diff: float
    images: int
    map_pearson: dict[str, float] | None = None
    source: str | None = None
    target: float | None = None
    measured_on: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("map_pearson_min", "map_pearson", "max_image_score_diff", "images", "source",
              "target", "measured_on")
    _OPTIONAL = ("map_pearson", "source", "target", "measured_on")

    @classmethod
    def from_dict(cls, d: dict, at: _At) -> "Agreement":
        return cls(_take(d, "map_pearson_min", at, "a number", _is_real),
                   _take(d, "max_image_score_diff", at, "a number", _is_real),
                   _int(d, "images", at),
                   map_pearson=_numbers_by_name(d, "map_pearson", at, '"<category>/<mode>"'),
                   source=_str(d, "source", at, optional=True),
                   target=_take(d, "target", at, "a number", _is_real, optional=True),
                   measured_on=_str(d, "measured_on", at, optional=True),
                   extra=_rest(d, cls._KNOWN))

    def to_dict(self) -> dict[str, Any]:
        out = {"map_pearson_min": self.map_pearson_min, "map_pearson": self.map_pearson,
               "max_image_score_diff": self.max_image_score_diff, "images": self.images,
               "source": self.source, "target": self.target, "measured_on": self.measured_on,
               **self.extra}
        return _drop_none(out, self._OPTIONAL)


@dataclass
class Calibration:
    """How the INT8 activation ranges were calibrated: ``method`` (minmax, entropy or
    percentile) over ``images`` normal images."""

    method: str
    images: int
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, at: _At) -> "Calibration":
        return cls(_str(d, "method", at), _int(d, "images", at), _rest(d, ("method", "images")))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "images": self.images, **self.extra}


@dataclass
class WeightRank:
    """One weight of the sensitivity ranking: its label, the MatMul nodes that read it, the
    map Pearson with it alone kept FP32 and the gain over every weight quantized."""

    weight: str
    nodes: list[str]
    map_pearson_if_fp32: float
    gain: float
    extra: dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("weight", "nodes", "map_pearson_if_fp32", "gain")

    @classmethod
    def from_dict(cls, d: Any, at: _At) -> "WeightRank":
        if not isinstance(d, dict):
            raise at.error(d, "an object with weight, nodes, map_pearson_if_fp32 and gain")
        return cls(_str(d, "weight", at), _strings(d, "nodes", at),
                   _take(d, "map_pearson_if_fp32", at, "a number", _is_real),
                   _take(d, "gain", at, "a number", _is_real), _rest(d, cls._KNOWN))

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight, "nodes": list(self.nodes),
                "map_pearson_if_fp32": self.map_pearson_if_fp32, "gain": self.gain, **self.extra}


@dataclass
class Sensitivity:
    """The INT8 sensitivity pass: whether it ran (``mode`` auto, always or off) and for which
    map Pearson ``target``, the top of its ranking, and the weights (labels) and MatMul nodes
    it kept FP32."""

    excluded_weights: list[str]
    ran: bool | None = None
    mode: str | None = None
    target: float | None = None
    ranking: list[WeightRank] | None = None
    excluded_nodes: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("ran", "mode", "target", "ranking", "excluded_weights", "excluded_nodes")

    @classmethod
    def from_dict(cls, d: dict, at: _At) -> "Sensitivity":
        ranking = _list(d, "ranking", at, "a list of objects", lambda v: True, optional=True)
        return cls(_strings(d, "excluded_weights", at),
                   ran=_take(d, "ran", at, "true or false", lambda v: isinstance(v, bool),
                             optional=True),
                   mode=_str(d, "mode", at, optional=True),
                   target=_take(d, "target", at, "a number", _is_real, optional=True),
                   ranking=None if ranking is None else [
                       WeightRank.from_dict(r, at / "ranking" / i) for i, r in enumerate(ranking)],
                   excluded_nodes=_opt_strings(d, "excluded_nodes", at),
                   extra=_rest(d, cls._KNOWN))

    def to_dict(self) -> dict[str, Any]:
        ranking = None if self.ranking is None else [r.to_dict() for r in self.ranking]
        out = {"ran": self.ran, "mode": self.mode, "target": self.target, "ranking": ranking,
               "excluded_weights": list(self.excluded_weights),
               "excluded_nodes": self.excluded_nodes, **self.extra}
        return _drop_none(out, ("ran", "mode", "target", "ranking", "excluded_nodes"))


@dataclass
class Scheme:
    """How a variant represents its numbers: ``format`` "FP16" (with the ``kept_fp32_ops``, the
    ``io`` type and how ``layer_norm`` runs) or "QDQ" (the quantized ``ops``, how many
    ``attention_products``, how ``weights`` and ``activations`` are quantized)."""

    format: str
    ops: list[str] | None = None
    kept_fp32_ops: list[str] | None = None
    attention_products: int | None = None
    weights: str | None = None
    activations: str | None = None
    io: str | None = None
    layer_norm: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("format", "ops", "kept_fp32_ops", "attention_products", "weights", "activations",
              "io", "layer_norm")

    @classmethod
    def from_dict(cls, d: dict, at: _At) -> "Scheme":
        return cls(_str(d, "format", at), ops=_opt_strings(d, "ops", at),
                   kept_fp32_ops=_opt_strings(d, "kept_fp32_ops", at),
                   attention_products=_int(d, "attention_products", at, optional=True),
                   weights=_str(d, "weights", at, optional=True),
                   activations=_str(d, "activations", at, optional=True),
                   io=_str(d, "io", at, optional=True),
                   layer_norm=_str(d, "layer_norm", at, optional=True), extra=_rest(d, cls._KNOWN))

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self._KNOWN}
        return _drop_none({**out, **self.extra}, self._KNOWN[1:])


@dataclass
class Fp16BetweenQdq:
    """The INT8 graph with FP16 between its Q/DQ pairs (``graphs.int8.<graph>``, what
    build-engine's INT8 engines are built from): its graph name and opset, its Q/DQ scales (how
    many, the smallest, how many are FP16 subnormals), what runs between the pairs, and its
    agreement with FP32 (onnxruntime CPU)."""

    graph: str
    opset: int
    agreement: Agreement
    scales: int | None = None
    min_scale: float | None = None
    subnormal_scales: int | None = None
    between_qdq: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("graph", "opset", "scales", "min_scale", "subnormal_scales", "between_qdq",
              "agreement_vs_fp32")

    @classmethod
    def from_dict(cls, d: dict, at: _At) -> "Fp16BetweenQdq":
        return cls(_take(d, "graph", at, "a graph name (letters, digits, '_' or '-')",
                         _is_name(GRAPH_NAME)),
                   _int(d, "opset", at, minimum=1),
                   Agreement.from_dict(_dict(d, "agreement_vs_fp32", at), at / "agreement_vs_fp32"),
                   scales=_int(d, "scales", at, optional=True),
                   min_scale=_take(d, "min_scale", at, "a number", _is_real, optional=True),
                   subnormal_scales=_int(d, "subnormal_scales", at, optional=True),
                   between_qdq=_str(d, "between_qdq", at, optional=True),
                   extra=_rest(d, cls._KNOWN))

    def to_dict(self) -> dict[str, Any]:
        out = {"graph": self.graph, "opset": self.opset, "scales": self.scales,
               "min_scale": self.min_scale, "subnormal_scales": self.subnormal_scales,
               "between_qdq": self.between_qdq, "agreement_vs_fp32": self.agreement.to_dict(),
               **self.extra}
        return _drop_none(out, ("scales", "min_scale", "subnormal_scales", "between_qdq"))


@dataclass
class Quantization:
    """How a precision variant was made and how closely it agrees with FP32 (``agreement``,
    written as ``agreement_vs_fp32``): its ``scheme``; for INT8 also the ``calibration``, the
    quantized and FP32 MatMul node counts, the agreement with every weight quantized, the
    ``sensitivity`` pass and the graph with FP16 between its Q/DQ pairs; when it was made and
    with which onnx / onnxruntime ``versions``."""

    agreement: Agreement
    scheme: Scheme | None = None
    calibration: Calibration | None = None
    sensitivity: Sensitivity | None = None
    quantized_nodes: int | None = None
    fp32_nodes: int | None = None
    all_quantized_agreement: Agreement | None = None
    fp16_between_qdq: Fp16BetweenQdq | None = None
    created: str | None = None
    versions: dict[str, str] | None = None
    #: The fused-attention encoder's agreement with FP32 (``graphs.<precision>.encoder_fused``).
    fused_agreement: Agreement | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("scheme", "calibration", "quantized_nodes", "fp32_nodes", "all_quantized_agreement",
              "sensitivity", "fp16_between_qdq", "created", "agreement_vs_fp32", "versions",
              "fused_agreement_vs_fp32")

    @classmethod
    def from_dict(cls, d: dict, at: _At) -> "Quantization":
        versions = _take(d, "versions", at, "an object of package -> version string",
                         lambda v: isinstance(v, dict) and all(isinstance(x, str)
                                                               for x in v.values()), optional=True)
        return cls(Agreement.from_dict(_dict(d, "agreement_vs_fp32", at), at / "agreement_vs_fp32"),
                   scheme=_record(Scheme, d, "scheme", at),
                   calibration=_record(Calibration, d, "calibration", at),
                   sensitivity=_record(Sensitivity, d, "sensitivity", at),
                   quantized_nodes=_int(d, "quantized_nodes", at, optional=True),
                   fp32_nodes=_int(d, "fp32_nodes", at, optional=True),
                   all_quantized_agreement=_record(Agreement, d, "all_quantized_agreement", at),
                   fp16_between_qdq=_record(Fp16BetweenQdq, d, "fp16_between_qdq", at),
                   created=_str(d, "created", at, optional=True), versions=versions,
                   fused_agreement=_record(Agreement, d, "fused_agreement_vs_fp32", at),
                   extra=_rest(d, cls._KNOWN))

    def to_dict(self) -> dict[str, Any]:
        def form(record: Any) -> Any:
            return None if record is None else record.to_dict()

        out = {"scheme": form(self.scheme), "calibration": form(self.calibration),
               "quantized_nodes": self.quantized_nodes, "fp32_nodes": self.fp32_nodes,
               "all_quantized_agreement": form(self.all_quantized_agreement),
               "sensitivity": form(self.sensitivity),
               "fp16_between_qdq": form(self.fp16_between_qdq), "created": self.created,
               "agreement_vs_fp32": self.agreement.to_dict(), "versions": self.versions,
               "fused_agreement_vs_fp32": form(self.fused_agreement), **self.extra}
        return _drop_none(out, [k for k in self._KNOWN if k != "agreement_vs_fp32"])

    def describe(self) -> str:
        """Its agreement with FP32 and, for INT8, how it was calibrated, in one line."""
        a, how = self.agreement, ""
        if self.calibration is not None:
            kept = self.sensitivity.excluded_weights if self.sensitivity else []
            how = (f"; {self.calibration.method} calibration on {self.calibration.images} "
                   f"images, {len(kept)} weight(s) kept FP32")
        return (f"map Pearson {a.map_pearson_min:.5f}, image score diff "
                f"{a.max_image_score_diff:.1e} ({a.images} held-out images{how})")


@dataclass
class EngineProfile:
    """The optimization profile engines were built for: ``batch`` [min, opt, max] images per
    encoder call and ``max_shots``, the most reference images a few-shot head takes."""

    batch: tuple[int, int, int]
    max_shots: int
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, at: _At) -> "EngineProfile":
        batch = _list(d, "batch", at, "[min, opt, max] batch sizes",
                      lambda v: _is_int(v) and v > 0, length=3)
        return cls(tuple(batch), _int(d, "max_shots", at), _rest(d, ("batch", "max_shots")))

    def to_dict(self) -> dict[str, Any]:
        return {"batch": list(self.batch), "max_shots": self.max_shots, **self.extra}

    @property
    def min_batch(self) -> int:
        return self.batch[0]

    @property
    def max_batch(self) -> int:
        return self.batch[2]


@dataclass
class EngineBuild:
    """TensorRT engines of one precision built on one device: a plan file per graph, the
    sha256 of the ONNX graphs they were built from, the optimization ``profile`` and how they
    were built: workspace, TF32 (off), the graph the encoder engine came from, the heads'
    input shape profiles (``head_profiles``: graph -> input -> [min, opt, max] shapes), which
    head engines were reused from an earlier build, when, and the seconds per engine."""

    files: dict[str, FileEntry]
    source_graphs: dict[str, str]
    profile: EngineProfile
    workspace_mb: int | None = None
    tf32: bool | None = None
    encoder_graph: str | None = None
    head_profiles: dict[str, dict[str, list]] | None = None
    heads_reused: list[str] | None = None
    built: str | None = None
    build_seconds: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("profile", "workspace_mb", "tf32", "encoder_graph", "head_profiles",
              "heads_reused", "source_graphs", "built", "build_seconds")

    @classmethod
    def from_dict(cls, d: dict, at: _At) -> "EngineBuild":
        files = {k: FileEntry.from_dict(v, at / k) for k, v in d.items()
                 if k not in cls._KNOWN and isinstance(v, dict) and "file" in v}
        sources = _take(d, "source_graphs", at, "an object of graph -> sha256",
                        lambda v: isinstance(v, dict)
                        and all(isinstance(x, str) for x in v.values()))
        head_profiles = _take(d, "head_profiles", at, "an object of graph -> input shapes",
                              lambda v: isinstance(v, dict)
                              and all(isinstance(x, dict) for x in v.values()), optional=True)
        return cls(files, sources, EngineProfile.from_dict(_dict(d, "profile", at), at / "profile"),
                   workspace_mb=_int(d, "workspace_mb", at, optional=True, minimum=1),
                   tf32=_take(d, "tf32", at, "true or false", lambda v: isinstance(v, bool),
                              optional=True),
                   encoder_graph=_take(d, "encoder_graph", at, "a graph name (letters, digits, "
                                       "'_' or '-')", _is_name(GRAPH_NAME), optional=True),
                   head_profiles=head_profiles,
                   heads_reused=_strings(d, "heads_reused", at, optional=True),
                   built=_str(d, "built", at, optional=True),
                   build_seconds=_numbers_by_name(d, "build_seconds", at, "graph"),
                   extra=_rest(d, (*files, *cls._KNOWN)))

    def to_dict(self) -> dict[str, Any]:
        out = {**{k: v.to_dict() for k, v in self.files.items()},
               "profile": self.profile.to_dict(), "workspace_mb": self.workspace_mb,
               "tf32": self.tf32, "encoder_graph": self.encoder_graph,
               "head_profiles": self.head_profiles, "heads_reused": self.heads_reused,
               "source_graphs": self.source_graphs, "built": self.built,
               "build_seconds": self.build_seconds, **self.extra}
        return _drop_none(out, [k for k in self._KNOWN if k not in ("profile", "source_graphs")])


@dataclass
class DeviceRecord:
    """The device engines were built on: GPU name, compute capability ("8.7"), TensorRT
    version and, in records written since they were keyed by them, the SM count, the memory in
    GiB and the board model ('' off a Jetson)."""

    gpu: str
    compute_capability: str
    tensorrt: str
    sm_count: int | None = None
    memory_gib: int | None = None
    board: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("gpu", "compute_capability", "tensorrt", "sm_count", "memory_gib", "board")

    @classmethod
    def from_dict(cls, d: dict, at: _At) -> "DeviceRecord":
        return cls(_str(d, "gpu", at), _str(d, "compute_capability", at), _str(d, "tensorrt", at),
                   sm_count=_int(d, "sm_count", at, optional=True),
                   memory_gib=_int(d, "memory_gib", at, optional=True),
                   board=_str(d, "board", at, optional=True), extra=_rest(d, cls._KNOWN))

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self._KNOWN}
        return _drop_none({**out, **self.extra}, self._KNOWN[3:])

    def describe(self) -> str:
        return f"{self.gpu} (sm {self.compute_capability}, TensorRT {self.tensorrt})"


@dataclass
class EngineDevice:
    """Engines built on one device (key: GPU, compute capability, TensorRT version, ...)."""

    device: DeviceRecord
    builds: dict[str, EngineBuild]  # precision -> engines

    def __setattr__(self, name: str, value: Any) -> None:
        # Bundle.set_engines assigns the device in its JSON form: parsed, so it is checked.
        if name == "device" and isinstance(value, dict):
            value = DeviceRecord.from_dict(value, _At("engine record", "device"))
        super().__setattr__(name, value)

    @classmethod
    def from_dict(cls, d: dict, at: _At) -> "EngineDevice":
        device = DeviceRecord.from_dict(_dict(d, "device", at), at / "device")
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
        return {"device": self.device.to_dict(),
                **{p: b.to_dict() for p, b in self.builds.items()}}


# ------------------------------------------------------------------------------- categories
@dataclass
class Thresholds:
    """Decision thresholds of one category, precision and mode: scores >= ``image`` mean an
    anomalous part, map values >= ``pixel`` an anomalous pixel (either may be absent); ``extra``
    says how they were set (rule, FPR, images, ...)."""

    image: float | None = None
    pixel: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, at: _At) -> "Thresholds":
        if not isinstance(d, dict):
            raise at.error(d, "an object with image and/or pixel thresholds")
        return cls(_num(d, "image", at, optional=True), _num(d, "pixel", at, optional=True),
                   _rest(d, ("image", "pixel")))

    def to_dict(self) -> dict[str, Any]:
        return _drop_none({"image": self.image, "pixel": self.pixel, **self.extra},
                          ("image", "pixel"))

    def values(self) -> dict[str, float]:
        """{"image": t, "pixel": t}, the thresholds that are set."""
        return _drop_none({"image": self.image, "pixel": self.pixel}, ("image", "pixel"))


def _thresholds(d: dict, at: _At) -> dict[str, Thresholds]:
    """"<precision>/<mode>" -> Thresholds; {} when there are none."""
    value = _dict(d, "thresholds", at, optional=True) or {}
    return {key: Thresholds.from_dict(record, at / "thresholds" / key)
            for key, record in value.items()}


@dataclass
class PromptFileUse:
    """Which prompt file's descriptions a category's text embeddings include: its path and
    sha256 as given at export, and how many descriptions per state (``n_normal``,
    ``n_anomalous``)."""

    file: str
    sha256: str
    counts: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, at: _At) -> "PromptFileUse":
        counts = {k: _int(d, k, at) for k in ("n_normal", "n_anomalous") if k in d}
        return cls(_str(d, "file", at), _str(d, "sha256", at), counts,
                   _rest(d, ("file", "sha256", "n_normal", "n_anomalous")))

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, **self.counts, **self.extra}


@dataclass
class Category:
    """One category: prompt-ensemble text embeddings and the prompts used, optional few-shot
    memory, and decision thresholds per "<precision>/<mode>"."""

    text: FileEntry
    prompts: FileEntry
    memory: MemoryFile | None = None
    thresholds: dict[str, Thresholds] = field(default_factory=dict)
    n_normal_prompts: int | None = None
    n_anomalous_prompts: int | None = None
    prompt_file: PromptFileUse | None = None
    ambiguity_filter_dropped: dict[str, list[str]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("text", "prompts", "memory", "thresholds", "n_normal_prompts",
              "n_anomalous_prompts", "prompt_file", "ambiguity_filter_dropped")

    @classmethod
    def from_dict(cls, d: Any, at: _At) -> "Category":
        if not isinstance(d, dict):
            raise at.error(d, "an object (the category's files)")
        memory = _dict(d, "memory", at, optional=True)
        prompt_file = _dict(d, "prompt_file", at, optional=True)
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
                   prompt_file=(PromptFileUse.from_dict(prompt_file, at / "prompt_file")
                                if prompt_file is not None else None),
                   ambiguity_filter_dropped=dropped, extra=_rest(d, cls._KNOWN))

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text.to_dict(), "prompts": self.prompts.to_dict(),
                "n_normal_prompts": self.n_normal_prompts,
                "n_anomalous_prompts": self.n_anomalous_prompts,
                "prompt_file": self.prompt_file.to_dict() if self.prompt_file else None,
                "ambiguity_filter_dropped": self.ambiguity_filter_dropped,
                "memory": self.memory.to_dict() if self.memory else None,
                "thresholds": {k: t.to_dict() for k, t in self.thresholds.items()} or None,
                **self.extra}

    def files(self) -> dict[str, FileEntry]:
        """What -> file entry, for checks and clean-up."""
        return {"text embeddings": self.text, "prompts": self.prompts,
                **({"few-shot memory": self.memory} if self.memory else {})}


# --------------------------------------------------------------------------------- manifest
@dataclass
class Manifest:
    """The whole manifest. ``graphs``: precision -> graph name -> file; ``parity``: precision ->
    measured parity; ``quantization``: precision (fp16, int8) -> how it was made; ``engines``:
    device key -> TensorRT engines; ``section``: the method's own part, typed by the method
    (registry.MethodSpec.section: WinCLIP's scales and windows, AprilLab's levels and
    projections, ...); ``prompt_ensemble``: whether the categories' text includes the method's
    prompt ensemble (False: the prompt file's descriptions alone)."""

    model: Model
    preprocess: Preprocess
    grid: tuple[int, int]
    dims: Dims
    graphs: dict[str, dict[str, GraphFile]]
    categories: dict[str, Category]
    method: str = "winclip"
    section: Any = None
    adaptation: Adaptation | None = None
    outputs: list[str] | None = None
    patch_size: int | None = None
    temperature: float | None = None
    opset: int | None = None
    created: str | None = None
    prompt_ensemble: bool = True
    parity: dict[str, Parity] = field(default_factory=dict)
    quantization: dict[str, Quantization] = field(default_factory=dict)
    engines: dict[str, EngineDevice] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("format", "format_version", "method", "adaptation", "created", "model",
              "preprocess", "grid", "patch_size", "outputs", "dims", "temperature", "opset",
              "graphs", "parity", "quantization", "engines", "versions", "categories",
              "prompt_ensemble")

    @classmethod
    def from_dict(cls, d: Any, where: str = "bundle") -> "Manifest":
        """Validate (and migrate to the current version) a manifest read from JSON; the
        method's section is read by the method (the registry)."""
        at = _At(where)
        if not isinstance(d, dict):
            raise at.error(d, "a JSON object")
        manifest = cls._fields(migrate(d, where), at)
        _check_geometry(manifest, at)
        manifest.section.check(manifest, at)
        return manifest

    @classmethod
    def _fields(cls, d: dict, at: _At) -> "Manifest":
        adaptation = _dict(d, "adaptation", at, optional=True)
        method = _str(d, "method", at, optional=True) or "winclip"
        if method not in registry.METHODS:
            raise ManifestError(f"{at.where}: it uses method {_show(method)}, which this "
                                f"clipinspect does not know (it knows "
                                f"{', '.join(registry.METHODS)}); upgrade clipinspect")
        section_type = registry.METHODS[method].section
        return cls(
            model=Model.from_dict(_dict(d, "model", at), at / "model"),
            preprocess=Preprocess.from_dict(_dict(d, "preprocess", at), at / "preprocess"),
            grid=tuple(_list(d, "grid", at, "[rows, columns] of the patch grid",
                             _is_positive_int, length=2)),
            dims=Dims.from_dict(_dict(d, "dims", at), at / "dims"),
            graphs=_graphs(d, at), categories=_categories(d, at), method=method,
            section=section_type.from_dict(d, at),
            adaptation=Adaptation.from_dict(adaptation, at / "adaptation") if adaptation else None,
            outputs=_tensor_names(d, "outputs", at),
            patch_size=_int(d, "patch_size", at, optional=True, minimum=1),
            temperature=_num(d, "temperature", at, optional=True),
            opset=_int(d, "opset", at, optional=True, minimum=1),
            created=_str(d, "created", at, optional=True),
            prompt_ensemble=_take(d, "prompt_ensemble", at, "true or false",
                                  lambda v: isinstance(v, bool), optional=True) is not False,
            parity={k: Parity.from_dict(v, at / "parity" / k)
                    for k, v in _records(d, "parity", at).items()},
            quantization={k: Quantization.from_dict(v, at / "quantization" / k)
                          for k, v in _records(d, "quantization", at).items()},
            engines=_engines(d, at), versions=_dict(d, "versions", at, optional=True) or {},
            format=d["format"], format_version=d["format_version"],
            extra=_rest(d, (*cls._KNOWN, *section_type.KEYS)))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (current format version)."""
        out = {
            "format": self.format, "format_version": self.format_version, "method": self.method,
            **self.section.to_dict(),
            "adaptation": self.adaptation.to_dict() if self.adaptation else None,
            "created": self.created, "model": self.model.to_dict(),
            "preprocess": self.preprocess.to_dict(), "grid": list(self.grid),
            "patch_size": self.patch_size, "outputs": self.outputs, "dims": self.dims.to_dict(),
            "temperature": self.temperature, "opset": self.opset,
            "prompt_ensemble": None if self.prompt_ensemble else False,
            "graphs": {p: {n: g.to_dict() for n, g in gs.items()} for p, gs in self.graphs.items()},
            "parity": {p: r.to_dict() for p, r in self.parity.items()},
            "quantization": {p: r.to_dict() for p, r in self.quantization.items()} or None,
            "engines": {k: e.to_dict() for k, e in self.engines.items()} or None,
            "versions": self.versions,
            "categories": {n: c.to_dict() for n, c in self.categories.items()},
            **self.extra}
        optional = ("created", "patch_size", "outputs", "temperature", "opset", "quantization",
                    "engines", "prompt_ensemble")
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


def _engines(d: dict, at: _At) -> dict[str, EngineDevice]:
    records = _check_keys(_records(d, "engines", at), at / "engines", ENGINE_KEY,
                          "device keys of letters, digits, '_', '.', '+' or '-'")
    return {k: EngineDevice.from_dict(v, at / "engines" / k) for k, v in records.items()}


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
    of the input size and P = rows x columns (the method's section checks its own sizes)."""
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


def parse(kind: type, d: Any, where: str, path: str = "") -> Any:
    """A part of a manifest (``Category``, ``GraphFile``, ``Quantization``, ``EngineBuild``, ...)
    from its JSON form, validated like a whole manifest; ``path`` names it in errors."""
    return kind.from_dict(d, _At(where, path))


# The reading toolkit of a method's manifest section (runtime/methods/*): the same checks and
# the same one-line errors as the rest of the manifest.
At = _At
take, take_dict, take_str, take_int, take_num, take_list, take_strings = (
    _take, _dict, _str, _int, _num, _list, _strings)
is_int, is_num, is_positive_int, rest, drop_none = _is_int, _is_num, _is_positive_int, _rest, _drop_none
