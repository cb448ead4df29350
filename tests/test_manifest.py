"""The manifest contract: typed, versioned, validated with one-line errors; format version 1
bundles still open and inspect identically; every path a manifest names stays in the bundle."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipinspect.runtime import Bundle, BundleError, Inspector
from clipinspect.runtime.cli import main
from clipinspect.runtime.core.bundle import check_category_name
from clipinspect.runtime.core.manifest import (CATEGORY_NAME, FORMAT_VERSION, Manifest,
                                               ManifestError, is_category_name)

V1 = Path(__file__).parent / "data" / "v1-vit-s-16" / "manifest.json"


def v1_manifest() -> dict:
    """manifest.json of a ViT-S-16 bundle (random weights, seed 0, categories weave and washer)
    as the exporter wrote it before format version 2."""
    return json.loads(V1.read_text())


def write_manifest(root: Path, manifest: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(manifest))


# ------------------------------------------------------------------------ structure, versions
def test_version_1_is_migrated_and_round_trips():
    d = v1_manifest()
    m = Manifest.from_dict(d, "test")
    assert m.format_version == FORMAT_VERSION == 2
    assert m.preprocess.size == (224, 224) and m.preprocess.mean[0] == pytest.approx(0.48145466)
    assert m.categories["weave"].memory is None and m.categories["weave"].thresholds == {}
    assert m.graphs["fp32"]["encoder"].outputs == m.outputs
    expected = {**{k: v for k, v in d.items() if k != "input"}, "format_version": 2,
                "preprocess": d["input"]}
    assert m.to_dict() == expected
    assert Manifest.from_dict(m.to_dict(), "test").to_dict() == expected
    assert d["format_version"] == 1 and "input" in d  # the caller's dict is left alone


def test_unknown_keys_are_kept_on_rewrite():
    d = v1_manifest()
    d["future_feature"] = {"nested": [1, 2]}
    d["categories"]["weave"]["future_per_category"] = "x"
    d["graphs"]["fp32"]["encoder"]["future_per_file"] = 3
    out = Manifest.from_dict(d, "test").to_dict()
    assert out["future_feature"] == {"nested": [1, 2]}
    assert out["categories"]["weave"]["future_per_category"] == "x"
    assert out["graphs"]["fp32"]["encoder"]["future_per_file"] == 3


def _paths(value, prefix=()):
    """Every key path of a JSON value."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def test_any_malformed_value_is_a_one_line_manifest_error_never_a_crash():
    """Each value of a real manifest replaced by the wrong kind, or deleted: either still a
    valid manifest (an optional or free-form value) or a ManifestError of one line."""
    base = v1_manifest()
    errors = 0
    for path in list(_paths(base)):
        for bad in (None, "x", 7, [], {}, [[{"file": "a"}]], True, -1.5, "__delete__"):
            d = copy.deepcopy(base)
            parent = d
            for key in path[:-1]:
                parent = parent[key]
            if bad == "__delete__":
                if isinstance(parent, list):
                    continue
                del parent[path[-1]]
            else:
                parent[path[-1]] = bad
            try:
                Manifest.from_dict(d, "bundle 'b'").to_dict()
            except ManifestError as e:
                errors += 1
                assert "\n" not in str(e) and str(e).startswith("bundle 'b': "), str(e)
    assert errors > 500


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("grid"), "lacks the key 'grid'"),
    (lambda d: d.update(categories=["weave"]), r"key 'categories' is \['weave'\], expected an obj"),
    (lambda d: d["input"].update(size=[224]), r"'preprocess.size' is \[224\], expected \[height"),
    (lambda d: d["input"].update(std=[0.2, 0.0, 0.2]), "expected 3 positive numbers"),
    (lambda d: d["input"].update(resize="center-crop"), "this clipinspect resizes only that way"),
    (lambda d: d["graphs"].update(fp32=[]), r"'graphs.fp32' is \[\], expected an object"),
    (lambda d: d["categories"]["weave"].update(memory={"file": "m.npz"}),
     "lacks the key 'categories.weave.memory.sha256'"),
    (lambda d: d["categories"]["weave"].update(thresholds={"fp32/zero-shot": {"image": "hi"}}),
     r"'categories.weave.thresholds.fp32/zero-shot.image' is 'hi', expected a finite number"),
    (lambda d: d.update(adaptation={"kind": "contextual", "tau": 0}), "'adaptation.tau' is 0"),
    (lambda d: d["model"].update(weights={"kind": "file"}), "lacks the key 'model.weights.sha2"),
    (lambda d: d.update(format_version="1"), "format version '1' is not supported"),
    (lambda d: d.update(format="other"), "not a clipinspect manifest"),
    (lambda d: d.update(input=None, preprocess=d["input"]), "no such key in a version 1"),
])
def test_malformed_manifests_say_which_key(mutate, message):
    d = v1_manifest()
    mutate(d)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(d, "bundle 'b'")


def test_deeply_nested_or_non_object_json_is_refused_cleanly(bundle_copy):
    for text in ("[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000,
                 "[1, 2]", "null", "\xff"):
        (bundle_copy / "manifest.json").write_text(text, errors="surrogateescape")
        with pytest.raises(BundleError) as e:
            Bundle.open(bundle_copy)
        assert "\n" not in str(e.value)


def test_bundle_writes_version_2_when_it_rewrites_a_version_1_manifest(bundle_copy):
    """The few-shot memory written into a version-1 bundle leaves a version-2 manifest."""
    v1 = _as_version_1(bundle_copy)
    write_manifest(bundle_copy, v1)
    bundle = Bundle.open(bundle_copy)
    bundle.set_thresholds("weave", "fp32/zero-shot", {"image": 0.5})
    on_disk = json.loads((bundle_copy / "manifest.json").read_text())
    assert on_disk["format_version"] == 2 and "input" not in on_disk
    assert on_disk["preprocess"] == v1["input"]
    stored = Bundle.open(bundle_copy).manifest.categories["weave"].thresholds
    assert {k: t.to_dict() for k, t in stored.items()} == {"fp32/zero-shot": {"image": 0.5}}


def _as_version_1(fresh: Path) -> dict:
    """The committed version-1 manifest pointed at the files of the bundle ``fresh`` (exported
    by this version): its file entries take the fresh files' names, sha256 and sizes, and its
    shape fields the fresh model's (the committed one is ViT-S-16's, the tests' is ViT-S-32)."""
    current = json.loads((fresh / "manifest.json").read_text())
    v1 = v1_manifest()
    v1["model"]["name"] = current["model"]["name"]
    for key in ("grid", "patch_size", "windows", "dims"):
        v1[key] = current[key]
    for precision, graphs in v1["graphs"].items():
        for name, entry in graphs.items():
            new = current["graphs"][precision][name]
            assert new["file"] == entry["file"] and new["inputs"] == entry["inputs"]
            entry.update(sha256=new["sha256"], bytes=new["bytes"])
    for name, entry in v1["categories"].items():
        for key in ("text", "prompts"):
            entry[key] = current["categories"][name][key]
    return v1


def test_version_1_bundle_gives_identical_results(small_bundle_path, tmp_path, rng):
    fresh = shutil.copytree(small_bundle_path, tmp_path / "fresh")
    old = shutil.copytree(small_bundle_path, tmp_path / "v1")
    write_manifest(old, _as_version_1(fresh))
    assert json.loads((old / "manifest.json").read_text())["format_version"] == 1
    images = [rng.integers(0, 256, (90, 120, 3), dtype=np.uint8) for _ in range(2)]
    refs = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]
    results = {}
    for name, path in (("fresh", fresh), ("v1", old)):
        # The graphs a version-1 bundle has: the standard encoder (no fused-attention one).
        inspector = Inspector.open(path, attention="standard")
        zero = inspector.inspect(images, "washer")
        inspector.add_references("washer", refs)
        few = Inspector.open(path, attention="standard").inspect(images, "washer")
        results[name] = zero + few
    assert [r.mode for r in results["v1"]] == ["zero-shot"] * 2 + ["few-shot"] * 2
    for a, b in zip(results["fresh"], results["v1"]):
        assert a.image_score == b.image_score
        assert np.array_equal(a.anomaly_map, b.anomaly_map)


# ------------------------------------------------------------------------------ confinement
@pytest.fixture
def victim(tmp_path) -> Path:
    """A file outside the bundle that a crafted manifest points to."""
    path = tmp_path / "victim.txt"
    path.write_text("not the bundle's")
    return path


def _point(bundle: Path, category: str, key: str, target: str, victim: Path) -> None:
    """Make ``categories.<category>.<key>`` name ``target``, with the victim's true sha256."""
    import hashlib

    m = json.loads((bundle / "manifest.json").read_text())
    entry = {"file": target, "sha256": hashlib.sha256(victim.read_bytes()).hexdigest(),
             "bytes": victim.stat().st_size}
    if key == "memory":
        entry.update(shots=1, sources=["x.png"])
    m["categories"][category][key] = entry
    write_manifest(bundle, m)


def test_relative_escape_is_refused_by_info_and_add_category_deletes_nothing(
        bundle_copy, victim, capsys):
    assert victim.parent == bundle_copy.parent
    _point(bundle_copy, "weave", "prompts", "../victim.txt", victim)
    assert main(["info", str(bundle_copy)]) == 2
    err = capsys.readouterr().err
    assert "categories.weave.prompts.file" in err and "'../victim.txt'" in err
    assert main(["add-category", str(bundle_copy), "weave", "--replace"]) == 2
    assert victim.is_file()


def test_absolute_memory_path_does_not_let_fewshot_delete_it(bundle_copy, victim, tmp_path):
    from PIL import Image

    _point(bundle_copy, "weave", "memory", str(victim), victim)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "ref.png")
    assert main(["fewshot", str(bundle_copy), str(tmp_path / "ref.png"), "--category",
                 "weave"]) == 2
    assert victim.is_file()


def test_manifest_changed_under_an_open_bundle_is_checked_before_deleting(bundle_copy, victim):
    bundle = Bundle.open(bundle_copy)
    _point(bundle_copy, "weave", "prompts", "../victim.txt", victim)
    with pytest.raises(BundleError, match="victim.txt"):
        bundle.set_thresholds("weave", "fp32/zero-shot", {"image": 0.5})
    assert victim.is_file()


def test_symlinked_folder_leaving_the_bundle_is_refused(bundle_copy, tmp_path):
    outside = shutil.move(bundle_copy / "categories" / "weave", tmp_path / "elsewhere")
    os.symlink(outside, bundle_copy / "categories" / "weave")
    with pytest.raises(BundleError, match=r"text embeddings of category 'weave' .* outside the "
                                          r"bundle"):
        Bundle.open(bundle_copy)


def test_symlink_inside_the_bundle_is_fine(bundle_copy):
    folder = bundle_copy / "categories"
    shutil.move(folder / "weave", folder / "weave-real")
    os.symlink("weave-real", folder / "weave")
    Bundle.open(bundle_copy).category("weave")


# ------------------------------------------------------------------------------ category names
def test_category_name_with_a_trailing_newline_is_refused():
    assert is_category_name("grain") and not is_category_name("grain\n")
    with pytest.raises(BundleError, match="invalid category name"):
        check_category_name("grain\n")
    d = v1_manifest()
    d["categories"]["grain\n"] = d["categories"].pop("weave")
    with pytest.raises(ManifestError, match=r"'grain\\n'"):
        Manifest.from_dict(d, "b")


def test_triton_categories_model_mirrors_the_name_rule(monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils",
                        types.ModuleType("triton_python_backend_utils"))
    from clipinspect.runtime.triton import categories

    assert categories.NAME.pattern == CATEGORY_NAME.pattern
    model = categories.TritonPythonModel()
    model.initialize({"model_repository": "/nonexistent", "model_version": "1"})
    with pytest.raises(ValueError, match="invalid category name"):
        model.load("grain\n")
