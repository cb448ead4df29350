"""Shared fixtures: small random-weights bundles (ViT-S-16) exported once per session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

SMALL_MODEL = "ViT-S-16"
CATEGORIES = ("weave", "washer")


@pytest.fixture(scope="session")
def small_bundle_path(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    from clipinspect.export.exporter import ExportOptions, export_bundle

    path = tmp_path_factory.mktemp("bundles") / "vit-s-16"
    export_bundle(ExportOptions(path, SMALL_MODEL, None, CATEGORIES, seed=0))
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
    pytest.importorskip("torch")
    from clipinspect.export.exporter import ExportOptions, export_bundle
    from clipinspect.export.methods import Adaptation

    path = tmp_path_factory.mktemp("patch") / "bundle"
    export_bundle(ExportOptions(path, SMALL_MODEL, None, ["weave"], seed=0, method="patch",
                                adaptation=Adaptation(tau=0.02, top_k=6), prompts=prompt_file))
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
    from clipinspect.export.methods.winclip import WinClipReference

    return WinClipReference(small_model[0], (2, 3))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
