"""Export an open_clip CLIP into a bundle (ONNX graphs + text embeddings + manifest) for one of
the scoring methods of ``methods.py``."""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from clipinspect.runtime.core.errors import ClipInspectError
from clipinspect.runtime.core.bundle import (FORMAT_NAME, FORMAT_VERSION, Bundle,
                                        category_dir, check_category_dir_free,
                                        check_category_name, default_mode, file_entry,
                                        head_text_arrays, npz_bytes, sha256_file, write_versioned)
from clipinspect.runtime.core.manifest import Manifest

from . import prompt_files
from .methods import METHODS, method_options
from .text import category_text, encode_texts, load_ensemble
from .winclip_torch import TEMPERATURE, Adaptation

DEFAULT_MODEL = "ViT-B-16-plus-240"
DEFAULT_PRETRAINED = "laion400m_e31"
PARITY_TOLERANCE = 1e-4
PARITY_IMAGES = 3
PROBE_PROMPT = "a photo of an object."
RANDOM_WEIGHTS_WARNING = (
    "WARNING: exporting with RANDOM weights (--pretrained none). Scores and maps are meaningless "
    "for inspection; use this only for tests and benchmarks. The bundle records it.")


class ExportError(ClipInspectError, RuntimeError):
    """Export cannot go on; the message says what to change."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("clipinspect", "torch", "open_clip_torch", "onnx", "onnxruntime",
                 "onnxruntime-gpu", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


# ----------------------------------------------------------------------------- model loading
def load_clip(model_name: str, pretrained: str | None, seed: int = 0):
    """-> (model in eval mode, tokenizer, weights record for the manifest).

    pretrained: an open_clip tag, a local open_clip checkpoint file, or None / "none" for a
    seeded random init (recorded, and warned about).
    """
    import open_clip

    if model_name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if model_name.lower()[:5] in m.lower()][:8]
        raise ExportError(f"unknown open_clip model {model_name!r}"
                          + (f"; similar: {', '.join(close)}" if close else "")
                          + ". See open_clip.list_models()")
    if pretrained in (None, "", "none", "None"):
        log(RANDOM_WEIGHTS_WARNING)
        torch.manual_seed(seed)
        with _quiet_loggers("root"):
            model = open_clip.create_model(model_name, pretrained=None)
        weights = {"kind": "random", "seed": seed}
    elif os.path.isfile(pretrained):
        try:
            model = open_clip.create_model(model_name, pretrained=pretrained)
        except Exception as e:  # open_clip raises several types for a wrong checkpoint
            raise ExportError(f"could not load checkpoint {pretrained!r} into {model_name}: {e}. "
                              "Is it an open_clip checkpoint of this model?") from e
        weights = {"kind": "file", "path": str(Path(pretrained).resolve()),
                   "sha256": sha256_file(Path(pretrained))}
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            hint = f"known tags for {model_name}: {', '.join(tags) or 'none'}"
            if os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors")):
                hint = f"no such file ({hint})"
            raise ExportError(f"--pretrained {pretrained!r} is neither a local checkpoint file nor "
                              f"an open_clip tag; {hint}; or 'none' for random weights")
        try:
            with _quiet_loggers("huggingface_hub"):  # its retry warnings; our error says more
                model = open_clip.create_model(model_name, pretrained=pretrained)
        except Exception as e:
            raise ExportError(
                f"could not load pretrained weights {model_name}/{pretrained}: {e}. Without "
                "internet access, download the checkpoint elsewhere and pass its path with "
                "--pretrained PATH (or --pretrained none for random weights)") from e
        weights = {"kind": "tag", "tag": pretrained}
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    weights["text_probe"] = text_probe(model, tokenizer)
    return model, tokenizer, weights


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """Silence other libraries' warnings where ours say more (random init, download retries)."""
    import logging

    loggers = [logging.getLogger(None if n == "root" else n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def text_probe(model, tokenizer) -> list[float]:
    """A fingerprint of the text tower: lets add-category prove it loaded the same weights."""
    return [round(float(v), 6) for v in encode_texts(model, tokenizer, [PROBE_PROMPT])[0, :16]]


def preprocess_config(model) -> dict:
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = model.visual.image_size
    size = [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    return {"size": size, "mean": [float(v) for v in cfg.get("mean", OPENAI_DATASET_MEAN)],
            "std": [float(v) for v in cfg.get("std", OPENAI_DATASET_STD)],
            "resize": "bicubic-antialiased, whole image, no crop", "layout": "NCHW float32 RGB"}


# ------------------------------------------------------------------------------- ONNX export
def _export(module: torch.nn.Module, args: tuple, path: Path, input_names: list[str],
            output_names: list[str], dynamic_axes: dict, opset: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python values
        torch.onnx.export(module, args, str(path), input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes,
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    import onnx
    onnx.checker.check_model(str(path))


def input_size(encoder: torch.nn.Module) -> tuple[int, int]:
    """(H, W) the encoder takes: its own when it resamples positions (aprillab), else CLIP's."""
    size = getattr(encoder, "image_size", None) or encoder.visual.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


def export_graphs(encoder: torch.nn.Module, heads: dict[str, torch.nn.Module], root: Path,
                  opset: int) -> dict[str, str]:
    """Write fp32/encoder.onnx and fp32/head_*.onnx; returns name -> relative path."""
    example = torch.randn(2, 3, *input_size(encoder))
    outs = encoder.output_names()
    files = {"encoder": "fp32/encoder.onnx"}
    _export(encoder, (example,), root / files["encoder"], ["images"], outs,
            {"images": {0: "batch"}, **{n: {0: "batch"} for n in outs}}, opset)
    with torch.no_grad():
        encoded = dict(zip(outs, encoder(example)))
    for name, head in heads.items():
        inputs = head_example_inputs(head, encoded)
        axes = {n: ({0: n} if n.startswith("memory_") or n in ("text_normal", "text_anomalous")
                    else {} if n == "text_prototypes" else {0: "batch"}) for n in inputs}
        axes.update(image_score={0: "batch"}, anomaly_grid={0: "batch"})
        files[name] = f"fp32/{name}.onnx"
        _export(head, tuple(inputs.values()), root / files[name], list(inputs),
                ["image_score", "anomaly_grid"], axes, opset)
    return files


def example_text(head: torch.nn.Module, dim: int) -> dict[str, torch.Tensor]:
    """Random category text for a head: prototypes (2, D), or prompt pools of two different
    sizes (so the traced graph keeps them dynamic), each at least top-k long."""
    gen = torch.Generator().manual_seed(1)
    if getattr(head, "adaptation", None) is None:
        return {"text_prototypes": torch.randn(2, dim, generator=gen)}
    n = (head.adaptation.top_k or 1) + 4
    return {"text_normal": torch.randn(n + 1, dim, generator=gen),
            "text_anomalous": torch.randn(n, dim, generator=gen)}


def head_example_inputs(head: torch.nn.Module, encoded: dict[str, torch.Tensor],
                        text: dict[str, torch.Tensor] | None = None,
                        memory: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The head's inputs by name: encoder outputs, category text, few-shot memory (``memory_X``
    holds encoder output X of reference images, flattened over images)."""
    if text is None:
        text = example_text(head, encoded["image_embedding"].shape[-1])
    if memory is None:
        # Memory of a *different* shape from the batch, so the traced graph keeps it dynamic.
        memory = {n: encoded[n[len("memory_"):]][:1].flatten(0, 1) for n in head.input_names()
                  if n.startswith("memory_")}
    pool = {**encoded, **text, **memory}
    return {n: pool[n] for n in head.input_names()}


# ------------------------------------------------------------------------------- parity check
def check_parity(root: Path, files: dict[str, str], encoder: torch.nn.Module,
                 heads: dict[str, torch.nn.Module], text: dict[str, torch.Tensor],
                 n_images: int = PARITY_IMAGES,
                 seed: int = 123) -> dict:
    """Run onnxruntime and the torch modules on the same inputs; max |difference| per graph."""
    import onnxruntime as ort

    size = input_size(encoder)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, 3, *size, generator=gen)
    references = torch.randn(2, 3, *size, generator=gen)
    names = encoder.output_names()

    def session(name):
        return ort.InferenceSession(str(root / files[name]), providers=["CPUExecutionProvider"])

    enc = session("encoder")
    with torch.no_grad():
        torch_out = dict(zip(names, encoder(images)))
        torch_ref = dict(zip(names, encoder(references)))
    ort_out = dict(zip(names, enc.run(None, {"images": images.numpy()})))
    result = {"encoder": max(max_abs_diff(ort_out[n], torch_out[n].numpy()) for n in names)}
    memory = {f"memory_{n}": torch_ref[n].flatten(0, 1) for n in names}
    for name, head in heads.items():
        inputs = head_example_inputs(head, torch_out, text, memory)
        with torch.no_grad():
            expected = [t.numpy() for t in head(*inputs.values())]
        got = session(name).run(None, {k: v.numpy() for k, v in inputs.items()})
        result[name] = max(max_abs_diff(g, e) for g, e in zip(got, expected))
    return result


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b|; infinity where either side is not finite (a NaN must fail the check)."""
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    return float(np.abs(a - b).max())


# ------------------------------------------------------------------------------------ bundle
def export_bundle(out: str | Path, model_name: str = DEFAULT_MODEL,
                  pretrained: str | None = DEFAULT_PRETRAINED, categories: Sequence[str] = (),
                  scales: Sequence[int] | None = None, opset: int = 17,
                  tolerance: float = PARITY_TOLERANCE, strict: bool = True,
                  overwrite: bool = False, seed: int = 0, method: str = "winclip",
                  options: dict | None = None, adaptation: Adaptation | None = None,
                  prompts: str | Path | None = None) -> Bundle:
    """Export a bundle to ``out``. Written to a temporary directory next to it and moved into
    place only when complete, so a failure never leaves a half bundle behind.

    method: a key of ``methods.METHODS`` ("winclip", "patch"); options: the method's options
    (e.g. {"dense_blocks": 2} for patch; None values = the method's default); ``scales`` is
    WinCLIP's option, kept as an argument of its own. adaptation: contextual
    prompt adaptation in the heads (with the ambiguity filter at export), None = off.
    prompts: a prompt file whose descriptions join the ensemble of the categories it names.
    """
    out = Path(out)
    categories = [check_category_name(c) for c in categories]
    for i, name in enumerate(categories):
        check_category_dir_free(categories[:i], name)
    options = _method_options(method, {**(options or {}), "scales": scales})
    _check_adaptation(adaptation)
    descriptions = _prompt_file(prompts, categories)
    if opset < 17:
        raise ExportError(f"--opset {opset} is too old: LayerNormalization needs opset >= 17")
    if out.exists() and not overwrite and any(out.iterdir()):
        raise ExportError(f"{str(out)!r} exists and is not empty; choose another --out or pass "
                          "--overwrite")
    t_start = time.perf_counter()
    log(f"[1/5] loading {model_name} (weights: {pretrained or 'random'})")
    model, tokenizer, weights = load_clip(model_name, pretrained, seed)
    grid = tuple(int(g) for g in model.visual.grid_size)
    bad = [k for k in options.get("scales", ()) if not 1 <= k <= min(grid)]
    if bad:
        raise ExportError(f"window scale {bad[0]} does not fit the {grid[0]}x{grid[1]} patch grid "
                          f"of {model_name}; use scales from 1 to {min(grid)} (WinCLIP: 2,3)")
    try:
        encoder = METHODS[method].encoder(model.visual, **options).eval()
    except ValueError as e:  # an option the model cannot take (e.g. more dense blocks than it has)
        raise ExportError(f"method {method!r} on {model_name}: {e}") from e
    heads = {"head_zeroshot": METHODS[method].head(encoder, False, adaptation).eval(),
             "head_fewshot": METHODS[method].head(encoder, True, adaptation).eval()}
    scales = tuple(getattr(encoder, "scales", ()))
    adaptation_record = adaptation.record() if adaptation else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(default_mode(directory=True))
    try:
        log(f"[2/5] exporting ONNX graphs (opset {opset})")
        files = export_graphs(encoder, heads, tmp, opset)
        ensemble = load_ensemble("winclip")
        text_entries = {}
        for i, name in enumerate(categories):
            log(f"[3/5] text embeddings for {name!r} ({i + 1}/{len(categories)})")
            text_entries[name] = write_category_text(tmp, model, tokenizer, name, ensemble,
                                                     descriptions, adaptation_record)
        log("[4/5] checking onnxruntime against PyTorch")
        if categories:
            with np.load(tmp / text_entries[categories[0]]["text"]["file"]) as t:
                text = {k: torch.from_numpy(v) for k, v in head_text_arrays(t).items()}
        else:
            text = example_text(heads["head_zeroshot"], model.visual.output_dim)
        parity = judge_parity(check_parity(tmp, files, encoder, heads, text), tolerance, strict)
        log("[5/5] writing manifest")
        manifest = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "method": method,
            "method_options": {k: list(v) if isinstance(v, tuple) else v
                               for k, v in options.items()},
            "adaptation": adaptation_record,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {"name": model_name, "weights": weights},
            "preprocess": preprocess_config(model),
            "grid": list(encoder.grid), "patch_size": int(model.visual.patch_size[0]),
            "scales": list(scales),
            "windows": {str(k): int(getattr(encoder, f"windows_{k}").shape[0]) for k in scales},
            "outputs": encoder.output_names(),
            "dims": {"embed": int(model.visual.output_dim),
                     "width": int(model.visual.conv1.out_channels),
                     "patches": encoder.grid[0] * encoder.grid[1],
                     "layers": len(model.visual.transformer.resblocks)},
            "temperature": TEMPERATURE,
            "opset": opset,
            "graphs": {},
            "parity": {"fp32": parity},
            "versions": package_versions(),
            "categories": text_entries,
        }
        write_manifest_and_move(tmp, out, manifest, files, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"bundle written to {out} in {time.perf_counter() - t_start:.0f} s")
    return Bundle.open(out)


def judge_parity(parity: dict[str, float], tolerance: float, strict: bool) -> dict:
    """The manifest's parity record of the measured differences; raises when they exceed the
    tolerance and ``strict``."""
    worst = max(parity.values())
    passed = bool(np.isfinite(worst)) and worst <= tolerance
    log("      max |onnxruntime - torch|: " + ", ".join(f"{k} {v:.2e}" for k, v in
                                                         parity.items()))
    if not passed and strict:
        raise ExportError(f"exported graphs differ from PyTorch by {worst:.3e} > {tolerance:g} "
                          "(FP32); pass --no-strict-parity to keep them anyway")
    return {"max_abs_diff": parity, "tolerance": tolerance, "passed": passed,
            "images": PARITY_IMAGES, "reference": "the torch modules the graphs were traced from"}


def write_manifest_and_move(tmp: Path, out: Path, manifest: dict, files: dict[str, str],
                            overwrite: bool) -> None:
    """Record the graphs (with their input and output names), write the manifest of the bundle
    built in ``tmp`` and move it to ``out``."""
    manifest["graphs"]["fp32"] = {
        name: file_entry(tmp, rel, inputs=_io_names(tmp / rel, "inputs"),
                         outputs=_io_names(tmp / rel, "outputs"))
        for name, rel in files.items()}
    Bundle(tmp, Manifest.from_dict(manifest, f"exported bundle {str(out)!r}")).save_manifest()
    _move_into_place(tmp, out, overwrite)


def _io_names(path: Path, which: str) -> list[str]:
    import onnx
    graph = onnx.load(str(path), load_external_data=False).graph
    return [v.name for v in (graph.input if which == "inputs" else graph.output)]


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite and any(out.iterdir()):
            raise ExportError(f"{str(out)!r} appeared while exporting; not overwriting it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)  # put the previous bundle back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _method_options(method: str, given: dict) -> dict:
    if method not in METHODS:
        raise ExportError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    try:
        options = method_options(method, given)
    except ValueError as e:
        raise ExportError(str(e)) from e
    if "scales" in options:
        options["scales"] = tuple(sorted({int(k) for k in options["scales"]}))
    return options


def _check_adaptation(adaptation: Adaptation | None) -> None:
    if adaptation is None:
        return
    if not adaptation.tau > 0:
        raise ExportError(f"--tau-ctx {adaptation.tau!r}: the adaptation temperature must be > 0 "
                          "(e.g. 0.01)")
    if adaptation.top_k is not None and adaptation.top_k < 1:
        raise ExportError(f"--top-k {adaptation.top_k!r}: keep at least 1 prompt per state, or "
                          "leave --top-k out to weight all")


def _prompt_file(path: str | Path | None, categories: Sequence[str]) -> dict | None:
    """The validated prompt file with its identity (None without one); says which categories
    get no descriptions from it, since that is easy to get wrong (a typo in a name)."""
    if path is None:
        return None
    entries = prompt_files.load(path)
    missing = [c for c in categories if c not in entries]
    if missing:
        log(f"note: prompt file {str(path)!r} has no descriptions for "
            f"{', '.join(map(repr, missing))}; they use the ensemble only (file has: "
            f"{', '.join(map(repr, entries))})")
    return {"file": str(Path(path).resolve()), "sha256": sha256_file(Path(path)),
            "categories": entries}


def write_category_text(root: Path, model, tokenizer, name: str, ensemble: dict,
                        descriptions: dict | None = None, adaptation: dict | None = None,
                        compute: Callable | None = None) -> dict:
    """Write a category's text embeddings and prompts; returns its manifest entry.

    descriptions: a loaded prompt file (``_prompt_file``) or None; adaptation: the bundle's
    adaptation record or None (then no prompt pools and no ambiguity filter). compute: a
    method's own text recipe, (model, tokenizer, name, ensemble) -> (arrays, prompt record),
    which takes neither (aprillab)."""
    entry_descriptions = (descriptions or {}).get("categories", {}).get(name)
    try:
        if compute is not None:
            arrays, record = compute(model, tokenizer, name, ensemble)
        else:
            arrays, record = category_text(model, tokenizer, name, ensemble, entry_descriptions,
                                           adaptation)
    except ValueError as e:
        raise ExportError(str(e)) from e
    folder = category_dir(name)
    text = write_versioned(root, folder, "text.npz", npz_bytes(arrays))
    prompts = write_versioned(root, folder, "prompts.json",
                              (json.dumps(record, indent=1) + "\n").encode())
    source = None
    if entry_descriptions:
        source = {"file": descriptions["file"], "sha256": descriptions["sha256"],
                  **{f"n_{s}": len(v) for s, v in entry_descriptions.items()}}
    dropped = record.get("dropped_by_ambiguity_filter")
    return {"text": file_entry(root, text), "prompts": file_entry(root, prompts),
            "n_normal_prompts": len(record["normal"]),
            "n_anomalous_prompts": len(record["anomalous"]),
            "prompt_file": source, "ambiguity_filter_dropped": dropped,
            "memory": None, "thresholds": None}


def add_categories(bundle_path: str | Path, names: Sequence[str], pretrained: str | None = None,
                   replace: bool = False, progress: Callable[[str], None] = log,
                   prompts: str | Path | None = None) -> Bundle:
    """Add categories' text embeddings to an existing bundle (reloads the same CLIP weights).
    ``prompts``: a prompt file whose descriptions join the ensemble, as at export."""
    bundle = Bundle.open(bundle_path)
    names = [check_category_name(n) for n in names]
    existing = [n for n in names if n in bundle.manifest.categories]
    if existing and not replace:
        raise ExportError(f"category {existing[0]!r} is already in the bundle; pass --replace to "
                          "recompute its text embeddings")
    descriptions = _prompt_file(prompts, names)
    model_name = bundle.manifest.model.name
    weights = bundle.manifest.model.weights
    source = pretrained or {"tag": weights.tag, "file": weights.path, "random": None}[weights.kind]
    if weights.kind == "file" and pretrained is None and not os.path.isfile(source or ""):
        raise ExportError(f"the checkpoint this bundle was exported from, {source!r}, is not there; "
                          "pass its new location with --pretrained PATH")
    model, tokenizer, loaded = load_clip(model_name, source, seed=weights.seed or 0)
    if weights.kind == "file" and loaded.get("sha256") != weights.sha256:
        raise ExportError(f"checkpoint {source!r} is not the one this bundle was exported from "
                          "(sha256 differs)")
    if not np.allclose(loaded["text_probe"], weights.text_probe, rtol=1e-3, atol=1e-4):
        raise ExportError("the loaded CLIP weights are not the ones this bundle was exported with "
                          "(text-tower fingerprint differs); pass the right --pretrained")
    if bundle.manifest.method == "aprillab":
        if descriptions is not None:
            raise ExportError("--prompts does not apply to an aprillab bundle (it uses its own "
                              "prompt recipe)")
        from .aprillab import write_text
    else:
        ensemble = load_ensemble("winclip")
        adaptation = bundle.manifest.adaptation.to_dict() if bundle.manifest.adaptation else None

        def write_text(root, model, tokenizer, name):
            return write_category_text(root, model, tokenizer, name, ensemble, descriptions,
                                       adaptation)
    for name in names:
        check_category_dir_free(bundle.manifest.categories, name)
        progress(f"text embeddings for {name!r}")
        bundle.set_category(name, write_text(bundle.root, model, tokenizer, name))
    return bundle
