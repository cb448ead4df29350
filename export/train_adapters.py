"""``clipinspect train-adapters``: train AprilLab's per-level projections with CLIP frozen
(docs/methods.md#training-the-projections) on an annotated dataset in MVTec AD or VisA layout.

CLIP never changes during training, so each image's level tokens are computed once and cached
on disk (float16, keyed by model, weights, levels, input size and the image file); every epoch
after the first encode only reads the cache and trains a few linear layers. Images are
preprocessed exactly as the runtime does (whole image resized, no crop) and masks resized
nearest-neighbour to the input size. The checkpoint is APRIL-GAN's form (``trainable_linearlayer``
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
from .errors import ExportError, log
from .methods.aprillab import (CHECKPOINT_KEY, LevelProjections, adapter_loss, build_modules,
                               category_text, check_layers, default_layers)
from .text import load_ensemble

BETAS = (0.5, 0.999)


class FeatureCache:
    """Level tokens (L, P, C) float16 and the mask of each image, one .npz per image, and each
    category's text prototypes, under a folder named by everything that determines them."""

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

    def fill(self, samples: Sequence[Sample], encoder, preprocess: Preprocess,
             batch_size: int) -> None:
        """Encode the images not cached yet (the only CLIP passes of the whole training)."""
        todo = [s for s in samples if not self.path(s).is_file()]
        if not todo:
            return
        size = preprocess.size
        with Progress(len(todo), "encoding (once)") as bar, torch.no_grad():
            for i in range(0, len(todo), batch_size):
                chunk = todo[i:i + batch_size]
                images = preprocess.batch([to_rgb_array(s.path) for s in chunk])
                levels = torch.stack(encoder(torch.from_numpy(images))[1:], dim=1)  # (B, L, P, C)
                for s, tokens in zip(chunk, levels):
                    buf = io.BytesIO()
                    np.savez(buf, tokens=tokens.numpy().astype(np.float16),
                             mask=np.packbits(load_mask(s, size)))
                    atomic_write_bytes(self.path(s), buf.getvalue())
                bar.update(len(chunk))

    def load(self, samples: Sequence[Sample], size: tuple[int, int]
             ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """-> L x (B, P, C) float32 level tokens, (B, H, W) float32 masks."""
        tokens, masks = [], []
        for s in samples:
            with np.load(self.path(s)) as f:
                tokens.append(f["tokens"].astype(np.float32))
                bits = np.unpackbits(f["mask"])[:size[0] * size[1]]
                masks.append(bits.reshape(size).astype(np.float32))
        levels = torch.from_numpy(np.stack(tokens))
        return list(levels.unbind(dim=1)), torch.from_numpy(np.stack(masks))


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
    image_size None = the model's own; categories None = all; ``epochs=0`` writes the untrained
    (seeded random) projections, the baseline training starts from; ``resume`` continues an
    interrupted run from ``out`` up to ``epochs``; cache: feature cache folder (default
    ``<out>.features``)."""

    data: str | Path
    out: str | Path
    model: str = "ViT-L-14-336"
    pretrained: str | None = "openai"
    layers: Sequence[int] | None = None
    image_size: int | None = None
    categories: Sequence[str] | None = None
    fmt: str = "auto"
    split: str = "test"
    epochs: int = 5
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    cache: str | Path | None = None
    resume: bool = False
    overwrite: bool = False


def train_adapters(options: TrainOptions) -> dict:
    """Train the projections; returns the checkpoint's ``clipinspect`` record (loss per epoch)."""
    o, out = options, Path(options.out)
    samples = _checked_samples(o)
    model, tokenizer, weights = load_clip(o.model, o.pretrained, o.seed)
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
    encoder, heads = build_modules(model, layers, o.image_size, projections)
    size = encoder.image_size
    optimizer = torch.optim.Adam(projections.parameters(), lr=o.lr, betas=BETAS)
    meta = {"model": o.model, "weights": weights, "layers": list(layers),
            "image_size": list(size), "data": str(Path(o.data).resolve()), "split": o.split,
            "categories": sorted({s.category for s in samples}), "images": len(samples),
            "batch_size": o.batch_size, "lr": o.lr, "betas": list(BETAS), "seed": o.seed,
            "loss": "focal (gamma 2) + dice on the anomalous channel, summed over levels",
            "epochs": 0, "loss_per_epoch": []}
    if o.resume and out.exists():
        _resume(out, meta, projections, optimizer)
    cfg = preprocess_config(model)
    ensemble = load_ensemble("aprillab")
    cache = FeatureCache(Path(o.cache) if o.cache else out.with_name(out.name + ".features"),
                         cache_key(o.model, weights, layers, size, cfg, ensemble))
    cache.fill(samples, encoder, encoder_preprocess(cfg, encoder), o.batch_size)
    text = {name: cache.text(name, lambda n: category_text(model, tokenizer, n, ensemble)[0]
                             ["prototypes"]) for name in meta["categories"]}
    if meta["epochs"] == 0 and o.epochs == 0:
        save_checkpoint(out, projections, optimizer, meta)
    for epoch in range(meta["epochs"] + 1, o.epochs + 1):
        loss = _epoch(o, epoch, samples=samples, cache=cache, size=size, text=text,
                      head=heads["head_zeroshot"], optimizer=optimizer)
        meta["epochs"] = epoch
        meta["loss_per_epoch"].append(round(loss, 6))
        save_checkpoint(out, projections, optimizer, meta)
        log(f"epoch {epoch}: mean loss {loss:.4f}; checkpoint {out}")
    return meta


def _checked_samples(o: TrainOptions) -> list[Sample]:
    """The annotated samples to train on, after refusing what cannot work."""
    out = Path(o.out)
    if o.epochs < 0 or o.batch_size < 1 or o.lr <= 0:
        raise ExportError(f"need epochs >= 0, batch size >= 1 and lr > 0 (got {o.epochs}, "
                          f"{o.batch_size}, {o.lr})")
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


def _resume(out: Path, meta: dict, projections, optimizer) -> None:
    """Load the saved run into ``projections`` and ``optimizer``; refuse another run's file."""
    state = torch.load(out, map_location="cpu", weights_only=True)
    old = state.get("clipinspect", {})
    for key in ("model", "layers", "image_size", "categories", "split", "batch_size"):
        if old.get(key) != meta[key]:
            raise ExportError(f"cannot resume {str(out)!r}: it was trained with {key} "
                              f"{old.get(key)!r}, this run has {meta[key]!r}")
    projections.load_state_dict(state[CHECKPOINT_KEY])
    optimizer.load_state_dict(state["optimizer"])
    meta.update(epochs=old["epochs"], loss_per_epoch=old["loss_per_epoch"])
    log(f"resuming after epoch {old['epochs']}")


def _epoch(o: TrainOptions, epoch: int, *, samples, cache: FeatureCache, size, text: dict,
           head, optimizer) -> float:
    """One pass over the samples in this epoch's order; -> mean loss per image."""
    gen = torch.Generator().manual_seed(o.seed * 1000 + epoch)  # same order resumed or not
    order = torch.randperm(len(samples), generator=gen).tolist()
    total = 0.0
    with Progress(len(samples), f"epoch {epoch}/{o.epochs}") as bar:
        for i in range(0, len(order), o.batch_size):
            batch = [samples[j] for j in order[i:i + o.batch_size]]
            levels, masks = cache.load(batch, size)
            prototypes = torch.stack([text[s.category] for s in batch])   # (B, 2, D)
            loss = adapter_loss(head, levels, prototypes, masks)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            bar.update(len(batch))
    return total / len(samples)
