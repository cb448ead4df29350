"""``clipinspect triton`` against a hostile bundle or a careless --out: no name can break out of
its config.pbtxt field, category arrays reach only a repository serving the same heads, two
categories never share a folder, --overwrite removes only what clipinspect wrote, and an --out
that holds the current folder or the bundle is a one-line error. No Triton server is run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from clipinspect.runtime import Bundle
from clipinspect.runtime.core.bundle import sha256_file
from clipinspect.runtime.core.errors import ClipInspectError, UsageError
from clipinspect.runtime.triton import repository as triton

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402

# What the review used: ends the name's string and the tensor, then declares a Python-backend
# model with an execution environment of the attacker's choosing.
INJECTED = ('image_embedding"\n    data_type: TYPE_FP32\n  }\n]\nbackend: "python"\n'
            'parameters { key: "EXECUTION_ENV_PATH" value: { string_value: "/tmp/env.tar.gz" } }'
            '\ninput [\n  {\n    name: "x')


def cli(*args) -> int:
    from clipinspect.runtime.cli import main

    return main([str(a) for a in args])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipinspect: error:") and "\n" not in err, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("value", [
    "plain", 'a "quoted" name', "line\nnext", "back\\slash", "\\\"", 'x"\nbackend: "python"',
    "tab\tcr\r nul\0 end", "métal nut 日本", "'single'"])
def test_pbtxt_strings_round_trip_through_protobufs_parser(value):
    text = f"name: {triton.pbtxt_string(value)}\nmax_batch_size: 3\n"
    assert "\n" not in triton.pbtxt_string(value)
    cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert cfg.name == value
    assert cfg.backend == "" and cfg.max_batch_size == 3 and not cfg.parameters


def _rename_head_input(bundle: Path, graph: str, old: str, new: str, in_manifest: bool) -> None:
    """Rename a head graph's input (and, with ``in_manifest``, the manifest's list of its
    inputs), with checksum and size updated as an attacker would: the bundle still verifies.
    Graph-only: the manifest's names are checked when it is read, the graph's own names are
    what the repository writer reads, so it checks them itself."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = manifest["graphs"]["fp32"][graph]
    path = bundle / entry["file"]
    model = onnx.load(str(path))
    for value in model.graph.input:
        if value.name == old:
            value.name = new
    for node in model.graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
    path.write_bytes(model.SerializeToString())
    entry["sha256"], entry["bytes"] = sha256_file(path), path.stat().st_size
    if in_manifest:
        entry["inputs"] = [new if n == old else n for n in entry["inputs"]]
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("in_manifest", [False, True], ids=["graph-only", "graph+manifest"])
def test_an_injected_tensor_name_is_refused_and_nothing_is_written(tiny_bundle_copy, tmp_path,
                                                                   capsys, in_manifest):
    _rename_head_input(tiny_bundle_copy, "head_fewshot", "image_embedding", INJECTED,
                       in_manifest)
    out = tmp_path / "models"
    assert cli("triton", tiny_bundle_copy, "--out", out) == 2
    one_line_error(capsys)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no partial repository


def test_a_tensor_name_outside_the_character_set_is_refused():
    for name in ("image_embedding", "_x", "window_embeddings_2"):
        assert triton.check_tensor_name(name, "test") == name
    for name in ('a"b', "a\nb", "1abc", "a b", "a-b", "", "x" * 129, "é"):
        with pytest.raises(ClipInspectError, match="plain tensor names"):
            triton.check_tensor_name(name, "test")


def test_categories_only_refuses_a_bundle_whose_heads_differ(tmp_path):
    from tinybundle import build_tiny_bundle

    adapted = build_tiny_bundle(tmp_path / "adapted", adaptation={"tau": 0.07})
    plain = build_tiny_bundle(tmp_path / "plain")
    assert adapted.identity == plain.identity  # same encoder: the identity alone cannot tell
    repo = triton.write_repository(adapted.root, tmp_path / "models")
    before = {p: p.read_bytes() for p in (repo / triton.CATEGORIES).rglob("*.npz")}
    with pytest.raises(UsageError, match="other scoring heads"):
        triton.write_repository(plain.root, repo, categories_only=True)
    assert {p: p.read_bytes() for p in (repo / triton.CATEGORIES).rglob("*.npz")} == before
    triton.write_repository(adapted.root, repo, categories_only=True)  # the same bundle: fine


def test_two_categories_sharing_a_folder_are_refused_before_writing(tmp_path):
    text = {"text_prototypes": np.zeros((2, 4), np.float32)}
    for names in (["metal nut", "metal_nut"], ["Bottle", "bottle"]):
        bundle = SimpleNamespace(categories=names,
                                 category=lambda name: SimpleNamespace(text=text, memory={}))
        with pytest.raises(UsageError, match="share the folder"):
            triton.write_categories(bundle, tmp_path / "models")
        assert not (tmp_path / "models").exists()


def test_overwrite_removes_only_what_clipinspect_wrote(tiny_bundle_copy, tmp_path, capsys):
    from clipinspect.runtime import Inspector

    out = triton.write_repository(tiny_bundle_copy, tmp_path / "models")
    # A category added later and refreshed is recorded too: the next --overwrite may remove it.
    rng = np.random.default_rng(0)
    Inspector.open(tiny_bundle_copy).add_references(
        "weave", [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)])
    triton.write_repository(tiny_bundle_copy, out, categories_only=True)
    cache = out / triton.CATEGORIES / "1" / "__pycache__"
    cache.mkdir()
    (cache / "model.cpython-311.pyc").write_bytes(b"left by the Python backend")
    triton.write_repository(tiny_bundle_copy, out, overwrite=True)
    assert (out / triton.ENCODER / "config.pbtxt").is_file() and not cache.exists()

    notes = out / "notes.txt"
    notes.write_text("the operator's notes")
    mine = out / triton.ENCODER / "2" / "model.onnx"
    mine.parent.mkdir()
    mine.write_bytes(b"another version")
    assert cli("triton", tiny_bundle_copy, "--out", out, "--overwrite") == 2
    err = one_line_error(capsys)
    assert "clipinspect did not write" in err and "(and " in err
    assert notes.read_text() == "the operator's notes" and mine.read_bytes() == b"another version"

    (out / triton.CATEGORIES / triton.IDENTITY_FILE).unlink()  # e.g. an older clipinspect's
    notes.unlink()
    shutil.rmtree(mine.parent)
    assert cli("triton", tiny_bundle_copy, "--out", out, "--overwrite") == 2
    assert "does not record what clipinspect wrote" in one_line_error(capsys)
    assert (out / triton.ENCODER / "config.pbtxt").is_file()


def test_an_out_holding_the_current_folder_or_the_bundle_is_a_one_line_error(
        tiny_bundle_copy, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # empty: '--out .' was a raw ValueError (a path with no name)
    for out in (".", work, tmp_path, tiny_bundle_copy, tiny_bundle_copy / "models"):
        assert cli("triton", tiny_bundle_copy, "--out", out) == 2, out
        one_line_error(capsys)
    assert not list(work.iterdir())
    assert Bundle.open(tiny_bundle_copy).categories == ["washer", "weave"]
    assert not (tiny_bundle_copy / "models").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "work"]
    assert cli("triton", tiny_bundle_copy, "--out", "models") == 0  # a folder of its own
    assert (work / "models" / triton.ENCODER / "config.pbtxt").is_file()


def test_python_platform_parameters_parse_back_to_their_values(tiny_bundle_path, tmp_path):
    from clipinspect.runtime.triton import python_model

    out = triton.write_repository(tiny_bundle_path, tmp_path / "models", platform="python")
    for name in (triton.ENCODER, triton.CATEGORIES, *triton.HEADS.values()):
        cfg = text_format.Parse((out / name / "config.pbtxt").read_text(),
                                model_config_pb2.ModelConfig())
        assert cfg.backend == "python" and cfg.name == name
        paths = cfg.parameters[python_model.SITE_PACKAGES].string_value
        assert json.loads(paths) == python_model.site_packages()
    enc = text_format.Parse((out / triton.ENCODER / "config.pbtxt").read_text(),
                            model_config_pb2.ModelConfig())
    preprocessing = json.loads(enc.parameters["clipinspect_preprocessing"].string_value)
    assert preprocessing["bundle"] == Bundle.open(tiny_bundle_path).identity
