"""``clipinspect triton``: a Triton Inference Server model repository from a bundle.

Models (one bundle per repository)::

    clipinspect_encoder        images -> embeddings; batching model with a dynamic batcher, so
                               concurrent requests from many cameras share one GPU batch
    clipinspect_categories     category name -> text prototypes, few-shot memory (Python
                               backend, arrays stored as files next to it: categories.py)
    clipinspect_head_zeroshot  embeddings + text prototypes -> image score, anomaly grid
    clipinspect_head_fewshot   ... + reference memory
    clipinspect_zeroshot       ensemble: {images, category} -> {image_score, anomaly_grid}
    clipinspect_fewshot        ensemble, few-shot (WinCLIP+)

Why the categories model and not client-supplied tensors: few-shot memory is shots x (patches +
windows) x width floats (several MB per request for ViT-B-16-plus-240 at 4 shots), which every
request would otherwise carry; served from the repository it costs a name. The heads take the
arrays as inputs (as in the bundle), so a category or reference set is added by writing files,
never by rebuilding an engine.

The heads and the category model are not batched by Triton (their category inputs have no batch
axis); the encoder, where the time goes, is. The ensembles pass whole request batches. The
encoder takes no category, so its dynamic batcher joins requests of any categories into one
encoder execution; each request then meets its own category only at the categories model and
its head. Mixed categories therefore already cost one encoder pass per Triton batch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ..core.bundle import Bundle, atomic_write_bytes, category_dir, npz_bytes, sha256_file
from ..core.errors import UsageError
from ..core.manifest import BundleError, EngineBuild, FileEntry
from .pbtxt import pbtxt_string

ENCODER = "clipinspect_encoder"
CATEGORIES = "clipinspect_categories"
HEADS = {"zeroshot": "clipinspect_head_zeroshot", "fewshot": "clipinspect_head_fewshot"}
ENSEMBLES = {"zeroshot": "clipinspect_zeroshot", "fewshot": "clipinspect_fewshot"}
# platform -> (Triton platform or backend, model file); python: Python-backend models running
# the ONNX graphs with onnxruntime on the CPU (python_model.py).
PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan"),
             "python": ("python", "model.onnx")}
DEFAULT_QUEUE_DELAY_US = 2000
DEFAULT_MAX_BATCH = 32   # --platform onnx; tensorrt defaults to the engines' profile maximum
# Which bundle a repository was written from, next to the categories model (Triton ignores
# files in a model folder other than its config and version folders).
IDENTITY_FILE = "clipinspect_bundle.json"


# Tensor names written into config.pbtxt: a plain identifier, nothing a parser could read as
# the end of a field (a bundle is input: its graphs name their own tensors). Stricter than the
# manifest's TENSOR_NAME, which also admits ONNX's internal names ('/visual/Add_output_0'):
# only the heads' inputs and outputs reach a config, and those are plain identifiers.
CONFIG_TENSOR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def check_tensor_name(name: str, where: str) -> str:
    """``name`` when it is a plain tensor name; else a one-line error (the name shown with its
    escapes, shortened)."""
    if isinstance(name, str) and CONFIG_TENSOR_NAME.fullmatch(name):
        return name
    shown = repr(name)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise BundleError(f"the bundle's {where} names a tensor {shown}: Triton configs take only "
                      "plain tensor names (letters, digits and '_', not starting with a digit, "
                      "at most 128); nothing was written: re-export the bundle")


def _dims(dims) -> str:
    return "[ " + ", ".join(str(int(d)) for d in dims) + " ]"


def _tensor(name: str, dims, dtype: str = "TYPE_FP32") -> str:
    return (f"  {{\n    name: {pbtxt_string(name)}\n    data_type: {dtype}\n"
            f"    dims: {_dims(dims)}\n  }}")


def _block(key: str, tensors: list[str]) -> str:
    return f"{key} [\n" + ",\n".join(tensors) + "\n]\n"


class Shapes:
    """Per-sample shapes of every tensor, read off the bundle's scoring heads (what they take is
    what the encoder gives and the categories model serves; -1 where a size varies)."""

    def __init__(self, bundle: Bundle):
        from ..tensorrt.compat import head_inputs, is_category_input

        h, w = bundle.input_size
        self.images = [3, h, w]
        inputs = {check_tensor_name(n, "scoring head graph"): [-1 if d is None else int(d)
                                                                for d in dims]
                  for n, dims in head_inputs(bundle).items()}
        self.encoder = {n: dims[1:] for n, dims in inputs.items() if not is_category_input(n)}
        self.category = {n: dims for n, dims in inputs.items() if is_category_input(n)}
        # The map the heads return: the patch grid, or the input size (aprillab upsamples).
        grid = head_inputs(bundle, outputs=True)["anomaly_grid"][1:]
        self.grid = [-1 if d is None else int(d) for d in grid]


def _head_inputs(bundle: Bundle, mode: str) -> list[str]:
    return [check_tensor_name(n, f"manifest (graphs.fp32.head_{mode}.inputs)")
            for n in bundle.manifest.graphs["fp32"][f"head_{mode}"].inputs or []]


def encoder_config(bundle: Bundle, platform: str, max_batch: int) -> str:
    s = Shapes(bundle)
    # What a client needs to prepare images, readable through Triton's model-config API.
    preprocessing = json.dumps({**bundle.preprocess.to_dict(), "bundle": bundle.identity})
    preferred = sorted({b for b in (4, 8, 16, max_batch) if b <= max_batch})
    return (f"name: {pbtxt_string(ENCODER)}\nplatform: {pbtxt_string(PLATFORMS[platform][0])}\n"
            f"max_batch_size: {max_batch}\n"
            + _block("input", [_tensor("images", s.images)])
            + _block("output", [_tensor(n, d) for n, d in s.encoder.items()])
            + f"dynamic_batching {{\n  preferred_batch_size: {_dims(preferred)}\n"
              f"  max_queue_delay_microseconds: {DEFAULT_QUEUE_DELAY_US}\n}}\n"
            + "instance_group [\n  {\n    kind: KIND_GPU\n    count: 1\n  }\n]\n"
            + 'parameters {\n  key: "clipinspect_preprocessing"\n  value: {\n'
              f"    string_value: {pbtxt_string(preprocessing)}\n  }}\n}}\n")


def head_config(bundle: Bundle, platform: str, mode: str) -> str:
    s = Shapes(bundle)
    inputs = []
    for n in _head_inputs(bundle, mode):
        dims = s.category[n] if n in s.category else [-1, *s.encoder[n]]
        inputs.append(_tensor(n, dims))
    outputs = [_tensor("image_score", [-1]), _tensor("anomaly_grid", [-1, *s.grid])]
    return (f"name: {pbtxt_string(HEADS[mode])}\n"
            f"platform: {pbtxt_string(PLATFORMS[platform][0])}\nmax_batch_size: 0\n"
            + _block("input", inputs) + _block("output", outputs)
            + "instance_group [\n  {\n    kind: KIND_GPU\n    count: 1\n  }\n]\n")


def categories_config(bundle: Bundle) -> str:
    s = Shapes(bundle)
    return (f'name: {pbtxt_string(CATEGORIES)}\nbackend: "python"\nmax_batch_size: 0\n'
            + _block("input", [_tensor("category", [1], "TYPE_STRING")])
            + _block("output", [_tensor(n, d) for n, d in s.category.items()])
            + "instance_group [\n  {\n    kind: KIND_CPU\n    count: 1\n  }\n]\n")


def _map(kind: str, pairs: list[tuple[str, str]]) -> str:
    return "".join(f"      {kind} {{\n        key: {pbtxt_string(k)}\n"
                   f"        value: {pbtxt_string(v)}\n      }}\n" for k, v in pairs)


def ensemble_config(bundle: Bundle, mode: str) -> str:
    s = Shapes(bundle)
    head_inputs = _head_inputs(bundle, mode)
    from_encoder = [n for n in head_inputs if n in s.encoder]
    from_store = [n for n in head_inputs if n in s.category]
    steps = [(ENCODER, [("images", "images")], [(n, n) for n in from_encoder]),
             (CATEGORIES, [("category", "category")], [(n, n) for n in from_store]),
             (HEADS[mode], [(n, n) for n in head_inputs],
              [("image_score", "image_score"), ("anomaly_grid", "anomaly_grid")])]
    body = ",\n".join(f"    {{\n      model_name: {pbtxt_string(model)}\n      model_version: -1\n"
                      + _map("input_map", ins) + _map("output_map", outs) + "    }"
                      for model, ins, outs in steps)
    return (f'name: {pbtxt_string(ENSEMBLES[mode])}\nplatform: "ensemble"\nmax_batch_size: 0\n'
            + _block("input", [_tensor("images", [-1, *s.images]),
                               _tensor("category", [1], "TYPE_STRING")])
            + _block("output", [_tensor("image_score", [-1]),
                                _tensor("anomaly_grid", [-1, *s.grid])])
            + f"ensemble_scheduling {{\n  step [\n{body}\n  ]\n}}\n")


# -------------------------------------------------------------------------------- writing
def _place(src: Path, dst: Path) -> None:
    """Hard link when possible (graphs and engines are large), else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def category_folders(bundle: Bundle) -> dict[str, str]:
    """{category: its folder under the categories model}; two names sharing a folder ("metal
    nut" and "metal_nut", or "Bottle" and "bottle" on a case-insensitive disk) are refused, as
    the categories model could serve only one of them."""
    folders: dict[str, str] = {}
    taken: dict[str, str] = {}
    for name in bundle.categories:
        folder = category_dir(name)
        other = taken.setdefault(folder.lower(), name)
        if other != name:
            raise UsageError(f"categories {other!r} and {name!r} of the bundle share the folder "
                             f"{folder!r} in the repository; rename one (clipinspect "
                             "add-category under a new name, then remove the old one)")
        folders[name] = folder
    return folders


def write_categories(bundle: Bundle, repo: Path) -> list[str]:
    """Write every category's arrays into the categories model (atomically, file by file)."""
    root = repo / CATEGORIES / "1"
    folders = category_folders(bundle)  # before anything is written
    for name, folder in folders.items():
        data = bundle.category(name)
        atomic_write_bytes(root / folder / "text.npz", npz_bytes(data.text))
        if data.memory:
            atomic_write_bytes(root / folder / "memory.npz", npz_bytes(data.memory))
        else:
            (root / folder / "memory.npz").unlink(missing_ok=True)
    return list(folders)


def _engine_record(bundle: Bundle, precision: str, engine_key: str | None) -> EngineBuild:
    engines = {k: v.builds for k, v in bundle.manifest.engines.items() if precision in v.builds}
    build = f"clipinspect build-engine {bundle.root} --precision {precision}"
    if not engines:
        raise UsageError(f"--platform tensorrt needs {precision} engines built on the serving "
                         f"GPU's model: run '{build}' there first, or use --platform onnx")
    if engine_key is None:
        if len(engines) > 1:
            raise UsageError(f"the bundle has {precision} engines for several devices "
                             f"({', '.join(sorted(engines))}); choose one with --engine-key")
        engine_key = next(iter(engines))
    if engine_key not in engines:
        raise UsageError(f"no {precision} engines for device {engine_key!r}; the bundle has "
                         f"{', '.join(sorted(engines))}")
    from ..core.names import GRAPHS

    record = engines[engine_key][precision]
    for name in GRAPHS:
        if record.source_graphs.get(name) != bundle.manifest.graphs[precision][name].sha256:
            raise UsageError(f"the {precision} {name} engine is older than its graph; rebuild "
                             f"with '{build}'")
    return record


def engine_max_batch(record: EngineBuild, max_batch: int | None, build: str) -> int:
    """The encoder's max_batch_size for engines built with ``record.profile``: Triton's
    TensorRT backend refuses a config whose max_batch_size exceeds the engine profile's
    maximum, and its dynamic batcher sends any batch from 1 up, so the profile must start at 1."""
    lo, hi = record.profile.min_batch, record.profile.max_batch
    if lo > 1:
        raise UsageError(f"the engines' profile starts at batch {lo}, but Triton sends batches "
                         f"from 1 up; rebuild with '{build} --min-batch 1'")
    if max_batch is None:
        return hi
    if max_batch > hi:
        raise UsageError(f"--max-batch {max_batch} exceeds the engines' profile maximum {hi}, "
                         f"which Triton would refuse; use --max-batch {hi} or less, or rebuild "
                         f"with '{build} --max-batch {max_batch}'")
    return max_batch


def checked_file(bundle: Bundle, entry: FileEntry, what: str) -> Path:
    """The bundle file of a manifest entry, refused when it lies outside the
    bundle or its content is not the one recorded: a repository serves exactly the bundle."""
    root = bundle.root.resolve()
    path = (root / entry.file).resolve()
    if not path.is_relative_to(root):
        raise UsageError(f"the {what} file {entry.file!r} lies outside the bundle "
                         f"{str(root)!r}; a repository is written only from the bundle's files")
    if not path.is_file():
        raise UsageError(f"the {what} file {entry.file!r} is missing from the bundle")
    if sha256_file(path) != entry.sha256:
        raise UsageError(f"the {what} file {entry.file!r} does not match the checksum the "
                         "bundle records (modified or truncated); rebuild or re-export it")
    return path


def _heads(bundle: Bundle, precision: str) -> dict[str, str | None]:
    """{head graph: SHA-256} at ``precision``: what the category arrays must fit (a bundle with
    prompt adaptation has the same encoder as one without, but heads taking other inputs)."""
    graphs = bundle.manifest.graphs.get(precision, {})
    return {f"head_{m}": graphs[f"head_{m}"].sha256 if f"head_{m}" in graphs else None
            for m in HEADS}


def _identity(bundle: Bundle, platform: str, precision: str) -> dict[str, Any]:
    return {"bundle": bundle.identity, "platform": platform, "precision": precision,
            "heads": _heads(bundle, precision)}


def _read_identity(out: Path) -> dict | None:
    try:
        record = json.loads((out / CATEGORIES / IDENTITY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _check_same_bundle(bundle: Bundle, out: Path) -> None:
    """--categories-only writes arrays the served heads must accept: only from the bundle the
    repository was written from (a 640-d bundle's prototypes break a 384-d repository), with
    the same heads (an adapted bundle's heads take prompt pools a plain one does not have)."""
    served = _read_identity(out)
    if served is None or "heads" not in served:
        raise UsageError(f"{str(out)!r} does not record which bundle and heads it was written "
                         "from (an older clipinspect wrote it); write it again (without "
                         "--categories-only) into a new --out")
    if served.get("bundle") != bundle.identity:
        raise UsageError(f"{str(out)!r} serves bundle {served.get('bundle')!r}, not "
                         f"{bundle.identity!r}; --categories-only only refreshes the categories "
                         "of the same bundle (write a new repository with --overwrite instead)")
    if served["heads"] != _heads(bundle, str(served.get("precision"))):
        raise UsageError(f"{str(out)!r} serves other scoring heads than bundle "
                         f"{str(bundle.root)!r} has (e.g. one with prompt adaptation, the other "
                         "without); --categories-only only refreshes the categories of the "
                         "same bundle (write a new repository with --overwrite instead)")


def _written(root: Path) -> list[str]:
    """Every path under ``root`` (folders too), relative, '/'-separated: what was written."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def _check_only_ours(out: Path) -> None:
    """--overwrite removes a repository only when everything in it is what clipinspect wrote
    there (the list recorded next to the categories model); Python's bytecode caches, which
    Triton's Python backend may leave next to model.py, count as written."""
    record = _read_identity(out)
    recorded = set(record.get("files") or []) if record else set()
    if not recorded:
        raise UsageError(f"{str(out)!r} does not record what clipinspect wrote there (an older "
                         "clipinspect wrote it); --overwrite removes only what clipinspect "
                         "recorded: delete the folder yourself or choose another --out")
    unknown = [rel for rel in _written(out)
               if rel not in recorded and "__pycache__" not in rel.split("/")]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise UsageError(f"{str(out)!r} holds {unknown[0]!r}{more}, which clipinspect did not "
                         "write; --overwrite removes only a repository clipinspect wrote: move "
                         "that away or choose another --out")


def _check_out_location(bundle: Bundle, out: Path) -> None:
    """The repository is written next to ``out`` and swapped in whole: refuse an ``out`` that
    holds the current folder or the bundle, or lies inside the bundle."""
    where = out.resolve()
    root = bundle.root.resolve()
    if out.is_symlink():
        raise UsageError(f"--out {str(out)!r} is a symbolic link; give the folder it points to, "
                         f"{str(where)!r}, or another one")
    if Path.cwd().resolve().is_relative_to(where):
        raise UsageError(f"--out {str(out)!r} is the current folder or one above it; the "
                         "repository replaces --out as a whole: give a folder of its own, e.g. "
                         "--out models")
    if root.is_relative_to(where) or where.is_relative_to(root):
        raise UsageError(f"--out {str(out)!r} holds or lies inside the bundle {str(root)!r}; "
                         "give a folder of its own next to the bundle, e.g. --out models")


def _write_models(bundle: Bundle, tmp: Path, platform: str, precision: str, max_batch: int,
                  record: EngineBuild | None) -> None:
    """Every model of the repository into ``tmp``, with the list of what was written."""
    # Configs first: a bundle whose tensor names cannot be written is refused before any file.
    configs = {ENCODER: encoder_config(bundle, platform, max_batch),
               CATEGORIES: categories_config(bundle),
               **{name: head_config(bundle, platform, mode) for mode, name in HEADS.items()},
               **{name: ensemble_config(bundle, mode) for mode, name in ENSEMBLES.items()}}
    category_folders(bundle)
    filename = PLATFORMS[platform][1]

    def model_file(graph: str) -> Path:
        if record is not None:
            return checked_file(bundle, record.files[graph], f"{precision} {graph} engine")
        return checked_file(bundle, bundle.manifest.graphs[precision][graph],
                            f"{precision} {graph} graph")

    _place(model_file("encoder"), tmp / ENCODER / "1" / filename)
    for mode, name in HEADS.items():
        _place(model_file(f"head_{mode}"), tmp / name / "1" / filename)
    for name in ENSEMBLES.values():
        (tmp / name / "1").mkdir(parents=True, exist_ok=True)  # Triton wants a version dir
    (tmp / CATEGORIES / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(__file__).with_name("categories.py"), tmp / CATEGORIES / "1" / "model.py")
    if platform == "python":
        from .python_model import as_python_models

        as_python_models(tmp, configs, [ENCODER, *HEADS.values()], CATEGORIES)
    for name, text in configs.items():
        atomic_write_bytes(tmp / name / "config.pbtxt", text.encode())
    write_categories(bundle, tmp)
    identity = {**_identity(bundle, platform, precision),
                "files": sorted([*_written(tmp), f"{CATEGORIES}/{IDENTITY_FILE}"])}
    atomic_write_bytes(tmp / CATEGORIES / IDENTITY_FILE, json.dumps(identity).encode())


def _refresh_categories(bundle: Bundle, out: Path) -> None:
    """--categories-only: the category files rewritten, and recorded as written."""
    if not (out / CATEGORIES / "config.pbtxt").is_file():
        raise UsageError(f"{str(out)!r} is not a clipinspect model repository; write it "
                         "first without --categories-only")
    _check_same_bundle(bundle, out)
    write_categories(bundle, out)
    record = _read_identity(out) or {}
    if record.get("files"):
        below = out / CATEGORIES / "1" / "categories"
        added = [f"{CATEGORIES}/1/categories/{rel}" for rel in _written(below)]
        record["files"] = sorted({*record["files"], f"{CATEGORIES}/1/categories", *added})
        atomic_write_bytes(out / CATEGORIES / IDENTITY_FILE, json.dumps(record).encode())


def write_repository(bundle_path, out, *, platform: str = "onnx", precision: str = "fp32",
                     max_batch: int | None = None, overwrite: bool = False,
                     categories_only: bool = False, engine_key: str | None = None) -> Path:
    """Write the model repository; ``categories_only`` refreshes the category files of an
    existing repository written from the same bundle (what a running server picks up without
    a restart). ``max_batch``: the encoder's max_batch_size (None: 32 for onnx, the engines'
    profile maximum for tensorrt)."""
    bundle = Bundle.open(bundle_path)
    bundle.require_heads("a Triton model repository")
    out = Path(out)
    if platform not in PLATFORMS:
        raise UsageError(f"--platform {platform!r}: choose one of {', '.join(PLATFORMS)}")
    if max_batch is not None and max_batch < 1:
        raise UsageError(f"--max-batch {max_batch}: need at least 1")
    bundle.graph_path(precision, "encoder")  # unknown precision -> error naming the others
    if categories_only:
        _refresh_categories(bundle, out)
        return out
    _check_out_location(bundle, out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (out / ENCODER / "config.pbtxt").is_file():
            raise UsageError(f"{str(out)!r} exists, is not empty and is not a clipinspect model "
                             "repository; choose another --out")
        if not overwrite:
            raise UsageError(f"{str(out)!r} already holds a model repository; pass --overwrite "
                             "to replace it, or --categories-only to refresh the categories")
        _check_only_ours(out)
    record = _engine_record(bundle, precision, engine_key) if platform == "tensorrt" else None
    if record is not None:
        max_batch = engine_max_batch(record, max_batch, f"clipinspect build-engine {bundle.root} "
                                                        f"--precision {precision}")
    elif max_batch is None:
        max_batch = DEFAULT_MAX_BATCH
    # Written next to the target and swapped in whole: a failure leaves the old one intact.
    tmp = out.resolve().with_name(f".{out.resolve().name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_models(bundle, tmp, platform, precision, max_batch, record)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
