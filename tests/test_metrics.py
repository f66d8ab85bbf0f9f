"""Metrics on hand-computed cases: 2D, 3D, anisotropic spacing, masked landmarks."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lmlib.data.geometry import Geometry
from lmlib.data.sample import Sample
from lmlib.evaluation import metrics as M
from lmlib.outputs.contract import predictions_frame


def test_radial_errors_345_triangle() -> None:
    pred = np.array([[3.0, 4.0], [0.0, 0.0], [np.nan, 1.0]])
    gt = np.zeros((3, 2))
    np.testing.assert_allclose(M.radial_errors(pred, gt), [5.0, 0.0, np.nan])


def test_radial_errors_3d() -> None:
    # 2-3-6 -> 7 and 1-2-2 -> 3
    err = M.radial_errors(np.array([[2.0, 3.0, 6.0], [1.0, 1.0, 1.0]]), np.array([[0.0, 0.0, 0.0], [0.0, -1.0, 3.0]]))
    np.testing.assert_allclose(err, [7.0, 3.0])


def test_anisotropic_spacing_differs_from_pixel_distance() -> None:
    geo = Geometry(spacing=(0.5, 2.0), origin=(10.0, -5.0))
    pred_idx, gt_idx = np.array([[6.0, 2.0], [1.0, 1.0]]), np.array([[0.0, 0.0], [1.0, 1.0]])
    mm = M.radial_errors_from_index(pred_idx, gt_idx, geo)
    np.testing.assert_allclose(mm, [5.0, 0.0])  # 6 px * 0.5 = 3 mm along x, 2 px * 2.0 = 4 mm along y
    naive_px = M.radial_errors(pred_idx, gt_idx)
    assert naive_px[0] == pytest.approx(np.sqrt(40.0)) and abs(naive_px[0] - mm[0]) > 1.0


def test_errors_from_sample_index_with_rotated_direction() -> None:
    theta = np.deg2rad(30.0)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    geo = Geometry(spacing=(0.5, 2.0), origin=(3.0, 4.0), direction=rot)
    s = Sample.from_index("r", np.zeros((10, 10)), geo, np.array([[0.0, 0.0]]), ("A",))
    pred_mm = geo.index_to_world(np.array([[6.0, 2.0]]))
    assert M.radial_errors(pred_mm, s.landmarks_mm)[0] == pytest.approx(5.0)


def test_summarize_masked_left_out_and_counted() -> None:
    err = np.array([1.0, 2.0, 3.0, 4.0, np.nan, 11.0])
    s = M.summarize(err, outlier_thresholds_mm=(4.0, 10.0))
    assert s["mre_mm"] == pytest.approx(21.0 / 5)
    assert s["median_mm"] == pytest.approx(3.0)
    assert s["max_mm"] == pytest.approx(11.0)
    assert s["sd_mm"] == pytest.approx(np.std([1, 2, 3, 4, 11], ddof=1))
    assert s["sdr_2mm"] == pytest.approx(20.0)  # strict <: only 1.0
    assert s["sdr_2.5mm"] == pytest.approx(40.0)
    assert s["sdr_4mm"] == pytest.approx(60.0)  # 4.0 is not < 4
    assert s["n_over_4mm"] == 1 and s["n_over_10mm"] == 1  # strict >
    assert s["n_points"] == 5 and s["n_masked"] == 1


def test_summarize_default_keys_unchanged() -> None:
    s = M.summarize(np.array([1.0, 2.0]))
    assert list(s) == ["mre_mm", "sd_mm", "median_mm", "max_mm", "sdr_2mm", "sdr_2.5mm", "sdr_3mm",
                       "sdr_4mm", "n_points", "n_masked", "n_unpredicted"]
    assert M.summarize(np.array([1.0, 5.0]), thresholds_mm=(1.5, 7))["sdr_7mm"] == 100.0


def test_sdr_curve_strict() -> None:
    curve = M.sdr_curve(np.array([1.0, 2.0, np.nan, 3.0, 4.0]), np.array([0.0, 2.0, 2.01, 10.0]))
    np.testing.assert_allclose(curve, [0.0, 25.0, 50.0, 100.0])


def test_unpredicted_landmarks_are_misses_in_the_sdr_not_left_out() -> None:
    """A method that answers only its easy landmarks must not get a higher detection rate (it got 100 % here)."""
    err = np.array([1.0, 1.5, np.nan, np.nan, np.nan])
    unpredicted = np.array([False, False, True, True, False])  # the last NaN: a masked reference
    s = M.summarize(err, unpredicted=unpredicted)
    assert s["sdr_2mm"] == pytest.approx(50.0) and s["mre_mm"] == pytest.approx(1.25)
    assert s["n_points"] == 2 and s["n_unpredicted"] == 2 and s["n_masked"] == 1
    np.testing.assert_allclose(M.sdr_curve(err, np.array([0.5, 10.0]), n_unpredicted=2), [0.0, 50.0])
    with pytest.raises(ValueError, match="unpredicted"):
        M.summarize(err, unpredicted=unpredicted[:3])


def _samples_2d() -> list[Sample]:
    geo = Geometry(spacing=(0.5, 0.5))
    names = ("A", "B", "C")
    s1 = Sample("img1", np.zeros((20, 20)), geo, [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]], [True, True, True], names)
    s2 = Sample("img2", np.zeros((20, 20)), geo, [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]], [True, False, True], names)
    return [s1, s2]


def _frame_2d() -> pd.DataFrame:
    s1, s2 = _samples_2d()
    p1 = np.array([[3.0, 4.0], [1.0, 1.0], [2.0, 2.5]])          # errors 5, 0, 0.5
    p2 = np.array([[0.0, 12.0], [1.0, 1.0], [np.nan, np.nan]])   # errors 12, masked, unpredicted
    return predictions_frame([s1, s2], [p1, p2])


def test_overall_metrics_frame() -> None:
    df = _frame_2d()
    row = M.overall_metrics(df).iloc[0]
    assert row["mre_mm"] == pytest.approx((5 + 0 + 0.5 + 12) / 4)
    assert row["median_mm"] == pytest.approx(2.75)
    assert row["n_points"] == 4 and row["n_masked"] == 1 and row["n_unpredicted"] == 1
    assert row["n_over_4mm"] == 2 and row["n_over_10mm"] == 1
    assert row["sdr_2mm"] == pytest.approx(40.0)  # 0 and 0.5 of 4 scored + 1 unpredicted (a miss)
    assert row["n_images"] == 2 and row["n_landmarks"] == 3


def test_per_landmark_and_per_image() -> None:
    df = _frame_2d()
    lm = M.per_landmark_metrics(df)
    assert list(lm.index) == ["A", "B", "C"]
    assert lm.loc["A", "mre_mm"] == pytest.approx(8.5)
    assert lm.loc["B", "n_points"] == 1 and lm.loc["B", "n_masked"] == 1
    assert lm.loc["C", "n_unpredicted"] == 1 and lm.loc["C", "mre_mm"] == pytest.approx(0.5)
    im = M.per_image_metrics(df)
    assert list(im.index) == ["img1", "img2"]
    assert im.loc["img1", "mre_mm"] == pytest.approx(5.5 / 3)
    assert im.loc["img2", "mre_mm"] == pytest.approx(12.0)


def test_masked_never_zero() -> None:
    df = _frame_2d()
    assert M.overall_metrics(df).iloc[0]["sdr_2mm"] == pytest.approx(40.0)  # zeros would make it 60 or 67
    mat = M.error_matrix(df)
    assert mat.shape == (2, 3) and np.isnan(mat.loc["img2", "B"]) and np.isnan(mat.loc["img2", "C"])


def test_compute_errors_recomputes_and_3d() -> None:
    geo = Geometry(spacing=(1.0, 1.0, 2.0))
    s = Sample("v", np.zeros((4, 4, 4)), geo, [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], [True, True], ("P", "Q"))
    df = predictions_frame([s], [np.array([[2.0, 3.0, 6.0], [1.0, 1.0, 1.0]])])
    assert M.frame_ndim(df) == 3
    np.testing.assert_allclose(M.compute_errors(df), [7.0, 0.0])
    df.loc[0, "error_mm"] = 99.0  # a stale error column is ignored with recompute=True
    assert M.overall_metrics(df, recompute=True).iloc[0]["max_mm"] == pytest.approx(7.0)
    assert M.overall_metrics(df).iloc[0]["max_mm"] == pytest.approx(99.0)
    assert M.frame_ndim(_frame_2d()) == 2


def test_metrics_json_tells_unpredicted_from_masked(tmp_path) -> None:
    """metrics.json counted a landmark with no prediction as masked (and in the SDR's favour)."""
    from lmlib.outputs.contract import metrics_from_predictions

    met = metrics_from_predictions(_frame_2d())
    assert met["n_masked"] == 1 and met["n_unpredicted"] == 1 and met["n_points"] == 4
    assert met["sdr_2mm"] == pytest.approx(40.0)
