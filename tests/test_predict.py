"""Predictions for unannotated images: the predict command on image files (2D and 3D, single models and a
cascade's run folder), and exports that the project's own readers read back to the same points."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from PIL import Image

from lmlib.data.loaders import LandmarkDataModule
from lmlib.data.phantoms import make_phantom_dataset
from lmlib.data.readers import read_labelme, read_slicer_json
from lmlib.engine.cascade import model_checkpoints
from lmlib.engine.training import fit, predict
from lmlib.methods import build_method
from lmlib.outputs.exports import write_labelme, write_slicer_markups
from lmlib.predict import main, predict_images


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


def labelme_file() -> type:
    """labelme's ``LabelFile`` (labelme 5.2.1 of the ``dev`` extra; it imports Qt, headless here)."""
    import os

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    return pytest.importorskip("labelme.label_file", reason="labelme (dev extra) not installed").LabelFile


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
        # labelme cannot open .mha (issue 24: "Failed opening image file"): a PNG beside the JSON, which Pillow
        # (labelme's reader) opens at the image's size; predictions.csv's image_path resolves from the folder
        assert doc["imagePath"] == f"{s.image_id}.png" and doc["imageWidth"] == 48 and doc["imageData"] is None
        with Image.open(tmp_path / "out" / doc["imagePath"]) as png:
            assert png.size == (doc["imageWidth"], doc["imageHeight"]) and png.mode == "L"
        # and labelme's own loader opens it (before the PNG: LabelFileError, "Failed opening image file")
        opened = labelme_file()(str(tmp_path / "out" / f"{s.image_id}.json"))
        assert opened.imageData and [sh["label"] for sh in opened.shapes] == list(s.landmark_names)
        np.testing.assert_allclose([sh["points"][0] for sh in opened.shapes],
                                   [ann.points[n][0] + 0.5 for n in s.landmark_names], atol=1e-6)
        assert {(tmp_path / "out" / q).resolve() for q in rows["image_path"]} == {paths[test.index(s)].resolve()}
    # an image labelme opens itself is named where it is, relative to the JSON
    png_in = tmp_path / "flat" / "one.png"
    png_in.parent.mkdir()
    sitk.WriteImage(sitk.Cast(sitk.RescaleIntensity(test[0].to_sitk()), sitk.sitkUInt8), str(png_in))
    assert main([str(run), str(png_in), "--out", str(tmp_path / "out_png"), "--spacing", "0.5"]) == 0
    doc = json.loads((tmp_path / "out_png" / "one.json").read_text())
    assert doc["imagePath"] == "../flat/one.png" and not (tmp_path / "out_png" / "one.png").exists()


def test_images_made_in_memory_name_no_file(model2d, tmp_path):
    """A deformed (or posed) copy of a file's image is another grid: predictions.csv named its original's file
    beside the copy's pixel coordinates (a wrong pair); now its image_path is empty, as a phantom's (which named
    its id as if it were a file), its labelme export names a PNG of the image predicted, and the review names
    the problem."""
    from lmlib.data.deformations import deform_sample, random_deformation
    from lmlib.review import ReviewSession

    run, test = model2d
    path = _write_images(test[:1], tmp_path / "images", ".mha")[0]
    original = dataclasses.replace(test[0], meta={**test[0].meta, "image_path": str(path)})  # as a data set's
    copy = deform_sample(original, random_deformation(original.geometry, original.size, seed=1, max_rotation_deg=20),
                         f"{original.image_id}_def001")
    assert "image_path" not in copy.meta and original.meta["image_path"] == str(path)
    result = predict_images(run, [original, copy, test[1]], tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "predictions.csv", dtype={"image_id": str})
    files = table.groupby("image_id", dropna=False)["image_path"].first()
    assert (tmp_path / "out" / files[original.image_id]).resolve() == path.resolve()
    assert files.loc[[copy.image_id, test[1].image_id]].isna().all()
    for s in (copy, test[1]):
        doc = json.loads((tmp_path / "out" / f"{s.image_id}.json").read_text())
        with Image.open(tmp_path / "out" / doc["imagePath"]) as png:
            assert png.size == (doc["imageWidth"], doc["imageHeight"]) == tuple(s.size)
    assert len(result.table) == 9
    result.table.assign(region_90_mm=1.0, review=False).to_csv(tmp_path / "out" / "predictions.csv", index=False)
    with pytest.raises(FileNotFoundError, match=f"{copy.image_id}: .*names no image file for it"):
        ReviewSession(tmp_path / "out").image_path(copy.image_id)


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


@pytest.mark.slow
def test_predict_cascade_run_folder_3d(tmp_path):
    """A cascade's run folder (manifest listing its stages) predicts 3D NIfTI images into Slicer files; one stage's
    folder is scored on its data set's splits through the stages before it."""
    from lmlib.engine.runner import run_method

    run = tmp_path / "run"
    run_method("prior_guided", {"dataset": "synthetic3d", "output_dir": str(run), "seed": 0, "device": "cpu",
                                "max_epochs": 1, "max_train_images": 4, "image_size": [32, 32, 32],
                                "coarse_spacing_mm": 2.0, "fine_epochs": 1, "fine_patch_px": 8,
                                "fine_channels": [4, 8, 8], "coarse_channels": [4, 8, 8],
                                "stages": ["coarse", "independent"], "overlay_every": 100})
    assert [c.parent.parent.name for c in model_checkpoints(run)] == ["coarse", "independent"]
    # one stage's folder scores its chain (regions calibrated on it, --regions): alone, the stage was refused
    from lmlib.engine.runner import split_predictions

    stage, whole = split_predictions(run / "independent", splits=("val",)), split_predictions(run, splits=("val",))
    np.testing.assert_array_equal(stage.errors["val"], whole.errors["val"])
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
    (tmp_path / "busy" / "predictions.csv").write_text("keep me")
    assert main([str(run), str(paths[0]), "--out", str(tmp_path / "busy")]) == 2
    assert "holds prediction outputs already (predictions.csv)" in capsys.readouterr().err
    assert (tmp_path / "busy" / "predictions.csv").read_text() == "keep me"
    assert main([str(tmp_path / "nothing"), str(paths[0]), "--out", str(tmp_path / "o")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    vol = make_phantom_dataset(3, n_images=1, seed=0, size=(16, 16, 16), n_landmarks=3)
    three_d = _write_images(vol, tmp_path / "vol", ".mha")
    with pytest.raises(ValueError, match="3D image, but the model is 2D"):
        predict_images(run, three_d, tmp_path / "o2")
    assert not (tmp_path / "o2").exists() and not (tmp_path / ".o2.partial").exists()  # nothing half-written


@pytest.mark.slow
def test_regions_from_the_runs_validation_split_and_the_review_list(tmp_path, capsys):
    """A run folder's regions are calibrated on its validation split: the same radii as calibrating its val
    errors by hand; every prediction gets a region per level, and the review list is exactly the landmarks
    whose widest region exceeds the threshold; the CLI writes regions.csv and review.csv."""
    from lmlib.engine.runner import run_method, split_predictions
    from lmlib.evaluation.conformal import calibrate
    from lmlib.predict import calibrate_run, predict_new_images

    run = tmp_path / "run"
    run_method("heatmap_unet", {"dataset": "synthetic2d", "output_dir": str(run), "device": "cpu", "max_epochs": 2,
                                "image_size": [48, 48], "channels": [4, 8, 16], "overlay_every": 100})
    regions = calibrate_run(run, (0.8, 0.9))
    scored = split_predictions(run, splits=("val",))
    by_hand = calibrate(scored.errors["val"], scored.spread_mm["val"], (0.8, 0.9), scored.landmark_names,
                        scored.confidence["val"])
    for level in (0.8, 0.9):
        np.testing.assert_array_equal(regions.radius_mm[level], by_hand.radius_mm[level])
        np.testing.assert_array_equal(regions.scale[level], by_hand.scale[level])
    assert np.isfinite(regions.scale[0.8]).all()  # heatmaps give a spread for every landmark
    threshold = float(np.median(regions.radius_mm[0.9]))
    result = predict_new_images(run, "", tmp_path / "out", (0.8, 0.9), threshold, device="cpu", keep_samples=2)
    t = result.table
    assert (t["region_90_mm"] >= t["region_80_mm"]).all() and t["uncertainty_mm"].gt(0).all()
    assert list(t["review"]) == list(t["region_90_mm"] > threshold) and len(result.review) == int(t["review"].sum())
    assert set(result.coverage.index) == {"80 %", "90 %"} and len(result.samples) == 2
    assert {"regions.csv", "review.csv", "coverage.csv", "manifest.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
    test = _test_samples(run)
    paths = _write_images(test[:2], tmp_path / "images", ".mha")
    assert main([str(run), *map(str, paths), "--out", str(tmp_path / "cli"), "--regions", "0.9", "--review-mm", "0"]) == 0
    assert "landmarks to review" in capsys.readouterr().out
    review = pd.read_csv(tmp_path / "cli" / "review.csv")
    assert len(review) == 2 * len(test[0].landmark_names)  # a 0 mm threshold lists every landmark


def _test_samples(run):
    from lmlib.engine.runner import load_run_data
    from lmlib.outputs.contract import read_manifest

    return load_run_data(read_manifest(run)["parameters"]).split("test")


def test_spacing_only_fills_images_without_one_and_is_required_for_them(model2d, tmp_path, capsys):
    """Issue 24: --spacing overrode .mha headers (mm moved by up to 24.5 mm) and a PNG without it was scored at
    1 mm/px, silently."""
    run, test = model2d
    mha = _write_images(test[:1], tmp_path / "images", ".mha")[0]  # its header spacing is the phantom's
    png = tmp_path / "images" / "plain.png"
    sitk.WriteImage(sitk.Cast(sitk.RescaleIntensity(test[1].to_sitk(), 0, 255), sitk.sitkUInt8), str(png))
    assert main([str(run), str(png), "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "plain.png" in err and "stores no pixel spacing" in err and "--spacing" in err
    assert main([str(run), str(mha), str(png), "--out", str(tmp_path / "out"), "--spacing", "0.15"]) == 0
    assert "applied to 1 image(s) without a stored spacing: plain" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    direct = predict(run / "checkpoints" / "best.ckpt", test[:1]).world_mm[0]  # the header's spacing, not 0.15
    np.testing.assert_allclose(table[table["image_id"] == test[0].image_id][["x_mm", "y_mm"]].to_numpy(), direct,
                               atol=1e-6)


def test_an_interrupted_runs_exports_and_names_clashing_across_batches_are_refused(model2d, tmp_path, capsys):
    """Issue 25: exports left by a killed run stayed beside a later run's predictions.csv; two images of one name in
    two folders overwrote each other's export across batches (--batch-size 1) while the summary counted both."""
    run, test = model2d
    a = _write_images(test[:1], tmp_path / "a", ".mha")[0]
    b = _write_images(test[:1], tmp_path / "b", ".mha")[0]  # same file name, another folder
    assert main([str(run), str(a), str(b), "--out", str(tmp_path / "o"), "--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    assert "same name" in err and str(a) in err and str(b) in err and not (tmp_path / "o").exists()
    (tmp_path / "left").mkdir()
    (tmp_path / "left" / f"{test[0].image_id}.json").write_text("{}")  # an export of a killed run
    assert main([str(run), str(a), "--out", str(tmp_path / "left")]) == 2
    assert f"{test[0].image_id}.json" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--batch-size", "-1"], "--batch-size must be >= 1, got -1"),
    (["--regions", "1.5"], r"--regions takes coverage levels between 0 and 1"),
    (["--review-mm", "3"], "--review-mm needs --regions"),
    (["--spacing", "0"], "--spacing must be positive numbers"),
])
def test_predict_options_out_of_range_are_refused_by_name(model2d, tmp_path, capsys, extra, message):
    run, test = model2d
    paths = _write_images(test[:1], tmp_path / "images", ".mha")
    with pytest.raises(SystemExit) as info:
        main([str(run), str(paths[0]), "--out", str(tmp_path / "o"), *extra])
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_predict_names_the_file_for_a_broken_model_image_spacing_or_folder(model2d, tmp_path, capsys):
    """Each case printed a traceback or a misleading reason before (issue 25)."""
    run, test = model2d
    paths = _write_images(test[:1], tmp_path / "images", ".mha")
    # a truncated checkpoint (a full disk, an interrupted copy) and a file that is no checkpoint
    good = (run / "checkpoints" / "best.ckpt").read_bytes()
    for name, data in (("torn.ckpt", good[: len(good) // 2]), ("notes.ckpt", b"not a model")):
        (tmp_path / name).write_bytes(data)
        assert main([str(tmp_path / name), str(paths[0]), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / name}: not a readable checkpoint" in err and "Traceback" not in err
    # a truncated image: ITK's stale errno said "No such file or directory" for a file that is there
    data = paths[0].read_bytes()
    torn = tmp_path / "images" / "torn.mha"
    torn.write_bytes(data[: len(data) - 200])
    assert main([str(run), str(torn), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{torn}: cannot read image" in err and "truncated or corrupt" in err and "No such file" not in err
    # a NaN voxel: every landmark was written at pixel (0, 0) with NaN confidence and review False
    pixels = sitk.GetArrayFromImage(test[0].to_sitk()).astype(np.float32)
    pixels[5, 7] = np.nan
    nan_image = sitk.GetImageFromArray(pixels)
    nan_image.CopyInformation(test[0].to_sitk())
    sitk.WriteImage(nan_image, str(tmp_path / "images" / "nan.mha"))
    assert main([str(run), str(tmp_path / "images" / "nan.mha"), "--out", str(tmp_path / "o")]) == 2
    assert "nan.mha" in (err := capsys.readouterr().err) and "NaN or infinite" in err
    assert not (tmp_path / "o").exists()
    # three spacing values for a 2D model (a numpy broadcast error before)
    png = tmp_path / "images" / "flat.png"
    sitk.WriteImage(sitk.Cast(sitk.RescaleIntensity(test[0].to_sitk()), sitk.sitkUInt8), str(png))
    assert main([str(run), str(png), "--out", str(tmp_path / "o"), "--spacing", "0.1", "0.1", "0.1"]) == 2
    assert "give one value or 2 (x y) for this 2D model, in mm" in capsys.readouterr().err
    # an --out that cannot be created names --out, not the hidden partial folder beside it
    (tmp_path / "file").write_text("a file, not a folder")
    out = tmp_path / "file" / "o"
    assert main([str(run), str(paths[0]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out}: cannot write the output folder here" in err and "Traceback" not in err


def test_predict_help_does_not_import_torch() -> None:
    """``python -m lmlib.predict --help`` took 20 s: it imported torch and Lightning before parsing (issue 24)."""
    import subprocess
    import sys

    code = ("import sys\nfrom lmlib.predict import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'lightning' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage: python -m lmlib.predict" in out and out.strip().splitlines()[-1] == "False False"


def test_the_command_writes_a_manifest_inside_the_finished_folder_only(model2d, tmp_path, capsys, monkeypatch):
    """The command line wrote no manifest.json; the notebook's call wrote its manifest and coverage.csv after
    predictions.csv had marked the folder complete."""
    from lmlib.outputs import manifest as manifest_module
    from lmlib.outputs.manifest import checksum_samples
    from lmlib.predict import load_images

    run, test = model2d
    paths = _write_images(test[:2], tmp_path / "images", ".mha")
    assert main([str(run), *map(str, paths), "--out", str(tmp_path / "o")]) == 0
    record = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert record["parameters"]["model"] == str(run) and record["parameters"]["out"] == str(tmp_path / "o")
    assert record["device"] == "cpu" and record["git_commit"] is not None
    names = test[0].landmark_names
    assert record["data_checksum"] == checksum_samples(load_images(paths, names, 2))
    capsys.readouterr()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(manifest_module, "write_manifest", broken)
    with pytest.raises(OSError, match="disk full"):
        main([str(run), *map(str, paths), "--out", str(tmp_path / "o2")])
    assert not (tmp_path / "o2").exists() and not (tmp_path / ".o2.partial").exists()


def test_folders_and_quoted_globs_are_expanded_and_a_dot_out_works(model2d, tmp_path, capsys, monkeypatch):
    """A folder (documented as an IMAGE) was read as one DICOM series ("no DICOM series"), a quoted glob was "not
    found", a folder of DICOM files without .dcm gave "no images given", and --out . failed with
    "PosixPath('.') has an empty name"."""
    from lmlib.predict import image_paths

    run, test = model2d
    paths = _write_images(test[:3], tmp_path / "scans", ".mha")
    assert main([str(run), str(tmp_path / "scans"), "--out", str(tmp_path / "o1")]) == 0
    assert set(pd.read_csv(tmp_path / "o1" / "predictions.csv")["image_id"]) == {s.image_id for s in test[:3]}
    assert main([str(run), str(tmp_path / "scans" / "*.mha"), "--out", str(tmp_path / "o2")]) == 0
    assert pd.read_csv(tmp_path / "o2" / "predictions.csv")["image_id"].nunique() == len(paths)
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    for k in range(2):
        (dicom / f"IM{k:04d}").write_bytes(b"")  # DICOM files are often named without a suffix
    assert image_paths(dicom) == [dicom] and image_paths([paths[0], dicom]) == [paths[0], dicom]
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main([str(run), str(paths[0]), "--out", "."]) == 0
    assert (here / "predictions.csv").is_file() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_cheap_checks_come_before_the_calibration_and_a_wrong_dimension_names_the_file(model2d, tmp_path, capsys,
                                                                                      monkeypatch):
    """A busy --out, a missing spacing or a missing file was refused only after the validation split had been
    scored (minutes in 3D); a 3D image with a 2D model and --spacing x y failed in numpy, naming no file."""
    import lmlib.predict as predict_module

    run, test = model2d
    paths = _write_images(test[:1], tmp_path / "images", ".mha")

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated before the checks")

    monkeypatch.setattr(predict_module, "calibrate_run", no_calibration)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "predictions.csv").write_text("keep me")
    png = tmp_path / "images" / "flat.png"
    sitk.WriteImage(sitk.Cast(sitk.RescaleIntensity(test[0].to_sitk()), sitk.sitkUInt8), str(png))
    for args, message in (([str(paths[0]), "--out", str(tmp_path / "busy")], "holds prediction outputs already"),
                          ([str(png), "--out", str(tmp_path / "o")], "stores no pixel spacing"),
                          ([str(tmp_path / "gone.mha"), "--out", str(tmp_path / "o")], "gone.mha: no image files")):
        assert main([str(run), *args, "--regions", "0.9"]) == 2
        assert message in capsys.readouterr().err
    stack = tmp_path / "images" / "stack.tif"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 48, 48), np.uint8)), str(stack))
    assert main([str(run), str(stack), "--out", str(tmp_path / "o"), "--spacing", "0.1", "0.1"]) == 2
    assert "stack.tif: a 3D image, but 2 spacing values were given" in capsys.readouterr().err
    manifest = _write_images(test[:1], tmp_path / "named", ".mha")[0].rename(tmp_path / "named" / "manifest.mha")
    assert main([str(run), str(manifest), "--out", str(tmp_path / "o")]) == 2  # its export would be the manifest
    assert "images named ['manifest']" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_region_coverage_counts_a_true_landmark_without_a_prediction_as_outside() -> None:
    """The coverage left an annotated landmark the model gave no point for out of its denominator (100 % here)."""
    from lmlib.data.geometry import Geometry
    from lmlib.data.sample import Sample
    from lmlib.evaluation.conformal import calibrate
    from lmlib.predict import region_coverage

    sample = Sample("a", np.zeros((8, 8)), Geometry(spacing=(1.0, 1.0)), [[1.0, 1.0], [4.0, 4.0], [6.0, 6.0]],
                    [True, True, False], ("P", "Q", "R"))
    regions = calibrate(np.full((30, 3), 1.0), levels=(0.9,), names=("P", "Q", "R"))
    table = pd.DataFrame({"image_id": "a", "landmark": ["P", "Q", "R"], "x_mm": [1.5, np.nan, 6.0],
                          "y_mm": [1.0, np.nan, 6.0], "z_mm": np.nan, "region_90_mm": [1.0, np.nan, 1.0]})
    row = region_coverage(table, regions, [sample]).loc["90 %"]
    assert row["coverage_pct"] == pytest.approx(50.0)  # P inside, Q unpredicted (outside), R not annotated
    assert row["n_points"] == 1 and row["n_unpredicted"] == 1 and row["mre_mm"] == pytest.approx(0.5)
