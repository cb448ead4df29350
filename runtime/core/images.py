"""Image input: decode paths, PIL images or arrays to RGB, and the CLIP preprocessing.

Every mode becomes RGB uint8 by fixed rules (docs/security.md, "Memory per image"): 16-bit gray
(and 32-bit integer gray, clipped to 0-65535 first) to round(v / 257), the full 16-bit range, so
rescale data that uses fewer bits (12-bit cameras) yourself; 32-bit float gray as 8-bit levels,
truncated and clipped (PIL's rule); alpha composited on black. EXIF orientation is applied. The
conversion runs one band of rows at a time into the result, so a decode holds PIL's decoded
image, the result and one band's temporaries, whatever the mode.

Untrusted input: only PNG, JPEG, BMP, TIFF and WebP files are decoded (never EPS, which PIL hands
to Ghostscript, or other rarely used decoders), and one pixel limit guards every entry point
(``predict``, ``fewshot``, ``serve``, ``watch`` and the Python API): a file's size is read from its
header and checked before any pixel is decoded. The limit applies to the decoded size: a JPEG
over it is decoded reduced by its own DCT scaling (1/2, 1/4 or 1/8 per side, the least that
fits), so its anomaly map has that reduced size, even over PIL's own decompression-bomb limit;
other formats over the limit are refused (and PIL's check stays in force for them). The
limit is ``DEFAULT_MAX_MEGAPIXELS``, the environment variable ``CLIPINSPECT_MAX_MEGAPIXELS`` or
:func:`set_max_megapixels` (the CLI's ``--max-megapixels``).

Decoding for the model (:func:`decode`): by default an image within the limit is decoded whole
and then resized, exactly as the reference pipelines do. Reduced JPEG decoding is opt-in
(:func:`set_jpeg_draft`, ``CLIPINSPECT_JPEG_DRAFT=1``): the encoder sees the image resized to a
few hundred pixels, so a JPEG is then decoded by DCT scaling at the smallest scale (down to 1/8
per side) that still has both sides >= the model's input side, and only the anomaly map keeps
the full size (a 12 MP camera JPEG is decoded as about 0.2 MP; the model's input differs
slightly). PNG, BMP, TIFF and WebP have no reduced decoding in PIL and are always decoded whole.

Preprocessing follows the WinCLIP reference: the whole image resized to the model's input size
(bicubic, antialiased; no crop), then normalized with the CLIP mean and std.
"""

from __future__ import annotations

import io
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

from .errors import ClipInspectError


@dataclass(frozen=True)
class EncodedImage:
    """The bytes of an image file held in memory (an upload, a camera frame); ``name`` is how
    error messages refer to it."""

    data: bytes
    name: str = "<uploaded image>"


ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, EncodedImage]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# The decoders PIL may use; every other format is refused before it is parsed.
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
DEFAULT_MAX_MEGAPIXELS = 40.0
MAX_MEGAPIXELS_ENV = "CLIPINSPECT_MAX_MEGAPIXELS"
JPEG_DRAFT_ENV = "CLIPINSPECT_JPEG_DRAFT"
# In every error of a file that is an image but does not decode: it may still be being written.
CORRUPT = "corrupt or truncated"
DCT_SCALES = (1, 2, 4, 8)  # the reductions per side a JPEG decoder gives for free
EXIF_ORIENTATION = 0x0112
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # rotated by 90 or 270 degrees: width and height swap
# What shows an image with that EXIF orientation upright (the rule of ImageOps.exif_transpose).
UPRIGHT_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                     4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                     6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                     8: Image.Transpose.ROTATE_90}
JPEG_SIGNATURE = b"\xff\xd8\xff"  # how every JPEG starts (what PIL's JPEG plugin accepts)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")  # mapped to 8 bits by a fixed scale
BAND_PIXELS = 1 << 18  # converted to RGB a band of rows at a time: ~0.26 MP of temporaries
_max_megapixels: float | None = None  # set_max_megapixels; else the environment; else default
_jpeg_draft: bool | None = None  # set_jpeg_draft; else the environment; else off


@dataclass(frozen=True)
class DecodedImage:
    """An input decoded for the model. rgb: (h, w, 3) uint8, possibly reduced from the file's
    size; size: (H, W), the size its anomaly map is returned at (the file's size, or the reduced
    size the pixel limit allows)."""

    rgb: np.ndarray
    size: tuple[int, int]


class ImageError(ClipInspectError, ValueError):
    """One input image that cannot be used; the message names it and the problem."""


def set_max_megapixels(megapixels: float | None) -> None:
    """The pixel limit of every decode in this process (None: back to the environment/default).
    PIL's own decompression-bomb check is raised with it, so the one limit decides."""
    global _max_megapixels
    if megapixels is not None and not megapixels > 0:
        raise ImageError(f"the pixel limit must be > 0 megapixels, got {megapixels!r}")
    _max_megapixels = megapixels
    if megapixels is not None:
        _raise_pil_limit(int(megapixels * 1e6))


def _raise_pil_limit(pixels: int) -> None:
    """PIL's decompression-bomb limit raised to ``pixels`` where it is lower (never lowered):
    our limit is checked first, so PIL's must not refuse what ours admits."""
    if Image.MAX_IMAGE_PIXELS is not None and pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = pixels


def max_pixels() -> int:
    """The pixel limit in force (width x height)."""
    if _max_megapixels is not None:
        return int(_max_megapixels * 1e6)
    text = os.environ.get(MAX_MEGAPIXELS_ENV)
    if not text:
        return int(DEFAULT_MAX_MEGAPIXELS * 1e6)
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ImageError(f"{MAX_MEGAPIXELS_ENV}={text!r}: expected a number of megapixels > 0, "
                         f"e.g. {DEFAULT_MAX_MEGAPIXELS:g}")
    _raise_pil_limit(int(value * 1e6))  # the environment's limit decides too, as set_ does
    return int(value * 1e6)


def set_jpeg_draft(on: bool | None) -> None:
    """Reduced JPEG decoding for the model's input in this process (None: back to the
    environment/default, off). Off, the model sees exactly decode-then-resize, as the reference
    pipelines do; on, a large JPEG is decoded by DCT scaling first (faster, less memory, inputs
    differ slightly: docs/security.md)."""
    global _jpeg_draft
    _jpeg_draft = on


def jpeg_draft() -> bool:
    """Whether reduced JPEG decoding for the model's input is on (see :func:`set_jpeg_draft`)."""
    if _jpeg_draft is not None:
        return _jpeg_draft
    text = os.environ.get(JPEG_DRAFT_ENV, "").strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise ImageError(f"{JPEG_DRAFT_ENV}={text!r}: expected 1 or 0")


def check_pixels(width: int, height: int, name: str) -> None:
    """Raise ImageError if a width x height image is over the pixel limit."""
    limit = max_pixels()
    if width * height > limit:
        raise ImageError(f"{name} is {width}x{height} = {width * height / 1e6:.1f} megapixels, "
                         f"over the limit of {limit / 1e6:g}; downscale it, or raise the limit "
                         f"with --max-megapixels or {MAX_MEGAPIXELS_ENV}")


def describe(item: ImageInput) -> str:
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    if isinstance(item, Image.Image):
        return f"<PIL image {item.mode} {item.size[0]}x{item.size[1]}>"
    if isinstance(item, EncodedImage):
        return item.name
    if isinstance(item, np.ndarray):
        return f"<array {item.dtype} {'x'.join(map(str, item.shape))}>"
    return f"<{type(item).__name__}>"


def to_rgb_array(item: ImageInput) -> np.ndarray:
    """Decode one input to an RGB uint8 array (H, W, 3) at the size its anomaly map has.
    Raises ImageError."""
    return decode(item).rgb


def decode(item: ImageInput, model_side: int | None = None) -> DecodedImage:
    """Decode one input; with ``model_side``, a JPEG is decoded at the smallest DCT scale whose
    sides are both >= ``model_side`` (the rest of the pixels only feed a resize to the model's
    input size), while ``size`` stays the full size the limit allows. Raises ImageError."""
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if path.is_dir():
            raise ImageError(f"{str(path)!r} is a directory, expected an image file")
        if not path.exists():
            raise ImageError(f"{str(path)!r} does not exist")
        return _decode_file(path, repr(str(path)), model_side)
    if isinstance(item, EncodedImage):
        return _decode_file(io.BytesIO(item.data), item.name, model_side)
    if isinstance(item, Image.Image):
        check_pixels(item.width, item.height, describe(item))
        try:
            rgb = _pil_to_rgb(item, describe(item))
        except (OSError, SyntaxError, ValueError) as e:  # a lazily loaded, broken file behind it
            raise ImageError(f"{describe(item)} cannot be decoded ({CORRUPT}): "
                             f"{e}") from None
        return DecodedImage(rgb, rgb.shape[:2])
    if isinstance(item, np.ndarray):
        if item.ndim >= 2:
            check_pixels(item.shape[1], item.shape[0], describe(item))
        rgb = _array_to_rgb(item)
        return DecodedImage(rgb, rgb.shape[:2])
    raise ImageError(f"unsupported image input {describe(item)}: pass a file path, an "
                     "EncodedImage, a PIL image or an HxWx3 uint8 array")


def _decode_file(file, name: str, model_side: int | None = None) -> DecodedImage:
    """An encoded image file (a path or a binary file object) -> RGB uint8 and map size."""
    if (file.stat().st_size if isinstance(file, Path) else file.seek(0, io.SEEK_END)) == 0:
        raise ImageError(f"{name} is empty (0 bytes), not an image; was it still being written?")
    max_pixels()  # reads the limit first: one from the environment raises PIL's check with it
    try:
        with (file.open("rb") if isinstance(file, Path) else nullcontext(file)) as fp, \
                _open_header(fp) as im:
            width, height = _fit_to_limit(im, name, model_side)
            im.load()
            # Camera and phone JPEGs store their rotation in EXIF; apply it as viewers do.
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
            if orientation in TRANSPOSING_ORIENTATIONS:
                width, height = height, width
            return DecodedImage(_pil_to_rgb(im, name, orientation), (height, width))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image in an accepted format "
                         f"({', '.join(ACCEPTED_FORMATS)}), or is corrupt") from None
    except PermissionError:
        raise ImageError(f"{name} cannot be read: permission denied") from None
    except Image.DecompressionBombError as e:  # over PIL's own limit, found in the header
        raise ImageError(f"{name} is too large to decode safely ({e}); downscale it, or raise "
                         f"the limit with --max-megapixels or {MAX_MEGAPIXELS_ENV}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name} is {CORRUPT}: {e}") from None


def _open_header(fp) -> Image.Image:
    """Read the header of an image file (a binary file object). A JPEG is opened by
    PIL's JPEG plugin itself: Image.open's decompression-bomb check would refuse a JPEG that the
    pixel limit lets decode reduced, and :func:`_fit_to_limit` checks its size (at the DCT
    scale it will decode at) before any pixel is decoded. Every other format goes through
    Image.open with PIL's check in force; no global setting changes, so other threads keep it."""
    fp.seek(0)
    is_jpeg = fp.read(len(JPEG_SIGNATURE)) == JPEG_SIGNATURE
    fp.seek(0)
    if is_jpeg:
        return JpegImagePlugin.JpegImageFile(fp)
    return Image.open(fp, formats=ACCEPTED_FORMATS)


def _fit_to_limit(im: Image.Image, name: str, model_side: int | None = None) -> tuple[int, int]:
    """Check the header's size against the pixel limit before decoding; a JPEG over it is set to
    decode at the smallest DCT reduction (1/2, 1/4, 1/8 per side) that fits, and with
    ``model_side`` at the largest one whose sides stay >= ``model_side``.
    -> (width, height) of the map: the decoded size the limit allows, before EXIF rotation."""
    width, height = im.size
    limit = max_pixels()
    if im.format != "JPEG":
        check_pixels(width, height, name)
        return width, height
    # libjpeg's scaled sizes round up: ceil(side / scale).
    fits = [s for s in DCT_SCALES if -(-width // s) * -(-height // s) <= limit]
    if not fits:
        check_pixels(width, height, name)  # raises: even 1/8 is over the limit
    limit_scale = fits[0]
    scale = limit_scale
    if model_side:
        scale = max(scale, max((s for s in DCT_SCALES if min(width, height) // s >= model_side),
                               default=1))
    if scale > 1:
        # PIL picks the largest scale with both sides >= the size asked: ask floor(side / scale).
        im.draft(im.mode, (max(1, width // scale), max(1, height // scale)))
    check_pixels(im.size[0], im.size[1], name)
    return -(-width // limit_scale), -(-height // limit_scale)


def _pil_to_rgb(im: Image.Image, name: str, orientation: int = 1) -> np.ndarray:
    """A PIL image -> RGB uint8 (H, W, 3), upright for an EXIF ``orientation``. Converted one
    band of about BAND_PIXELS at a time into the result, so that the only full-size buffers are
    PIL's decoded image and the result (docs/security.md, "Memory per image")."""
    if im.width == 0 or im.height == 0:
        raise ImageError(f"{name} has zero size ({im.width}x{im.height})")
    width, height = im.size
    swapped = orientation in TRANSPOSING_ORIENTATIONS
    out_width, out_height = (height, width) if swapped else (width, height)
    rgb = np.empty((out_height, out_width, 3), np.uint8)
    rows = max(1, BAND_PIXELS // out_width)
    upright = UPRIGHT_TRANSPOSE.get(orientation)
    for top in range(0, out_height, rows):
        bottom = min(out_height, top + rows)
        band = im.crop(_source_box(orientation, width, height, top, bottom))
        rgb[top:bottom] = _band_to_rgb(band if upright is None else band.transpose(upright))
    return rgb


def _source_box(orientation: int, width: int, height: int, top: int,
                bottom: int) -> tuple[int, int, int, int]:
    """The box of a width x height image that rows top:bottom of its upright version (after
    the EXIF ``orientation``'s transposition) come from."""
    if orientation in (3, 4):  # turned upside down: the rows from the other end
        return 0, height - bottom, width, height - top
    if orientation in (5, 6):  # upright rows are the image's columns, in order
        return top, 0, bottom, height
    if orientation in (7, 8):  # upright rows are the image's columns, from the right
        return width - bottom, 0, width - top, height
    return 0, top, width, bottom


def _band_to_rgb(band: Image.Image) -> np.ndarray:
    """One band -> RGB uint8 (h, w, 3), or (h, w, 1) for gray that broadcasts to RGB."""
    if band.mode in SIXTEEN_BIT_MODES:
        # 16-bit grayscale (common on industrial cameras): a fixed scale, the full 16-bit range
        # to 8 bits, round(v / 257) = (v + 128) // 257 exactly, so that brightness stays
        # comparable across a series of images; 32-bit "I" is clipped to 0-65535 first.
        values = np.asarray(band)
        values = np.clip(values, 0, 65535) if band.mode == "I" else values
        values = values.astype(np.uint32)
        values += 128
        values //= 257
        return values.astype(np.uint8)[:, :, None]
    if band.mode in ("RGBA", "LA") or (band.mode == "P" and "transparency" in band.info):
        # Composite on black rather than dropping alpha, so transparent areas stay uniform.
        rgba = band.convert("RGBA")
        band = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return np.asarray(band.convert("RGB"), dtype=np.uint8)


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise ImageError(f"array of shape {arr.shape} is not an image: expected HxW, HxWx1, "
                         "HxWx3 or HxWx4")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"array image has zero size (shape {arr.shape})")
    if arr.dtype != np.uint8:
        raise ImageError(f"array image has dtype {arr.dtype}, expected uint8 (0-255); convert "
                         "with np.clip(a, 0, 255).astype(np.uint8)")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    if arr.shape[2] == 4:
        return _pil_to_rgb(Image.fromarray(arr, "RGBA"), describe(arr))
    return np.ascontiguousarray(arr)


def preprocess(rgb: np.ndarray, size: tuple[int, int], mean: Sequence[float],
               std: Sequence[float]) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> normalized float32 (3, size_h, size_w)."""
    h, w = size
    im = Image.fromarray(rgb)
    if im.size != (w, h):
        im = im.resize((w, h), Image.Resampling.BICUBIC)  # PIL's resize is antialiased
    x = np.asarray(im, dtype=np.float32) * np.float32(1.0 / 255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def expand_inputs(items: Sequence[ImageInput] | ImageInput) -> list[ImageInput]:
    """Accept one input or a sequence; directories expand to their image files (sorted)."""
    if isinstance(items, (str, os.PathLike, Image.Image, np.ndarray, EncodedImage)):
        items = [items]
    out: list[ImageInput] = []
    for item in items:
        if isinstance(item, (str, os.PathLike)) and Path(item).is_dir():
            files = sorted(p for p in Path(item).rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ImageError(f"directory {str(item)!r} holds no image files "
                                 f"({', '.join(IMAGE_SUFFIXES)})")
            out.extend(files)
        else:
            out.append(item)
    return out


def expand_input_paths(paths: Sequence[str | os.PathLike]) -> list[ImageInput]:
    """Image files and folders named on a command line, folders expanded (``expand_inputs``). A
    path that does not exist is refused before any work, in one line naming it: inspected, it
    would only be one failed image under a progress bar."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        what = "path " + repr(missing[0]) if len(missing) == 1 else \
            "paths " + ", ".join(map(repr, missing))
        raise ImageError(f"input {what}: no such file or directory; expected image files or "
                         "folders of images: check the spelling, or give the full path")
    return expand_inputs(list(paths))
