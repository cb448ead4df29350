"""The ``torch`` marker is derived from the code (tests/torch_needs.py): what it follows and what
it leaves alone. The torch-free install (``pip install -e ".[cpu,dev]"``, then pytest) is the
check that the derivation plus the hand-made markers miss no test."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch_needs import (code_needs_torch, eager_imports, item_needs_torch, module_file,
                         module_needs_torch)

ROOT = Path(__file__).resolve().parents[1]


def test_clipinspect_modules_are_followed_through_their_imports():
    assert module_needs_torch("torch.nn") and module_needs_torch("open_clip")
    assert module_needs_torch("clipinspect.export.methods")  # the registry imports each method
    assert module_needs_torch("clipinspect.export.methods.winclip")
    assert not module_needs_torch("clipinspect.export.cli")  # registering imports nothing heavy
    assert not module_needs_torch("numpy")
    assert module_file("clipinspect.runtime.core.bundle") == ROOT / "runtime" / "core" / "bundle.py"
    assert module_file("tinybundle") == ROOT / "tests" / "tinybundle.py"


def test_no_runtime_module_needs_torch():
    """As tests/test_runtime_isolation.py requires, seen by the derivation too."""
    modules = [".".join(["clipinspect.runtime", *p.relative_to(ROOT / "runtime").with_suffix(
        "").parts]).removesuffix(".__init__") for p in (ROOT / "runtime").rglob("*.py")]
    assert len(modules) > 20
    assert [m for m in modules if module_needs_torch(m)] == []


def test_only_imports_that_run_at_import_time_count():
    tree = ast.parse(
        "import numpy\n"
        "from .sibling import thing\n"
        "if TYPE_CHECKING:\n    import torch\n"
        "try:\n    import open_clip\nexcept ImportError:\n    open_clip = None\n"
        "def later():\n    import torchvision\n"
        "class Holder:\n    import json\n")
    assert list(eager_imports(tree.body, "clipinspect.export.thing", False)) == [
        "numpy", "clipinspect.export.sibling", "clipinspect.export.sibling.thing", "json"]


# Helpers as a helper module of a tests folder would hold them; written to a folder of their own
# so that this module's tests do not name them (and are not marked torch themselves).
SAMPLES = """
import pytest


def exports_a_model():
    from clipinspect.export.exporter import ExportOptions


def calls_a_helper_that_exports():
    exports_a_model()


def skips_without_open_clip():
    pytest.importorskip("open_clip")


def reads_a_bundle():
    from clipinspect.runtime import Bundle
"""


@pytest.fixture
def samples(tmp_path, monkeypatch):
    import importlib.util

    import torch_needs

    (tmp_path / "samples.py").write_text(SAMPLES)
    monkeypatch.setattr(torch_needs, "TESTS", tmp_path)
    spec = importlib.util.spec_from_file_location("samples", tmp_path / "samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_function_needs_torch_through_its_imports_and_the_helpers_it_names(samples):
    assert code_needs_torch(samples.exports_a_model)
    assert code_needs_torch(samples.calls_a_helper_that_exports)
    assert code_needs_torch(samples.skips_without_open_clip)
    assert not code_needs_torch(samples.reads_a_bundle)


def test_a_test_needs_torch_through_the_fixtures_it_uses(samples):
    def item(function, fixtures):
        defs = {name: [SimpleNamespace(func=f)] for name, f in fixtures.items()}
        return SimpleNamespace(module=samples, function=function, fixturenames=list(fixtures),
                               _fixtureinfo=SimpleNamespace(name2fixturedefs=defs))

    assert not item_needs_torch(item(samples.reads_a_bundle, {"bundle": samples.reads_a_bundle}))
    assert item_needs_torch(item(samples.reads_a_bundle, {"small": samples.exports_a_model}))
    assert item_needs_torch(item(samples.calls_a_helper_that_exports, {}))


def test_the_real_export_fixtures_are_seen_as_needing_torch(request):
    """Every test using one of them is marked: their bodies export or load open_clip."""
    conftest = request.config.pluginmanager.get_plugin(str(ROOT / "tests" / "conftest.py"))
    for name in ("small_bundle_path", "patch_bundle_path", "small_model", "reference"):
        assert code_needs_torch(getattr(conftest, name).__wrapped__), name
    for name in ("tiny_bundle_path", "tiny_patch_bundle_path", "prompt_file"):
        assert not code_needs_torch(getattr(conftest, name).__wrapped__), name
