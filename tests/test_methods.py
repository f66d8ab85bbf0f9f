"""Method parts (targets, loss, decoding round trip) and smoke runs of the two U-Net notebooks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lmlib.methods import METHOD_NAMES, build_method

LM = torch.tensor([[[10.3, 20.6], [30.0, 12.4]], [[5.5, 5.5], [40.2, 33.3]]])
VALID = torch.tensor([[True, True], [True, False]])
SIZE = (48, 40)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_build_config_roundtrip(name):
    m = build_method(name, spatial_dims=2, n_landmarks=2)
    again = build_method(name, **m.config())
    assert again.config() == m.config() and m.name == name
    # the U-Nets pool four times; the global FCNN's stride is its output stride (32 by default); the
    # prior-guided coarse regressor takes any grid (its own, fixed at construction); a refinement stage is the local
    # net (output stride 2)
    assert m.size_multiple() == {"global_local": 32, "prior_guided": 1, "refine": 2}.get(name, 16)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        build_method("nope", spatial_dims=2, n_landmarks=2)


def test_heatmap_targets_decode_back():
    m = build_method("heatmap_unet", spatial_dims=2, n_landmarks=2, sigma=2.0)
    t = m.encode_targets(LM, VALID, SIZE, epoch=0)["heatmap"]
    assert t.shape == (2, 2, *SIZE) and t.max() == pytest.approx(100.0, rel=0.1)
    coords, _ = m.decode(t, 0)
    ok = VALID
    assert (coords[ok] - LM[ok]).abs().max() < 0.01
    assert m.loss(t, {"heatmap": t}, VALID, 0) == 0
    assert m.loss(torch.zeros_like(t), {"heatmap": t}, VALID, 0) > 0
    # invalid landmark: its channel does not count
    t2 = t.clone()
    t2[1, 1] = 1e3
    assert m.loss(t2, {"heatmap": t}, VALID, 0) == 0
    d = m.dice(t, {"heatmap": t}, VALID)
    assert d[0, 0] == 1 and torch.isnan(d[1, 1])


def test_heatmap_3d():
    m = build_method("heatmap_unet", spatial_dims=3, n_landmarks=1, sigma=1.5)
    lm = torch.tensor([[[5.3, 6.7, 8.2]]])
    t = m.encode_targets(lm, torch.tensor([[True]]), (16, 16, 16), 0)["heatmap"]
    coords, _ = m.decode(t, 0)
    assert (coords - lm).abs().max() < 0.01


def test_dilation_erosion_schedule_targets_loss_and_decoding():
    m = build_method("dilation_erosion", spatial_dims=2, n_landmarks=2, max_epochs=70, mask_centre="round")
    assert m.schedule.every == 10
    r0, r_end = m.radius(0, SIZE), m.radius(69, SIZE)
    assert r0 == round(65 * 48 / 512) and r_end == 1
    mask = m.encode_targets(LM, VALID, SIZE, 0)["mask"]
    assert mask[0, 0].sum() == 2 * r0 * r0 + 2 * r0 + 1
    assert mask[1, 1].sum() == 0  # invalid -> empty
    info = m.epoch_info(0, SIZE)
    assert info["pos_weight"] == pytest.approx((48 * 40 - mask[0, 0].sum().item()) / mask[0, 0].sum().item())
    logits = mask * 20 - 10  # a confident, perfect prediction
    coords, _ = m.decode(logits, 0)
    assert (coords[VALID] - LM[VALID].round()).abs().max() < 1e-3  # centre of the (rounded) diamond
    good = m.loss(logits, {"mask": mask}, VALID, 0)
    bad = m.loss(-logits, {"mask": mask}, VALID, 0)
    assert good < 0.01 < bad
    d = m.dice(logits, {"mask": mask}, VALID)
    assert d[0, 0] == pytest.approx(1.0) and torch.isnan(d[1, 1])


def test_dilation_erosion_exact_masks_are_closer_than_rounded():
    lm = torch.tensor(np.random.default_rng(1).uniform(8, 30, (1, 40, 2)), dtype=torch.float32)
    valid = torch.ones(1, 40, dtype=torch.bool)
    errs = {}
    for centre in ("round", "exact"):
        m = build_method("dilation_erosion", spatial_dims=2, n_landmarks=40, mask_centre=centre)
        mask = m.encode_targets(lm, valid, SIZE, 349)["mask"]
        coords, _ = m.decode(mask * 20 - 10, 349)
        errs[centre] = (coords - lm).norm(dim=-1).mean().item()
    assert errs["exact"] < errs["round"] < 0.5


class _ImageAsMaps(torch.nn.Module):
    """A 'network' that returns its input: channel k is the heatmap of landmark k."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image


def _blobs(points: list[tuple[float, float]], size: tuple[int, int]) -> torch.Tensor:
    from lmlib.methods.targets import gaussian_heatmaps

    lm = torch.tensor([points], dtype=torch.float32)
    return gaussian_heatmaps(lm, size, 2.0, torch.ones(1, len(points), dtype=torch.bool), 100.0)


def test_test_time_flip_mirrors_back_and_swaps_pairs():
    size = (48, 40)
    image = _blobs([(10.3, 20.6), (30.0, 12.4)], size)  # (1, 2, 48, 40)
    plain = build_method("heatmap_unet", spatial_dims=2, n_landmarks=2)
    coords, _, _ = plain.predict_coords(_ImageAsMaps(), {"image": image}, epoch=0)
    # without pairs the mirrored prediction maps back onto the same point: the mean is unchanged
    flip = build_method("heatmap_unet", spatial_dims=2, n_landmarks=2, test_time_flip=True)
    torch.testing.assert_close(flip.predict_coords(_ImageAsMaps(), {"image": image}, epoch=0)[0], coords,
                               atol=1e-3, rtol=0)
    # with (0, 1) declared a left/right pair, the mirrored channel 0 answers for landmark 1 and vice versa
    paired = build_method("heatmap_unet", spatial_dims=2, n_landmarks=2, test_time_flip=True, flip_pairs=[(0, 1)])
    mixed = paired.predict_coords(_ImageAsMaps(), {"image": image}, epoch=0)[0]
    expected = 0.5 * (coords + coords[:, [1, 0]])
    torch.testing.assert_close(mixed, expected, atol=1e-3, rtol=0)
