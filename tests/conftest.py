"""Shared fixtures, built once per session:

- tiny_* bundles (tests/tinybundle.py): the bundle contract at toy size, built without torch in
  well under a second; for tests of the runtime, the commands, the service and the hot folder,
  which need a valid bundle but not CLIP's numbers.
- small_* bundles: real open_clip exports (SMALL_MODEL, random weights; need torch and open_clip),
  for the tests that prove numerics (parity with torch, quantization, methods).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

# The real open_clip model of the small_* fixtures: ViT-S-32 at 224 x 224 (7 x 7 patches of 32,
# width and embedding 384, 12 layers). WinCLIP on it runs 36 + 25 windows per image, about a
# fifth of ViT-S-16's 169 + 144, so the tests that prove numerics on a real architecture take
# seconds, not tens of seconds; the product default is tested by the slow B16+ case.
SMALL_MODEL = "ViT-S-32"
SMALL_PATCH = 32
SMALL_GRID = 224 // SMALL_PATCH
CATEGORIES = ("weave", "washer")
EXPORT_MODULES = ("torch", "open_clip")


def missing_export_modules() -> list[str]:
    return [m for m in EXPORT_MODULES if importlib.util.find_spec(m) is None]


def pytest_collection_modifyitems(config, items):
    """Tests that need torch are marked ``torch`` (tests/torch_needs.py: read off their code,
    their fixtures and the helpers they call; or marked by hand), so that ``-m "not torch"``
    selects exactly the tests that run without the export extra; where it is absent they are
    skipped with the reason."""
    from torch_needs import item_needs_torch

    missing = missing_export_modules()
    skip = pytest.mark.skip(reason=f"needs the export extra ({', '.join(missing)} not installed)")
    for item in items:
        if item.get_closest_marker("torch") is None and item_needs_torch(item):
            item.add_marker(pytest.mark.torch)
        if missing and item.get_closest_marker("torch") is not None:
            item.add_marker(skip)


def needs_export() -> None:
    """Skip the requesting test where torch or open_clip is missing (a torch-free install)."""
    for module in EXPORT_MODULES:
        pytest.importorskip(module)


@pytest.fixture(scope="session")
def tiny_bundle_path(tmp_path_factory) -> Path:
    """WinCLIP, categories weave and washer, like small_bundle_path."""
    from tinybundle import build_tiny_bundle

    path = tmp_path_factory.mktemp("tiny") / "bundle"
    build_tiny_bundle(path, CATEGORIES)
    return path


@pytest.fixture
def tiny_bundle_copy(tiny_bundle_path, tmp_path) -> Path:
    """A private copy for tests that change the bundle."""
    return Path(shutil.copytree(tiny_bundle_path, tmp_path / "bundle"))


@pytest.fixture(scope="session")
def small_bundle_path(tmp_path_factory) -> Path:
    needs_export()
    from clipinspect.export.exporter import ExportOptions, export_bundle

    path = tmp_path_factory.mktemp("bundles") / SMALL_MODEL.lower()
    # With the fused-attention encoder too, so that every test of this bundle covers both.
    export_bundle(ExportOptions(path, SMALL_MODEL, None, CATEGORIES, seed=0,
                                fused_attention=True))
    return path


# A prompt file as a person or an LLM writes one (clipinspect-prompts, version 1).
PROMPTS = {"format": "clipinspect-prompts", "version": 1, "source": "written for this test",
           "categories": {"weave": {"normal": ["a tightly woven {} with even threads",
                                               "a uniform fabric texture"],
                                    "anomalous": ["a {} with a torn hole",
                                                  "a fabric with a dark stain"]}}}


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.json"
    path.write_text(json.dumps(PROMPTS))
    return path


@pytest.fixture(scope="session")
def patch_bundle_path(tmp_path_factory, prompt_file) -> Path:
    """Patch-only method with prompt adaptation (top-k) and a prompt file."""
    needs_export()
    from clipinspect.export.exporter import ExportOptions, export_bundle
    from clipinspect.export.methods import Adaptation

    path = tmp_path_factory.mktemp("patch") / "bundle"
    export_bundle(ExportOptions(path, SMALL_MODEL, None, ["weave"], seed=0, method="patch",
                                adaptation=Adaptation(tau=0.02, top_k=6), prompts=prompt_file))
    return path


@pytest.fixture(scope="session")
def tiny_patch_bundle_path(tmp_path_factory, prompt_file) -> Path:
    """As patch_bundle_path: patch-only, prompt adaptation (top-k), a prompt file."""
    from tinybundle import build_tiny_bundle

    path = tmp_path_factory.mktemp("tiny-patch") / "bundle"
    build_tiny_bundle(path, ["weave"], "patch", adaptation={"tau": 0.02, "top_k": 6},
                      prompts=prompt_file)
    return path


@pytest.fixture
def bundle_copy(small_bundle_path, tmp_path) -> Path:
    """A private copy for tests that change the bundle."""
    return Path(shutil.copytree(small_bundle_path, tmp_path / "bundle"))


@pytest.fixture(scope="session")
def small_model():
    needs_export()
    from clipinspect.export.exporter import load_clip

    model, tokenizer, _ = load_clip(SMALL_MODEL, None, seed=0)
    return model, tokenizer


@pytest.fixture(scope="session")
def reference(small_model):
    from clipinspect.export.methods.winclip import WinClipReference

    return WinClipReference(small_model[0], (2, 3))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def default_decoding(monkeypatch):
    """The decoding settings a fresh process has: the default pixel limit, whole JPEG decoding
    (whatever the environment or an earlier test set)."""
    from clipinspect.runtime.core import images

    monkeypatch.delenv(images.MAX_MEGAPIXELS_ENV, raising=False)
    monkeypatch.delenv(images.JPEG_DRAFT_ENV, raising=False)
    images.set_max_megapixels(None)
    images.set_jpeg_draft(None)
    yield
    images.set_max_megapixels(None)
    images.set_jpeg_draft(None)
