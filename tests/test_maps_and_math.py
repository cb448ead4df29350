"""Host post-processing and the WinCLIP scoring math, against direct implementations."""

from __future__ import annotations

import numpy as np
import pytest
torch = pytest.importorskip("torch")  # compares with torch: the export extra
import torch.nn.functional as F  # noqa: E402

from clipinspect.export.methods.winclip import (WinClipHead, WinClipReference, harmonic_to_patches,
                                                incidence, window_indices, windows_of_scale)  # noqa: E402
from clipinspect.runtime.core.maps import bilinear_matrix, gaussian_blur, overlay, upsample  # noqa: E402


@pytest.mark.parametrize("size", [(240, 240), (15, 15), (7, 9), (1023, 517), (1, 1)])
def test_upsampling_equals_torch_bilinear(size, rng):
    grid = rng.random((15, 15)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(grid)[None, None], size=size, mode="bilinear",
                             align_corners=False)[0, 0].numpy()
    assert np.abs(upsample(grid, size) - expected).max() < 1e-5


def test_interpolation_rows_sum_to_one():
    m = bilinear_matrix(100, 15)
    assert np.allclose(m.sum(1), 1.0) and (m >= 0).all()


def test_gaussian_blur_keeps_constants_and_mass():
    flat = np.full((50, 40), 0.3, np.float32)
    assert np.allclose(gaussian_blur(flat, 3.0), 0.3, atol=1e-6)
    spike = np.zeros((64, 64), np.float32)
    spike[32, 32] = 1
    blurred = gaussian_blur(spike, 2.0)
    assert abs(blurred.sum() - 1) < 1e-4 and blurred.max() < 0.1


def test_overlay_shape_and_mask_outline(rng):
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[5:10, 5:10] = True
    out = overlay(image, rng.random((20, 30)), mask=mask)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert (out[5, 5] == 255).all()        # outline drawn in white


def test_window_indices_match_the_explicit_loop():
    for grid, k in [((15, 15), 2), ((15, 15), 3), ((14, 14), 3), ((4, 6), 2)]:
        idx = window_indices(grid, k).tolist()
        assert idx == windows_of_scale(*grid, k)
        assert len(idx) == (grid[0] - k + 1) * (grid[1] - k + 1)
    assert len(windows_of_scale(15, 15, 2)) == 196 and len(windows_of_scale(15, 15, 3)) == 169
    with pytest.raises(ValueError, match="does not fit"):
        window_indices((4, 4), 5)


def test_harmonic_aggregation_equals_the_definition():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 169, generator=gen) + 0.01
    a = incidence((15, 15), 3)
    got = harmonic_to_patches(scores, a, a.sum(0))
    expected = torch.zeros(3, 225)
    for b in range(3):
        for p in range(225):
            inv = [1 / scores[b, w] for w, patches in enumerate(windows_of_scale(15, 15, 3))
                   if p in patches]
            expected[b, p] = len(inv) / sum(inv)
    assert torch.allclose(got, expected, atol=1e-6)
    # Corner patch sits in one window: its score is that window's score.
    assert torch.allclose(got[:, 0], scores[:, 0])


def test_zero_window_score_gives_zero_not_nan():
    scores = torch.full((1, 196), 0.5)
    scores[0, 0] = 0.0
    a = incidence((15, 15), 2)
    got = harmonic_to_patches(scores, a, a.sum(0))
    ref = WinClipReference.__new__(WinClipReference)
    ref.grid = (15, 15)
    expected = ref.harmonic(scores, 2)
    assert torch.isfinite(got).all() and float(got[0, 0]) < 1e-20
    assert torch.allclose(got, expected, atol=1e-6)


def test_head_class_score_is_the_softmax_of_cosines_over_temperature():
    head = WinClipHead((2, 2), (), few_shot=False)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[1.0, 1.0], [3.0, 0.0]])
    score, grid = head(v, text)
    expected = torch.softmax(torch.tensor([[0.7071, 0.7071], [1.0, 0.0]]) / 0.07, -1)[:, 1]
    assert torch.allclose(score, expected, atol=1e-4)
    assert torch.allclose(grid, score[:, None, None].expand(2, 2, 2))  # no scales: broadcast


@pytest.mark.parametrize("grid, size", [((15, 15), (256, 256)), ((7, 7), (90, 120)),
                                        ((14, 14), (1300, 1001)), ((15, 15), (10, 7)),
                                        ((1, 1), (5, 5))])
def test_upsample_is_the_bilinear_matrix_product_without_blas(grid, size):
    """upsample computes ry @ map @ rx.T from the two taps per row (element-wise numpy, no
    BLAS call whose threads would spin), larger maps in blocks of rows."""
    g = np.random.default_rng(1).random(grid).astype(np.float32)
    expected = (bilinear_matrix(size[0], grid[0]).astype(np.float64) @ g
                @ bilinear_matrix(size[1], grid[1]).astype(np.float64).T)
    out = upsample(g, size)
    assert out.dtype == np.float32 and out.shape == size
    assert np.abs(out - expected).max() <= 1e-6
