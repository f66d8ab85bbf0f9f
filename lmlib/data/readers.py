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

Unreadable or malformed files raise ``FileNotFoundError`` / ``ValueError`` whose message starts with
the path, then names where (CSV/text: ``line N`` of the file, with the column where there is one;
labelme: ``shape K ('label')``; Slicer JSON: ``control point K ('label')``) and the problem: a value
that is not a number, a row with too few cells, a point that is not one ``(x, y[, z])``, an image
header whose spacing is not positive or whose origin/direction is not finite. Values that *are*
numbers but not usable points (NaN, null, inf, far outside the image) and non-point shapes are not
errors here: they reach :mod:`lmlib.data.checks`, which masks and reports them.
"""
from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

Units = Literal["index", "world"]
#: Image formats that carry no physical spacing: read at 1.0 (a pixel) unless a spacing is given. ITK turns the
#: resolution tag of a TIFF or JPEG (dots per inch, 72 by default in many programs) into a spacing; it says how a
#: page prints, not how large the anatomy is, so it is not used.
FORMATS_WITHOUT_SPACING: frozenset[str] = frozenset({".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".gif"})
#: DICOM attributes that give the pixel spacing (Pixel Spacing, Imager Pixel Spacing, Nominal Scanned Pixel
#: Spacing). Without any of them GDCM reports 1.0 mm (a secondary-capture cephalogram, a scanned film).
DICOM_SPACING_TAGS: tuple[str, ...] = ("0028|0030", "0018|1164", "0018|2010")
#: How DICOM files are named (often with no suffix at all: IM0001)
DICOM_SUFFIXES: frozenset[str] = frozenset({"", ".dcm", ".dicom", ".ima"})


def stores_no_spacing(path: str | Path) -> bool:
    """Whether the image at ``path`` stores no pixel spacing: a file in one of :data:`FORMATS_WITHOUT_SPACING`, or
    a DICOM file (or series folder) without any of :data:`DICOM_SPACING_TAGS`."""
    p = Path(path)
    if p.is_dir() or p.suffix.lower() in DICOM_SUFFIXES:
        return _dicom_without_spacing(p)
    return p.suffix.lower() in FORMATS_WITHOUT_SPACING


def no_spacing_kind(path: str | Path) -> str:
    """An image that stores no spacing, in words: ``a .png file``, or ``a DICOM without a pixel-spacing attribute``."""
    p = Path(path)
    return f"a {p.suffix} file" if p.suffix.lower() in FORMATS_WITHOUT_SPACING else \
        "a DICOM without a pixel-spacing attribute"


def _dicom_without_spacing(path: Path) -> bool:
    """A DICOM file, or a folder's first DICOM file, without a pixel-spacing attribute at its top level and read at
    GDCM's fallback of 1.0 (an enhanced multi-frame file keeps its spacing in a functional group, which GDCM
    reads); False where no file reads as DICOM (reading the image then names the problem)."""
    files = sorted(q for q in path.iterdir() if q.is_file())[:8] if path.is_dir() else [path]
    for file in files:  # a folder's first readable file: a header only, not a scan of the series
        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")  # a file GDCM cannot read is no DICOM
        reader.SetFileName(str(file))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            continue
        return not any(reader.HasMetaDataKey(k) for k in DICOM_SPACING_TAGS) and \
            all(v == 1.0 for v in reader.GetSpacing()[:2])
    return False


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
        other_shapes: label -> descriptions of shapes that are not points (labelme polygons, lines,
            rectangles, ...), e.g. ``"shape 3: polygon"``; reported by the checks, never used as points.
        meta: extra per-format information (e.g. Slicer descriptions, coordinate system, ``line``:
            the line of a one-row-per-image CSV record).
    """

    image_id: str
    points: dict[str, list[np.ndarray]] = field(default_factory=dict)
    units: Units = "index"
    source: Path = Path()
    image_size: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    image_path: Path | None = None
    other_shapes: dict[str, list[str]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, label: str, point: Sequence[float] | np.ndarray) -> None:
        """Append one point for ``label``."""
        self.points.setdefault(str(label), []).append(np.asarray(point, dtype=np.float64).reshape(-1))

    @property
    def labels(self) -> list[str]:
        """Labels present in the file (each once, file order)."""
        return list(self.points)


def _fail(path: Path, problem: str) -> ValueError:
    return ValueError(f"{path}: {problem}")


def read_text(path: str | Path) -> str:
    """A text file's content (UTF-8; a byte-order mark is dropped). A file in another encoding (a CSV saved by
    Excel in cp1252, a YAML with an accented name) raises ``ValueError`` naming the file and the first bad byte."""
    p = Path(path)
    data = p.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise _fail(p, f"not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); save it as UTF-8") from None


def _exists(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: file not found")
    return p


def _float(path: Path, value: Any, where: str) -> float:
    """``float(value)``; otherwise an error naming the file, ``where`` and the value. NaN/inf pass
    (the checks mask and report them)."""
    if isinstance(value, bool):
        raise _fail(path, f"{where}: {value!r} is not a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _fail(path, f"{where}: {value!r} is not a number") from None


def _int(path: Path, value: Any, where: str, minimum: int = 0) -> int:
    """An integer-valued cell (``"40"``, ``"40.0"``, ``40``) >= ``minimum``; otherwise an error naming it."""
    kind = "a positive integer" if minimum == 1 else "a non-negative integer" if minimum == 0 else "an integer"
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if isinstance(value, bool) or not np.isfinite(v) or v != int(v) or v < minimum:
        raise _fail(path, f"{where}: {value!r} is not {kind}")
    return int(v)


def _point(path: Path, values: Any, d: int, where: str) -> np.ndarray:
    """One JSON point of ``d`` numbers; ``null`` becomes NaN (masked and reported by the checks)."""
    axes = "xyz"[:d]
    if not isinstance(values, (list, tuple)) or len(values) != d:
        raise _fail(path, f"{where}: {values!r} is not ({', '.join(axes)})")
    return np.array([np.nan if v is None else _float(path, v, f"{where}: {a}") for a, v in zip(axes, values)])


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
    ``corner_origin`` the returned index is ``xy - 0.5`` (pixel centres). Other shape types
    (polygon, line, rectangle, ...) go to ``other_shapes`` (reported by the checks). ``null``
    coordinates become NaN (masked and reported by the checks). ``image_size`` is
    ``(imageWidth, imageHeight)``. Errors name the shape (``shape K ('label')``) and the problem.
    """
    p = _exists(path)
    doc = _json_with_list(p, "shapes", "labelme file")
    ann = RawAnnotation(image_id or p.stem, units="index", source=p)
    for k, shape in enumerate(doc["shapes"]):
        if not isinstance(shape, dict):
            raise _fail(p, f"shape {k}: not a JSON object ({shape!r})")
        label = shape.get("label")
        where = f"shape {k} ({label!r})" if label is not None else f"shape {k}"
        kind = shape.get("shape_type") or "point"
        if label is None or str(label) == "":
            raise _fail(p, f"{where}: {kind} shape with no label")
        if kind != "point":
            ann.other_shapes.setdefault(str(label), []).append(f"shape {k}: {kind}")
            continue
        pts = shape.get("points")
        if not isinstance(pts, list) or len(pts) != 1 or not isinstance(pts[0], list) or len(pts[0]) != 2:
            raise _fail(p, f"{where}: a point needs exactly one (x, y), got {pts!r}")
        ann.add(str(label), _point(p, pts[0], 2, where) - (0.5 if corner_origin else 0.0))
    w, h = doc.get("imageWidth"), doc.get("imageHeight")
    if w is not None and h is not None:
        ann.image_size = (_int(p, w, "imageWidth", 1), _int(p, h, "imageHeight", 1))
    if doc.get("imagePath"):
        ann.image_path = (p.parent / str(doc["imagePath"])).resolve()
    return ann


# --------------------------------------------------------------------------- CSV formats
def _csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """Non-blank rows with their line number in the file (stripped cells)."""
    out = []
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    for row in reader:
        if row and any(c.strip() for c in row):
            out.append((reader.line_num, [c.strip() for c in row]))
    return out


def _not_given(value: str) -> bool:
    return value == "" or value.lower() == "nan"


def _cells_to_point(path: Path, cells: Sequence[str], axes: str, where: str) -> np.ndarray | None:
    """``None`` when every cell is empty/``nan`` (= label not given; reported as missing); otherwise the
    point, an empty cell beside numbers becoming NaN and ``inf`` kept (both masked and reported by the
    checks as non-finite). ``where`` names the cell, with ``{axis}`` for the axis."""
    if all(_not_given(c) for c in cells):
        return None
    return np.array([np.nan if c == "" else _float(path, c, where.format(axis=a)) for a, c in zip(axes, cells)])


def _add_xy(ann: RawAnnotation, path: Path, label: str, xs: str, ys: str, where: str) -> None:
    """Add ``(x, y)`` from two cells (see :func:`_cells_to_point`)."""
    point = _cells_to_point(path, [xs, ys], "xy", where)
    if point is not None:
        ann.add(label, point)


def read_landmark_csv(path: str | Path, labels: Sequence[str] | None = None) -> list[RawAnnotation]:
    """CSV ``image_name,image_width,image_height,n_landmarks,landmark_1_x,landmark_1_y,...`` (pixels).

    One record per row (``meta["line"]``: its line; an image on several rows is kept several times
    for the checks); ``image_id`` is the image name's stem; labels are ``landmark_<k>`` (k from 1)
    unless ``labels`` is given; empty coordinates mean "not given"; ``index = xy``.
    """
    p = _exists(path)
    rows = _csv_rows(p)
    if not rows or [c.lower() for c in rows[0][1][:4]] != ["image_name", "image_width", "image_height", "n_landmarks"]:
        raise _fail(p, "expected header image_name,image_width,image_height,n_landmarks,landmark_1_x,...")
    out = []
    for r, row in rows[1:]:
        if len(row) < 4:
            raise _fail(p, f"line {r}: {len(row)} cells, expected at least 4 "
                           "(image_name,image_width,image_height,n_landmarks)")
        n = _int(p, row[3], f"line {r}: n_landmarks")
        values = row[4:4 + 2 * n]
        if len(values) < 2 * n:
            raise _fail(p, f"line {r}: n_landmarks={n} but {len(values)} coordinate values")
        if any(c != "" for c in row[4 + 2 * n:]):
            raise _fail(p, f"line {r}: n_landmarks={n} but values beyond landmark_{n}_y: {row[4 + 2 * n:]}")
        names = list(labels) if labels is not None else [f"landmark_{k + 1}" for k in range(n)]
        if len(names) < n:
            raise _fail(p, f"line {r}: n_landmarks={n} but {len(names)} labels given")
        size = (_int(p, row[1], f"line {r}: image_width", 1), _int(p, row[2], f"line {r}: image_height", 1))
        ann = RawAnnotation(Path(row[0]).stem, units="index", source=p, image_size=size,
                            meta={"image_name": row[0], "line": r})
        for k in range(n):
            _add_xy(ann, p, names[k], values[2 * k], values[2 * k + 1], f"line {r}: landmark_{k + 1}_{{axis}}")
        out.append(ann)
    return out


def read_points_csv(path: str | Path, labels: Sequence[str] | None = None) -> list[RawAnnotation]:
    """CSV with one row per image ``id,x1,y1,x2,y2,...`` in pixels (hand X-ray layout; header optional:
    a first row whose non-empty value cells are all non-numeric).

    The spacing comes from the images (e.g. ``.mha`` headers), not from this file. Labels are
    ``"1".."N"`` unless given; ``index = xy``; ``meta["line"]``: the record's line.
    """
    p = _exists(path)
    rows = _csv_rows(p)

    def numeric(v: str) -> bool:
        try:
            float(v)
            return True
        except ValueError:
            return False

    first = [v for v in rows[0][1][1:] if v != ""] if rows else []
    if first and not any(numeric(v) for v in first):
        rows = rows[1:]  # a header line
    out = []
    for r, row in rows:
        if (len(row) - 1) % 2:
            raise _fail(p, f"line {r}: odd number of coordinate values ({len(row) - 1})")
        n = (len(row) - 1) // 2
        names = list(labels) if labels is not None else [str(k + 1) for k in range(n)]
        if len(names) < n:
            raise _fail(p, f"line {r}: {n} points but {len(names)} labels")
        ann = RawAnnotation(row[0], units="index", source=p, meta={"line": r})
        for k in range(n):
            where = f"line {r}: point {k + 1} ({names[k]!r}) {{axis}}"
            _add_xy(ann, p, names[k], row[1 + 2 * k], row[2 + 2 * k], where)
        out.append(ann)
    return out


def read_long_csv(path: str | Path, units: Literal["index", "pixel", "world"] = "index") -> list[RawAnnotation]:
    """Long CSV ``image,landmark,x,y[,z]``, one point per row (header required).

    ``units``: ``"index"``/``"pixel"`` (pixel index, ``index = xy``) or ``"world"`` (LPS mm).
    A row whose coordinates are all empty/``nan`` means "not given"; a partly empty one gives NaN there
    (masked and reported by the checks).
    """
    if units not in ("index", "pixel", "world"):
        raise ValueError(f"units must be 'index', 'pixel' or 'world', got {units!r}")
    p = _exists(path)
    rows = _csv_rows(p)
    head = [c.lower() for c in rows[0][1]] if rows else []
    if head[:4] != ["image", "landmark", "x", "y"] or len(head) > 5 or (len(head) == 5 and head[4] != "z"):
        raise _fail(p, "expected header image,landmark,x,y[,z]")
    anns: dict[str, RawAnnotation] = {}
    for r, row in rows[1:]:
        if len(row) != len(head):
            raise _fail(p, f"line {r}: {len(row)} values, expected {len(head)} ({','.join(head)})")
        if row[0] == "" or row[1] == "":
            raise _fail(p, f"line {r}: empty image or landmark name")
        point = _cells_to_point(p, row[2:], "".join(head[2:]), f"line {r}: {{axis}}")
        if point is None:
            continue
        ann = anns.setdefault(row[0], RawAnnotation(row[0], units="world" if units == "world" else "index", source=p))
        ann.add(row[1], point)
    return list(anns.values())


# --------------------------------------------------------------------------- ISBI 2015 cephalometric
def read_isbi_txt(path: str | Path, n_landmarks: int = 19, labels: Sequence[str] | None = None) -> RawAnnotation:
    """ISBI 2015 annotation txt: the first ``n_landmarks`` non-blank lines are ``x,y`` pixels; later
    lines are ignored (the challenge files append classification values). Labels ``"1".."19"`` unless
    given; ``index = xy``; ``spacing = (0.1, 0.1)`` mm. Errors name the line of the file.
    """
    p = _exists(path)
    lines = [(k + 1, ln.strip()) for k, ln in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines())
             if ln.strip()]
    if len(lines) < n_landmarks:
        raise _fail(p, f"expected {n_landmarks} 'x,y' lines, found {len(lines)}")
    names = list(labels) if labels is not None else [str(k + 1) for k in range(n_landmarks)]
    if len(names) < n_landmarks:
        raise _fail(p, f"{n_landmarks} landmarks but {len(names)} labels given")
    ann = RawAnnotation(p.stem, units="index", source=p, spacing=(ISBI2015_SPACING_MM,) * 2)
    for k, (r, line) in enumerate(lines[:n_landmarks]):
        vals = [v for v in re.split(r"[,\s]+", line) if v]
        if len(vals) != 2:
            raise _fail(p, f"line {r}: expected 'x,y', got {line!r}")
        ann.add(names[k], [_float(p, v, f"line {r}") for v in vals])
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
    LPS/1; RAS when absent, as in Slicer < 4.11). ``meta["descriptions"]``: label -> desc column.
    Errors name the line of the file; ``nan``/``inf`` coordinates are kept for the checks."""
    p = _exists(path)
    system, columns = "RAS", ["id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc",
                              "associatedNodeID"]
    ann = RawAnnotation(image_id or p.name.split(".")[0], units="world", source=p, meta={"descriptions": {}})
    lines = read_text(p).splitlines()
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
    needed = max(col[c] for c in ("x", "y", "z", "label", *(("id",) if "id" in col else ()))) + 1
    for r, ln in enumerate(lines, start=1):
        if not ln.strip() or ln.startswith("#"):
            continue
        row = next(csv.reader([ln]))
        if len(row) < needed:
            raise _fail(p, f"line {r}: {len(row)} values, expected {len(columns)} ({','.join(columns)})")
        label = row[col["label"]].strip() or (row[col["id"]].strip() if "id" in col else "")
        if not label:
            raise _fail(p, f"line {r}: point without label or id")
        xyz = np.array([_float(p, row[col[a]].strip(), f"line {r}: {a}") for a in "xyz"])
        ann.add(label, _to_lps(xyz, system))
        if "desc" in col and col["desc"] < len(row):
            ann.meta["descriptions"][label] = row[col["desc"]]
    ann.meta["coordinate_system"] = system
    return ann


def read_slicer_json(path: str | Path, image_id: str | None = None) -> RawAnnotation:
    """3D Slicer ``.mrk.json``: ``markups[].controlPoints[]`` (``label``, ``position``), converted
    from the markup's ``coordinateSystem`` (default LPS, Slicer >= 5) to LPS. Points whose
    ``positionStatus`` is ``missing``/``undefined`` are left out (= label not given); ``null``
    coordinates become NaN (masked and reported by the checks). Errors name the control point."""
    p = _exists(path)
    doc = _json_with_list(p, "markups", "Slicer markups file")
    ann = RawAnnotation(image_id or p.name.split(".")[0], units="world", source=p, meta={"descriptions": {}})
    for m in doc["markups"]:
        if not isinstance(m, dict):
            raise _fail(p, f"markup {m!r} is not a JSON object")
        system = _coordinate_system(p, str(m.get("coordinateSystem", "LPS")))
        for k, cp in enumerate(m.get("controlPoints") or []):
            if not isinstance(cp, dict):
                raise _fail(p, f"control point {k}: not a JSON object ({cp!r})")
            if cp.get("positionStatus", "defined") in ("missing", "undefined"):
                continue
            label = str(cp.get("label") or cp.get("id") or k + 1)
            pos = _point(p, cp.get("position"), 3, f"control point {k} ({label!r}): position")
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
def _itk_reason(path: Path, error: RuntimeError) -> str:
    """The last line of an ITK read error; ITK reports a stale ``errno`` ("No such file or directory") for a
    file that exists but whose data ends early, so that case is named as what it is."""
    lines = str(error).strip().splitlines()
    reason = lines[-1] if lines else "unknown error"
    if path.exists() and "No such file or directory" in reason:
        size = path.stat().st_size if path.is_file() else 0
        reason = f"the file exists ({size} bytes) but its data cannot be decoded: truncated or corrupt"
    return reason


def _check_finite(path: Path, image: sitk.Image) -> None:
    """Raise naming the file when a floating-point image holds NaN or infinite voxels (a training image with one
    turned every loss NaN and every prediction into the origin, with exit 0)."""
    pixels = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(pixels.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(pixels)))
        if bad:
            first = np.argwhere(~np.isfinite(pixels))[0][::-1]  # (z, y, x) -> (x, y, z)
            raise _fail(path, f"{bad} pixel(s) are NaN or infinite (the first at index {tuple(int(v) for v in first)}): "
                              "fix or mask the image before using it")


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


def _check_geometry(path: Path, spacing: Sequence[float] | np.ndarray, origin: Sequence[float],
                    direction: Sequence[float], what: str = "image header") -> None:
    """Spacing > 0 and finite, origin finite, direction finite with ``|det| = 1`` (as
    :class:`~lmlib.data.geometry.Geometry` requires); otherwise an error naming the file and the values."""
    sp = tuple(float(v) for v in spacing)
    if not all(np.isfinite(v) and v > 0 for v in sp):
        raise _fail(path, f"spacing {sp} in the {what} is not positive (every pixel spacing must be > 0 mm)")
    org = tuple(float(v) for v in origin)
    if not all(np.isfinite(org)):
        raise _fail(path, f"origin {org} in the {what} is not finite")
    d = len(sp)
    dr = np.asarray(direction, dtype=np.float64).reshape(d, d)
    if not np.isfinite(dr).all() or abs(abs(np.linalg.det(dr)) - 1.0) > 1e-3:
        raise _fail(path, f"direction {dr.reshape(-1).tolist()} in the {what} is not a rotation (|det| != 1)")


def read_image(path: str | Path, spacing_override: Sequence[float] | float | None = None,
               ndim: int | None = None) -> sitk.Image:
    """Read an image with SimpleITK: PNG/TIFF/BMP/JPEG, MHA/MHD, NIfTI, NRRD, or a DICOM series
    (``path`` a directory holding one series; several raise). RGB(A) becomes grayscale. ``spacing_override``
    (mm, ``(x, y[, z])`` or one number) replaces the spacing (needed for formats that carry none, which are read at
    1.0 without it, whatever resolution tag they hold). NaN or infinite pixel values raise ``ValueError`` naming
    the file.
    ``ndim=2`` drops a trailing axis of size 1 (single-slice 3D files). A header spacing that is not
    positive, or an origin/direction that is not finite, raises ``ValueError`` naming the file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: image file or DICOM directory not found")
    if not p.is_dir():
        read_image_info(p)  # checks the header before SimpleITK silently repairs or refuses it
    try:
        if p.is_dir():
            reader = sitk.ImageSeriesReader()
            ids = reader.GetGDCMSeriesIDs(str(p))
            if not ids:
                raise _fail(p, "no DICOM series in this directory")
            if len(ids) > 1:  # which one is meant (a localizer beside the axial series?) is not ours to guess
                raise _fail(p, f"{len(ids)} DICOM series in this directory ({', '.join(ids[:4])}"
                               f"{' ...' if len(ids) > 4 else ''}); give one series' folder")
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(p), ids[0]))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(p))
    except RuntimeError as e:
        raise _fail(p, f"cannot read image ({_itk_reason(p, e)})") from None
    image = _to_gray(image)
    _check_finite(p, image)
    if p.is_dir():
        _check_geometry(p, image.GetSpacing(), image.GetOrigin(), image.GetDirection(), "DICOM series")
    if ndim == 2 and image.GetDimension() == 3 and image.GetSize()[2] == 1:
        image = image[:, :, 0]
    if spacing_override is None and not p.is_dir() and p.suffix.lower() in FORMATS_WITHOUT_SPACING:
        image.SetSpacing([1.0] * image.GetDimension())  # ITK reads a TIFF/JPEG resolution (dpi) as spacing
    if spacing_override is not None:
        n, d = np.asarray(spacing_override).size, image.GetDimension()
        if n not in (1, d):
            raise _fail(p, f"a {d}D image, but {n} spacing values were given for it (one, or {d}: x y"
                           f"{' z' if d == 3 else ''}, in mm)")
        s = np.broadcast_to(np.asarray(spacing_override, dtype=np.float64), (d,))
        _check_geometry(p, s, image.GetOrigin(), image.GetDirection(), "spacing override")
        image.SetSpacing([float(v) for v in s])
    return image


def read_image_info(path: str | Path) -> tuple[tuple[int, ...], np.ndarray, np.ndarray, np.ndarray]:
    """Size ``(x, y[, z])``, spacing, origin and direction ``(D, D)`` from the header only (no pixels).
    A DICOM directory is read in full. A spacing that is not positive, or an origin/direction that is
    not finite, raises ``ValueError`` naming the file."""
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
            raise _fail(p, f"cannot read image header ({_itk_reason(p, e)})") from None
        size, sp, org, dr = reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()
        _check_geometry(p, sp, org, dr)
        if p.suffix.lower() in FORMATS_WITHOUT_SPACING:
            sp = (1.0,) * len(size)
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
