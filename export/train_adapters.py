"""``clipinspect train-adapters``: train AprilLab's per-level projections with CLIP frozen
(docs/methods.md#training-the-projections) on an annotated dataset in MVTec AD or VisA layout.

CLIP never changes during training, so each image's level tokens are computed once and cached
on disk (float16, keyed by model, weights, levels, input size and the image file); every epoch
after the first encode only reads the cache and trains a few linear layers. Images are
preprocessed exactly as the runtime does (whole image resized, no crop); masks reach the input
size by the recipe's rule (``training_recipes``: nearest-neighbour, or bilinear then > 0.5), cached
per rule beside the tokens. A mosaic (a recipe's augmentation) is a new image each time, so it
gets its own encoder pass during the epoch; the cache still serves every other sample. The
checkpoint is APRIL-GAN's form (``trainable_linearlayer``
with ``fc.<i>.*`` keys, which export accepts) plus a ``clipinspect`` record and the optimizer
state, rewritten atomically after every epoch, so an interrupted run resumes from the last one.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from clipinspect.calibration.datasets import Sample, load_dataset, load_mask
from clipinspect.runtime.core.bundle import atomic_write_bytes
from clipinspect.runtime.core.images import to_rgb_array
from clipinspect.runtime.core.manifest import Preprocess, parse
from clipinspect.runtime.core.progress import Progress

from .clip import load_clip, preprocess_config
from .defaults import ADAPTER_MODEL, ADAPTER_PRETRAINED
from .errors import ExportError, log
from .methods.aprillab import (CHECKPOINT_KEY, LevelProjections, adapter_loss, build_modules,
                               category_text, check_layers, default_layers, image_size_for,
                               model_activation, set_activation)
from .text import load_ensemble
from .training_recipes import (DEFAULT_RECIPE, OVERRIDABLE, mosaic, mosaic_plan, resize_mask,
                               resolve_recipe)

BETAS = (0.5, 0.999)


class FeatureCache:
    """Level tokens (L, P, C) float16 of each image (one .npz per image), its mask at the input
    size per mask rule (packed bits beside it), and each category's text prototypes, under a
    folder named by everything that determines the tokens."""

    def __init__(self, root: Path, key: dict):
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.root = Path(root) / digest
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.root / "key.json", (json.dumps(key, indent=1) + "\n").encode())

    def text(self, category: str, compute) -> torch.Tensor:
        """(2, D) text prototypes of ``category``, computed by ``compute(category)`` once: the
        text tower over the whole prompt ensemble costs more than a small training run."""
        path = self.root / f"text-{hashlib.sha256(category.encode()).hexdigest()[:16]}.npy"
        if not path.is_file():
            buf = io.BytesIO()
            np.save(buf, compute(category))
            atomic_write_bytes(path, buf.getvalue())
        return torch.from_numpy(np.load(path))

    def path(self, sample: Sample) -> Path:
        st = sample.path.stat()
        mask = sample.mask_path.stat().st_mtime_ns if sample.mask_path else 0
        ident = f"{sample.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{mask}"
        return self.root / (hashlib.sha256(ident.encode()).hexdigest()[:24] + ".npz")

    def mask_path(self, sample: Sample, rule: str) -> Path:
        return self.path(sample).with_suffix(f".mask-{rule}.npy")

    def fill(self, samples: Sequence[Sample], encoder, preprocess: Preprocess,
             batch_size: int, mask_resize: str = "nearest") -> None:
        """Encode the images not cached yet (the only CLIP passes of a run without mosaic), and
        store each mask at the input size by ``mask_resize`` where it is missing."""
        size = preprocess.size
        for s in samples:
            if not self.mask_path(s, mask_resize).is_file():
                buf = io.BytesIO()
                np.save(buf, np.packbits(resize_mask(load_mask(s), size, mask_resize)))
                atomic_write_bytes(self.mask_path(s, mask_resize), buf.getvalue())
        todo = [s for s in samples if not self.path(s).is_file()]
        if not todo:
            return
        with Progress(len(todo), "encoding (once)") as bar, torch.no_grad():
            for i in range(0, len(todo), batch_size):
                chunk = todo[i:i + batch_size]
                levels = encode_levels(encoder, preprocess, [to_rgb_array(s.path) for s in chunk])
                for s, tokens in zip(chunk, levels):
                    buf = io.BytesIO()
                    np.savez(buf, tokens=tokens.numpy())
                    atomic_write_bytes(self.path(s), buf.getvalue())
                bar.update(len(chunk))

    def load(self, samples: Sequence[Sample], size: tuple[int, int],
             mask_resize: str = "nearest") -> tuple[list[torch.Tensor], torch.Tensor]:
        """-> L x (B, P, C) float32 level tokens, (B, H, W) float32 masks."""
        tokens, masks = [], []
        for s in samples:
            with np.load(self.path(s)) as f:
                tokens.append(f["tokens"].astype(np.float32))
            bits = np.unpackbits(np.load(self.mask_path(s, mask_resize)))[:size[0] * size[1]]
            masks.append(bits.reshape(size).astype(np.float32))
        levels = torch.from_numpy(np.stack(tokens))
        return list(levels.unbind(dim=1)), torch.from_numpy(np.stack(masks))


def encode_levels(encoder, preprocess: Preprocess, images: Sequence[np.ndarray]) -> torch.Tensor:
    """RGB images -> (B, L, P, C) level tokens, rounded to float16 as the cache keeps them (so
    that a mosaic and a cached image reach the projections alike)."""
    with torch.no_grad():
        levels = encoder(torch.from_numpy(preprocess.batch(list(images))))[1:]
    return torch.stack(levels, dim=1).to(torch.float16)


def encoder_preprocess(cfg: dict, encoder) -> Preprocess:
    """The bundle's preprocessing (``preprocess_config``) at the size the encoder takes."""
    return parse(Preprocess, {**cfg, "size": list(encoder.image_size)}, "the CLIP model")


def cache_key(model_name: str, weights: dict, layers, size, cfg: dict, ensemble: dict) -> dict:
    """Everything the cached tokens and text prototypes depend on."""
    return {"model": model_name, "weights": weights, "layers": list(layers), "size": list(size),
            "mean": cfg["mean"], "std": cfg["std"], "prompts": ensemble}


def save_checkpoint(path: Path, projections, optimizer, meta: dict) -> None:
    buf = io.BytesIO()
    torch.save({CHECKPOINT_KEY: projections.state_dict(), "clipinspect": meta,
                "optimizer": optimizer.state_dict()}, buf)
    atomic_write_bytes(path, buf.getvalue())


@dataclass
class TrainOptions:
    """What ``train_adapters`` trains. data: dataset root (MVTec AD or VisA layout, ``fmt``
    auto-detected), out: checkpoint file; layers None = quarter points of the depth;
    image_size None = APRIL-GAN's for the model (518 for ViT-L-14-336), else its own;
    activation None = what open_clip built (recorded in the checkpoint: export refuses the
    projections for a model running the other one);
    categories None = all; recipe: a name of ``training_recipes.RECIPES`` giving epochs,
    batch_size, lr, mosaic and mask_resize, each of which, when not None here, overrides it;
    ``epochs=0`` writes the untrained (seeded random) projections, the
    baseline training starts from; ``resume`` continues an
    interrupted run from ``out`` up to ``epochs``; cache: feature cache folder (default
    ``<out>.features``)."""

    data: str | Path
    out: str | Path
    model: str = ADAPTER_MODEL
    pretrained: str | None = ADAPTER_PRETRAINED
    layers: Sequence[int] | None = None
    image_size: int | None = None
    activation: str | None = None
    categories: Sequence[str] | None = None
    fmt: str = "auto"
    split: str = "test"
    recipe: str = DEFAULT_RECIPE
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    mosaic: float | None = None
    mask_resize: str | None = None
    seed: int = 0
    cache: str | Path | None = None
    resume: bool = False
    overwrite: bool = False


@dataclass
class _Data:
    """What every training step reads: the samples, their cache, the text prototypes per
    category, and what a mosaic needs (encoder, preprocessing, the samples by defect type)."""

    samples: list[Sample]
    cache: FeatureCache
    size: tuple[int, int]
    text: dict
    encoder: torch.nn.Module
    preprocess: Preprocess
    pools: dict


def train_adapters(options: TrainOptions) -> dict:
    """Train the projections; returns the checkpoint's ``clipinspect`` record (loss per epoch,
    the recipe and its resolved values)."""
    o, out = options, Path(options.out)
    recipe = resolve_recipe(o.recipe, {k: getattr(o, k) for k in OVERRIDABLE})
    samples = _checked_samples(o)
    model, tokenizer, weights = load_clip(o.model, o.pretrained, o.seed)
    activation = o.activation or model_activation(model)
    set_activation(model, activation)
    visual = model.visual
    for p in model.parameters():
        p.requires_grad_(False)
    width, dim = int(visual.conv1.out_channels), int(visual.output_dim)
    depth = len(visual.transformer.resblocks)
    try:
        layers = check_layers(o.layers or default_layers(depth), depth)
    except ValueError as e:
        raise ExportError(str(e)) from e
    torch.manual_seed(o.seed)
    projections = LevelProjections(width, dim, len(layers))
    encoder, heads = build_modules(model, layers, image_size_for(o.model, o.image_size),
                                   projections)
    size = encoder.image_size
    optimizer = torch.optim.Adam(projections.parameters(), lr=recipe["lr"], betas=BETAS)
    meta = {"model": o.model, "weights": weights, "layers": list(layers),
            "image_size": list(size), "activation": activation, "data": str(Path(o.data).resolve()), "split": o.split,
            "categories": sorted({s.category for s in samples}), "images": len(samples),
            "batch_size": recipe["batch_size"], "lr": recipe["lr"], "betas": list(BETAS),
            "seed": o.seed, "recipe": recipe,
            "loss": "focal (gamma 2) + dice on the anomalous channel, summed over levels",
            "epochs": 0, "loss_per_epoch": []}
    if o.resume and out.exists():
        _resume(out, meta, projections, optimizer)
    cfg = preprocess_config(model)
    ensemble = load_ensemble("aprillab")
    cache = FeatureCache(Path(o.cache) if o.cache else out.with_name(out.name + ".features"),
                         cache_key(o.model, {**weights, "activation": activation}, layers,
                                   size, cfg, ensemble))
    preprocess = encoder_preprocess(cfg, encoder)
    cache.fill(samples, encoder, preprocess, recipe["batch_size"], recipe["mask_resize"])
    text = {name: cache.text(name, lambda n: category_text(model, tokenizer, n, ensemble)[0]
                             ["prototypes"]) for name in meta["categories"]}
    data = _Data(samples, cache, size, text, encoder, preprocess, _by_defect(samples))
    if meta["epochs"] == 0 and recipe["epochs"] == 0:
        save_checkpoint(out, projections, optimizer, meta)
    for epoch in range(meta["epochs"] + 1, recipe["epochs"] + 1):
        loss = _epoch(o.seed, epoch, recipe, data, head=heads["head_zeroshot"],
                      optimizer=optimizer)
        meta["epochs"] = epoch
        meta["loss_per_epoch"].append(round(loss, 6))
        save_checkpoint(out, projections, optimizer, meta)
        log(f"epoch {epoch}: mean loss {loss:.4f}; checkpoint {out}")
    return meta


def _by_defect(samples: Sequence[Sample]) -> dict[str, dict[str, list[Sample]]]:
    """category -> defect type -> its samples: where a mosaic's tiles are drawn from."""
    pools: dict[str, dict[str, list[Sample]]] = {}
    for s in samples:
        pools.setdefault(s.category, {}).setdefault(s.defect, []).append(s)
    return pools


def _checked_samples(o: TrainOptions) -> list[Sample]:
    """The annotated samples to train on, after refusing what cannot work."""
    out = Path(o.out)
    if out.exists() and not (o.resume or o.overwrite):
        raise ExportError(f"{str(out)!r} exists; pass --resume to continue that run or "
                          "--overwrite to start again")
    samples = load_dataset(o.data, o.fmt, o.categories, o.split)
    n_anomalous = sum(s.is_anomalous for s in samples)
    if not n_anomalous:
        raise ExportError(f"the {o.split} split of {str(o.data)!r} has no anomalous image with a "
                          "mask: the projections are trained on annotated defects (MVTec AD and "
                          "VisA annotate the test split)")
    log(f"{len(samples)} images ({n_anomalous} anomalous) of "
        f"{len({s.category for s in samples})} categories from {o.data} ({o.split} split)")
    return samples


# What a checkpoint written before recipes existed was trained with.
_BEFORE_RECIPES = {"name": "clipinspect", "mosaic": 0.0, "mask_resize": "nearest"}


def _resume(out: Path, meta: dict, projections, optimizer) -> None:
    """Load the saved run into ``projections`` and ``optimizer``; refuse another run's file."""
    state = torch.load(out, map_location="cpu", weights_only=True)
    old = state.get("clipinspect", {})
    for key in ("model", "layers", "image_size", "activation", "categories", "split",
                "batch_size"):
        if old.get(key) != meta[key]:
            raise ExportError(f"cannot resume {str(out)!r}: it was trained with {key} "
                              f"{old.get(key)!r}, this run has {meta[key]!r}")
    old_recipe = old.get("recipe", _BEFORE_RECIPES)
    for key in ("name", "mosaic", "mask_resize"):
        if old_recipe.get(key) != meta["recipe"][key]:
            flag = "--recipe" if key == "name" else "--" + key.replace("_", "-")
            raise ExportError(f"cannot resume {str(out)!r}: it was trained with {flag} "
                              f"{old_recipe.get(key)!r}, this run has {meta['recipe'][key]!r}; "
                              f"pass {flag} {old_recipe.get(key)}")
    projections.load_state_dict(state[CHECKPOINT_KEY])
    optimizer.load_state_dict(state["optimizer"])
    meta.update(epochs=old["epochs"], loss_per_epoch=old["loss_per_epoch"])
    log(f"resuming after epoch {old['epochs']}")


def _epoch(seed: int, epoch: int, recipe: dict, data: _Data, *, head, optimizer) -> float:
    """One pass over the samples in this epoch's order, each replaced by a mosaic with the
    recipe's probability; -> mean loss per training image."""
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)  # same order resumed or not
    order = torch.randperm(len(data.samples), generator=gen).tolist()
    # A separate stream, so that the order is the same with and without mosaic.
    plan = mosaic_plan(np.random.default_rng([seed, epoch]),
                       [data.samples[j].category for j in order], recipe["mosaic"], data.pools)
    total, batch_size = 0.0, recipe["batch_size"]
    with Progress(len(order), f"epoch {epoch}/{recipe['epochs']}") as bar:
        for i in range(0, len(order), batch_size):
            batch = [data.samples[j] for j in order[i:i + batch_size]]
            levels, masks = _batch(batch, plan[i:i + batch_size], data, recipe["mask_resize"])
            prototypes = torch.stack([data.text[s.category] for s in batch])   # (B, 2, D)
            loss = adapter_loss(head, levels, prototypes, masks)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            bar.update(len(batch))
    return total / len(order)


def _batch(batch: Sequence[Sample], tiles: Sequence[list | None], data: _Data, rule: str
           ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A training batch: cached tokens for the samples kept, a fresh encoder pass for the
    mosaics replacing the others -> L x (B, P, C) float32 tokens, (B, H, W) float32 masks."""
    levels, masks = data.cache.load(batch, data.size, rule)
    made = [(k, mosaic([to_rgb_array(t.path) for t in four], [load_mask(t) for t in four]))
            for k, four in enumerate(tiles) if four is not None]
    if not made:
        return levels, masks
    fresh = encode_levels(data.encoder, data.preprocess, [image for _, (image, _) in made])
    stacked = torch.stack(levels, dim=1)                                    # (B, L, P, C)
    for (k, (_, mask)), tokens in zip(made, fresh):
        stacked[k] = tokens.float()
        masks[k] = torch.from_numpy(resize_mask(mask, data.size, rule).astype(np.float32))
    return list(stacked.unbind(dim=1)), masks
