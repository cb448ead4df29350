"""Tests for the anomaly-detection metrics (AUROC, AP, F1-max, connected components, PRO)."""

from __future__ import annotations

from collections import deque
import time

import numpy as np
import pytest

from clipinspect.calibration.metrics import (
    average_precision,
    connected_components,
    f1_max,
    image_auroc,
    pixel_auroc,
    pro_auc,
)


def _brute_force_auroc(labels, scores) -> float:
    """O(N^2) reference: fraction of (positive, negative) pairs ranked right, ties 1/2."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=float)
    pos = scores[labels][:, None]
    neg = scores[~labels][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


@pytest.mark.parametrize(
    "labels, scores, expected",
    [
        ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 1.0),  # perfect separation
        ([0, 0, 1, 1], [0.8, 0.9, 0.1, 0.2], 0.0),  # perfectly wrong
        ([0, 1], [0.5, 0.5], 0.5),  # a single tied pair counts 1/2
        ([0, 0, 1, 1], [1.0, 1.0, 1.0, 1.0], 0.5),  # all tied
        # P = {0.35, 0.8}, N = {0.1, 0.4}: 0.35 beats 0.1 but not 0.4, 0.8 beats both.
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),
        # P = {0.5, 0.9}, N = {0.5, 0.2, 0.9}: 0.5 vs (0.5 tie, 0.2 win, 0.9 loss) = 1.5,
        # 0.9 vs (0.5 win, 0.2 win, 0.9 tie) = 2.5; total 4 / 6.
        ([1, 0, 0, 1, 0], [0.5, 0.5, 0.2, 0.9, 0.9], 4 / 6),
        # Labels in any 0/1 form, scores as integers.
        ([True, False, True], [3, 1, 1], (1 + 0.5) / 2),
    ],
)
def test_hand_computed_cases(labels, scores, expected):
    assert image_auroc(np.asarray(labels), np.asarray(scores)) == pytest.approx(expected)
    assert image_auroc(labels, scores) == pytest.approx(expected)  # plain lists too


def test_input_order_does_not_matter():
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.4
    s = rng.integers(0, 7, 200).astype(float)
    perm = rng.permutation(200)
    assert image_auroc(y, s) == image_auroc(y[perm], s[perm])


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 400))
    y = rng.random(n) < rng.uniform(0.1, 0.9)
    y[:2] = [True, False]  # make sure both classes exist
    # Few distinct values -> many ties across and within classes.
    s = rng.integers(0, int(rng.integers(2, 12)), n).astype(np.float32)
    assert image_auroc(y, s) == pytest.approx(_brute_force_auroc(y, s), abs=1e-12)
    # Continuous scores with a shift for positives, plus +-inf values.
    s2 = rng.normal(size=n) + y * 0.7
    s2[rng.integers(0, n, 3)] = np.inf
    s2[rng.integers(0, n, 3)] = -np.inf
    assert image_auroc(y.astype(int), s2) == pytest.approx(_brute_force_auroc(y, s2), abs=1e-12)


def test_symmetry_flipping_labels():
    rng = np.random.default_rng(1)
    y = rng.random(300) < 0.3
    s = rng.integers(0, 5, 300)
    assert image_auroc(y, s) + image_auroc(~y, s) == pytest.approx(1.0)
    assert image_auroc(y, -s) == pytest.approx(1.0 - image_auroc(y, s))


def test_pixel_scale_input_is_fast_and_correct():
    # 2 M "pixels" as a flattened (N, H, W) map with quantised scores (heavy ties).
    rng = np.random.default_rng(2)
    masks = rng.random((8, 500, 500)) < 0.05
    maps = (rng.random((8, 500, 500)) + 0.5 * masks).astype(np.float32)
    maps = np.round(maps, 2)
    auc = image_auroc(masks, maps)  # same shape: flattened internally
    # Reference via a histogram over the 2-decimal levels (exact for this data).
    levels = np.round(maps * 100).astype(np.int64).ravel()
    pos = np.bincount(levels[masks.ravel()], minlength=200).astype(float)
    neg = np.bincount(levels[~masks.ravel()], minlength=200).astype(float)
    neg_below = np.cumsum(neg) - neg
    ref = (pos @ neg_below + 0.5 * pos @ neg) / (pos.sum() * neg.sum())
    assert auc == pytest.approx(ref, abs=1e-12)
    assert 0.8 < auc < 1.0


def test_one_class_raises():
    with pytest.raises(ValueError, match="both classes.*0 positive"):
        image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="both classes.*0 negative"):
        image_auroc([True, True], [0.1, 0.2])
    with pytest.raises(ValueError, match="both classes"):
        image_auroc([], [])


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match=r"same shape.*\(3,\).*\(2,\)"):
        image_auroc([0, 1, 1], [0.1, 0.2])


def test_nan_scores_raise():
    with pytest.raises(ValueError, match="NaN.*index 1"):
        image_auroc([0, 1, 1], [0.1, np.nan, 0.3])


def test_non_binary_labels_raise():
    with pytest.raises(ValueError, match="0 or 1.*2"):
        image_auroc([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0 or 1"):
        image_auroc([0.0, 0.5, 1.0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="labels must be"):
        image_auroc(["a", "b"], [0.1, 0.2])


def test_non_numeric_scores_raise():
    with pytest.raises(ValueError, match="scores must be real"):
        image_auroc([0, 1], ["x", "y"])
    with pytest.raises(ValueError, match="scores must be real"):
        image_auroc([0, 1], [1 + 1j, 2 + 0j])


def test_returns_python_float():
    assert type(image_auroc([0, 1], [0.0, 1.0])) is float


# ============================================================================================
# pixel AUROC
# ============================================================================================


def test_pixel_auroc_pools_all_pixels():
    # Image 0: positives 0.9, 0.4; negatives 0.1, 0.5. Image 1: negatives 0.3, 0.9.
    # Pooled pairs (pos, neg): 0.9 beats 0.1, 0.5, 0.3 and ties 0.9 -> 3.5; 0.4 beats 0.1, 0.3 -> 2.
    masks = np.array([[[1, 0], [1, 0]], [[0, 0], [0, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.1], [0.4, 0.5]], [[0.3, 0.9], [0.3, 0.3]]])
    # Image 1 also has two more 0.3 negatives: 0.9 and 0.4 beat them (+2 each).
    assert pixel_auroc(masks, maps) == pytest.approx((3.5 + 2 + 4) / (2 * 6))
    assert pixel_auroc(masks, maps) == image_auroc(masks.ravel(), maps.ravel())


def test_pixel_auroc_errors():
    with pytest.raises(ValueError, match=r"\(N, H, W\).*mask\[None\]"):
        pixel_auroc(np.zeros((4, 4), bool), np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"same shape.*\(1, 2, 2\).*\(1, 2, 3\)"):
        pixel_auroc(np.zeros((1, 2, 2), bool), np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="0 positive.*pixel"):
        pixel_auroc(np.zeros((1, 2, 2), bool), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(np.eye(2, dtype=bool)[None], np.array([[[0.1, np.nan], [0.2, 0.3]]]))


# ============================================================================================
# Average precision and F1-max
# ============================================================================================


def _brute_force_ap_f1(labels, scores) -> tuple[float, float]:
    """Loop over the distinct scores as thresholds (descending), predicting score >= t."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=float)
    n_pos = y.sum()
    ap, best_f1, prev_recall = 0.0, 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
        pred = s >= t
        tp = int((pred & y).sum())
        fp = int((pred & ~y).sum())
        precision = tp / (tp + fp)
        recall = tp / n_pos
        ap += (recall - prev_recall) * precision
        prev_recall = recall
        f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
        best_f1 = max(best_f1, f1)
    return ap, best_f1


@pytest.mark.parametrize(
    "labels, scores, ap, f1",
    [
        # t=.9: P=1 R=.5; t=.8: P=.5 R=.5; t=.7: P=2/3 R=1; t=.6: P=.5 R=1.
        # AP = .5*1 + 0 + .5*2/3 + 0; F1 = 2/3, .5, .8, 2/3.
        ([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.6], 0.5 + 1 / 3, 0.8),
        # scikit-learn's docstring example.
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.8333333333333333, 0.8),
        # Tie between a positive and a negative is ONE threshold: t=.5: P=.5 R=.5; t=.2: P=2/3 R=1.
        ([1, 0, 1], [0.5, 0.5, 0.2], 0.25 + 0.5 * 2 / 3, 0.8),
        # Everything tied: a single threshold, P = prevalence, R = 1.
        ([1, 0, 0, 0], [3, 3, 3, 3], 0.25, 2 * 0.25 / 1.25),
        # Perfect ranking and no negatives at all.
        ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 1.0, 1.0),
        ([1, 1], [0.3, 0.7], 1.0, 1.0),
        # Positive ranked last: t=.9: P=0 R=0 (F1 0); t=.1: P=1/3 R=1.
        ([0, 0, 1], [0.9, 0.9, 0.1], 1 / 3, 0.5),
    ],
)
def test_ap_f1_hand_computed(labels, scores, ap, f1):
    assert average_precision(labels, scores) == pytest.approx(ap, abs=1e-12)
    assert f1_max(labels, scores) == pytest.approx(f1, abs=1e-12)
    assert type(average_precision(labels, scores)) is float
    assert type(f1_max(labels, scores)) is float


@pytest.mark.parametrize("seed", range(6))
def test_ap_f1_match_brute_force_with_ties(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(20, 300))
    y = rng.random(n) < rng.uniform(0.05, 0.9)
    y[0] = True
    for s in (
        rng.integers(0, int(rng.integers(2, 15)), n).astype(float),  # heavy ties
        rng.normal(size=n) + 0.8 * y,  # continuous
        np.round(rng.random(n) + 0.3 * y, 1),  # ties across classes
    ):
        ap_ref, f1_ref = _brute_force_ap_f1(y, s)
        assert average_precision(y, s) == pytest.approx(ap_ref, abs=1e-12)
        assert f1_max(y, s) == pytest.approx(f1_ref, abs=1e-12)
        # Order of samples is irrelevant.
        perm = rng.permutation(n)
        assert average_precision(y[perm], s[perm]) == pytest.approx(ap_ref, abs=1e-12)


def test_ap_f1_accept_pixel_arrays_and_inf():
    rng = np.random.default_rng(7)
    y = rng.random((2, 16, 16)) < 0.2
    s = rng.integers(0, 6, (2, 16, 16)).astype(float)
    s[0, 0, :3] = [np.inf, -np.inf, np.inf]
    ap_ref, f1_ref = _brute_force_ap_f1(y.ravel(), s.ravel())
    assert average_precision(y, s) == pytest.approx(ap_ref, abs=1e-12)
    assert f1_max(y.astype(int), s) == pytest.approx(f1_ref, abs=1e-12)


def test_ap_f1_errors():
    for fn in (average_precision, f1_max):
        with pytest.raises(ValueError, match="at least one positive.*0 of 3"):
            fn([0, 0, 0], [0.1, 0.2, 0.3])
        with pytest.raises(ValueError, match=r"same shape.*\(3,\).*\(2,\)"):
            fn([0, 1, 1], [0.1, 0.2])
        with pytest.raises(ValueError, match="NaN.*index 2"):
            fn([0, 1, 1], [0.1, 0.2, np.nan])
        with pytest.raises(ValueError, match="0 or 1.*2"):
            fn([0, 1, 2], [0.1, 0.2, 0.3])


# ============================================================================================
# Connected components
# ============================================================================================


def _flood_fill_labels(mask) -> tuple[np.ndarray, int]:
    """Reference: BFS flood fill, 8-connectivity, components numbered in raster order."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int64)
    n = 0
    for r in range(h):
        for c in range(w):
            if not mask[r, c] or labels[r, c]:
                continue
            n += 1
            labels[r, c] = n
            queue = deque([(r, c)])
            while queue:
                y, x = queue.popleft()
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                            labels[yy, xx] = n
                            queue.append((yy, xx))
    return labels, n


@pytest.mark.parametrize(
    "mask, n",
    [
        ([[1, 0], [0, 1]], 1),  # touching only at a corner: ONE component
        ([[0, 1], [1, 0]], 1),  # the other diagonal
        ([[1, 0, 1]], 2),
        ([[1, 0], [0, 0], [0, 1]], 2),
        ([[1, 1, 0, 0, 1], [0, 0, 0, 1, 0], [1, 0, 0, 0, 0]], 3),
        ([[0, 0], [0, 0]], 0),
        ([[1, 1], [1, 1]], 1),
    ],
)
def test_connected_components_small(mask, n):
    labels, count = connected_components(np.array(mask, dtype=bool))
    assert count == n
    assert labels.dtype == np.int32
    ref, _ = _flood_fill_labels(mask)
    np.testing.assert_array_equal(labels, ref)


@pytest.mark.parametrize("seed", range(8))
def test_connected_components_match_flood_fill(seed):
    rng = np.random.default_rng(200 + seed)
    h, w = (int(v) for v in rng.integers(1, 48, 2))
    # Densities around the 8-connectivity percolation point give long, branching shapes
    # with many diagonal-only links.
    mask = rng.random((h, w)) < rng.uniform(0.1, 0.7)
    labels, n = connected_components(mask.astype(np.uint8))  # 0/1 numbers accepted
    ref, n_ref = _flood_fill_labels(mask)
    assert n == n_ref
    np.testing.assert_array_equal(labels, ref)


def test_connected_components_long_diagonal_serpentine_is_one_component_and_fast():
    # Vertical bars in every other column, linked alternately at the top and at the bottom by
    # a pixel that touches the two bars only at corners: one 256x256 component whose path
    # winds through every bar (~32k pixels long), the worst case for label propagation.
    size = 256
    mask = np.zeros((size, size), dtype=bool)
    mask[1:-1, ::2] = True
    mask[0, 1::4] = True
    mask[-1, 3::4] = True
    start = time.perf_counter()
    labels, n = connected_components(mask)
    elapsed = time.perf_counter() - start
    assert n == 1
    assert (labels[mask] == 1).all() and (labels[~mask] == 0).all()
    assert elapsed < 1.0  # a few ms in practice
    # Without the links: one component per bar.
    mask[0] = mask[-1] = False
    assert connected_components(mask)[1] == size // 2
    # A checkerboard is connected through corners only.
    checker = np.add.outer(np.arange(64), np.arange(64)) % 2 == 0
    assert connected_components(checker)[1] == 1


def test_connected_components_errors_and_empty():
    labels, n = connected_components(np.zeros((0, 5), bool))
    assert n == 0 and labels.shape == (0, 5)
    with pytest.raises(ValueError, match=r"2-D.*\(1, 2, 2\)"):
        connected_components(np.zeros((1, 2, 2), bool))
    with pytest.raises(ValueError, match="0 or 1.*3"):
        connected_components(np.array([[0, 3]]))


# ============================================================================================
# PRO
# ============================================================================================


def _reference_pro_auc(masks, maps, fpr_limit=0.3) -> float:
    """Direct PRO: loop over distinct thresholds and over regions, trapezoid with interpolation."""
    masks = np.asarray(masks, dtype=bool)
    maps = np.asarray(maps, dtype=float)
    region_masks = []  # (image index, (H, W) bool) for every region of every image
    for i, mask in enumerate(masks):
        labels, n = _flood_fill_labels(mask)
        for k in range(1, n + 1):
            region_masks.append((i, labels == k))
    normal_scores = maps[~masks]

    points = [(0.0, 0.0)]  # a threshold above every score predicts nothing
    for t in np.unique(maps)[::-1]:
        fpr = float(np.mean(normal_scores >= t))
        overlaps = [float(np.mean(maps[i][region] >= t)) for i, region in region_masks]
        points.append((fpr, sum(overlaps) / len(overlaps)))
    points.sort()

    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:  # the limit is inside this segment: interpolate the curve there
            y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_limit) / 2
    return area / fpr_limit


def _blob_masks(rng, n_images, size, n_blobs=3) -> np.ndarray:
    """Union of random discs and rectangles, plus isolated pixels and diagonal pairs."""
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n_images, size, size), dtype=bool)
    for i in range(n_images):
        for _ in range(int(rng.integers(0, n_blobs + 1))):
            r, c = rng.integers(0, size, 2)
            if rng.random() < 0.5:
                radius = rng.uniform(1, size / 5)
                masks[i] |= (yy - r) ** 2 + (xx - c) ** 2 <= radius**2
            else:
                masks[i, r : r + rng.integers(1, 8), c : c + rng.integers(1, 8)] = True
        for _ in range(int(rng.integers(0, 4))):
            r, c = rng.integers(0, size - 1, 2)
            masks[i, r, c] = True
            if rng.random() < 0.5:
                masks[i, r + 1, c + 1] = True  # joined to (r, c) through a corner only
    masks[0, 0, 0] = True  # make sure there is an anomalous pixel
    masks[-1, -1, -1] = False  # and a normal one
    return masks


@pytest.mark.parametrize(
    "masks, maps, fpr_limit, expected",
    [
        # Regions A = {0, 1}, B = {5}; normals {2, 3, 4}. Curve: (0,0) (0,.25) (1/3,.25)
        # (1/3,.75) (1/3,1) (2/3,1) (1,1). Area to 0.3 = .3*.25; to 0.5 = 1/12 + 1/6; to 1 = 3/4.
        ([[[1, 1, 0, 0, 0, 1]]], [[[0.9, 0.5, 0.7, 0.2, 0.1, 0.6]]], 0.3, 0.25),
        ([[[1, 1, 0, 0, 0, 1]]], [[[0.9, 0.5, 0.7, 0.2, 0.1, 0.6]]], 0.5, 0.5),
        ([[[1, 1, 0, 0, 0, 1]]], [[[0.9, 0.5, 0.7, 0.2, 0.1, 0.6]]], 1.0, 0.75),
        # Tie of an anomalous and a normal pixel is one threshold -> diagonal segment:
        # curve (0,0) (.5,.5) (1,1); area to .3 = .045 -> .15.
        ([[[1, 0, 0, 1]]], [[[0.8, 0.8, 0.1, 0.1]]], 0.3, 0.15),
        # One 8-connected region of 3 pixels (diagonal link). t=.9: FPR 0, PRO 1/3; t=.7:
        # FPR 1/3. With 4-connectivity it would be two regions and give 1/2.
        ([[[1, 0, 0], [0, 1, 1]]], [[[0.9, 0.7, 0.1], [0.1, 0.5, 0.5]]], 0.3, 1 / 3),
        # Regions over two images count equally: R1 = image 0 pixel 0, R2 = image 1 pixels 0-1;
        # 5 normals .6 .7 .3 .2 .2. t=.9: (0, .5); t=.8: (0, .75); t=.7 takes a normal and an
        # anomalous pixel at once: (.2, 1); then (.4, 1) (.6, 1) (1, 1).
        # Area to .3 = .2 * (.75 + 1) / 2 + .1 * 1; to .1 the curve is interpolated at .1:
        # .75 + (.1 / .2) * .25 = .875, area .1 * (.75 + .875) / 2.
        (
            [[[1, 0, 0, 0]], [[1, 1, 0, 0]]],
            [[[0.9, 0.6, 0.7, 0.3]], [[0.8, 0.7, 0.2, 0.2]]],
            0.3,
            (0.2 * 1.75 / 2 + 0.1) / 0.3,
        ),
        (
            [[[1, 0, 0, 0]], [[1, 1, 0, 0]]],
            [[[0.9, 0.6, 0.7, 0.3]], [[0.8, 0.7, 0.2, 0.2]]],
            0.1,
            (0.1 * (0.75 + 0.875) / 2) / 0.1,
        ),
    ],
)
def test_pro_hand_computed(masks, maps, fpr_limit, expected):
    masks = np.array(masks, dtype=bool)
    maps = np.array(maps, dtype=float)
    assert pro_auc(masks, maps, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-12)
    assert _reference_pro_auc(masks, maps, fpr_limit) == pytest.approx(expected, abs=1e-12)


def test_pro_perfect_and_constant_maps():
    rng = np.random.default_rng(3)
    masks = _blob_masks(rng, 3, 24)
    assert pro_auc(masks, masks.astype(np.float32)) == pytest.approx(1.0, abs=1e-12)
    # Any map that ranks every anomalous pixel above every normal one is perfect.
    assert pro_auc(masks, rng.random(masks.shape) + 2.0 * masks) == pytest.approx(1.0, abs=1e-12)
    # A constant map: curve (0,0) -> (1,1), area to L is L^2/2, normalized L/2.
    for limit in (0.3, 0.05, 1.0):
        assert pro_auc(masks, np.full(masks.shape, 0.7), limit) == pytest.approx(limit / 2)
    # The worst map (every normal pixel above every anomalous one) scores 0 up to FPR 1.
    assert pro_auc(masks, 1.0 - masks, 0.3) == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_pro_matches_direct_implementation(seed):
    rng = np.random.default_rng(300 + seed)
    masks = _blob_masks(rng, 3, 24)
    signal = masks * rng.uniform(0.2, 1.5)
    tied = np.round(rng.random(masks.shape) + signal, 1)  # ~25 levels: ties across classes
    smooth = (rng.normal(size=masks.shape) + signal).astype(np.float32)  # all distinct
    for maps in (tied, smooth):
        for limit in (0.3, 0.07):
            expected = _reference_pro_auc(masks, maps, limit)
            assert pro_auc(masks, maps, limit) == pytest.approx(expected, abs=1e-6)


def test_pro_invariances():
    rng = np.random.default_rng(4)
    masks = _blob_masks(rng, 4, 20)
    maps = np.round(rng.random(masks.shape) + 0.5 * masks, 2)
    value = pro_auc(masks, maps)
    # Only the order of scores matters, and the order of the images does not.
    assert pro_auc(masks, np.exp(3 * maps) - 5) == pytest.approx(value, abs=1e-12)
    perm = rng.permutation(4)
    assert pro_auc(masks[perm], maps[perm]) == pytest.approx(value, abs=1e-12)
    # +-inf are allowed in exact mode and act as the extreme scores.
    maps_inf = maps.copy()
    maps_inf[maps == maps.max()] = np.inf
    maps_inf[maps == maps.min()] = -np.inf
    assert pro_auc(masks, maps_inf) == pytest.approx(value, abs=1e-12)


def _box_blur(a: np.ndarray, k: int) -> np.ndarray:
    """(N, H, W) mean over a k x k window (edges padded), via cumulative sums."""
    pad = k // 2
    a = np.pad(a, ((0, 0), (pad + 1, pad), (pad + 1, pad)), mode="edge")
    c = a.cumsum(1).cumsum(2)
    return (c[:, k:, k:] - c[:, :-k, k:] - c[:, k:, :-k] + c[:, :-k, :-k]) / (k * k)


def test_pro_num_thresholds_is_close_to_exact():
    rng = np.random.default_rng(5)
    masks = _blob_masks(rng, 6, 64, n_blobs=4)
    maps = _box_blur(rng.normal(size=masks.shape), 5) + _box_blur(masks * 1.0, 7)
    exact = pro_auc(masks, maps)
    approx = pro_auc(masks, maps, num_thresholds=200)
    assert 0.2 < exact < 0.95
    assert approx == pytest.approx(exact, abs=1e-2)
    # When every map value lies on the threshold grid the two modes agree exactly.
    levels = rng.integers(0, 10, masks.shape) + 3 * masks
    assert pro_auc(masks, levels, num_thresholds=13) == pytest.approx(
        pro_auc(masks, levels), abs=1e-12
    )


def test_pro_errors():
    masks = np.zeros((1, 3, 3), dtype=bool)
    masks[0, 1, 1] = True
    maps = np.zeros((1, 3, 3))
    with pytest.raises(ValueError, match="PRO needs both classes.*0 positive"):
        pro_auc(np.zeros((1, 3, 3), bool), maps)
    with pytest.raises(ValueError, match="PRO needs both classes.*0 negative"):
        pro_auc(np.ones((1, 3, 3), bool), maps)
    with pytest.raises(ValueError, match=r"same shape.*\(1, 3, 3\).*\(1, 3, 4\)"):
        pro_auc(masks, np.zeros((1, 3, 4)))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        pro_auc(masks[0], maps[0])
    bad = maps.copy()
    bad[0, 2, 0] = np.nan
    with pytest.raises(ValueError, match="maps contain 1 NaN.*index 6.*PRO"):
        pro_auc(masks, bad)
    with pytest.raises(ValueError, match="masks must be 0 or 1"):
        pro_auc(masks * 2, maps)
    for limit in (0, -0.1, 1.5, "0.3", np.nan):
        with pytest.raises(ValueError, match="fpr_limit must be a number in"):
            pro_auc(masks, maps, fpr_limit=limit)
    for nt in (1, 2.5, True):
        with pytest.raises(ValueError, match="num_thresholds must be None"):
            pro_auc(masks, maps, num_thresholds=nt)
    inf_maps = maps.copy()
    inf_maps[0, 0, 0] = np.inf
    assert 0.0 <= pro_auc(masks, inf_maps) <= 1.0  # exact mode takes inf
    with pytest.raises(ValueError, match="inf.*num_thresholds=None"):
        pro_auc(masks, inf_maps, num_thresholds=10)
