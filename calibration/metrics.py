"""Anomaly-detection metrics on plain numpy arrays."""

from __future__ import annotations

import numpy as np


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve, higher score meaning "more anomalous".

    Equals the Mann-Whitney U statistic over (positives x negatives) with average
    ranks for ties: a tied positive/negative pair counts 1/2. Runs in O(N log N),
    so flattened pixel maps (millions of values) are fine for pixel AUROC too.

    Args:
        labels: (N,) bool, or numbers that are all 0 or 1; True/1 = anomalous.
            Any shape is accepted as long as it equals the shape of ``scores``.
        scores: (N,) real numbers; +-inf is allowed, NaN is not.

    Returns:
        AUROC in [0, 1].

    Raises:
        ValueError: shapes differ, labels are not binary, scores are not real or
            contain NaN, or only one class is present.
    """
    y = np.asarray(labels)
    s = np.asarray(scores)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores must have the same shape, got {y.shape} and {s.shape}")
    y = y.ravel()
    s = s.ravel()

    if y.dtype != bool:
        if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
            raise ValueError(f"labels must be bool or 0/1 numbers, got dtype {y.dtype}")
        bad = (y != 0) & (y != 1)
        if bad.any():
            raise ValueError(
                f"labels must be 0 or 1 (or bool); found {y[bad][0]!r} "
                f"at flat index {int(np.flatnonzero(bad)[0])}"
            )
        y = y == 1
    if s.dtype == bool:
        s = s.astype(np.uint8)
    if not (np.issubdtype(s.dtype, np.integer) or np.issubdtype(s.dtype, np.floating)):
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    if np.issubdtype(s.dtype, np.floating):
        nan = np.isnan(s)
        if nan.any():
            raise ValueError(
                f"scores contain {int(nan.sum())} NaN value(s) (first at flat index "
                f"{int(np.flatnonzero(nan)[0])}); fix or drop them before computing AUROC"
            )

    n_pos = int(np.count_nonzero(y))
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"AUROC needs both classes, got {n_pos} positive and {n_neg} negative "
            "label(s); evaluate on a set with anomalous and normal samples"
        )

    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    y_sorted = y[order]
    del order  # free memory early on pixel-level inputs
    # Groups of equal scores: starts of each run in sorted order.
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    pos = np.add.reduceat(y_sorted.astype(np.int64), starts)  # positives per group
    size = np.diff(np.r_[starts, y.size])
    neg = size - pos
    neg_below = np.cumsum(neg) - neg  # negatives with a strictly lower score
    # 2U = 2 * (pairs won) + (pairs tied), exact in integers.
    twice_u = 2 * int(np.dot(pos, neg_below)) + int(np.dot(pos, neg))
    return twice_u / (2.0 * n_pos * n_neg)
