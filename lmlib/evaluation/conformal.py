"""Calibrated prediction regions by split conformal prediction (toward issue 13).

For each landmark k, the nonconformity score of a calibration image is its radial error (mm) on a held-out
split (the validation split: never used for training, only for model selection). With ``n`` finite scores
and miscoverage ``alpha``, the region radius is the ``ceil((n + 1)(1 - alpha))``-th smallest score
(infinite when that rank exceeds ``n``): a disc (2D) or ball (3D) of that radius around a new prediction
then holds the true landmark with probability at least ``1 - alpha`` for an exchangeable new image
(Vovk et al.; Angelopoulos & Bates, "A gentle introduction to conformal prediction", 2021). Masked
(NaN) scores are left out. Written by hand: the rank rule is three lines, and the conformal libraries
(MAPIE, ...) wrap scikit-learn estimators, not per-landmark radial errors.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd


def conformal_radius(scores: np.ndarray, alpha: float) -> float:
    """The split-conformal radius (mm) of finite ``scores`` (mm) at miscoverage ``alpha`` (see the module)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    s = np.sort(np.asarray(scores, dtype=np.float64)[np.isfinite(scores)])
    rank = math.ceil((len(s) + 1) * (1 - alpha))
    return float(s[rank - 1]) if rank <= len(s) else math.inf


def conformal_radii(errors: np.ndarray, alpha: float) -> np.ndarray:
    """Per-landmark radii ``(N,)`` from calibration errors ``(n_images, N)`` (mm, NaN = masked)."""
    e = np.asarray(errors, dtype=np.float64)
    return np.array([conformal_radius(e[:, k], alpha) for k in range(e.shape[1])])


def coverage_table(calibration: np.ndarray, test: np.ndarray, levels: Sequence[float] = (0.9, 0.95),
                   names: Sequence[str] | None = None) -> pd.DataFrame:
    """For each nominal level: the empirical coverage (%) on ``test`` errors ``(m, N)`` of the regions
    calibrated on ``calibration`` errors ``(n, N)``, their mean radius (mm), and the landmarks whose
    radius is the largest (for review)."""
    rows = {}
    t = np.asarray(test, dtype=np.float64)
    for level in levels:
        radii = conformal_radii(calibration, 1 - level)
        ok = np.isfinite(t)
        inside = (t <= radii[None, :]) & ok
        worst = np.argsort(-radii)[:3]
        rows[f"{100 * level:g} %"] = {
            "coverage_pct": 100.0 * inside.sum() / max(1, ok.sum()), "n_test": int(ok.sum()),
            "mean_radius_mm": float(np.mean(radii)), "max_radius_mm": float(np.max(radii)),
            "largest": ", ".join(f"{names[k] if names else k} ({radii[k]:.2f})" for k in worst)}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "nominal"
    return frame
