"""Shared fixtures: one small random-weights bundle (ViT-S-16) exported once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

SMALL_MODEL = "ViT-S-16"
CATEGORIES = ("weave", "washer")


@pytest.fixture(scope="session")
def small_bundle_path(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    from clipinspect.export.exporter import export_bundle

    path = tmp_path_factory.mktemp("bundles") / "vit-s-16"
    export_bundle(path, SMALL_MODEL, None, CATEGORIES, seed=0)
    return path


@pytest.fixture
def bundle_copy(small_bundle_path, tmp_path) -> Path:
    """A private copy for tests that change the bundle."""
    return Path(shutil.copytree(small_bundle_path, tmp_path / "bundle"))


@pytest.fixture(scope="session")
def small_model():
    pytest.importorskip("torch")
    from clipinspect.export.exporter import load_clip

    model, tokenizer, _ = load_clip(SMALL_MODEL, None, seed=0)
    return model, tokenizer


@pytest.fixture(scope="session")
def reference(small_model):
    from clipinspect.export.reference import WinClipReference

    return WinClipReference(small_model[0], (2, 3))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
