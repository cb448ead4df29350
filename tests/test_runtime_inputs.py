"""Inputs of every kind; one bad image is reported on its own and the others still come back."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clipinspect.runtime import Inspector, ProviderError
from clipinspect.runtime.core.images import ImageError, expand_inputs, to_rgb_array


@pytest.fixture(scope="module")
def inspector(tiny_bundle_path):
    return Inspector.open(tiny_bundle_path)


def test_bad_images_are_reported_individually(inspector, tmp_path, rng):
    good = tmp_path / "good.png"
    Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(good)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image at all" * 10)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    items = [good, corrupt, tmp_path, np.zeros((0, 5, 3), np.uint8), truncated,
             np.zeros((8, 8, 3), np.float32), Image.open(good)]
    results = inspector.inspect(items, "weave", batch_size=3)
    errors = [r.error for r in results]
    assert results[0].ok and results[6].ok
    assert results[0].anomaly_map.shape == (64, 80)
    assert abs(results[0].image_score - results[6].image_score) < 1e-6
    assert "corrupt.png" in errors[1] and "not an image" in errors[1]
    assert "is a directory" in errors[2]
    assert "zero size" in errors[3]
    assert "truncated.png" in errors[4] and "truncated" in errors[4]
    assert "dtype float32" in errors[5]
    for e in errors[1:6]:
        assert "\n" not in e


def test_a_broken_lazily_loaded_pil_image_is_only_that_images_error(inspector, tmp_path, rng):
    path = tmp_path / "cut.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])
    lazy = Image.open(path)  # header fine, pixel data cut: fails only when decoded
    results = inspector.inspect([lazy, np.zeros((30, 30, 3), np.uint8)], "weave")
    assert "cannot be decoded" in results[0].error and results[1].ok


def test_io_binding_path_gives_the_same_results(tiny_bundle_path, rng):
    # The CUDA path keeps encoder outputs as OrtValues bound between the two sessions; binding
    # them on the CPU device runs the same code here.
    images = [rng.integers(0, 256, (90, 120, 3), dtype=np.uint8) for _ in range(3)]
    plain = Inspector.open(tiny_bundle_path)
    bound = Inspector.open(tiny_bundle_path)
    bound.backend.device = "cpu"
    for a, b in zip(plain.inspect(images, "weave", batch_size=2),
                    bound.inspect(images, "weave", batch_size=2)):
        assert abs(a.image_score - b.image_score) < 1e-6
        assert np.abs(a.anomaly_map - b.anomaly_map).max() < 1e-6


@pytest.mark.parametrize("make", [
    lambda rng: rng.integers(0, 256, (40, 60), dtype=np.uint8),
    lambda rng: rng.integers(0, 256, (40, 60, 1), dtype=np.uint8),
    lambda rng: rng.integers(0, 256, (40, 60, 4), dtype=np.uint8),
    lambda rng: Image.fromarray(rng.integers(0, 256, (40, 60), dtype=np.uint8)).convert("P"),
    lambda rng: Image.fromarray(rng.integers(0, 65535, (40, 60), dtype=np.uint16)),
])
def test_any_layout_becomes_rgb_of_its_own_size(make, rng):
    rgb = to_rgb_array(make(rng))
    assert rgb.shape == (40, 60, 3) and rgb.dtype == np.uint8


def test_rgba_transparency_composites_on_black():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 200
    assert to_rgb_array(rgba).max() == 0          # fully transparent
    rgba[..., 3] = 255
    assert (to_rgb_array(rgba) == 200).all()      # fully opaque


def test_directory_inputs_expand_only_where_asked(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.JPG", "sub/c.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in expand_inputs([tmp_path])] == ["a.JPG", "b.png", "c.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="holds no image files"):
        expand_inputs([tmp_path / "empty"])


def test_unavailable_provider_names_installed_ones(tiny_bundle_path, monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ProviderError, match=r"'cuda'.*not available.*available: cpu"):
        Inspector.open(tiny_bundle_path, provider="cuda")
    with pytest.raises(ProviderError, match="unknown provider 'gpu'"):
        Inspector.open(tiny_bundle_path, provider="gpu")


def test_missing_precision_is_explained(tiny_bundle_path):
    from clipinspect.runtime import BundleError

    with pytest.raises(BundleError, match="no 'int8' graphs \\(it has fp32\\)"):
        Inspector.open(tiny_bundle_path, precision="int8")


def test_smoothing_is_off_by_default_and_optional(inspector, rng):
    image = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    plain = inspector.inspect(image, "weave")[0]
    smooth = inspector.inspect(image, "weave", smoothing_sigma=4)[0]
    assert plain.anomaly_map.std() > smooth.anomaly_map.std()
    assert abs(plain.anomaly_map.mean() - smooth.anomaly_map.mean()) < 1e-3
