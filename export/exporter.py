"""Export an open_clip CLIP into a bundle (ONNX graphs + text embeddings + manifest): one
skeleton for every scoring method of ``methods``.

load CLIP -> the method builds encoder and heads -> ONNX graphs -> text per category (the
method's recipe) -> parity of onnxruntime against the torch modules -> manifest (one function,
``build_manifest``) -> moved into place. ``add_categories`` adds text to a bundle the same way.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from clipinspect.runtime.core.bundle import (Bundle, category_dir,
                                             check_category_dir_free, check_category_name,
                                             default_mode, file_entry, head_text_arrays,
                                             npz_bytes, sha256_file, write_versioned)
from clipinspect.runtime.core.manifest import (Category, Dims, GraphFile, Manifest, Model, Parity,
                                               Preprocess, parse)

from . import prompt_format
from .clip import RANDOM_WEIGHTS_WARNING, load_clip, package_versions, preprocess_config
from .defaults import (DEFAULT_MODEL, DEFAULT_PRETRAINED, FUSED_ATTENTION, PARITY_IMAGES,
                       PARITY_TOLERANCE)
from .errors import ExportError, log
from .graphs import (Probe, check_parity, example_text, export_graphs, input_size, judge_parity,
                     max_abs_diff)
from .methods import METHODS, Adaptation, Built, Clip, ExportMethod, method_options
from .text import load_ensemble

# An ensemble that expands to no prompt: a category's prompts are then its prompt file's alone.
NO_ENSEMBLE = {"templates": [], "normal_states": [], "anomalous_states": []}

__all__ = ["DEFAULT_MODEL", "DEFAULT_PRETRAINED", "PARITY_TOLERANCE", "RANDOM_WEIGHTS_WARNING",
           "ExportError", "ExportOptions", "TextRecipe", "add_categories", "build_manifest",
           "export_bundle", "load_clip", "log", "max_abs_diff", "write_category_text"]


@dataclass
class ExportOptions:
    """What ``export_bundle`` writes.

    method: a key of ``methods.METHODS``; method_options: that method's own options by name
    (e.g. {"scales": [2, 3]}, {"dense_blocks": 2}, {"adapters": "none"}; None values = the
    method's default; another method's option is refused). adaptation: contextual prompt
    adaptation in the heads (with the ambiguity filter at export), None = off. prompts: a prompt
    file whose descriptions join the ensemble of the categories it names; with ``ensemble``
    False they replace it (the file's prompts alone, recorded in the manifest as
    ``prompt_ensemble: false``; every category then needs both states in the file). pretrained: an
    open_clip tag, a checkpoint file, or None for seeded random weights (warned about unless
    ``warn_random`` is False: a caller that has said so already). parity_images: how many
    unseen random images the export-time parity check runs (each one a full eager pass, the
    slow part of exporting a large model). sub_steps: the export is one numbered step of a
    caller's (the demo's): its own steps are logged indented, unnumbered. fused_attention: also write the onnxruntime-only
    encoder with attention as onnxruntime's fused operator (``graphs.fp32.encoder_fused``, which
    onnxruntime's CPU provider then runs), checked against PyTorch like the standard one.
    """

    out: str | Path
    model: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED
    categories: Sequence[str] = ()
    method: str = "winclip"
    method_options: dict[str, Any] = field(default_factory=dict)
    adaptation: Adaptation | None = None
    prompts: str | Path | None = None
    ensemble: bool = True
    opset: int = 17
    tolerance: float = PARITY_TOLERANCE
    strict: bool = True
    parity_images: int = PARITY_IMAGES
    fused_attention: bool = FUSED_ATTENTION
    overwrite: bool = False
    seed: int = 0
    warn_random: bool = True
    sub_steps: bool = False


@dataclass(frozen=True)
class TextRecipe:
    """Everything a category's text embeddings come from: the method's recipe
    (``ExportMethod.category_text``) and its ensemble, a loaded prompt file (``_prompt_file``)
    or None, the bundle's adaptation record or None."""

    model: torch.nn.Module
    tokenizer: Callable
    compute: Callable[..., tuple[dict, dict]]
    ensemble: dict
    descriptions: dict | None = None
    adaptation: dict | None = None

    @classmethod
    def of(cls, method: ExportMethod, model, tokenizer, descriptions: dict | None,
           adaptation: dict | None, *, ensemble: bool = True) -> "TextRecipe":
        return cls(model, tokenizer, method.category_text,
                   load_ensemble(method.ensemble) if ensemble else NO_ENSEMBLE,
                   descriptions, adaptation)


def export_bundle(options: ExportOptions) -> Bundle:
    """Export a bundle to ``options.out``. Written to a temporary directory next to it and moved
    into place only when complete, so a failure never leaves a half bundle behind."""
    method, own_options, descriptions = _checked(options)
    out, t_start = Path(options.out), time.perf_counter()

    def step(k: int | None, text: str) -> None:
        log(f"  {text}" if options.sub_steps else f"[{k}/5] {text}" if k else text)

    step(1, f"loading {options.model} (weights: {options.pretrained or 'random'})")
    clip = Clip(options.model, *load_clip(options.model, options.pretrained, options.seed,
                                          warn_random=options.warn_random),
                seed=options.seed)
    try:
        built = method.build(clip, own_options, options.adaptation)
    except ValueError as e:  # an option the model cannot take (e.g. more dense blocks than it has)
        raise ExportError(f"method {method.name!r} on {options.model}: {e}") from e
    recipe = TextRecipe.of(method, clip.model, clip.tokenizer, descriptions,
                           built.adaptation.to_dict() if built.adaptation else None,
                           ensemble=options.ensemble)
    with _staging(out) as tmp:
        step(2, f"exporting ONNX graphs (opset {options.opset})")
        probe = Probe.of(built.encoder, options.parity_images)
        files = export_graphs(built, tmp, options.opset, probe, options.fused_attention)
        text_entries = {}
        for i, name in enumerate(options.categories):
            step(3, f"text embeddings for {name!r} ({i + 1}/{len(options.categories)})")
            text_entries[name] = write_category_text(tmp, name, recipe)
        step(4, "checking onnxruntime against PyTorch")
        text = _parity_text(tmp, built, text_entries, int(clip.model.visual.output_dim))
        parity = judge_parity(check_parity(tmp, files, built, text, probe), options.tolerance,
                              options.strict, len(probe.images))
        step(5, "writing manifest")
        manifest = build_manifest(options, clip, built, parity, text_entries)
        write_manifest_and_move(tmp, out, manifest, files, options.overwrite)
    step(None, f"bundle written to {out} in {time.perf_counter() - t_start:.0f} s")
    return Bundle.open(out)


def _checked(options: ExportOptions) -> tuple[ExportMethod, dict, dict | None]:
    """Everything that can be refused before CLIP is loaded -> (method, its resolved options,
    the loaded prompt file or None)."""
    names = [check_category_name(c) for c in options.categories]
    for i, name in enumerate(names):
        check_category_dir_free(names[:i], name)
    try:
        own = method_options(options.method, options.method_options)
    except ValueError as e:
        raise ExportError(str(e)) from e
    method = METHODS[options.method]
    if not method.prompt_adaptation:
        other = [f for f, v in (("--adapt", options.adaptation), ("--prompts", options.prompts),
                                ("--no-ensemble", None if options.ensemble else True))
                 if v is not None]
        if other:
            raise ExportError(f"{', '.join(other)} do not apply to --method {method.name} (it "
                              "uses its own prompt recipe)")
    try:
        method.check(own)
    except ValueError as e:
        raise ExportError(str(e)) from e
    _check_adaptation(options.adaptation)
    descriptions = _prompt_file(options.prompts, names)
    _check_needed_prompts(method, descriptions, names)
    if not options.ensemble:
        _check_file_only(descriptions, names)
    if isinstance(options.parity_images, bool) or not isinstance(options.parity_images, int) \
            or options.parity_images < 1:
        raise ExportError(f"parity_images {options.parity_images!r}: expected a whole number "
                          ">= 1 (the unseen images the parity check runs)")
    if options.opset < 17:
        raise ExportError(f"--opset {options.opset} is too old: LayerNormalization needs "
                          "opset >= 17")
    out = Path(options.out)
    if out.exists() and not options.overwrite and any(out.iterdir()):
        raise ExportError(f"{str(out)!r} exists and is not empty; choose another --out or pass "
                          "--overwrite")
    return method, own, descriptions


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A private temporary directory next to ``out``, removed if the block fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(default_mode(directory=True))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _parity_text(root: Path, built: Built, entries: dict[str, dict], dim: int
                 ) -> dict[str, torch.Tensor]:
    """The heads' text inputs for the parity check: the first category's, else random ones."""
    if not entries:
        return example_text(built.heads["head_zeroshot"], dim)
    with np.load(root / next(iter(entries.values()))["text"]["file"]) as t:
        return {k: torch.from_numpy(v) for k, v in head_text_arrays(t).items()}


def build_manifest(options: ExportOptions, clip: Clip, built: Built, parity: dict,
                   categories: dict[str, dict]) -> Manifest:
    """The bundle's manifest (``graphs`` filled in when written): what every method records,
    and the method's own typed section (``Built.section``)."""
    encoder, visual = built.encoder, clip.model.visual
    grid = tuple(int(g) for g in encoder.grid)
    where = f"exported bundle {str(options.out)!r}"
    return Manifest(
        method=options.method, section=built.section, adaptation=built.adaptation,
        temperature=built.temperature,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        model=parse(Model, {"name": clip.name, "weights": clip.weights}, where, "model"),
        preprocess=parse(Preprocess, {**preprocess_config(clip.model),
                                      "size": list(input_size(encoder))}, where, "preprocess"),
        grid=grid, patch_size=int(visual.patch_size[0]), outputs=encoder.output_names(),
        dims=Dims(int(visual.output_dim), int(visual.conv1.out_channels), grid[0] * grid[1],
                  len(visual.transformer.resblocks)),
        opset=options.opset, graphs={}, parity={"fp32": parse(Parity, parity, where, "parity")},
        versions=package_versions(), prompt_ensemble=options.ensemble,
        categories={n: parse(Category, e, where, f"categories.{n}")
                    for n, e in categories.items()})


def write_manifest_and_move(tmp: Path, out: Path, manifest: Manifest, files: dict[str, str],
                            overwrite: bool) -> None:
    """Record the graphs (with their input and output names), write the manifest of the bundle
    built in ``tmp`` and move it to ``out``. The manifest is validated as a reader would
    (``Manifest.from_dict`` of its JSON form) and written with the bundle's atomic save."""
    where = f"exported bundle {str(out)!r}"
    manifest.graphs["fp32"] = {
        name: parse(GraphFile, file_entry(tmp, rel, inputs=_io_names(tmp / rel, "inputs"),
                                          outputs=_io_names(tmp / rel, "outputs")),
                    where, f"graphs.fp32.{name}")
        for name, rel in files.items()}
    Bundle(tmp, Manifest.from_dict(manifest.to_dict(), where)).save_manifest()
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


def _check_adaptation(adaptation: Adaptation | None) -> None:
    if adaptation is None:
        return
    if not adaptation.tau > 0:
        raise ExportError(f"--tau-ctx {adaptation.tau!r}: the adaptation temperature must be > 0 "
                          "(e.g. 0.01)")
    if adaptation.top_k is not None and adaptation.top_k < 1:
        raise ExportError(f"--top-k {adaptation.top_k!r}: keep at least 1 prompt per state, or "
                          "leave --top-k out to weight all")


def _check_file_only(descriptions: dict | None, categories: Sequence[str]) -> None:
    """Without the ensemble every category takes both states' prompts from the file."""
    if descriptions is None:
        raise ExportError("--no-ensemble leaves only the prompt file's descriptions: pass "
                          "--prompts FILE")
    short = [f"{c!r} ({s})" for c in categories for s in ("normal", "anomalous")
             if not descriptions["categories"].get(c, {}).get(s)]
    if short:
        raise ExportError(f"--no-ensemble: prompt file {descriptions['file']!r} has no "
                          f"descriptions for {', '.join(short)}; add them or keep the ensemble")


def _prompt_file(path: str | Path | None, categories: Sequence[str]) -> dict | None:
    """The validated prompt file with its identity (None without one); says which categories
    get no descriptions from it, since that is easy to get wrong (a typo in a name)."""
    if path is None:
        return None
    entries = prompt_format.load(path)
    missing = [c for c in categories if c not in entries]
    if missing:
        log(f"note: prompt file {str(path)!r} has no descriptions for "
            f"{', '.join(map(repr, missing))}; they use the ensemble only (file has: "
            f"{', '.join(map(repr, entries))})")
    return {"file": str(Path(path).resolve()), "sha256": sha256_file(Path(path)),
            "categories": entries}


def _check_needed_prompts(method: ExportMethod, descriptions: dict | None,
                          categories: Sequence[str]) -> None:
    """A method that needs a prompt file (``needs_prompt_file``) gets one describing every
    category, or the error says what to run to get it; checked before CLIP is loaded."""
    if not method.needs_prompt_file:
        return
    given = (descriptions or {}).get("categories", {})
    missing = [c for c in categories if c not in given]
    if descriptions is None or missing:
        where = ("no --prompts FILE given" if descriptions is None else
                 f"prompt file {descriptions['file']!r} does not describe "
                 f"{', '.join(map(repr, missing))}")
        raise ExportError(f"{where}. " + method.missing_prompts(missing or categories))


def write_category_text(root: Path, name: str, recipe: TextRecipe) -> dict:
    """Write a category's text embeddings and prompts; returns its manifest entry."""
    descriptions = recipe.descriptions
    entry_descriptions = (descriptions or {}).get("categories", {}).get(name)
    try:
        arrays, record = recipe.compute(recipe.model, recipe.tokenizer, name, recipe.ensemble,
                                        entry_descriptions, recipe.adaptation)
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
    """Add categories' text embeddings to an existing bundle (reloads the same CLIP weights),
    with the recipe of the bundle's method. ``prompts``: a prompt file whose descriptions join
    the ensemble, as at export."""
    bundle = Bundle.open(bundle_path)
    method = METHODS[bundle.method.name]
    names = [check_category_name(n) for n in names]
    # Every folder written, the lock and the manifest: confined before CLIP is even loaded.
    bundle.check_writable(*(category_dir(n) for n in names))
    existing = [n for n in names if n in bundle.manifest.categories]
    if existing and not replace:
        raise ExportError(f"category {existing[0]!r} is already in the bundle; pass --replace to "
                          "recompute its text embeddings")
    if prompts is not None and not method.prompt_adaptation:
        raise ExportError(f"--prompts does not apply to an {method.name} bundle (it uses its own "
                          "prompt recipe)")
    descriptions = _prompt_file(prompts, names)
    _check_needed_prompts(method, descriptions, names)
    ensemble = bundle.manifest.prompt_ensemble
    if not ensemble:
        _check_file_only(descriptions, names)
    model, tokenizer = _same_clip(bundle, pretrained)
    adaptation = bundle.manifest.adaptation
    method.text_tower(model, bundle.manifest)  # the text tower as the bundle's export ran it
    recipe = TextRecipe.of(method, model, tokenizer, descriptions,
                           adaptation.to_dict() if adaptation else None, ensemble=ensemble)
    for name in names:
        check_category_dir_free(bundle.manifest.categories, name)
        progress(f"text embeddings for {name!r}")
        bundle.set_category(name, write_category_text(bundle.root, name, recipe))
    return bundle


def _same_clip(bundle: Bundle, pretrained: str | None) -> tuple[torch.nn.Module, Callable]:
    """(model, tokenizer) with the weights the bundle was exported with, proven by the recorded
    checkpoint hash and text-tower fingerprint; ``pretrained`` where the checkpoint is now."""
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
    return model, tokenizer
