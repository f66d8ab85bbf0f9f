"""Targets: Gaussian heatmaps peak at the landmark; diamond masks = k cross dilations; pos_weight; schedule."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from lmlib.methods.targets import (
    ShrinkSchedule,
    diamond_area,
    diamond_masks_np,
    dice_scores,
    gaussian_heatmaps,
    gaussian_heatmaps_np,
    mask_pos_weight,
)


def test_gaussian_peak_at_landmark_2d_and_values():
    h = gaussian_heatmaps_np(np.array([[10.0, 20.0], [3.0, 4.0]]), (32, 40), sigma=2.0)
    assert h.shape == (2, 32, 40) and h.dtype == np.float32
    assert np.unravel_index(h[0].argmax(), h[0].shape) == (10, 20)  # axis 0 = x, axis 1 = y
    assert h[0, 10, 20] == pytest.approx(1.0)
    assert h[0, 12, 20] == pytest.approx(np.exp(-4 / 8), rel=1e-5)  # 2 px along x
    assert h[0, 10, 17] == pytest.approx(np.exp(-9 / 8), rel=1e-5)  # 3 px along y


def test_gaussian_3d_anisotropic_sigma_and_amplitude():
    h = gaussian_heatmaps_np(np.array([[5.0, 6.0, 7.0]]), (12, 12, 12), sigma=(1.0, 2.0, 3.0), amplitude=10.0)
    assert np.unravel_index(h[0].argmax(), h[0].shape) == (5, 6, 7)
    assert h[0, 5, 6, 7] == pytest.approx(10.0)
    assert h[0, 5, 6, 10] == pytest.approx(10.0 * np.exp(-9 / 18), rel=1e-5)


def test_gaussian_invalid_and_nan_give_zero_channels():
    lm = np.array([[4.0, 4.0], [np.nan, np.nan], [6.0, 6.0]])
    h = gaussian_heatmaps_np(lm, (10, 10), 1.5, valid=np.array([True, True, False]))
    assert h[0].max() == pytest.approx(1.0)
    assert h[1].max() == 0 and h[2].max() == 0


def test_gaussian_batched_torch():
    lm = torch.tensor([[[2.0, 3.0]], [[7.0, 1.0]]])
    h = gaussian_heatmaps(lm, (9, 9), 1.0)
    assert h.shape == (2, 1, 9, 9)
    assert h[1, 0, 7, 1] == pytest.approx(1.0)


def test_gaussian_separable_rendering_is_the_pixelwise_formula_in_2d_and_3d():
    """The maps are rendered as a product of one Gaussian per axis (one pass over the grid, not six): every pixel
    must equal ``amplitude * exp(-sum_d (i_d - p_d)^2 / (2 sigma_d^2))`` to float rounding, off-grid, batched,
    anisotropic, with invalid and NaN landmarks at zero."""
    rng = np.random.default_rng(0)
    for size, sigma in (((24, 30), 2.5), ((10, 12, 14), (1.0, 1.5, 2.0))):
        lm = rng.uniform(-2, 1, (3, 4, len(size))) + rng.uniform(0, 1, (3, 4, len(size))) * np.array(size)
        lm[0, 1] = np.nan
        valid = np.ones((3, 4), bool)
        valid[2, 3] = False
        h = gaussian_heatmaps(torch.as_tensor(lm, dtype=torch.float32), size, sigma,
                              torch.as_tensor(valid), amplitude=100.0).numpy()
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1)  # (*size, D)
        sig = np.broadcast_to(np.asarray(sigma, float), (len(size),))
        want = 100.0 * np.exp(-(((grid[None, None] - lm.reshape(3, 4, *([1] * len(size)), len(size))) / sig) ** 2).sum(-1) / 2)
        want[0, 1] = 0.0
        want[2, 3] = 0.0
        np.testing.assert_allclose(h, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k", [0, 1, 5, 12])
def test_diamond_equals_k_cross_dilations_with_area(k):
    size = (40, 36)
    m = diamond_masks_np(np.array([[18.3, 17.6]]), size, k)[0]  # rounds to (18, 18)
    ref = np.zeros(size, bool)
    ref[18, 18] = True
    if k:
        ref = ndimage.binary_dilation(ref, ndimage.generate_binary_structure(2, 1), iterations=k)
    assert np.array_equal(m, ref)
    assert m.sum() == 2 * k * k + 2 * k + 1 == diamond_area(k)


def test_diamond_3d_equals_dilations():
    m = diamond_masks_np(np.array([[8.0, 9.0, 10.0]]), (20, 20, 20), 4)[0]
    ref = np.zeros((20, 20, 20), bool)
    ref[8, 9, 10] = True
    ref = ndimage.binary_dilation(ref, ndimage.generate_binary_structure(3, 1), iterations=4)
    assert np.array_equal(m, ref) and m.sum() == diamond_area(4, 3) == 129


def test_seed_mask_areas_and_pos_weight():
    assert diamond_area(65) == 8581
    assert mask_pos_weight(65, (512, 512)) == pytest.approx((512 * 512 - 8581) / 8581)
    assert mask_pos_weight(65, (512, 512)) == pytest.approx(29.55, abs=0.01)
    assert mask_pos_weight(5, (512, 512)) == pytest.approx(4296.4, abs=0.1)


def test_diamond_exact_centre_and_invalid():
    m = diamond_masks_np(np.array([[10.0, 10.0], [5.0, 5.0], [50.0, 3.0]]), (20, 20), 3, centre="exact",
                         valid=np.array([True, False, True]))
    assert m[0].sum() == diamond_area(3)  # integer landmark: same as the rounded ball
    assert m[1].sum() == 0 and m[2].sum() == 0  # invalid; outside the grid
    half = diamond_masks_np(np.array([[10.5, 10.0]]), (20, 20), 3, centre="exact")[0]
    xs, ys = np.nonzero(half)
    assert xs.mean() == pytest.approx(10.5) and ys.mean() == pytest.approx(10.0)


def test_shrink_schedule_seed_and_fitted():
    s = ShrinkSchedule()
    assert [s.radius(e) for e in (0, 49, 50, 100, 299, 300, 349, 500)] == [65, 65, 55, 45, 15, 5, 5, 5]
    assert s.n_stages == 7
    f = ShrinkSchedule.fit_to(70)
    assert f.every == 10 and f.radius(69) == 5 and f.radius(9) == 65
    assert s.radius_px(0, (512, 512)) == 65
    assert s.radius_px(0, (256, 320)) == round(65 * 320 / 512)
    assert s.radius_px(400, (64, 64)) == 1  # never below one pixel


def test_dice_scores():
    a = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    b = torch.zeros_like(a)
    a[0, 0, :2] = True
    b[0, 0, :1] = True
    d = dice_scores(a, b, 2)
    assert d[0, 0] == pytest.approx(2 * 4 / (8 + 4))
    assert torch.isnan(d[0, 1])


def test_foreground_weighted_is_the_weighting_formula_and_its_gradient():
    """The heatmap U-Net's and the HTC's loss weight: ``err * (1 + (w - 1) * target / peak)`` in one ``addcmul``,
    values and gradients as the written-out formula; ``w = 1`` leaves the errors as they are."""
    from lmlib.methods.base import foreground_weighted

    torch.manual_seed(0)
    target = gaussian_heatmaps(torch.tensor([[[5.0, 7.0], [2.5, 3.0]]]), (12, 10), 1.5, amplitude=100.0)
    out = torch.randn(1, 2, 12, 10, requires_grad=True)
    got = foreground_weighted((out - target) ** 2, target, 30.0, 100.0)
    want = (out - target) ** 2 * (1 + 29.0 * target / 100.0)
    torch.testing.assert_close(got, want)
    (g1,) = torch.autograd.grad(got.sum(), out)
    (g2,) = torch.autograd.grad(want.sum(), out)
    torch.testing.assert_close(g1, g2)
    err = torch.rand(2, 3)
    assert foreground_weighted(err, torch.ones(2, 3), 1.0, 100.0) is err


def test_gaussian_sigma_as_any_number_or_one_per_axis():
    """``sigma``: a Python or NumPy number, a 0-d array, one value in a list, or one per axis give the same maps (a
    Python number is read without NumPy, for the compiled loss); a wrong count is refused."""
    lm = torch.tensor([[[5.0, 6.0, 7.0]]])
    ref = gaussian_heatmaps(lm, (12, 12, 12), 1.5)
    for sigma in (np.float32(1.5), np.float64(1.5), np.array(1.5), [1.5], (1.5, 1.5, 1.5), np.full(3, 1.5)):
        torch.testing.assert_close(gaussian_heatmaps(lm, (12, 12, 12), sigma), ref)
    with pytest.raises(ValueError):
        gaussian_heatmaps(lm, (12, 12, 12), (1.0, 2.0))
