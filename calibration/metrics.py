"""Anomaly-detection metrics on plain numpy arrays.

Image level: :func:`image_auroc`, :func:`average_precision`, :func:`f1_max` take one label and
one score per sample. Pixel level: :func:`pixel_auroc` and :func:`pro_auc` take ground-truth masks
and anomaly maps of shape (N, H, W); the same AP / F1-max functions accept flattened pixels too.
The definitions are the ones of the MVTec AD / VisA benchmarks, so numbers are comparable with
published ones. Only numpy is used (connected components included).
"""

from __future__ import annotations

import numbers

import numpy as np


# --------------------------------------------------------------------------------------------
# Input checks shared by all metrics
# --------------------------------------------------------------------------------------------


def _as_binary(labels: np.ndarray, name: str) -> np.ndarray:
    """Bool array of the same shape; accepts bool or numbers that are all 0 or 1."""
    if labels.dtype == bool:
        return labels
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise ValueError(f"{name} must be bool or 0/1 numbers, got dtype {labels.dtype}")
    bad = (labels != 0) & (labels != 1)  # NaN is caught here too (NaN != 0 and != 1)
    if bad.any():
        raise ValueError(
            f"{name} must be 0 or 1 (or bool); found {labels[bad].ravel()[0]!r} "
            f"at flat index {int(np.flatnonzero(bad)[0])}"
        )
    return labels == 1


def _as_real(scores: np.ndarray, name: str, metric: str) -> np.ndarray:
    """Real-valued array of the same shape; +-inf allowed, NaN rejected."""
    if scores.dtype == bool:
        scores = scores.astype(np.uint8)
    if not (np.issubdtype(scores.dtype, np.integer) or np.issubdtype(scores.dtype, np.floating)):
        raise ValueError(f"{name} must be real numbers, got dtype {scores.dtype}")
    if np.issubdtype(scores.dtype, np.floating):
        nan = np.isnan(scores)
        if nan.any():
            raise ValueError(
                f"{name} contain {int(nan.sum())} NaN value(s) (first at flat index "
                f"{int(np.flatnonzero(nan)[0])}); fix or drop them before computing {metric}"
            )
    return scores


def _labels_and_scores(labels, scores, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Flattened (P,) bool labels and (P,) real scores, checked to have the same shape."""
    y = np.asarray(labels)
    s = np.asarray(scores)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores must have the same shape, got {y.shape} and {s.shape}")
    return _as_binary(y.ravel(), "labels"), _as_real(s.ravel(), "scores", metric)


def _masks_and_maps(masks, maps, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) bool masks and (N, H, W) real maps, checked."""
    m = np.asarray(masks)
    a = np.asarray(maps)
    if m.shape != a.shape:
        raise ValueError(f"masks and maps must have the same shape, got {m.shape} and {a.shape}")
    if m.ndim != 3:
        raise ValueError(
            f"masks and maps must be (N, H, W), got {m.ndim} dimension(s) {m.shape}; "
            "for a single image add a leading axis (mask[None], map[None])"
        )
    return _as_binary(m, "masks"), _as_real(a, "maps", metric)


def _need_both_classes(n_pos: int, n_neg: int, metric: str, what: str = "label(s)") -> None:
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"{metric} needs both classes, got {n_pos} positive and {n_neg} negative "
            f"{what}; evaluate on a set with anomalous and normal samples"
        )


# --------------------------------------------------------------------------------------------
# ROC
# --------------------------------------------------------------------------------------------


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
    y, s = _labels_and_scores(labels, scores, "AUROC")

    n_pos = int(np.count_nonzero(y))
    n_neg = y.size - n_pos
    _need_both_classes(n_pos, n_neg, "AUROC")

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


def pixel_auroc(masks, maps) -> float:
    """Pixel-level AUROC: every pixel of every image pooled into one ROC.

    This is the MVTec AD / VisA "pixel AUROC" (not a mean of per-image AUROCs, which would
    be undefined on normal images and weight small images like large ones).

    Args:
        masks: (N, H, W) bool (or 0/1) ground truth, True = anomalous pixel.
        maps: (N, H, W) real anomaly scores; +-inf allowed, NaN not.

    Returns:
        AUROC in [0, 1].

    Raises:
        ValueError: shapes differ or are not 3-D, masks not binary, NaN in maps, or the
            set has no anomalous or no normal pixel.
    """
    m, a = _masks_and_maps(masks, maps, "pixel AUROC")
    n_pos = int(np.count_nonzero(m))
    _need_both_classes(n_pos, m.size - n_pos, "pixel AUROC", "pixel(s)")
    return image_auroc(m, a)


# --------------------------------------------------------------------------------------------
# Precision / recall
# --------------------------------------------------------------------------------------------


def _tp_fp_per_threshold(y: np.ndarray, s: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True / false positives when predicting ``score >= t``, for each distinct score t.

    Args:
        y: (P,) bool labels.
        s: (P,) real scores.

    Returns:
        tp, fp: (T,) int64 counts, T = number of distinct scores, thresholds in descending
        order (so both are non-decreasing); and the thresholds (T,) themselves.
    """
    order = np.argsort(s, kind="stable")[::-1]  # descending; order within ties is irrelevant
    s_sorted = s[order]
    tp = np.cumsum(y[order], dtype=np.int64)
    del order
    # Equal scores form one threshold: keep only the cumulative count at the end of each run,
    # so a tie between a positive and a negative is never split into two curve points.
    ends = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    tp = tp[ends]
    fp = ends + 1 - tp
    return tp, fp, s_sorted[ends]


def average_precision(labels, scores) -> float:
    """Average precision: area under the step-wise precision-recall curve.

    AP = sum_n (R_n - R_{n-1}) P_n over the distinct score values taken as thresholds in
    descending order (predict positive when score >= threshold), with R_0 = 0. This is the
    definition of scikit-learn's ``average_precision_score`` (no interpolation of precision, no
    trapezoid rule), used by the VisA / MVTec AD benchmarks. Equal scores form one threshold.
    O(N log N).

    Args:
        labels: (N,) bool or 0/1, True = anomalous (positive). Any shape equal to ``scores``.
        scores: (N,) real numbers, higher = more anomalous; +-inf allowed, NaN not.

    Returns:
        AP in [0, 1]. 1.0 when there are no negatives.

    Raises:
        ValueError: shapes differ, labels not binary, scores not real or NaN, or no positive
            label (recall is undefined).
    """
    y, s = _labels_and_scores(labels, scores, "average precision")
    n_pos = _positives(y, "average precision")
    tp, fp, _ = _tp_fp_per_threshold(y, s)
    precision = tp / (tp + fp)  # tp + fp >= 1 at every threshold (it is a real score value)
    recall_gain = np.diff(tp, prepend=0) / n_pos  # R_n - R_{n-1}
    return float(np.dot(recall_gain, precision))


def _positives(y: np.ndarray, metric: str) -> int:
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0:
        raise ValueError(
            f"{metric} needs at least one positive label, got 0 of {y.size}; "
            "recall is undefined without anomalous samples"
        )
    return n_pos


def f1_max(labels, scores) -> float:
    """Best F1 score over all thresholds ("F1-max" of the VisA / MVTec AD benchmarks).

    Thresholds are the distinct score values, predicting positive for score >= threshold.
    F1 = 2PR / (P + R), taken as 0 where P + R = 0 (no true positive). It is computed as
    2 TP / (2 TP + FP + FN), which is the same number and needs no special case.

    Args:
        labels: (N,) bool or 0/1, True = anomalous (positive). Any shape equal to ``scores``.
        scores: (N,) real numbers, higher = more anomalous; +-inf allowed, NaN not.

    Returns:
        max F1 in [0, 1].

    Raises:
        ValueError: shapes differ, labels not binary, scores not real or NaN, or no positive
            label (recall is undefined).
    """
    return f1_max_threshold(labels, scores)[0]


def f1_max_threshold(labels, scores) -> tuple[float, float]:
    """(F1-max, the threshold reaching it): the largest score t such that predicting
    ``score >= t`` gives the best F1 (ties between thresholds go to the higher one, fewer alarms).
    Same arguments and errors as :func:`f1_max`."""
    y, s = _labels_and_scores(labels, scores, "F1-max")
    n_pos = _positives(y, "F1-max")
    tp, fp, thresholds = _tp_fp_per_threshold(y, s)
    fn = n_pos - tp
    # Denominator >= n_pos > 0 at every threshold.
    f1 = 2 * tp / (2 * tp + fp + fn)
    best = int(np.argmax(f1))  # first maximum = highest threshold (descending order)
    return float(f1[best]), float(thresholds[best])


# --------------------------------------------------------------------------------------------
# Connected components and PRO
# --------------------------------------------------------------------------------------------


def connected_components(mask) -> tuple[np.ndarray, int]:
    """Label the 8-connected components of a 2-D boolean mask.

    Pixels touching only at a corner belong to the same component (8-connectivity, the
    ``np.ones((3, 3))`` structure of the MVTec AD evaluation code). Components are numbered
    1..n in raster order of their first pixel (row-major), as ``scipy.ndimage.label`` does.

    Method: a vectorized union-find. Each foreground pixel is a node; the 4 "forward"
    neighbour offsets give every 8-neighbour edge once. Every round, (1) pointer jumping
    makes each node point at its tree's root, (2) for every edge joining two trees the
    larger root is hooked under the smaller one (``np.minimum.at``). Roots only ever point
    to smaller indices, so no cycle can form; the rounds stop when no edge joins two trees.
    Edges found inside one tree are dropped, so later rounds get cheaper. The number of rounds
    is small in practice (a 256x256 spiral takes a few ms), unlike plain label propagation,
    which needs as many sweeps as the longest path in a component.

    Args:
        mask: (H, W) bool (or 0/1), True = foreground.

    Returns:
        labels: (H, W) int32, 0 = background, 1..n = component id.
        n: number of components.

    Raises:
        ValueError: mask not 2-D or not binary.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(
            f"mask must be 2-D (H, W), got shape {m.shape}; label each image of a stack separately"
        )
    m = _as_binary(m, "mask")
    h, w = m.shape
    labels = np.zeros((h, w), dtype=np.int32)
    fg = np.flatnonzero(m)
    k = fg.size
    if k == 0:
        return labels, 0

    parent = _union_find_roots(k, *_neighbour_edges(fg, h, w))
    # A root is the smallest node of its tree (hooks only go to smaller indices), i.e. the
    # component's first pixel in raster order: numbering roots in order gives raster labels.
    is_root = parent == np.arange(k)
    rank = np.cumsum(is_root, dtype=np.int32)
    labels.ravel()[fg] = rank[parent]
    return labels, int(rank[-1])


def _neighbour_edges(fg: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Every 8-neighbour edge between the foreground pixels ``fg`` (flat indices into an
    (h, w) mask, raster order) once, as (src, dst) node numbers (positions in ``fg``)."""
    # node[r, c] = index of the pixel among the foreground pixels (raster order), -1 elsewhere.
    node = np.full(h * w, -1, dtype=np.intp)
    node[fg] = np.arange(fg.size)
    node = node.reshape(h, w)
    src, dst = [], []
    # right, down, down-right, down-left: the other 4 neighbours are these edges reversed.
    for a, b in (
        (node[:, :-1], node[:, 1:]),
        (node[:-1, :], node[1:, :]),
        (node[:-1, :-1], node[1:, 1:]),
        (node[:-1, 1:], node[1:, :-1]),
    ):
        both = (a >= 0) & (b >= 0)
        src.append(a[both])
        dst.append(b[both])
    return np.concatenate(src), np.concatenate(dst)


def _union_find_roots(k: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(k,) the root of each of ``k`` nodes joined by the edges (src, dst): the smallest node
    of its component (see :func:`connected_components`)."""
    parent = np.arange(k)
    while True:
        while True:  # pointer jumping until every node points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        root_a = parent[src]
        root_b = parent[dst]
        between = root_a != root_b
        if not between.any():
            return parent
        root_a, root_b = root_a[between], root_b[between]
        np.minimum.at(parent, np.maximum(root_a, root_b), np.minimum(root_a, root_b))
        src, dst = src[between], dst[between]


def _area_to_limit(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid-rule area under the piecewise-linear curve (x, y) from x[0] up to ``limit``.

    Args:
        x: (K,) non-decreasing, x[0] <= limit <= x[-1].
        y: (K,) curve values.

    The curve is linearly interpolated at ``limit`` when it falls inside a segment (as in the
    official MVTec AD ``trapezoid(..., x_max=...)``); points with equal x add no area.
    """
    k = int(np.searchsorted(x, limit, side="right"))  # points with x <= limit
    xs, ys = x[:k], y[:k]
    if xs[-1] < limit:
        # limit lies strictly inside (x[k-1], x[k]), so the denominator is > 0.
        y_lim = y[k - 1] + (y[k] - y[k - 1]) * (limit - x[k - 1]) / (x[k] - x[k - 1])
        xs = np.r_[xs, limit]
        ys = np.r_[ys, y_lim]
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1])) / 2.0)


def pro_auc(masks, maps, fpr_limit: float = 0.3, num_thresholds: int | None = None) -> float:
    """Normalized area under the PRO (per-region overlap) curve up to an FPR limit (AUPRO).

    Official MVTec AD definition. Ground-truth regions are the 8-connected components of
    each image's mask (see :func:`connected_components`). For a threshold t, a pixel is
    predicted anomalous when map >= t, and

    - FPR(t) = share of all normal pixels (mask False, over all images) predicted anomalous;
    - PRO(t) = mean over ALL regions of ALL images of the share of the region's pixels
      predicted anomalous (every region counts equally, whatever its size).

    Thresholds: by default every distinct map value (exact). With ``num_thresholds`` = T,
    T values evenly spaced from min to max of the maps (both included): faster on very large
    sets (no full sort) and close to the exact value when T is a few hundred.

    Integration convention (the one of the MVTec AD evaluation code, ``pro_curve_util.py`` +
    ``generic_util.trapezoid``): the curve is the point (0, 0) (a threshold above every value
    predicts nothing), then one point (FPR(t), PRO(t)) per threshold in decreasing t, which is
    sorted by FPR by construction (both only grow as t decreases). Equal scores form one
    threshold, so ties give straight (diagonal) segments, not an arbitrary staircase. The
    piecewise-linear curve is integrated with the trapezoid rule from FPR 0 to ``fpr_limit``;
    when ``fpr_limit`` falls between two points the curve value there is linearly
    interpolated; several points with the same FPR (vertical steps) add no area. The area is
    divided by ``fpr_limit``, so a perfect map scores 1.0 and a constant map scores
    fpr_limit / 2. The FPR axis is NOT rescaled to [0, 1] before integrating: some research
    code does that (e.g. re-normalising the clipped FPRs by their max), which gives numbers
    that are not comparable with the benchmark's. Computed in float64 (the official code keeps
    FPRs in float32, so it may differ by ~1e-7).

    Cost: exact mode sorts all P pixels once and accumulates per-pixel weights
    (1 for normal pixels into the FPR, 1 / |region| for anomalous ones into the PRO), so it is
    O(P log P) time and O(P) memory, not O(thresholds x pixels).

    Args:
        masks: (N, H, W) bool (or 0/1) ground truth, True = anomalous pixel.
        maps: (N, H, W) real anomaly scores, higher = more anomalous. +-inf is allowed in exact
            mode; NaN never.
        fpr_limit: upper end of the integration, in (0, 1]; 0.3 is the benchmark value.
        num_thresholds: None for the exact curve, or an int >= 2 for the evenly spaced
            approximation (then maps must be finite).

    Returns:
        AUPRO in [0, 1].

    Raises:
        ValueError: shapes differ or are not 3-D, masks not binary, NaN in maps (or +-inf with
            ``num_thresholds``), no anomalous pixel, no normal pixel, bad ``fpr_limit`` or
            ``num_thresholds``.
    """
    gt, scores = _masks_and_maps(masks, maps, "PRO")
    fpr_limit = _check_pro_options(fpr_limit, num_thresholds)
    n_anomalous = int(np.count_nonzero(gt))
    n_normal = gt.size - n_anomalous
    _need_both_classes(n_anomalous, n_normal, "PRO", "pixel(s)")

    region_weight, n_regions = _region_weights(gt)
    normal = ~gt.ravel()
    s = scores.ravel()
    if num_thresholds is None:
        fp, overlap = _counts_at_every_score(s, normal, region_weight)
    else:
        fp, overlap = _counts_at_spaced_thresholds(s, normal, region_weight, int(num_thresholds))

    # Rounding in the float sums can push the last PRO a hair above 1.
    fpr = np.r_[0.0, fp / n_normal]
    pro = np.r_[0.0, np.minimum(overlap / n_regions, 1.0)]
    # fpr[-1] == 1 exactly (lowest threshold takes every pixel), so the limit is always covered.
    return _area_to_limit(fpr, pro, fpr_limit) / fpr_limit


def _check_pro_options(fpr_limit, num_thresholds) -> float:
    if (
        isinstance(fpr_limit, bool)
        or not isinstance(fpr_limit, numbers.Real)
        or not 0.0 < float(fpr_limit) <= 1.0
    ):
        raise ValueError(f"fpr_limit must be a number in (0, 1], got {fpr_limit!r}; 0.3 is standard")
    if num_thresholds is not None and (
        isinstance(num_thresholds, bool)
        or not isinstance(num_thresholds, numbers.Integral)
        or num_thresholds < 2
    ):
        raise ValueError(
            f"num_thresholds must be None (exact) or an integer >= 2, got {num_thresholds!r}"
        )
    return float(fpr_limit)


def _region_weights(gt: np.ndarray) -> tuple[np.ndarray, int]:
    """gt (N, H, W) bool -> (per-pixel weight (N*H*W,) float64, number of regions).

    Weight 1/|region| on anomalous pixels: summing it over the pixels above a threshold gives
    the sum over regions of their overlap, i.e. n_regions * PRO(t)."""
    region_weight = np.zeros(gt.shape, dtype=np.float64)
    n_regions = 0
    for i in range(gt.shape[0]):
        lab, n = connected_components(gt[i])
        if n == 0:
            continue
        inv_size = np.zeros(n + 1)
        inv_size[1:] = 1.0 / np.bincount(lab.ravel(), minlength=n + 1)[1:]
        region_weight[i] = inv_size[lab]
        n_regions += n
    return region_weight.ravel(), n_regions


def _counts_at_every_score(s: np.ndarray, normal: np.ndarray, region_weight: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray]:
    """(false positives, summed overlap) at every distinct score, from the highest down."""
    order = np.argsort(s, kind="stable")[::-1]  # descending score
    s_sorted = s[order]
    fp = np.cumsum(normal[order], dtype=np.int64)
    overlap = np.cumsum(region_weight[order])
    del order
    # One curve point per distinct score: the cumulative sums at the end of each run.
    ends = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    return fp[ends], overlap[ends]


def _counts_at_spaced_thresholds(s: np.ndarray, normal: np.ndarray, region_weight: np.ndarray,
                                 num_thresholds: int) -> tuple[np.ndarray, np.ndarray]:
    """(false positives, summed overlap) at ``num_thresholds`` evenly spaced thresholds from
    max(s) down to min(s)."""
    if not np.isfinite(s).all():
        raise ValueError(
            "maps contain +-inf; num_thresholds needs finite maps to space thresholds "
            "between min and max (use num_thresholds=None for the exact curve)"
        )
    thresholds = np.linspace(s.min(), s.max(), num_thresholds)
    # Pixel p is >= thresholds[j] exactly for j < bin[p] (bin = #thresholds <= score).
    bins = np.searchsorted(thresholds, s, side="right")
    t = thresholds.size
    fp_in_bin = np.bincount(bins, weights=normal, minlength=t + 1)
    overlap_in_bin = np.bincount(bins, weights=region_weight, minlength=t + 1)
    # Value at threshold j = sum over bins > j; listed from the highest threshold down.
    fp = np.cumsum(fp_in_bin[::-1])[:-1]
    overlap = np.cumsum(overlap_in_bin[::-1])[:-1]
    return np.rint(fp).astype(np.int64), overlap  # exact integer counts summed in float64
