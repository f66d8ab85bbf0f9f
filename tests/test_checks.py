"""Annotation checks: duplicates/missing masked with a warning naming file and label, report rows."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from lmlib.data.checks import (
    MASKING_ISSUES,
    OUTSIDE_TOLERANCE_PX,
    REPORT_COLUMNS,
    Issue,
    check_inside,
    check_size,
    check_spacing,
    make_report,
    mask_image,
    masked_by,
    masked_counts,
    resolve_landmarks,
    summarize_report,
)
from lmlib.data.readers import RawAnnotation


def _ann() -> RawAnnotation:
    ann = RawAnnotation("002", units="index", source=Path("/data/a1/002.json"), image_size=(40, 30))
    ann.add("l1", [1.0, 2.0])
    ann.add("l2", [3.0, 4.0])
    ann.add("l2", [9.0, 9.0])  # ambiguous
    ann.add("l3", [5.0, 6.0])
    ann.add("l3", [5.0, 6.0])  # same point twice: harmless
    ann.add("zz", [0.0, 0.0])  # not a dataset label
    return ann


def test_resolve_masks_duplicates_and_missing_with_warnings() -> None:
    with pytest.warns(UserWarning) as rec:
        pts, valid, issues = resolve_landmarks(_ann(), ["l1", "l2", "l3", "l4"], annotator="annotator1")
    messages = [str(w.message) for w in rec]
    assert len(messages) == 2
    assert any("/data/a1/002.json" in m and "'l2'" in m and "duplicate" in m for m in messages)
    assert any("/data/a1/002.json" in m and "'l4'" in m and "missing" in m for m in messages)
    np.testing.assert_array_equal(valid, [True, False, True, False])
    np.testing.assert_allclose(pts[0], [1.0, 2.0])
    np.testing.assert_allclose(pts[2], [5.0, 6.0])
    assert np.isnan(pts[[1, 3]]).all()
    got = {(i.image_id, i.annotator, i.landmark, i.issue) for i in issues}
    assert got == {("002", "annotator1", "l2", "duplicate"), ("002", "annotator1", "l3", "repeated"),
                   ("002", "annotator1", "l4", "missing"), ("002", "annotator1", "zz", "unknown")}
    dup = next(i for i in issues if i.issue == "duplicate")
    assert "(3.00, 4.00); (9.00, 9.00)" in dup.detail and dup.file == "/data/a1/002.json"


def test_resolve_without_warnings_and_dimension_errors() -> None:
    ann = RawAnnotation("x", source=Path("x.json"))
    ann.add("a", [1.0, 2.0, 3.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pts, valid, _ = resolve_landmarks(ann, ["a", "b"], warn=False)
    assert pts.shape == (2, 3) and valid.tolist() == [True, False]
    with pytest.raises(ValueError, match="x.json"):
        resolve_landmarks(ann, ["a"], ndim=2, warn=False)


def test_inside_size_spacing() -> None:
    # pixel edges at index -0.5 and size - 0.5; tolerated up to 0.5 px beyond: index in [-1, size]
    assert OUTSIDE_TOLERANCE_PX == 0.5
    idx = np.array([[-1.0, 0.0], [40.0, 30.0], [40.1, 3.0], [np.nan, np.nan], [2.0, -1.01], [np.inf, 0.0],
                    [1e6, 5.0]])
    out = check_inside("i", idx, (40, 30), ["a", "b", "c", "d", "e", "f", "g"], "A", "f.json")
    assert [(o.landmark, o.issue) for o in out] == [("c", "outside"), ("e", "outside"), ("g", "outside")]
    assert "outside" in MASKING_ISSUES and "(40.10, 3.00)" in out[0].detail and "(40, 30)" in out[0].detail
    np.testing.assert_array_equal(masked_by(out, ["a", "c", "e", "g"]), [False, True, True, True])
    assert [o.landmark for o in check_inside("i", idx, (40, 30), list("abcdefg"), tolerance=0.0)] == list("abceg")
    ann = _ann()
    assert check_size(ann, (40, 30)) == []
    (mismatch,) = check_size(ann, (41, 30), "A")
    assert mismatch.issue == "size_mismatch" and "(40, 30)" in mismatch.detail and "(41, 30)" in mismatch.detail
    assert check_spacing("i", "img.png", spacing_given=True) == []
    assert check_spacing("i", "img.mha", spacing_given=False) == []
    (ns,) = check_spacing("i", "img.PNG", spacing_given=False)
    assert ns.issue == "no_spacing" and ns.file == "img.PNG"


def test_non_finite_points_are_masked_with_one_row_each() -> None:
    ann = RawAnnotation("003", source=Path("/data/a1/003.json"))
    ann.add("l1", [np.nan, 2.0])  # a null coordinate
    ann.add("l2", [np.inf, 2.0])
    ann.add("l3", [1.0, 2.0])
    ann.add("l4", [np.nan, np.nan])
    ann.add("l4", [1.0, 1.0])  # NaN next to a number: still masked, one row
    with pytest.warns(UserWarning) as rec:
        pts, valid, issues = resolve_landmarks(ann, ["l1", "l2", "l3", "l4"], annotator="A")
    assert valid.tolist() == [False, False, True, False] and np.isnan(pts[[0, 1, 3]]).all()
    assert [(i.landmark, i.issue) for i in issues] == [("l1", "non_finite"), ("l2", "non_finite"), ("l4", "non_finite")]
    assert "(nan, 2.00)" in issues[0].detail and "(inf, 2.00)" in issues[1].detail
    assert len(rec) == 3 and all("/data/a1/003.json" in str(w.message) and "masked" in str(w.message) for w in rec)


def test_shapes_that_are_not_points_are_reported() -> None:
    ann = RawAnnotation("004", source=Path("/data/a1/004.json"))
    ann.add("l1", [1.0, 2.0])
    ann.other_shapes = {"l1": ["shape 1: rectangle"], "l2": ["shape 2: polygon", "shape 3: line"],
                        "jaw": ["shape 4: polygon"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pts, valid, issues = resolve_landmarks(ann, ["l1", "l2"], annotator="A")
    assert valid.tolist() == [True, False]
    got = [(i.landmark, i.issue) for i in issues]
    assert got == [("l1", "shape_ignored"), ("l2", "not_a_point"), ("jaw", "shape_ignored")]
    assert "polygon" in issues[1].detail and "line" in issues[1].detail and "not_a_point" in MASKING_ISSUES
    assert "shape_ignored" not in MASKING_ISSUES


def test_image_level_masking_gives_one_row_per_landmark() -> None:
    rows = mask_image("9", ["l1", "l2", "l3"], "duplicate_image", "2 records (line 2, line 5)", "a.csv", "A")
    assert [(r.landmark, r.issue) for r in rows] == [("l1", "duplicate_image"), ("l2", "duplicate_image"),
                                                     ("l3", "duplicate_image")]
    assert masked_by(rows, ["l1", "l2", "l3"]).all()
    with pytest.raises(ValueError, match="image-level"):
        mask_image("9", ["l1"], "missing", "", "f")


def test_report_and_summary(capsys: pytest.CaptureFixture[str]) -> None:
    issues = [Issue("2", "b", "l1", "missing", "label not given", "f2"),
              Issue("1", "a", "l2", "duplicate", "given 2 times", "f1")]
    report = make_report(issues)
    assert tuple(report.columns) == REPORT_COLUMNS
    assert report["annotator"].tolist() == ["a", "b"]
    text = summarize_report(report)
    printed = capsys.readouterr().out
    assert text in printed and "2 issues in 2 images" in text and "a: duplicate: 1" in text
    assert "[b] 2 l1: missing" in text
    assert "masked landmarks: a: 1, b: 1" in text and masked_counts(report) == {"a": 1, "b": 1}
    unmasked = make_report([Issue("2", "b", "l1", "repeated", "", "f2"), Issue("2", "b", "", "no_spacing", "", "f2")])
    assert "masked landmarks: none" in summarize_report(unmasked, print_it=False)
    empty = make_report([])
    assert empty.empty and tuple(empty.columns) == REPORT_COLUMNS
    assert summarize_report(empty, print_it=False) == "annotation checks: no issues"
    many = make_report([Issue(str(k), "a", "l1", "missing", "", "f") for k in range(5)])
    assert "3 more rows" in summarize_report(many, max_rows=2, print_it=False)


def test_summary_counts_the_data_sets_images_and_folds_image_level_rows() -> None:
    """A 9-image sample with a 901-row CSV read "901 issues in 901 images", and a missing annotation file was
    listed once per landmark (issue 24)."""
    orphans = [Issue(f"x{k}", "a", "", "no_image", "annotation without image", "pts.csv") for k in range(900)]
    missing = mask_image("7", ["l1", "l2", "l3"], "no_annotation", "no annotation: file not found", "ann/7.json", "a")
    text = summarize_report(make_report(orphans + missing + [Issue("8", "a", "l1", "missing", "label not given", "f")]),
                            print_it=False)
    assert text.splitlines()[0] == ("annotation checks: 4 issues in 2 images; 900 annotation record(s) without an "
                                    "image (e.g. x0, x1, x10)")
    assert "[a] 7 (all 3 landmarks): no_annotation: no annotation: file not found" in text
    assert "a: no_image: 900" in text and "x5" not in text.split("\n", 1)[1]
