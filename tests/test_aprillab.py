"""AprilLab (docs/methods.md#aprillab-after-april-gan): exported graphs vs an eager evaluation written from the
formula on open_clip's own forward, runtime maps and few-shot, checkpoint forms, training."""

from __future__ import annotations

import numpy as np
import pytest
torch = pytest.importorskip("torch")  # compares with torch: the export extra

from clipinspect.runtime import Inspector  # noqa: E402
from clipinspect.runtime.core.errors import UsageError  # noqa: E402
from clipinspect.runtime.methods.aprillab import MAP_RANGE  # noqa: E402
from clipinspect.runtime.core.images import to_rgb_array  # noqa: E402
from conftest import SMALL_MODEL, SMALL_PATCH  # noqa: E402

TOL = 1e-4
MODEL = SMALL_MODEL
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
    assert m["preprocess"]["size"] == [SIZE, SIZE]
    assert m["grid"] == [SIZE // SMALL_PATCH, SIZE // SMALL_PATCH]
    assert "resampled bicubically (antialiased) from 224x224" in m["aprillab"]["positional_embedding"]
    assert m["aprillab"]["projections"]["kind"] == "file"
    assert m["aprillab"]["activation"] == "gelu"   # the open_clip config of the test model: plain GELU
    assert m["aprillab"]["activation_source"] == "model config"
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
    assert set(rows.values()) == {(SIZE // SMALL_PATCH) ** 2}


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
    # Memory without its map range (built without a category): the range is computed on use.
    score, amap, mode = inspector.score(encoded, "weave", "few-shot", memory)
    r = torch.from_numpy(r)
    map_range = reference.map_range(r, text)
    want_score, want_map = (t.numpy() for t in reference(
        torch.from_numpy(x), text, reference.features(r), map_range))
    np.testing.assert_allclose(inspector.build_memory(refs, category="weave")[0][MAP_RANGE],
                               map_range.numpy(), atol=TOL)
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
    with pytest.raises(UsageError, match="1 reference image; .* needs at least 2"):
        inspector.add_references("weave", [image])
    with pytest.raises(UsageError, match="maps all peak at .* add reference images that differ"):
        inspector.add_references("weave", [image, image])
    inspector.add_references("weave", [image, rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)])
    assert inspector.bundle.category("weave").memory[MAP_RANGE].shape == (2,)
    few = inspector.inspect([image], "weave")[0]
    # The query is its own reference: min(1 - cos) is 0 on every level, the map is unchanged.
    assert few.mode == "few-shot"
    np.testing.assert_allclose(few.anomaly_map, zero.anomaly_map, atol=1e-4)


def april_gan_test_script(embedding, levels, text, state, memory_levels, size):
    """APRIL-GAN's test.py few-shot scoring of one image, ported (numpy where it uses numpy):
    embedding (1, D), levels L x (1, P, C) without class token, text (D, 2) columns [normal,
    anomalous] normalized, memory_levels L x (M, C) -> (text probability, anomaly map)."""
    image_features = embedding / embedding.norm(dim=-1, keepdim=True)
    text_probs = (100.0 * image_features @ text).softmax(dim=-1)
    anomaly_maps = []
    for layer, tokens in enumerate(levels):
        tokens = tokens @ state[f"fc.{layer}.weight"].T + state[f"fc.{layer}.bias"]
        tokens = tokens / tokens.norm(dim=-1, keepdim=True)
        anomaly_map = 100.0 * tokens @ text
        b, n, _ = anomaly_map.shape
        h = int(np.sqrt(n))
        anomaly_map = torch.nn.functional.interpolate(
            anomaly_map.permute(0, 2, 1).view(b, 2, h, h), size=size, mode="bilinear",
            align_corners=True)
        anomaly_maps.append(torch.softmax(anomaly_map, dim=1)[:, 1, :, :].numpy())
    anomaly_map = np.sum(anomaly_maps, axis=0)
    few_shot = []
    for layer, tokens in enumerate(levels):
        m, p = memory_levels[layer].numpy(), tokens[0].numpy()
        cos = (m / np.linalg.norm(m, axis=1, keepdims=True)) @ (
            p / np.linalg.norm(p, axis=1, keepdims=True)).T       # sklearn's pairwise cosine
        height = int(np.sqrt(cos.shape[1]))
        amap = np.min((1 - cos), 0).reshape(1, 1, height, height)
        amap = torch.nn.functional.interpolate(torch.tensor(amap), size=size, mode="bilinear",
                                               align_corners=True)
        few_shot.append(amap[0].numpy())
    return text_probs[0][1].item(), anomaly_map + np.sum(few_shot, axis=0)


def test_few_shot_score_is_april_gan_formula_with_the_reference_normaliser(
        aprillab_bundle, small_model, rng, tmp_path):
    """APRIL-GAN: score = 0.5 * (text probability + normalised max of the few-shot map), its
    normaliser the test set's min/max of those maxima. Ours: the same with min/max over the
    reference images, each against the others (fixed before test time)."""
    import shutil

    inspector = Inspector.open(shutil.copytree(aprillab_bundle, tmp_path / "b"))
    bundle = inspector.bundle
    reference = eager_reference(small_model[0], bundle)
    text = torch.from_numpy(bundle.category("weave").text_prototypes)
    text = (text / text.norm(dim=-1, keepdim=True)).T
    refs = [rng.integers(0, 256, (160, 160, 3), dtype=np.uint8) for _ in range(3)]
    queries = [rng.integers(0, 256, (160, 160, 3), dtype=np.uint8) for _ in range(3)]
    features = [reference.features(torch.from_numpy(_tensors(bundle, [im]))) for im in refs]

    def port(image, memory):
        embedding, levels = reference.features(torch.from_numpy(_tensors(bundle, [image])))
        memory_levels = [torch.cat([f[1][i][0] for f in memory]) for i in range(len(LAYERS))]
        return april_gan_test_script(embedding, levels, text, reference.state, memory_levels,
                                     SIZE)

    peaks = [np.max(port(im, features[:k] + features[k + 1:])[1]) for k, im in enumerate(refs)]
    lo, hi = min(peaks), max(peaks)
    inspector.add_references("weave", refs)
    np.testing.assert_allclose(bundle.category("weave").memory[MAP_RANGE], [lo, hi], atol=TOL)
    results = inspector.inspect(queries, "weave")
    for image, result in zip(queries, results):
        probability, amap = port(image, features)
        assert result.mode == "few-shot"
        assert abs(result.image_score - 0.5 * (probability + (amap.max() - lo) / (hi - lo))) <= TOL
        assert np.abs(result.anomaly_map - amap[0]).max() <= TOL


def test_positions_resampled_as_open_clip_does_and_518_default_for_vit_l_14_336():
    from open_clip.model import resize_pos_embed

    from clipinspect.export.methods.aprillab import image_size_for, interpolate_positional_embedding

    pos = torch.randn(1 + 24 * 24, 8, generator=torch.Generator().manual_seed(0))
    ours = interpolate_positional_embedding(pos, (24, 24), (37, 37))
    state = {"visual.positional_embedding": pos}
    resize_pos_embed(state, type("M", (), {"visual": type("V", (), {"grid_size": (37, 37)})}))
    torch.testing.assert_close(ours, state["visual.positional_embedding"], rtol=0, atol=1e-6)
    plain = torch.nn.functional.interpolate(pos[1:].reshape(1, 24, 24, 8).permute(0, 3, 1, 2),
                                            size=(37, 37), mode="bicubic", align_corners=False)
    assert (ours[1:] - plain.permute(0, 2, 3, 1).reshape(-1, 8)).abs().max() > 1e-3
    assert image_size_for("ViT-L-14-336", None) == 518
    assert image_size_for("ViT-L-14-336", 336) == 336 and image_size_for(MODEL, None) is None


def test_activation_is_set_explicitly_and_checkpoints_of_the_other_one_are_refused(tmp_path):
    import open_clip

    from clipinspect.export.methods.aprillab import (activation_name, load_projections,
                                                     model_activation, set_activation)

    torch.manual_seed(0)
    model = open_clip.create_model(MODEL, pretrained=None).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    assert model_activation(model) == "gelu"
    with torch.no_grad():
        plain = model.encode_image(x)
        set_activation(model, activation_name("quick-gelu"))
        assert model_activation(model) == "quick_gelu"
        assert (model.encode_image(x) - plain).abs().max() > 1e-4
        assert isinstance(model.transformer.resblocks[0].mlp.gelu,
                          open_clip.transformer.QuickGELU)  # the text tower too
    ckpt = tmp_path / "quick.pt"
    torch.save({"trainable_linearlayer": random_state(),
                "clipinspect": {"model": MODEL, "layers": list(LAYERS),
                                "activation": "quick_gelu"}}, ckpt)
    _, record = load_projections(str(ckpt), WIDTH, DIM, LAYERS, MODEL, activation="quick_gelu")
    assert record["trained"]["activation"] == "quick_gelu"
    with pytest.raises(ValueError, match="trained with activation quick_gelu, but this model runs "
                                         "gelu: export with --activation quick_gelu"):
        load_projections(str(ckpt), WIDTH, DIM, LAYERS, MODEL, activation="gelu")
    with pytest.raises(ValueError, match="choose gelu or quick_gelu"):
        activation_name("relu")


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
    assert record["trained"]["activation"] == "gelu"
    with pytest.raises(Exception, match=f"trained for {MODEL} layers"):
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
