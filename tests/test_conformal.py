"""Split conformal prediction regions: the rank rule, masked scores, and coverage close to nominal."""
from __future__ import annotations

import math

import numpy as np
import pytest

from lmlib.evaluation.conformal import conformal_radii, conformal_radius, coverage_table


def test_rank_rule_and_its_limits():
    scores = np.arange(1.0, 20.0)  # n = 19
    assert conformal_radius(scores, 0.05) == 19.0  # ceil(20 * 0.95) = 19: the largest
    assert conformal_radius(scores, 0.1) == 18.0  # ceil(20 * 0.9) = 18
    assert conformal_radius(np.arange(1.0, 11.0), 0.05) == math.inf  # ceil(11 * 0.95) = 11 > 10: no finite region
    assert conformal_radius(np.array([1.0, np.nan, 2.0, 3.0, np.inf, 4.0]), 0.5) == 3.0  # masked scores left out
    with pytest.raises(ValueError, match="alpha"):
        conformal_radius(scores, 1.5)


def test_coverage_is_nominal_on_exchangeable_errors():
    """Radial errors of an isotropic 2D normal with a different scale per landmark: regions calibrated on
    500 images cover 90 % / 95 % of 20000 new ones to within a point, and follow each landmark's scale."""
    rng = np.random.default_rng(0)
    scale = np.array([0.5, 1.0, 3.0])

    def draw(n: int) -> np.ndarray:
        return np.linalg.norm(rng.normal(size=(n, 3, 2)), axis=-1) * scale

    cal, test = draw(500), draw(20000)
    table = coverage_table(cal, test, (0.9, 0.95), names=["a", "b", "c"])
    assert table.loc["90 %", "coverage_pct"] == pytest.approx(90.0, abs=1.0)
    assert table.loc["95 %", "coverage_pct"] == pytest.approx(95.0, abs=1.0)
    radii = conformal_radii(cal, 0.1)
    assert radii[2] / radii[0] == pytest.approx(6.0, rel=0.15)  # Rayleigh 90 % quantile scales with sigma
    assert radii[0] == pytest.approx(0.5 * math.sqrt(-2 * math.log(0.1)), rel=0.1)
    assert table.loc["90 %", "largest"].startswith("c (")
