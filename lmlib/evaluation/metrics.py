"""Landmark error metrics in world millimetres (2D and 3D).

Errors are radial (Euclidean) distances between predicted and reference points in mm. Invalid
(masked) landmarks are NaN: they are left out of every statistic and counted, never set to zero.
SDR (successful detection rate) uses a strict ``error < threshold`` and is reported in percent;
outlier counts use a strict ``error > threshold``.

The table-level functions take the long predictions DataFrame of :mod:`lmlib.outputs.contract` (one row per
image x landmark, coordinates ``x_mm, y_mm[, z_mm]`` and ``gt_*_mm`` in world mm) and return
DataFrames. There, a NaN error is split into ``n_masked`` (reference landmark invalid: left out of every
statistic) and ``n_unpredicted`` (valid reference, no prediction: its error is unknown, so it is left out of
the MRE, SD, median and maximum, and counts as a miss in the SDR: a method cannot raise its detection rate by
not answering).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from lmlib.data.geometry import Geometry

DEFAULT_THRESHOLDS_MM: tuple[float, ...] = (2.0, 2.5, 3.0, 4.0)
DEFAULT_OUTLIER_THRESHOLDS_MM: tuple[float, ...] = (4.0, 10.0)
PRED_COLS: tuple[str, ...] = ("x_mm", "y_mm", "z_mm")
GT_COLS: tuple[str, ...] = ("gt_x_mm", "gt_y_mm", "gt_z_mm")


def radial_errors(pred_mm: np.ndarray, gt_mm: np.ndarray) -> np.ndarray:
    """Euclidean distance over the last axis (mm). NaN where either point is NaN."""
    pred = np.asarray(pred_mm, dtype=np.float64)
    gt = np.asarray(gt_mm, dtype=np.float64)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {gt.shape}")
    return np.sqrt(np.sum((pred - gt) ** 2, axis=-1))


def mean_radial_error(pred_mm: Sequence[np.ndarray], samples: Sequence[Any]) -> float:
    """MRE (mm) of per-image predictions ``(K, D)`` in world mm against each sample's ``landmarks_mm``
    (:class:`lmlib.data.sample.Sample`), masked landmarks (NaN) left out."""
    if len(pred_mm) != len(samples):
        raise ValueError(f"{len(pred_mm)} predictions for {len(samples)} images")
    errors = np.concatenate([radial_errors(p, s.landmarks_mm) for p, s in zip(pred_mm, samples)])
    return float(np.nanmean(errors))


def radial_errors_from_index(pred_index: np.ndarray, gt_index: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Radial errors in mm of points given as continuous indices ``(N, D)``, ``(x, y[, z])``.

    Both point sets are mapped to world mm through ``geometry`` first, so anisotropic spacing
    weighs each axis by its pixel size (unlike a naive pixel distance).
    """
    return radial_errors(geometry.index_to_world(pred_index), geometry.index_to_world(gt_index))


def sdr_key(threshold_mm: float) -> str:
    """Metric name of an SDR threshold: 2.0 -> 'sdr_2mm', 2.5 -> 'sdr_2.5mm'."""
    return f"sdr_{threshold_mm:g}mm"


def outlier_key(threshold_mm: float) -> str:
    """Metric name of an outlier count: 4.0 -> 'n_over_4mm'."""
    return f"n_over_{threshold_mm:g}mm"


def summarize(errors_mm: np.ndarray, thresholds_mm: Iterable[float] = DEFAULT_THRESHOLDS_MM,
              outlier_thresholds_mm: Iterable[float] = (), unpredicted: np.ndarray | None = None
              ) -> dict[str, float]:
    """Summary statistics of radial errors (any shape; NaN = masked, left out and counted).

    ``unpredicted`` (boolean, the shape of ``errors_mm``): the NaN errors of landmarks with a reference but no
    prediction; they are counted apart and are misses in the SDR (its denominator is n_points + n_unpredicted).
    Returns mre_mm, sd_mm (sample SD, ddof=1), median_mm, max_mm, sdr_<t>mm (percent, strict <),
    n_over_<t>mm for each outlier threshold (count, strict >), n_points (valid errors), n_masked (the other
    NaN entries) and n_unpredicted.
    """
    err = np.asarray(errors_mm, dtype=np.float64).reshape(-1)
    missing = np.zeros(err.shape, dtype=bool) if unpredicted is None else np.asarray(unpredicted, dtype=bool).reshape(-1)
    if missing.shape != err.shape:
        raise ValueError(f"unpredicted has {missing.size} entries for {err.size} errors")
    missing = missing & np.isnan(err)
    ok = err[~np.isnan(err)]
    n_sdr = ok.size + int(missing.sum())
    out: dict[str, float] = {
        "mre_mm": float(ok.mean()) if ok.size else float("nan"),
        "sd_mm": float(ok.std(ddof=1)) if ok.size > 1 else float("nan"),
        "median_mm": float(np.median(ok)) if ok.size else float("nan"),
        "max_mm": float(ok.max()) if ok.size else float("nan"),
    }
    for t in thresholds_mm:
        out[sdr_key(t)] = float(100.0 * np.sum(ok < t) / n_sdr) if n_sdr else float("nan")
    for t in outlier_thresholds_mm:
        out[outlier_key(t)] = int(np.sum(ok > t))
    out["n_points"] = int(ok.size)
    out["n_masked"] = int(err.size - ok.size - missing.sum())
    out["n_unpredicted"] = int(missing.sum())
    return out


def sdr_curve(errors_mm: np.ndarray, thresholds_mm: np.ndarray, n_unpredicted: int = 0) -> np.ndarray:
    """SDR in percent (strict <) at every threshold of ``thresholds_mm``; NaN errors left out, ``n_unpredicted``
    landmarks with a reference but no prediction counted as misses."""
    err = np.asarray(errors_mm, dtype=np.float64).reshape(-1)
    ok = np.sort(err[~np.isnan(err)])
    n = ok.size + int(n_unpredicted)
    if not n:
        return np.full(np.shape(thresholds_mm), np.nan)
    return 100.0 * np.searchsorted(ok, np.asarray(thresholds_mm, dtype=np.float64), side="left") / n


def frame_ndim(predictions: pd.DataFrame) -> int:
    """3 if any z coordinate is present in the predictions table, else 2."""
    zs = [c for c in ("z_mm", "gt_z_mm") if c in predictions.columns]
    return 3 if any(predictions[c].notna().any() for c in zs) else 2


def compute_errors(predictions: pd.DataFrame) -> np.ndarray:
    """Radial errors (mm) recomputed from the coordinate columns of a predictions table.

    NaN where the reference or the prediction is missing. 2D when no z coordinate is present.
    """
    d = frame_ndim(predictions)
    pred = predictions[list(PRED_COLS[:d])].to_numpy(dtype=np.float64)
    gt = predictions[list(GT_COLS[:d])].to_numpy(dtype=np.float64)
    return radial_errors(pred, gt)


def nan_split(predictions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(reference masked, valid reference but not predicted) boolean row masks."""
    d = frame_ndim(predictions)
    gt_nan = predictions[list(GT_COLS[:d])].isna().any(axis=1).to_numpy()
    pred_nan = predictions[list(PRED_COLS[:d])].isna().any(axis=1).to_numpy()
    return gt_nan, pred_nan & ~gt_nan


def _errors(predictions: pd.DataFrame, recompute: bool) -> np.ndarray:
    if recompute or "error_mm" not in predictions.columns:
        return compute_errors(predictions)
    return predictions["error_mm"].to_numpy(dtype=np.float64)


def _summary_rows(predictions: pd.DataFrame, by: str | None, thresholds_mm: Sequence[float],
                  outlier_thresholds_mm: Sequence[float], recompute: bool) -> pd.DataFrame:
    err = _errors(predictions, recompute)
    masked, unpredicted = nan_split(predictions)
    groups: list[tuple[object, np.ndarray]]
    if by is None:
        groups = [("all", np.ones(len(predictions), dtype=bool))]
    else:
        keys = predictions[by].to_numpy()
        order = pd.unique(keys)  # first-appearance order (the dataset's landmark order)
        groups = [(k, keys == k) for k in order]
    rows = []
    for key, sel in groups:
        row = summarize(np.where(masked[sel], np.nan, err[sel]), thresholds_mm, outlier_thresholds_mm,
                        unpredicted[sel])
        rows.append({"key": key, **row})
    frame = pd.DataFrame(rows).set_index("key")
    frame.index.name = by
    return frame


def overall_metrics(predictions: pd.DataFrame, thresholds_mm: Sequence[float] = DEFAULT_THRESHOLDS_MM,
                    outlier_thresholds_mm: Sequence[float] = DEFAULT_OUTLIER_THRESHOLDS_MM,
                    recompute: bool = False) -> pd.DataFrame:
    """One-row DataFrame of the pooled metrics over every (image, landmark) of the table.

    Columns: mre_mm, sd_mm, median_mm, max_mm, sdr_<t>mm (%), n_over_<t>mm, n_points, n_masked,
    n_unpredicted, n_images, n_landmarks. ``recompute`` ignores ``error_mm`` and recomputes it
    from the coordinates.
    """
    frame = _summary_rows(predictions, None, thresholds_mm, outlier_thresholds_mm, recompute)
    frame["n_images"] = int(predictions["image_id"].nunique())
    frame["n_landmarks"] = int(predictions["landmark"].nunique())
    return frame


def per_landmark_metrics(predictions: pd.DataFrame, thresholds_mm: Sequence[float] = DEFAULT_THRESHOLDS_MM,
                         outlier_thresholds_mm: Sequence[float] = DEFAULT_OUTLIER_THRESHOLDS_MM,
                         recompute: bool = False) -> pd.DataFrame:
    """Metrics per landmark (index ``landmark``, in order of first appearance), pooled over images."""
    return _summary_rows(predictions, "landmark", thresholds_mm, outlier_thresholds_mm, recompute)


def per_image_metrics(predictions: pd.DataFrame, thresholds_mm: Sequence[float] = DEFAULT_THRESHOLDS_MM,
                      outlier_thresholds_mm: Sequence[float] = DEFAULT_OUTLIER_THRESHOLDS_MM,
                      recompute: bool = False) -> pd.DataFrame:
    """Metrics per image (index ``image_id``, in order of first appearance), pooled over landmarks."""
    return _summary_rows(predictions, "image_id", thresholds_mm, outlier_thresholds_mm, recompute)


def error_matrix(predictions: pd.DataFrame, recompute: bool = False) -> pd.DataFrame:
    """Errors (mm) as an images x landmarks table (rows/columns in order of first appearance).

    A pair absent from the table, masked or unpredicted is NaN.
    """
    frame = predictions[["image_id", "landmark"]].copy()
    frame["error_mm"] = _errors(predictions, recompute)
    wide = frame.pivot(index="image_id", columns="landmark", values="error_mm")
    return wide.reindex(index=pd.unique(frame["image_id"]), columns=pd.unique(frame["landmark"]))
