"""AprilLab (METHODS.md section 4): exported graphs vs an eager evaluation written from the
formula on open_clip's own forward, runtime maps and few-shot, checkpoint forms, training."""

from __future__ import annotations

import copy

import numpy as np
import pytest
torch = pytest.importorskip("torch")  # compares with torch: the export extra
import torch.nn.functional as F  # noqa: E402

from clipinspect.runtime import Inspector  # noqa: E402
from clipinspect.runtime.core.images import preprocess, to_rgb_array  # noqa: E402

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
    from clipinspect.export.aprillab import category_text, export_aprillab_bundle
    from clipinspect.export.exporter import write_category_text

    root = tmp_path_factory.mktemp("aprillab")
    ckpt = root / "april-gan.pth"
    torch.save({"trainable_linearlayer": random_state()}, ckpt)  # APRIL-GAN's checkpoint form
    bundle = export_aprillab_bundle(root / "bundle", MODEL, None, [], adapters=str(ckpt),
                                    image_size=SIZE)
    entry = write_category_text(bundle.root, *small_model, "weave", SMALL_ENSEMBLE,
                                compute=category_text)
    with bundle.updating() as m:
        m["categories"]["weave"] = entry
    return bundle.root


def eager_reference(model, state, images, text, memory_images=None):
    """The formula of METHODS.md section 4 on open_clip's forward_intermediates."""
    v = copy.deepcopy(model.visual)
    g0, g1 = tuple(v.grid_size), SIZE // 16
    pos = v.positional_embedding.data
    grid = pos[1:].reshape(*g0, -1).permute(2, 0, 1)[None]
    grid = F.interpolate(grid, size=(g1, g1), mode="bicubic", align_corners=False)
    v.positional_embedding = torch.nn.Parameter(
        torch.cat([pos[:1], grid[0].permute(1, 2, 0).reshape(g1 * g1, -1)]))
    v.grid_size = (g1, g1)

    def features(x):
        with torch.no_grad():
            out = v.forward_intermediates(x, indices=[n - 1 for n in LAYERS], output_fmt="NLC",
                                          intermediates_only=True)
            return v(x), out["image_intermediates"]

    t = F.normalize(text, dim=-1)
    embedding, levels = features(images)
    score = (100 * F.normalize(embedding, dim=-1) @ t.T).softmax(-1)[:, 1]
    amap = 0
    for i, x in enumerate(levels):
        z = x @ state[f"fc.{i}.weight"].T + state[f"fc.{i}.bias"]
        logits = (100 * F.normalize(z, dim=-1) @ t.T).permute(0, 2, 1).reshape(-1, 2, g1, g1)
        up = F.interpolate(logits, size=(SIZE, SIZE), mode="bilinear", align_corners=True)
        amap = amap + up.softmax(dim=1)[:, 1]
    if memory_images is not None:
        _, memory = features(memory_images)
        for x, m in zip(levels, memory):
            cos = F.normalize(x, dim=-1) @ F.normalize(m.flatten(0, 1), dim=-1).T
            d = (1 - cos).min(dim=-1).values.reshape(-1, 1, g1, g1)
            amap = amap + F.interpolate(d, size=(SIZE, SIZE), mode="bilinear",
                                        align_corners=True)[:, 0]
    return score.numpy(), amap.numpy()


def _tensors(bundle, images):
    cfg = bundle.manifest["input"]
    return np.stack([preprocess(to_rgb_array(im), bundle.input_size, cfg["mean"], cfg["std"])
                     for im in images])


def test_manifest_records_method_levels_size_and_parity(aprillab_bundle):
    from clipinspect.runtime import Bundle

    m = Bundle.open(aprillab_bundle).manifest
    assert m["method"] == "aprillab"
    assert m["aprillab"]["layers"] == list(LAYERS)
    assert m["input"]["size"] == [SIZE, SIZE] and m["grid"] == [SIZE // 16, SIZE // 16]
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
    want_score, want_map = eager_reference(small_model[0], random_state(), torch.from_numpy(x), text)
    assert mode == "zero-shot" and amap.shape == (2, SIZE, SIZE)
    assert np.abs(score - want_score).max() <= TOL
    assert np.abs(amap - want_map).max() <= TOL
    memory, used, _ = inspector.build_memory(refs)
    assert set(memory) == {f"memory_level_tokens_{n}" for n in LAYERS} and len(used) == 2
    score, amap, mode = inspector.score(encoded, "weave", "few-shot", memory)
    want_score, want_map = eager_reference(small_model[0], random_state(), torch.from_numpy(x),
                                           text, torch.from_numpy(r))
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
    from clipinspect.export.aprillab_torch import projection_state

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
    from clipinspect.export.aprillab import load_projections
    from clipinspect.export.train_adapters import train_adapters

    monkeypatch.setattr(module, "load_ensemble", lambda name: SMALL_ENSEMBLE)

    generate(tmp_path / "data", seed=0, categories=["weave"], image_size=64, n_train=1,
             n_test_good=2, n_test_defect_per_type=2)
    ckpt, straight = tmp_path / "adapters.pt", tmp_path / "straight.pt"
    kwargs = dict(model_name=MODEL, pretrained=None, image_size=64, batch_size=4, lr=1e-2,
                  cache=tmp_path / "cache")
    first = train_adapters(tmp_path / "data", ckpt, epochs=3, **kwargs)["loss_per_epoch"]
    assert len(first) == 3 and first[-1] < first[0]
    resumed = train_adapters(tmp_path / "data", ckpt, epochs=4, resume=True, **kwargs)
    assert resumed["epochs"] == 4
    # Resuming restores the optimizer and the epoch's shuffle: same as four epochs in one go.
    assert train_adapters(tmp_path / "data", straight, epochs=4, **kwargs)["loss_per_epoch"] \
        == pytest.approx(resumed["loss_per_epoch"], rel=1e-5)
    projections, record = load_projections(str(ckpt), WIDTH, DIM, LAYERS, MODEL)
    assert record["kind"] == "file" and record["trained"]["epochs"] == 4
    with pytest.raises(Exception, match="trained for ViT-S-16 layers"):
        load_projections(str(ckpt), WIDTH, DIM, (4, 8, 12), MODEL)


def test_add_category_uses_the_aprillab_recipe(aprillab_bundle, tmp_path, small_model,
                                               monkeypatch):
    import shutil

    from clipinspect.export import aprillab
    from clipinspect.export.exporter import add_categories

    monkeypatch.setattr(aprillab, "load_ensemble", lambda name: SMALL_ENSEMBLE)
    path = shutil.copytree(aprillab_bundle, tmp_path / "b")
    bundle = add_categories(path, ["grain"], progress=lambda msg: None)
    got = bundle.category("grain").text_prototypes
    want = aprillab.category_text(*small_model, "grain", SMALL_ENSEMBLE)[0]["prototypes"]
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--layers", "3"], "--layers apply to --method aprillab only"),
    (["--method", "aprillab"], "needs its per-level projections: pass --adapters"),
    (["--method", "aprillab", "--adapters", "none", "--adapt"],
     "--adapt do not apply to --method aprillab"),
])
def test_export_cli_checks_method_options_before_loading(args, message, tmp_path, capsys):
    from clipinspect.runtime.cli import main

    assert main(["export", "--out", str(tmp_path / "b"), "--model", MODEL, "--pretrained",
                 "none", *args]) == 2
    assert message in capsys.readouterr().err
