"""Predictions for new images, written in the formats people annotate with (toward issue 13).

- :func:`prediction_table`: one row per (image, landmark): world mm ``(x, y[, z])`` (SimpleITK / LPS
  convention), the continuous pixel/voxel index ``(x, y[, z])`` on the image's own grid (0 = centre of
  the first pixel) and the method's confidence; NaN where a landmark was not predicted.
- :func:`write_labelme`: a labelme JSON per 2D image (one ``point`` shape per landmark, in labelme's
  pixel coordinates: the top-left *corner* of the image is (0, 0), i.e. index + 0.5), openable in
  labelme next to the image and read back by :func:`lmlib.data.readers.read_labelme`.
- :func:`write_slicer_markups`: a 3D Slicer ``.mrk.json`` point list per 3D image (``coordinateSystem``
  LPS, mm), read back by :func:`lmlib.data.readers.read_slicer_json`.

Coordinates are written with Python's shortest exact float repr, so a round trip through the readers
returns the same points (tested to 1e-6 mm).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from lmlib.data.sample import Sample

SLICER_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
                 "Schema/markups-schema-v1.0.3.json#")
LABELME_VERSION = "5.2.1"


def prediction_table(samples: Sequence[Sample], world_mm: Sequence[np.ndarray], confidence: Sequence[np.ndarray],
                     image_paths: Sequence[str | Path] | None = None) -> pd.DataFrame:
    """Long table of predictions: image, landmark, world mm, pixel/voxel index, confidence."""
    rows = []
    for i, (s, w, c) in enumerate(zip(samples, world_mm, confidence)):
        w = np.asarray(w, dtype=np.float64).reshape(len(s.landmark_names), s.ndim)
        idx = s.geometry.world_to_index(w)
        for k, name in enumerate(s.landmark_names):
            row = {"image_id": s.image_id, "image_path": str(image_paths[i]) if image_paths else "",
                   "landmark": name}
            for a, axis in enumerate("xyz"):
                row[f"{axis}_mm"] = w[k, a] if a < s.ndim else np.nan
            for a, axis in enumerate("xyz"):
                row[f"{axis}_px"] = idx[k, a] if a < s.ndim else np.nan
            row["confidence"] = float(np.asarray(c, dtype=np.float64).reshape(-1)[k])
            rows.append(row)
    return pd.DataFrame(rows)


def write_labelme(sample: Sample, world_mm: np.ndarray, path: str | Path, image_path: str | Path | None = None) -> Path:
    """labelme JSON of a 2D image's predicted points (NaN points left out); ``image_path`` is stored
    relative to the JSON's folder (as labelme resolves it)."""
    if sample.ndim != 2:
        raise ValueError(f"{sample.image_id}: labelme files hold 2D points; this image is {sample.ndim}D")
    out = Path(path)
    idx = sample.geometry.world_to_index(np.asarray(world_mm, dtype=np.float64).reshape(-1, 2))
    shapes = [{"label": name, "points": [[float(p[0] + 0.5), float(p[1] + 0.5)]], "group_id": None,
               "description": "", "shape_type": "point", "flags": {}}
              for name, p in zip(sample.landmark_names, idx) if np.isfinite(p).all()]
    rel = "" if image_path is None else os.path.relpath(Path(image_path).resolve(), out.parent.resolve())
    doc = {"version": LABELME_VERSION, "flags": {}, "shapes": shapes, "imagePath": rel, "imageData": None,
           "imageHeight": int(sample.size[1]), "imageWidth": int(sample.size[0])}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return out


def write_slicer_markups(sample: Sample, world_mm: np.ndarray, path: str | Path) -> Path:
    """3D Slicer ``.mrk.json`` point list (LPS mm) of a 3D image's predicted points; NaN points are
    written with ``positionStatus: missing`` (Slicer shows them as unplaced)."""
    if sample.ndim != 3:
        raise ValueError(f"{sample.image_id}: Slicer markups hold 3D points; this image is {sample.ndim}D")
    out = Path(path)
    w = np.asarray(world_mm, dtype=np.float64).reshape(-1, 3)
    points = []
    for k, (name, p) in enumerate(zip(sample.landmark_names, w)):
        ok = bool(np.isfinite(p).all())
        points.append({"id": str(k + 1), "label": name, "description": "", "associatedNodeID": "",
                       "position": [float(v) for v in p] if ok else [0.0, 0.0, 0.0],
                       "orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0], "selected": True,
                       "locked": False, "visibility": True, "positionStatus": "defined" if ok else "missing"})
    doc = {"@schema": SLICER_SCHEMA, "markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm",
                                                   "locked": False, "labelFormat": "%N-%d", "controlPoints": points}]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return out
