"""The output contract between method notebooks and the comparison notebook.

Every run folder ``results/<dataset>/<method>/`` holds:
- ``predictions.csv``: one row per image x landmark, columns :data:`PREDICTION_COLUMNS`
  (world mm; z empty in 2D; ``error_mm`` empty where the reference landmark is masked);
- ``metrics.json``: at least :data:`METRIC_KEYS` (SDR in percent, strict ``<``);
- ``manifest.json``: see :mod:`lmlib.outputs.manifest`;
- ``val_predictions.csv`` (a trained run held out from its val split, and each stage of a cascade): the same
  columns on the val split, from the weights the run kept, so that a later choice on val (an ensemble's members,
  :mod:`lmlib.methods.ensemble`) needs no checkpoint.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lmlib.data.sample import Sample
from lmlib.evaluation.metrics import DEFAULT_THRESHOLDS_MM, nan_split, radial_errors, summarize

PREDICTION_COLUMNS: tuple[str, ...] = (
    "image_id", "landmark", "x_mm", "y_mm", "z_mm", "gt_x_mm", "gt_y_mm", "gt_z_mm", "error_mm",
)
METRIC_KEYS: tuple[str, ...] = (
    "mre_mm", "sd_mm", "median_mm", "sdr_2mm", "sdr_2.5mm", "sdr_3mm", "sdr_4mm",
    "n_images", "n_landmarks", "train_seconds", "infer_seconds_per_image", "peak_rss_mb",
)
REFERENCE_KIND = "reference"  # metrics.json "kind" of a run that needs no training (mean shape, 2nd annotator)
#: the base run's val predictions that a refinement or shape fit keeps in its folder (lmlib.engine.base_run), with
#: the key (the base run's manifest hash) it was made for
BASE_VAL_CACHE = "base_val_predictions.csv"
#: files of a finished run that the driver hands to its re-run, which uses each only where its key still matches:
#: committed run folders keep no checkpoints, so a re-run in a fresh clone could not predict the base's val again
REUSABLE_FILES: tuple[str, ...] = (BASE_VAL_CACHE, str(Path(BASE_VAL_CACHE).with_suffix(".key")))
REFERENCE_TIMINGS: dict[str, float] = {"train_seconds": 0.0, "infer_seconds_per_image": 0.0, "peak_rss_mb": 0.0}
#: a folder holding either is a run (or a stage or decoding-variant sub-run of one) for the comparison
RUN_FILES: tuple[str, ...] = ("predictions.csv", "metrics.json")
#: a run's predictions on its val split (same columns as predictions.csv; not written by a refit)
VAL_PREDICTIONS = "val_predictions.csv"
#: an ensemble chosen on val: its selection's steps (lmlib.methods.ensemble.select_on_val)
SELECTION_FILE = "selection.csv"


class ContractError(ValueError):
    """A run folder does not follow the output contract (the message names the file)."""


def predictions_frame(samples: Sequence[Sample], pred_mm: Sequence[np.ndarray] | np.ndarray) -> pd.DataFrame:
    """Long-format predictions: one row per (image, landmark).

    ``pred_mm[i]`` is an (N, D) array of predicted world coordinates (mm, (x, y[, z])) for
    ``samples[i]``; NaN marks a landmark the method did not predict. Reference points come from
    the samples; masked reference landmarks keep their prediction but get an empty error.
    """
    if len(samples) != len(pred_mm):
        raise ValueError(f"{len(samples)} samples but {len(pred_mm)} predictions")
    rows: list[dict[str, Any]] = []
    for sample, pred in zip(samples, pred_mm):
        pred = np.asarray(pred, dtype=np.float64)
        if pred.shape != sample.landmarks_mm.shape:
            raise ValueError(f"{sample.image_id}: prediction {pred.shape} != landmarks {sample.landmarks_mm.shape}")
        err = radial_errors(pred, sample.landmarks_mm)
        for k, name in enumerate(sample.landmark_names):
            p, g = pred[k], sample.landmarks_mm[k]
            rows.append({
                "image_id": sample.image_id, "landmark": name,
                "x_mm": p[0], "y_mm": p[1], "z_mm": p[2] if p.size > 2 else np.nan,
                "gt_x_mm": g[0], "gt_y_mm": g[1], "gt_z_mm": g[2] if g.size > 2 else np.nan,
                "error_mm": err[k],
            })
    return pd.DataFrame(rows, columns=list(PREDICTION_COLUMNS))


def metrics_from_predictions(predictions: pd.DataFrame, thresholds_mm: Sequence[float] = DEFAULT_THRESHOLDS_MM) -> dict[str, Any]:
    """Overall metrics of a predictions table: an empty error is ``n_masked`` where the reference is missing and
    ``n_unpredicted`` (a miss in the SDR) where the prediction is."""
    out: dict[str, Any] = summarize(predictions["error_mm"].to_numpy(dtype=np.float64), thresholds_mm,
                                    unpredicted=nan_split(predictions)[1])
    out["n_images"] = int(predictions["image_id"].nunique())
    out["n_landmarks"] = int(predictions["landmark"].nunique())
    return out


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return value


def clear_earlier_run(output_dir: Path | str) -> list[Path]:
    """Delete an earlier run's :data:`RUN_FILES`, :data:`VAL_PREDICTIONS`, :data:`SELECTION_FILE` and
    ``manifest.json`` in ``output_dir`` and in its sub-folders (stage and decoding-variant sub-runs), and return them.
    A run written in place (a method notebook run by hand, not through the driver's scratch folder) then leaves no
    earlier sub-run's rows beside its own (a ``heads=both`` run's ``quarter_head/`` after a ``heads=quarter`` one),
    and an interrupted one no folder that looks finished with the earlier manifest. Checkpoints, the training log and
    the reusable files stay: a resume needs them. A folder that holds none of these files itself is no run folder (a
    parent of runs): nothing is deleted."""
    out = Path(output_dir)
    if not any((out / name).is_file() for name in (*RUN_FILES, "manifest.json")):
        return []
    folders = [out, *sorted(p for p in out.iterdir() if p.is_dir())]
    removed = [f / name for f in folders for name in (*RUN_FILES, VAL_PREDICTIONS, SELECTION_FILE, "manifest.json")
               if (f / name).is_file()]
    for path in removed:
        path.unlink()
    return removed


def write_json(path: Path | str, data: dict[str, Any]) -> Path:
    """Write a dict as pretty JSON (NaN -> null, numpy scalars -> Python), atomically: into a temporary file
    beside ``path``, then renamed over it, so an interrupted write leaves the old file or none, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_json_safe(data), indent=2, sort_keys=False) + "\n"
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_outputs(output_dir: Path | str, predictions: pd.DataFrame, timings: dict[str, float],
                  extra_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``predictions.csv`` and ``metrics.json`` into ``output_dir``; return the metrics.

    ``timings`` must give ``train_seconds``, ``infer_seconds_per_image`` and ``peak_rss_mb``.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    missing = {"train_seconds", "infer_seconds_per_image", "peak_rss_mb"} - set(timings)
    if missing:
        raise ValueError(f"timings lack {sorted(missing)}")
    predictions.to_csv(out / "predictions.csv", index=False, float_format="%.4f")
    metrics = {**metrics_from_predictions(predictions), **timings, **(extra_metrics or {})}
    write_json(out / "metrics.json", metrics)
    return metrics


def write_val_predictions(output_dir: Path | str, val: Sequence[Sample],
                          pred_mm: Sequence[np.ndarray] | np.ndarray) -> Path:
    """Write a run's val-split predictions (world mm) as :data:`VAL_PREDICTIONS` in ``output_dir``, atomically."""
    path = Path(output_dir) / VAL_PREDICTIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        predictions_frame(val, pred_mm).to_csv(tmp, index=False, float_format="%.4f")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_run(run_dir: Path | str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read and validate one run folder; raise :class:`ContractError` naming the bad file."""
    run = Path(run_dir)
    pred_path, met_path = run / "predictions.csv", run / "metrics.json"
    for p in (pred_path, met_path):
        if not p.is_file():
            raise ContractError(f"{p}: missing")
    try:
        preds = pd.read_csv(pred_path, dtype={"image_id": str, "landmark": str})
    except Exception as exc:  # noqa: BLE001 - any parse failure is a contract failure
        raise ContractError(f"{pred_path}: unreadable CSV ({exc})") from exc
    lacking = [c for c in PREDICTION_COLUMNS if c not in preds.columns]
    if lacking:
        raise ContractError(f"{pred_path}: missing columns {lacking}")
    try:
        metrics = json.loads(met_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ContractError(f"{met_path}: invalid JSON ({exc})") from exc
    lacking = [k for k in METRIC_KEYS if k not in metrics]
    if lacking:
        raise ContractError(f"{met_path}: missing keys {lacking}")
    return preds, metrics


def read_stage_predictions(run_dir: Path | str, stages: Sequence[str]) -> dict[str, pd.DataFrame]:
    """``{stage: predictions}`` of a cascade's stage folders ``<run_dir>/<stage>/`` that hold a run, in the
    order of ``stages`` (each validated by :func:`read_run`; image ids stay strings, e.g. ``"001"``)."""
    run = Path(run_dir)
    return {stage: read_run(run / stage)[0] for stage in stages if (run / stage / "predictions.csv").is_file()}


def read_manifest(run_dir: Path | str) -> dict[str, Any] | None:
    """A run folder's ``manifest.json`` as a dict, None when absent; :class:`ContractError` when unreadable."""
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ContractError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ContractError(f"{path}: not a JSON object")
    return data
