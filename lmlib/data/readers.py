"""Landmark and image readers: files in, plain typed records out (nothing resolved, nothing guessed).

Every landmark reader returns :class:`RawAnnotation` records. A label may occur several times
(``points[label]`` is a list) and absent labels are simply absent, so that duplicates and gaps
reach :mod:`lmlib.data.checks` intact. Points are ``(x, y[, z])`` rows, either

- ``units="index"``: continuous pixel/voxel index, 0 = centre of the first pixel (SimpleITK), or
- ``units="world"``: world millimetres in the ITK/SimpleITK **LPS** frame.

Pixel conventions per format (stated once, here):

- labelme: ``(x, y)`` are continuous coordinates with the top-left *corner* of the image at
  ``(0, 0)``, so ``index = xy - 0.5`` (``corner_origin=True``). Differences between two annotators
  are unaffected by this offset.
- all other pixel formats (CSV, ISBI txt, long CSV): integer-valued pixel positions, ``index = xy``.
- 3D Slicer markups: world mm in RAS or LPS (from the file header); RAS is converted to LPS by
  negating x and y.

Unreadable files raise ``FileNotFoundError`` / ``ValueError`` whose message starts with the path.
"""
from __future__ import annotations

import csv
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import SimpleITK as sitk

Units = Literal["index", "world"]
#: Image formats that carry no physical spacing (SimpleITK reports 1.0).
FORMATS_WITHOUT_SPACING: frozenset[str] = frozenset({".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".gif"})
#: Pixel spacing of the ISBI 2015 cephalometric challenge images (mm).
ISBI2015_SPACING_MM = 0.1


@dataclass
class RawAnnotation:
    """The landmarks of one image as written in one file.

    Attributes:
        image_id: id of the annotated image (file stem or the id column).
        points: label -> list of ``(D,)`` float arrays, ``(x, y[, z])``, in file order.
        units: ``"index"`` (pixel/voxel index, 0 = centre of the first pixel) or ``"world"`` (LPS mm).
        source: the annotation file.
        image_size: image size ``(x, y[, z])`` stated by the file, if any (checked against the image).
        spacing: pixel spacing (mm) stated by the format, if any (e.g. ISBI 2015: 0.1 mm).
        image_path: image named by the file, if any.
        meta: extra per-format information (e.g. Slicer descriptions, coordinate system).
    """

    image_id: str
    points: dict[str, list[np.ndarray]] = field(default_factory=dict)
    units: Units = "index"
    source: Path = Path()
    image_size: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    image_path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, label: str, point: Sequence[float]) -> None:
        """Append one point for ``label``."""
        self.points.setdefault(str(label), []).append(np.asarray(point, dtype=np.float64).reshape(-1))

    @property
    def labels(self) -> list[str]:
        """Labels present in the file (each once, file order)."""
        return list(self.points)


def _fail(path: Path, problem: str) -> ValueError:
    return ValueError(f"{path}: {problem}")


def _exists(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: file not found")
    return p


def _float(path: Path, value: str, where: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise _fail(path, f"{where}: {value!r} is not a number") from None


# --------------------------------------------------------------------------- labelme JSON
def _json_with_list(path: Path, key: str, kind: str) -> dict:
    """Parse a JSON object that must hold a list under ``key``; errors name the file."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(path, f"invalid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
        raise _fail(path, f"not a {kind} (no '{key}' list)")
    return doc


def read_labelme(path: str | Path, image_id: str | None = None, corner_origin: bool = True) -> RawAnnotation:
    """labelme JSON: every ``shape_type == "point"`` shape becomes a point of its ``label``.

    Coordinates are pixels ``(x, y)`` with the image's top-left corner at (0, 0); with
    ``corner_origin`` the returned index is ``xy - 0.5`` (pixel centres). Other shape types are
    listed in ``meta["ignored_shapes"]``. ``image_size`` is ``(imageWidth, imageHeight)``.
    """
    p = _exists(path)
    doc = _json_with_list(p, "shapes", "labelme file")
    ann = RawAnnotation(image_id or p.stem, units="index", source=p)
    ignored: list[str] = []
    for k, shape in enumerate(doc["shapes"]):
        kind = shape.get("shape_type", "point")
        if kind != "point":
            ignored.append(f"{shape.get('label')}:{kind}")
            continue
        pts = np.asarray(shape.get("points", []), dtype=np.float64)
        if pts.shape != (1, 2) or "label" not in shape:
            raise _fail(p, f"shape {k}: a point needs a label and one (x, y), got {shape.get('points')!r}")
        ann.add(str(shape["label"]), pts[0] - (0.5 if corner_origin else 0.0))
    w, h = doc.get("imageWidth"), doc.get("imageHeight")
    if w is not None and h is not None:
        ann.image_size = (int(w), int(h))
    if doc.get("imagePath"):
        ann.image_path = (p.parent / str(doc["imagePath"])).resolve()
    ann.meta["ignored_shapes"] = ignored
    return ann


# --------------------------------------------------------------------------- CSV formats
def _csv_rows(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        return [[c.strip() for c in row] for row in csv.reader(f) if row and any(c.strip() for c in row)]


def _add_xy(ann: RawAnnotation, path: Path, label: str, xs: str, ys: str, where: str) -> None:
    if xs == "" or ys == "" or xs.lower() == "nan" or ys.lower() == "nan":
        return  # an empty coordinate = label not given
    ann.add(label, [_float(path, xs, where), _float(path, ys, where)])


def read_landmark_csv(path: str | Path, labels: Sequence[str] | None = None) -> list[RawAnnotation]:
    """CSV ``image_name,image_width,image_height,n_landmarks,landmark_1_x,landmark_1_y,...`` (pixels).

    One record per row; ``image_id`` is the image name's stem; labels are ``landmark_<k>`` (k from 1)
    unless ``labels`` is given; empty coordinates mean "not given"; ``index = xy``.
    """
    p = _exists(path)
    rows = _csv_rows(p)
    if not rows or [c.lower() for c in rows[0][:4]] != ["image_name", "image_width", "image_height", "n_landmarks"]:
        raise _fail(p, "expected header image_name,image_width,image_height,n_landmarks,landmark_1_x,...")
    out = []
    for r, row in enumerate(rows[1:], start=2):
        n = int(_float(p, row[3], f"line {r} n_landmarks"))
        if len(row) < 4 + 2 * n:
            raise _fail(p, f"line {r}: n_landmarks={n} but {len(row) - 4} coordinate values")
        names = list(labels) if labels is not None else [f"landmark_{k + 1}" for k in range(n)]
        ann = RawAnnotation(Path(row[0]).stem, units="index", source=p, meta={"image_name": row[0]},
                            image_size=(int(_float(p, row[1], f"line {r}")), int(_float(p, row[2], f"line {r}"))))
        for k in range(n):
            _add_xy(ann, p, names[k], row[4 + 2 * k], row[5 + 2 * k], f"line {r}")
        out.append(ann)
    return out


def read_points_csv(path: str | Path, labels: Sequence[str] | None = None) -> list[RawAnnotation]:
    """CSV with one row per image ``id,x1,y1,x2,y2,...`` in pixels (hand X-ray layout; header optional).

    The spacing comes from the images (e.g. ``.mha`` headers), not from this file. Labels are
    ``"1".."N"`` unless given; ``index = xy``.
    """
    p = _exists(path)
    rows = _csv_rows(p)
    if rows and len(rows[0]) > 1:
        try:
            float(rows[0][1])
        except ValueError:
            rows = rows[1:]  # a header line
    out = []
    for r, row in enumerate(rows, start=1):
        if (len(row) - 1) % 2:
            raise _fail(p, f"row {r}: odd number of coordinate values ({len(row) - 1})")
        n = (len(row) - 1) // 2
        names = list(labels) if labels is not None else [str(k + 1) for k in range(n)]
        if len(names) < n:
            raise _fail(p, f"row {r}: {n} points but {len(names)} labels")
        ann = RawAnnotation(row[0], units="index", source=p)
        for k in range(n):
            _add_xy(ann, p, names[k], row[1 + 2 * k], row[2 + 2 * k], f"row {r}")
        out.append(ann)
    return out


def read_long_csv(path: str | Path, units: Literal["index", "pixel", "world"] = "index") -> list[RawAnnotation]:
    """Long CSV ``image,landmark,x,y[,z]``, one point per row (header required).

    ``units``: ``"index"``/``"pixel"`` (pixel index, ``index = xy``) or ``"world"`` (LPS mm).
    """
    if units not in ("index", "pixel", "world"):
        raise ValueError(f"units must be 'index', 'pixel' or 'world', got {units!r}")
    p = _exists(path)
    rows = _csv_rows(p)
    head = [c.lower() for c in rows[0]] if rows else []
    if head[:4] != ["image", "landmark", "x", "y"] or len(head) > 5 or (len(head) == 5 and head[4] != "z"):
        raise _fail(p, "expected header image,landmark,x,y[,z]")
    anns: dict[str, RawAnnotation] = {}
    for r, row in enumerate(rows[1:], start=2):
        if len(row) != len(head):
            raise _fail(p, f"line {r}: {len(row)} values, expected {len(head)}")
        if any(v == "" or v.lower() == "nan" for v in row[2:]):
            continue
        ann = anns.setdefault(row[0], RawAnnotation(row[0], units="world" if units == "world" else "index", source=p))
        ann.add(row[1], [_float(p, v, f"line {r}") for v in row[2:]])
    return list(anns.values())


# --------------------------------------------------------------------------- ISBI 2015 cephalometric
def read_isbi_txt(path: str | Path, n_landmarks: int = 19, labels: Sequence[str] | None = None) -> RawAnnotation:
    """ISBI 2015 annotation txt: the first ``n_landmarks`` lines are ``x,y`` pixels; later lines are
    ignored (the challenge files append classification values). Labels ``"1".."19"`` unless given;
    ``index = xy``; ``spacing = (0.1, 0.1)`` mm.
    """
    p = _exists(path)
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    if len(lines) < n_landmarks:
        raise _fail(p, f"expected {n_landmarks} 'x,y' lines, found {len(lines)}")
    names = list(labels) if labels is not None else [str(k + 1) for k in range(n_landmarks)]
    ann = RawAnnotation(p.stem, units="index", source=p, spacing=(ISBI2015_SPACING_MM,) * 2)
    for k in range(n_landmarks):
        vals = [v for v in re.split(r"[,\s]+", lines[k]) if v]
        if len(vals) != 2:
            raise _fail(p, f"line {k + 1}: expected 'x,y', got {lines[k]!r}")
        ann.add(names[k], [_float(p, v, f"line {k + 1}") for v in vals])
    return ann


def read_isbi2015(root: str | Path, annotator: str = "senior", n_landmarks: int = 19) -> list[RawAnnotation]:
    """All ``*.txt`` in the folder(s) under ``root`` whose name ends with ``annotator``
    (``AnnotationsByMD/400_senior``, ``400_junior``), or in ``root`` itself if none does."""
    r = _exists(root)
    dirs = sorted(d for d in r.rglob(f"*{annotator}") if d.is_dir()) or [r]
    return [read_isbi_txt(f, n_landmarks) for d in dirs for f in sorted(d.glob("*.txt"))]


# --------------------------------------------------------------------------- 3D Slicer markups
def _to_lps(xyz: np.ndarray, system: str) -> np.ndarray:
    return xyz * np.array([-1.0, -1.0, 1.0]) if system == "RAS" else xyz


def _coordinate_system(path: Path, value: str) -> str:
    v = value.strip().upper()
    system = {"0": "RAS", "1": "LPS", "RAS": "RAS", "LPS": "LPS"}.get(v)
    if system is None:
        raise _fail(path, f"unknown coordinate system {value!r} (expected RAS, LPS, 0 or 1)")
    return system


def read_slicer_fcsv(path: str | Path, image_id: str | None = None) -> RawAnnotation:
    """3D Slicer ``.fcsv`` markups: world mm, converted to LPS (``# CoordinateSystem`` = RAS/0 or
    LPS/1; RAS when absent, as in Slicer < 4.11). ``meta["descriptions"]``: label -> desc column."""
    p = _exists(path)
    system, columns = "RAS", ["id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc",
                              "associatedNodeID"]
    ann = RawAnnotation(image_id or p.name.split(".")[0], units="world", source=p, meta={"descriptions": {}})
    with p.open(newline="", encoding="utf-8") as f:
        lines = f.read().splitlines()
    for ln in lines:
        if ln.startswith("#"):
            key, _, value = ln.lstrip("#").partition("=")
            if key.strip().lower() == "coordinatesystem":
                system = _coordinate_system(p, value)
            elif key.strip().lower() == "columns":
                columns = [c.strip() for c in value.split(",")]
    col = {c: k for k, c in enumerate(columns)}
    if not {"x", "y", "z", "label"} <= col.keys():
        raise _fail(p, f"columns {columns} lack x, y, z or label")
    for r, row in enumerate(csv.reader(ln for ln in lines if ln.strip() and not ln.startswith("#")), start=1):
        if len(row) < len(columns) - 1:
            raise _fail(p, f"point {r}: {len(row)} values, expected {len(columns)}")
        label = row[col["label"]].strip() or row[col.get("id", 0)].strip()
        xyz = np.array([_float(p, row[col[a]], f"point {r} {a}") for a in "xyz"])
        ann.add(label, _to_lps(xyz, system))
        if "desc" in col and col["desc"] < len(row):
            ann.meta["descriptions"][label] = row[col["desc"]]
    ann.meta["coordinate_system"] = system
    return ann


def read_slicer_json(path: str | Path, image_id: str | None = None) -> RawAnnotation:
    """3D Slicer ``.mrk.json``: ``markups[].controlPoints[]`` (``label``, ``position``), converted
    from the markup's ``coordinateSystem`` (default LPS, Slicer >= 5) to LPS. Points whose
    ``positionStatus`` is ``missing``/``undefined`` are left out (= label not given)."""
    p = _exists(path)
    doc = _json_with_list(p, "markups", "Slicer markups file")
    ann = RawAnnotation(image_id or p.name.split(".")[0], units="world", source=p, meta={"descriptions": {}})
    for m in doc["markups"]:
        system = _coordinate_system(p, str(m.get("coordinateSystem", "LPS")))
        for k, cp in enumerate(m.get("controlPoints", [])):
            if cp.get("positionStatus", "defined") in ("missing", "undefined"):
                continue
            pos = np.asarray(cp.get("position", []), dtype=np.float64)
            if pos.shape != (3,):
                raise _fail(p, f"control point {k}: position {cp.get('position')!r} is not (x, y, z)")
            label = str(cp.get("label") or cp.get("id") or k + 1)
            ann.add(label, _to_lps(pos, system))
            ann.meta["descriptions"][label] = cp.get("description", "")
        ann.meta["coordinate_system"] = system
    return ann


def read_slicer_markups(path: str | Path, image_id: str | None = None) -> RawAnnotation:
    """``.fcsv`` or ``.json`` (``.mrk.json``) Slicer markups, chosen by file name."""
    name = Path(path).name.lower()
    if name.endswith(".fcsv"):
        return read_slicer_fcsv(path, image_id)
    if name.endswith(".json"):
        return read_slicer_json(path, image_id)
    raise _fail(Path(path), "not a Slicer markups file (.fcsv or .mrk.json)")


# --------------------------------------------------------------------------- images
def _to_gray(image: sitk.Image) -> sitk.Image:
    """RGB(A) -> luminance (ITU-R 601 weights, float32), or the exact first channel when R = G = B
    (grayscale stored as RGB, e.g. 24-bit BMP); other multi-component -> first component."""
    n = image.GetNumberOfComponentsPerPixel()
    if n == 1:
        return image
    arr = sitk.GetArrayViewFromImage(image)
    if n in (3, 4) and not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
        c = [sitk.Cast(sitk.VectorIndexSelectionCast(image, k), sitk.sitkFloat32) for k in range(3)]
        return c[0] * 0.299 + c[1] * 0.587 + c[2] * 0.114
    return sitk.VectorIndexSelectionCast(image, 0)


def read_image(path: str | Path, spacing_override: Sequence[float] | float | None = None,
               ndim: int | None = None) -> sitk.Image:
    """Read an image with SimpleITK: PNG/TIFF/BMP/JPEG, MHA/MHD, NIfTI, NRRD, or a DICOM series
    (``path`` a directory; the first series found). RGB(A) becomes grayscale. ``spacing_override``
    (mm, ``(x, y[, z])`` or one number) replaces the spacing (needed for formats that carry none).
    ``ndim=2`` drops a trailing axis of size 1 (single-slice 3D files)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: image file or DICOM directory not found")
    try:
        if p.is_dir():
            reader = sitk.ImageSeriesReader()
            ids = reader.GetGDCMSeriesIDs(str(p))
            if not ids:
                raise _fail(p, "no DICOM series in this directory")
            if len(ids) > 1:
                warnings.warn(f"{p}: {len(ids)} DICOM series, reading the first ({ids[0]})", stacklevel=2)
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(p), ids[0]))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(p))
    except RuntimeError as e:
        msg = str(e).strip().splitlines()
        raise _fail(p, f"cannot read image ({msg[-1] if msg else 'unknown error'})") from None
    image = _to_gray(image)
    if ndim == 2 and image.GetDimension() == 3 and image.GetSize()[2] == 1:
        image = image[:, :, 0]
    if spacing_override is not None:
        s = np.broadcast_to(np.asarray(spacing_override, dtype=np.float64), (image.GetDimension(),))
        image.SetSpacing([float(v) for v in s])
    return image


def read_image_info(path: str | Path) -> tuple[tuple[int, ...], np.ndarray, np.ndarray, np.ndarray]:
    """Size ``(x, y[, z])``, spacing, origin and direction ``(D, D)`` from the header only (no pixels).
    A DICOM directory is read in full."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: image file or DICOM directory not found")
    if p.is_dir():
        img = read_image(p)
        size, sp, org, dr = img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()
    else:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            msg = str(e).strip().splitlines()
            raise _fail(p, f"cannot read image header ({msg[-1] if msg else 'unknown error'})") from None
        size, sp, org, dr = reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()
    d = len(size)
    return tuple(int(s) for s in size), np.array(sp), np.array(org), np.array(dr).reshape(d, d)


#: Reader name -> function, as named in :class:`lmlib.data.datasets.DatasetSpec`.
READERS: dict[str, Any] = {
    "labelme": read_labelme,
    "landmark_csv": read_landmark_csv,
    "points_csv": read_points_csv,
    "long_csv": read_long_csv,
    "isbi_txt": read_isbi_txt,
    "isbi2015": read_isbi2015,
    "slicer": read_slicer_markups,
    "fcsv": read_slicer_fcsv,
    "mrk_json": read_slicer_json,
}
