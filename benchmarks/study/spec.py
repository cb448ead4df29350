"""What a study compares: its variants and shot counts, read from a study file (JSON, or YAML
with PyYAML) or from ``--variant`` flags. No torch here.

A study file::

    {
      "name": "synthetic",                         optional, shown in the report
      "note": "random weights: ...",               optional, shown in the report
      "shots": [0, 1, 4],                          default 0,1,2,4,8
      "pool_sizes": [5, 10],                       default none: see below
      "categories": ["weave", "washer"],           default: all in the data
      "defaults": {"model": "ViT-S-16", "pretrained": "none"},   any variant key
      "eval": {"batch_size": 8, "pixel_size": 256, "timing_images": 16,
               "timeout_s": 21600},                 seconds per variant's evaluation
      "variants": [
        {"name": "winclip ens fp32", "method": "winclip", "prompts": "ensemble"},
        {"method": "winclip", "prompts": "both:prompts.json", "adapt": true, "precision": "int8"},
        {"method": "aprillab", "adapters": "visa.pt", "adapters_categories": ["candle", ...]}
      ]
    }

Variant keys: model, pretrained (an open_clip tag, a checkpoint, or "none": seeded random
weights), seed, method (a name of the export registry), prompts (``ensemble``, ``llm:FILE``:
the file's descriptions alone, ``both:FILE``: ensemble plus file), adapt (contextual prompt
adaptation), precision (fp32, fp16, int8), adapters (a checkpoint for methods that take one, or
"none"), adapters_categories (the categories the adapters were trained on, when their
checkpoint does not say), options (other options of the method, by name). Relative files are
relative to the study file.

pool_sizes: the pool-size axis of the methods whose zero-shot images score each other (MuSc,
``pool_scored``): their 0-shot row is each category's whole test set scored as one pool, and
each pool size P adds a zero-shot row with the test set split into consecutive pools of at most
P images (``clipinspect eval --pool-size P``). The other methods ignore it; a study that asks
for pool sizes and has no such variant is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from clipinspect.export.defaults import DEFAULT_MODEL, DEFAULT_PRETRAINED
from clipinspect.runtime.core.errors import UsageError
from clipinspect.runtime.core.manifest import is_category_name
from clipinspect.runtime.core.names import PRECISIONS

DEFAULT_SHOTS = (0, 1, 2, 4, 8)
# What a study file may ask for: beyond these a value is a typo, not a study.
MAX_SHOTS = 1000
MAX_POOL = 100_000
EVAL_LIMITS = {"batch_size": (1, 4096), "pixel_size": (8, 4096), "timing_images": (1, 100_000)}
# Seconds one variant's child process may take (export excluded) before it is stopped and
# recorded as failed: hours, since a full MVTec AD evaluation of WinCLIP on a CPU takes that.
DEFAULT_TIMEOUT_S = 6 * 3600.0
MAX_TIMEOUT_S = 7 * 24 * 3600.0
MAX_NAME = 100
PROMPT_SOURCES = ("ensemble", "llm", "both")
VARIANT_KEYS = ("name", "model", "pretrained", "seed", "method", "prompts", "adapt", "precision",
                "adapters", "adapters_categories", "options")


@dataclass(frozen=True)
class Variant:
    """One row group of the study: how its bundle is made and at which precision it runs.

    prompts: "ensemble", "llm:FILE" or "both:FILE" (FILE absolute once loaded). adapters: a
    checkpoint path, "none" or None; adapters_categories: None when not declared.
    """

    name: str
    model: str = DEFAULT_MODEL
    pretrained: str = DEFAULT_PRETRAINED
    seed: int = 0
    method: str = "winclip"
    prompts: str = "ensemble"
    adapt: bool = False
    precision: str = "fp32"
    adapters: str | None = None
    adapters_categories: tuple[str, ...] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_source(self) -> str:
        return self.prompts.split(":", 1)[0]

    @property
    def prompt_file(self) -> str | None:
        return self.prompts.split(":", 1)[1] if ":" in self.prompts else None

    @property
    def strategy(self) -> str:
        """The prompt strategy in the report's words."""
        if pool_scored(self.method):
            return "no prompts"
        words = {"ensemble": "ensemble", "llm": "prompt file alone", "both": "ensemble + file"}
        return words[self.prompt_source] + (" + adaptation" if self.adapt else "")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adapters_categories"] = (None if self.adapters_categories is None
                                    else list(self.adapters_categories))
        return d


@dataclass(frozen=True)
class Study:
    """variants, shots; categories None = all in the data; eval settings shared by all;
    pool_sizes: the zero-shot pool sizes of the pool-scored variants (besides the whole test
    set of their 0-shot row)."""

    variants: tuple[Variant, ...]
    shots: tuple[int, ...] = DEFAULT_SHOTS
    categories: tuple[str, ...] | None = None
    name: str = "study"
    note: str = ""
    batch_size: int = 8
    pixel_size: int = 256
    timing_images: int = 16
    timeout_s: float = DEFAULT_TIMEOUT_S
    pool_sizes: tuple[int, ...] = ()


def pool_scored(method: str) -> bool:
    """Whether the method's zero-shot images score each other (MuSc: no prompts, no
    references), as ``Inspector.pool_scored`` says of its bundles; False for unknown names."""
    from clipinspect.runtime.methods import METHODS

    spec = METHODS.get(method)
    return spec is not None and spec.scorer is not None


def pool_sizes(value: Any, what: str) -> tuple[int, ...]:
    """A list of pool sizes, each a whole number from ``evaluate.MIN_POOL`` (a pool scores at
    least that many images together); [] for none."""
    from clipinspect.calibration.evaluate import MIN_POOL

    if not isinstance(value, (list, tuple)):
        raise UsageError(f"{what} {_show(value)}: expected a list of whole numbers from "
                         f"{MIN_POOL}, e.g. [5, 10]")
    return tuple(sorted({whole_number(p, what, MIN_POOL, MAX_POOL) for p in value}))


def check_pool_sizes(study: "Study", source: str) -> None:
    """Pool sizes apply to pool-scored variants only: a study with pool sizes and none of
    them is refused (a typo in a method, or a forgotten variant)."""
    if study.pool_sizes and not any(pool_scored(v.method) for v in study.variants):
        raise UsageError(f"{source}: pool_sizes {list(study.pool_sizes)}: only a method whose "
                         "zero-shot images score each other (musc) is scored in pools, and no "
                         "variant has one; add a musc variant or drop pool_sizes")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bundle_key(variant: Variant, categories: Sequence[str]) -> str:
    """Hash of everything the variant's FP32 bundle depends on (precision is not: quantized
    graphs are added to the same bundle); files count by content, not by name."""
    files = {}
    for label, path in (("prompts", variant.prompt_file), ("adapters", variant.adapters),
                        ("pretrained", variant.pretrained)):
        if path and Path(path).is_file():
            files[label] = _sha256(path)
    d = {k: v for k, v in variant.to_dict().items() if k not in ("name", "precision",
                                                                 "adapters_categories")}
    blob = json.dumps({"variant": d, "files": files, "categories": sorted(categories)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _resolved(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def whole_number(value: Any, what: str, lo: int, hi: int) -> int:
    """``value`` when it is a whole number in [lo, hi] (not a bool, a string or a float such
    as 1e400); else a one-line error."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise UsageError(f"{what} {_show(value)}: expected a whole number from {lo} to {hi}")
    return value


def seconds(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not 0 < value <= MAX_TIMEOUT_S:
        raise UsageError(f"{what} {_show(value)}: expected seconds, more than 0 and at most "
                         f"{MAX_TIMEOUT_S:g}")
    return float(value)


def category_list(value: Any, what: str) -> tuple[str, ...]:
    """A list of distinct category names (a bare string is refused: "weave" is not the list
    of its letters)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise UsageError(f"{what} {_show(value)}: expected a non-empty list of category names, "
                         'e.g. ["weave", "washer"]')
    for name in value:
        if not is_category_name(name):
            raise UsageError(f"{what}: {_show(name)} is not a category name (1-64 letters, "
                             "digits, spaces, '_', '-' or '.', starting with a letter or digit)")
    if len(set(value)) != len(value):
        raise UsageError(f"{what} {_show(value)}: a category appears twice")
    return tuple(value)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _text(value: Any, what: str, limit: int = MAX_NAME) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > limit \
            or not value.isprintable():
        raise UsageError(f"{what} {_show(value)}: expected text of 1 to {limit} printable "
                         "characters")
    return value


def _typed(d: dict, where: str) -> None:
    """Each variant key of a fixed type checked (seed and adapters_categories normalised)."""
    for key in ("name", "model", "pretrained", "method"):
        if key in d:
            _text(d[key], f"{where}: {key}", MAX_NAME if key == "name" else 1000)
    if "seed" in d:
        d["seed"] = whole_number(d["seed"], f"{where}: seed", 0, 2**32 - 1)
    if not isinstance(d.get("adapt", False), bool):
        raise UsageError(f"{where}: adapt {_show(d['adapt'])}: expected true or false")
    for key, kind, words in (("prompts", str, "text"), ("precision", str, "text"),
                             ("adapters", str, "a file or 'none'"),
                             ("options", dict, "an object of method options")):
        if d.get(key) is not None and not isinstance(d[key], kind):
            raise UsageError(f"{where}: {key} {_show(d[key])}: expected {words}")
    if d.get("adapters_categories") is not None:
        d["adapters_categories"] = category_list(d["adapters_categories"],
                                                 f"{where}: adapters_categories")


def parse_variant(raw: dict, defaults: dict, base: Path, index: int) -> Variant:
    """A variant's dict (defaults applied, files resolved against ``base``), checked."""
    where = f"variant {index + 1}"
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: expected an object of {', '.join(VARIANT_KEYS)}, got "
                         f"{_show(raw)}")
    d = {**defaults, **raw}
    unknown = [k for k in d if k not in VARIANT_KEYS]
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known: "
                         f"{', '.join(VARIANT_KEYS)}")
    _typed(d, where)
    source, _, file = str(d.get("prompts", "ensemble")).partition(":")
    if source not in PROMPT_SOURCES or (source == "ensemble") != (not file):
        raise UsageError(f"{where}: prompts {d.get('prompts')!r}: use 'ensemble', 'llm:FILE' "
                         "(the prompt file alone) or 'both:FILE' (ensemble plus file)")
    if file:
        d["prompts"] = f"{source}:{_resolved(file, base)}"
    precision = d.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise UsageError(f"{where}: precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if d.get("adapters") not in (None, "none"):
        d["adapters"] = _resolved(str(d["adapters"]), base)
    if d.get("pretrained") not in (None, "none") and Path(base / str(d["pretrained"])).is_file():
        d["pretrained"] = _resolved(str(d["pretrained"]), base)
    d["options"] = dict(d.get("options") or {})
    d.setdefault("name", default_name(d))
    return Variant(**d)


def result_folder(name: str) -> str:
    """The variant's folder under OUT/results: its name with every run of characters other
    than letters, digits, '_', '.' and '-' as one '_', no '.' or '_' at either end (so never
    '.' or '..'). Two names may give one folder ("a b", "a_b"): ``study_from_dict`` refuses."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.")[:MAX_NAME] or "variant"


def _check_folders(variants: Sequence[Variant], source: str) -> None:
    names = [v.name for v in variants]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"{source}: variant name(s) {', '.join(map(repr, repeated))} appear "
                         "twice; give each variant its own 'name'")
    taken: dict[str, str] = {}
    for name in names:
        folder = result_folder(name)
        other = taken.setdefault(folder.casefold(), name)  # case-insensitive disks too
        if other != name:
            raise UsageError(f"{source}: variants {other!r} and {name!r} would share the result "
                             f"folder results/{folder}; rename one")


def default_name(d: dict) -> str:
    """'winclip both+adapt int8' and the like, from what distinguishes variants."""
    prompts = str(d.get("prompts", "ensemble")).split(":", 1)[0]
    parts = [d.get("method", "winclip"), prompts + ("+adapt" if d.get("adapt") else "")]
    if pool_scored(parts[0]):  # it takes no prompts: 'musc fp32'
        parts.pop()
    if d.get("adapters") not in (None, "none"):
        parts.append("adapters " + Path(str(d["adapters"])).stem)
    return " ".join(parts + [d.get("precision", "fp32")])


def _eval_settings(ev: Any, source: str) -> dict[str, Any]:
    if not isinstance(ev, dict):
        raise UsageError(f"{source}: eval {_show(ev)}: expected an object of "
                         f"{', '.join(EVAL_LIMITS)}, timeout_s")
    bad = set(ev) - {*EVAL_LIMITS, "timeout_s"}
    if bad:
        raise UsageError(f"{source}: eval: unknown key(s) {', '.join(sorted(bad))}; known: "
                         f"{', '.join(EVAL_LIMITS)}, timeout_s")
    out: dict[str, Any] = {k: whole_number(v, f"{source}: eval.{k}", *EVAL_LIMITS[k])
                           for k, v in ev.items() if k in EVAL_LIMITS}
    if "timeout_s" in ev:
        out["timeout_s"] = seconds(ev["timeout_s"], f"{source}: eval.timeout_s")
    return out


def shot_counts(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise UsageError(f"{what} {_show(value)}: expected a non-empty list of whole numbers "
                         "from 0, e.g. [0, 1, 4]")
    return tuple(sorted({whole_number(k, what, 0, MAX_SHOTS) for k in value}))


def study_from_dict(data: Any, base: Path, source: str) -> Study:
    if not isinstance(data, dict) or not isinstance(data.get("variants"), list) \
            or not data["variants"]:
        raise UsageError(f"{source}: expected an object with a non-empty 'variants' list")
    unknown = set(data) - {"name", "note", "shots", "pool_sizes", "categories", "defaults",
                           "eval", "variants"}
    if unknown:
        raise UsageError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; known: name, "
                         "note, shots, pool_sizes, categories, defaults, eval, variants")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise UsageError(f"{source}: defaults {_show(defaults)}: expected an object of variant "
                         "keys")
    variants = tuple(parse_variant(v, dict(defaults), base, i)
                     for i, v in enumerate(data["variants"]))
    _check_folders(variants, source)
    shots = shot_counts(data.get("shots", DEFAULT_SHOTS), f"{source}: shots")
    ev = _eval_settings(data.get("eval") or {}, source)
    cats = data.get("categories")
    cats = None if cats is None else category_list(cats, f"{source}: categories")
    name = _text(data.get("name", "study"), f"{source}: name", 200)
    note = data.get("note", "")
    if not isinstance(note, str):
        raise UsageError(f"{source}: note {_show(note)}: expected text")
    study = Study(variants, shots, cats, name, note, **ev,
                  pool_sizes=pool_sizes(data.get("pool_sizes", []), f"{source}: pool_sizes"))
    check_pool_sizes(study, source)
    return study


def load_study(path: str | Path) -> Study:
    """Read a study file (.json, or .yaml / .yml with PyYAML)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"study file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise UsageError(f"{str(path)!r} is YAML, which needs PyYAML: pip install pyyaml (or "
                             "write the study file as JSON)") from e
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{str(path)!r} is not valid JSON: {e.msg} at line {e.lineno}") from e
    return study_from_dict(data, path.parent.resolve(), repr(str(path)))


def variant_flag(text: str) -> dict:
    """'method=patch,prompts=both:p.json,adapt=true,precision=int8' -> a variant's dict."""
    out: dict[str, Any] = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        key, eq, value = item.partition("=")
        if not eq:
            raise UsageError(f"--variant {text!r}: {item!r} is not KEY=VALUE (e.g. "
                             "method=patch,prompts=ensemble,precision=int8)")
        key, value = key.strip(), value.strip()
        if key == "adapt":
            words = {"1": True, "true": True, "yes": True, "on": True,
                     "0": False, "false": False, "no": False, "off": False}
            if value.lower() not in words:
                raise UsageError(f"--variant {text!r}: adapt={value!r}: use true or false")
            out[key] = words[value.lower()]
        elif key == "adapters_categories":
            out[key] = [c for c in value.split("+") if c]
        elif key == "seed":
            if not value.isdigit():
                raise UsageError(f"--variant {text!r}: seed={value!r}: expected a whole number")
            out[key] = int(value)
        else:
            out[key] = value
    return out
