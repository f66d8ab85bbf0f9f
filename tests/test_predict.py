"""Predictions for unannotated images: the predict command on image files (2D and 3D, single models and a
cascade's run folder), and exports that the project's own readers read back to the same points."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from lmlib.data.loaders import LandmarkDataModule
from lmlib.data.phantoms import make_phantom_dataset
from lmlib.data.readers import read_labelme, read_slicer_json
from lmlib.engine.training import fit, predict
from lmlib.methods import build_method
from lmlib.outputs.exports import write_labelme, write_slicer_markups
from lmlib.predict import main, model_checkpoints, predict_images


def _write_images(samples, folder, suffix):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in samples:
        path = folder / f"{s.image_id}{suffix}"
        sitk.WriteImage(s.to_sitk(), str(path))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def model2d(tmp_path_factory):
    samples = make_phantom_dataset(2, n_images=12, seed=2, size=(48, 48), n_landmarks=3)
    method = build_method("heatmap_unet", spatial_dims=2, n_landmarks=3, network={"channels": (4, 8, 16), "num_res_units": 1})
    dm = LandmarkDataModule(samples, target_size=(48, 48), batch_size=4, seed=0)
    out = tmp_path_factory.mktemp("model2d")
    fit(method, dm, out, max_epochs=1, device="cpu", seed=0)
    return out, [s for s in samples if s.meta["split"] == "test"]


def test_predict_command_2d_writes_csv_and_labelme_that_read_back(model2d, tmp_path, capsys):
    run, test = model2d
    paths = _write_images(test, tmp_path / "images", ".mha")  # spacing and origin in the header
    assert main([str(run), *map(str, paths), "--out", str(tmp_path / "out")]) == 0
    assert "labelme JSON" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert len(table) == 3 * len(test) and set(table["image_id"]) == {s.image_id for s in test}
    # the same numbers as predicting the samples directly, and pixel columns = world through each header
    direct = predict(run / "checkpoints" / "best.ckpt", test)
    for s, w in zip(test, direct.world_mm):
        rows = table[table["image_id"] == s.image_id]
        np.testing.assert_allclose(rows[["x_mm", "y_mm"]].to_numpy(), w, atol=1e-6)
        np.testing.assert_allclose(rows[["x_px", "y_px"]].to_numpy(), s.geometry.world_to_index(w), atol=1e-6)
        ann = read_labelme(tmp_path / "out" / f"{s.image_id}.json")  # labelme's corner origin handled
        back = s.geometry.index_to_world(np.stack([ann.points[n][0] for n in s.landmark_names]))
        np.testing.assert_allclose(back, w, atol=1e-6)
        doc = json.loads((tmp_path / "out" / f"{s.image_id}.json").read_text())
        assert doc["imagePath"] == f"../images/{s.image_id}.mha" and doc["imageWidth"] == 48


def test_slicer_markups_round_trip_and_missing_points(tmp_path):
    s = make_phantom_dataset(3, n_images=1, seed=0, size=(24, 24, 24), n_landmarks=4)[0]
    w = s.landmarks_mm + np.array([0.123456789, -1.5, 2.25])
    w[2] = np.nan
    ann = read_slicer_json(write_slicer_markups(s, w, tmp_path / "a.mrk.json"))
    assert ann.units == "world" and sorted(ann.points) == sorted(n for k, n in enumerate(s.landmark_names) if k != 2)
    for k, name in enumerate(s.landmark_names):
        if k != 2:
            np.testing.assert_allclose(ann.points[name][0], w[k], atol=1e-6)
    with pytest.raises(ValueError, match="2D points"):
        write_labelme(s, w, tmp_path / "a.json")


def test_predict_cascade_run_folder_3d(tmp_path):
    """A cascade's run folder (manifest listing its stages) predicts 3D NIfTI images into Slicer files."""
    from lmlib.engine.runner import run_method

    run = tmp_path / "run"
    run_method("prior_guided", {"dataset": "synthetic3d", "output_dir": str(run), "seed": 0, "device": "cpu",
                                "max_epochs": 1, "max_train_images": 4, "image_size": [32, 32, 32],
                                "coarse_spacing_mm": 2.0, "fine_epochs": 1, "fine_patch_px": 8,
                                "fine_channels": [4, 8, 8], "coarse_channels": [4, 8, 8],
                                "stages": ["coarse", "independent"], "overlay_every": 100})
    assert [c.parent.parent.name for c in model_checkpoints(run)] == ["coarse", "independent"]
    from lmlib.data.datasets import load_dataset

    test = load_dataset("synthetic3d", split="test").samples[:2]
    paths = _write_images(test, tmp_path / "images", ".nii.gz")
    result = predict_images(run, paths, tmp_path / "out", device="cpu")
    assert sorted(p.name for p in result.exports) == sorted(f"{s.image_id}.mrk.json" for s in test)
    for s in test:
        ann = read_slicer_json(tmp_path / "out" / f"{s.image_id}.mrk.json")
        rows = result.table[result.table["image_id"] == s.image_id].set_index("landmark")
        for name in s.landmark_names:
            np.testing.assert_allclose(ann.points[name][0], rows.loc[name, ["x_mm", "y_mm", "z_mm"]].to_numpy(float),
                                       atol=1e-6)


def test_predict_refuses_bad_input_with_clear_errors(model2d, tmp_path, capsys):
    run, test = model2d
    paths = _write_images(test[:1], tmp_path / "images", ".mha")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("keep me")
    assert main([str(run), str(paths[0]), "--out", str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "busy" / "x.txt").exists()
    assert main([str(tmp_path / "nothing"), str(paths[0]), "--out", str(tmp_path / "o")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    vol = make_phantom_dataset(3, n_images=1, seed=0, size=(16, 16, 16), n_landmarks=3)
    three_d = _write_images(vol, tmp_path / "vol", ".mha")
    with pytest.raises(ValueError, match="3D image, but the model is 2D"):
        predict_images(run, three_d, tmp_path / "o2")
    assert not (tmp_path / "o2").exists() and not (tmp_path / ".o2.partial").exists()  # nothing half-written
