"""MuSc's scoring in numpy: mutual scoring as blocked matrix products, the interval average,
the maps, and RsCIN image re-scoring (docs/methods.md#musc-mutual-scoring-of-unlabeled-images).

Every feature row is L2-normalised by the encoder graph, so the squared distance of two rows is
2 - 2 a.b and the nearest patch of image j is the one with the largest dot product. The pairwise
dot products of a block of images with another are one GEMM; a max-reduction over each image's
patches leaves (rows, images) numbers, so memory is bounded by the block (``BLOCK_ROWS`` x
``BLOCK_ROWS`` floats), never by the pool. In batch mode each pair of images is computed once and
reduced along both axes (the distances from image i to j and from j to i are the same matrix);
blocks on the diagonal are split in halves recursively, so they too cost about half their
square. The block product runs as a small onnxruntime graph (musc_kernels) on the bundle's
provider.

Precision. A float32 dot product of two unit vectors of width C <= 1024 is off by about 1e-6,
so the squared distance 2 - 2 a.b is too, and the distance by about 1e-6 / d: small except near
d = 0 (the published code, computing the same form in float32 through torch.cdist, has the same
error). The fast path recomputes every minimum below ``REFINE_D2`` (d < 0.01) in float64 over
all patches of that image, so its own bound is about 1e-4 on one distance (1e-6 / 0.01), and
far less after the interval mean and the means over layers and r; tests/test_musc.py measures
it on near-duplicate rows and on real encoder features against the float64 reference.
``exact=True`` does every product in float64 with the norms as they are.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from ..core.errors import UsageError
from .musc_kernels import Quantised, block_max

# ``section`` below is a runtime.methods.musc.MuscSection (layers, r_list, rscin_k), not
# imported: that module imports this one.
#: The interval of the mutual scoring: the mean of the smallest 30 % of the N - 1 per-image
#: nearest-patch distances (the published 0-30 %).
INTERVAL = 0.3
#: A pool of fewer others leaves the interval empty (int(3 * 0.3) = 0).
MIN_OTHERS = 4


def feature_name(layer: int, r: int) -> str:
    return f"musc_{layer}_r{r}"


def default_layers(depth: int) -> tuple[int, ...]:
    """1-based blocks at the quarter points of the depth: 6, 12, 18, 24 for 24 blocks (the
    published 0-based 5, 11, 17, 23), 3, 6, 9, 12 for 12 (our choice by the same rule)."""
    return tuple(sorted({max(1, round(depth * q / 4)) for q in (1, 2, 3, 4)}))


def interval_k(others: int) -> int:
    """How many of ``others`` per-image distances the interval averages; refuses an empty one."""
    k = int(others * INTERVAL)
    if k < 1:
        raise UsageError(f"MuSc scores each image against at least {MIN_OTHERS} others; got "
                         f"{others}: inspect {MIN_OTHERS + 1} or more images together (batch "
                         f"mode), or seed the category's pool with {MIN_OTHERS} or more normal "
                         "parts ('clipinspect fewshot BUNDLE --category C DIR')")
    return k


#: Rows of one block side: 2048 x 2048 float32 = 16 MiB per block product. On a 2-core AMD EPYC,
#: one pool of 100 random unit rows per image, 2048 was as fast as 4096 rows for ViT-S-16's
#: shape and faster for ViT-B-16-plus-240's (3.4 s against 4.4 s per feature map; a quick
#: comparison while writing this, not a committed benchmark).
BLOCK_ROWS = 2048
#: Squared distances below this are recomputed in float64 (d < 0.01).
REFINE_D2 = 1e-4


def pair_gflops(patches: int, width: int, features: int) -> float:
    """GEMM GFLOPs of one pair of images (one direction) over all features."""
    return 2.0 * patches * patches * width * features / 1e9


def _spans(n: int, per: int) -> list[tuple[int, int]]:
    return [(s, min(s + per, n)) for s in range(0, n, per)]


def _sq_dist_exact(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(m, C), (n, C) -> (m, n) squared distances in float64 with the true norms."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d2, 0.0)


def pool_min_sq(z: np.ndarray, exact: bool = False, block_rows: int = BLOCK_ROWS, *,
                provider: str = "cpu", int8: bool = False) -> np.ndarray:
    """z (N, P, C) unit rows -> (N, P, N) float64: squared distance from each patch of image i
    to the nearest patch of image j (the diagonal j = i is inf: an image never scores itself).
    Each pair of image blocks is one kernel call (musc_kernels), reduced along both axes."""
    n, p, c = z.shape
    if exact:
        return _pool_min_sq_exact(z, block_rows)
    q = Quantised(z.reshape(n * p, c), int8)
    out = np.empty((n, p, n), np.float64)
    per = max(1, block_rows // p)

    def pair(i: tuple[int, int], j: tuple[int, int]) -> None:
        """Images i[0]:i[1] against j[0]:j[1] (disjoint): both directions from one call."""
        rows, cols = block_max(provider, q, q, (i[0] * p, i[1] * p), (j[0] * p, j[1] * p), p,
                               both=True)
        out[i[0]:i[1], :, j[0]:j[1]] = (2.0 - 2.0 * rows).reshape(i[1] - i[0], p, j[1] - j[0])
        out[j[0]:j[1], :, i[0]:i[1]] = (2.0 - 2.0 * cols).reshape(
            i[1] - i[0], j[1] - j[0], p).transpose(1, 2, 0)

    def within(lo: int, hi: int) -> None:
        """Every pair inside images lo:hi once: the halves against each other, then each
        half within itself, so a block on the diagonal costs about half its square."""
        if hi - lo <= 2:
            if hi - lo == 2:
                pair((lo, lo + 1), (lo + 1, hi))
            return
        mid = (lo + hi) // 2
        pair((lo, mid), (mid, hi))
        within(lo, mid)
        within(mid, hi)

    spans = _spans(n, per)
    for a, i in enumerate(spans):
        within(*i)
        for j in spans[a + 1:]:
            pair(i, j)
    out = np.maximum(out, 0.0)
    idx = np.arange(n)
    out[idx, :, idx] = np.inf
    if not int8:
        _refine(out, z, z)
    return out


def _pool_min_sq_exact(z: np.ndarray, block_rows: int) -> np.ndarray:
    n, p, c = z.shape
    flat = z.reshape(n * p, c)
    out = np.empty((n, p, n), np.float64)
    spans = _spans(n, max(1, block_rows // p))
    for i0, i1 in spans:
        for j0, j1 in spans:
            d2 = _sq_dist_exact(flat[i0 * p:i1 * p], flat[j0 * p:j1 * p])
            out[i0:i1, :, j0:j1] = d2.reshape(i1 - i0, p, j1 - j0, p).min(axis=3)
    idx = np.arange(n)
    out[idx, :, idx] = np.inf
    return out


def cross_min_sq(q: np.ndarray, pool: np.ndarray, exact: bool = False,
                 block_rows: int = BLOCK_ROWS, *, provider: str = "cpu", int8: bool = False
                 ) -> np.ndarray:
    """q (B, P, C), pool (K, P, C) -> (B, P, K) float64: squared distance from each patch of
    query image b to the nearest patch of pool image k."""
    b, p, c = q.shape
    k_n = pool.shape[0]
    out = np.empty((b, p, k_n), np.float64)
    per = max(1, block_rows // p)
    if exact:
        for j0, j1 in _spans(k_n, per):
            d2 = _sq_dist_exact(q.reshape(b * p, c), pool[j0:j1].reshape(-1, c))
            out[:, :, j0:j1] = d2.reshape(b, p, j1 - j0, p).min(axis=3)
        return out
    qq, qp = Quantised(q.reshape(b * p, c), int8), Quantised(pool.reshape(k_n * p, c), int8)
    for i0, i1 in _spans(b, per):
        for j0, j1 in _spans(k_n, per):
            rows, _ = block_max(provider, qq, qp, (i0 * p, i1 * p), (j0 * p, j1 * p), p,
                                both=False)
            out[i0:i1, :, j0:j1] = (2.0 - 2.0 * rows).reshape(i1 - i0, p, j1 - j0)
    out = np.maximum(out, 0.0)
    if not int8:
        _refine(out, q, pool)
    return out


def _refine(d2: np.ndarray, q: np.ndarray, pool: np.ndarray) -> None:
    """In place: every finite squared minimum below REFINE_D2, recomputed in float64 over all
    patches of that pool image (the float32 argmax may be a near-tie with the true one)."""
    i, p, j = np.nonzero(d2 < REFINE_D2)
    for jj in np.unique(j):
        sel = j == jj
        rows = q[i[sel], p[sel]]                                   # (m, C)
        d2[i[sel], p[sel], jj] = _sq_dist_exact(rows, pool[jj]).min(axis=1)


def interval_mean(d2: np.ndarray, others: int) -> np.ndarray:
    """(..., M) squared minima (inf where excluded) -> (...) float64: the mean of the k =
    int(others * 0.3) smallest distances."""
    k = interval_k(others)
    part = np.partition(d2, k - 1, axis=-1)[..., :k]
    return np.sqrt(part).mean(axis=-1)


def bilinear_matrix(out: int, grid: int) -> np.ndarray:
    """(out, grid) float64 weights of bilinear interpolation with align_corners=True."""
    w = np.zeros((out, grid))
    if grid == 1:
        w[:, 0] = 1.0
        return w
    x = np.arange(out) * ((grid - 1) / (out - 1)) if out > 1 else np.zeros(1)
    x0 = np.minimum(np.floor(x).astype(int), grid - 2)
    frac = x - x0
    w[np.arange(out), x0] = 1.0 - frac
    w[np.arange(out), x0 + 1] += frac
    return w


def map_peaks(grids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, gh, gw) float64 -> (N,): the maximum of each map upsampled to ``size`` (the image
    score: the published maximum of the upsampled map, not of the grid)."""
    wy, wx = bilinear_matrix(size[0], grids.shape[1]), bilinear_matrix(size[1], grids.shape[2])
    return (wy @ grids @ wx.T).reshape(len(grids), -1).max(axis=1)


def patch_scores(features: dict[str, np.ndarray], section: Any,
                 pool: dict[str, np.ndarray] | None = None, *, exact: bool = False,
                 provider: str = "cpu", int8: bool = False,
                 progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Per feature the interval mean of nearest-patch distances, averaged over layers, then
    over r -> (N, P) float64. Without ``pool`` the N images score each other."""
    per_r = []
    for r in section.r_list:
        layers = []
        for n in section.layers:
            name = feature_name(n, r)
            z = features[name]
            if pool is None:
                d2 = pool_min_sq(z, exact, provider=provider, int8=int8)
                layers.append(interval_mean(d2, len(z) - 1))
            else:
                d2 = cross_min_sq(z, pool[name], exact, provider=provider, int8=int8)
                layers.append(interval_mean(d2, len(pool[name])))
            if progress is not None:
                progress(1)
        per_r.append(np.mean(layers, axis=0))
    return np.mean(per_r, axis=0)


def rscin(peaks: np.ndarray, embeddings: np.ndarray, k_list: Sequence[int]) -> np.ndarray:
    """RsCIN (float32 as published): the min-max normalised scores, smoothed per k over each
    image's k largest raw dot products of the normalised embeddings (itself included), row-
    normalised; averaged over k."""
    n = len(peaks)
    too_big = [k for k in k_list if k > n]
    if too_big:
        raise ValueError(f"RsCIN k {too_big} exceeds the {n} images inspected together; "
                         f"inspect at least {max(too_big)} images, or export with smaller "
                         "--rscin-k")
    span = peaks.max() - peaks.min()
    scores = ((peaks - peaks.min()) / span if span > 0 else np.zeros(n)).astype(np.float32)
    # As published: float32 dot products (numpy). Their ranking decides which neighbours count,
    # so on near-equal similarities it follows the last bit of the embeddings.
    e = np.ascontiguousarray(embeddings, np.float32)
    w = e @ e.T
    out = []
    for k in k_list:
        keep = np.argsort(-w, axis=1, kind="stable")[:, :k]
        masked = np.zeros_like(w)
        rows = np.arange(n)[:, None]
        masked[rows, keep] = w[rows, keep]
        out.append((masked / masked.sum(1, keepdims=True)) @ scores)
    return np.mean(out, axis=0).astype(np.float32)


def batch_scores(features: dict[str, np.ndarray], embeddings: np.ndarray,
                 section: Any, grid: tuple[int, int], size: tuple[int, int], *,
                 exact: bool = False, use_rscin: bool = True, provider: str = "cpu",
                 int8: bool = False, progress: Callable[[int], None] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Batch mode: the N images are the pool -> (image scores (N,), grids (N, gh, gw) f64)."""
    grids = patch_scores(features, section, exact=exact, provider=provider, int8=int8,
                         progress=progress).reshape(-1, *grid)
    peaks = map_peaks(grids, size)
    if not use_rscin:
        return peaks, grids
    return rscin(peaks, embeddings.reshape(len(peaks), -1), section.rscin_k), grids


def pool_scores(features: dict[str, np.ndarray], pool: dict[str, np.ndarray],
                section: Any, grid: tuple[int, int], size: tuple[int, int], *,
                exact: bool = False, provider: str = "cpu", int8: bool = False,
                progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Streaming mode: each image against the pool -> (image scores (B,) = map peaks, grids).
    RsCIN needs the scores of a whole pool and is not applied (docs/methods.md)."""
    grids = patch_scores(features, section, pool, exact=exact, provider=provider, int8=int8,
                         progress=progress).reshape(-1, *grid)
    return map_peaks(grids, size), grids


__all__ = ["BLOCK_ROWS", "INTERVAL", "MIN_OTHERS", "REFINE_D2", "default_layers", "feature_name",
           "interval_k", "batch_scores", "cross_min_sq",
           "interval_mean", "map_peaks", "pair_gflops", "patch_scores", "pool_min_sq",
           "pool_scores", "rscin"]
