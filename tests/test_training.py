"""Shared training: a tiny run on easy synthetic data learns; resume continues from the saved epoch;
predictions come back in world mm of the original images; training figures are written."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lmlib.data.loaders import LandmarkDataModule
from lmlib.methods import build_method
from lmlib.data.phantoms import make_phantom_dataset
from lmlib.engine.training import LandmarkModule, fit, predict, trainer_device
from lmlib.engine.training_figures import OverlayCallback, plot_training_curves, read_history

SIZE = (64, 64)
NET = {"channels": (8, 16, 32), "num_res_units": 1}


@pytest.fixture(scope="module")
def samples():
    return make_phantom_dataset(2, n_images=40, seed=3, size=SIZE, n_landmarks=3)


def _dm(samples, batch_size=2):
    return LandmarkDataModule(samples, target_size=SIZE, batch_size=batch_size, seed=0)


@pytest.fixture(scope="module")
def trained(samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    # a constant radius (8 px on this grid) keeps the loss comparable across epochs
    method = build_method("dilation_erosion", spatial_dims=2, n_landmarks=3, max_epochs=10, network=NET,
                          schedule={"start": 64, "step": 0, "stop": 64, "every": 1})
    result = fit(method, _dm(samples), out, max_epochs=10, learning_rate=3e-3, device="cpu", seed=0,
                 callbacks=[OverlayCallback(out, every_n_epochs=5, n_images=2)])
    return out, result


def test_tiny_run_reduces_loss_and_val_error(trained):
    out, result = trained
    hist = read_history(result.history_csv)
    assert list(hist.index) == list(range(10))
    assert hist["train/loss"].iloc[-1] < 0.7 * hist["train/loss"].iloc[0]
    assert hist["val/mre_mm"].min() < 0.7 * hist["val/mre_mm"].iloc[0]
    assert {"val/dice", "train/mask_radius_px", "val/err_mm/" + result.module.landmark_names[0]} <= set(hist.columns)
    assert (out / "checkpoints" / "best.ckpt").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    assert result.train_seconds > 0 and result.device.type == "cpu"


def test_training_figures_overlays_and_gif(trained):
    out, result = trained
    figs = plot_training_curves(result.history_csv, out)
    for name in ("fig_loss.png", "fig_mean_error.png", "fig_dice.png", "fig_mean_error_per_landmark.png",
                 "fig_dice_per_landmark.png"):
        assert name in figs and (out / name).is_file()
    frames = sorted(p.name for p in (out / "overlays").glob("*.png"))
    assert frames == ["epoch_001.png", "epoch_005.png", "epoch_010.png"]
    gif = out / "fig_training_progress.gif"
    assert gif.is_file() and 0 < gif.stat().st_size < 1_000_000


def test_predict_world_mm_in_original_images(trained, samples):
    _, result = trained
    test = [s for s in samples if s.meta["split"] == "test"]
    pred = predict(result.module, test, target_size=SIZE)
    assert len(pred.world_mm) == len(test) and pred.seconds_per_image > 0
    err = np.concatenate([np.linalg.norm(p - s.landmarks_mm, axis=1) for p, s in zip(pred.world_mm, test)])
    assert np.isfinite(err).all()
    # the grid equals the original image here, so index -> world is the sample's own geometry
    np.testing.assert_allclose(pred.world_mm[0], test[0].geometry.index_to_world(pred.index[0]), atol=1e-6)


def test_predict_maps_back_through_resize(trained, samples):
    """Upsampled originals (2x) predicted on the 64-px grid land on the same world positions."""
    from lmlib.data.grids import preprocess

    _, result = trained
    s = [x for x in samples if x.meta["split"] == "test"][0]
    big = preprocess(s, target_size=(128, 128), normalize=None)
    a = predict(result.module, [s], target_size=SIZE).world_mm[0]
    b = predict(result.module, [big], target_size=SIZE).world_mm[0]
    assert np.nanmax(np.abs(a - b)) < 2.0 * s.geometry.spacing.max()  # a wrong scale or offset gives tens of px


def test_checkpoint_roundtrip(trained, samples):
    _, result = trained
    module = LandmarkModule.from_checkpoint(result.best_checkpoint)
    assert module.method.name == "dilation_erosion" and module.trained_epochs >= 1
    x = torch.randn(1, 1, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(module(x), result.module.cpu()(x))


def test_resume_continues_from_saved_epoch(samples, tmp_path):
    method = build_method("heatmap_unet", spatial_dims=2, n_landmarks=3, sigma=2.0, network=NET)
    first = fit(method, _dm(samples), tmp_path / "a", max_epochs=2, device="cpu")
    assert first.epochs == 2
    second = fit(method, _dm(samples), tmp_path / "b", max_epochs=3, device="cpu", resume=first.last_checkpoint)
    hist = pd.read_csv(second.history_csv)
    assert sorted(hist["epoch"].dropna().astype(int).unique()) == [2]  # only the new epoch ran
    assert second.epochs == 3


def test_trainer_device_mapping():
    assert trainer_device(torch.device("cpu")) == ("cpu", 1)
    assert trainer_device(torch.device("cuda", 1)) == ("gpu", [1])
