"""Methods beyond WinCLIP: the patch-only method and contextual prompt adaptation, each equal to
its eager PyTorch reference through onnxruntime FP32; the method recorded and checked on load."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
torch = pytest.importorskip("torch")  # compares with torch: the export extra

from clipinspect.runtime import Bundle, BundleError, Inspector  # noqa: E402
from clipinspect.runtime.core.images import to_rgb_array  # noqa: E402
from conftest import SMALL_GRID, SMALL_MODEL  # noqa: E402

TOL = 1e-4

def _tensor(bundle, images):
    return torch.from_numpy(bundle.preprocess.batch([to_rgb_array(im) for im in images]))


def _expected(reference, bundle, images, category, memory=None):
    """Eager reference per image, with the bundle's text and adaptation record."""
    data = bundle.category(category)
    adaptation = bundle.manifest.adaptation and bundle.manifest.adaptation.to_dict()
    text = (torch.from_numpy(data.text["text_normal"]), torch.from_numpy(data.text["text_anomalous"])
            ) if adaptation else torch.from_numpy(data.text_prototypes)
    out = []
    for im in images:
        s, m = reference(_tensor(bundle, [im]), text, to_rgb_array(im).shape[:2], memory,
                         adaptation)
        out.append((float(s[0]), m[0].numpy()))
    return out


def _images(rng):
    return [rng.integers(0, 256, (150, 170, 3), dtype=np.uint8),
            rng.integers(0, 256, (224, 224), dtype=np.uint8),
            rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)]


def test_patch_method_equals_reference_zero_and_few_shot(patch_bundle_path, small_model, rng, tmp_path):
    from clipinspect.export.methods import METHODS

    bundle_path = shutil.copytree(patch_bundle_path, tmp_path / "b")
    reference = METHODS["patch"].reference.from_manifest(small_model[0],
                                                         Bundle.open(bundle_path).manifest)
    assert reference.dense_blocks == 1
    inspector = Inspector.open(bundle_path)
    images = _images(rng)
    zero = inspector.inspect(images, "weave", batch_size=2)
    for r, (score, amap) in zip(zero, _expected(reference, inspector.bundle, images, "weave")):
        assert r.ok and r.mode == "zero-shot"
        assert abs(r.image_score - score) <= TOL and np.abs(r.anomaly_map - amap).max() <= TOL
    refs = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(2)]
    inspector.add_references("weave", refs)
    assert set(inspector.bundle.category("weave").memory) == {"memory_patch_tokens"}
    memory = reference.features(_tensor(inspector.bundle, refs))
    few = inspector.inspect(images, "weave", batch_size=2)
    for r, (score, amap) in zip(few, _expected(reference, inspector.bundle, images, "weave",
                                               memory)):
        assert r.ok and r.mode == "few-shot"
        assert abs(r.image_score - score) <= TOL and np.abs(r.anomaly_map - amap).max() <= TOL


def test_patch_encoder_outputs_equal_reference(patch_bundle_path, small_model):
    import onnxruntime as ort

    from clipinspect.export.methods.patch import PatchReference

    session = ort.InferenceSession(str(Bundle.open(patch_bundle_path).graph_path("fp32", "encoder")),
                                   providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    out = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {"images": x.numpy()})))
    f = PatchReference(small_model[0]).features(x)
    assert list(out) == ["image_embedding", "patch_embeddings", "patch_tokens"]
    assert out["patch_embeddings"].shape == (2, SMALL_GRID ** 2, 384)
    for name, expected in (("image_embedding", f.image_embedding),
                           ("patch_embeddings", f.patch_embeddings),
                           ("patch_tokens", f.patch_tokens)):
        assert np.abs(out[name] - expected.numpy()).max() <= TOL, name
    # The dense path is not the ordinary tokens projected: it must differ from them.
    with torch.no_grad():
        projected = f.patch_tokens @ small_model[0].visual.proj
    assert np.abs(out["patch_embeddings"] - projected.numpy()).max() > 1e-2


def test_manifest_records_method_adaptation_prompts_and_parity(patch_bundle_path, prompt_file):
    m = Bundle.open(patch_bundle_path).manifest.to_dict()
    assert m["method"] == "patch" and m["method_options"] == {"dense_blocks": 1}
    assert m["adaptation"] == {"kind": "contextual", "tau": 0.02, "top_k": 6}
    assert m["outputs"] == ["image_embedding", "patch_embeddings", "patch_tokens"]
    assert "scales" not in m and "windows" not in m  # WinCLIP's section, not the patch method's
    parity = m["parity"]["fp32"]
    assert parity["passed"] and set(parity["max_abs_diff"]) == {"encoder", "head_zeroshot",
                                                                "head_fewshot"}
    assert all(0 <= v <= TOL for v in parity["max_abs_diff"].values())
    entry = m["categories"]["weave"]
    assert entry["n_normal_prompts"] == 147 + 2 and entry["n_anomalous_prompts"] == 84 + 2
    assert entry["prompt_file"]["n_normal"] == 2 and entry["prompt_file"]["n_anomalous"] == 2
    prompts = json.loads((patch_bundle_path / entry["prompts"]["file"]).read_text())
    assert "a tightly woven weave with even threads" in prompts["normal"]
    assert "a weave with a torn hole" in prompts["anomalous"]
    dropped = entry["ambiguity_filter_dropped"]
    text = Bundle.open(patch_bundle_path).category("weave").text
    for state, n in (("normal", 149), ("anomalous", 86)):
        pool = text[f"text_{state}"]
        assert pool.shape == (n - len(dropped[state]), 384)
        assert np.allclose(np.linalg.norm(pool, axis=1), 1.0, atol=1e-5)
        assert set(dropped[state]) <= set(prompts[state])


@pytest.mark.slow  # a second full export (WinCLIP graphs with the adapted heads)
def test_winclip_with_adaptation_equals_reference(tmp_path, reference, rng):
    from clipinspect.export.exporter import ExportOptions, export_bundle
    from clipinspect.export.methods import Adaptation
    from clipinspect.export.methods.winclip import WinClipReference

    # One window scale keeps this second export short; the scoring code is the same per scale.
    bundle = export_bundle(ExportOptions(tmp_path / "b", SMALL_MODEL, None, ["washer"], seed=0,
                                         method_options={"scales": [3]},
                                         adaptation=Adaptation(tau=0.01)))
    reference = WinClipReference(reference.model, (3,))
    assert bundle.manifest.method == "winclip" and bundle.manifest.adaptation.top_k is None
    inspector = Inspector.open(bundle)
    images = _images(rng)[:2]
    zero = inspector.inspect(images, "washer")
    for r, (score, amap) in zip(zero, _expected(reference, bundle, images, "washer")):
        assert abs(r.image_score - score) <= TOL and np.abs(r.anomaly_map - amap).max() <= TOL
    refs = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)]
    inspector.add_references("washer", refs)
    memory = reference.features(_tensor(bundle, refs))
    few = inspector.inspect(images, "washer")
    for r, (score, amap) in zip(few, _expected(reference, inspector.bundle, images, "washer",
                                               memory)):
        assert r.mode == "few-shot"
        assert abs(r.image_score - score) <= TOL and np.abs(r.anomaly_map - amap).max() <= TOL


def test_adapted_prototype_weights_the_relevant_prompts():
    from clipinspect.export.methods.common import (Adaptation, adapted_prototypes,
                                                   contextual_prototype)

    gen = torch.Generator().manual_seed(0)
    v = torch.randn(3, 16, generator=gen)
    normal, anomalous = torch.randn(7, 16, generator=gen), torch.randn(5, 16, generator=gen)
    for top_k in (None, 1, 3):
        a = Adaptation(tau=0.05, top_k=top_k)
        got = torch.stack([contextual_prototype(v, normal, a),
                           contextual_prototype(v, anomalous, a)], dim=1)
        assert torch.allclose(got, adapted_prototypes(v, normal, anomalous, 0.05, top_k),
                              atol=1e-6)
    # top-1: the prototype is the most relevant prompt itself.
    best = torch.nn.functional.normalize(normal, dim=-1)[
        (torch.nn.functional.normalize(v, dim=-1) @ torch.nn.functional.normalize(normal, dim=-1).T
         ).argmax(dim=1)]
    assert torch.allclose(contextual_prototype(v, normal, Adaptation(0.05, 1)), best, atol=1e-6)
    # A large temperature tends to the plain mean of the normalized prompts.
    flat = contextual_prototype(v, normal, Adaptation(tau=1e6))
    mean = torch.nn.functional.normalize(torch.nn.functional.normalize(normal, dim=-1).mean(0), dim=0)
    assert torch.allclose(flat, mean.expand_as(flat), atol=1e-5)


def test_ambiguity_filter_drops_prompts_closer_to_the_other_state():
    from clipinspect.export.text import ambiguity_filter

    normal = np.array([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.1, 1.0, 0.0]])  # last: anomalous-like
    anomalous = np.array([[0.0, 1.0, 0.1], [0.0, 0.9, -0.1]])
    keep_n, keep_a = ambiguity_filter(normal, anomalous)
    assert keep_n.tolist() == [True, True, False] and keep_a.tolist() == [True, True]


def test_bundle_without_method_field_is_winclip_and_unknown_method_is_refused(bundle_copy):
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    for key in ("method", "method_options", "adaptation", "outputs"):
        manifest.pop(key, None)
    path.write_text(json.dumps(manifest))
    assert Bundle.open(bundle_copy).method.name == "winclip"
    manifest["method"] = "dreamclip"
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="method 'dreamclip'.*knows winclip, patch"):
        Bundle.open(bundle_copy)
    manifest["method"] = "patch"  # WinCLIP graphs declared as a patch bundle
    manifest["method_options"] = {"dense_blocks": 1}
    manifest["outputs"] = ["image_embedding", "window_embeddings_2", "window_embeddings_3",
                           "patch_tokens"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="encoder outputs.*method 'patch' has"):
        Bundle.open(bundle_copy)


def test_adaptation_without_prompt_pools_is_refused(bundle_copy):
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["adaptation"] = {"kind": "contextual", "tau": 0.01, "top_k": None}
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="no prompt pools.*add-category.*--replace"):
        Bundle.open(bundle_copy).category("weave")


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "patch", "method_options": {"scales": [2]}},
     "--scales does not apply to method 'patch'"),
    ({"method": "winclip", "method_options": {"dense_blocks": 2}}, "--dense-blocks does not apply"),
    ({"method": "sliding"}, "unknown method 'sliding'"),
    ({"parity_images": 0}, "parity_images 0: expected a whole number >= 1"),
])
def test_export_refuses_options_of_other_methods(tmp_path, kwargs, message):
    from clipinspect.export.exporter import ExportError, ExportOptions, export_bundle

    with pytest.raises(ExportError, match=message):
        export_bundle(ExportOptions(tmp_path / "b", SMALL_MODEL, None, ["weave"], **kwargs))
    assert not (tmp_path / "b").exists()


def test_add_category_with_prompt_file_gets_pools_and_filter(patch_bundle_path, tmp_path):
    from clipinspect.export.exporter import add_categories

    copy = shutil.copytree(patch_bundle_path, tmp_path / "b")
    path = tmp_path / "screw.json"
    path.write_text(json.dumps({"categories": {"screw": {"anomalous": ["a {} with a bent thread"]}}}))
    add_categories(copy, ["screw"], prompts=path, progress=lambda m: None)
    bundle = Bundle.open(copy)
    entry = bundle.manifest.categories["screw"]
    assert entry.n_anomalous_prompts == 85 and entry.prompt_file.counts["n_anomalous"] == 1
    text = bundle.category("screw").text
    assert len(text["text_anomalous"]) == 85 - len(entry.ambiguity_filter_dropped["anomalous"])
    assert Inspector.open(bundle).inspect([np.zeros((40, 40, 3), np.uint8)], "screw")[0].ok


@pytest.mark.parametrize("args, message", [
    (["--method", "patch", "--scales", "2"], "--scales does not apply to method 'patch'"),
    (["--top-k", "3"], "--tau-ctx and --top-k set the prompt adaptation: add --adapt"),
    (["--adapt", "--tau-ctx", "0"], "the adaptation temperature must be > 0"),
    (["--parity-images", "0"], "argument --parity-images: '0': expected a whole number >= 1"),
])
def test_export_command_explains_wrong_method_options(tmp_path, args, message, capsys):
    from clipinspect.runtime.cli import main

    try:
        code = main(["export", "--model", SMALL_MODEL, "--pretrained", "none", "--out",
                     str(tmp_path / "b"), *args])
    except SystemExit as e:  # argparse's own refusals (exit status 2, usage on stderr)
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()
