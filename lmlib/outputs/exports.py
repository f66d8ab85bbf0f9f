"""Predictions for new images, written in the formats people annotate with (toward issue 13).

- :func:`prediction_table`: one row per (image, landmark): world mm ``(x, y[, z])`` (SimpleITK / LPS
  convention), the continuous pixel/voxel index ``(x, y[, z])`` on the image's own grid (0 = centre of
  the first pixel) and the method's confidence; NaN where a landmark was not predicted.
- :func:`write_labelme`: a labelme JSON per 2D image (one ``point`` shape per landmark, in labelme's
  pixel coordinates: the top-left *corner* of the image is (0, 0), i.e. index + 0.5), openable in
  labelme and read back by :func:`lmlib.data.readers.read_labelme`. labelme opens images with Pillow:
  for a format it cannot read (``.mha``, ``.nrrd``, ``.nii.gz``, DICOM) an 8-bit PNG of the image is
  written beside the JSON and named by its ``imagePath`` (labelme 5.2.1 failed "Failed opening image
  file" on an ``imagePath`` naming the ``.mha``).

Paths: ``imagePath`` in a labelme JSON is relative to the JSON's folder (labelme's convention);
``image_path`` in ``predictions.csv`` is the input image relative to the folder holding that file
(``relative_to``), so both resolve from the output folder wherever it is moved.
- :func:`write_slicer_markups`: a 3D Slicer ``.mrk.json`` point list per 3D image (``coordinateSystem``
  LPS, mm), read back by :func:`lmlib.data.readers.read_slicer_json`.

Coordinates are written with Python's shortest exact float repr, so a round trip through the readers
returns the same points (tested to 1e-6 mm).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lmlib.data.sample import Sample

SLICER_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
                 "Schema/markups-schema-v1.0.3.json#")
LABELME_VERSION = "5.2.1"
#: image suffixes labelme opens itself (Pillow); for any other a PNG is exported beside the JSON
LABELME_READABLE = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")


def _relative(path: str | Path, folder: str | Path | None) -> str:
    return str(path) if folder is None else os.path.relpath(Path(path).resolve(), Path(folder).resolve())


def prediction_table(samples: Sequence[Sample], world_mm: Sequence[np.ndarray], confidence: Sequence[np.ndarray],
                     image_paths: Sequence[str | Path | None] | None = None,
                     relative_to: str | Path | None = None) -> pd.DataFrame:
    """Long table of predictions: image, landmark, world mm, pixel/voxel index, confidence. ``image_path``:
    as given, or relative to ``relative_to`` (the folder the table is written to); empty for an image without
    a file (None: made in memory)."""
    rows = []
    for i, (s, w, c) in enumerate(zip(samples, world_mm, confidence)):
        w = np.asarray(w, dtype=np.float64).reshape(len(s.landmark_names), s.ndim)
        idx = s.geometry.world_to_index(w)
        given = image_paths[i] if image_paths else None
        file = _relative(given, relative_to) if given else ""
        for k, name in enumerate(s.landmark_names):
            row: dict[str, Any] = {"image_id": s.image_id, "image_path": file, "landmark": name}
            for a, axis in enumerate("xyz"):
                row[f"{axis}_mm"] = w[k, a] if a < s.ndim else np.nan
            for a, axis in enumerate("xyz"):
                row[f"{axis}_px"] = idx[k, a] if a < s.ndim else np.nan
            row["confidence"] = float(np.asarray(c, dtype=np.float64).reshape(-1)[k])
            rows.append(row)
    return pd.DataFrame(rows)


def write_labelme(sample: Sample, world_mm: np.ndarray, path: str | Path, image_path: str | Path | None = None) -> Path:
    """labelme JSON of a 2D image's predicted points (NaN points left out); ``image_path`` is stored
    relative to the JSON's folder (as labelme resolves it), or, for a format labelme cannot open or an image
    without a file (``image_path`` None: made in memory), an 8-bit PNG of the image is written beside the JSON
    (``<json stem>.png``) and named instead."""
    if sample.ndim != 2:
        raise ValueError(f"{sample.image_id}: labelme files hold 2D points; this image is {sample.ndim}D")
    out = Path(path)
    idx = sample.geometry.world_to_index(np.asarray(world_mm, dtype=np.float64).reshape(-1, 2))
    shapes: list[dict[str, Any]] = [
        {"label": name, "points": [[float(p[0] + 0.5), float(p[1] + 0.5)]], "group_id": None,
         "description": "", "shape_type": "point", "flags": {}}
        for name, p in zip(sample.landmark_names, idx) if np.isfinite(p).all()]
    out.parent.mkdir(parents=True, exist_ok=True)
    if image_path is None or not str(image_path).lower().endswith(LABELME_READABLE):
        rel = write_png(sample.image, out.with_name(f"{out.stem}.png")).name
    else:
        rel = _relative(image_path, out.parent)
    doc: dict[str, Any] = {"version": LABELME_VERSION, "flags": {}, "shapes": shapes, "imagePath": rel,
                           "imageData": None, "imageHeight": int(sample.size[1]), "imageWidth": int(sample.size[0])}
    out.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return out


def write_png(image: np.ndarray, path: Path, percentiles: tuple[float, float] = (0.5, 99.5)) -> Path:
    """An 8-bit grey PNG of a 2D image indexed ``(x, y)``, windowed to the given intensity percentiles (a
    viewing copy: the measurements stay on the original image)."""
    import SimpleITK as sitk

    pixels = np.asarray(image, dtype=np.float64).T  # (y, x) rows for the file
    lo, hi = np.percentile(pixels, percentiles)
    scaled = np.clip((pixels - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    sitk.WriteImage(sitk.GetImageFromArray(np.rint(255 * scaled).astype(np.uint8)), str(path))
    return path


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
