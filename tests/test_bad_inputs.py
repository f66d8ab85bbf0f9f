"""Bad inputs end to end: reader -> checks -> dataset -> metrics. No bad input gives a silent wrong number.

Each row of the table is one defect written into a small dataset in ``tmp_path`` and loaded through
:func:`load_from_spec`. The outcome is one of two, nothing in between:

- ``Raises``: an error whose message starts with the offending file's path and names the line
  (CSV) or the shape (labelme) and the problem;
- ``Masked``: the landmark is masked in the sample, has exactly one report row saying why, is counted
  in ``Dataset.summary()``, and is left out of (and counted by) the metrics.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from lmlib.data.checks import MASKING_ISSUES
from lmlib.data.datasets import Dataset, DatasetSpec, load_from_spec
from lmlib.evaluation.metrics import summarize
from lmlib.outputs.contract import metrics_from_predictions, predictions_frame

WHO = "A"
LABELS = ("a", "b", "c")
SIZE_2D = (40, 30)  # (x, y) pixels
SIZE_3D = (10, 12, 8)


@dataclass(frozen=True)
class Masked:
    """Expected: ``label`` of ``image`` masked with one report row of ``issue`` (label None: all labels)."""

    image: str
    label: str | None
    issue: str


@dataclass(frozen=True)
class Raises:
    """Expected: an error whose message starts with the path of ``file`` and matches ``pattern``."""

    file: str
    pattern: str


@dataclass(frozen=True)
class Case:
    reader: str
    files: dict[str, str]
    expect: Masked | Raises
    ndim: int = 2
    image_ext: str = "png"
    reader_kwargs: tuple[tuple[str, Any], ...] = ()
    header_spacing: str | None = None  # replaces the ElementSpacing of every .mha image
    bad_pixel: float | None = None  # the first image is float32 with this value at index (3, 2[, 1])


# ----------------------------------------------------------------------------- writers
def _pts(image: str = "001", **over: Any) -> list[tuple[str, Any]]:
    """Good (label, point) pairs of one image; ``label=None`` drops it, another value replaces it."""
    base = {"a": [5.0, 5.0], "b": [10.0, 12.0], "c": [30.0, 20.0]}
    shift = 1.0 if image == "002" else 0.0
    out = []
    for lab, xy in base.items():
        value = over.get(lab, [xy[0] + shift, xy[1]])
        if value is not None:
            out.append((lab, value))
    return out


def _lm(points: list[tuple[str, Any]], shapes: tuple[dict, ...] = (), **doc: Any) -> str:
    """labelme JSON text."""
    body = {"version": "5.0.1", "imageWidth": SIZE_2D[0], "imageHeight": SIZE_2D[1], "imageData": None,
            "shapes": [{"label": lab, "points": [xy], "shape_type": "point"} for lab, xy in points] + list(shapes)}
    body.update(doc)
    return json.dumps(body)


def _labelme(a1: str | None = None, a2: str | None = None) -> dict[str, str]:
    files = {"ann/001.json": a1 if a1 is not None else _lm(_pts("001")),
             "ann/002.json": a2 if a2 is not None else _lm(_pts("002"))}
    return {k: v for k, v in files.items() if v != "-"}


WIDE_HEAD = "image_name,image_width,image_height,n_landmarks,landmark_1_x,landmark_1_y,landmark_2_x,landmark_2_y," \
            "landmark_3_x,landmark_3_y\n"


def _wide_row(image: str, **over: Any) -> str:
    pts = dict(_pts(image))
    cells = []
    for lab in LABELS:
        xy = over.get(lab, pts[lab])
        cells += ["", ""] if xy is None else [str(v) for v in xy]
    return f"{image}.png,40,30,3," + ",".join(cells) + "\n"


def _points_row(image: str, **over: Any) -> str:
    return _wide_row(image, **over).replace(f"{image}.png,40,30,3,", f"{image},")


def _long(rows: list[str] | None = None) -> str:
    body = [f"{i},{lab},{xy[0]},{xy[1]}" for i in ("001", "002") for lab, xy in _pts(i)]
    return "image,landmark,x,y\n" + "\n".join(body + (rows or [])) + "\n"


def _isbi(**over: Any) -> str:
    return "\n".join(",".join(str(v) for v in xy) for _, xy in _pts("001", **over)) + "\n7\n"


def _fcsv(rows: list[str]) -> str:
    return ("# Markups fiducial file version = 4.6\n# CoordinateSystem = LPS\n"
            "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n" + "\n".join(rows) + "\n")


def _fcsv_row(k: int, xyz: tuple[Any, Any, Any]) -> str:
    return f"vtkMRMLMarkupsFiducialNode_{k},{xyz[0]},{xyz[1]},{xyz[2]},0,0,0,1,1,1,0,{LABELS[k]},,"


GOOD_3D = [(2.0, 3.0, 4.0), (5.0, 6.0, 1.0), (8.0, 2.0, 6.0)]  # world = index (origin 0, spacing 1)


def _fcsv_with(k: int, xyz: tuple[Any, Any, Any]) -> str:
    return _fcsv([_fcsv_row(j, xyz if j == k else GOOD_3D[j]) for j in range(3)])


def _mrk(k: int, position: Any) -> str:
    cps = [{"id": str(j + 1), "label": LABELS[j], "position": position if j == k else list(GOOD_3D[j])}
           for j in range(3)]
    return json.dumps({"markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "controlPoints": cps}]})


def _build(case: Case, root: Path) -> DatasetSpec:
    (root / "img").mkdir(parents=True)
    for k, image in enumerate(("001", "002") if case.ndim == 2 else ("vol",)):
        size = SIZE_2D if case.ndim == 2 else SIZE_3D
        pixels = np.full(size[::-1], 3 + k, np.uint8)  # two different pictures
        if case.bad_pixel is not None and k == 0:
            pixels = pixels.astype(np.float32)
            pixels[(1,) * (case.ndim - 2) + (2, 3)] = case.bad_pixel
        img = sitk.GetImageFromArray(pixels)
        path = root / "img" / f"{image}.{case.image_ext}"
        sitk.WriteImage(img, str(path))
        if case.header_spacing is not None:
            text = path.read_bytes()
            old = b"ElementSpacing = " + b" ".join([b"1"] * case.ndim)
            assert old in text
            path.write_bytes(text.replace(old, b"ElementSpacing = " + case.header_spacing.encode()))
    for rel, text in case.files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    per_image = {"labelme": "ann/{image_id}.json", "isbi_txt": "ann/{image_id}.txt"}
    template = per_image.get(case.reader, next(iter(case.files)))
    spacing = (0.5, 0.5) if case.ndim == 2 and case.image_ext == "png" else None
    kwargs = dict(case.reader_kwargs)
    if case.reader in ("landmark_csv", "points_csv"):
        kwargs.setdefault("labels", LABELS)
    return DatasetSpec("bad", case.ndim, f"img/*.{case.image_ext}", case.reader, {WHO: template}, LABELS,
                       tuple(s.upper() for s in LABELS), spacing_mm=spacing, reader_kwargs=kwargs)


# ----------------------------------------------------------------------------- the table
def _shape(kind: str, label: str = "b") -> dict:
    return {"label": label, "points": [[1, 1], [20, 2], [10, 15]], "shape_type": kind}


ISBI = (("n_landmarks", 3), ("labels", LABELS))
CASES: dict[str, Case] = {
    # ---- masked, reported, counted
    "labelme point far right": Case("labelme", _labelme(_lm(_pts(a=[100.0, 5.0]))), Masked("001", "a", "outside")),
    "labelme point above": Case("labelme", _labelme(_lm(_pts(b=[10.0, -2.0]))), Masked("001", "b", "outside")),
    "labelme null coordinate": Case("labelme", _labelme(_lm(_pts(b=[None, 3.0]))), Masked("001", "b", "non_finite")),
    "labelme infinite coordinate": Case("labelme", _labelme(_lm(_pts(c=[math.inf, 3.0]))),
                                        Masked("001", "c", "non_finite")),
    "labelme polygon instead of point": Case("labelme", _labelme(_lm(_pts(b=None), (_shape("polygon"),))),
                                             Masked("001", "b", "not_a_point")),
    "labelme line instead of point": Case("labelme", _labelme(a2=_lm(_pts("002", c=None), (_shape("line", "c"),))),
                                          Masked("002", "c", "not_a_point")),
    "labelme rectangle instead of point": Case("labelme", _labelme(_lm(_pts(a=None), (_shape("rectangle", "a"),))),
                                               Masked("001", "a", "not_a_point")),
    "labelme label twice": Case("labelme", _labelme(_lm(_pts() + [("a", [7.0, 9.0])])),
                                Masked("001", "a", "duplicate")),
    "labelme label missing": Case("labelme", _labelme(_lm(_pts(c=None))), Masked("001", "c", "missing")),
    "labelme file missing": Case("labelme", _labelme(a2="-"), Masked("002", None, "no_annotation")),
    "csv image twice": Case("landmark_csv", {"ann.csv": WIDE_HEAD + _wide_row("001") + _wide_row("002")
                                             + _wide_row("001", a=[6.0, 6.0])}, Masked("001", None, "duplicate_image")),
    "csv image without row": Case("landmark_csv", {"ann.csv": WIDE_HEAD + _wide_row("001")},
                                  Masked("002", None, "no_annotation")),
    "csv header only": Case("landmark_csv", {"ann.csv": WIDE_HEAD}, Masked("001", None, "no_annotation")),
    "csv infinite coordinate": Case("landmark_csv", {"ann.csv": WIDE_HEAD + _wide_row("001", b=["inf", 3])
                                                     + _wide_row("002")}, Masked("001", "b", "non_finite")),
    "csv half-empty coordinate": Case("landmark_csv", {"ann.csv": WIDE_HEAD + _wide_row("001", c=["", 4])
                                                      + _wide_row("002")}, Masked("001", "c", "non_finite")),
    "csv empty coordinate": Case("landmark_csv", {"ann.csv": WIDE_HEAD + _wide_row("001", b=None) + _wide_row("002")},
                                 Masked("001", "b", "missing")),
    "csv point outside": Case("landmark_csv", {"ann.csv": WIDE_HEAD + _wide_row("001") + _wide_row("002", c=[5, 31.5])},
                              Masked("002", "c", "outside")),
    "points csv image twice": Case("points_csv", {"p.csv": _points_row("001") + _points_row("002") * 2},
                                   Masked("002", None, "duplicate_image")),
    "long csv nan coordinate": Case("long_csv", {"l.csv": _long(["001,b,nan,nan"]).replace("001,b,10.0,12.0\n", "")},
                                    Masked("001", "b", "missing")),
    "long csv infinite coordinate": Case("long_csv", {"l.csv": _long().replace("001,b,10.0,12.0", "001,b,-inf,12")},
                                         Masked("001", "b", "non_finite")),
    "long csv label twice": Case("long_csv", {"l.csv": _long(["002,a,1,1"])}, Masked("002", "a", "duplicate")),
    "isbi point outside": Case("isbi_txt", {"ann/001.txt": _isbi(a=[-3, 4]), "ann/002.txt": _isbi()},
                               Masked("001", "a", "outside"), reader_kwargs=ISBI),
    "fcsv point outside (3D)": Case("fcsv", {"v.fcsv": _fcsv_with(2, (8.0, 2.0, 9.5))}, Masked("vol", "c", "outside"),
                                    ndim=3, image_ext="mha"),
    "fcsv nan coordinate (3D)": Case("fcsv", {"v.fcsv": _fcsv_with(0, ("nan", 1.0, 1.0))},
                                     Masked("vol", "a", "non_finite"), ndim=3, image_ext="mha"),
    "mrk.json null coordinate (3D)": Case("mrk_json", {"v.mrk.json": _mrk(1, [1.0, None, 2.0])},
                                          Masked("vol", "b", "non_finite"), ndim=3, image_ext="mha"),
    # ---- clear errors: file, line or shape, problem
    # a NaN pixel made every training loss NaN and every prediction the image origin, with exit 0
    "NaN pixel in a 2D image": Case("labelme", _labelme(), Raises("img/001.mha", r"1 pixel\(s\) are NaN or infinite "
                                                                  r"\(the first at index \(3, 2\)\)"),
                                    image_ext="mha", bad_pixel=float("nan")),
    "infinite voxel in a 3D image": Case("fcsv", {"v.fcsv": _fcsv_with(0, GOOD_3D[0])},
                                         Raises("img/vol.mha", r"1 pixel\(s\) are NaN or infinite "
                                                               r"\(the first at index \(3, 2, 1\)\)"),
                                         ndim=3, image_ext="mha", bad_pixel=float("inf")),
    "labelme string coordinate": Case("labelme", _labelme(_lm(_pts(b=["12a", 3.0]))),
                                      Raises("ann/001.json", r"shape 1 \('b'\).*'12a'.*not a number")),
    "labelme ragged points": Case("labelme", _labelme(a2=_lm(_pts("002", a=None), (
        {"label": "a", "points": [[1.0], [2.0, 3.0]], "shape_type": "point"},))),
                                  Raises("ann/002.json", r"shape 2 \('a'\).*one \(x, y\)")),
    "labelme point without label": Case("labelme", _labelme(_lm(_pts(), ({"points": [[1, 2]]},))),
                                        Raises("ann/001.json", r"shape 3.*no label")),
    "labelme non-numeric image width": Case("labelme", _labelme(_lm(_pts(), imageWidth="wide")),
                                            Raises("ann/001.json", r"imageWidth: 'wide' is not a positive integer")),
    "labelme invalid JSON": Case("labelme", _labelme(a2="{not json"), Raises("ann/002.json", "invalid JSON")),
    "csv string coordinate": Case("landmark_csv", {"ann.csv": WIDE_HEAD + _wide_row("001")
                                                   + _wide_row("002", b=["x", 3])},
                                  Raises("ann.csv", r"line 3: landmark_2_x: 'x' is not a number")),
    "csv row with too few cells": Case("landmark_csv", {"ann.csv": WIDE_HEAD + "001.png,40\n" + _wide_row("002")},
                                       Raises("ann.csv", r"line 2: 2 cells.*at least 4")),
    "csv too few coordinates": Case("landmark_csv", {"ann.csv": WIDE_HEAD + "001.png,40,30,3,1,2,3\n"},
                                    Raises("ann.csv", r"line 2: n_landmarks=3 but 3 coordinate values")),
    "csv more landmarks than labels": Case("landmark_csv", {"ann.csv": WIDE_HEAD + _wide_row("001")},
                                           Raises("ann.csv", r"line 2: n_landmarks=3 but 2 labels"),
                                           reader_kwargs=(("labels", ("a", "b")),)),
    "csv negative image width": Case("landmark_csv", {"ann.csv": WIDE_HEAD + _wide_row("001").replace(",40,", ",-40,")},
                                     Raises("ann.csv", r"line 2: image_width: '-40' is not a positive integer")),
    "points csv string in first row": Case("points_csv", {"p.csv": _points_row("001", a=["five", 5])},
                                           Raises("p.csv", r"line 1: .*'five' is not a number")),
    "points csv odd cells after blank line": Case("points_csv", {"p.csv": _points_row("001") + "\n002,1,2,3\n"},
                                                  Raises("p.csv", r"line 3: odd number")),
    "long csv too few cells": Case("long_csv", {"l.csv": _long(["002,c,4"])}, Raises("l.csv", r"line 8: 3 values")),
    "long csv string coordinate": Case("long_csv", {"l.csv": _long().replace("002,b,11.0", "002,b,eleven")},
                                       Raises("l.csv", r"line 6: x: 'eleven' is not a number")),
    "isbi string after blank line": Case("isbi_txt", {"ann/001.txt": "5,5\n\n10,12\n30,2O\n", "ann/002.txt": _isbi()},
                                         Raises("ann/001.txt", r"line 4: '2O' is not a number"), reader_kwargs=ISBI),
    "fcsv string coordinate": Case("fcsv", {"v.fcsv": _fcsv_with(1, (5.0, "six", 1.0))},
                                   Raises("v.fcsv", r"line 5: y: 'six' is not a number"), ndim=3, image_ext="mha"),
    "mrk.json string coordinate": Case("mrk_json", {"v.mrk.json": _mrk(2, [1.0, "2", "z"])},
                                       Raises("v.mrk.json", r"control point 2 \('c'\): position: z: 'z' is not a"),
                                       ndim=3, image_ext="mha"),
    "negative spacing in image header": Case("fcsv", {"v.fcsv": _fcsv_with(0, GOOD_3D[0])},
                                             Raises("img/vol.mha", r"spacing \(1\.0, -1\.0, 1\.0\).*not positive"),
                                             ndim=3, image_ext="mha", header_spacing="1 -1 1"),
    "zero spacing in image header": Case("fcsv", {"v.fcsv": _fcsv_with(0, GOOD_3D[0])},
                                         Raises("img/vol.mha", r"spacing \(0\.0, 1\.0, 1\.0\).*not positive"),
                                         ndim=3, image_ext="mha", header_spacing="0 1 1"),
}


def _load(spec: DatasetSpec, root: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_from_spec(spec, root)


def _masking_rows(report: pd.DataFrame) -> pd.DataFrame:
    return report[report["issue"].isin(MASKING_ISSUES)]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = CASES[name]
    root = tmp_path / "data"
    spec = _build(case, root)
    exp = case.expect
    if isinstance(exp, Raises):
        with pytest.raises((ValueError, FileNotFoundError)) as info:
            _load(spec, root)
        message = str(info.value)
        assert message.startswith(str(root / exp.file) + ": "), message
        assert info.match(exp.pattern)
        return
    ds = _load(spec, root)
    sample = ds[exp.image]
    labels = [exp.label] if exp.label is not None else list(LABELS)
    for label in labels:
        k = LABELS.index(label)
        assert not sample.valid[k] and np.isnan(sample.landmarks_mm[k]).all(), label
        rows = ds.report[(ds.report["image_id"] == exp.image) & (ds.report["landmark"] == label)]
        assert len(_masking_rows(rows)) == 1 and _masking_rows(rows)["issue"].iloc[0] == exp.issue, rows
        assert rows["file"].iloc[0] != ""
    # every masked landmark (here: all of them) has exactly one masking report row, and nothing else masks
    masked = {(s.image_id, LABELS[k]) for s in ds for k in np.flatnonzero(~s.valid)}
    rows = _masking_rows(ds.report)
    assert len(rows) == len(masked) and set(zip(rows["image_id"], rows["landmark"])) == masked
    # the printed summary counts it
    ds.summary()
    printed = capsys.readouterr().out
    n_issue = int((ds.report["issue"] == exp.issue).sum())
    assert f"{WHO}: {exp.issue}: {n_issue}" in printed
    assert f"masked landmarks: {WHO}: {len(masked)}" in printed
    # metrics: the masked reference points are left out and counted; the others give the true error
    pred = [np.where(s.valid[:, None], s.landmarks_mm + 0.3, 1e4) for s in ds]
    frame = predictions_frame(ds.samples, pred)
    stats = metrics_from_predictions(frame)
    assert stats["n_masked"] == len(masked) == summarize(frame["error_mm"].to_numpy(float))["n_masked"]
    expected = 0.3 * math.sqrt(case.ndim)
    if stats["n_points"]:
        assert stats["max_mm"] == pytest.approx(expected) and stats["mre_mm"] == pytest.approx(expected)


@pytest.mark.parametrize("xy, kept", [([40.4, 30.4], True), ([-0.4, 5.0], True), ([40.6, 5.0], False),
                                      ([5.0, -0.6], False)])
def test_outside_tolerance_is_half_a_pixel_beyond_the_edges(tmp_path: Path, xy: list[float], kept: bool) -> None:
    """labelme pixel coordinates: the image spans [0, 40] x [0, 30]; 0.5 px beyond is tolerated."""
    case = Case("labelme", _labelme(_lm(_pts(a=xy))), Masked("001", "a", "outside"))
    ds = _load(_build(case, tmp_path), tmp_path)
    assert bool(ds["001"].valid[0]) is kept
    assert len(ds.report) == (0 if kept else 1)


def test_a_shape_beside_the_point_is_reported_and_the_point_kept(tmp_path: Path) -> None:
    case = Case("labelme", _labelme(_lm(_pts(), (_shape("rectangle", "b"), _shape("polygon", "jaw")))),
                Masked("001", "b", "shape_ignored"))
    ds = _load(_build(case, tmp_path), tmp_path)
    assert ds["001"].valid.all()
    got = sorted(ds.report[["landmark", "issue"]].itertuples(index=False, name=None))
    assert got == [("b", "shape_ignored"), ("jaw", "shape_ignored")]
    assert not _masking_rows(ds.report).shape[0]
    assert "rectangle" in " ".join(ds.report["detail"]) and "shape 3" in " ".join(ds.report["detail"])


def test_table_covers_every_masking_issue_and_reader() -> None:
    issues = {c.expect.issue for c in CASES.values() if isinstance(c.expect, Masked)}
    assert issues == MASKING_ISSUES - {"excluded"}  # excluded: tests/test_datasets.py
    assert {c.reader for c in CASES.values()} == {"labelme", "landmark_csv", "points_csv", "long_csv", "isbi_txt",
                                                  "fcsv", "mrk_json"}


def test_a_sample_refuses_a_valid_landmark_that_is_not_finite() -> None:
    """The last guard: nothing downstream can be handed an infinite reference point marked valid."""
    from lmlib.data.geometry import Geometry
    from lmlib.data.sample import Sample
    with pytest.raises(ValueError, match=r"img9: landmarks \['q'\] are marked valid but are not finite"):
        Sample("img9", np.zeros((4, 4)), Geometry([1, 1]), [[1, 1], [np.inf, 2]], [True, True], ("p", "q"))
    s = Sample.from_index("img9", np.zeros((4, 4)), Geometry([1, 1]), [[1, 1], [np.inf, 2]], ("p", "q"))
    assert s.valid.tolist() == [True, False] and np.isnan(s.landmarks_mm[1]).all()
