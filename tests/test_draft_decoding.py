"""Decoding for the model: a JPEG decoded by DCT scaling down to what the encoder needs, its map
still at the full size the pixel limit allows, and the peak memory per image that
``clipinspect bench`` reports."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from clipinspect.benchmarks.rss_probe import rss_per_image, write_jpeg
from clipinspect.runtime import Inspector
from clipinspect.runtime.core import images
from clipinspect.runtime.core.images import EncodedImage, decode, preprocess, set_max_megapixels

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


pytestmark = pytest.mark.usefixtures("default_decoding")


def textured_jpeg(size: tuple[int, int], **save) -> bytes:
    """A JPEG with edges and texture at every scale (where DCT scaling and a resize differ)."""
    rng = np.random.default_rng(3)
    tile = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    im = Image.fromarray(tile).resize(size, Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=92, **save)
    return buf.getvalue()


def test_a_jpeg_is_decoded_at_the_smallest_scale_that_covers_the_model_input():
    data = EncodedImage(textured_jpeg((4000, 3000)))
    d = decode(data, model_side=240)
    assert d.rgb.shape == (375, 500, 3)      # 1/8: both sides >= 240
    assert d.size == (3000, 4000)            # the map keeps the file's size
    assert decode(data, model_side=400).rgb.shape == (750, 1000, 3)   # 1/8 would be 375 < 400
    assert decode(data).rgb.shape == (3000, 4000, 3)                  # no model side: whole


def test_draft_decoding_matches_decode_then_resize_within_a_stated_tolerance():
    """The documented difference (docs/precision.md): DCT scaling averages 8x8 blocks before the
    bicubic resize, so on this hard-edged random texture the model input differs from a full
    decode by about 0.012 on average (normalized units, under one 8-bit level) and correlates
    > 0.999; on the synthetic inspection images the mean is 0.004-0.006."""
    data = EncodedImage(textured_jpeg((4000, 3000)))
    full = preprocess(decode(data).rgb, (240, 240), MEAN, STD)
    draft = preprocess(decode(data, model_side=240).rgb, (240, 240), MEAN, STD)
    diff = np.abs(full - draft)
    assert diff.mean() < 0.02
    assert np.corrcoef(full.ravel(), draft.ravel())[0, 1] > 0.999
    assert diff.max() > 0  # it is a different decode, not the same pixels


def test_rotated_jpeg_reports_its_map_size_upright():
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = 6  # rotated 90 degrees
    d = decode(EncodedImage(textured_jpeg((4000, 3000), exif=exif)), model_side=240)
    assert d.size == (4000, 3000)
    assert d.rgb.shape == (500, 375, 3)


def test_the_limit_is_on_the_decoded_size_and_bounds_the_map():
    set_max_megapixels(1)  # 12 MP needs 1/4 per side (1000x750) to fit
    data = EncodedImage(textured_jpeg((4000, 3000)))
    assert decode(data).rgb.shape == (750, 1000, 3)
    d = decode(data, model_side=240)
    assert d.size == (750, 1000) and d.rgb.shape == (375, 500, 3)
    set_max_megapixels(0.01)  # even 1/8 (500x375) is over: refused, with what to do
    with pytest.raises(images.ImageError, match=r"4000x3000.*--max-megapixels"):
        decode(data, model_side=240)


def test_formats_without_reduced_decoding_are_decoded_whole():
    buf = io.BytesIO()
    Image.new("RGB", (1200, 900), (10, 20, 30)).save(buf, format="PNG")
    d = decode(EncodedImage(buf.getvalue()), model_side=240)
    assert d.rgb.shape == (900, 1200, 3) and d.size == (900, 1200)


def test_inspector_maps_keep_the_full_size_and_kept_images_match_them(tiny_bundle_path,
                                                                      tmp_path):
    path = tmp_path / "large.jpg"
    path.write_bytes(textured_jpeg((2400, 1800)))
    inspector = Inspector.open(tiny_bundle_path)
    plain = inspector.inspect([path], "weave", mode="zero-shot")[0]
    kept = inspector.inspect([path], "weave", mode="zero-shot", keep_images=True)[0]
    assert plain.anomaly_map.shape == kept.anomaly_map.shape == (1800, 2400)
    assert kept.image.shape == (1800, 2400, 3)
    # By default the model sees decode-then-resize whether or not the image is kept.
    assert plain.image_score == kept.image_score
    np.testing.assert_array_equal(plain.anomaly_map, kept.anomaly_map)


def test_reduced_jpeg_decoding_only_when_asked(tiny_bundle_path, tmp_path, monkeypatch):
    path = tmp_path / "large.jpg"
    path.write_bytes(textured_jpeg((2400, 1800)))
    inspector = Inspector.open(tiny_bundle_path)
    whole = inspector.load(path).tensor
    monkeypatch.setenv(images.JPEG_DRAFT_ENV, "1")
    reduced = inspector.load(path).tensor
    assert reduced.shape == whole.shape and not np.array_equal(reduced, whole)
    assert np.abs(reduced - whole).mean() < 0.05
    images.set_jpeg_draft(False)   # the CLI's setting wins over the environment
    try:
        np.testing.assert_array_equal(inspector.load(path).tensor, whole)
    finally:
        images.set_jpeg_draft(None)
    monkeypatch.setenv(images.JPEG_DRAFT_ENV, "maybe")
    with pytest.raises(images.ImageError, match="CLIPINSPECT_JPEG_DRAFT='maybe': expected 1 or 0"):
        images.jpeg_draft()


def test_peak_rss_per_image_is_measured_in_a_child_process_per_size(tiny_bundle_path, tmp_path):
    rows = rss_per_image(tiny_bundle_path, tmp_path, [0.5, 3], max_megapixels=1)
    small, large = rows
    assert small["error"] is None and small["map_size"] == [612, 816]
    assert small["peak_rss_mb"] >= small["steady_peak_rss_mb"] > 50
    assert small["per_image_mb"] >= 0
    # 3 MP (2000x1500) over a 1 MP limit: decoded at 1/2 per side, the map too.
    assert large["error"] is None and large["map_size"] == [750, 1000]
    assert not list(tmp_path.glob("*.jpg"))  # the probe images are removed


def test_a_refused_size_is_reported_with_the_reason(tiny_bundle_path, tmp_path):
    row = rss_per_image(tiny_bundle_path, tmp_path, [2], max_megapixels=0.01)[0]
    assert "over the limit" in row["error"] and "--max-megapixels" in row["error"]
    assert row["map_size"] is None


def test_probe_jpeg_has_the_asked_size(tmp_path):
    width, height = write_jpeg(tmp_path / "p.jpg", 12)
    assert (width, height) == (4000, 3000)
    assert Image.open(tmp_path / "p.jpg").size == (4000, 3000)


def test_the_probe_reports_the_childs_own_peak_not_the_parents(tiny_bundle_path, tmp_path):
    """ru_maxrss would start at the parent's peak (Linux keeps it across exec): with a parent
    larger than the child, every image would add 0."""
    ballast = np.ones(600 * 2**20, np.uint8)  # a parent well above the child's peak
    row = rss_per_image(tiny_bundle_path, tmp_path, [3])[0]
    assert row["error"] is None and row["map_size"] == [1500, 2000]
    assert row["steady_peak_rss_mb"] < ballast.nbytes / 2**20
    # 3 MP decoded whole: at least the RGB result (3 bytes/pixel) and its float32 map.
    assert row["per_image_mb"] > 3e6 * (3 + 4) / 2**20


def test_the_probe_measures_the_decode_attack_kinds(tiny_bundle_path, tmp_path):
    from clipinspect.benchmarks.rss_probe import parse_kinds, rss_per_kind

    kinds = parse_kinds("png16:1500x1000,tiff32:1500x1000,tiff-float:1500x1000,la:1500x1000,"
                        "rgba:1500x1000,webp:1500x1000,jpeg:1500x1000")
    rows = rss_per_kind(tiny_bundle_path, tmp_path, kinds)
    assert [row["kind"] for row in rows] == ["png16", "tiff32", "tiff-float", "la", "rgba",
                                             "webp", "jpeg"]
    pixels_mib = 1.5e6 / 2**20
    for row in rows:
        assert row["error"] is None and row["map_size"] == [1000, 1500], row
        assert row["file_mb"] > 0 and row["per_image_mb"] >= row["decode_mb"]
        # The bound of docs/security.md: 5 bytes/pixel for 16-bit gray, 8 for 32-bit TIFF (and
        # its largest strip, small here), 17 for WebP, 7 for the rest, plus 16 MiB.
        per_pixel = {"png16": 5, "tiff32": 8, "tiff-float": 8, "webp": 17}.get(row["kind"], 7)
        assert 3 * pixels_mib <= row["decode_mb"] <= per_pixel * pixels_mib + 16, row
    assert not list(tmp_path.iterdir())  # the probe images are removed
    with pytest.raises(SystemExit, match="KIND:WIDTHxHEIGHT"):
        parse_kinds("gif:10x10")
