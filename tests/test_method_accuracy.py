"""Each method learns: trained briefly on a small synthetic set, it beats the mean-shape baseline (each
landmark at its mean normalised position over the training set) by at least 3x in MRE (mm).

A method that learns nothing scores about the mean-shape error or worse, so these tests fail for it;
each runs in well under a minute on 2 CPU cores.
"""
from __future__ import annotations

import numpy as np
import pytest

from lmlib.data.loaders import LandmarkDataModule
from lmlib.data.phantoms import make_phantom_dataset
from lmlib.data.transforms import build_augmentation
from lmlib.engine.training import fit, predict
from lmlib.evaluation.baselines import mean_shape_predictions
from lmlib.methods import build_method

SIZE = (64, 64)
NET = {"channels": (8, 16, 32, 64), "num_res_units": 1}


@pytest.fixture(scope="module")
def phantoms():
    samples = make_phantom_dataset(2, n_images=60, seed=3, size=SIZE, n_landmarks=3)
    return samples, [s for s in samples if s.meta["split"] == "train"], [s for s in samples if s.meta["split"] == "test"]


def _mre(predictions, test) -> float:
    return float(np.nanmean(np.concatenate([np.linalg.norm(p - s.landmarks_mm, axis=1)
                                            for p, s in zip(predictions, test)])))


CASES = {  # method -> (constructor keywords, epochs)
    "dilation_erosion": ({"max_epochs": 50}, 50),
    "heatmap_unet": ({"sigma": 2.0, "foreground_weight": 10.0}, 150),
    # heatmaps at 1/4 (16 x 16 px, 4 mm) and 1/2 (32 x 32 px, 2 mm) of the 64-px phantoms
    "htc": ({"network": {"widths": [8, 16, 32, 64], "ffn_ratios": [2, 2, 2, 2], "neck_channels": 32,
                         "head_channels": 16}, "foreground_weight": 30.0}, 60),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_method_beats_mean_shape_threefold(name, phantoms, tmp_path):
    samples, train, test = phantoms
    baseline = _mre(mean_shape_predictions(train, test), test)
    assert 3.0 < baseline < 5.0  # the set is what this test was calibrated on
    kwargs, epochs = CASES[name]
    method = build_method(name, spatial_dims=2, n_landmarks=3, **{"network": NET, **kwargs})
    dm = LandmarkDataModule(samples, target_size=SIZE, batch_size=4, seed=0,
                            augmentation=build_augmentation(2, rotation_deg=5, scale=0.05, seed=0))
    result = fit(method, dm, tmp_path, max_epochs=epochs, learning_rate=3e-3, device="cpu", seed=0)
    mre = _mre(predict(result.module, test).world_mm, test)
    assert mre < baseline / 3, f"{name}: MRE {mre:.2f} mm vs mean shape {baseline:.2f} mm"
