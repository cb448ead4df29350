"""MuSc (export/methods/musc.py, runtime/methods/musc*.py): the exported encoder and the numpy
scoring against the eager reference of the published formulas, batch mode and streaming mode,
the fast path's own bound, and the rolling pool of a line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import SMALL_MODEL, needs_export

CATEGORY = "washer"
N_IMAGES = 10


@pytest.fixture(scope="module")
def musc_bundle(tmp_path_factory):
    needs_export()
    from clipinspect.export.exporter import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("musc") / "bundle"
    export_bundle(ExportOptions(out=out, model=SMALL_MODEL, pretrained=None,
                                categories=[CATEGORY], method="musc", warn_random=False))
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from clipinspect.calibration import synth

    root = tmp_path_factory.mktemp("musc_data")
    synth.generate(root, categories=[CATEGORY], n_train=6, n_test_good=6,
                   n_test_defect_per_type=1)
    files = sorted((root / CATEGORY / "test").glob("*/*.png"))
    assert len(files) >= N_IMAGES
    return files[:N_IMAGES], sorted((root / CATEGORY / "train" / "good").glob("*.png"))


@pytest.fixture(scope="module")
def reference(musc_bundle):
    from clipinspect.export.exporter import load_clip
    from clipinspect.export.methods.musc import MuscReference
    from clipinspect.runtime.core.bundle import Bundle

    model = load_clip(SMALL_MODEL, None, 0, warn_random=False)[0]
    return MuscReference.from_manifest(model, Bundle.open(musc_bundle).manifest)


def tensors(inspector, files):
    import torch

    return torch.from_numpy(np.stack([inspector.bundle.preprocess(
        np.asarray(Image.open(f).convert("RGB"))) for f in files]))


def upsampled(grids, size):
    from clipinspect.runtime.methods.musc_scoring import bilinear_matrix

    wy, wx = bilinear_matrix(size[0], grids.shape[1]), bilinear_matrix(size[1], grids.shape[2])
    return np.stack([wy @ g @ wx.T for g in grids])


def test_bundle_has_only_an_encoder_and_records_its_parity(musc_bundle):
    from clipinspect.runtime.core.bundle import Bundle

    b = Bundle.open(musc_bundle)
    m = b.manifest
    assert set(m.graphs["fp32"]) <= {"encoder", "encoder_fused"}
    assert m.outputs[0] == "image_embedding"
    assert m.outputs[1:] == [f"musc_{n}_r{r}" for n in (3, 6, 9, 12) for r in (1, 3, 5)]
    assert m.parity["fp32"].passed and m.parity["fp32"].max_abs_diff["encoder"] < 1e-4
    assert m.section.rscin_k == [1, 2, 3] and m.section.pool_size == 100
    raw = json.loads((musc_bundle / "manifest.json").read_text())
    assert raw["musc"]["interval"] == 0.3


def test_batch_mode_equals_the_eager_reference(musc_bundle, images, reference):
    """The folder is the pool: maps and image scores (RsCIN on and off) within 1e-4 of the
    published formulas evaluated eagerly (float64 distances), on the fast path and the exact."""
    from clipinspect.runtime.core.inspector import Inspector
    from clipinspect.runtime.methods import musc_scoring as ms

    files = images[0]
    inspector = Inspector.open(musc_bundle)
    results = inspector.inspect(files, CATEGORY, batch_size=4)
    assert {r.mode for r in results} == {"zero-shot"}
    x = tensors(inspector, files)
    want_scores, want_maps = reference(x)
    got = np.array([r.image_score for r in results])
    assert np.abs(got - want_scores.numpy()).max() < 1e-4
    encoded = inspector.backend.encode(x.numpy())
    section, grid = inspector.manifest.section, tuple(inspector.manifest.grid)
    size = tuple(inspector.manifest.preprocess.size)
    peaks_ref, _ = reference(x, rscin=False)
    for exact in (False, True):
        feats = {n: encoded[n] for n in section.features()}
        peaks, grids = ms.batch_scores(feats, encoded["image_embedding"], section, grid, size,
                                       exact=exact, use_rscin=False)
        assert np.abs(peaks - peaks_ref.numpy()).max() < 1e-4
        assert np.abs(upsampled(grids, size) - want_maps.numpy()).max() < 1e-4
    # Not a comparison of two constants: the scores spread and RsCIN changes them.
    assert np.ptp(got) > 0.1 and np.abs(got - peaks).max() > 1e-3


def test_streaming_equals_batch_mode_with_the_same_pool(musc_bundle, images, reference,
                                                        tmp_path):
    """One image scored against a pool of the other N - 1 gets its batch-mode map and its
    score before RsCIN; and both equal the reference's pool scoring."""
    import shutil

    from clipinspect.runtime.core.inspector import Inspector
    from clipinspect.runtime.methods import musc_scoring as ms

    files = images[0]
    bundle = tmp_path / "b"
    shutil.copytree(musc_bundle, bundle)
    inspector = Inspector.open(bundle)
    x = tensors(inspector, files)
    encoded = inspector.backend.encode(x.numpy())
    section, grid = inspector.manifest.section, tuple(inspector.manifest.grid)
    size = tuple(inspector.manifest.preprocess.size)
    peaks, grids = ms.batch_scores({n: encoded[n] for n in section.features()},
                                   encoded["image_embedding"], section, grid, size,
                                   use_rscin=False)
    shots, _ = inspector.add_references(CATEGORY, files[1:])
    assert shots == N_IMAGES - 1
    result = inspector.inspect(files[0], CATEGORY)[0]
    assert result.mode == "few-shot"
    assert abs(result.image_score - peaks[0]) < 1e-6
    streamed, grid0, _ = inspector.score(inspector.backend.encode(x[:1].numpy()), CATEGORY)
    assert np.abs(grid0[0] - grids[0]).max() < 1e-6
    ref_score, _ = reference(x[:1], pool_images=x[1:])
    assert abs(result.image_score - float(ref_score[0])) < 1e-4


def test_fast_path_bound_on_near_duplicate_patches():
    """Rows that nearly repeat across images (distances near 0, where float32's 2 - 2 a.b loses
    most): every distance of the fast path is within its stated 1e-4 of float64 after the
    refinement of those below 0.01; without it, far more."""
    from clipinspect.runtime.methods import musc_scoring as ms

    rng = np.random.default_rng(0)
    base = rng.standard_normal((1, 49, 384))
    z = base + rng.standard_normal((8, 49, 384)) * np.geomspace(1e-6, 1e-1, 49)[None, :, None]
    z = (z / np.linalg.norm(z, axis=-1, keepdims=True)).astype(np.float32)
    fast, exact = ms.pool_min_sq(z), ms.pool_min_sq(z, exact=True)
    finite = np.isfinite(exact)
    err = np.abs(np.sqrt(fast[finite]) - np.sqrt(exact[finite])).max()
    assert err < 1e-4
    # Without the refinement the same rows are off by far more (the bound is the refinement's).
    raw = np.maximum(2 - 2 * np.einsum("ipc,jqc->ipjq", z, z).max(-1), 0)
    assert np.abs(np.sqrt(raw[finite]) - np.sqrt(exact[finite])).max() > 1e-4
    q = ms.cross_min_sq(z[:2], z[2:])
    assert np.abs(np.sqrt(q) - np.sqrt(ms.cross_min_sq(z[:2], z[2:], exact=True))).max() < 1e-4


def test_blocks_do_not_change_the_result():
    from clipinspect.runtime.methods import musc_scoring as ms

    rng = np.random.default_rng(1)
    z = rng.standard_normal((7, 10, 16)).astype(np.float32)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    whole = ms.pool_min_sq(z, block_rows=10_000)
    assert np.allclose(ms.pool_min_sq(z, block_rows=20), whole, atol=1e-6, equal_nan=False)
    assert np.isinf(whole[np.arange(7), :, np.arange(7)]).all()
    cross = ms.cross_min_sq(z[:3], z[3:], block_rows=10)
    assert np.allclose(cross, whole[:3, :, 3:], atol=1e-6)


def test_small_pools_are_refused_with_what_to_do(musc_bundle, images):
    from clipinspect.runtime.core.errors import UsageError
    from clipinspect.runtime.core.inspector import Inspector

    inspector = Inspector.open(musc_bundle)
    with pytest.raises(UsageError, match="at least 4 others; got 3.*5 or more images"):
        inspector.inspect(images[0][:4], CATEGORY)


def test_rolling_pool_learns_only_normal_parts_and_persists(musc_bundle, images, tmp_path):
    """Line mode: parts judged normal join the pool (the oldest leave at K), anomalous ones
    never; the pool is written to the bundle and a new Inspector scores with it."""
    import shutil

    from clipinspect.runtime.core.bundle import Bundle
    from clipinspect.runtime.core.inspector import Inspector

    bundle = tmp_path / "b"
    shutil.copytree(musc_bundle, bundle)
    files, train = images
    inspector = Inspector.open(bundle)
    inspector.add_references(CATEGORY, train[:5])
    scores = [r.image_score for r in inspector.inspect(files, CATEGORY)]
    threshold = float(np.median(scores))
    Bundle.open(bundle).set_thresholds(CATEGORY, "fp32/few-shot", {"image": threshold})
    inspector = Inspector.open(bundle)
    pool = inspector.stream(save_every=3, size=7)
    results = inspector.inspect(files, CATEGORY, batch_size=2)
    normal = [r.source for r in results if r.is_anomalous is False]
    assert normal and len(normal) < len(results)
    inspector.close_stream()
    entry = Bundle.open(bundle).manifest.categories[CATEGORY].memory
    assert entry.shots == 7 == min(7, 5 + len(normal))
    assert entry.sources[-len(normal):] == normal[-7:] if len(normal) <= 7 else True
    assert not set(entry.sources) & {r.source for r in results if r.is_anomalous}
    assert pool.state()["added"] == len(normal)
    again = Inspector.open(bundle)
    assert again.category_data(CATEGORY).shots == 7
    assert again.memory_digest(CATEGORY) == entry.sha256


def test_without_a_threshold_the_pool_does_not_learn_and_says_so(musc_bundle, images,
                                                                  tmp_path, capsys):
    import shutil

    from clipinspect.runtime.core.inspector import Inspector

    bundle = tmp_path / "b"
    shutil.copytree(musc_bundle, bundle)
    files, train = images
    inspector = Inspector.open(bundle)
    inspector.add_references(CATEGORY, train[:4])
    digest = inspector.memory_digest(CATEGORY)
    inspector.stream()
    inspector.inspect(files[:3], CATEGORY)
    inspector.close_stream()
    assert "does not learn: no image threshold" in capsys.readouterr().err
    assert Inspector.open(bundle).memory_digest(CATEGORY) == digest


def test_export_refuses_what_musc_does_not_take(tmp_path):
    needs_export()
    from clipinspect.export.errors import ExportError
    from clipinspect.export.exporter import ExportOptions, export_bundle

    with pytest.raises(ExportError, match="--prompts do not apply to --method musc"):
        export_bundle(ExportOptions(out=tmp_path / "x", model=SMALL_MODEL, pretrained=None,
                                    method="musc", prompts=tmp_path / "p.json"))
    with pytest.raises(ExportError, match="aggregation degrees"):
        export_bundle(ExportOptions(out=tmp_path / "x", model=SMALL_MODEL, pretrained=None,
                                    method="musc", method_options={"r_list": [2]}))


@pytest.fixture()
def line_bundle(musc_bundle, images, tmp_path):
    """A copy with a pool of 5 normal parts and an image threshold at the median score of the
    test parts against it (some parts judged normal, some not)."""
    import shutil

    from clipinspect.runtime.core.bundle import Bundle
    from clipinspect.runtime.core.inspector import Inspector

    bundle = tmp_path / "line"
    shutil.copytree(musc_bundle, bundle)
    files, train = images
    inspector = Inspector.open(bundle)
    inspector.add_references(CATEGORY, train[:5])
    scores = [r.image_score for r in inspector.inspect(files, CATEGORY)]
    Bundle.open(bundle).set_thresholds(CATEGORY, "fp32/few-shot",
                                       {"image": float(np.median(scores))})
    return bundle


def test_watch_on_a_hot_folder_grows_the_pool_with_the_parts_judged_normal(line_bundle, images,
                                                                          tmp_path):
    import shutil

    from clipinspect.runtime.cli import main
    from clipinspect.runtime.core.bundle import Bundle

    folder = tmp_path / "in"
    folder.mkdir()
    for f in images[0]:
        shutil.copy(f, folder / f"{f.parent.name}_{f.name}")
    out = tmp_path / "results.jsonl"
    assert main(["watch", str(line_bundle), "--input", str(folder), "--category", CATEGORY,
                 "--once", "--settle", "0", "--out", str(out), "--journal",
                 str(tmp_path / "j.sqlite")]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    normal = [r for r in rows if r.get("is_anomalous") is False]
    assert normal and len(normal) < len(rows)
    entry = Bundle.open(line_bundle).manifest.categories[CATEGORY].memory
    assert entry.shots == 5 + len(normal)


def test_serve_scores_against_the_pool_and_writes_it_when_it_stops(line_bundle, images):
    import httpx

    from clipinspect.runtime.core.bundle import Bundle
    from clipinspect.runtime.core.inspector import Inspector
    from clipinspect.runtime.serving.server import ServeConfig
    from test_serve import Live

    inspector = Inspector.open(line_bundle)
    inspector.stream()  # what serve's loader does for the active bundle
    live = Live(inspector, ServeConfig(max_batch=2, max_wait_ms=20, max_queue=8))
    try:
        answers = [httpx.post(live.url + "/v1/inspect", content=f.read_bytes(),
                              params={"category": CATEGORY},
                              headers={"Content-Type": "image/png"}, timeout=120).json()
                   for f in images[0][:6]]
    finally:
        live.stop()
    assert all(a["mode"] == "few-shot" for a in answers), answers[0]
    judged_normal = sum(a["is_anomalous"] is False for a in answers)
    assert Bundle.open(line_bundle).manifest.categories[CATEGORY].memory.shots == \
        5 + judged_normal


def test_a_line_refuses_a_category_without_a_pool(musc_bundle):
    from clipinspect.runtime.core.errors import UsageError
    from clipinspect.runtime.core.inspector import Inspector

    inspector = Inspector.open(musc_bundle)
    assert inspector.check(CATEGORY) == "zero-shot"  # offline: batch mode
    inspector.stream()
    with pytest.raises(UsageError, match="has none.*clipinspect fewshot .* or score a folder"):
        inspector.check(CATEGORY)


def test_engines_and_triton_are_refused_for_a_bundle_without_heads(musc_bundle, tmp_path):
    from clipinspect.runtime.core.bundle import Bundle, BundleError
    from clipinspect.runtime.triton.repository import write_repository

    with pytest.raises(BundleError, match="Triton model repository needs scoring head graphs"):
        write_repository(musc_bundle, tmp_path / "repo")
    with pytest.raises(BundleError, match="build-engine' needs scoring head graphs"):
        from clipinspect.runtime.tensorrt.engine import _check_request
        from clipinspect.runtime.core.profiles import BatchRange
        _check_request(Bundle.open(musc_bundle), "fp32", BatchRange(), 8, 1024, "fp16")


def test_feedback_on_a_learning_pool_keeps_its_additions_and_follows_its_bound(line_bundle,
                                                                              images):
    """A false alarm clicked while the pool has additions not yet written: they are written
    first, then the part joins; a full pool lets its oldest part go (the pool's rule)."""
    from clipinspect.runtime.core.bundle import Bundle
    from clipinspect.runtime.core.inspector import Inspector
    from clipinspect.runtime.core.memory_book import MemoryBook

    files = images[0]
    inspector = Inspector.open(line_bundle)
    pool = inspector.stream(save_every=100, size=8)
    results = inspector.inspect(files, CATEGORY, batch_size=2)
    added = pool.state()["added"]
    assert added and pool.state()["unsaved"] == {CATEGORY: added}
    flagged = next(r for r in results if r.is_anomalous)
    book = MemoryBook(line_bundle)
    book.feedback(inspector, CATEGORY, files[results.index(flagged)].read_bytes(),
                  "false_alarm", who="test")
    entry = Bundle.open(line_bundle).manifest.categories[CATEGORY].memory
    assert entry.shots == min(8, 5 + added + 1)
    assert entry.sources[-1].startswith("feedback")
    assert pool.state()["lost"] == 0


def test_the_int8_block_product_agrees_with_float32_and_is_what_int8_graphs_use(musc_bundle,
                                                                               images):
    """The int8 kernel: one scale per feature map, int32 products, maxima before scaling; its
    distances agree with float32 to quantisation accuracy (not 1e-4); an Inspector on int8
    graphs scores with it."""
    from clipinspect.runtime.core.inspector import Inspector
    from clipinspect.runtime.methods import musc, musc_scoring as ms

    rng = np.random.default_rng(2)
    z = rng.standard_normal((6, 49, 384)).astype(np.float32)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    f32, i8 = ms.pool_min_sq(z), ms.pool_min_sq(z, int8=True)
    finite = np.isfinite(f32)
    err = np.abs(np.sqrt(f32[finite]) - np.sqrt(i8[finite]))
    assert 1e-6 < err.max() < 2e-2
    inspector = Inspector.open(musc_bundle)
    x = np.stack([inspector.bundle.preprocess(np.asarray(Image.open(f).convert("RGB")))
                  for f in images[0]])
    encoded = inspector.backend.encode(x)
    want, want_grids = musc.score(inspector, encoded, None)
    inspector.precision = "int8"  # the scorer reads it: int8 graphs score in int8
    got, grids = musc.score(inspector, encoded, None)
    assert np.abs(got - want).max() > 0  # a different computation ran
    assert np.corrcoef(grids.ravel(), want_grids.ravel())[0, 1] > 0.98
