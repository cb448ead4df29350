"""Untrusted image files: one pixel limit checked from the header before decoding, JPEGs over
it decoded reduced, and only PNG, JPEG, BMP, TIFF and WebP decoded at all."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from clipinspect.runtime.cli import main
from clipinspect.runtime.core import images
from clipinspect.runtime.core.images import (EncodedImage, ImageError, max_pixels,
                                             set_max_megapixels, to_rgb_array)


pytestmark = pytest.mark.usefixtures("default_decoding")


def encoded(size: tuple[int, int], fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (40, 80, 120)).save(buf, format=fmt, **save)
    return buf.getvalue()


def test_a_pixel_bomb_is_refused_from_its_header_without_decoding(monkeypatch):
    bomb = encoded((8000, 8000), "PNG", optimize=True)
    assert len(bomb) < 300_000  # tiny file, 64 megapixels
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda self: decoded.append(self.size) or Image.Image.load(self))
    with pytest.raises(ImageError) as e:
        to_rgb_array(EncodedImage(bomb, "bomb.png"))
    assert decoded == []
    message = str(e.value)
    assert "bomb.png" in message and "8000x8000" in message
    assert "--max-megapixels" in message and images.MAX_MEGAPIXELS_ENV in message


def test_the_limit_comes_from_the_setting_the_environment_or_the_default(monkeypatch):
    assert max_pixels() == 40_000_000
    monkeypatch.setenv(images.MAX_MEGAPIXELS_ENV, "0.001")
    assert max_pixels() == 1000
    with pytest.raises(ImageError, match="over the limit of 0.001"):
        to_rgb_array(EncodedImage(encoded((40, 40), "PNG")))
    set_max_megapixels(70)
    assert to_rgb_array(EncodedImage(encoded((40, 40), "PNG"))).shape == (40, 40, 3)
    monkeypatch.setenv(images.MAX_MEGAPIXELS_ENV, "lots")
    set_max_megapixels(None)
    with pytest.raises(ImageError, match="expected a number of megapixels"):
        max_pixels()


def test_arrays_and_pil_images_meet_the_same_limit():
    set_max_megapixels(0.001)
    with pytest.raises(ImageError, match="40x30"):
        to_rgb_array(np.zeros((30, 40, 3), np.uint8))
    with pytest.raises(ImageError, match="40x30"):
        to_rgb_array(Image.new("RGB", (40, 30)))


def test_a_jpeg_over_the_limit_is_decoded_reduced():
    set_max_megapixels(0.002)  # 2000 pixels: 160x120 = 19200 needs 1/4 per side (40x30)
    rgb = to_rgb_array(EncodedImage(encoded((160, 120), "JPEG")))
    assert rgb.shape == (30, 40, 3)
    assert np.abs(rgb.astype(int) - (40, 80, 120)).max() <= 3  # the same picture, smaller
    set_max_megapixels(0.0001)  # even 1/8 (20x15) is over: refused
    with pytest.raises(ImageError, match="160x120"):
        to_rgb_array(EncodedImage(encoded((160, 120), "JPEG")))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "WEBP"])
def test_the_accepted_formats_decode(fmt):
    assert to_rgb_array(EncodedImage(encoded((24, 16), fmt))).shape == (16, 24, 3)


@pytest.mark.parametrize("data", [
    encoded((16, 16), "GIF"), encoded((16, 16), "PPM"), encoded((16, 16), "ICO"),
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto showpage\n",
], ids=["gif", "ppm", "ico", "eps"])
def test_other_formats_are_refused_naming_the_accepted_ones(data, tmp_path):
    with pytest.raises(ImageError, match="PNG, JPEG, BMP, TIFF, WEBP"):
        to_rgb_array(EncodedImage(data, "upload"))
    path = tmp_path / "renamed.png"  # the suffix does not matter, the content does
    path.write_bytes(data)
    with pytest.raises(ImageError, match="renamed.png"):
        to_rgb_array(path)


def test_cli_max_megapixels_applies_to_predict(tiny_bundle_path, tmp_path, capsys):
    image = tmp_path / "wide.png"
    image.write_bytes(encoded((64, 48), "PNG"))
    assert main(["predict", str(tiny_bundle_path), str(image), "--category", "weave",
                 "--out", str(tmp_path / "out"), "--max-megapixels", "0.001"]) == 2
    err = capsys.readouterr().err
    assert "wide.png' is 64x48" in err and "--max-megapixels" in err
    with pytest.raises(SystemExit):
        main(["predict", str(tiny_bundle_path), str(image), "--category", "weave",
              "--out", str(tmp_path / "out"), "--max-megapixels", "-1"])
