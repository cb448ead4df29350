"""The bundle contract: validated on load, with errors that say what to do; safe writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipinspect.runtime import Bundle, BundleError, Inspector
from conftest import SMALL_MODEL
from tinybundle import GRID


def test_missing_graph_file_names_it(tiny_bundle_copy):
    (tiny_bundle_copy / "fp32" / "head_fewshot.onnx").unlink()
    with pytest.raises(BundleError, match=r"head_fewshot.onnx' is missing"):
        Bundle.open(tiny_bundle_copy)


def test_modified_graph_file_fails_checksum(tiny_bundle_copy):
    with open(tiny_bundle_copy / "fp32" / "encoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"encoder.onnx' was modified"):
        Inspector.open(tiny_bundle_copy)


def test_modified_category_file_fails_checksum(tiny_bundle_copy):
    path = next((tiny_bundle_copy / "categories" / "weave").glob("text-*.npz"))
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    with pytest.raises(BundleError, match="text embeddings of category 'weave'"):
        Bundle.open(tiny_bundle_copy)


def test_unsupported_format_version(tiny_bundle_copy):
    manifest = json.loads((tiny_bundle_copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tiny_bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format version 99 is not supported.*upgrade"):
        Bundle.open(tiny_bundle_copy)


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "nope", "does not exist"),
    (lambda p: (p / "file").write_text("x") and p / "file", "is a file"),
    (lambda p: p, "manifest.json' is missing"),
])
def test_not_a_bundle(tmp_path, setup, message):
    with pytest.raises(BundleError, match=message):
        Bundle.open(setup(tmp_path))


def test_unknown_category_lists_known_ones(tiny_bundle_path):
    inspector = Inspector.open(tiny_bundle_path)
    with pytest.raises(BundleError, match=r"unknown category 'bottle'.*washer, weave.*add-category"):
        inspector.inspect([np.zeros((32, 32, 3), np.uint8)], category="bottle")


def test_few_shot_mode_without_references_is_an_error(tiny_bundle_path):
    inspector = Inspector.open(tiny_bundle_path)
    with pytest.raises(BundleError, match="no reference images.*clipinspect fewshot"):
        inspector.inspect([np.zeros((32, 32, 3), np.uint8)], "weave", mode="few-shot")


def test_memory_and_thresholds_persist_and_verify(tiny_bundle_copy, rng):
    inspector = Inspector.open(tiny_bundle_copy)
    inspector.add_references("weave", [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)] * 2)
    inspector.bundle.set_thresholds("weave", "fp32/few-shot", {"image": 0.0, "pixel": 2.0})
    inspector.bundle.set_thresholds("weave", "fp32/zero-shot", {"image": 2.0})
    reopened = Inspector.open(tiny_bundle_copy)  # verifies the new checksums
    data = reopened.bundle.category("weave")
    assert data.shots == 2
    assert data.memory["memory_patch_tokens"].shape == (2 * GRID[0] * GRID[1], 384)
    r = reopened.inspect([rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)], "weave")[0]
    assert r.is_anomalous is True                      # every score >= 0
    assert r.mask.shape == (50, 70) and not r.mask.any()  # no map value reaches 2
    zero = reopened.inspect([np.zeros((20, 20, 3), np.uint8)], "weave", mode="zero-shot")[0]
    assert zero.is_anomalous is False and zero.mask is None  # its own thresholds, no pixel one


@pytest.mark.torch
def test_export_refuses_non_empty_output(tmp_path):
    from clipinspect.export.exporter import ExportError, ExportOptions, export_bundle

    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="exists and is not empty.*--overwrite"):
        export_bundle(ExportOptions(tmp_path, SMALL_MODEL, None, ["weave"]))
    assert (tmp_path / "keep.txt").read_text() == "user data"


@pytest.mark.torch
def test_failed_export_leaves_nothing_behind(tmp_path):
    from clipinspect.export.exporter import ExportError, ExportOptions, export_bundle

    # A tolerance no float computation meets: the parity check must fail and clean up (the
    # patch method: the same staging and check as WinCLIP, without the window work).
    with pytest.raises(ExportError, match="differ from PyTorch"):
        export_bundle(ExportOptions(tmp_path / "b", SMALL_MODEL, None, ["weave"], tolerance=0.0,
                                    method="patch"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.torch
def test_bad_pretrained_and_model_are_explained():
    from clipinspect.export.exporter import ExportError, load_clip

    with pytest.raises(ExportError, match="unknown open_clip model 'ViT-Q-99'"):
        load_clip("ViT-Q-99", None)
    with pytest.raises(ExportError, match="neither a local checkpoint file nor an open_clip tag"):
        load_clip(SMALL_MODEL, "/no/such/file.pt")


def test_local_checkpoint_is_loaded_and_identified(tmp_path, small_model):
    import torch

    from clipinspect.export.exporter import load_clip

    path = tmp_path / "ckpt.pt"
    torch.save(small_model[0].state_dict(), path)
    model, _, weights = load_clip(SMALL_MODEL, str(path))
    assert weights["kind"] == "file" and len(weights["sha256"]) == 64
    for (name, a), b in zip(small_model[0].state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_replacing_memory_keeps_one_valid_file_and_others_can_read_it(tiny_bundle_copy, rng):
    inspector = Inspector.open(tiny_bundle_copy)
    for shots in (1, 2):
        inspector.add_references("weave", [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)] * shots)
    files = list((tiny_bundle_copy / "categories" / "weave").glob("memory-*.npz"))
    assert len(files) == 1                                  # the replaced one was deleted
    assert Bundle.open(tiny_bundle_copy).category("weave").shots == 2
    for path in [tiny_bundle_copy, tiny_bundle_copy / "manifest.json", files[0]]:
        assert path.stat().st_mode & 0o044 == 0o044          # readable by group and others


def test_category_folders_cannot_collide():
    from clipinspect.runtime.core.bundle import check_category_dir_free

    with pytest.raises(BundleError, match="'metal_nut' would share the folder.*'metal nut'"):
        check_category_dir_free(["metal nut"], "metal_nut")
    with pytest.raises(BundleError, match="would share"):
        check_category_dir_free(["Bottle"], "bottle")
    check_category_dir_free(["bottle"], "bottle")  # itself: replacing is fine


@pytest.mark.torch
def test_parity_check_treats_nan_as_failure():
    from clipinspect.export.exporter import max_abs_diff

    assert max_abs_diff(np.array([1.0, np.nan]), np.array([1.0, 2.0])) == float("inf")
    assert max_abs_diff(np.array([1.0, 2.5]), np.array([1.0, 2.0])) == 0.5


def test_add_category_refuses_other_weights(bundle_copy):
    from clipinspect.export.exporter import ExportError, add_categories

    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["model"]["weights"]["seed"] = 1  # as if exported with other random weights
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="fingerprint differs"):
        add_categories(bundle_copy, ["screw"])
