"""Dataset specs and load_dataset: small layouts written here, then the real data when present."""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lmlib.data.checks import MASKING_ISSUES, masked_counts
from lmlib.data.datasets import (
    AFIDS_NAMES,
    CEPH_ISBI_NAMES,
    SPECS,
    Dataset,
    DatasetSpec,
    get_spec,
    load_dataset,
    load_from_spec,
    paired_landmarks,
    shared_data_dir,
)
from lmlib.evaluation.metrics import radial_errors, summarize

SHARED = shared_data_dir()
realdata = pytest.mark.skipif(not (SHARED / "hamedan-ceph").is_dir() or not (SHARED / "afids-mni").is_dir(),
                              reason=f"real data not found at {SHARED}")
LABELS = [f"l{k}" for k in range(1, 20)]


def _labelme(path: Path, shapes: list[tuple[str, list[float | None]]], size: tuple[int, int] = (40, 30),
             extra: tuple[dict, ...] = ()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": "5.0.1", "imageWidth": size[0], "imageHeight": size[1], "imageData": None,
                                "shapes": [{"label": lab, "points": [xy], "shape_type": "point"}
                                           for lab, xy in shapes] + list(extra)}))


def _assert_every_masked_landmark_has_one_row(ds: Dataset) -> dict[str, int]:
    """Per annotator of ``ds``: masked landmarks == masking report rows, and they name the same ones."""
    rows = ds.report[(ds.report["annotator"] == ds.annotator) & ds.report["issue"].isin(MASKING_ISSUES)]
    labels = ds.samples[0].meta["landmark_labels"]
    masked = sorted((s.image_id, labels[k]) for s in ds for k in np.flatnonzero(~s.valid))
    assert sorted(zip(rows["image_id"], rows["landmark"])) == masked
    assert masked_counts(ds.report).get(ds.annotator, 0) == len(masked)
    assert f"{ds.annotator}: {len(masked)}" in ds.summary(print_it=False).splitlines()[1]
    return {"masked": len(masked), "rows": len(rows)}


def _points(k0: float) -> list[tuple[str, list[float]]]:
    return [(lab, [k0 + k, 2.0 * k + 1.0]) for k, lab in enumerate(LABELS)]


@pytest.fixture()
def mini_hamedan(tmp_path: Path) -> Path:
    """hamedan-ceph layout: 4 PNGs 40x50, two annotators, one duplicate, one missing, 123 excluded."""
    tmp_path = tmp_path / "hamedan-ceph"
    (tmp_path / "images").mkdir(parents=True)
    for i in ("001", "002", "122", "123"):
        sitk.WriteImage(sitk.GetImageFromArray(np.full((50, 40), int(i) % 255, np.uint8)),
                        str(tmp_path / "images" / f"{i}.png"))
        a1 = _points(1.5)
        a2 = _points(2.5)
        if i == "002":
            a1.append(("l11", [5.0, 5.0]))
        if i == "001":
            a1 = [s for s in a1 if s[0] != "l16"]
        _labelme(tmp_path / "annotations" / "annotator1" / f"{i}.json", a1, size=(40, 50))
        _labelme(tmp_path / "annotations" / "annotator2" / f"{i}.json", a2, size=(40, 50))
    (tmp_path / "splits.csv").write_text("image_id,split\n001,train\n002,val\n122,test\n123,test\n")
    return tmp_path


def test_hamedan_spec_on_a_small_copy(mini_hamedan: Path) -> None:
    with pytest.warns(UserWarning) as rec:
        ds = load_dataset("hamedan-ceph", data_dir=mini_hamedan)
    msgs = [str(w.message) for w in rec]
    assert any("002.json" in m and "'l11'" in m for m in msgs) and any("001.json" in m and "'l16'" in m for m in msgs)
    assert not any("123" in m for m in msgs)  # annotator2's exclusion is reported, not warned, for annotator1
    assert ds.annotator == "annotator1" and len(ds) == 4 and ds.landmark_names == CEPH_ISBI_NAMES
    got = set(ds.report[["annotator", "image_id", "landmark", "issue"]].itertuples(index=False, name=None))
    assert got == {("annotator1", "002", "l11", "duplicate"), ("annotator1", "001", "l16", "missing")} | {
        ("annotator2", "123", lab, "excluded") for lab in LABELS}  # one row per masked landmark
    s = ds["002"]
    assert s.meta["split"] == "val" and s.meta["annotation_file"].endswith("002.json")
    assert s.meta["landmark_labels"] == tuple(LABELS) and s.size == (40, 50) and s.image[0, 0] == 2
    assert not s.valid[10] and s.valid.sum() == 18
    # labelme corner convention: index = xy - 0.5; world = index * 0.1264 (origin 0, identity direction)
    np.testing.assert_allclose(s.landmarks_mm[0], [(1.5 - 0.5) * 0.1264, (1.0 - 0.5) * 0.1264])
    np.testing.assert_allclose(s.landmarks_index[1], [2.0, 2.5])
    assert [x.image_id for x in ds.split("test")] == ["122", "123"]
    with pytest.warns(UserWarning):
        train = load_dataset("hamedan-ceph", data_dir=mini_hamedan.parent, split="train")  # the data root
    assert [x.image_id for x in train] == ["001"] and train.report.equals(ds.report)


def test_second_annotator_exclusion_and_header_only(mini_hamedan: Path) -> None:
    with pytest.warns(UserWarning, match=r"123\.json: all landmarks of image 123 masked"):
        a2 = load_dataset("hamedan-ceph", data_dir=mini_hamedan, annotator="annotator2", load_images=False)
    assert not a2["123"].valid.any() and a2["122"].valid.all()
    assert _assert_every_masked_landmark_has_one_row(a2) == {"masked": 19, "rows": 19}
    assert a2["001"].size == (40, 50) and a2["001"].meta["image_loaded"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a1 = load_dataset("hamedan-ceph", data_dir=mini_hamedan, load_images=False)
    ref, other, ids = paired_landmarks(a1, a2)
    assert ids == ["001", "002", "122", "123"] and ref.shape == (4, 19, 2)
    err = radial_errors(other, ref)
    np.testing.assert_allclose(err[~np.isnan(err)], 0.1264)  # a2 = a1 shifted by one pixel in x
    assert np.isnan(err).sum() == 2 + 19  # 001 l16, 002 l11, all of 123
    with pytest.raises(ValueError, match="unknown annotator"):
        load_dataset("hamedan-ceph", data_dir=mini_hamedan, annotator="annotator3")


def test_landmark_groups_must_name_landmarks_of_the_dataset() -> None:
    spec = SPECS["afids-mni"]
    with pytest.raises(ValueError, match="group 'plane'.*'nose'"):
        dataclasses.replace(spec, landmark_groups={"plane": ("AC", "nose")})
    with pytest.raises(ValueError, match="at least 2 distinct"):
        dataclasses.replace(spec, landmark_groups={"plane": ("AC", "AC")})
    assert SPECS["hamedan-ceph"].group_indices() == {}


def test_missing_data_dir_and_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere.*'hamedan-ceph'"):
        load_dataset("hamedan-ceph", data_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown dataset"):
        get_spec("mnist")
    with pytest.raises(TypeError, match="unexpected keyword"):
        load_dataset("hamedan-ceph", data_dir=tmp_path, deformed=3)
    with pytest.raises(FileNotFoundError, match="no images matching"):
        load_dataset("hamedan-ceph", data_dir=tmp_path)


def test_custom_spec_reports_size_outside_spacing_and_orphans(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((30, 40), np.uint8)), str(tmp_path / "img" / "a.png"))
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((30, 40), np.uint8)), str(tmp_path / "img" / "b.png"))
    _labelme(tmp_path / "ann" / "a.json", [("p", [50.0, 5.0]), ("q", [1.0, 1.0])], size=(41, 30))
    _labelme(tmp_path / "ann" / "c.json", [("p", [1.0, 1.0])])
    spec = DatasetSpec("toy", 2, "img/*.png", "labelme", {"me": "ann/{image_id}.json"}, ("p", "q"), ("P", "Q"),
                       lr_pairs=(("P", "Q"),))
    assert spec.pair_indices() == [(0, 1)]
    with pytest.warns(UserWarning) as rec:
        ds = load_from_spec(spec, tmp_path)
    messages = [str(w.message) for w in rec]
    assert any("a.json: landmark 'p' outside" in m for m in messages) and any("no annotation" in m for m in messages)
    issues = sorted(ds.report[["image_id", "landmark", "issue"]].itertuples(index=False, name=None))
    assert issues == [("a", "", "no_spacing"), ("a", "", "size_mismatch"), ("a", "p", "outside"),
                      ("b", "", "no_spacing"), ("b", "p", "no_annotation"), ("b", "q", "no_annotation"),
                      ("c", "", "no_image")]
    assert ds["a"].valid.tolist() == [False, True] and not ds["b"].valid.any()  # outside: masked and reported
    assert np.isnan(ds["a"].landmarks_mm[0]).all()
    assert ds["a"].geometry.spacing.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="unknown landmarks"):
        DatasetSpec("bad", 2, "*", "labelme", {}, ("p",), ("P",), lr_pairs=(("P", "X"),))
    with pytest.raises(ValueError, match=r"bad: spacing_mm \(0\.1, -0\.1\) must be 2 positive numbers"):
        DatasetSpec("bad", 2, "*", "labelme", {}, ("p",), ("P",), spacing_mm=(0.1, -0.1))
    with pytest.raises(ValueError, match=r"bad: landmark labels \['p'\] are given more than once"):
        DatasetSpec("bad", 2, "*", "labelme", {}, ("p", "p"), ("P", "Q"))


def test_every_masked_landmark_has_exactly_one_report_row(mini_hamedan: Path) -> None:
    """Null, infinite, far-outside, polygon-only and missing points, per annotator, on the small copy."""
    a1 = _points(1.5)
    a1[2] = ("l3", [None, 4.0])
    a1[3] = ("l4", [float("inf"), 4.0])
    a1[4] = ("l5", [400.0, 4.0])
    a1[6] = ("l7", [40.4, 50.4])  # 0.4 px beyond the corner: within the tolerance, kept
    del a1[5]  # l6: a polygon only
    _labelme(mini_hamedan / "annotations" / "annotator1" / "122.json", a1, size=(40, 50),
             extra=({"label": "l6", "points": [[1, 1], [3, 3], [1, 3]], "shape_type": "polygon"},))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds1 = load_dataset("hamedan-ceph", data_dir=mini_hamedan, load_images=False)
        ds2 = load_dataset("hamedan-ceph", data_dir=mini_hamedan, annotator="annotator2", load_images=False)
    got = {(r.landmark, r.issue) for r in ds1.report.itertuples() if r.image_id == "122"}
    assert got == {("l3", "non_finite"), ("l4", "non_finite"), ("l5", "outside"), ("l6", "not_a_point")}
    assert ds1["122"].valid.sum() == 15 and ds1["122"].valid[6]
    assert _assert_every_masked_landmark_has_one_row(ds1) == {"masked": 6, "rows": 6}  # + 001 l16, 002 l11
    assert _assert_every_masked_landmark_has_one_row(ds2) == {"masked": 19, "rows": 19}  # 123 excluded
    text = ds1.summary(print_it=False)
    assert "masked landmarks: annotator1: 6, annotator2: 19" in text
    assert "annotator1: non_finite: 2 (masked)" in text and "annotator1: outside: 1 (masked)" in text


def _wide_csv(tmp_path: Path, rows: list[str]) -> DatasetSpec:
    (tmp_path / "img").mkdir(parents=True, exist_ok=True)
    for k, i in enumerate(("a", "b", "c")):
        sitk.WriteImage(sitk.GetImageFromArray(np.full((30, 40), k, np.uint8)), str(tmp_path / "img" / f"{i}.png"))
    (tmp_path / "lm.csv").write_text("image_name,image_width,image_height,n_landmarks,landmark_1_x,landmark_1_y,"
                                     "landmark_2_x,landmark_2_y\n" + "".join(r + "\n" for r in rows))
    return DatasetSpec("wide", 2, "img/*.png", "landmark_csv", {"me": "lm.csv"}, ("landmark_1", "landmark_2"),
                       ("P", "Q"), spacing_mm=(0.2, 0.2))


def test_one_file_csv_duplicate_and_missing_rows_are_masked_and_reported(tmp_path: Path) -> None:
    spec = _wide_csv(tmp_path, ["a.png,40,30,2,1,2,3,4", "b.png,40,30,2,5,6,7,8", "a.png,40,30,2,1,2,3,5"])
    with pytest.warns(UserWarning) as rec:
        ds = load_from_spec(spec, tmp_path)
    messages = [str(w.message) for w in rec]
    assert any("lm.csv: all landmarks of image a masked (2, duplicate_image)" in m for m in messages)
    assert any("lm.csv: all landmarks of image c masked (2, no_annotation)" in m for m in messages)
    rows = sorted(ds.report[["image_id", "landmark", "issue"]].itertuples(index=False, name=None))
    assert rows == [("a", "landmark_1", "duplicate_image"), ("a", "landmark_2", "duplicate_image"),
                    ("c", "landmark_1", "no_annotation"), ("c", "landmark_2", "no_annotation")]
    assert "line 2, line 4" in ds.report["detail"][0] and ds.report["file"][0].endswith("lm.csv")
    assert not ds["a"].valid.any() and ds["b"].valid.all() and not ds["c"].valid.any()
    np.testing.assert_allclose(ds["b"].landmarks_mm, [[1.0, 1.2], [1.4, 1.6]])
    assert _assert_every_masked_landmark_has_one_row(ds) == {"masked": 4, "rows": 4}


def test_header_only_csv_masks_and_reports_every_image(tmp_path: Path) -> None:
    spec = _wide_csv(tmp_path / "h", [])
    with pytest.warns(UserWarning, match="no records at all"):
        ds = load_from_spec(spec, tmp_path / "h")
    assert len(ds.report) == 6 and set(ds.report["issue"]) == {"no_annotation"}
    assert not any(s.valid.any() for s in ds)
    assert "masked landmarks: me: 6" in ds.summary(print_it=False)


def test_isbi_layout_takes_spacing_from_the_format(tmp_path: Path) -> None:
    (tmp_path / "RawImage" / "TrainingData").mkdir(parents=True)
    for k, i in enumerate(("001", "002")):
        rgb = np.full((30, 40, 3), 7 + k, np.uint8)  # grayscale stored as 24-bit BMP (two different pictures)
        path = tmp_path / "RawImage" / "TrainingData" / f"{i}.bmp"
        sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))
    for who, dx in (("senior", 0), ("junior", 2)):
        d = tmp_path / "AnnotationsByMD" / f"400_{who}"
        d.mkdir(parents=True)
        (d / "001.txt").write_text("\n".join(f"{k + dx},{k}" for k in range(19)) + "\n3\n")
    with pytest.warns(UserWarning):
        ds = load_dataset("isbi2015-ceph", data_dir=tmp_path, annotator="junior")
    s = ds["001"]
    assert s.geometry.spacing.tolist() == [0.1, 0.1] and s.image.shape == (40, 30) and s.image.max() == 7
    np.testing.assert_allclose(s.landmarks_mm[5], [0.7, 0.5])
    assert set(ds.report["issue"]) == {"no_annotation", "no_spacing"}  # 002 has no txt: nothing to take 0.1 from
    assert set(ds.report["image_id"]) == {"002"}


def _mini_afids(tmp_path: Path) -> Path:
    img = sitk.Image(20, 24, 22, sitk.sitkInt16)
    img.SetOrigin((10.0, 12.0, -10.0))
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS+ NIfTI, as the MNI template
    sitk.WriteImage(img, str(tmp_path / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"))
    rows = [f"vtkMRMLMarkupsFiducialNode_{k},{(-1) ** k * 0.1 * k},{0.2 * k - 3},{0.1 * k},0,0,0,1,1,1,0,{k},"
            f"{AFIDS_NAMES[k - 1]},vtkMRMLScalarVolumeNode1" for k in range(1, 33)]
    (tmp_path / "tpl-MNI152NLin2009cAsym_res-01_desc-groundtruth_afids.fcsv").write_text(
        "# Markups fiducial file version = 4.6\n# CoordinateSystem = 0\n"
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n" + "\n".join(rows) + "\n")
    return tmp_path


def test_afids_spec_converts_ras_to_lps(tmp_path: Path) -> None:
    ds = load_dataset("afids-mni", data_dir=_mini_afids(tmp_path))
    (s,) = ds.samples
    assert s.image_id == "MNI152NLin2009cAsym" and s.meta["split"] == "test" and s.image.shape == (20, 24, 22)
    k = 3  # RAS (-0.3, -2.4, 0.3) -> LPS (0.3, 2.4, 0.3) -> index (10 - 0.3, 12 - 2.4, 10.3)
    np.testing.assert_allclose(s.landmarks_mm[k - 1], [0.3, 2.4, 0.3], atol=1e-9)
    np.testing.assert_allclose(s.landmarks_index[k - 1], [9.7, 9.6, 10.3], atol=1e-9)
    assert ds.report.empty and len(SPECS["afids-mni"].lr_pairs) == 11


def test_synthetic_datasets_dispatch_to_phantoms() -> None:
    pytest.importorskip("lmlib.data.phantoms")
    for name, ndim in (("synthetic2d", 2), ("synthetic3d", 3)):
        kw = {"n_images": 5, "seed": 0, "size": (32,) * ndim}
        ds = load_dataset(name, **kw)
        assert len(ds) == 5 and ds.spec.ndim == ndim and all(s.ndim == ndim for s in ds)
        assert all("split" in s.meta for s in ds) and ds.report.empty
        train = load_dataset(name, split="train", **kw)
        assert 0 < len(train) < 5
        assert all(s.meta["split"] == "train" for s in train)


# ----------------------------------------------------------------------------- real data
KNOWN_DEFECTS = {("annotator1", i, lab, "duplicate") for i, lab in
                 [("002", "l11"), ("009", "l15"), ("010", "l12"), ("064", "l7"), ("098", "l5"), ("109", "l13"),
                  ("109", "l14"), ("137", "l16"), ("140", "l1")]} | {
    ("annotator2", "002", "l17", "duplicate"), ("annotator2", "002", "l18", "missing"),
    ("annotator1", "086", "l16", "missing")}
EXCLUDED_123 = {("annotator2", "123", lab, "excluded") for lab in LABELS}  # one row per masked landmark


@pytest.mark.realdata
@realdata
def test_hamedan_report_and_interobserver_figures() -> None:
    with pytest.warns(UserWarning):
        a1 = load_dataset("hamedan-ceph", data_dir=SHARED / "hamedan-ceph", load_images=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a2 = load_dataset("hamedan-ceph", data_dir=SHARED / "hamedan-ceph", annotator="annotator2", load_images=False)
    rows = set(a1.report[["annotator", "image_id", "landmark", "issue"]].itertuples(index=False, name=None))
    copies = {("", i, "", "identical_image") for i in ("014", "087", "057", "134", "075", "129", "109", "144")}
    assert rows == KNOWN_DEFECTS | EXCLUDED_123 | copies and len(a1.report) == len(KNOWN_DEFECTS) + 19 + 8
    assert a1.duplicates == [["014", "087"], ["057", "134"], ["075", "129"], ["109", "144"]]  # shared/data/README.md
    assert a2.report.equals(a1.report) and not a2["123"].valid.any()
    assert _assert_every_masked_landmark_has_one_row(a1) == {"masked": 10, "rows": 10}
    assert _assert_every_masked_landmark_has_one_row(a2) == {"masked": 21, "rows": 21}
    # the corrected split (2026-12-03): the copies 087, 109, 129 moved from val/test to train
    assert len(a1) == 150 and [len(a1.split(k)) for k in ("train", "val", "test")] == [103, 19, 28]
    assert all(s.size == (1340, 1671) for s in a1)
    ref, other, _ = paired_landmarks(a1, a2)
    stats = summarize(radial_errors(other, ref))
    assert stats["n_points"] == 2819
    assert round(stats["mre_mm"], 2) == 1.45 and round(stats["median_mm"], 2) == 1.14
    assert [round(stats[f"sdr_{t}mm"], 1) for t in ("2", "2.5", "3", "4")] == [77.2, 84.7, 90.4, 96.0]


@pytest.mark.realdata
@realdata
def test_hamedan_images_load() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_dataset("hamedan-ceph", data_dir=SHARED / "hamedan-ceph", split="val")
    assert len(ds) == 19 and all(s.meta["split"] == "val" for s in ds)
    s = ds[0]
    assert s.image.shape == (1340, 1671) and s.image.dtype == np.float32 and s.image.max() > 100
    assert s.geometry.spacing.tolist() == [0.1264, 0.1264]


@pytest.mark.realdata
@realdata
def test_afids_mni_geometry_and_ras_to_lps() -> None:
    ds = load_dataset("afids-mni", data_dir=SHARED / "afids-mni")
    (s,) = ds.samples
    assert len(s.landmark_names) == 32 and s.valid.all() and ds.report.empty
    assert s.size == (193, 229, 193) and s.geometry.spacing.tolist() == [1.0, 1.0, 1.0]
    idx = s.landmarks_index
    assert ((idx >= 0) & (idx <= np.array(s.size) - 1)).all()
    centre = np.array(s.size) / 2
    for name in ("AC", "PC"):
        assert np.linalg.norm(idx[s.landmark_names.index(name)] - centre) < 40  # voxels (= mm)
    # LPS: left landmarks have x > 0, right ones x < 0, mirrored; same y and z within a few mm
    pairs = ds.spec.pair_indices()
    left, right = s.landmarks_mm[[a for a, _ in pairs]], s.landmarks_mm[[b for _, b in pairs]]
    assert (left[:, 0] > 0).all() and (right[:, 0] < 0).all()
    np.testing.assert_allclose(left[:, 0], -right[:, 0], atol=3.0)
    np.testing.assert_allclose(left[:, 1:], right[:, 1:], atol=4.0)
    # anterior-posterior: AC is anterior of PC, i.e. smaller LPS y; the landmarks sit inside the brain
    ac, pc = s.landmarks_mm[0], s.landmarks_mm[1]
    assert ac[1] < pc[1] - 20
    img = s.image
    fg = np.argwhere(img > 0.2 * img.max())
    world_centroid = s.geometry.index_to_world(fg.mean(axis=0))[0]
    assert abs(s.landmarks_mm[:, 1].mean() - world_centroid[1]) < 15
    # the midsagittal group: ten AFIDs on one plane, x = 0 in MNI space (within 0.25 mm in the file)
    group = ds.spec.group_indices()["midsagittal"]
    assert len(group) == 10 and [s.landmark_names[k] for k in group][:2] == ["AC", "PC"]
    assert np.abs(s.landmarks_mm[group, 0]).max() < 0.5
    others = [k for k in range(32) if k not in group]
    assert np.abs(s.landmarks_mm[others, 0]).min() > 1.5  # every other AFID is lateral (mammillary bodies: 2 mm)


@pytest.mark.slow
@pytest.mark.realdata
@realdata
def test_afids_deformed_copies() -> None:
    pytest.importorskip("lmlib.data.deformations")
    ds = load_dataset("afids-mni", data_dir=SHARED / "afids-mni", deformed=4, seed=1)
    assert len(ds) == 5 and ds.template is ds.samples[-1]  # the template is scored as one more test image
    assert ds.template.meta["split"] == "test" and ds.template in ds.split("test")
    assert {s.meta["split"] for s in ds} <= {"train", "val", "test"}
    assert all(s.size == ds.template.size for s in ds)


@pytest.mark.slow
@pytest.mark.realdata
@realdata
def test_afids_run_data_is_the_deformation_set_plus_the_template() -> None:
    from lmlib.engine.runner import load_run_data

    ds = load_run_data({"dataset": "afids-mni", "data_dir": str(SHARED / "afids-mni"), "n_deformed": 5})
    splits = [s.meta["split"] for s in ds]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (3, 1, 2)
    template = ds.samples[-1]
    assert "_def" not in template.image_id and template.meta["split"] == "test"
    # deformed copies moved the landmarks: none equals the template's layout
    assert all(np.abs(s.landmarks_mm - template.landmarks_mm).max() > 0.5 for s in ds.samples[:-1])
