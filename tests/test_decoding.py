"""Decoders recover known sub-pixel peaks (2D and 3D) within 0.1 px; argmax is the integer peak."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lmlib.methods.decoding import DECODERS, decode_maps
from lmlib.methods.targets import diamond_masks, gaussian_heatmaps

PEAKS_2D = torch.tensor([[[20.3, 31.7], [5.55, 40.2], [30.5, 10.5], [40.0, 12.25]]])
PEAKS_3D = torch.tensor([[[10.3, 11.6, 7.45], [4.8, 14.2, 9.9]]])


@pytest.mark.parametrize("method,kwargs", [("quadratic", {}), ("centroid", {"radius": 6}),
                                           ("centroid", {"radius": 4, "threshold": 0.3}),
                                           ("soft_argmax", {"radius": 3, "beta": 10.0})])
@pytest.mark.parametrize("sigma", [1.5, 2.0, 3.0])
def test_subpixel_gaussian_2d(method, kwargs, sigma):
    h = gaussian_heatmaps(PEAKS_2D, (48, 52), sigma)
    coords, conf = decode_maps(h, 2, method, **kwargs)
    assert coords.shape == PEAKS_2D.shape and conf.shape == (1, 4)
    assert (coords - PEAKS_2D).abs().max() < 0.1


@pytest.mark.parametrize("method", ["quadratic", "centroid", "soft_argmax"])
def test_subpixel_gaussian_3d(method):
    h = gaussian_heatmaps(PEAKS_3D, (20, 22, 18), 2.0)
    coords, _ = decode_maps(h, 3, method, radius=5)
    assert (coords - PEAKS_3D).abs().max() < 0.1


def test_argmax_is_integer_peak_and_scaled_maps():
    h = 7.0 * gaussian_heatmaps(PEAKS_2D, (48, 52), 2.0)
    coords, conf = decode_maps(h, 2, "argmax")
    assert torch.equal(coords, torch.round(PEAKS_2D).clamp(max=51)) or (coords - PEAKS_2D).abs().max() <= 0.5
    assert torch.all(coords == coords.round())
    refined, _ = decode_maps(h, 2, "quadratic")
    assert (refined - PEAKS_2D).abs().max() < 1e-3  # log-parabola is exact for any amplitude
    assert (conf <= 7.0).all()


def test_centroid_of_flat_mask_whose_argmax_is_on_the_rim():
    # a flat-topped blob: argmax = first pixel on its rim; mean shift must still find the centre
    m = diamond_masks(torch.tensor([[[30.0, 25.0]]]), (64, 64), 12)
    coords, _ = decode_maps(m, 2, "centroid", radius=14, threshold=0.5)
    assert (coords - torch.tensor([[[30.0, 25.0]]])).abs().max() < 1e-4


def test_peak_at_border_is_finite():
    h = gaussian_heatmaps(torch.tensor([[[0.0, 0.2]]]), (16, 16), 1.5)
    for method in DECODERS:
        coords, _ = decode_maps(h, 2, method)
        assert torch.isfinite(coords).all()
        # windows clipped at the border bias window decoders inward (by < 1 px here)
        assert (coords - torch.tensor([[[0.0, 0.2]]])).abs().max() < 1.0


def test_unknown_decoder():
    with pytest.raises(ValueError, match="unknown decoder"):
        decode_maps(torch.zeros(1, 1, 4, 4), 2, "nope")


def test_batch_and_numpy_consistency():
    lm = torch.tensor(np.random.default_rng(0).uniform(5, 35, size=(3, 5, 2)), dtype=torch.float32)
    h = gaussian_heatmaps(lm, (40, 40), 2.5)
    coords, _ = decode_maps(h, 2, "quadratic")
    assert coords.shape == (3, 5, 2)
    assert (coords - lm).abs().max() < 1e-3


def test_map_spread_is_the_maps_width_and_vote_spread_the_votes_dispersion():
    import math

    from lmlib.engine.training import spread_to_mm
    from lmlib.methods.decoding import map_spread
    from lmlib.methods.global_local import vote_spread
    from lmlib.methods.targets import gaussian_heatmaps

    for dims, size, sigma in ((2, (40, 36), 1.5), (3, (20, 22, 18), 1.0)):
        lm = torch.tensor([[[10.3, 12.6, 8.2][:dims]]])
        maps = gaussian_heatmaps(lm, size, sigma, torch.ones(1, 1, dtype=torch.bool))
        np.testing.assert_allclose(map_spread(maps, dims, lm).numpy(), sigma, rtol=0.03)
    flat = map_spread(torch.zeros(1, 1, 16, 16), 2, torch.tensor([[[8.0, 8.0]]]))
    assert torch.isnan(flat).all()
    # one patch votes (present), the others are absent: the dispersion is ~0; two equal clusters 6 px apart: 3 px
    disp = torch.zeros(1, 1, 2, 2, 2)
    presence = torch.full((1, 1, 2, 2), -30.0)
    presence[0, 0, 0, 0] = 30.0
    assert vote_spread(presence, disp, stride=8, code="linear").max() < 1e-3
    both = torch.full((1, 1, 2, 2), -30.0)
    both[0, 0, 0, 0] = both[0, 0, 1, 0] = 30.0  # cells 8 px apart along x, same y
    disp2 = torch.zeros(1, 1, 2, 2, 2)
    disp2[0, 0, 0, 1, 0] = -2.0  # the second vote moves 2 px towards the first: 6 px apart
    np.testing.assert_allclose(vote_spread(both, disp2, stride=8, code="linear")[0, 0].numpy(), [3.0, 0.0], atol=1e-4)
    # per-axis spreads in grid px -> one radius in mm through the grid's spacing (0.5 x 2 mm)
    affine = torch.tensor([[[0.5, 0.0, 3.0], [0.0, 2.0, -1.0]]])
    assert spread_to_mm(torch.tensor([[[1.0, 1.0]]]), affine).item() == pytest.approx(math.sqrt(0.25 + 4.0))


@pytest.mark.parametrize("cls_name", ["heatmap_unet", "htc"])
def test_a_heatmap_methods_centroid_window_covers_its_gaussian(cls_name):
    """decoder='centroid' on a heatmap method used a 3-px window whatever sigma: a sigma-4 Gaussian decoded up to
    0.38 px toward the pixel centre (argmax's worst is 0.5); near the border a one-sided window pulled it inward
    (0.53 px at 5.55 px from the edge)."""
    from lmlib.methods import build_method

    method = build_method(cls_name, spatial_dims=2, n_landmarks=4, sigma=4.0, decoder="centroid")
    h = gaussian_heatmaps(PEAKS_2D, (48, 52), 4.0)
    coords, _ = decode_maps(h, 2, "centroid", **method.decoder_kwargs)
    error = (coords - PEAKS_2D).abs()
    assert error[0, [0, 2]].max() < 0.05  # inside: the window spans 3 sigma
    assert error.max() < 0.2  # 5.55 px and 7.75 px from an edge: a smaller window, symmetric about the peak
    assert build_method(cls_name, spatial_dims=2, n_landmarks=4, sigma=4.0, decoder="quadratic").decoder_kwargs == {}
