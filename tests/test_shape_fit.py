"""The shape prior after a finished run (lmlib.methods.shape_fit): the Procrustes mean, the LMedS fit that finds
gross misses without a threshold in mm, the variant chosen on val (never the test split), and the row's costs."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.transform import Rotation

from lmlib.engine.base_run import VAL_CACHE
from lmlib.engine.runner import load_run_data, run_method
from lmlib.methods.shape_fit import (
    ShapePrior,
    _similarity,
    apply_variant,
    fit_shape,
    landmark_spread,
    procrustes_mean,
)
from lmlib.outputs.contract import predictions_frame, write_outputs
from lmlib.outputs.manifest import write_manifest


def _pose(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``points`` (K, D) turned (any angle), scaled by 0.9-1.1 and moved by up to 50 mm."""
    ndim = points.shape[1]
    rot = Rotation.random(random_state=rng).as_matrix() if ndim == 3 else \
        Rotation.from_euler("z", rng.uniform(-np.pi, np.pi)).as_matrix()[:2, :2]
    return rng.uniform(0.9, 1.1) * points @ rot.T + rng.uniform(-50, 50, ndim)


def _shape(ndim: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(-60, 60, (k, ndim))


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_minimal_subset_gives_the_pose_back_and_never_a_mirror(ndim: int) -> None:
    rng = np.random.default_rng(5)
    src = _shape(ndim, 12, rng)
    rot = Rotation.random(random_state=rng).as_matrix() if ndim == 3 else \
        Rotation.from_euler("z", 0.7).as_matrix()[:2, :2]
    dst = 1.07 * src @ rot.T + np.arange(1, ndim + 1) * 10.0
    subsets = src[None, :ndim], dst[None, :ndim]  # 2 landmarks in 2D, 3 in 3D fix a similarity
    mat, t, scale = _similarity(*subsets)
    assert scale[0] == pytest.approx(1.07) and np.allclose(src @ mat[0].T + t[0], dst)
    mirrored = dst * np.r_[-1.0, np.ones(ndim - 1)]  # a mirror image: fitted by a proper rotation only
    mat, _, scale = _similarity(src[None], mirrored[None])
    assert np.linalg.det(mat[0] / scale[0]) == pytest.approx(1.0)


def test_the_procrustes_mean_is_the_shape_whatever_the_poses() -> None:
    rng = np.random.default_rng(0)
    shape = _shape(3, 12, rng)
    copies = [_pose(shape + rng.normal(0, 0.1, shape.shape), rng) for _ in range(6)]
    copies[2][4] = np.nan  # a landmark not annotated on one image
    copies.append(np.full_like(shape, np.nan))  # an image without landmarks: left out, not a crash
    copies[-1][:2] = shape[:2]
    mean = procrustes_mean(copies)
    mat, t, scale = _similarity(mean[None], shape[None])
    assert np.abs(mean @ mat[0].T + t[0] - shape).max() < 0.3
    sizes = [np.sqrt(((c - c.mean(axis=0)) ** 2).sum()) for c in copies if np.isfinite(c).all()]
    assert np.sqrt((mean ** 2).sum()) == pytest.approx(np.mean(sizes))  # kept at the sets' size, in mm
    assert np.abs(mean.mean(axis=0)).max() < 1e-9


@pytest.mark.parametrize("ndim,k", [(3, 32), (2, 19)])
def test_gross_misses_are_found_and_replaced_and_the_rest_kept(ndim: int, k: int) -> None:
    """A posed anatomy 1 mm from the mean shape per landmark, its network right to 1 mm except 4 landmarks 40 mm
    off: the LMedS fit flags those 4 (no threshold in mm given) and puts them within a few mm; the others are kept."""
    rng = np.random.default_rng(1)
    mean = _shape(ndim, k, rng)
    truth = _pose(mean + rng.normal(0, 1.0, mean.shape), rng)
    pred = truth + rng.normal(0, 1.0, truth.shape)
    missed = [0, 5, 9, 13]
    pred[missed] += 40.0 * np.eye(ndim)[0] + 20.0 * np.eye(ndim)[1]
    fit = fit_shape(mean, pred)
    assert fit is not None and set(np.flatnonzero(fit.outlier)) >= set(missed)
    assert fit.outlier.sum() <= len(missed) + 2  # a few more at most: the cut is the 97.5 % point of the noise
    moved, replaced = apply_variant(mean, [pred], "similarity/outliers")
    after = np.linalg.norm(moved[0] - truth, axis=1)
    assert after[missed].max() < 6.0  # were 44.7 mm off
    kept = ~fit.outlier
    assert np.array_equal(moved[0][kept], pred[kept]) and replaced == fit.outlier.sum()
    before = np.linalg.norm(pred - truth, axis=1).mean()
    assert after.mean() < before / 3


def test_landmarks_whose_anatomy_varies_more_are_not_outliers_for_it() -> None:
    """8 of 32 landmarks vary 3x more between anatomies: with one noise scale for all, exact predictions had about
    one landmark in six flagged (nearly all of them those 8) and replaced by the mean shape's, further from the truth;
    in units of each landmark's training spread, about the nominal 2.5 % are."""
    rng = np.random.default_rng(7)
    mean = _shape(3, 32, rng)
    sd = np.where(np.arange(32) < 8, 3.0, 1.0)[:, None]
    train = [_pose(mean + rng.normal(0, 1.0, mean.shape) * sd, rng) for _ in range(60)]
    fitted_mean = procrustes_mean(train)
    spread = landmark_spread(train, fitted_mean)
    assert spread[:8].min() > 2.0 and np.abs(spread[8:] - 1.0).max() < 0.3
    tests = [_pose(mean + rng.normal(0, 1.0, mean.shape) * sd, rng) for _ in range(40)]
    one_scale = np.mean([fit_shape(fitted_mean, t).outlier for t in tests])
    own_scale = np.mean([fit_shape(fitted_mean, t, spread=spread).outlier for t in tests])
    assert one_scale > 0.1 and own_scale < 0.06
    moved, _ = apply_variant(fitted_mean, tests, "similarity/outliers", spread=spread)
    assert np.mean([np.linalg.norm(m - t, axis=1).mean() for m, t in zip(moved, tests)]) < 0.5
    miss = tests[0].copy()
    miss[[0, 20]] += 40.0  # gross misses, on a varying landmark and a steady one: still found
    fit = fit_shape(fitted_mean, miss, spread=spread)
    assert fit is not None and fit.outlier[[0, 20]].all()


def test_the_affine_refit_follows_a_sheared_anatomy() -> None:
    """An anatomy sheared and stretched from the mean shape (a similarity cannot follow it), 3 landmarks 40 mm off:
    the affine refit puts them back within 1.5 mm, the similarity refit does not."""
    rng = np.random.default_rng(6)
    mean = _shape(3, 24, rng)
    shear = np.array([[1.15, 0.2, 0.0], [0.0, 0.9, 0.1], [0.0, 0.0, 1.05]])
    truth = _pose(mean @ shear.T, rng)
    pred = truth + rng.normal(0, 0.3, truth.shape)
    pred[[2, 7, 11]] += 40.0
    errors = {}
    for variant in ("affine/outliers", "similarity/outliers"):
        moved, _ = apply_variant(mean, [pred], variant)
        errors[variant] = np.linalg.norm(moved[0][[2, 7, 11]] - truth[[2, 7, 11]], axis=1).max()
    assert errors["affine/outliers"] < 1.5 < errors["similarity/outliers"], errors


def test_a_missing_prediction_stays_missing_and_too_few_are_left_alone() -> None:
    rng = np.random.default_rng(2)
    mean = _shape(3, 10, rng)
    pred = _pose(mean, rng)
    pred[3] = np.nan
    for variant in ("similarity/outliers", "affine/shape"):  # every candidate scored on the same landmarks
        moved, _ = apply_variant(mean, [pred], variant)
        assert np.isnan(moved[0][3]).all() and np.isfinite(np.delete(moved[0], 3, axis=0)).all()
    few = np.full_like(pred, np.nan)
    few[:4] = pred[:4]  # 4 landmarks in 3D: a minimal subset (3) plus one, too few to tell an outlier
    assert fit_shape(mean, few) is None
    assert np.array_equal(apply_variant(mean, [few], "affine/shape")[0][0], few, equal_nan=True)


def test_the_variant_is_chosen_on_val_not_on_test() -> None:
    """Val predictions with gross misses: a fit is chosen (on val) and applied to test (one gross miss per image);
    with exact val predictions the base run is kept."""
    rng = np.random.default_rng(7)
    anatomy = _shape(3, 16, rng)
    shapes = [_pose(anatomy + rng.normal(0, 1.0, anatomy.shape), rng) for _ in range(5)]
    truth_val = [_pose(anatomy + rng.normal(0, 1.0, anatomy.shape), rng) for _ in range(3)]
    missed = [t.copy() for t in truth_val]
    for m in missed:
        m[[1, 4]] += 40.0
    test = [_pose(anatomy, rng) for _ in range(2)]
    for t in test:
        t[6] += 40.0

    def val_error(moved: list) -> float:
        return float(np.mean([np.linalg.norm(m - t, axis=1).mean() for m, t in zip(moved, truth_val)]))

    derived = ShapePrior(3, 16).derive(shapes, missed, val_error, test)
    assert derived.metrics["chosen_variant"] != "none" and derived.metrics["replaced"] > 0
    assert not np.allclose(derived.test_mm[0], test[0])  # the choice made on val is what test gets
    assert derived.train_seconds > 0


def test_the_base_run_is_kept_when_val_is_exact() -> None:
    rng = np.random.default_rng(3)
    anatomy = _shape(3, 16, rng)
    shapes = [_pose(anatomy + rng.normal(0, 1.0, anatomy.shape), rng) for _ in range(5)]
    truth_val = [_pose(anatomy + rng.normal(0, 1.0, anatomy.shape), rng) for _ in range(3)]
    model = ShapePrior(3, 16)
    exact = model.derive(shapes, truth_val, lambda moved: float(np.mean(
        [np.linalg.norm(m - t, axis=1).mean() for m, t in zip(moved, truth_val)])), truth_val)
    assert exact.metrics["chosen_variant"] == "none"
    rows = exact.tables["table_val_choice"]
    assert [r["variant"] for r in rows][0] == "none" and sum(r["chosen"] for r in rows) == 1


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="variants must be different names"):
        ShapePrior(3, 5, variants=["similarity/everything"])
    with pytest.raises(ValueError, match="scale_bounds"):
        ShapePrior(3, 5, scale_bounds=[2.0, 0.5])
    with pytest.raises(ValueError, match="variants"):
        ShapePrior.values({"variants": []})
    with pytest.raises(ValueError, match="variants"):  # the profile check of the driver sees it, not the run
        ShapePrior.values({"variants": ["none", "none"]})
    with pytest.raises(ValueError, match="scale_bounds"):
        ShapePrior.values({"scale_bounds": [2.0, 0.5]})


def _fake_base(root: Path, test: list, val: list, output_dir: Path) -> None:
    """A finished run on synthetic2d (no network): within 0.5 mm of the truth except landmark 0, 30 mm off on every
    image; its val predictions (the same errors) where a refinement keeps them (keyed by its manifest)."""
    rng = np.random.default_rng(4)

    def predicted(samples: list) -> list[np.ndarray]:
        out = [s.landmarks_mm + rng.normal(0, 0.5, s.landmarks_mm.shape) for s in samples]
        for w in out:
            w[0] += 30.0
        return out

    folder = root / "base"
    write_outputs(folder, predictions_frame(test, predicted(test)),
                  {"train_seconds": 100.0, "infer_seconds_per_image": 0.1, "peak_rss_mb": 1.0}, {"method": "base"})
    write_manifest(folder, {"dataset": "synthetic2d"}, device="cpu")
    output_dir.mkdir(parents=True)
    predictions_frame(val, predicted(val)).to_csv(output_dir / VAL_CACHE, index=False)
    key = hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()[:12]
    (output_dir / VAL_CACHE).with_suffix(".key").write_text(key + "\n")


def test_a_run_chooses_on_val_beats_its_base_and_counts_its_cost(tmp_path: Path) -> None:
    data = load_run_data({"dataset": "synthetic2d"})
    test, val = data.split("test"), data.split("val")
    root = tmp_path / "synthetic2d"
    _fake_base(root, test, val, root / "base+shape")
    result = run_method("shape_fit", {"dataset": "synthetic2d", "output_dir": str(root / "base+shape"),
                                      "base_method": "base"})
    base_mre = float(pd.read_csv(root / "base" / "predictions.csv")["error_mm"].mean())
    assert base_mre > 3.0  # landmark 0's 30 mm miss on every image
    assert result.metrics["chosen_variant"] != "none" and result.metrics["mre_mm"] < base_mre / 2
    own = result.metrics["derive_seconds"]
    # the base's training, its val predictions (a cache without their time: the val images x its 0.1 s), the fit's
    assert own > 0 and result.metrics["train_seconds"] == pytest.approx(100.0 + 0.1 * len(val) + own)
    assert result.metrics["infer_seconds_per_image"] > 0.1
    table = pd.read_csv(root / "base+shape" / "table_val_choice.csv")
    assert table["chosen"].sum() == 1 and table.loc[table["chosen"], "val_mre_mm"].item() == table["val_mre_mm"].min()
    manifest = json.loads((root / "base+shape" / "manifest.json").read_text())
    assert manifest["base_run"] == "../base" and manifest["chosen_variant"] == result.metrics["chosen_variant"]


def test_too_few_training_landmarks_for_a_shape_keep_the_base_run() -> None:
    rng = np.random.default_rng(8)
    sparse = [np.full((6, 3), np.nan) for _ in range(3)]
    for s in sparse:
        s[:3] = rng.uniform(-50, 50, (3, 3))  # 3 landmarks in 3D: no mean shape
    test = [rng.uniform(-50, 50, (6, 3))]
    derived = ShapePrior(3, 6).derive(sparse, test, lambda moved: 1.0, test)
    assert derived.metrics["chosen_variant"] == "none" and derived.manifest["mean_shape_mm"] is None
    assert np.array_equal(derived.test_mm[0], test[0])
