"""Export an open_clip CLIP into an AprilLab bundle (``"method": "aprillab"``, METHODS.md
section 4): encoder with intermediate levels, scoring heads holding the per-level projections,
text embeddings of the AprilLab prompt ensemble, manifest with the measured parity."""

from __future__ import annotations

import datetime as _dt
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from clipinspect.runtime.core.bundle import (FORMAT_NAME, FORMAT_VERSION, Bundle,
                                        check_category_dir_free, check_category_name, default_mode,
                                        sha256_file)

from .aprillab_torch import (LOGIT_SCALE, AprilLabEncoder, AprilLabHead, LevelProjections,
                             check_layers, default_layers, projection_state, text_prototypes)
from .exporter import (PARITY_TOLERANCE, ExportError, check_parity, export_graphs,
                       judge_parity, load_clip, log, package_versions, preprocess_config,
                       write_category_text, write_manifest_and_move)
from .text import encode_texts, expand_prompts, load_ensemble

METHOD = "aprillab"
RANDOM_PROJECTIONS_WARNING = (
    "WARNING: AprilLab projections are RANDOM (--adapters none): maps are meaningless until "
    "they are trained (clipinspect train-adapters). The bundle records it.")


def category_text(model, tokenizer, category: str, ensemble: dict) -> tuple[dict, dict]:
    """Arrays for ``text.npz`` and the prompt record of one category, AprilLab recipe:
    prototypes (2, D) = per state, the normalized mean of the normalized prompt embeddings."""
    normal, anomalous = expand_prompts(category, ensemble)
    e_normal = encode_texts(model, tokenizer, normal)
    e_anomalous = encode_texts(model, tokenizer, anomalous)
    prototypes = text_prototypes(torch.from_numpy(e_normal), torch.from_numpy(e_anomalous))
    arrays = {"prototypes": prototypes.numpy().astype(np.float32),
              "normal_embeddings": e_normal, "anomalous_embeddings": e_anomalous}
    return arrays, {"category": category, "normal": normal, "anomalous": anomalous}


def write_text(root: Path, model, tokenizer, name: str) -> dict:
    return write_category_text(root, model, tokenizer, name, load_ensemble(METHOD),
                               compute=category_text)


def require_adapters(adapters: str | Path | None) -> None:
    if adapters in (None, ""):
        raise ExportError("the aprillab method needs its per-level projections: pass --adapters "
                          "FILE (written by 'clipinspect train-adapters', or APRIL-GAN's "
                          "checkpoint), or --adapters none for random ones (tests only)")


def load_projections(adapters: str | Path | None, width: int, dim: int, layers: Sequence[int],
                     model_name: str, seed: int = 0) -> tuple[LevelProjections, dict]:
    """-> (projections, manifest record). ``adapters``: a checkpoint file (APRIL-GAN's form or
    train-adapters'), or "none" for a seeded random init (warned, recorded)."""
    require_adapters(adapters)
    if str(adapters).lower() == "none":
        log(RANDOM_PROJECTIONS_WARNING)
        torch.manual_seed(seed)
        return LevelProjections(width, dim, len(layers)).eval(), {"kind": "random", "seed": seed}
    path = Path(adapters)
    if not path.is_file():
        raise ExportError(f"adapter checkpoint {str(adapters)!r} does not exist; pass the file written "
                          "by 'clipinspect train-adapters' (or APRIL-GAN's), or 'none'")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        raise ExportError(f"could not read adapter checkpoint {str(adapters)!r}: {e}") from e
    if not isinstance(checkpoint, dict):
        raise ExportError(f"adapter checkpoint {str(adapters)!r} holds a {type(checkpoint).__name__}, "
                          "not a state dict")
    meta = checkpoint.get("clipinspect") or {}
    if meta and (list(meta.get("layers", layers)) != list(layers)
                 or meta.get("model", model_name) != model_name):
        raise ExportError(f"adapter checkpoint {str(adapters)!r} was trained for {meta.get('model')} "
                          f"layers {meta.get('layers')}, not {model_name} layers {list(layers)}; "
                          "export with the same --model and --layers")
    projections = LevelProjections(width, dim, len(layers))
    try:
        projections.load_state_dict(projection_state(checkpoint, width, dim, len(layers)))
    except ValueError as e:
        raise ExportError(f"adapter checkpoint {str(adapters)!r}: {e}") from e
    record = {"kind": "file", "path": str(path.resolve()), "sha256": sha256_file(path)}
    if meta:
        record["trained"] = {k: meta[k] for k in ("epochs", "data", "categories", "loss")
                             if k in meta}
    return projections.eval(), record


def build(model, layers: Sequence[int] | None, image_size: int | None,
          projections: LevelProjections) -> tuple[AprilLabEncoder, dict[str, AprilLabHead]]:
    """Encoder and both heads for ``model`` (layers None: quarter points of the depth)."""
    depth = len(model.visual.transformer.resblocks)
    layers = check_layers(layers or default_layers(depth), depth)
    size = None if image_size is None else (int(image_size), int(image_size))
    encoder = AprilLabEncoder(model.visual, layers, size).eval()
    heads = {name: AprilLabHead(projections, layers, encoder.grid, encoder.image_size,
                                few_shot=name == "head_fewshot").eval()
             for name in ("head_zeroshot", "head_fewshot")}
    return encoder, heads


def export_aprillab_bundle(out: str | Path, model_name: str, pretrained: str | None,
                           categories: Sequence[str] = (), adapters: str | Path | None = None,
                           layers: Sequence[int] | None = None, image_size: int | None = None,
                           opset: int = 17, tolerance: float = PARITY_TOLERANCE,
                           strict: bool = True, overwrite: bool = False, seed: int = 0) -> Bundle:
    """Export an AprilLab bundle to ``out`` (written aside, moved into place when complete).

    layers: 1-based block numbers (default: quarter points of the depth, 6,12,18,24 for 24).
    image_size: square input side if not the model's own (positional embedding resampled).
    adapters: projection checkpoint, or "none" for random projections.
    """
    out = Path(out)
    categories = [check_category_name(c) for c in categories]
    for i, name in enumerate(categories):
        check_category_dir_free(categories[:i], name)
    if opset < 17:
        raise ExportError(f"--opset {opset} is too old: LayerNormalization needs opset >= 17")
    if out.exists() and not overwrite and any(out.iterdir()):
        raise ExportError(f"{str(out)!r} exists and is not empty; choose another --out or pass "
                          "--overwrite")
    require_adapters(adapters)
    t_start = time.perf_counter()
    log(f"[1/5] loading {model_name} (weights: {pretrained or 'random'})")
    model, tokenizer, weights = load_clip(model_name, pretrained, seed)
    visual = model.visual
    depth = len(visual.transformer.resblocks)
    try:
        layers = check_layers(layers or default_layers(depth), depth)
        width, dim = int(visual.conv1.out_channels), int(visual.output_dim)
        projections, projection_record = load_projections(adapters, width, dim, layers,
                                                          model_name, seed)
        encoder, heads = build(model, layers, image_size, projections)
    except ValueError as e:
        raise ExportError(str(e)) from e
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(default_mode(directory=True))
    try:
        log(f"[2/5] exporting ONNX graphs (opset {opset}, {encoder.image_size[0]}x"
            f"{encoder.image_size[1]}, levels {list(layers)})")
        files = export_graphs(encoder, heads, tmp, opset)
        text_entries = {}
        for i, name in enumerate(categories):
            log(f"[3/5] text embeddings for {name!r} ({i + 1}/{len(categories)})")
            text_entries[name] = write_text(tmp, model, tokenizer, name)
        log("[4/5] checking onnxruntime against PyTorch")
        if categories:
            with np.load(tmp / text_entries[categories[0]]["text"]["file"]) as t:
                prototypes = torch.from_numpy(t["prototypes"])
        else:
            prototypes = torch.randn(2, dim)
        parity = judge_parity(check_parity(tmp, files, encoder, heads,
                                           {"text_prototypes": prototypes}), tolerance, strict)
        log("[5/5] writing manifest")
        own = list(preprocess_config(model)["size"])
        input_cfg = {**preprocess_config(model), "size": list(encoder.image_size)}
        manifest = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "method": METHOD,
            "outputs": encoder.output_names(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {"name": model_name, "weights": weights},
            "preprocess": input_cfg,
            "grid": list(encoder.grid), "patch_size": int(visual.patch_size[0]),
            "scales": [],
            "dims": {"embed": dim, "width": width, "patches": encoder.grid[0] * encoder.grid[1],
                     "layers": depth},
            "aprillab": {
                "layers": list(layers),
                "positional_embedding": ("as trained" if own == list(encoder.image_size) else
                                         f"resampled bicubically from {own[0]}x{own[1]}"),
                "projections": projection_record,
                "logit_scale": LOGIT_SCALE,
                "map": "at the input size (per level: upsampled bilinearly, align_corners true, "
                       "then softmax; summed over levels)",
            },
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
