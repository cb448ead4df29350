"""The ALFA-style preset (``--method alfa``): the patch method's graphs with contextual prompt
adaptation always on and a prompt file required; exported, run by the runtime and equal to the
patch method's eager reference, zero-shot and few-shot; refused with what to run when the prompt
file is missing. The prompt file used is hand-written (tests/data), not LLM output."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
torch = pytest.importorskip("torch")  # compares with torch: the export extra

from clipinspect.runtime import Bundle, Inspector  # noqa: E402
from clipinspect.runtime.core.images import to_rgb_array  # noqa: E402
from conftest import SMALL_MODEL  # noqa: E402

TOL = 1e-4  # as the patch and adaptation tests (tests/test_methods.py)
PROMPTS = Path(__file__).parent / "data" / "synthetic_prompts_handwritten.json"


@pytest.fixture(scope="module")
def alfa_bundle_path(tmp_path_factory) -> Path:
    from clipinspect.export.exporter import ExportOptions, export_bundle

    path = tmp_path_factory.mktemp("alfa") / "bundle"
    export_bundle(ExportOptions(path, SMALL_MODEL, None, ["weave"], seed=0, method="alfa",
                                prompts=PROMPTS))
    return path


def _expected(reference, bundle, images, memory=None):
    """The patch method's eager reference per image, with the bundle's prompt pools."""
    text = bundle.category("weave").text
    pools = (torch.from_numpy(text["text_normal"]), torch.from_numpy(text["text_anomalous"]))
    out = []
    for im in images:
        x = torch.from_numpy(bundle.preprocess.batch([to_rgb_array(im)]))
        s, m = reference(x, pools, to_rgb_array(im).shape[:2], memory,
                         bundle.manifest.adaptation.to_dict())
        out.append((float(s[0]), m[0].numpy()))
    return out


def test_preset_records_patch_graphs_adaptation_and_the_prompt_file(alfa_bundle_path):
    m = Bundle.open(alfa_bundle_path).manifest.to_dict()
    assert m["method"] == "alfa" and m["method_options"] == {"dense_blocks": 1}
    assert m["adaptation"] == {"kind": "contextual", "tau": 0.01, "top_k": None}
    assert m["outputs"] == ["image_embedding", "patch_embeddings", "patch_tokens"]
    entry = m["categories"]["weave"]
    assert entry["prompt_file"]["n_normal"] == 2 and entry["prompt_file"]["n_anomalous"] == 3
    assert entry["n_anomalous_prompts"] == 84 + 3
    assert m["parity"]["fp32"]["passed"]


def test_preset_equals_the_patch_reference_zero_and_few_shot(alfa_bundle_path, small_model,
                                                             rng, tmp_path):
    from clipinspect.export.methods import METHODS
    from clipinspect.export.methods.patch import PatchReference

    path = shutil.copytree(alfa_bundle_path, tmp_path / "b")
    reference = METHODS["alfa"].reference.from_manifest(small_model[0], Bundle.open(path).manifest)
    assert type(reference) is PatchReference  # one eager reference, not a copy
    inspector = Inspector.open(path)
    images = [rng.integers(0, 256, (150, 170, 3), dtype=np.uint8),
              rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)]
    zero = inspector.inspect(images, "weave")
    for r, (score, amap) in zip(zero, _expected(reference, inspector.bundle, images)):
        assert r.ok and r.mode == "zero-shot"
        assert abs(r.image_score - score) <= TOL and np.abs(r.anomaly_map - amap).max() <= TOL
    refs = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(2)]
    inspector.add_references("weave", refs)
    memory = reference.features(torch.from_numpy(inspector.bundle.preprocess.batch(refs)))
    few = inspector.inspect(images, "weave")
    for r, (score, amap) in zip(few, _expected(reference, inspector.bundle, images, memory)):
        assert r.ok and r.mode == "few-shot"
        assert abs(r.image_score - score) <= TOL and np.abs(r.anomaly_map - amap).max() <= TOL


def _no_clip(*args, **kwargs):
    raise AssertionError("CLIP was loaded before the prompt file was checked")


@pytest.mark.parametrize("prompts, message", [
    (None, "no --prompts FILE given. --method alfa needs descriptions of weave from a prompt "
           "file: run 'clipinspect prompts generate --url URL --model MODEL --categories weave "
           "--out prompts.json'"),
    (PROMPTS, "does not describe 'screw'. --method alfa needs descriptions of screw"),
])
def test_preset_without_descriptions_is_refused_before_loading(prompts, message, tmp_path,
                                                               monkeypatch):
    from clipinspect.export import exporter

    monkeypatch.setattr(exporter, "load_clip", _no_clip)
    categories = ["weave"] if prompts is None else ["weave", "screw"]
    with pytest.raises(exporter.ExportError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace(".", r"\.")):
        exporter.export_bundle(exporter.ExportOptions(tmp_path / "b", SMALL_MODEL, None,
                                                      categories, method="alfa", prompts=prompts))
    assert not (tmp_path / "b").exists()


def test_add_category_to_a_preset_bundle_needs_descriptions(alfa_bundle_path, tmp_path,
                                                            monkeypatch):
    from clipinspect.export import exporter

    path = shutil.copytree(alfa_bundle_path, tmp_path / "b")
    monkeypatch.setattr(exporter, "load_clip", _no_clip)
    with pytest.raises(exporter.ExportError, match="prompts generate .*--categories grain"):
        exporter.add_categories(path, ["grain"], progress=lambda m: None)


def test_export_command_explains_the_missing_prompt_file(tmp_path, capsys):
    from clipinspect.runtime.cli import main

    assert main(["export", "--out", str(tmp_path / "b"), "--model", SMALL_MODEL, "--pretrained",
                 "none", "--method", "alfa", "--categories", "weave"]) == 2
    assert "pass --prompts prompts.json" in capsys.readouterr().err
    # The preset shares the patch method's --dense-blocks: one flag in the help.
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = capsys.readouterr().out
    assert out.count("[--dense-blocks N]") == 1 and "alfa" in out
