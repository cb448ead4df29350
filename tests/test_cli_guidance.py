"""Messages that guide: a case slip is named, the add-category hint can be pasted into a shell,
an empty file is called empty, a skipped image reads as one, and add-category says first that it
needs torch."""

from __future__ import annotations

import shlex
import shutil
import sys

import pytest

from clipinspect.runtime.cli import main
from clipinspect.runtime.core.backends import backend_class
from clipinspect.runtime.core.bundle import Bundle
from clipinspect.runtime.core.errors import ClipInspectError, did_you_mean
from clipinspect.runtime.core.images import EncodedImage, ImageError, to_rgb_array


def test_did_you_mean_names_a_choice_that_differs_only_in_case():
    assert did_you_mean("Weave", ["washer", "weave"]) == " (did you mean 'weave'?)"
    assert did_you_mean("bottle", ["washer", "weave"]) == ""
    assert did_you_mean("weave", ["weave"]) == ""


def test_unknown_category_suggests_the_case_and_a_pasteable_add_category(tiny_bundle_path,
                                                                       tmp_path):
    root = shutil.copytree(tiny_bundle_path, tmp_path / "my bundle")
    bundle = Bundle.open(root)
    with pytest.raises(ClipInspectError) as e:
        bundle.category("Weave")
    msg = str(e.value)
    assert "(did you mean 'weave'?)" in msg and "export extra" in msg
    command = msg.split("with: ", 1)[1]
    assert shlex.split(command) == ["clipinspect", "add-category", str(root), "Weave"]


def test_unknown_category_without_a_case_match_suggests_nothing(tiny_bundle_path):
    with pytest.raises(ClipInspectError) as e:
        Bundle.open(tiny_bundle_path).category("bottle")
    assert "did you mean" not in str(e.value)
    assert str(e.value).endswith(f"add-category {shlex.quote(str(tiny_bundle_path))} bottle")


def test_precision_and_provider_case_slips_are_named(tiny_bundle_path):
    with pytest.raises(ClipInspectError, match=r"'FP32' graphs \(did you mean 'fp32'\?\)"):
        Bundle.open(tiny_bundle_path).graph_path("FP32", "encoder")
    with pytest.raises(ClipInspectError, match=r"\(did you mean 'cpu'\?\): choose one of"):
        backend_class("CPU")


def test_cli_choice_options_name_the_case_slip(capsys, tiny_bundle_path, tmp_path):
    with pytest.raises(SystemExit):
        main(["predict", str(tiny_bundle_path), str(tmp_path), "--category", "weave",
              "--provider", "CPU"])
    assert "invalid choice 'CPU' (did you mean 'cpu'?)" in capsys.readouterr().err


def test_an_empty_file_is_called_empty(tmp_path):
    empty = tmp_path / "frame.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"'.*frame.png' is empty \(0 bytes\)"):
        to_rgb_array(empty)
    with pytest.raises(ImageError, match=r"upload is empty \(0 bytes\)"):
        to_rgb_array(EncodedImage(b"", "upload"))


def test_a_skipped_image_is_reported_with_a_colon(capsys, tiny_bundle_path, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")  # a missing path is refused instead
    rc = main(["predict", str(tiny_bundle_path), str(tmp_path / "broken.png"), "--category",
               "weave", "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "clipinspect: skipped: '" in capsys.readouterr().err


def test_add_category_says_first_that_it_needs_the_export_extra(capsys, monkeypatch,
                                                                 tiny_bundle_path):
    import clipinspect.export

    monkeypatch.setitem(sys.modules, "clipinspect.export.exporter", None)  # import fails
    monkeypatch.delattr(clipinspect.export, "exporter", raising=False)  # even if imported before
    rc = main(["add-category", str(tiny_bundle_path)])  # no names: still the extra comes first
    err = capsys.readouterr().err
    assert rc == 2 and "needs the export extra" in err and "pip install" in err
