"""onnxruntime FP32 outputs equal a direct PyTorch evaluation of the WinCLIP / WinCLIP+ formulas of docs/methods.md."""

from __future__ import annotations

import numpy as np
import pytest
torch = pytest.importorskip("torch")  # compares with torch: the export extra

from clipinspect.runtime import Inspector  # noqa: E402
from clipinspect.runtime.core.images import to_rgb_array  # noqa: E402
from conftest import SMALL_GRID  # noqa: E402

TOL = 1e-4
# Both encoder graphs of a bundle: the standard-operator one and onnxruntime's fused attention.
ATTENTION = pytest.mark.parametrize("attention", ["fused", "standard"])


def _tensor(bundle, rgb_images):
    return torch.from_numpy(bundle.preprocess.batch([to_rgb_array(im) for im in rgb_images]))


def _images(rng):
    # Various sizes and layouts: larger and smaller than 224, non-square, grayscale, RGBA.
    return [rng.integers(0, 256, (300, 260, 3), dtype=np.uint8),
            rng.integers(0, 256, (97, 131, 3), dtype=np.uint8),
            rng.integers(0, 256, (224, 224), dtype=np.uint8),
            rng.integers(0, 256, (180, 200, 4), dtype=np.uint8)]


def _expected(reference, bundle, images, category, memory=None):
    prototypes = torch.from_numpy(bundle.category(category).text_prototypes)
    out = []
    for im in images:
        rgb = to_rgb_array(im)
        s, m = reference(_tensor(bundle, [im]), prototypes, rgb.shape[:2], memory)
        out.append((float(s[0]), m[0].numpy()))
    return out


@ATTENTION
def test_zero_shot_scores_and_maps_equal_reference(small_bundle_path, reference, rng, attention):
    inspector = Inspector.open(small_bundle_path, attention=attention)
    assert inspector.encoder_graph == {"fused": "encoder_fused", "standard": "encoder"}[attention]
    images = _images(rng)
    results = inspector.inspect(images, category="weave", batch_size=3)
    expected = _expected(reference, inspector.bundle, images, "weave")
    for r, (score, amap), im in zip(results, expected, images):
        assert r.ok and r.mode == "zero-shot"
        assert r.anomaly_map.shape == im.shape[:2] and r.anomaly_map.dtype == np.float32
        assert abs(r.image_score - score) <= TOL
        assert np.abs(r.anomaly_map - amap).max() <= TOL


@ATTENTION
def test_few_shot_scores_and_maps_equal_reference(bundle_copy, reference, rng, attention):
    inspector = Inspector.open(bundle_copy, attention=attention)
    refs = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(3)]
    shots, failed = inspector.add_references("washer", refs)
    assert (shots, failed) == (3, [])
    images = _images(rng)
    results = inspector.inspect(images, category="washer", batch_size=2)
    memory = reference.features(_tensor(inspector.bundle, refs))
    expected = _expected(reference, inspector.bundle, images, "washer", memory)
    for r, (score, amap) in zip(results, expected):
        assert r.ok and r.mode == "few-shot"
        assert abs(r.image_score - score) <= TOL
        assert np.abs(r.anomaly_map - amap).max() <= TOL
    # The same images zero-shot on request, still equal to the reference.
    zero = inspector.inspect(images[:1], category="washer", mode="zero-shot")[0]
    assert abs(zero.image_score - _expected(reference, inspector.bundle, images[:1], "washer")[0][0]) <= TOL


@pytest.mark.parametrize("graph", ["encoder", "encoder_fused"])
def test_encoder_outputs_equal_open_clip_and_reference(small_bundle_path, small_model, reference,
                                                       rng, graph):
    import onnxruntime as ort

    from clipinspect.runtime import Bundle

    bundle = Bundle.open(small_bundle_path)
    session = ort.InferenceSession(str(bundle.graph_path("fp32", graph)),
                                   providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, {"images": x.numpy()})))
    f = reference.features(x)
    with torch.no_grad():
        official = small_model[0].encode_image(x).numpy()
    windows = {k: (SMALL_GRID - k + 1) ** 2 for k in (2, 3)}  # 36 and 25 on a 7 x 7 grid
    assert out["image_embedding"].shape == (2, 384)
    assert out["window_embeddings_2"].shape == (2, windows[2], 384)
    assert out["window_embeddings_3"].shape == (2, windows[3], 384)
    assert out["patch_tokens"].shape == (2, SMALL_GRID ** 2, 384)
    assert np.abs(out["image_embedding"] - official).max() <= TOL
    assert np.abs(out["patch_tokens"] - f.patch_tokens.numpy()).max() <= TOL
    for k in (2, 3):
        assert np.abs(out[f"window_embeddings_{k}"] - f.window_embeddings[k].numpy()).max() <= TOL


def test_batching_does_not_change_results(small_bundle_path, rng):
    inspector = Inspector.open(small_bundle_path)
    images = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(5)]
    one = inspector.inspect(images, "weave", batch_size=1)
    many = inspector.inspect(images, "weave", batch_size=4)
    for a, b in zip(one, many):
        assert abs(a.image_score - b.image_score) <= 1e-5
        assert np.abs(a.anomaly_map - b.anomaly_map).max() <= 1e-5


def test_query_identical_to_reference_has_zero_few_shot_term(bundle_copy, rng):
    # With the query in memory, every association score is 0, so the few-shot map MF is ~0 and
    # the final map is half the zero-shot map: harmonic means of zeros must not become NaN.
    inspector = Inspector.open(bundle_copy)
    image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    inspector.add_references("weave", [image])
    few = inspector.inspect([image], "weave")[0]
    zero = inspector.inspect([image], "weave", mode="zero-shot")[0]
    assert np.isfinite(few.anomaly_map).all()
    assert np.abs(few.anomaly_map - zero.anomaly_map / 2).max() <= 1e-5
    assert abs(few.image_score - (zero.image_score + 0.0) / 2) <= 1e-5


def test_manifest_records_weights_and_measured_parity(small_bundle_path):
    from clipinspect.runtime import Bundle

    m = Bundle.open(small_bundle_path).manifest.to_dict()
    assert m["model"]["weights"] == {**m["model"]["weights"], "kind": "random", "seed": 0}
    parity = m["parity"]["fp32"]
    assert parity["passed"] is True and parity["tolerance"] == TOL and parity["images"] == 3
    assert set(parity["max_abs_diff"]) == {"encoder", "encoder_fused", "head_zeroshot",
                                           "head_fewshot"}
    assert all(0 <= v <= TOL for v in parity["max_abs_diff"].values())
    assert m["opset"] >= 17
    assert m["grid"] == [SMALL_GRID, SMALL_GRID] and m["windows"] == {"2": 36, "3": 25}


@pytest.mark.slow
def test_default_model_vit_b_16_plus_240_parity(tmp_path, rng):
    """The product default, random weights: export passes its own check (on one image: each is
    a full eager pass of 365 windows) and the runtime equals the eager reference, zero-shot and
    few-shot."""
    from clipinspect.export.exporter import ExportOptions, export_bundle, load_clip
    from clipinspect.export.methods import METHODS

    bundle = export_bundle(ExportOptions(tmp_path / "b16p", "ViT-B-16-plus-240", None, ["pill"],
                                         seed=0, parity_images=1))
    parity = bundle.manifest.to_dict()["parity"]["fp32"]
    assert parity["passed"] and parity["images"] == 1
    assert bundle.manifest.grid == (15, 15) and bundle.manifest.section.windows == {"2": 196, "3": 169}
    assert bundle.manifest.dims.to_dict() == {"embed": 640, "width": 896, "patches": 225,
                                              "layers": 12}
    model, _, _ = load_clip("ViT-B-16-plus-240", None, seed=0)
    reference = METHODS["winclip"].reference.from_manifest(model, bundle.manifest)
    assert reference.scales == (2, 3)
    inspector = Inspector.open(bundle)
    images = [rng.integers(0, 256, (260, 250, 3), dtype=np.uint8)]
    refs = [rng.integers(0, 256, (240, 240, 3), dtype=np.uint8)]
    zero = inspector.inspect(images, "pill")
    inspector.add_references("pill", refs)
    few = inspector.inspect(images, "pill")
    # The eager features of each image once (the slow part), scored zero-shot and few-shot.
    features = reference.features(_tensor(bundle, images))
    memory = reference.features(_tensor(bundle, refs))
    prototypes = torch.from_numpy(bundle.category("pill").text_prototypes)
    for results, mem in ((zero, None), (few, memory)):
        scores, grids = reference.score(features, prototypes, mem)
        maps = torch.nn.functional.interpolate(grids[:, None], size=(260, 250), mode="bilinear",
                                               align_corners=False)[:, 0]
        for r, score, amap in zip(results, scores, maps):
            assert r.mode == ("zero-shot" if mem is None else "few-shot")
            assert abs(r.image_score - float(score)) <= TOL
            assert np.abs(r.anomaly_map - amap.numpy()).max() <= TOL
