"""What a study compares: its variants and shot counts, read from a study file (JSON, or YAML
with PyYAML) or from ``--variant`` flags. No torch here.

A study file::

    {
      "name": "synthetic",                         optional, shown in the report
      "note": "random weights: ...",               optional, shown in the report
      "shots": [0, 1, 4],                          default 0,1,2,4,8
      "categories": ["weave", "washer"],           default: all in the data
      "defaults": {"model": "ViT-S-16", "pretrained": "none"},   any variant key
      "eval": {"batch_size": 8, "pixel_size": 256, "timing_images": 16},
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
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from clipinspect.runtime.core.errors import UsageError

DEFAULT_SHOTS = (0, 1, 2, 4, 8)
PRECISIONS = ("fp32", "fp16", "int8")
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
    model: str = "ViT-B-16-plus-240"
    pretrained: str = "laion400m_e31"
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
        words = {"ensemble": "ensemble", "llm": "prompt file alone", "both": "ensemble + file"}
        return words[self.prompt_source] + (" + adaptation" if self.adapt else "")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adapters_categories"] = (None if self.adapters_categories is None
                                    else list(self.adapters_categories))
        return d


@dataclass(frozen=True)
class Study:
    """variants, shots; categories None = all in the data; eval settings shared by all."""

    variants: tuple[Variant, ...]
    shots: tuple[int, ...] = DEFAULT_SHOTS
    categories: tuple[str, ...] | None = None
    name: str = "study"
    note: str = ""
    batch_size: int = 8
    pixel_size: int = 256
    timing_images: int = 16


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


def parse_variant(raw: dict, defaults: dict, base: Path, index: int) -> Variant:
    """A variant's dict (defaults applied, files resolved against ``base``), checked."""
    where = f"variant {index + 1}"
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: expected an object of {', '.join(VARIANT_KEYS)}, got {raw!r}")
    d = {**defaults, **raw}
    unknown = [k for k in d if k not in VARIANT_KEYS]
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known: "
                         f"{', '.join(VARIANT_KEYS)}")
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
    seen = d.get("adapters_categories")
    if seen is not None:
        d["adapters_categories"] = tuple(seen)
    d["adapt"] = bool(d.get("adapt", False))
    d["options"] = dict(d.get("options") or {})
    d.setdefault("name", default_name(d))
    return Variant(**d)


def default_name(d: dict) -> str:
    """'winclip both+adapt int8' and the like, from what distinguishes variants."""
    prompts = str(d.get("prompts", "ensemble")).split(":", 1)[0]
    parts = [d.get("method", "winclip"), prompts + ("+adapt" if d.get("adapt") else "")]
    if d.get("adapters") not in (None, "none"):
        parts.append("adapters " + Path(str(d["adapters"])).stem)
    return " ".join(parts + [d.get("precision", "fp32")])


def study_from_dict(data: Any, base: Path, source: str) -> Study:
    if not isinstance(data, dict) or not isinstance(data.get("variants"), list) \
            or not data["variants"]:
        raise UsageError(f"{source}: expected an object with a non-empty 'variants' list")
    unknown = set(data) - {"name", "note", "shots", "categories", "defaults", "eval", "variants"}
    if unknown:
        raise UsageError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; known: name, "
                         "note, shots, categories, defaults, eval, variants")
    defaults = dict(data.get("defaults") or {})
    variants = tuple(parse_variant(v, defaults, base, i) for i, v in enumerate(data["variants"]))
    names = [v.name for v in variants]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"{source}: variant name(s) {', '.join(map(repr, repeated))} appear "
                         "twice; give each variant its own 'name'")
    shots = tuple(sorted({int(k) for k in data.get("shots", DEFAULT_SHOTS)}))
    if not shots or shots[0] < 0:
        raise UsageError(f"{source}: shots {data.get('shots')!r}: whole numbers >= 0, e.g. [0, 1, 4]")
    ev = dict(data.get("eval") or {})
    bad = set(ev) - {"batch_size", "pixel_size", "timing_images"}
    if bad:
        raise UsageError(f"{source}: eval: unknown key(s) {', '.join(sorted(bad))}; known: "
                         "batch_size, pixel_size, timing_images")
    cats = data.get("categories")
    return Study(variants, shots, tuple(cats) if cats else None, str(data.get("name", "study")),
                 str(data.get("note", "")), **{k: int(v) for k, v in ev.items()})


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
        key = key.strip()
        if key == "adapt":
            out[key] = value.strip().lower() in ("1", "true", "yes", "on")
        elif key == "adapters_categories":
            out[key] = [c for c in value.split("+") if c]
        elif key == "seed":
            out[key] = int(value)
        else:
            out[key] = value.strip()
    return out
