"""Non-finite pixels and losses (issue 25): a clear error naming the file or the epoch, never a run that ends with
exit 0 and every prediction at the image origin."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lmlib.data.loaders import LandmarkDataModule
from lmlib.data.phantoms import make_phantom_dataset
from lmlib.data.readers import read_image
from lmlib.engine.training import fit
from lmlib.methods import build_method


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_an_image_with_a_non_finite_pixel_is_refused_naming_the_file(tmp_path: Path, value: float) -> None:
    pixels = np.ones((6, 8), np.float32)
    pixels[2, 5] = value
    path = tmp_path / "bad.mha"
    sitk.WriteImage(sitk.GetImageFromArray(pixels), str(path))
    with pytest.raises(ValueError, match=r"bad\.mha.*1 pixel\(s\) are NaN or infinite \(the first at index \(5, 2\)\)"):
        read_image(path)


def test_a_non_finite_training_loss_stops_the_run_naming_the_epoch(tmp_path: Path) -> None:
    samples = make_phantom_dataset(2, n_images=8, seed=1, size=(32, 32), n_landmarks=3)
    samples[0].image[3, 3] = np.nan  # as if read without the check: the z-scored image is all NaN
    for s in samples:
        s.meta["split"] = "train" if s is samples[0] else s.meta["split"]
    method = build_method("heatmap_unet", spatial_dims=2, n_landmarks=3, network={"channels": (4, 8), "num_res_units": 1})
    dm = LandmarkDataModule(samples, target_size=(32, 32), batch_size=8, seed=0)
    with pytest.raises(FloatingPointError, match=r"epoch 1, batch 0: the training loss is nan"):
        fit(method, dm, tmp_path, max_epochs=2, device="cpu", seed=0)
