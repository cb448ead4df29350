"""``clipinspect train-adapters``: train AprilLab's per-level projections with CLIP frozen
(METHODS.md section 4) on an annotated dataset in MVTec AD or VisA layout.

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
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from clipinspect.calibration.datasets import Sample, load_dataset, load_mask
from clipinspect.runtime.core.bundle import atomic_write_bytes
from clipinspect.runtime.core.images import to_rgb_array
from clipinspect.runtime.core.manifest import Preprocess, parse
from clipinspect.runtime.core.progress import Progress

from .aprillab import build, category_text
from .aprillab_torch import (CHECKPOINT_KEY, LevelProjections, adapter_loss, check_layers,
                             default_layers)
from .exporter import ExportError, load_clip, log, preprocess_config
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


def train_adapters(data: str | Path, out: str | Path, model_name: str, pretrained: str | None,
                   layers: Sequence[int] | None = None, image_size: int | None = None,
                   categories: Sequence[str] | None = None, fmt: str = "auto",
                   split: str = "test", epochs: int = 5, batch_size: int = 8, lr: float = 1e-3,
                   seed: int = 0, cache: str | Path | None = None, resume: bool = False,
                   overwrite: bool = False) -> dict:
    """Train the projections; returns the checkpoint's ``clipinspect`` record (loss per epoch).

    ``epochs=0`` writes the untrained (seeded random) projections: the baseline that training
    starts from. ``resume`` continues an interrupted run from ``out`` up to ``epochs``.
    """
    out = Path(out)
    if epochs < 0 or batch_size < 1 or lr <= 0:
        raise ExportError(f"need epochs >= 0, batch size >= 1 and lr > 0 (got {epochs}, "
                          f"{batch_size}, {lr})")
    if out.exists() and not (resume or overwrite):
        raise ExportError(f"{str(out)!r} exists; pass --resume to continue that run or "
                          "--overwrite to start again")
    samples = load_dataset(data, fmt, categories, split)
    n_anomalous = sum(s.is_anomalous for s in samples)
    if not n_anomalous:
        raise ExportError(f"the {split} split of {str(data)!r} has no anomalous image with a mask: "
                          "the projections are trained on annotated defects (MVTec AD and VisA "
                          "annotate the test split)")
    log(f"{len(samples)} images ({n_anomalous} anomalous) of "
        f"{len({s.category for s in samples})} categories from {data} ({split} split)")
    model, tokenizer, weights = load_clip(model_name, pretrained, seed)
    visual = model.visual
    for p in model.parameters():
        p.requires_grad_(False)
    width, dim = int(visual.conv1.out_channels), int(visual.output_dim)
    depth = len(visual.transformer.resblocks)
    try:
        layers = check_layers(layers or default_layers(depth), depth)
    except ValueError as e:
        raise ExportError(str(e)) from e
    torch.manual_seed(seed)
    projections = LevelProjections(width, dim, len(layers))
    encoder, heads = build(model, layers, image_size, projections)
    head = heads["head_zeroshot"]
    size = encoder.image_size
    optimizer = torch.optim.Adam(projections.parameters(), lr=lr, betas=BETAS)
    meta = {"model": model_name, "weights": weights, "layers": list(layers),
            "image_size": list(size), "data": str(Path(data).resolve()), "split": split,
            "categories": sorted({s.category for s in samples}), "images": len(samples),
            "batch_size": batch_size, "lr": lr, "betas": list(BETAS), "seed": seed,
            "loss": "focal (gamma 2) + dice on the anomalous channel, summed over levels",
            "epochs": 0, "loss_per_epoch": []}
    if resume and out.exists():
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
    cfg = preprocess_config(model)
    ensemble = load_ensemble("aprillab")
    cache = FeatureCache(Path(cache) if cache else out.with_name(out.name + ".features"),
                         cache_key(model_name, weights, layers, size, cfg, ensemble))
    cache.fill(samples, encoder, encoder_preprocess(cfg, encoder), batch_size)
    text = {name: cache.text(name, lambda n: category_text(model, tokenizer, n, ensemble)[0]
                             ["prototypes"]) for name in meta["categories"]}
    if meta["epochs"] == 0 and epochs == 0:
        save_checkpoint(out, projections, optimizer, meta)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(meta["epochs"] + 1, epochs + 1):
        gen.manual_seed(seed * 1000 + epoch)  # the same order whether resumed or not
        order = torch.randperm(len(samples), generator=gen).tolist()
        total, seen = 0.0, 0
        with Progress(len(samples), f"epoch {epoch}/{epochs}") as bar:
            for i in range(0, len(order), batch_size):
                batch = [samples[j] for j in order[i:i + batch_size]]
                levels, masks = cache.load(batch, size)
                prototypes = torch.stack([text[s.category] for s in batch])   # (B, 2, D)
                loss = adapter_loss(head, levels, prototypes, masks)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
                seen += len(batch)
                bar.update(len(batch))
        meta["epochs"] = epoch
        meta["loss_per_epoch"].append(round(total / seen, 6))
        save_checkpoint(out, projections, optimizer, meta)
        log(f"epoch {epoch}: mean loss {total / seen:.4f}; checkpoint {out}")
    return meta
