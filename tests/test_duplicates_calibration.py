"""Identical images across a split (by pixels, not names), spacing from a calibration distance, landmark counts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lmlib.data.datasets import load_dataset, seeded_splits
from lmlib.data.duplicates import duplicate_groups, keep_groups_together


def _image(path: Path, value: int, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.arange(size[0] * size[1]).reshape(size[1], size[0]) * 7 + value * 31) % 251
    sitk.WriteImage(sitk.GetImageFromArray(pixels.astype(np.uint8)), str(path))


def _layout(root: Path, values: dict[str, int], splits: dict[str, str] | None, points: dict[str, list] | None = None,
            calibration: str = "", landmarks: str = "3") -> Path:
    """Images with the given pixel seeds (equal seed = same pixels), one points CSV, a split file if given."""
    for image_id, v in values.items():
        _image(root / "images" / f"{image_id}.png", v)
    rows = [f"{i}," + ",".join(str(c) for p in (points or {}).get(i, [[5, 5], [10, 12], [20, 5]]) for c in p)
            for i in values]
    (root / "points.csv").write_text("\n".join(rows) + "\n")
    if splits is not None:
        (root / "splits.csv").write_text("image_id,split\n" + "".join(f"{i},{s}\n" for i, s in splits.items()))
    decl = root / "toy.yaml"
    decl.write_text(f"name: toy\nndim: 2\nimages: images/*.png\nreader: points_csv\nannotations:\n  a: points.csv\n"
                    f"landmarks: {landmarks}\nspacing_mm: [0.5, 0.5]\n" if not calibration else
                    f"name: toy\nndim: 2\nimages: images/*.png\nreader: points_csv\nannotations:\n  a: points.csv\n"
                    f"landmarks: {landmarks}\n{calibration}")
    if splits is not None:
        decl.write_text(decl.read_text() + "splits: splits.csv\n")
    return decl


def test_a_copy_on_two_sides_of_the_split_is_refused_naming_the_files(tmp_path: Path) -> None:
    # b is a copy of a (same pixels, another name); c differs
    decl = _layout(tmp_path, {"a": 1, "b": 1, "c": 2, "d": 3}, {"a": "train", "b": "test", "c": "val", "d": "test"})
    with pytest.raises(ValueError, match=r"a\.png \(train\) = b\.png \(test\)"):
        load_dataset(decl)


def test_copies_on_one_side_are_reported_and_kept(tmp_path: Path) -> None:
    decl = _layout(tmp_path, {"a": 1, "b": 1, "c": 2, "d": 3}, {"a": "train", "b": "train", "c": "val", "d": "test"})
    ds = load_dataset(decl)
    assert ds.duplicates == [["a", "b"]]
    rows = ds.report[ds.report["issue"] == "identical_image"]
    assert sorted(rows["image_id"]) == ["a", "b"] and "same pixels as b (train)" in set(rows["detail"])
    assert all(s.valid.all() for s in ds)  # reported, nothing masked


def test_a_seeded_split_keeps_copies_together(tmp_path: Path) -> None:
    values = {f"{k:02d}": k for k in range(20)} | {"99": 0}  # 99 is a copy of 00
    decl = _layout(tmp_path, values, None)
    plain = seeded_splits(sorted(values), (0.6, 0.2, 0.2), 0)
    ds = load_dataset(decl)
    got = {s.image_id: s.meta["split"] for s in ds}
    assert got["99"] == got["00"]
    assert keep_groups_together(plain, [["00", "99"]]) == got


def test_duplicates_are_found_by_pixels_not_by_file_or_header(tmp_path: Path) -> None:
    _image(tmp_path / "x.png", 4)
    img = sitk.ReadImage(str(tmp_path / "x.png"))
    img.SetSpacing((0.3, 0.3))
    sitk.WriteImage(img, str(tmp_path / "y.mha"))  # same pixels, other format and header
    _image(tmp_path / "z.png", 5)
    _image(tmp_path / "w.png", 4, size=(30, 40))  # other size
    groups = duplicate_groups({k: tmp_path / f for k, f in (("x", "x.png"), ("y", "y.mha"), ("z", "z.png"),
                                                                ("w", "w.png"))})
    assert groups == [["x", "y"]]


def test_spacing_from_a_calibration_distance(tmp_path: Path) -> None:
    points = {"a": [[5, 5], [10, 12], [25, 5]], "b": [[5, 5], [10, 12], [15, 5]]}
    decl = _layout(tmp_path, {"a": 1, "b": 2}, {"a": "train", "b": "test"}, points,
                   calibration="spacing_from_landmarks: {landmarks: ['1', '3'], distance_mm: 50}\n")
    ds = load_dataset(decl)
    np.testing.assert_allclose(ds["a"].geometry.spacing, [2.5, 2.5])  # 50 mm / 20 px
    np.testing.assert_allclose(ds["b"].geometry.spacing, [5.0, 5.0])  # 50 mm / 10 px
    for s in ds:
        assert np.linalg.norm(s.landmarks_mm[0] - s.landmarks_mm[2]) == pytest.approx(50.0)
        assert "50 mm between landmarks 1 and 3" in s.meta["spacing_source"]
    assert not (ds.report["issue"] == "no_spacing").any()


def test_a_masked_calibration_landmark_is_an_error_naming_the_file(tmp_path: Path) -> None:
    points = {"a": [[5, 5], [10, 12], [25, 5]], "b": [[5, 5], [10, 12], ["", ""]]}
    decl = _layout(tmp_path, {"a": 1, "b": 2}, {"a": "train", "b": "test"}, points,
                   calibration="spacing_from_landmarks: {landmarks: ['1', '3'], distance_mm: 50}\n")
    with pytest.raises(ValueError, match=r"points\.csv \(line 2\).*image 'b'.*calibration landmark\(s\) \['3'\]"):
        load_dataset(decl)


@pytest.mark.parametrize("entry, message", [
    ("spacing_from_landmarks: {landmarks: ['1', '9'], distance_mm: 50}\n", "unknown labels: \\['9'\\]"),
    ("spacing_from_landmarks: {landmarks: ['1'], distance_mm: 50}\n", "spacing_from_landmarks: must be"),
    ("spacing_from_landmarks: {landmarks: ['1', '2'], distance_mm: -1}\n", "distance_mm"),
    ("spacing_from_landmarks: {landmarks: ['1', '2'], distance_mm: 50}\nspacing_mm: [1, 1]\n", "keep one"),
])
def test_bad_calibration_declarations(tmp_path: Path, entry: str, message: str) -> None:
    decl = _layout(tmp_path, {"a": 1, "b": 2}, {"a": "train", "b": "test"}, calibration=entry)
    with pytest.raises(ValueError, match=message):
        load_dataset(decl)


def test_landmarks_by_count(tmp_path: Path) -> None:
    decl = _layout(tmp_path, {"a": 1, "b": 2}, {"a": "train", "b": "test"})
    assert load_dataset(decl).landmark_names == ("1", "2", "3")


# ---- declarations and split files that silently did nothing or wrote elsewhere before (issue 25 part)
@pytest.mark.parametrize("name", ["synthetic2d", "hamedan-ceph", "..", "a/b", "my data"])
def test_a_declared_name_must_be_a_plain_folder_name_of_its_own(tmp_path: Path, name: str) -> None:
    decl = _layout(tmp_path, {"a": 1, "b": 2}, {"a": "train", "b": "test"})
    decl.write_text(decl.read_text().replace("name: toy", f"name: '{name}'"))
    with pytest.raises(ValueError, match="name: must be a plain folder name"):
        load_dataset(decl)


def test_duplicate_landmark_names_and_unknown_exclusions_are_refused(tmp_path: Path) -> None:
    decl = _layout(tmp_path, {"a": 1, "b": 2}, {"a": "train", "b": "test"})
    text = decl.read_text()
    decl.write_text(text.replace("landmarks: 3", "landmarks: [{label: '1', name: tip}, {label: '2', name: tip}, '3']"))
    with pytest.raises(ValueError, match=r"landmark names \['tip'\]"):
        load_dataset(decl)
    decl.write_text(text + "exclude: [{annotator: A, image_id: a, reason: x}]\n")  # the annotator is 'a'
    with pytest.raises(ValueError, match=r"exclude names annotator\(s\) \['A'\]"):
        load_dataset(decl)
    decl.write_text(text + "exclude: [{annotator: a, image_id: A, reason: x}]\n")  # the image is 'a'
    with pytest.raises(ValueError, match=r"exclude names image\(s\) \['A'\]"):
        load_dataset(decl)


@pytest.mark.parametrize("rows, message", [("a,Test\nb,train\n", r"split 'Test' is not one of"),
                                           ("a,validation\nb,train\n", r"split 'validation'"),
                                           ("a,train\na,test\nb,val\n", r"\['a'\] listed more than once")])
def test_bad_split_files_are_refused_naming_the_line(tmp_path: Path, rows: str, message: str) -> None:
    decl = _layout(tmp_path, {"a": 1, "b": 2}, {"a": "train", "b": "test"})
    (tmp_path / "splits.csv").write_text("image_id,split\n" + rows)
    with pytest.raises(ValueError, match=message):
        load_dataset(decl)


def test_split_rows_without_an_image_are_reported(tmp_path: Path) -> None:
    decl = _layout(tmp_path, {"a": 1, "b": 2}, {"a": "train", "b": "test", "C": "val"})
    rows = load_dataset(decl).report
    assert list(rows.loc[rows["issue"] == "split_without_image", "image_id"]) == ["C"]


def test_the_driver_refuses_to_override_the_names_it_owns() -> None:
    from lmlib.run import main, parse_overrides

    for item in ("dataset=synthetic3d", "output_dir=/tmp/x", "data_dir=x"):
        with pytest.raises(ValueError, match="the driver sets"):
            parse_overrides([item])
    assert main(["--dataset", "synthetic2d", "--only", "exploration", "--set", "dataset=synthetic3d"]) == 2


def test_overrides_read_true_and_false_as_the_parameter_tables_spell_them() -> None:
    """``--set torch_compile=true`` was the string 'true', refused by the notebook's check mid-run ("must be true or
    false")."""
    from lmlib.run import parse_overrides

    assert parse_overrides(["torch_compile=true", "augment=False", "flip_test=FALSE", "max_epochs=3",
                            "image_size=[128, 192]", "annotator=senior"]) == {
        "torch_compile": True, "augment": False, "flip_test": False, "max_epochs": 3, "image_size": [128, 192],
        "annotator": "senior"}


def test_images_the_split_file_leaves_out_are_reported(tmp_path: Path) -> None:
    """An image missing from splits.csv (a spreadsheet made 001 into 1) fell out of every split, unreported."""
    decl = _layout(tmp_path, {"a": 1, "b": 2, "c": 3}, {"a": "train", "b": "test"})
    ds = load_dataset(decl)
    rows = ds.report[ds.report["issue"] == "not_in_split"]
    assert list(rows["image_id"]) == ["c"] and rows["file"].iloc[0].endswith("c.png")
    assert "is in no split" in rows["detail"].iloc[0] and ds["c"].meta["split"] is None


def test_spacing_mm_over_a_header_that_differs_is_refused_naming_the_file(tmp_path: Path) -> None:
    """spacing_mm silently replaced the spacing an .mha header stores (0.3 mm read as 0.5): the image moved under
    its landmarks, and predicting the same file (which keeps the header) disagreed with training."""
    decl = _layout(tmp_path, {"a": 1, "b": 2}, None)
    for i in ("a", "b"):
        image = sitk.ReadImage(str(tmp_path / "images" / f"{i}.png"))
        image.SetSpacing((0.3, 0.3))
        sitk.WriteImage(image, str(tmp_path / "images" / f"{i}.mha"))
    decl.write_text(decl.read_text().replace("images/*.png", "images/*.mha"))
    with pytest.raises(ValueError, match=r"a\.mha: its header's spacing \[0\.3, 0\.3\] mm differs from spacing_mm "
                                         r"\[0\.5, 0\.5\]"):
        load_dataset(decl)
    decl.write_text(decl.read_text().replace("spacing_mm: [0.5, 0.5]", "spacing_mm: [0.3, 0.3]"))
    assert load_dataset(decl)["a"].geometry.spacing.tolist() == [0.3, 0.3]  # the same spacing: nothing to refuse


def test_one_table_file_per_image_is_read_as_that_images_record(tmp_path: Path) -> None:
    """annotations: ann/{image_id}.csv with a table reader: AttributeError 'list' object has no attribute 'image_id'."""
    _layout(tmp_path, {"a": 1, "b": 2}, None)
    (tmp_path / "ann").mkdir()
    for i in ("a", "b"):
        (tmp_path / "ann" / f"{i}.csv").write_text(f"image,landmark,x,y\n{i},p,5,6\n{i},q,7,8\n")
    decl = tmp_path / "per_image.yaml"
    decl.write_text("name: per_image\nndim: 2\nimages: images/*.png\nreader: long_csv\nannotations:\n"
                    "  a: ann/{image_id}.csv\nlandmarks: [p, q]\nspacing_mm: [0.5, 0.5]\n")
    ds = load_dataset(decl)
    np.testing.assert_allclose(ds["b"].landmarks_mm, [[2.5, 3.0], [3.5, 4.0]])
    (tmp_path / "ann" / "b.csv").write_text("image,landmark,x,y\n")  # a header only: b is not annotated
    rows = load_dataset(decl).report
    assert rows.loc[rows["image_id"] == "b", "issue"].unique().tolist() == ["no_annotation"]
    (tmp_path / "ann" / "b.csv").write_text("image,landmark,x,y\nb,p,5,6\nb,q,7,8\nz,p,1,1\nz,q,2,2\n")
    with pytest.raises(ValueError, match=r"b\.csv: reader 'long_csv' found 2 images' records \(b, z\) in a file of "
                                         r"image 'b' only"):
        load_dataset(decl)


def test_a_declaration_or_split_file_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    decl = _layout(tmp_path, {"a": 1, "b": 2}, {"a": "train", "b": "test"})
    decl.write_bytes(decl.read_bytes() + "description: C\u00e9phalom\u00e9trie\n".encode("cp1252"))
    with pytest.raises(ValueError, match=r"toy\.yaml: not UTF-8 text \(byte 0xe9 on line \d+\)"):
        load_dataset(decl)
    decl = _layout(tmp_path, {"a": 1, "b": 2}, {"a": "train", "b": "test"})
    (tmp_path / "splits.csv").write_bytes("image_id,split\na,train\nb,test\n\u00e9,val\n".encode("cp1252"))
    with pytest.raises(ValueError, match=r"splits\.csv: not UTF-8 text \(byte 0xe9 on line 4\)"):
        load_dataset(decl)
