"""AprilLab (docs/methods.md#aprillab-after-april-gan): exported graphs vs an eager evaluation written from the
formula on open_clip's own forward, runtime maps and few-shot, checkpoint forms, training."""

from __future__ import annotations

import numpy as np
import pytest
torch = pytest.importorskip("torch")  # compares with torch: the export extra

from clipinspect.runtime import Inspector  # noqa: E402
from clipinspect.runtime.core.images import to_rgb_array  # noqa: E402

TOL = 1e-4
MODEL = "ViT-S-16"
SIZE = 160            # not the model's 224: exercises the positional-embedding resampling
LAYERS = (3, 6, 9, 12)
WIDTH = DIM = 384
# The full ensemble (420 prompts) costs minutes of text tower on a shared CPU; the formula under
# test does not depend on the prompt count.
SMALL_ENSEMBLE = {"normal_states": ["{}", "flawless {}"], "anomalous_states": ["damaged {}",
                  "broken {}"], "templates": ["a photo of a {}.", "a close-up photo of the {}."]}


def random_state(seed: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {f"fc.{i}.{p}": torch.randn(*((DIM, WIDTH) if p == "weight" else (DIM,)),
                                       generator=g) * 0.05
            for i in range(len(LAYERS)) for p in ("weight", "bias")}


@pytest.fixture(scope="module")
def aprillab_bundle(tmp_path_factory, small_model):
    from clipinspect.export.exporter import (ExportOptions, TextRecipe, export_bundle,
                                             write_category_text)
    from clipinspect.export.methods.aprillab import category_text

    root = tmp_path_factory.mktemp("aprillab")
    ckpt = root / "april-gan.pth"
    torch.save({"trainable_linearlayer": random_state()}, ckpt)  # APRIL-GAN's checkpoint form
    bundle = export_bundle(ExportOptions(root / "bundle", MODEL, None, [], method="aprillab",
                                         method_options={"adapters": str(ckpt),
                                                         "image_size": SIZE}))
    entry = write_category_text(bundle.root, "weave",
                                TextRecipe(*small_model, category_text, SMALL_ENSEMBLE))
    bundle.set_category("weave", entry)
    return bundle.root


def eager_reference(model, bundle):
    """The method's eager reference (open_clip's forward_intermediates), from the manifest: the
    recorded checkpoint, layers and input size."""
    from clipinspect.export.methods import METHODS

    reference = METHODS["aprillab"].reference.from_manifest(model, bundle.manifest)
    assert reference.layers == LAYERS and reference.size == (SIZE, SIZE)
    for key, value in random_state().items():
        assert torch.equal(reference.state[key], value), key
    return reference


def _tensors(bundle, images):
    return bundle.preprocess.batch([to_rgb_array(im) for im in images])


def test_manifest_records_method_levels_size_and_parity(aprillab_bundle):
    from clipinspect.runtime import Bundle

    m = Bundle.open(aprillab_bundle).manifest.to_dict()
    assert m["method"] == "aprillab"
    assert m["aprillab"]["layers"] == list(LAYERS)
    assert m["preprocess"]["size"] == [SIZE, SIZE] and m["grid"] == [SIZE // 16, SIZE // 16]
    assert "resampled bicubically from 224x224" in m["aprillab"]["positional_embedding"]
    assert m["aprillab"]["projections"]["kind"] == "file"
    parity = m["parity"]["fp32"]
    assert parity["passed"] and set(parity["max_abs_diff"]) == {"encoder", "head_zeroshot",
                                                                "head_fewshot"}
    assert max(parity["max_abs_diff"].values()) <= TOL


def test_graphs_pass_the_static_tensorrt_checks_and_get_profiles(aprillab_bundle):
    pytest.importorskip("onnx")
    from clipinspect.runtime import Bundle
    from clipinspect.runtime.tensorrt import compat as tc

    b = Bundle.open(aprillab_bundle)
    assert tc.check_bundle(b) == {k: [] for k in ("fp32/encoder", "fp32/head_zeroshot",
                                                  "fp32/head_fewshot")}
    rows = tc.dynamic_rows(b)
    assert set(rows) == {f"memory_level_tokens_{n}" for n in LAYERS}
    assert set(rows.values()) == {(SIZE // 16) ** 2}


def test_onnx_zero_and_few_shot_equal_eager_reference(aprillab_bundle, small_model, rng):
    inspector = Inspector.open(aprillab_bundle)
    bundle = inspector.bundle
    text = torch.from_numpy(bundle.category("weave").text_prototypes)
    queries = [rng.integers(0, 256, (200, 170, 3), dtype=np.uint8) for _ in range(2)]
    refs = [rng.integers(0, 256, (160, 160, 3), dtype=np.uint8) for _ in range(2)]
    x, r = _tensors(bundle, queries), _tensors(bundle, refs)
    encoded = inspector.backend.encode(x)
    score, amap, mode = inspector.score(encoded, "weave", "zero-shot")
    reference = eager_reference(small_model[0], bundle)
    want_score, want_map = (t.numpy() for t in reference(torch.from_numpy(x), text))
    assert mode == "zero-shot" and amap.shape == (2, SIZE, SIZE)
    assert np.abs(score - want_score).max() <= TOL
    assert np.abs(amap - want_map).max() <= TOL
    memory, used, _ = inspector.build_memory(refs)
    assert set(memory) == {f"memory_level_tokens_{n}" for n in LAYERS} and len(used) == 2
    score, amap, mode = inspector.score(encoded, "weave", "few-shot", memory)
    want_score, want_map = (t.numpy() for t in reference(
        torch.from_numpy(x), text, reference.features(torch.from_numpy(r))))
    assert mode == "few-shot"
    assert np.abs(score - want_score).max() <= TOL
    assert np.abs(amap - want_map).max() <= TOL


def test_runtime_maps_have_the_image_size_and_references_zero_the_few_shot_term(
        aprillab_bundle, tmp_path, rng):
    import shutil

    path = shutil.copytree(aprillab_bundle, tmp_path / "b")
    inspector = Inspector.open(path)
    image = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    zero = inspector.inspect([image], "weave")[0]
    assert zero.ok and zero.anomaly_map.shape == (97, 131) and zero.mode == "zero-shot"
    inspector.add_references("weave", [image])
    few = inspector.inspect([image], "weave")[0]
    # The query is its own reference: min(1 - cos) is 0 on every level, the map is unchanged.
    assert few.mode == "few-shot"
    np.testing.assert_allclose(few.anomaly_map, zero.anomaly_map, atol=1e-4)


def test_checkpoint_forms_and_errors():
    from clipinspect.export.methods.aprillab import projection_state

    state = random_state()
    assert projection_state({"trainable_linearlayer": state}, WIDTH, DIM, 4).keys() == state.keys()
    assert projection_state(state, WIDTH, DIM, 4).keys() == state.keys()
    with pytest.raises(ValueError, match=r"found keys \['linear.weight'\]; expected \['fc.0.weight'"):
        projection_state({"linear.weight": torch.zeros(DIM, WIDTH)}, WIDTH, DIM, 4)
    wrong = {**state, "fc.2.weight": torch.zeros(768, 1024)}
    with pytest.raises(ValueError, match=r"fc.2.weight has shape \[768, 1024\]; .* \[384, 384\]"):
        projection_state(wrong, WIDTH, DIM, 4)


def test_short_training_lowers_the_loss_resumes_and_exports(tmp_path, monkeypatch):
    from clipinspect.calibration.synth import generate
    from clipinspect.export import train_adapters as module
    from clipinspect.export.methods.aprillab import load_projections
    from clipinspect.export.train_adapters import TrainOptions, train_adapters

    monkeypatch.setattr(module, "load_ensemble", lambda name: SMALL_ENSEMBLE)

    generate(tmp_path / "data", seed=0, categories=["weave"], image_size=64, n_train=1,
             n_test_good=2, n_test_defect_per_type=2)
    ckpt, straight = tmp_path / "adapters.pt", tmp_path / "straight.pt"
    kwargs = dict(data=tmp_path / "data", model=MODEL, pretrained=None, image_size=64,
                  batch_size=4, lr=1e-2, cache=tmp_path / "cache")
    first = train_adapters(TrainOptions(out=ckpt, epochs=3, **kwargs))["loss_per_epoch"]
    assert len(first) == 3 and first[-1] < first[0]
    resumed = train_adapters(TrainOptions(out=ckpt, epochs=4, resume=True, **kwargs))
    assert resumed["epochs"] == 4
    # Resuming restores the optimizer and the epoch's shuffle: same as four epochs in one go.
    assert train_adapters(TrainOptions(out=straight, epochs=4, **kwargs))["loss_per_epoch"] \
        == pytest.approx(resumed["loss_per_epoch"], rel=1e-5)
    projections, record = load_projections(str(ckpt), WIDTH, DIM, LAYERS, MODEL)
    assert record["kind"] == "file" and record["trained"]["epochs"] == 4
    with pytest.raises(Exception, match="trained for ViT-S-16 layers"):
        load_projections(str(ckpt), WIDTH, DIM, (4, 8, 12), MODEL)


def test_add_category_uses_the_aprillab_recipe(aprillab_bundle, tmp_path, small_model,
                                               monkeypatch):
    import shutil

    from clipinspect.export import exporter
    from clipinspect.export.methods import aprillab

    ensembles = []
    monkeypatch.setattr(exporter, "load_ensemble",
                        lambda name: ensembles.append(name) or SMALL_ENSEMBLE)
    path = shutil.copytree(aprillab_bundle, tmp_path / "b")
    bundle = exporter.add_categories(path, ["grain"], progress=lambda msg: None)
    assert ensembles == ["aprillab"]
    got = bundle.category("grain").text_prototypes
    want = aprillab.category_text(*small_model, "grain", SMALL_ENSEMBLE)[0]["prototypes"]
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--layers", "3"], "--layers does not apply to method 'winclip' (its options: --scales); "
                        "--layers is an option of --method aprillab"),
    (["--method", "aprillab"], "needs its per-level projections: pass --adapters"),
    (["--method", "aprillab", "--adapters", "none", "--adapt"],
     "--adapt do not apply to --method aprillab"),
])
def test_export_cli_checks_method_options_before_loading(args, message, tmp_path, capsys):
    from clipinspect.runtime.cli import main

    assert main(["export", "--out", str(tmp_path / "b"), "--model", MODEL, "--pretrained",
                 "none", *args]) == 2
    assert message in capsys.readouterr().err
