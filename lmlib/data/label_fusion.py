"""Training labels from several annotators (a run's ``train_labels``).

A data set with two or more annotators (hamedan-ceph) is scored against its reference annotator. Its training
images may still learn from every annotator's points:

- ``"reference"`` (default): the reference annotator's points, as everywhere else;
- ``"mean"``: each training landmark is the mean of the points every annotator gave it (those given);
- ``"mean_aligned"``: the same after each other annotator's points are shifted by their mean offset to the
  reference's, per landmark, over the training images both annotated. The averaging then halves the
  placement noise without moving the target towards another annotator's convention (a landmark an annotator
  places 0.5 mm lower on average is moved back first).

Only the ``train`` split changes: ``val`` (model selection) and ``test`` (scoring) keep the reference's points.
A landmark the reference masked but another annotator gave becomes a training point; one no annotator gave stays
masked. Points and offsets are world mm ``(x, y[, z])``; offsets need the training images to share one
orientation (their ``direction``), checked, since a world offset means nothing across orientations.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pandas as pd

from lmlib.data.datasets import Dataset, paired_landmarks

TRAIN_LABELS: tuple[str, ...] = ("reference", "mean", "mean_aligned")


def _offset_columns(ndim: int) -> list[str]:
    """The offset table's columns, one per world axis: ``dx_mm``, ``dy_mm`` [, ``dz_mm``]."""
    return [f"d{axis}_mm" for axis in "xyz"[:ndim]]


def annotator_offsets(reference: Dataset, other: Dataset) -> pd.DataFrame:
    """Per landmark, the mean world offset (mm) from ``other``'s points to ``reference``'s over the training
    images both annotated: columns ``landmark``, ``n_images``, one ``d<axis>_mm`` per axis and ``norm_mm``
    (NaN where no training image has both points)."""
    train = [replace(d, samples=d.split("train")) for d in (reference, other)]
    mine, theirs, _ = paired_landmarks(*train)
    diff = mine - theirs  # (K, N, D), NaN wherever either point is masked
    n = np.isfinite(diff).all(axis=2).sum(axis=0)
    with warnings.catch_warnings():  # a landmark no image pairs: NaN, said in the docstring
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(diff, axis=0) if len(diff) else np.full(diff.shape[1:], np.nan)
    table = pd.DataFrame({"landmark": reference.landmark_names, "n_images": n})
    for axis, column in enumerate(_offset_columns(reference.spec.ndim)):
        table[column] = mean[:, axis]
    table["norm_mm"] = np.linalg.norm(mean, axis=1)
    return table


def _check_orientation(data: Dataset) -> None:
    directions = {tuple(np.round(np.asarray(s.geometry.direction, dtype=float).ravel(), 6))
                  for s in data.split("train")}
    if len(directions) > 1:
        raise ValueError(f"{data.spec.name}: train_labels='mean_aligned' needs the training images to share one "
                         f"orientation (a world offset per landmark); they have {len(directions)} directions")


def fuse_training_labels(reference: Dataset, others: Sequence[Dataset], mode: str
                         ) -> tuple[Dataset, dict[str, pd.DataFrame]]:
    """``reference`` with its ``train`` samples' landmarks replaced as ``mode`` says (module docstring), and the
    offsets applied per other annotator (empty unless ``"mean_aligned"``). ``others``: the same data set read
    for each other annotator (``load_dataset(..., annotator=...)``, images need not be loaded)."""
    if mode not in TRAIN_LABELS:
        raise ValueError(f"train_labels must be one of {TRAIN_LABELS}, got {mode!r}")
    if mode == "reference":
        return reference, {}
    if not others:
        raise ValueError(f"{reference.spec.name}: train_labels={mode!r} needs a second annotator; the data set "
                         f"declares only {list(reference.spec.annotations) or ['its own landmarks']}")
    offsets: dict[str, pd.DataFrame] = {}
    if mode == "mean_aligned":
        _check_orientation(reference)
        offsets = {str(o.annotator): annotator_offsets(reference, o) for o in others}
    by_id = [{s.image_id: s for s in o.split("train")} for o in others]
    samples = []
    for s in reference.samples:
        if s.meta.get("split") != "train":
            samples.append(s)
            continue
        points = [s.landmarks_mm]
        for o, ids in zip(others, by_id):
            if s.image_id not in ids:
                continue
            p = ids[s.image_id].landmarks_mm
            if mode == "mean_aligned":  # an offset without a pair to estimate it from (NaN) drops that point
                p = p + offsets[str(o.annotator)][_offset_columns(reference.spec.ndim)].to_numpy()
            points.append(p)
        stack = np.stack(points)  # NaN where an annotator did not give the point
        given = np.isfinite(stack).all(axis=2)
        with warnings.catch_warnings():  # a landmark nobody gave stays NaN (masked)
            warnings.simplefilter("ignore", RuntimeWarning)
            fused = np.nanmean(stack, axis=0)
        valid = given.any(axis=0)
        meta = {**s.meta, "train_labels": mode, "n_annotators": given.sum(axis=0).tolist()}
        samples.append(replace(s, landmarks_mm=fused, valid=valid, meta=meta))
    return replace(reference, samples=samples), offsets


def describe_fusion(data: Dataset, mode: str, offsets: dict[str, pd.DataFrame]) -> str:
    """One readable line on what ``mode`` made of the training labels (how many annotators per point; the
    offsets' mean and largest, mm)."""
    train = data.split("train")
    counts = np.concatenate([np.asarray(s.meta.get("n_annotators", []), dtype=int) for s in train]) \
        if train else np.zeros(0, dtype=int)
    line = (f"train_labels={mode}: {len(train)} training images, mean of {counts.mean():.2f} annotators per "
            f"landmark" if counts.size else f"train_labels={mode}: no training images")
    for who, table in offsets.items():
        worst = table.loc[table["norm_mm"].idxmax()] if table["norm_mm"].notna().any() else None
        line += (f"; {who} shifted by its mean offset to {data.annotator}: {table['norm_mm'].mean():.2f} mm on "
                 f"average" + (f", largest {worst['landmark']} {worst['norm_mm']:.2f} mm" if worst is not None
                               else ""))
    return line
