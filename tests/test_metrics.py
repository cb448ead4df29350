"""Tests for the AUROC metric."""

from __future__ import annotations

import numpy as np
import pytest

from clipinspect.calibration.metrics import image_auroc


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
