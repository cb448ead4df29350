"""train-adapters recipes: named values and their overrides, APRIL-GAN's mask rule and mosaic
augmentation, and a short run that trains on mosaics and records its recipe."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clipinspect.export.errors import ExportError
from clipinspect.export.training_recipes import (RECIPES, draw_tiles, mosaic, mosaic_plan,
                                                 resize_mask, resolve_recipe)

NO_OVERRIDES = dict.fromkeys(("epochs", "batch_size", "lr", "mosaic", "mask_resize"))


def test_recipes_hold_april_gans_settings_and_todays_default():
    assert resolve_recipe("april-gan-mvtec", NO_OVERRIDES) == {
        "name": "april-gan-mvtec", "epochs": 3, "batch_size": 8, "lr": 1e-3, "mosaic": 0.2,
        "mask_resize": "bilinear", "overridden": []}
    visa = resolve_recipe("april-gan-visa", NO_OVERRIDES)
    assert (visa["epochs"], visa["mosaic"], visa["mask_resize"]) == (15, 0.0, "bilinear")
    # clipinspect's own recipe is what train-adapters did before recipes existed.
    own = resolve_recipe("clipinspect", NO_OVERRIDES)
    assert (own["epochs"], own["batch_size"], own["lr"], own["mosaic"], own["mask_resize"]) \
        == (5, 8, 1e-3, 0.0, "nearest")


def test_explicit_values_override_the_recipe_and_are_listed():
    got = resolve_recipe("april-gan-mvtec", {**NO_OVERRIDES, "epochs": 1, "mosaic": 1.0,
                                             "batch_size": 8})
    assert got["epochs"] == 1 and got["mosaic"] == 1.0 and got["lr"] == 1e-3
    assert got["overridden"] == ["epochs", "mosaic"]  # 8 is the recipe's own batch size


@pytest.mark.parametrize("name, overrides, message", [
    ("april-gan", {}, "unknown recipe 'april-gan': choose one of clipinspect, april-gan-mvtec, "
                      "april-gan-visa"),
    ("clipinspect", {"mosaic": 1.5}, r"--mosaic 1.5 is a probability"),
    ("clipinspect", {"mask_resize": "bicubic"}, "--mask-resize 'bicubic': choose one of nearest, "
                                                "bilinear"),
    ("clipinspect", {"epochs": -1}, r"need epochs >= 0"),
])
def test_bad_recipes_and_values_are_refused(name, overrides, message):
    with pytest.raises(ExportError, match=message):
        resolve_recipe(name, {**NO_OVERRIDES, **overrides})


def _blobs(shape, seed):
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, bool)
    for _ in range(4):
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        mask[y:y + rng.integers(3, 40), x:x + rng.integers(3, 40)] = True
    return mask


@pytest.mark.parametrize("shape, size", [((210, 190), (64, 64)), ((37, 45), (112, 96))])
def test_bilinear_mask_rule_is_bilinear_resize_then_half(shape, size):
    torch = pytest.importorskip("torch")
    mask = _blobs(shape, seed=shape[0])
    # torch's antialiased bilinear is PIL's filter (what torchvision's Resize applies to
    # APRIL-GAN's PIL masks): resize the 0/1 mask, cut at 0.5.
    soft = torch.nn.functional.interpolate(torch.from_numpy(mask).float()[None, None], size=size,
                                           mode="bilinear", align_corners=False, antialias=True)
    want = (soft[0, 0] > 0.5).numpy()
    got = resize_mask(mask, size, "bilinear")
    assert got.shape == size and got.dtype == bool
    assert (got != want).sum() == 0
    # Not the nearest rule: on a shrink the two differ along the edges.
    if size[0] < shape[0]:
        assert (resize_mask(mask, size, "nearest") != got).any()


def test_bilinear_rule_on_a_known_case():
    # A 1-pixel-wide line doubled in width: bilinear gives 0.75 on the two nearest output
    # columns, 0.25 on the next ones; the cut keeps the 0.75 ones.
    mask = np.zeros((4, 8), bool)
    mask[:, 4] = True
    got = resize_mask(mask, (8, 16), "bilinear")
    assert got[:, 8].all() and got[:, 9].all() and got.sum() == 16


def test_nearest_rule_matches_load_mask():
    mask = _blobs((100, 120), seed=5)
    want = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
        (30, 25), Image.Resampling.NEAREST)) > 0
    assert (resize_mask(mask, (25, 30), "nearest") == want).all()


def test_mosaic_places_four_tiles_and_their_masks_row_major():
    images = [np.full((6, 8, 3), 10 * (i + 1), np.uint8) for i in range(4)]
    masks = [np.zeros((6, 8), bool) for _ in range(4)]
    masks[1][2, 3] = True
    masks[2][:, :] = True
    image, mask = mosaic(images, masks)
    assert image.shape == (12, 16, 3) and mask.shape == (12, 16)
    assert (image[:6, :8] == 10).all() and (image[:6, 8:] == 20).all()
    assert (image[6:, :8] == 30).all() and (image[6:, 8:] == 40).all()
    assert mask[6:, :8].all() and mask[2, 8 + 3] and mask.sum() == 6 * 8 + 1
    # A tile of another size is brought to the first one's.
    images[3] = np.full((3, 4, 3), 40, np.uint8)
    masks[3] = np.ones((3, 4), bool)
    image, mask = mosaic(images, masks)
    assert image.shape == (12, 16, 3) and (image[6:, 8:] == 40).all() and mask[6:, 8:].all()
    with pytest.raises(ValueError, match="4 images"):
        mosaic(images[:3], masks[:3])


def test_mosaic_plan_is_seeded_and_draws_defect_type_first():
    pools = {"weave": {"good": ["g1", "g2", "g3", "g4", "g5", "g6"], "hole": ["h1"]}}
    categories = ["weave"] * 400
    plan = mosaic_plan(np.random.default_rng([0, 1]), categories, 0.2, pools)
    again = mosaic_plan(np.random.default_rng([0, 1]), categories, 0.2, pools)
    assert plan == again
    chosen = [p for p in plan if p is not None]
    assert 50 <= len(chosen) <= 110 and all(len(p) == 4 for p in chosen)
    tiles = [t for p in chosen for t in p]
    # Half the draws pick the one 'hole' image although it is 1 of 7 images.
    assert 0.4 < tiles.count("h1") / len(tiles) < 0.6
    rng = np.random.default_rng(3)
    assert mosaic_plan(rng, categories, 0.0, pools) == [None] * 400
    assert rng.random() == np.random.default_rng(3).random()  # p 0 draws nothing
    assert draw_tiles(np.random.default_rng(7), pools["weave"]) \
        == draw_tiles(np.random.default_rng(7), pools["weave"])


def test_training_with_a_recipe_encodes_mosaics_and_records_the_recipe(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from clipinspect.calibration.synth import generate
    from clipinspect.export import train_adapters as module
    from clipinspect.export.train_adapters import TrainOptions, train_adapters

    monkeypatch.setattr(module, "load_ensemble", lambda name: {
        "normal_states": ["{}"], "anomalous_states": ["damaged {}"],
        "templates": ["a photo of a {}."]})
    encoded = []
    real = module.encode_levels
    monkeypatch.setattr(module, "encode_levels",
                        lambda enc, pre, images: encoded.append(len(images)) or real(enc, pre,
                                                                                      images))
    generate(tmp_path / "data", seed=0, categories=["weave"], image_size=64, n_train=1,
             n_test_good=2, n_test_defect_per_type=1)
    kwargs = dict(data=tmp_path / "data", model="ViT-S-16", pretrained=None, image_size=64,
                  cache=tmp_path / "cache", recipe="april-gan-mvtec", epochs=1, mosaic=1.0,
                  batch_size=3)
    meta = train_adapters(TrainOptions(out=tmp_path / "a.pt", **kwargs))
    n = meta["images"]
    # One cache fill (every image once), then every sample of the epoch is a fresh mosaic.
    assert sum(encoded) == 2 * n and meta["epochs"] == 1
    assert np.isfinite(meta["loss_per_epoch"][0])
    saved = torch.load(tmp_path / "a.pt", weights_only=True)["clipinspect"]["recipe"]
    assert saved == {"name": "april-gan-mvtec", "epochs": 1, "batch_size": 3, "lr": 1e-3,
                     "mosaic": 1.0, "mask_resize": "bilinear",
                     "overridden": ["batch_size", "epochs", "mosaic"]}
    assert list((tmp_path / "cache").rglob("*.mask-bilinear.npy"))
    with pytest.raises(ExportError, match="trained with --mosaic 1.0, this run has 0.2; pass "
                                          "--mosaic 1.0"):
        train_adapters(TrainOptions(out=tmp_path / "a.pt", resume=True,
                                    **{**kwargs, "epochs": 2, "mosaic": None}))
