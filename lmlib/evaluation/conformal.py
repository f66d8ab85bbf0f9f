"""Calibrated prediction regions by split conformal prediction.

For each landmark k, the nonconformity score of a calibration image is its radial error (mm) on a held-out
split (the validation split: never used for training, only for model selection). With ``n`` finite scores
and miscoverage ``alpha``, the region radius is the ``ceil((n + 1)(1 - alpha))``-th smallest score
(infinite when that rank exceeds ``n``): a disc (2D) or ball (3D) of that radius around a new prediction
then holds the true landmark with probability at least ``1 - alpha`` for an exchangeable new image
(Vovk et al.; Angelopoulos & Bates, "A gentle introduction to conformal prediction", 2021). Masked
(NaN) scores are left out. With fewer than ``1/alpha - 1`` calibration images a per-landmark region would be
infinite; those landmarks then get the quantile pooled over all landmarks' scores (``pooled``): the guarantee
holds on average over landmarks instead of for each one.

Two caveats of this use. The validation split also chose the checkpoint (its lowest validation MRE), so its
errors are a little optimistic for that model and the guarantee is approximate: the coverage measured on ``test``
says by how much. Where a data set declares subjects (posed copies of one anatomy, ``groups``), the exchangeable
unit is the subject, not the image: each subject's score is its largest over its images, and the ranks count
subjects (afids-templates validates on one anatomy: its regions are pooled, and they guarantee nothing for a
new anatomy).

**Adaptive regions** (per image): the score is the error divided by the prediction's own uncertainty
``u = spread / max(c / c_k, 0.05)``: the method's spread around the point (``Predictions.spread_mm``: heatmap or
mask spread around the peak, vote dispersion) over its confidence ``c`` (peak height, presence or mask
probability) relative to the landmark's median calibration confidence ``c_k``. The region radius is then
``q_k * u`` -- small where the output is a sharp, tall peak, large where it is diffuse or weak -- with the same
coverage guarantee (normalised scores, Lei et al., JASA 2018). Where a method gives no spread (a coordinate
regressor), the fixed radius is used. The confidence is there to make the coverage more even across easy and hard
predictions than the spread alone. Written by hand: the rank rule is three lines, and the conformal libraries
(MAPIE, ...) wrap scikit-learn estimators, not per-landmark radial errors.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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


SPREAD_FLOOR_MM = 1e-3  # spreads below this (a perfectly sharp map) count as this, not as zero
CONFIDENCE_FLOOR = 0.05  # relative confidences below this (a vanishing peak) count as this


def uncertainty_mm(spread_mm: np.ndarray, confidence: np.ndarray | None, reference: np.ndarray | None) -> np.ndarray:
    """``spread / max(confidence / reference, CONFIDENCE_FLOOR)`` (mm; ``(..., N)`` with ``reference`` ``(N,)``, the
    landmarks' median calibration confidence); the spread alone where either confidence is not given."""
    sp = np.maximum(np.asarray(spread_mm, dtype=np.float64), SPREAD_FLOOR_MM)
    if confidence is None or reference is None:
        return sp
    rel = np.asarray(confidence, dtype=np.float64) / np.asarray(reference, dtype=np.float64)
    rel = np.where(np.isfinite(rel), rel, 1.0)
    return sp / np.maximum(rel, CONFIDENCE_FLOOR)


@dataclass
class ConformalRegions:
    """Per-landmark regions calibrated at several nominal ``levels``: the fixed radius (mm) and the adaptive
    multiplier of the prediction's spread (NaN where the calibration predictions had no spread)."""

    landmark_names: list[str]
    levels: tuple[float, ...]
    radius_mm: dict[float, np.ndarray]  # level -> (N,)
    scale: dict[float, np.ndarray]  # level -> (N,), radius = scale * uncertainty_mm
    n_calibration: int  # calibration units: images, or subjects where ``unit`` says so
    reference_confidence: np.ndarray | None = None  # (N,) median calibration confidence (None: spread only)
    pooled: dict[float, np.ndarray] | None = None  # level -> (N,) True: too few units, pooled over landmarks
    unit: str = "image"  # what was exchangeable: "image", or "subject" (posed copies of one anatomy are one)

    def uncertainty(self, spread_mm: np.ndarray, confidence: np.ndarray | None = None) -> np.ndarray:
        """The adaptive regions' uncertainty (mm) of predictions with these spreads and confidences."""
        return uncertainty_mm(spread_mm, confidence if self.reference_confidence is not None else None,
                              self.reference_confidence)

    def radii(self, level: float, spread_mm: np.ndarray | None = None, confidence: np.ndarray | None = None
              ) -> np.ndarray:
        """Region radii (mm): ``(M, N)`` for spreads (and confidences) ``(M, N)`` (adaptive where the uncertainty
        and scale are finite, else fixed), or the fixed ``(N,)`` when no spread is given."""
        fixed = self.radius_mm[level]
        if spread_mm is None:
            return fixed
        adaptive = self.scale[level][None, :] * self.uncertainty(spread_mm, confidence)
        return np.where(np.isfinite(adaptive), adaptive, fixed[None, :])

    def to_frame(self) -> pd.DataFrame:
        """One row per landmark: the fixed radius and the adaptive multiplier per level."""
        cols = {}
        for level in self.levels:
            cols[f"radius_{100 * level:g}_mm"] = self.radius_mm[level]
            cols[f"spread_multiplier_{100 * level:g}"] = self.scale[level]
        frame = pd.DataFrame(cols, index=pd.Index(self.landmark_names, name="landmark"))
        if self.reference_confidence is not None:
            frame["reference_confidence"] = self.reference_confidence
        for level, pooled in (self.pooled or {}).items():
            frame[f"pooled_{100 * level:g}"] = pooled
        frame["calibrated_on"] = f"{self.n_calibration} {self.unit}(s)"
        return frame


def per_subject(scores: np.ndarray, groups: Sequence[str] | None) -> np.ndarray:
    """``(n, N)`` scores -> one row per subject (its largest score per landmark, NaN where all are), in order of
    first appearance; ``scores`` unchanged without ``groups``."""
    s = np.asarray(scores, dtype=np.float64)
    if groups is None:
        return s
    codes = pd.factorize(np.asarray(groups, dtype=object))[0]
    if codes.size != s.shape[0]:
        raise ValueError(f"{codes.size} groups for {s.shape[0]} calibration images")
    with np.errstate(all="ignore"):
        return np.stack([np.fmax.reduce(s[codes == g], axis=0) for g in range(codes.max() + 1)])


def calibrate(errors: np.ndarray, spread_mm: np.ndarray | None = None, levels: Sequence[float] = (0.9, 0.95),
              names: Sequence[str] | None = None, confidence: np.ndarray | None = None,
              groups: Sequence[str] | None = None) -> ConformalRegions:
    """Regions from calibration errors ``(n, N)`` (mm, NaN = masked) and, for adaptive regions, the
    predictions' spreads ``(n, N)`` (mm) and confidences ``(n, N)``. ``groups`` (one subject per row): the
    subject is the exchangeable unit (:func:`per_subject`)."""
    e = np.asarray(errors, dtype=np.float64)
    n_landmarks = e.shape[1]
    reference = None
    if confidence is not None:
        c = np.asarray(confidence, dtype=np.float64)
        with np.errstate(all="ignore"):
            reference = np.array([np.nanmedian(np.where(c[:, k] > 0, c[:, k], np.nan)) if np.any(c[:, k] > 0)
                                  else np.nan for k in range(n_landmarks)])
    radius, scale, pooled = {}, {}, {}
    units = per_subject(e, groups)
    for level in levels:
        lv = float(level)
        radius[lv] = conformal_radii(units, 1 - lv)
        pooled[lv] = ~np.isfinite(radius[lv])
        radius[lv][pooled[lv]] = conformal_radius(units.reshape(-1), 1 - lv)
        if spread_mm is None:
            scale[lv] = np.full(n_landmarks, np.nan)
        else:
            normalised = per_subject(e / uncertainty_mm(spread_mm, confidence, reference), groups)
            scale[lv] = conformal_radii(normalised, 1 - lv)
            scale[lv][pooled[lv]] = conformal_radius(normalised.reshape(-1), 1 - lv)
    ordered = sorted(radius)
    for lower, higher in zip(ordered, ordered[1:]):  # a higher level never gets a smaller region (a pooled
        radius[higher] = np.fmax(radius[higher], radius[lower])  # quantile can undercut a per-landmark one):
        scale[higher] = np.fmax(scale[higher], scale[lower])  # widening only adds coverage
    return ConformalRegions(list(names) if names is not None else [str(k) for k in range(n_landmarks)],
                            tuple(float(v) for v in levels), radius, scale, int(units.shape[0]), reference, pooled,
                            "image" if groups is None else "subject")


def coverage_table(calibration: np.ndarray, test: np.ndarray, levels: Sequence[float] = (0.9, 0.95),
                   names: Sequence[str] | None = None, spread_calibration: np.ndarray | None = None,
                   spread_test: np.ndarray | None = None, review_mm: float | None = None,
                   confidence_calibration: np.ndarray | None = None, confidence_test: np.ndarray | None = None,
                   groups: Sequence[str] | None = None) -> pd.DataFrame:
    """For each nominal level (and, given spreads, for fixed and adaptive regions): the empirical coverage
    (%) on ``test`` errors ``(m, N)`` of the regions calibrated on ``calibration`` errors ``(n, N)`` (``groups``:
    their subjects, see :func:`calibrate`), their mean and largest radius (mm), the landmarks with the largest
    fixed radius, and with ``review_mm`` the share of test points whose region is larger (they would be listed
    for review)."""
    regions = calibrate(calibration, spread_calibration, levels, names, confidence_calibration, groups)
    t = np.asarray(test, dtype=np.float64)
    ok = np.isfinite(t)
    rows = {}
    kinds = ["fixed"] + (["adaptive"] if spread_calibration is not None and spread_test is not None else [])
    for level in regions.levels:
        for kind in kinds:
            r = regions.radii(level, spread_test if kind == "adaptive" else None, confidence_test)
            r = np.broadcast_to(r, t.shape)
            inside = (t <= r) & ok
            row = {"coverage_pct": 100.0 * inside.sum() / max(1, ok.sum()), "n_test": int(ok.sum()),
                   "calibrated_on": f"{regions.n_calibration} {regions.unit}(s)",
                   "mean_radius_mm": float(np.mean(r[ok])) if ok.any() else math.nan,
                   "max_radius_mm": float(np.max(r[ok])) if ok.any() else math.nan}
            if review_mm is not None:
                row["review_pct"] = 100.0 * float(((r > review_mm) & ok).sum()) / max(1, ok.sum())
            if kind == "fixed":
                worst = np.argsort(-regions.radius_mm[level])[:3]
                row["largest"] = ", ".join(f"{regions.landmark_names[k]} ({regions.radius_mm[level][k]:.2f})"
                                           for k in worst)
            rows[f"{100 * level:g} %" + ("" if kind == "fixed" else " adaptive")] = row
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "nominal"
    return frame
