"""Holm correction, paired Wilcoxon tests and image-level bootstrap CIs."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lmlib.evaluation import statistics as stats


def test_holm_hand_computed() -> None:
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone max 0.06
    adj = stats.holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adj, [0.03, 0.06, 0.06, 0.02])


def test_holm_caps_at_one_and_keeps_nan() -> None:
    adj = stats.holm([0.5, np.nan, 0.2])
    np.testing.assert_allclose(adj, [0.5, np.nan, 0.4])
    assert stats.holm([0.9, 0.8])[0] == 1.0
    assert stats.holm([]).size == 0


def test_wilcoxon_identical_methods() -> None:
    e = np.random.default_rng(0).gamma(2.0, 1.0, 200)
    res = stats.wilcoxon_paired(e, e.copy())
    assert res["p_value"] == 1.0 and res["n_nonzero"] == 0 and res["n_pairs"] == 200


def test_wilcoxon_clearly_better_and_pairs_only_where_both_valid() -> None:
    rng = np.random.default_rng(1)
    a = rng.gamma(2.0, 0.5, 300)
    b = a + rng.uniform(0.3, 1.0, 300)
    a[:10] = np.nan
    b[5:15] = np.nan
    res = stats.wilcoxon_paired(a, b)
    assert res["n_pairs"] == 285
    assert res["p_value"] < 1e-10 and res["mean_diff_mm"] < 0


def test_pairwise_and_matrix() -> None:
    rng = np.random.default_rng(2)
    base = rng.gamma(2.0, 0.6, 400)
    errors = pd.DataFrame({"good": base, "same": base.copy(), "bad": base + rng.uniform(0.5, 1.5, 400)})
    table = stats.pairwise_wilcoxon(errors)
    assert len(table) == 3
    row = table[(table.method_a == "good") & (table.method_b == "bad")].iloc[0]
    assert row.p_holm < 1e-6 and row.better == "good"
    same = table[(table.method_a == "good") & (table.method_b == "same")].iloc[0]
    assert same.p_value == 1.0 and same.p_holm == 1.0 and same.better == ""
    np.testing.assert_allclose(table["p_holm"], stats.holm(table["p_value"]))
    mat = stats.significance_matrix(table)
    assert list(mat.index) == ["good", "same", "bad"]
    assert mat.loc["bad", "good"] == mat.loc["good", "bad"] and np.isnan(mat.loc["good", "good"])


def _errors(n_images: int, seed: int = 0, n_landmarks: int = 19) -> np.ndarray:
    rng = np.random.default_rng(seed)
    err = rng.gamma(2.0, 0.8, (n_images, n_landmarks)) * rng.uniform(0.6, 1.4, (n_images, 1))
    err[rng.random(err.shape) < 0.03] = np.nan
    return err


def test_bootstrap_contains_estimate_and_matches_pooled_metrics() -> None:
    err = _errors(30)
    ci = stats.bootstrap_ci(err, n_bootstrap=2000, seed=0)
    ok = err[~np.isnan(err)]
    assert ci.loc["mre_mm", "estimate"] == pytest.approx(ok.mean())
    assert ci.loc["sdr_2mm", "estimate"] == pytest.approx(100 * np.mean(ok < 2.0))
    assert list(ci.index) == ["mre_mm", "sdr_2mm", "sdr_2.5mm", "sdr_3mm", "sdr_4mm"]
    assert (ci["ci_low"] <= ci["estimate"]).all() and (ci["estimate"] <= ci["ci_high"]).all()
    again = stats.bootstrap_ci(err, n_bootstrap=2000, seed=0)
    pd.testing.assert_frame_equal(ci, again)  # seeded


def test_bootstrap_counts_unpredicted_landmarks_as_sdr_misses() -> None:
    err = _errors(30)
    missing = np.zeros(err.shape, dtype=bool)
    missing[:5, 0] = True
    err[missing] = np.nan
    ci = stats.bootstrap_ci(err, n_bootstrap=500, seed=0, unpredicted=missing)
    ok = err[~np.isnan(err)]
    assert ci.loc["mre_mm", "estimate"] == pytest.approx(ok.mean())
    assert ci.loc["sdr_2mm", "estimate"] == pytest.approx(100 * np.sum(ok < 2.0) / (ok.size + 5))
    assert (ci["ci_low"] <= ci["estimate"]).all() and (ci["estimate"] <= ci["ci_high"]).all()
    plain = stats.bootstrap_ci(err, n_bootstrap=500, seed=0)
    assert ci.loc["sdr_2mm", "ci_high"] < plain.loc["sdr_2mm", "ci_high"]


def test_bootstrap_shrinks_with_more_images() -> None:
    small = stats.bootstrap_ci(_errors(10, seed=3), n_bootstrap=1000, seed=0)
    large = stats.bootstrap_ci(_errors(250, seed=3), n_bootstrap=1000, seed=0)
    width = lambda t: t["ci_high"] - t["ci_low"]  # noqa: E731
    assert width(large).loc["mre_mm"] < 0.5 * width(small).loc["mre_mm"]
    assert width(large).loc["sdr_2mm"] < width(small).loc["sdr_2mm"]


def test_bootstrap_shared_indices() -> None:
    err = _errors(12)
    idx = stats.resample_indices(12, 500, seed=4)
    assert idx.shape == (500, 12)
    pd.testing.assert_frame_equal(stats.bootstrap_ci(err, indices=idx), stats.bootstrap_ci(err, n_bootstrap=500, seed=4))


def test_pairs_are_images_not_points_when_errors_are_indexed_by_image() -> None:
    """74 points of 2 images were tested as 74 independent pairs (p ~ 1e-14, issue 24); the landmarks of one
    image are correlated, so the test pairs the 2 per-image means (the smallest two-sided p with 2 pairs is 0.5)."""
    rng = np.random.default_rng(3)
    index = pd.MultiIndex.from_product([["img1", "img2"], [f"l{k}" for k in range(37)]], names=["image_id", "landmark"])
    a = rng.gamma(2.0, 0.5, len(index))
    errors = pd.DataFrame({"a": a, "b": a + 0.3}, index=index)
    errors.iloc[0, 1] = np.nan  # a landmark only one method has is left out of that image's means
    by_image = stats.pairwise_wilcoxon(errors).iloc[0]
    by_point = stats.pairwise_wilcoxon(errors, by="point").iloc[0]
    assert by_image.unit == "image" and by_image.n_pairs == 2 and by_image.p_value >= 0.5
    assert by_point.unit == "point" and by_point.n_pairs == 73 and by_point.p_value < 1e-6
    assert by_image.mean_diff_mm == pytest.approx(-0.3) and by_image.better == "a"
    with pytest.raises(ValueError, match="by='image'"):
        stats.pairwise_wilcoxon(errors.reset_index(drop=True), by="image")


def test_holm_within_corrects_over_the_pairs_asked_for_only() -> None:


    table = pd.DataFrame({"method_a": ["a", "a", "b", "x"], "method_b": ["b", "c", "c", "y"],
                          "p_value": [0.01, 0.02, 0.5, 0.001]})
    table["p_holm"] = stats.holm(table["p_value"].to_numpy())
    sub = stats.holm_within(table, [("b", "a"), ("a", "c")])  # either order
    assert list(zip(sub["method_a"], sub["method_b"])) == [("a", "b"), ("a", "c")]
    np.testing.assert_allclose(sub["p_holm"], [0.02, 0.02])  # 2 x 0.01, then max(2 x 0.01, 1 x 0.02)
