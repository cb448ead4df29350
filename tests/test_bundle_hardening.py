"""A hostile bundle: arrays whose headers promise gigabytes, links that lead writes out of the
bundle, names that would inject into generated configs, values no array can hold. Each is
refused in one line, before anything is loaded or written."""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipinspect.runtime import Bundle, BundleError, Inspector
from clipinspect.runtime.cli import main
from clipinspect.runtime.core.bundle import write_versioned
from clipinspect.runtime.core.manifest import Manifest, ManifestError
from tinybundle import GRID

PATCHES = GRID[0] * GRID[1]


# ----------------------------------------------------------------------------------- helpers
def manifest_of(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def save_manifest(root: Path, m: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(m))


def replace_file(root: Path, entry: dict, data: bytes) -> None:
    """Overwrite the bundle file of a manifest ``entry`` and give it the right checksum, as an
    attacker who can write the bundle would."""
    (root / entry["file"]).write_bytes(data)
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    entry["bytes"] = len(data)


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def one_line_error(capsys, *args) -> str:
    """Run the CLI; it must fail with exit 2 and one line on stderr, no traceback."""
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipinspect: error: ") and "\n" not in err, err
    return err


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "part.png"
    Image.fromarray(np.full((48, 64, 3), 120, np.uint8)).save(path)
    return path


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder outside the bundle that links point to; must stay empty."""
    path = tmp_path / "outside"
    path.mkdir()
    return path


# --------------------------------------------------------------------------- npz shape bombs
def test_compressed_shape_bomb_with_a_good_checksum_is_refused_by_info(tiny_bundle_copy, capsys):
    """A few-hundred-KB text.npz whose one member inflates to 300 MB of zeros (the review's was
    4,000,000 x 384, 6.1 GB): refused from its header, never inflated."""
    m = manifest_of(tiny_bundle_copy)
    buf = io.BytesIO()
    bomb = np.zeros((200_000, 384), np.float32)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("prototypes.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, bomb)
    del bomb
    assert len(buf.getvalue()) < 2_000_000
    replace_file(tiny_bundle_copy, m["categories"]["weave"]["text"], buf.getvalue())
    save_manifest(tiny_bundle_copy, m)
    err = one_line_error(capsys, "info", tiny_bundle_copy)
    assert "category 'weave'" in err and m["categories"]["weave"]["text"]["file"][-25:] in err
    assert "member 'prototypes' has shape (200000, 384), the manifest says (2, 384)" in err


def test_a_compressed_member_is_refused_even_of_the_right_shape(tiny_bundle_copy):
    """Compression is how a small file becomes a large array: clipinspect writes np.savez
    (stored), so the memory an array takes is bounded by its file's size."""
    m = manifest_of(tiny_bundle_copy)
    entry = m["categories"]["weave"]["text"]
    with np.load(tiny_bundle_copy / entry["file"]) as z:
        arrays = dict(z)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    replace_file(tiny_bundle_copy, entry, buf.getvalue())
    save_manifest(tiny_bundle_copy, m)
    with pytest.raises(BundleError, match="member '.*' is compressed"):
        Bundle.open(tiny_bundle_copy)


@pytest.mark.parametrize("member, shape", [
    ("prototypes", (5_000, 384)),            # rows: the manifest says 2
    ("prototypes", (2, 100)),               # width: the manifest's embedding dim is 384
    ("normal_embeddings", (20_000, 384)),   # the manifest says 147 normal prompts
    ("prototypes", (2, 384, 1)),
])
def test_arrays_of_another_shape_than_the_manifest_says_are_refused(
        tiny_bundle_copy, capsys, image, tmp_path, member, shape):
    m = manifest_of(tiny_bundle_copy)
    entry = m["categories"]["weave"]["text"]
    with np.load(tiny_bundle_copy / entry["file"]) as z:
        arrays = dict(z)
    arrays[member] = np.zeros(shape, np.float32)
    replace_file(tiny_bundle_copy, entry, npz(**arrays))
    save_manifest(tiny_bundle_copy, m)
    with pytest.raises(BundleError, match=rf"'{member}' has shape \({shape[0]}, .*the manifest "
                                          r"says \("):
        Bundle.open(tiny_bundle_copy)
    # predict too: a one-line error, not onnxruntime's "invalid dimensions" traceback
    err = one_line_error(capsys, "predict", tiny_bundle_copy, image, "--category", "weave",
                         "--out", tmp_path / "out")
    assert f"{shape}" in err and "text embeddings of category 'weave'" in err


def test_object_array_npz_is_a_one_line_error(tiny_bundle_copy, capsys, image, tmp_path):
    m = manifest_of(tiny_bundle_copy)
    buf = io.BytesIO()
    np.savez(buf, prototypes=np.array([1, "a"], dtype=object))
    replace_file(tiny_bundle_copy, m["categories"]["weave"]["text"], buf.getvalue())
    save_manifest(tiny_bundle_copy, m)
    with pytest.raises(BundleError, match="'prototypes' has dtype object"):
        Bundle.open(tiny_bundle_copy)
    err = one_line_error(capsys, "predict", tiny_bundle_copy, image, "--category", "weave",
                         "--out", tmp_path / "out")
    assert "dtype object" in err and "never loaded" in err


def test_text_without_prototypes_or_damaged_behind_its_checksum_is_a_one_line_error(
        tiny_bundle_copy):
    m = manifest_of(tiny_bundle_copy)
    entry = m["categories"]["weave"]["text"]
    with np.load(tiny_bundle_copy / entry["file"]) as z:
        arrays = dict(z)
    replace_file(tiny_bundle_copy, entry, npz(normal_embeddings=arrays["normal_embeddings"]))
    save_manifest(tiny_bundle_copy, m)
    with pytest.raises(BundleError, match="lacks the array 'prototypes'"):
        Bundle.open(tiny_bundle_copy)
    data = bytearray(npz(**arrays))
    data[400] ^= 0xFF  # inside the first array's data: the zip CRC no longer matches
    replace_file(tiny_bundle_copy, entry, bytes(data))
    save_manifest(tiny_bundle_copy, m)
    with pytest.raises(BundleError, match=r"text embeddings of .*'weave'.*BadZipFile: Bad CRC"):
        Bundle.open(tiny_bundle_copy).category("weave")


def test_memory_with_more_rows_than_its_shots_is_refused(tiny_bundle_copy, image):
    """The memory's rows are shots x rows per image; a manifest claiming 1 shot for a memory
    of 50 (or a memory grown behind it) is refused."""
    Inspector.open(tiny_bundle_copy).add_references("weave", [image])
    Bundle.open(tiny_bundle_copy).category("weave")  # 1 shot: fine
    m = manifest_of(tiny_bundle_copy)
    entry = m["categories"]["weave"]["memory"]
    with np.load(tiny_bundle_copy / entry["file"]) as z:
        arrays = {k: np.concatenate([z[k]] * 50) for k in z.files}
    replace_file(tiny_bundle_copy, entry, npz(**arrays))
    save_manifest(tiny_bundle_copy, m)
    with pytest.raises(BundleError, match=r"few-shot memory of category 'weave'.*'memory_patch_"
                                          rf"tokens' has shape \({50 * PATCHES}, 384\).*says "
                                          rf"\({PATCHES}, 384\)"):
        Bundle.open(tiny_bundle_copy)


def test_bundles_of_every_tiny_method_still_pass_the_array_checks(tiny_patch_bundle_path,
                                                                  tiny_bundle_path):
    for path in (tiny_bundle_path, tiny_patch_bundle_path):
        bundle = Bundle.open(path)
        for name in bundle.categories:
            assert bundle.category(name).text_prototypes.shape == (2, 384)


# ------------------------------------------------------------------- writes follow no links
def test_bundle_path_refuses_links_and_escapes_for_writing(tiny_bundle_copy, outside):
    from clipinspect.runtime.core.bundle import bundle_path

    root = tiny_bundle_copy
    os.symlink(outside, root / "categories" / "screw")
    os.symlink("weave", root / "categories" / "alias")  # inside, but still a link
    for rel in ("categories/screw/text.npz", "categories/alias/x.npz", "../x", "/etc/passwd",
                "categories//x", "a/./b"):
        with pytest.raises(BundleError, match="link|inside the bundle"):
            bundle_path(root, rel)
    with pytest.raises(BundleError, match="outside the bundle"):
        bundle_path(root, "categories/screw/text.npz", for_write=False)
    assert bundle_path(root, "categories/alias/x.npz", for_write=False)  # reading: inside
    assert bundle_path(root, "categories/new/text.npz") == Path(os.path.realpath(root)) / \
        "categories/new/text.npz"


def test_category_files_are_not_written_through_a_linked_folder(tiny_bundle_copy, outside):
    """What add-category, fewshot, quantize and build-engine write goes through write_versioned."""
    os.symlink(outside, tiny_bundle_copy / "categories" / "screw")
    with pytest.raises(BundleError, match="'categories/screw' is a symbolic link"):
        write_versioned(tiny_bundle_copy, "categories/screw", "text.npz", b"x")
    assert not any(outside.iterdir())


def test_quantize_writes_no_encoder_through_a_linked_precision_folder(tiny_bundle_copy, outside):
    from clipinspect.calibration.quantize import quantize_bundle

    os.symlink(outside, tiny_bundle_copy / "fp16")
    with pytest.raises(BundleError) as e:
        quantize_bundle(tiny_bundle_copy, "fp16", holdout=1)
    assert not any(outside.iterdir())  # 1a75222 wrote the encoder there, then refused
    assert "'fp16' is a symbolic link" in str(e.value)
    assert "fp16" not in Bundle.open(tiny_bundle_copy).precisions


def test_fewshot_does_not_follow_a_linked_lock_file(tiny_bundle_copy, outside, image, capsys):
    os.symlink(outside / "x", tiny_bundle_copy / ".lock")
    err = one_line_error(capsys, "fewshot", tiny_bundle_copy, image, "--category", "weave")
    assert "'.lock' is a symbolic link" in err
    assert not (outside / "x").exists() and not any(outside.iterdir())
    assert Bundle.open(tiny_bundle_copy).manifest.categories["weave"].memory is None
    # nothing half-written inside either: the memory file is written only after the checks
    assert not list((tiny_bundle_copy / "categories" / "weave").glob("memory-*"))


def test_thresholds_do_not_follow_a_lock_linked_to_an_existing_file(tiny_bundle_copy, outside):
    victim = outside / "victim"
    victim.write_text("keep")
    os.symlink(victim, tiny_bundle_copy / ".lock")
    with pytest.raises(BundleError, match="'.lock' is a symbolic link"):
        Bundle.open(tiny_bundle_copy).set_thresholds("weave", "fp32/zero-shot", {"image": 0.5})
    assert victim.read_text() == "keep" and os.path.islink(tiny_bundle_copy / ".lock")


def test_lock_is_opened_without_following_a_link_created_after_the_check(tiny_bundle_copy,
                                                                         outside, monkeypatch):
    """O_NOFOLLOW: even a link that appears between the check and the open is not followed."""
    from clipinspect.runtime.core import bundle as bundle_module

    real_check = bundle_module.bundle_path
    checks = []

    def check_then_race(root, rel, **kw):
        path = real_check(root, rel, **kw)
        checks.append(rel)
        if checks.count(".lock") == 2:  # the check right before the lock is opened
            os.symlink(outside / "x", path)
        return path
    monkeypatch.setattr(bundle_module, "bundle_path", check_then_race)
    with pytest.raises(BundleError, match="lock file .* cannot be opened"):
        Bundle.open(tiny_bundle_copy).set_thresholds("weave", "fp32/zero-shot", {"image": 0.5})
    assert not (outside / "x").exists()


def test_add_category_writes_nothing_through_a_linked_category_folder(bundle_copy, outside):
    from clipinspect.export.exporter import add_categories

    os.symlink(outside, bundle_copy / "categories" / "screw")
    with pytest.raises(BundleError) as e:
        add_categories(bundle_copy, ["screw"])
    assert not any(outside.iterdir())  # 1a75222 wrote text and prompts there, then refused
    assert "'categories/screw' is a symbolic link" in str(e.value)
    assert "screw" not in Bundle.open(bundle_copy).categories


# --------------------------------------------------------------- names reaching generated files
INJECTED = 'image_embedding"\n  }\n]\nbackend: "python"\nparameters {\n  key: "EXECUTION_ENV_PATH"'


@pytest.mark.parametrize("where", ["head input", "encoder output", "manifest outputs",
                                   "graph name", "precision", "model name"])
def test_names_outside_the_strict_character_set_are_refused_by_info(tiny_bundle_copy, capsys,
                                                                     where):
    m = manifest_of(tiny_bundle_copy)
    fp32 = m["graphs"]["fp32"]
    if where == "head input":
        fp32["head_zeroshot"]["inputs"][0] = INJECTED
    elif where == "encoder output":
        fp32["encoder"]["outputs"][0] = INJECTED
    elif where == "manifest outputs":
        m["outputs"][0] = INJECTED
    elif where == "graph name":
        fp32['x"\n'] = fp32["encoder"]
    elif where == "precision":
        m["graphs"]['fp16"\nbackend'] = fp32
    else:
        m["model"]["name"] = 'tiny"\nbackend: "python"'
    save_manifest(tiny_bundle_copy, m)
    err = one_line_error(capsys, "info", tiny_bundle_copy)
    assert "manifest key" in err and "\\n" in err


def test_real_tensor_names_pass():
    from clipinspect.runtime.core.manifest import TENSOR_NAME

    for name in ("images", "image_embedding", "window_embeddings_3", "memory_level_tokens_6",
                 "reference_map_range", "text_anomalous", "/visual/transformer/Add_output_0",
                 "onnx::MatMul_1234"):
        assert TENSOR_NAME.fullmatch(name), name


def test_two_categories_sharing_a_folder_are_refused_when_the_manifest_is_read(tiny_bundle_copy):
    m = manifest_of(tiny_bundle_copy)
    m["categories"]["metal nut"] = m["categories"]["weave"]
    m["categories"]["metal_nut"] = m["categories"]["washer"]
    with pytest.raises(ManifestError, match=r"'metal_nut' and 'metal nut' share the folder "
                                            r"'categories/metal_nut'"):
        Manifest.from_dict(m, "b")
    save_manifest(tiny_bundle_copy, m)
    with pytest.raises(ManifestError, match="share the folder"):
        Bundle.open(tiny_bundle_copy)


# ---------------------------------------------------------------- values no array can hold
@pytest.mark.parametrize("mutate, key", [
    (lambda m: m["categories"]["weave"].update(thresholds={"fp32/zero-shot": {"image": 2**64}}),
     "categories.weave.thresholds.fp32/zero-shot.image"),
    (lambda m: m["categories"]["weave"]["text"].update(bytes=2**70), "categories.weave.text.bytes"),
    (lambda m: m.update(grid=[2**70, 14]), "grid"),
    (lambda m: m["dims"].update(embed=2**64), "dims.embed"),
    (lambda m: m["adaptation"] or m.update(adaptation={"kind": "contextual", "tau": 10**400}),
     "adaptation.tau"),
])
def test_a_whole_number_beyond_int64_is_a_one_line_error(tiny_bundle_copy, capsys, mutate, key):
    m = manifest_of(tiny_bundle_copy)
    mutate(m)
    save_manifest(tiny_bundle_copy, m)
    err = one_line_error(capsys, "info", tiny_bundle_copy)
    assert f"manifest key {key!r}" in err and "2^63" in err


@pytest.mark.parametrize("size", [[1, 2], [224, 112], [4096, 224], [8000, 8000]])
def test_an_input_size_the_grid_does_not_fit_is_refused_on_open(tiny_bundle_copy, capsys, image,
                                                               tmp_path, size):
    m = manifest_of(tiny_bundle_copy)
    m["preprocess"]["size"] = size
    save_manifest(tiny_bundle_copy, m)
    err = one_line_error(capsys, "predict", tiny_bundle_copy, image, "--category", "weave",
                         "--out", tmp_path / "out")
    assert "manifest key 'preprocess.size'" in err and str(size) in err


def test_a_file_whose_size_differs_from_the_manifest_is_refused_without_checksums(
        tiny_bundle_copy, capsys):
    m = manifest_of(tiny_bundle_copy)
    path = tiny_bundle_copy / m["categories"]["weave"]["prompts"]["file"]
    path.write_bytes(path.read_bytes() + b" ")
    err = one_line_error(capsys, "info", tiny_bundle_copy, "--no-verify")
    assert "was modified" in err and "bytes" in err


def test_a_non_utf8_api_key_file_is_a_one_line_error(tiny_bundle_path, tmp_path, capsys):
    key = tmp_path / "key"
    key.write_bytes(b"\xff\xfesecret")
    err = one_line_error(capsys, "serve", tiny_bundle_path, "--api-key-file", key)
    assert "not UTF-8" in err and str(key) in err
    key.write_bytes(b"k" * 10_000)
    assert "larger than" in one_line_error(capsys, "serve", tiny_bundle_path, "--api-key-file",
                                           key)
