"""The station file: a good file is read with its defaults; a bad one is one line naming the
key, the value and the fix; ``station --check`` prints what would run and starts nothing."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from clipinspect.runtime.cli import main
from clipinspect.runtime.station import config as station_config
from clipinspect.runtime.station.config import StationFileError, load
from clipinspect.runtime.station.pixels import PixelError, demosaic, mosaic, to_rgb

GOOD = """
[station]
name = "line1-weave"
budget_ms = 400
[bundle]
path = "{bundle}"
category = "weave"
image_threshold = 0.5
[source]
kind = "aravis"
camera = "Aravis-Fake-GV01"
pixel_format = "RGB8"
frame_rate = 10
region = [0, 0, 256, 256]
[trigger]
kind = "opcua"
[sinks.opcua]
endpoint = "opc.tcp://127.0.0.1:48401/x/"
[sinks.mqtt]
port = 18831
"""


def write(tmp_path, text: str, bundle="bundle"):
    path = tmp_path / "station.toml"
    path.write_text(textwrap.dedent(text).replace("{bundle}", str(bundle)))
    return path


def test_a_good_file_is_read_with_defaults_and_paths_relative_to_it(tmp_path):
    c = load(write(tmp_path, GOOD))
    assert c.name == "line1-weave" and c["station"]["budget_ms"] == 400.0
    assert c["station"]["fail_safe"] == "NG" and c["station"]["max_batch"] == 1
    assert c["bundle"]["path"] == str((tmp_path / "bundle").resolve())
    assert c["source"]["frame_rate"] == 10.0 and c["source"]["region"] == [0, 0, 256, 256]
    assert c.sinks == ["opcua", "mqtt"]
    assert c["sinks.mqtt"]["topic"] == "clipinspect/line1-weave"
    assert c["sinks.mqtt"]["outbox"] == str(tmp_path.resolve() / "line1-weave-mqtt-outbox.sqlite")
    assert c["http"] == {"host": "127.0.0.1", "port": 8090, "enabled": True}


@pytest.mark.parametrize("change, expected", [
    (("budget_ms = 400", "budget_ms = -5"),
     "[station] budget_ms = -5: expected a number > 0; the most milliseconds"),
    (("budget_ms = 400", "budget_ms = \"fast\""), "[station] budget_ms = 'fast': expected a number"),
    (("budget_ms = 400", "budget_ms = true"), "[station] budget_ms = True: expected a number"),
    (("budget_ms = 400", "budgte_ms = 400"),
     "unknown key [station] budgte_ms (did you mean 'budget_ms'?)"),
    (("pixel_format = \"RGB8\"", "pixel_format = \"RGB9\""),
     "[source] pixel_format = 'RGB9': expected one of Mono8, Mono16, RGB8, BGR8, BayerRG8, "
     "BayerGR8, BayerGB8, BayerBG8 (did you mean 'RGB8'?)"),
    (("region = [0, 0, 256, 256]", "region = [0, 0, 256]"),
     "[source] region = [0, 0, 256]: expected [x, y, width, height]"),
    (("kind = \"aravis\"", "kind = \"gige\""), "[source] kind = 'gige': expected one of aravis, "
                                               "opencv, folder"),
    (("[sinks.mqtt]", "[sinks.mqqt]"), "unknown section [sinks.mqqt] (did you mean [sinks.mqtt]?)"),
    (("fail_safe", "fail_safe"), None),
    (("category = \"weave\"", ""), "[bundle] category is missing"),
    (("name = \"line1-weave\"", "name = \"line 1\""),
     "[station] name = 'line 1': expected letters, digits, '-' and '_' only"),
    (("endpoint = \"opc.tcp://127.0.0.1:48401/x/\"", "endpoint = \"http://x\""),
     "[sinks.opcua] endpoint = 'http://x': expected an address opc.tcp://HOST:PORT/PATH"),
    (("[sinks.opcua]\nendpoint = \"opc.tcp://127.0.0.1:48401/x/\"", ""),
     "[trigger] kind = 'opcua' needs a [sinks.opcua] section"),
    (("kind = \"opcua\"", "kind = \"camera\"\n[x]"), "unknown section [x]"),
])
def test_a_bad_file_is_one_line_naming_key_value_and_fix(tmp_path, change, expected):
    old, new = change
    path = write(tmp_path, GOOD.replace(old, new, 1))
    if expected is None:
        load(path)
        return
    with pytest.raises(StationFileError) as e:
        load(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(path))
    assert expected in message


def test_toml_errors_and_missing_files_are_one_line(tmp_path):
    with pytest.raises(StationFileError, match="does not exist; docs/station.md"):
        load(tmp_path / "none.toml")
    with pytest.raises(StationFileError, match="not valid TOML"):
        load(write(tmp_path, "[station\nname = 1"))
    with pytest.raises(StationFileError, match="the \\[source\\] section is missing"):
        load(write(tmp_path, "[station]\nname = 'a'\n[bundle]\npath = 'b'\ncategory = 'c'\n"))
    with pytest.raises(StationFileError, match="needs \\[source\\] folder"):
        load(write(tmp_path, "[station]\nname='a'\n[bundle]\npath='b'\ncategory='c'\n"
                             "[source]\nkind='folder'\n"))
    with pytest.raises(StationFileError, match="'camera' needs \\[source\\] kind = 'aravis'"):
        load(write(tmp_path, "[station]\nname='a'\n[bundle]\npath='b'\ncategory='c'\n"
                             "[source]\nkind='folder'\nfolder='in'\n[trigger]\nkind='camera'\n"))


def test_check_prints_the_plan_and_a_bad_category_names_the_bundles(tiny_bundle_path, tmp_path,
                                                                   capsys):
    text = GOOD.replace("{bundle}", str(tiny_bundle_path))
    assert main(["station", str(write(tmp_path, text)), "--check"]) == 0
    out = capsys.readouterr().out
    assert "station line1-weave: budget 400 ms, fail-safe NG" in out
    assert "source aravis: camera Aravis-Fake-GV01 (pixel_format RGB8, frame_rate 10.0" in out
    assert "sink opcua: opc.tcp://127.0.0.1:48401/x/" in out
    assert "image threshold: 0.5 (from the file)" in out and out.rstrip().endswith(": OK")
    assert main(["station", str(write(tmp_path, text.replace('"weave"', '"weeve"'))),
                 "--check"]) == 2
    err = capsys.readouterr().err
    assert ("[bundle] category = 'weeve' is not in the bundle (did you mean 'weave'?); it has: "
            "washer, weave") in err
    # No threshold in the file and none fitted in the bundle: the station cannot decide.
    assert main(["station", str(write(tmp_path, text.replace("image_threshold = 0.5", ""))),
                 "--check"]) == 2
    assert "has no image threshold for fp32/zero-shot" in capsys.readouterr().err


def test_every_documented_example_file_is_valid(tiny_bundle_path):
    from pathlib import Path
    examples = sorted((Path(__file__).resolve().parents[1] / "docs" / "station").glob("*.toml"))
    kinds = {load(p)["source"]["kind"] for p in examples}
    assert kinds == set(station_config.SOURCE_KINDS)


# ---------------------------------------------------------------------------- pixels
def test_pixel_formats_convert_to_rgb():
    rgb = np.random.default_rng(0).integers(0, 256, (6, 8, 3), np.uint8)
    assert np.array_equal(to_rgb(rgb.tobytes(), "RGB8", 8, 6), rgb)
    assert np.array_equal(to_rgb(rgb[:, :, ::-1].tobytes(), "BGR8", 8, 6), rgb)
    mono = rgb[:, :, 0]
    assert np.array_equal(to_rgb(mono.tobytes(), "Mono8", 8, 6), np.stack([mono] * 3, -1))
    wide = (mono.astype("<u2") * 257).tobytes()  # the full 16-bit range
    assert np.array_equal(to_rgb(wide, "Mono16", 8, 6)[:, :, 1], mono)
    with pytest.raises(PixelError, match="needs 144 bytes, got 143"):
        to_rgb(rgb.tobytes()[:143], "RGB8", 8, 6)
    with pytest.raises(PixelError, match="'YUV422' is not supported"):
        to_rgb(b"", "YUV422", 1, 1)


@pytest.mark.parametrize("fmt", ["BayerRG8", "BayerGR8", "BayerGB8", "BayerBG8"])
def test_bayer_demosaicing_keeps_flat_colours_and_places_each_colour(fmt):
    flat = np.empty((8, 10, 3), np.uint8)
    flat[:] = (200, 90, 30)
    assert np.array_equal(demosaic(mosaic(flat, fmt), fmt), flat)
    # A smooth image comes back close; the wrong pattern would swap red and blue.
    y, x = np.mgrid[0:32, 0:32]
    smooth = np.stack([4 * x + 60, 2 * y + 50, 200 - 3 * x], -1).astype(np.uint8)
    back = to_rgb(mosaic(smooth, fmt).tobytes(), fmt, 32, 32).astype(int)
    assert np.abs(back[1:-1, 1:-1] - smooth[1:-1, 1:-1]).max() <= 2
    assert np.abs(back - smooth).mean() < 1.5
