"""Untrusted image files: one pixel limit checked from the header before decoding, JPEGs over
it decoded reduced, and only PNG, JPEG, BMP, TIFF and WebP decoded at all."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, TiffImagePlugin

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


# --- A JPEG over PIL's own decompression-bomb limit is decoded reduced, as documented ---

def flat_gray_jpeg(width: int, height: int) -> bytes:
    """A valid baseline grayscale JPEG of any size, flat gray 128, in 2 bits per 8x8 block: one
    Huffman code each for "DC difference 0" and "end of block" (PIL would need the whole image in
    memory to write a 17000x17000 one)."""
    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body

    one_code = bytes([1] + [0] * 15) + b"\x00"  # one code of 1 bit, for symbol 0
    bits = 2 * -(-width // 8) * -(-height // 8)
    data = bytes(bits // 8) + (bytes([0xFF >> (bits % 8)]) if bits % 8 else b"")  # 1-bit padding
    return (b"\xff\xd8" + segment(0xDB, b"\x00" + bytes([1] * 64))
            + segment(0xC0, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
            + segment(0xC4, b"\x00" + one_code) + segment(0xC4, b"\x10" + one_code)
            + segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + data + b"\xff\xd9")


def png_header(width: int, height: int) -> bytes:
    """An 8-bit RGB PNG that declares that size and holds no pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


def test_a_jpeg_over_pils_bomb_limit_is_decoded_reduced_not_refused(tmp_path):
    path = tmp_path / "huge.jpg"
    path.write_bytes(flat_gray_jpeg(17000, 17000))  # 289 MP, 1.1 MB
    pil_limit = Image.MAX_IMAGE_PIXELS
    assert 17000 * 17000 > 2 * pil_limit  # PIL's Image.open alone refuses it
    d = images.decode(path)  # under the 40 MP limit only at 1/4 per side
    assert d.rgb.shape == (4250, 4250, 3) and d.size == (4250, 4250)
    assert d.rgb.min() == d.rgb.max() == 128
    assert images.decode(EncodedImage(path.read_bytes()), model_side=240).rgb.shape[:2] == \
        (2125, 2125)
    # PIL's check is left in force for every other format, and as it was.
    assert Image.MAX_IMAGE_PIXELS == pil_limit
    with pytest.raises(ImageError, match="huge.png is too large to decode safely"):
        to_rgb_array(EncodedImage(png_header(17000, 17000), "huge.png"))



def test_a_limit_from_the_environment_raises_pils_bomb_check_as_the_setting_does(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
    header_only = EncodedImage(png_header(17000, 17000), "huge.png")  # 289 MP, no pixel data
    monkeypatch.setenv(images.MAX_MEGAPIXELS_ENV, "400")
    with pytest.raises(ImageError) as e:  # admitted by the limit, then fails as truncated
        to_rgb_array(header_only)
    assert "too large to decode safely" not in str(e.value)
    assert Image.MAX_IMAGE_PIXELS >= 400_000_000

# --- Decoding every mode to RGB uint8: the numbers, and the memory a decode takes ---

def mode_image(mode: str, width: int, height: int, steps: tuple[int, int] = (977, 1531)
               ) -> Image.Image:
    """A patterned image of that PIL mode: 16-bit values that step by ``steps`` per column and
    row (the default jumps over the whole range; small steps compress well)."""
    y = np.arange(height, dtype=np.int64)[:, None]
    x = np.arange(width, dtype=np.int64)[None, :]
    wide = (x * steps[0] + y * steps[1]) % 65536
    level = (wide % 256).astype(np.uint8)
    if mode == "I;16":
        return Image.fromarray(wide.astype(np.uint16))
    if mode == "I":  # below 0 and above 65535 too: both are clipped
        return Image.fromarray((wide * 3 - 1000).astype(np.int32))
    if mode == "F":
        return Image.fromarray((wide % 300).astype(np.float32) - 10.25)
    if mode == "P":
        im = Image.frombytes("P", (width, height), (level % 16).tobytes())
        im.putpalette([v for i in range(16) for v in (i * 16, 255 - i * 16, i * 8)])
        im.info["transparency"] = 3
        return im
    channels = {"L": [level], "1": [level], "LA": [level, 255 - level],
                "RGB": [level, 255 - level, level // 2],
                "RGBA": [level, 255 - level, level // 2, (wide * 7 % 256).astype(np.uint8)],
                "CMYK": [level, 255 - level, level // 2, level // 3]}[mode]
    raw_mode = "CMYK" if mode == "CMYK" else {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[len(channels)]
    im = Image.frombytes(raw_mode, (width, height), np.stack(channels, -1).tobytes())
    return im.convert("1") if mode == "1" else im


def previous_conversion(im: Image.Image) -> np.ndarray:
    """How images were converted to RGB before bands (1a75222), whole-image: the reference."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(arr / 257.0 + 0.5, 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def saved(im: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    if fmt == "PNG" and "transparency" in im.info:
        save["transparency"] = im.info["transparency"]
    im.save(buf, format=fmt, **save)
    return buf.getvalue()


@pytest.mark.parametrize("mode, fmt", [
    ("L", "PNG"), ("1", "PNG"), ("P", "PNG"), ("I;16", "PNG"), ("I;16", "TIFF"), ("I", "TIFF"),
    ("F", "TIFF"), ("LA", "PNG"), ("RGBA", "PNG"), ("RGBA", "WEBP"), ("RGB", "PNG"),
    ("RGB", "JPEG"), ("CMYK", "JPEG"), ("RGB", "BMP")])
@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_band_conversion_gives_the_previous_numbers_in_every_orientation(mode, fmt, orientation,
                                                                           monkeypatch):
    # Bands of 2 or 3 rows: many seams (raising=False: the same test runs on the code before bands).
    monkeypatch.setattr(images, "BAND_PIXELS", 100, raising=False)
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = orientation
    data = saved(mode_image(mode, 47, 31), fmt, exif=exif)
    stored = 1 if fmt == "BMP" else orientation  # BMP has no EXIF
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == mode
        assert im.getexif().get(images.EXIF_ORIENTATION, 1) == stored
        expected = previous_conversion(im)
    rgb = to_rgb_array(EncodedImage(data))
    assert rgb.shape == expected.shape == ((47, 31, 3) if stored >= 5 else (31, 47, 3))
    np.testing.assert_array_equal(rgb, expected)


def test_the_documented_rules_for_16_and_32_bit_gray():
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    gray = to_rgb_array(Image.fromarray(every))
    np.testing.assert_array_equal(gray[..., 0], (every.astype(np.int64) + 128) // 257)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    # 128 / 257 < 0.5 < 129 / 257: the rounding is to the nearest level.
    assert list(gray[0, 128:130, 0]) == [0, 1] and gray[255, 255, 0] == 255
    wide = np.array([[-70000, -1, 0, 128, 129, 65535, 65536, 2**31 - 1]], np.int32)
    np.testing.assert_array_equal(to_rgb_array(Image.fromarray(wide))[0, :, 0],
                                  [0, 0, 0, 0, 1, 255, 255, 255])
    # 32-bit float: the values are 8-bit levels, truncated and clipped (PIL's F -> L).
    floats = np.array([[-10.3, 0.99, 1.5, 12.6, 254.9, 255.4, 300.0, np.nan]], np.float32)
    np.testing.assert_array_equal(to_rgb_array(Image.fromarray(floats))[0, :, 0],
                                  [0, 0, 1, 12, 254, 255, 255, 0])


# Peak RSS a decode adds, in a fresh process: the peak after decoding the large image minus the
# peak after a small one of the same kind (imports, decoders and arenas warmed up). The peak is
# VmHWM, the high-water mark of this process's own memory: ru_maxrss would start at the parent's
# (Linux keeps it across exec), and pytest's process is large.
MEMORY_PROBE = """
import sys
from clipinspect.runtime.core.images import decode
def peak():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
decode(sys.argv[1])
before = peak()
rgb = decode(sys.argv[2]).rgb
print(peak() - before, rgb.shape[0] * rgb.shape[1])
"""
SLACK = 16 * 2**20  # the documented allowance: a band's temporaries, the decoders' buffers
SIDE = 4000


def decode_peak(tmp_path: Path, mode: str, fmt: str, **save) -> tuple[int, int]:
    """(bytes the decode added to the peak RSS, pixels decoded) of a SIDE x SIDE image."""
    paths = []
    for side in (64, SIDE):
        path = tmp_path / f"{side}.{fmt.lower()}"
        path.write_bytes(saved(mode_image(mode, side, side, (3, 5)), fmt, **save))
        paths.append(str(path))
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, *paths], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    added, pixels = map(int, out.stdout.split())
    return added, pixels


def largest_strip(path: Path) -> int:
    """Bytes of the largest strip or tile as stored in a TIFF file."""
    with Image.open(path) as im:
        return max(im.tag_v2.get(279) or im.tag_v2[325])  # StripByteCounts, TileByteCounts


def rotated(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = orientation
    return exif


# The bound per decode in docs/security.md ("Memory per image"), bytes per decoded pixel: PIL's
# decoded image (1 byte for L, 1 and P, 2 for 16-bit gray, 4 for all else) plus 3 for the RGB
# result; TIFF 1 more (libtiff's buffers) plus its largest strip as stored; WebP 17.
@pytest.mark.parametrize("mode, fmt, per_pixel, save", [
    ("L", "PNG", 4, {"compress_level": 1}),
    ("1", "PNG", 4, {"compress_level": 1}),
    ("P", "PNG", 4, {"compress_level": 1}),                 # with transparency
    ("I;16", "PNG", 5, {"compress_level": 1}),
    ("I;16", "TIFF", 6, {"compression": "tiff_deflate"}),
    ("I", "TIFF", 8, {"compression": "tiff_deflate"}),
    ("F", "TIFF", 8, {"compression": "tiff_deflate"}),
    ("LA", "PNG", 7, {"compress_level": 1}),
    ("RGBA", "PNG", 7, {"compress_level": 1}),
    ("RGB", "PNG", 7, {"compress_level": 1}),
    ("RGB", "BMP", 7, {}),
    ("RGB", "JPEG", 7, {"quality": 50}),
    ("RGB", "JPEG", 7, {"quality": 50, "exif": rotated(6)}),  # turned upright on the way
    ("CMYK", "JPEG", 7, {"quality": 50}),
    ("RGB", "WEBP", 17, {"quality": 50, "method": 0}),
], ids=["L", "1", "P-transparent", "I16-png", "I16-tiff", "I32-tiff", "F32-tiff", "LA", "RGBA",
        "RGB-png", "RGB-bmp", "jpeg", "jpeg-rotated", "CMYK-jpeg", "webp"])
def test_a_decode_stays_under_the_documented_memory_bound(mode, fmt, per_pixel, save, tmp_path):
    added, pixels = decode_peak(tmp_path, mode, fmt, **save)
    assert pixels == SIDE * SIDE
    stored = largest_strip(tmp_path / f"{SIDE}.tiff") if fmt == "TIFF" else 0
    bound = per_pixel * pixels + stored + SLACK
    assert added <= bound, (f"{mode} {fmt}: +{added / 2**20:.0f} MiB over the bound "
                            f"{bound / 2**20:.0f} MiB ({added / pixels:.1f} bytes/pixel)")


def test_a_tiff_stored_as_one_strip_stays_under_the_tiff_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(TiffImagePlugin, "STRIP_SIZE", 2**40)  # the whole image in one strip
    added, pixels = decode_peak(tmp_path, "F", "TIFF", compression="tiff_deflate")
    with Image.open(tmp_path / f"{SIDE}.tiff") as im:
        assert im.tag_v2[278] == SIDE  # rows per strip: all of them
    stored = largest_strip(tmp_path / f"{SIDE}.tiff")
    assert added <= 8 * pixels + stored + SLACK, f"+{added / 2**20:.0f} MiB"
