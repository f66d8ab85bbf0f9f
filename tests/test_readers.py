"""Readers: each format written by the test in its exact layout, values asserted."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lmlib.data.readers import (
    ISBI2015_SPACING_MM,
    read_image,
    read_image_info,
    read_isbi2015,
    read_isbi_txt,
    read_labelme,
    read_landmark_csv,
    read_long_csv,
    read_points_csv,
    read_slicer_fcsv,
    read_slicer_json,
    read_slicer_markups,
)


def _labelme(path: Path, shapes: list[tuple[str, list[float]]], width: int = 40, height: int = 30,
             extra: list[dict] | None = None) -> Path:
    doc = {"version": "5.0.1", "flags": {}, "imagePath": "../images/img.png", "imageData": None,
           "imageWidth": width, "imageHeight": height,
           "shapes": [{"label": lab, "points": [xy], "group_id": None, "shape_type": "point", "flags": {}}
                      for lab, xy in shapes] + (extra or [])}
    path.write_text(json.dumps(doc))
    return path


FCSV_ROWS = ("vtkMRMLMarkupsFiducialNode_1,-0.2,2.7,-4.9,0,0,0,1,1,1,0,1,AC,vtkMRMLScalarVolumeNode1\n"
             "vtkMRMLMarkupsFiducialNode_2,13.3,-25.9,-9.7,0,0,0,1,1,1,0,6,R superior LMS,vtkMRMLScalarVolumeNode1\n")
FCSV_HEAD = ("# Markups fiducial file version = 4.6\n# CoordinateSystem = {cs}\n"
             "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n")


# ----------------------------------------------------------------------------- labelme
def test_labelme_points_duplicates_and_corner_convention(tmp_path: Path) -> None:
    poly = {"label": "jaw", "points": [[1, 1], [2, 2], [3, 1]], "shape_type": "polygon"}
    path = _labelme(tmp_path / "007.json", [("l1", [10.5, 20.5]), ("l2", [0.0, 0.0]), ("l1", [12.0, 3.0])],
                    extra=[poly])
    ann = read_labelme(path)
    assert ann.image_id == "007" and ann.units == "index" and ann.source == path
    assert ann.labels == ["l1", "l2"]
    assert len(ann.points["l1"]) == 2  # the duplicate is kept for the checks
    np.testing.assert_allclose(ann.points["l1"][0], [10.0, 20.0])  # corner origin: index = xy - 0.5
    np.testing.assert_allclose(ann.points["l1"][1], [11.5, 2.5])
    np.testing.assert_allclose(ann.points["l2"][0], [-0.5, -0.5])
    assert ann.image_size == (40, 30)
    assert ann.image_path == (tmp_path / "../images/img.png").resolve()
    assert ann.other_shapes == {"jaw": ["shape 3: polygon"]}  # reported by the checks, never a point
    raw = read_labelme(path, corner_origin=False)
    np.testing.assert_allclose(raw.points["l1"][0], [10.5, 20.5])


def test_labelme_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: invalid JSON"):
        read_labelme(bad)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match=r"other\.json: not a labelme file"):
        read_labelme(other)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_labelme(tmp_path / "missing.json")


def test_labelme_keeps_null_and_infinite_coordinates_and_other_shapes_for_the_checks(tmp_path: Path) -> None:
    path = _labelme(tmp_path / "n.json", [("l1", [None, 3.0]), ("l2", [float("inf"), 1.0])],
                    extra=[{"label": "l3", "points": [[1, 1], [5, 5]], "shape_type": "rectangle"},
                           {"label": "l3", "points": [[1, 1], [5, 5]], "shape_type": "line"}])
    ann = read_labelme(path)
    assert np.isnan(ann.points["l1"][0][0]) and np.isinf(ann.points["l2"][0][0])
    assert ann.other_shapes == {"l3": ["shape 2: rectangle", "shape 3: line"]} and "l3" not in ann.points


def _shape(label: object, points: object, kind: str = "point") -> dict:
    return {"label": label, "points": points, "shape_type": kind}


@pytest.mark.parametrize("shape, message", [
    (_shape("l2", [["12a", 3]]), r"shape 1 \('l2'\): x: '12a' is not a number"),
    (_shape("l2", [[1, True]]), r"shape 1 \('l2'\): y: True is not a number"),
    (_shape("l2", [[1.0], [2.0, 3.0]]), r"shape 1 \('l2'\): a point needs exactly one \(x, y\)"),
    (_shape("l2", [[1.0, 2.0, 3.0]]), r"shape 1 \('l2'\): a point needs exactly one \(x, y\)"),
    (_shape("l2", []), r"shape 1 \('l2'\): a point needs exactly one \(x, y\)"),
    (_shape(None, [[1, 2]]), r"shape 1: point shape with no label"),
    (_shape("", [[1, 2]], "polygon"), r"shape 1 \(''\): polygon shape with no label"),
    ("not a shape", r"shape 1: not a JSON object"),
])
def test_labelme_errors_name_file_shape_and_problem(tmp_path: Path, shape: object, message: str) -> None:
    path = _labelme(tmp_path / "s.json", [("l1", [1.0, 2.0])], extra=[shape])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=message) as info:
        read_labelme(path)
    assert str(info.value).startswith(f"{path}: ")


def test_labelme_bad_image_size_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"w\.json: imageHeight: -3 is not a positive integer"):
        read_labelme(_labelme(tmp_path / "w.json", [("l1", [1.0, 2.0])], height=-3))


# ----------------------------------------------------------------------------- CSV layouts
def test_landmark_csv(tmp_path: Path) -> None:
    path = tmp_path / "lm.csv"
    path.write_text("image_name,image_width,image_height,n_landmarks,landmark_1_x,landmark_1_y,"
                    "landmark_2_x,landmark_2_y\n"
                    "a.png,100,80,2,10,20,30.5,40\n"
                    "b.jpg,64,64,2,1,2,,\n")
    a, b = read_landmark_csv(path)
    assert (a.image_id, a.image_size, a.units) == ("a", (100, 80), "index")
    np.testing.assert_allclose(a.points["landmark_2"][0], [30.5, 40.0])
    assert b.labels == ["landmark_1"]  # empty coordinates = not given
    named = read_landmark_csv(path, labels=["s", "n"])[0]
    assert named.labels == ["s", "n"]
    bad = tmp_path / "bad.csv"
    bad.write_text("image_name,image_width,image_height,n_landmarks,landmark_1_x\na.png,1,1,3,1\n")
    with pytest.raises(ValueError, match=r"bad\.csv: line 2: n_landmarks=3"):
        read_landmark_csv(bad)
    with pytest.raises(ValueError, match="expected header"):
        read_landmark_csv(_write(tmp_path / "h.csv", "name,w\n"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_points_csv_with_mha_spacing(tmp_path: Path) -> None:
    img = sitk.GetImageFromArray(np.zeros((30, 20), np.uint16))  # 20 x 30 (x, y)
    img.SetSpacing((0.2, 0.25))
    sitk.WriteImage(img, str(tmp_path / "3001.mha"))
    path = _write(tmp_path / "all.csv", "3001,1,2,3.5,4,19,29\n3002,5,6,7,8,9,10\n")
    anns = read_points_csv(path)
    assert [a.image_id for a in anns] == ["3001", "3002"]
    assert anns[0].labels == ["1", "2", "3"]
    np.testing.assert_allclose(anns[0].points["2"][0], [3.5, 4.0])
    with_header = read_points_csv(_write(tmp_path / "h.csv", "id,x1,y1\n3001,1,2\n"), labels=["tip"])
    assert with_header[0].labels == ["tip"] and with_header[0].image_id == "3001"
    size, spacing, origin, direction = read_image_info(tmp_path / "3001.mha")
    assert size == (20, 30)
    np.testing.assert_allclose(spacing, [0.2, 0.25])
    with pytest.raises(ValueError, match=r"odd\.csv: line 1: odd number"):
        read_points_csv(_write(tmp_path / "odd.csv", "1,2,3,4\n"))


def test_long_csv_index_and_world(tmp_path: Path) -> None:
    p2 = _write(tmp_path / "l2.csv", "image,landmark,x,y\nA,s,1,2\nA,n,3,4\nB,s,5,6\nA,s,7,8\nB,n,,\n")
    anns = {a.image_id: a for a in read_long_csv(p2, units="pixel")}
    assert anns["A"].units == "index" and len(anns["A"].points["s"]) == 2
    assert anns["B"].labels == ["s"]
    p3 = _write(tmp_path / "l3.csv", "image,landmark,x,y,z\nV,ac,1.5,-2,3\n")
    (v,) = read_long_csv(p3, units="world")
    assert v.units == "world"
    np.testing.assert_allclose(v.points["ac"][0], [1.5, -2.0, 3.0])
    with pytest.raises(ValueError, match="expected header"):
        read_long_csv(_write(tmp_path / "x.csv", "img,lm,x,y\n"))
    with pytest.raises(ValueError, match="units"):
        read_long_csv(p2, units="mm")  # type: ignore[arg-type]


WIDE = "image_name,image_width,image_height,n_landmarks,landmark_1_x,landmark_1_y\n"


@pytest.mark.parametrize("reader, text, message", [
    (read_landmark_csv, WIDE + "a.png,40,30,1,1,2\nb.png,40\n", r"line 3: 2 cells, expected at least 4"),
    (read_landmark_csv, WIDE + "\na.png,40,30,1,abc,2\n", r"line 3: landmark_1_x: 'abc' is not a number"),
    (read_landmark_csv, WIDE + "a.png,40,30,one,1,2\n", r"line 2: n_landmarks: 'one' is not a non-negative integer"),
    (read_landmark_csv, WIDE + "a.png,40.5,30,1,1,2\n", r"line 2: image_width: '40.5' is not a positive integer"),
    (read_landmark_csv, WIDE + "a.png,40,0,1,1,2\n", r"line 2: image_height: '0' is not a positive integer"),
    (read_landmark_csv, WIDE + "a.png,40,30,1,1,2,3,4\n", r"line 2: n_landmarks=1 but values beyond landmark_1_y"),
    (read_points_csv, "id,x1,y1\n7,1,2\n8,x,2\n", r"line 3: point 1 \('1'\) x: 'x' is not a number"),
    (read_points_csv, "7,1,two\n", r"line 1: point 1 \('1'\) y: 'two' is not a number"),
    (read_long_csv, "image,landmark,x,y\n\nA,s,1\n", r"line 3: 3 values, expected 4 \(image,landmark,x,y\)"),
    (read_long_csv, "image,landmark,x,y\nA,s,1,why\n", r"line 2: y: 'why' is not a number"),
    (read_long_csv, "image,landmark,x,y\n,s,1,2\n", r"line 2: empty image or landmark name"),
    (read_isbi_txt, "1,2\n\n3,x\n" + "1,2\n" * 17, r"line 3: 'x' is not a number"),
    (read_isbi_txt, "1,2\n3\n" + "1,2\n" * 17, r"line 2: expected 'x,y', got '3'"),
    (read_slicer_fcsv, FCSV_HEAD.format(cs="LPS") + "n1,1,2\n", r"line 4: 3 values, expected 14"),
    (read_slicer_fcsv, FCSV_HEAD.format(cs="LPS") + FCSV_ROWS.replace("-25.9", "far"),
     r"line 5: y: 'far' is not a number"),
])
def test_csv_errors_name_file_line_and_problem(tmp_path: Path, reader: object, text: str, message: str) -> None:
    path = _write(tmp_path / "bad.fcsv" if reader is read_slicer_fcsv else tmp_path / "bad.csv", text)
    with pytest.raises(ValueError, match=message) as info:
        reader(path)  # type: ignore[operator]
    assert str(info.value).startswith(f"{path}: ")


def test_csv_readers_keep_infinite_values_and_record_lines(tmp_path: Path) -> None:
    (a, b, a2) = read_landmark_csv(_write(tmp_path / "w.csv", WIDE + "a.png,40,30,1,inf,2\n\nb.png,4,3,1,,\n"
                                                                     "a.png,40,30,1,1,2\n"))
    assert np.isinf(a.points["landmark_1"][0][0]) and b.labels == [] and a2.image_id == "a"
    assert [a.meta["line"], b.meta["line"], a2.meta["line"]] == [2, 4, 5]
    (p,) = read_points_csv(_write(tmp_path / "p.csv", "\n9,-inf,1\n"))
    assert p.meta["line"] == 2 and np.isneginf(p.points["1"][0][0])
    (q,) = read_long_csv(_write(tmp_path / "l.csv", "image,landmark,x,y\nA,s,nan,NaN\nA,t,inf,0\nA,u,1,\n"))
    assert q.labels == ["t", "u"]  # an all-nan row = not given (reported as missing by the checks)
    assert np.isnan(q.points["u"][0][1])  # half given: NaN there (reported as non-finite by the checks)
    (h,) = read_landmark_csv(_write(tmp_path / "h.csv", WIDE + "a.png,40,30,1,,7\n"))
    assert np.isnan(h.points["landmark_1"][0][0]) and h.points["landmark_1"][0][1] == 7.0


# ----------------------------------------------------------------------------- ISBI 2015
def test_isbi_txt_and_layout(tmp_path: Path) -> None:
    lines = [f"{100 + k},{200 + 2 * k}" for k in range(19)] + ["1", "2", "3"]  # + classification lines
    for who, shift in (("senior", 0), ("junior", 1)):
        folder = tmp_path / "AnnotationsByMD" / f"400_{who}"
        folder.mkdir(parents=True)
        txt = [f"{100 + k + shift},{200 + 2 * k}" for k in range(19)] + ["1", "2"]
        (folder / "001.txt").write_text("\r\n".join(txt) + "\r\n")
    ann = read_isbi_txt(_write(tmp_path / "001.txt", "\n".join(lines)))
    assert ann.labels == [str(k) for k in range(1, 20)]
    np.testing.assert_allclose(ann.points["19"][0], [118.0, 236.0])
    assert ann.spacing == (ISBI2015_SPACING_MM, ISBI2015_SPACING_MM)
    junior = read_isbi2015(tmp_path / "AnnotationsByMD", "junior")
    assert len(junior) == 1
    np.testing.assert_allclose(junior[0].points["1"][0], [101.0, 200.0])
    with pytest.raises(ValueError, match=r"short\.txt: expected 19"):
        read_isbi_txt(_write(tmp_path / "short.txt", "1,2\n3,4\n"))


# ----------------------------------------------------------------------------- Slicer markups


@pytest.mark.parametrize("cs, sign", [("0", -1.0), ("RAS", -1.0), ("1", 1.0), ("LPS", 1.0)])
def test_fcsv_coordinate_systems(tmp_path: Path, cs: str, sign: float) -> None:
    path = _write(tmp_path / "pts.fcsv", FCSV_HEAD.format(cs=cs) + FCSV_ROWS)
    ann = read_slicer_fcsv(path)
    assert ann.units == "world" and ann.labels == ["1", "6"] and ann.image_id == "pts"
    np.testing.assert_allclose(ann.points["6"][0], [sign * 13.3, sign * -25.9, -9.7])
    assert ann.meta["descriptions"] == {"1": "AC", "6": "R superior LMS"}
    assert ann.meta["coordinate_system"] == ("RAS" if sign < 0 else "LPS")
    assert read_slicer_markups(path).points["1"][0][2] == pytest.approx(-4.9)


def test_fcsv_without_header_is_ras_and_bad_system_fails(tmp_path: Path) -> None:
    ann = read_slicer_fcsv(_write(tmp_path / "old.fcsv", FCSV_ROWS))
    np.testing.assert_allclose(ann.points["1"][0], [0.2, -2.7, -4.9])
    with pytest.raises(ValueError, match=r"bad\.fcsv: unknown coordinate system"):
        read_slicer_fcsv(_write(tmp_path / "bad.fcsv", FCSV_HEAD.format(cs="IJK") + FCSV_ROWS))


def test_mrk_json(tmp_path: Path) -> None:
    def doc(cs: str) -> dict:
        return {"markups": [{"type": "Fiducial", "coordinateSystem": cs, "controlPoints": [
            {"id": "1", "label": "AC", "description": "anterior commissure", "position": [1.0, 2.0, 3.0],
             "positionStatus": "defined"},
            {"id": "2", "label": "PC", "position": [0.0, 0.0, 0.0], "positionStatus": "missing"},
            {"id": "3", "label": "AC", "position": [4.0, 5.0, 6.0]}]}]}
    ras = tmp_path / "a.mrk.json"
    ras.write_text(json.dumps(doc("RAS")))
    ann = read_slicer_json(ras)
    assert ann.image_id == "a" and ann.labels == ["AC"] and len(ann.points["AC"]) == 2
    np.testing.assert_allclose(ann.points["AC"][0], [-1.0, -2.0, 3.0])
    lps = tmp_path / "b.mrk.json"
    lps.write_text(json.dumps(doc("LPS")))
    np.testing.assert_allclose(read_slicer_markups(lps).points["AC"][1], [4.0, 5.0, 6.0])
    with pytest.raises(ValueError, match=r"c\.mrk\.json: invalid JSON"):
        read_slicer_json(_write(tmp_path / "c.mrk.json", "[1,"))
    bad = doc("LPS")
    bad["markups"][0]["controlPoints"][2]["position"] = [4.0, "five", 6.0]
    with pytest.raises(ValueError, match=r"d\.mrk\.json: control point 2 \('AC'\): position: y: 'five' is not a"):
        read_slicer_json(_write(tmp_path / "d.mrk.json", json.dumps(bad)))
    bad["markups"][0]["controlPoints"][2]["position"] = [4.0, 5.0]
    with pytest.raises(ValueError, match=r"e\.mrk\.json: control point 2 \('AC'\): position: \[4.0, 5.0\] is not"):
        read_slicer_json(_write(tmp_path / "e.mrk.json", json.dumps(bad)))
    bad["markups"][0]["controlPoints"][2]["position"] = [4.0, None, 6.0]
    assert np.isnan(read_slicer_json(_write(tmp_path / "f.mrk.json", json.dumps(bad))).points["AC"][1][1])


# ----------------------------------------------------------------------------- images
def test_read_image_2d_formats_rgb_and_spacing(tmp_path: Path) -> None:
    rgb = np.zeros((3, 4, 3), np.uint8)  # (y, x, c)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 100, 200, 50
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "rgb.png"))
    img = read_image(tmp_path / "rgb.png", spacing_override=0.1)
    assert img.GetNumberOfComponentsPerPixel() == 1 and img.GetSize() == (4, 3)
    np.testing.assert_allclose(sitk.GetArrayFromImage(img), 0.299 * 100 + 0.587 * 200 + 0.114 * 50, rtol=1e-5)
    assert img.GetSpacing() == (0.1, 0.1)
    gray = (np.arange(12, dtype=np.uint8) * 10).reshape(3, 4)
    for ext in ("bmp", "tif", "png", "jpg"):
        sitk.WriteImage(sitk.GetImageFromArray(gray), str(tmp_path / f"g.{ext}"))
        out = read_image(tmp_path / f"g.{ext}", spacing_override=(0.2, 0.3))
        assert out.GetSize() == (4, 3) and out.GetSpacing() == (0.2, 0.3)
        if ext != "jpg":  # lossless formats keep the pixels
            np.testing.assert_array_equal(sitk.GetArrayFromImage(out), gray)


@pytest.mark.parametrize("ext", ["mha", "mhd", "nii.gz", "nrrd"])
def test_read_image_3d_formats_keep_geometry(tmp_path: Path, ext: str) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)  # (z, y, x)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 0.7, 2.0))
    img.SetOrigin((1.0, 2.0, 3.0))
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    sitk.WriteImage(img, str(tmp_path / f"v.{ext}"))
    out = read_image(tmp_path / f"v.{ext}")
    assert out.GetSize() == (4, 3, 2)
    np.testing.assert_allclose(out.GetSpacing(), (0.5, 0.7, 2.0), rtol=1e-6)
    np.testing.assert_allclose(out.GetOrigin(), (1.0, 2.0, 3.0), atol=1e-5)
    np.testing.assert_allclose(out.GetDirection(), (-1, 0, 0, 0, -1, 0, 0, 0, 1), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), arr)
    size, spacing, origin, direction = read_image_info(tmp_path / f"v.{ext}")
    assert size == (4, 3, 2) and direction.shape == (3, 3)


def test_read_image_dicom_series_and_single_slice(tmp_path: Path) -> None:
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 0.7, 2.0))
    img.SetOrigin((1.0, 2.0, 3.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    folder = tmp_path / "dicom"
    folder.mkdir()
    for k in range(arr.shape[0]):
        s = img[:, :, k]
        for tag, value in {"0020|000e": "1.2.826.0.1.3680043.2.1125.1.1", "0020|000d": "1.2.826.0.1.3680043.2.1125.1.2",
                           "0020|0032": "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, k)))),
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": "0.7\\0.5", "0020|0013": str(k),
                           "0008|0060": "MR"}.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k}.dcm"))
        writer.Execute(s)
    out = read_image(folder)
    assert out.GetSize() == (6, 5, 4)
    np.testing.assert_allclose(out.GetSpacing(), (0.5, 0.7, 2.0))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), arr)
    single = read_image(folder / "0.dcm", ndim=2)
    assert single.GetDimension() == 2 and single.GetSize() == (6, 5)


def test_read_image_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png")
    broken = _write(tmp_path / "broken.png", "this is not a png")
    with pytest.raises(ValueError, match=r"broken\.png: cannot read image"):
        read_image(broken)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match="no DICOM series"):
        read_image(empty)


@pytest.mark.parametrize("spacing, message", [
    ("0.5 -1", r"spacing \(0\.5, -1\.0\) in the image header is not positive"),
    ("0 1", r"spacing \(0\.0, 1\.0\) in the image header is not positive")])
def test_image_header_with_bad_spacing_names_the_file(tmp_path: Path, spacing: str, message: str) -> None:
    path = tmp_path / "s.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4), np.uint8)), str(path))
    path.write_bytes(path.read_bytes().replace(b"ElementSpacing = 1 1", b"ElementSpacing = " + spacing.encode()))
    for read in (read_image_info, read_image):
        with pytest.raises(ValueError, match=message) as info:
            read(path)
        assert str(info.value).startswith(f"{path}: ")
    with pytest.raises(ValueError, match=r"spacing \(-1\.0, -1\.0\) in the spacing override is not positive"):
        read_image(_png(tmp_path), spacing_override=-1.0)


def _png(tmp_path: Path) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4), np.uint8)), str(tmp_path / "ok.png"))
    return tmp_path / "ok.png"


def _dicom_slice(folder: Path, name: str, series_uid: str, k: int = 0) -> None:
    img = sitk.GetImageFromArray(np.full((1, 5, 6), k, np.int16))
    s = img[:, :, 0]
    for tag, value in {"0020|000e": series_uid, "0020|000d": "1.2.826.0.1.3680043.2.1125.1.2",
                       "0020|0032": f"0\\0\\{k}", "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": "0.7\\0.5",
                       "0020|0013": str(k), "0008|0060": "CT"}.items():
        s.SetMetaData(tag, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(folder / name))
    writer.Execute(s)


def test_a_dicom_folder_of_several_series_is_refused_naming_it(tmp_path: Path) -> None:
    """A localizer beside the axial series: the first series GDCM listed was read, with a warning only."""
    folder = tmp_path / "study"
    folder.mkdir()
    _dicom_slice(folder, "a.dcm", "1.2.826.0.1.3680043.2.1125.1.1")
    _dicom_slice(folder, "b.dcm", "1.2.826.0.1.3680043.2.1125.1.9")
    with pytest.raises(ValueError, match=r"study: 2 DICOM series in this directory .*give one series' folder"):
        read_image(folder)


def test_tiff_and_jpeg_resolution_tags_are_no_spacing(tmp_path: Path) -> None:
    """ITK read a TIFF's resolution tag (dots per inch) as its spacing (72 dpi: 0.3528 mm) while the data set's
    report said its millimetres were pixels: read at 1.0 unless a spacing is given, header and pixels alike."""
    img = sitk.GetImageFromArray((np.arange(12, dtype=np.uint8) * 10).reshape(3, 4))
    img.SetSpacing((25.4 / 72, 25.4 / 72))
    sitk.WriteImage(img, str(tmp_path / "page.tif"))
    assert sitk.ReadImage(str(tmp_path / "page.tif")).GetSpacing() != (1.0, 1.0)  # what ITK itself reports
    assert read_image(tmp_path / "page.tif").GetSpacing() == (1.0, 1.0)
    assert read_image_info(tmp_path / "page.tif")[1].tolist() == [1.0, 1.0]
    assert read_image(tmp_path / "page.tif", spacing_override=0.1).GetSpacing() == (0.1, 0.1)


def test_a_spacing_for_another_dimension_names_the_image(tmp_path: Path) -> None:
    """Two spacing values for a 3D image failed in numpy's broadcast, naming no file."""
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4), np.uint8)), str(tmp_path / "stack.tif"))
    with pytest.raises(ValueError, match=r"stack\.tif: a 3D image, but 2 spacing values were given"):
        read_image(tmp_path / "stack.tif", spacing_override=(0.1, 0.1))


@pytest.mark.parametrize("reader, text", [
    (read_long_csv, "image,landmark,x,y\nc\u00e9ph,a,1,2\n"),
    (read_points_csv, "a,3,4\nc\u00e9ph,1,2\n"),
    (read_slicer_fcsv, "# Markups fiducial file version = 4.11\n0,1,2,3,0,0,0,1,1,1,0,c\u00e9,,\n"),
])
def test_text_that_is_not_utf8_names_the_file(tmp_path: Path, reader: object, text: str) -> None:
    """A CSV saved by Excel in cp1252: "'utf-8' codec can't decode byte 0xe9", naming no file."""
    path = tmp_path / "excel.csv"
    path.write_bytes(text.encode("cp1252"))
    with pytest.raises(ValueError, match=r"excel\.csv: not UTF-8 text \(byte 0xe9 on line 2\); save it as UTF-8"):
        reader(path)  # type: ignore[operator]


def test_a_dicom_without_pixel_spacing_is_known_to_store_none(tmp_path: Path) -> None:
    """GDCM reads a DICOM without a pixel-spacing attribute (a secondary-capture cephalogram) at 1.0 mm: its
    millimetres were taken for real ones, in training data sets and in predict alike."""
    from lmlib.data.checks import check_spacing
    from lmlib.data.readers import DICOM_SPACING_TAGS, stores_no_spacing

    image = sitk.GetImageFromArray(np.arange(30, dtype=np.int16).reshape(5, 6))
    image.SetSpacing((0.1, 0.1))
    sitk.WriteImage(image, str(tmp_path / "ceph.dcm"))
    assert not stores_no_spacing(tmp_path / "ceph.dcm") and not check_spacing("ceph", tmp_path / "ceph.dcm", False)
    data = (tmp_path / "ceph.dcm").read_bytes()
    # GDCM writes the spacing as Pixel Spacing (0028,0030) or, for a secondary capture, Nominal Scanned Pixel
    # Spacing (0018,2010), implicit VR little endian; renamed to a tag that means nothing, no spacing is left
    tags = [bytes.fromhex(k[2:4] + k[0:2] + k[7:9] + k[5:7]) for k in DICOM_SPACING_TAGS]  # "gggg|eeee", LE
    assert [data.count(t) for t in tags].count(1) == 1 and sum(data.count(t) for t in tags) == 1
    tag = next(t for t in tags if t in data)
    (tmp_path / "bare.dcm").write_bytes(data.replace(tag, tag[:2] + b"\x11\x20"))
    assert read_image(tmp_path / "bare.dcm", ndim=2).GetSpacing() == (1.0, 1.0)  # GDCM's fallback
    assert stores_no_spacing(tmp_path / "bare.dcm")
    assert [r.issue for r in check_spacing("bare", tmp_path / "bare.dcm", False)] == ["no_spacing"]
    assert stores_no_spacing(tmp_path / "page.png") and not stores_no_spacing(tmp_path / "v.mha")
