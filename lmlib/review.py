"""Review and correct predicted landmarks: the records behind the review step of notebook 80.

A :class:`ReviewSession` opens a prediction folder written by :mod:`lmlib.predict` with ``--regions`` and
``--review-mm``, and steps through its review list, largest calibrated region first. Each flagged landmark is
accepted or moved to its right place (world mm, ``(x, y[, z])``). Every decision is appended to
``<folder>/reviewed/decisions.csv`` and flushed to disk at once, and the image's annotation file is rewritten
(atomically) in the format people annotate with: a labelme JSON per 2D image, a 3D Slicer ``.mrk.json`` per 3D
image, holding the reviewed points and, for the landmarks nobody was asked to review, the predictions. Nothing is
lost when the kernel dies mid-review; a new session on the same folder resumes with the first undecided landmark.

:meth:`ReviewSession.write_dataset` makes ``reviewed/`` a data set of its own: the images (linked, or copied
where links are not possible), their annotation files of the annotator ``reviewed`` and a declaration
``reviewed/dataset.yaml`` (:mod:`lmlib.data.dataset_spec`), so the reviewed images train like any declared data
set (``python -m lmlib.run --dataset <folder>/reviewed/dataset.yaml``).
"""
from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from lmlib.data.sample import Sample
from lmlib.outputs.exports import write_labelme, write_slicer_markups
from lmlib.predict import load_images

REVIEWER = "reviewed"  # the annotator name of the reviewed points
DECISIONS = ("accepted", "corrected")
LOG_COLUMNS = ("image_id", "landmark", "decision", "x_mm", "y_mm", "z_mm")
AXES = ("x_mm", "y_mm", "z_mm")


@dataclass(frozen=True)
class ReviewItem:
    """One flagged landmark: its image, name, predicted position (world mm) and calibrated region radius (mm)."""

    image_id: str
    landmark: str
    predicted_mm: tuple[float, ...]
    region_mm: float


class ReviewSession:
    """The review list of prediction folder ``folder`` (see the module docstring). ``spacing_mm``: the spacing
    given to ``lmlib.predict --spacing`` for images whose format stores none (PNG, JPEG, ...)."""

    def __init__(self, folder: str | Path, spacing_mm: list[float] | None = None) -> None:
        self.folder = Path(folder)
        table_path = self.folder / "predictions.csv"
        if not table_path.is_file():
            raise FileNotFoundError(f"{self.folder}: no predictions.csv (a folder written by python -m lmlib.predict)")
        self.table = pd.read_csv(table_path, dtype={"image_id": str})
        if "review" not in self.table:
            raise ValueError(f"{table_path}: no review column; predict with --regions 0.9 0.95 --review-mm MM to get "
                             "a review list")
        regions = sorted((c for c in self.table if c.startswith("region_") and c.endswith("_mm")),
                         key=lambda c: float(c[len("region_"):-len("_mm")]))
        self.region_column = regions[-1]
        self.ndim = 3 if self.table["z_mm"].notna().any() else 2
        self.landmark_names = list(dict.fromkeys(self.table["landmark"]))
        self.spacing_mm = spacing_mm
        self.out = self.folder / REVIEWER
        self.log_path = self.out / "decisions.csv"
        self._samples: dict[str, Sample] = {}
        self.decisions = self._read_log()

    # ---- the list
    @property
    def flagged(self) -> list[ReviewItem]:
        """Every flagged landmark, largest region first (ties: image, then landmark order)."""
        rows = self.table[self.table["review"].astype(bool)]
        rows = rows.assign(_order=range(len(rows))).sort_values([self.region_column, "_order"],
                                                                 ascending=[False, True], kind="stable")
        return [ReviewItem(r.image_id, r.landmark, tuple(float(getattr(r, a)) for a in AXES[:self.ndim]),
                           float(getattr(r, self.region_column))) for r in rows.itertuples()]

    @property
    def pending(self) -> list[ReviewItem]:
        """The flagged landmarks not decided yet, in review order."""
        return [i for i in self.flagged if (i.image_id, i.landmark) not in self.decisions]

    # ---- decisions
    def accept(self, item: ReviewItem) -> Path:
        """Keep the prediction of ``item``; returns the image's rewritten annotation file."""
        return self._decide(item, "accepted", item.predicted_mm)

    def correct(self, item: ReviewItem, world_mm: tuple[float, ...] | list[float] | np.ndarray) -> Path:
        """Move ``item`` to ``world_mm`` (``(x, y[, z])``, mm); returns the image's rewritten annotation file."""
        point = np.asarray(world_mm, dtype=np.float64).reshape(-1)
        if point.shape != (self.ndim,) or not np.isfinite(point).all():
            raise ValueError(f"{item.image_id}/{item.landmark}: a correction is {self.ndim} finite world "
                             f"coordinates in mm, got {list(np.asarray(world_mm).reshape(-1))}")
        return self._decide(item, "corrected", tuple(float(v) for v in point))

    def _decide(self, item: ReviewItem, decision: str, world_mm: tuple[float, ...]) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        new = not self.log_path.exists()
        with open(self.log_path, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(LOG_COLUMNS)
            writer.writerow([item.image_id, item.landmark, decision,
                             *(repr(v) for v in world_mm), *([""] * (3 - len(world_mm)))])
            f.flush()
            os.fsync(f.fileno())  # written at once: a kernel that dies next loses nothing decided
        self.decisions[(item.image_id, item.landmark)] = (decision, world_mm)
        return self._write_image(item.image_id)

    def _read_log(self) -> dict[tuple[str, str], tuple[str, tuple[float, ...]]]:
        if not self.log_path.exists():
            return {}
        log = pd.read_csv(self.log_path, dtype={"image_id": str, "landmark": str})
        out = {}
        for r in log.itertuples():  # the last decision on a landmark counts
            if r.decision not in DECISIONS:
                raise ValueError(f"{self.log_path}: line {r.Index + 2}: decision {r.decision!r} is not one of "
                                 f"{DECISIONS}")
            out[(r.image_id, r.landmark)] = (r.decision, tuple(float(getattr(r, a)) for a in AXES[:self.ndim]))
        return out

    # ---- files
    def points(self, image_id: str) -> np.ndarray:
        """The image's points ``(K, D)`` in world mm: the decided ones as decided, the others as predicted."""
        rows = self.table[self.table["image_id"] == image_id].set_index("landmark").loc[self.landmark_names]
        pts = rows[list(AXES[:self.ndim])].to_numpy(dtype=np.float64)
        for k, name in enumerate(self.landmark_names):
            if (image_id, name) in self.decisions:
                pts[k] = self.decisions[(image_id, name)][1]
        return pts

    def image_path(self, image_id: str) -> Path:
        """The image file predicted (``image_path`` of predictions.csv is relative to the folder)."""
        rel = self.table.loc[self.table["image_id"] == image_id, "image_path"].iloc[0]
        if not isinstance(rel, str) or not rel:  # empty (read as NaN): an image made in memory
            raise FileNotFoundError(f"{image_id}: {self.folder / 'predictions.csv'} names no image file for it (an "
                                    "image made in memory: a phantom, a deformed or posed copy)")
        path = (self.folder / rel).resolve()
        if not path.exists():
            raise FileNotFoundError(f"{path}: the image of {image_id} named in {self.folder / 'predictions.csv'} "
                                    "is not there (moved?)")
        return path

    def sample(self, image_id: str) -> Sample:
        """The image as read for prediction (geometry in world mm), cached."""
        if image_id not in self._samples:
            self._samples[image_id] = load_images([self.image_path(image_id)], self.landmark_names, self.ndim,
                                                  self.spacing_mm)[0]
        return self._samples[image_id]

    def annotation_path(self, image_id: str) -> Path:
        return self.out / "annotations" / f"{image_id}{'.json' if self.ndim == 2 else '.mrk.json'}"

    def _write_image(self, image_id: str) -> Path:
        """Rewrite the image's annotation file: written into a hidden folder, then renamed into place (a labelme
        JSON last, after the PNG it may name), so it is never half-written."""
        path = self.annotation_path(image_id)
        partial = self.out / ".partial"  # beside annotations/: relative image paths stay valid after the move
        partial.mkdir(parents=True, exist_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        sample, points = self.sample(image_id), self.points(image_id)
        if self.ndim == 2:
            write_labelme(sample, points, partial / path.name, self.out / "images" / self.image_path(image_id).name)
        else:
            write_slicer_markups(sample, points, partial / path.name)
        for f in sorted(partial.iterdir(), key=lambda f: f.name == path.name):
            os.replace(f, path.parent / f.name)
        return path

    def write_dataset(self) -> Path:
        """``reviewed/`` as a declared data set: every predicted image (linked, else copied) with its annotation
        file (reviewed points, predictions elsewhere) and ``dataset.yaml``; returns the declaration's path."""
        images = self.out / "images"
        images.mkdir(parents=True, exist_ok=True)
        for image_id in dict.fromkeys(self.table["image_id"]):
            source = self.image_path(image_id)
            target = images / source.name
            if not target.exists():
                try:
                    target.symlink_to(source, target_is_directory=source.is_dir())
                except OSError:  # no links on this file system: a copy
                    (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
            self._write_image(image_id)
        declaration: dict[str, Any] = {
            "name": f"{self.folder.name}-{REVIEWER}",
            "description": f"images predicted into {self.folder.name}, flagged landmarks reviewed "
                           f"({sum(1 for d, _ in self.decisions.values() if d == 'corrected')} corrected, "
                           f"{sum(1 for d, _ in self.decisions.values() if d == 'accepted')} accepted); "
                           "the other landmarks are predictions",
            "ndim": self.ndim, "images": "images/*", "reader": "labelme" if self.ndim == 2 else "mrk_json",
            "annotations": {REVIEWER: f"annotations/{{image_id}}{'.json' if self.ndim == 2 else '.mrk.json'}"},
            "landmarks": self.landmark_names}
        if self.spacing_mm is not None:
            declaration["spacing_mm"] = [float(v) for v in np.broadcast_to(self.spacing_mm, (self.ndim,))]
        path = self.out / "dataset.yaml"
        tmp = path.with_name(".dataset.yaml.tmp")
        tmp.write_text("# written by lmlib.review.ReviewSession.write_dataset\n"
                       + yaml.safe_dump(declaration, sort_keys=False, allow_unicode=True), encoding="utf-8")
        os.replace(tmp, path)
        return path
