"""Training recipes of ``clipinspect train-adapters`` and the data handling they name: mosaic
augmentation and how ground-truth masks reach the input size. No torch here (the command's
parser lists the recipes without loading it).

Recipes are data: epochs, batch size, learning rate, mosaic probability and mask rule. The
APRIL-GAN ones follow that project's released training script and data loader
(``ByChelsea/VAND-APRIL-GAN``: ``train.sh``, ``train.py``, ``dataset.py``): Adam at 1e-3, batch 8,
3 epochs on MVTec AD with stitched 2x2 mosaics replacing a sample with probability 0.2, 15 epochs
on VisA, whose loader has no mosaic; masks binarised (any non-zero pixel), resized bilinearly to
the input size and cut at 0.5.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .errors import ExportError

MASK_RULES = ("nearest", "bilinear")


@dataclass(frozen=True)
class Recipe:
    """mosaic: probability that a training sample is replaced by a 2x2 mosaic of four images of
    its category (``mosaic``); mask_resize: how masks reach the input size (``resize_mask``)."""

    name: str
    epochs: int
    batch_size: int
    lr: float
    mosaic: float
    mask_resize: str
    about: str


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("clipinspect", 5, 8, 1e-3, 0.0, "nearest",
           "clipinspect's own (the default): 5 epochs, no mosaic, masks resized nearest-neighbour"),
    Recipe("april-gan-mvtec", 3, 8, 1e-3, 0.2, "bilinear",
           "APRIL-GAN's MVTec AD run: 3 epochs, mosaic p 0.2, masks bilinear then > 0.5"),
    Recipe("april-gan-visa", 15, 8, 1e-3, 0.0, "bilinear",
           "APRIL-GAN's VisA run: 15 epochs, no mosaic (its VisA loader has none), masks "
           "bilinear then > 0.5"),
)}
DEFAULT_RECIPE = "clipinspect"
OVERRIDABLE = ("epochs", "batch_size", "lr", "mosaic", "mask_resize")


def resolve_recipe(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The recipe's values with the ``overrides`` that are not None in their place -> the record
    kept in checkpoints: {"name", <OVERRIDABLE values>, "overridden": [names]}. ExportError for
    an unknown recipe (listing the known ones) or a value out of range."""
    if name not in RECIPES:
        raise ExportError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPES)}")
    values = {k: v for k, v in asdict(RECIPES[name]).items() if k in OVERRIDABLE}
    overridden = sorted(k for k, v in overrides.items() if v is not None and v != values.get(k))
    unknown = [k for k in overrides if k not in OVERRIDABLE]
    if unknown:
        raise ExportError(f"a recipe has no value {unknown[0]!r}; it sets {', '.join(OVERRIDABLE)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values["epochs"] < 0 or values["batch_size"] < 1 or values["lr"] <= 0:
        raise ExportError(f"need epochs >= 0, batch size >= 1 and lr > 0 (got {values['epochs']}, "
                          f"{values['batch_size']}, {values['lr']})")
    if not 0.0 <= values["mosaic"] <= 1.0:
        raise ExportError(f"--mosaic {values['mosaic']!r} is a probability: give one in [0, 1]")
    if values["mask_resize"] not in MASK_RULES:
        raise ExportError(f"--mask-resize {values['mask_resize']!r}: choose one of "
                          f"{', '.join(MASK_RULES)}")
    return {"name": name, **values, "overridden": overridden}


def resize_mask(mask: np.ndarray, size: tuple[int, int], rule: str) -> np.ndarray:
    """bool (H, W) -> bool ``size`` (h, w). ``nearest``: nearest neighbour; ``bilinear``: the 0/1
    mask resized with PIL's bilinear filter (antialiased when shrinking, as torchvision's
    ``Resize`` on APRIL-GAN's PIL masks) in float, then > 0.5. APRIL-GAN rounds to 8 bits before
    its cut, which can move pixels of exactly half coverage; we keep the float."""
    h, w = size
    if rule == "nearest":
        small = Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)
        return np.asarray(small) > 0
    if rule == "bilinear":
        soft = Image.fromarray(mask.astype(np.float32), mode="F").resize(
            (w, h), Image.Resampling.BILINEAR)
        return np.asarray(soft) > 0.5
    raise ValueError(f"mask rule {rule!r}: choose one of {', '.join(MASK_RULES)}")


def mosaic(images: Sequence[np.ndarray], masks: Sequence[np.ndarray]
           ) -> tuple[np.ndarray, np.ndarray]:
    """Four RGB images (H_i, W_i, 3) uint8 and their bool masks (H_i, W_i) -> one image
    (2H, 2W, 3) and mask (2H, 2W): tile i at row i // 2, column i % 2, (H, W) the first image's
    size; a tile of another size is resized to it first (bicubic, its mask nearest-neighbour)."""
    if len(images) != 4 or len(masks) != 4:
        raise ValueError(f"a mosaic takes 4 images and 4 masks, got {len(images)} and {len(masks)}")
    h, w = images[0].shape[:2]
    out = np.zeros((2 * h, 2 * w, 3), np.uint8)
    out_mask = np.zeros((2 * h, 2 * w), bool)
    for i, (image, mask) in enumerate(zip(images, masks)):
        if image.shape[:2] != (h, w):
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC))
            mask = resize_mask(mask, (h, w), "nearest")
        r, c = divmod(i, 2)
        out[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
        out_mask[r * h:(r + 1) * h, c * w:(c + 1) * w] = mask
    return out, out_mask


def draw_tiles(rng: np.random.Generator, by_defect: dict[str, list]) -> list:
    """Four items for one mosaic, drawn with replacement as APRIL-GAN does: a defect type of the
    category (``good`` included) uniformly, then an image of that type uniformly; ``by_defect``
    maps each defect type to its items."""
    kinds = sorted(by_defect)
    tiles = []
    for _ in range(4):
        items = by_defect[kinds[int(rng.integers(len(kinds)))]]
        tiles.append(items[int(rng.integers(len(items)))])
    return tiles


def mosaic_plan(rng: np.random.Generator, categories: Sequence[str], probability: float,
                pools: dict[str, dict[str, list]]) -> list[list | None]:
    """For each training sample (given by its category, in the epoch's order): None to train on
    it, or the four tiles of the mosaic that replaces it (probability ``probability``), drawn
    from ``pools[category]`` (defect type -> items). No draw at all when the probability is 0,
    so that a run without mosaic consumes no randomness."""
    if probability <= 0:
        return [None] * len(categories)
    return [draw_tiles(rng, pools[c]) if rng.random() < probability else None for c in categories]
