"""Review and correct: the flagged landmarks of a prediction folder, largest region first; each decision written at
once and resumable; the reviewed folder loads as a declared data set with the decided points (2D labelme, 3D
Slicer markups)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from lmlib.data.datasets import load_dataset
from lmlib.data.phantoms import make_phantom_dataset
from lmlib.outputs.exports import prediction_table
from lmlib.predict import load_images
from lmlib.review import ReviewSession


def _prediction_folder(tmp_path: Path, ndim: int) -> tuple[Path, list]:
    """What ``lmlib.predict --regions 0.9 0.95 --review-mm 2`` writes, for phantoms saved as images: predictions
    1 mm off the truth, every other landmark flagged with a region of its own size."""
    size = (48, 40) if ndim == 2 else (24, 20, 16)
    phantoms = make_phantom_dataset(ndim, n_images=2, seed=4, size=size, n_landmarks=3)
    paths = []
    for s in phantoms:
        image = sitk.GetImageFromArray(np.asarray(s.image, np.float32).T)
        image.SetSpacing([float(v) for v in s.geometry.spacing])
        image.SetOrigin([float(v) for v in s.geometry.origin])
        paths.append(tmp_path / "images" / f"{s.image_id}.mha")
        paths[-1].parent.mkdir(exist_ok=True)
        sitk.WriteImage(image, str(paths[-1]))
    folder = tmp_path / "pred"
    folder.mkdir()
    samples = load_images(paths, phantoms[0].landmark_names, ndim)
    predicted = [s.landmarks_mm + 1.0 for s in phantoms]
    table = prediction_table(samples, predicted, [np.ones(3)] * 2, paths, relative_to=folder)
    table["region_90_mm"] = np.arange(len(table), dtype=float)
    table["region_95_mm"] = table["region_90_mm"] + 0.5
    table["review"] = np.arange(len(table)) % 2 == 1
    table.to_csv(folder / "predictions.csv", index=False)
    return folder, phantoms


@pytest.mark.parametrize("ndim", [2, 3])
def test_review_decisions_are_written_at_once_resume_and_load_as_a_dataset(tmp_path: Path, ndim: int) -> None:
    folder, phantoms = _prediction_folder(tmp_path, ndim)
    session = ReviewSession(folder)
    flagged = session.flagged
    assert [i.region_mm for i in flagged] == sorted((i.region_mm for i in flagged), reverse=True)
    assert len(flagged) == 3 and session.pending == flagged  # rows 1, 3, 5 of 6: largest (95 % level) first
    first, second = flagged[0], flagged[1]
    truth = {(s.image_id, n): p for s in phantoms for n, p in zip(s.landmark_names, s.landmarks_mm)}
    written = session.correct(first, truth[(first.image_id, first.landmark)])
    assert written.is_file() and (folder / "reviewed" / "decisions.csv").is_file()

    # the kernel dies here: a new session resumes with the next landmark and keeps the decision
    again = ReviewSession(folder)
    assert again.pending == flagged[1:]
    again.accept(second)
    assert ReviewSession(folder).pending == flagged[2:]
    with pytest.raises(ValueError, match=f"{ndim} finite world coordinates"):
        again.correct(flagged[2], [np.nan] * ndim)

    declaration = again.write_dataset()
    data = load_dataset(str(declaration))
    assert data.annotator == "reviewed" and len(data.samples) == 2 and data.report.empty
    for s in data.samples:
        original = next(p for p in phantoms if p.image_id == s.image_id)
        for k, name in enumerate(s.landmark_names):
            expected = truth[(s.image_id, name)] if (s.image_id, name) == (first.image_id, first.landmark) \
                else original.landmarks_mm[k] + 1.0  # accepted or never flagged: the prediction
            np.testing.assert_allclose(s.landmarks_mm[k], expected, atol=1e-6)
    log = pd.read_csv(folder / "reviewed" / "decisions.csv")
    assert list(log["decision"]) == ["corrected", "accepted"]


def test_a_folder_without_a_review_list_is_refused_with_the_way_out(tmp_path: Path) -> None:
    folder, _ = _prediction_folder(tmp_path, 2)
    table = pd.read_csv(folder / "predictions.csv").drop(columns=["review"])
    table.to_csv(folder / "predictions.csv", index=False)
    with pytest.raises(ValueError, match="--regions 0.9 0.95 --review-mm"):
        ReviewSession(folder)
    with pytest.raises(FileNotFoundError, match="no predictions.csv"):
        ReviewSession(tmp_path / "images")


@pytest.mark.parametrize("ndim", [2, 3])
def test_the_review_widget_accepts_moves_and_skips_through_the_list(tmp_path: Path, ndim: int) -> None:
    """The buttons' actions without a browser: Accept keeps the prediction, the offset sliders move the point (drawn
    as the 'corrected' series) and Save correction writes it, Skip leaves it for a later widget, which resumes."""
    pytest.importorskip("ipywidgets", reason="the widget needs ipywidgets (the notebooks extra)")
    from lmlib.reporting.review_widget import ReviewWidget

    folder, phantoms = _prediction_folder(tmp_path, ndim)
    widget = ReviewWidget(ReviewSession(folder))
    first, second, third = widget.queue
    assert widget.item == first and "1 of 3" in widget.title.value and len(widget.offsets) == ndim
    widget.accept()
    assert widget.item == second and "accepted" in widget.status.value
    widget.offsets[0].value = 0.5  # move along x by 0.5 mm: the figure shows the moved point
    drawn = {c.get_label(): len(c.get_offsets()) for ax in widget.fig.axes for c in ax.collections}
    assert drawn.get("corrected") == 1
    widget.correct()
    assert "corrected" in widget.status.value and "by 0.50 mm" in widget.status.value
    widget.skip()
    assert widget.item is None and "1 skipped" in widget.title.value
    log = pd.read_csv(folder / "reviewed" / "decisions.csv", dtype={"image_id": str})
    assert list(log["decision"]) == ["accepted", "corrected"]
    assert log.iloc[1]["x_mm"] == pytest.approx(second.predicted_mm[0] + 0.5)
    again = ReviewWidget(ReviewSession(folder))
    assert again.queue == [third]
    assert "1 flagged landmark(s)" in again._repr_mimebundle_()["text/plain"]


def test_notebook_80_says_why_there_is_nothing_to_review(tmp_path: Path) -> None:
    """No review column, or images that are not files (phantoms made in memory): a message, not a failure."""
    pytest.importorskip("ipywidgets", reason="the widget needs ipywidgets (the notebooks extra)")
    from lmlib.reporting.review_widget import ReviewWidget, review_predictions

    folder, _ = _prediction_folder(tmp_path, 2)
    assert isinstance(review_predictions(str(folder)), ReviewWidget)
    table = pd.read_csv(folder / "predictions.csv")
    table.assign(image_path="gone/" + table["image_id"].astype(str) + ".mha").to_csv(folder / "predictions.csv",
                                                                                     index=False)
    assert review_predictions(str(folder)).startswith("nothing to open for review: ")
    table.drop(columns=["review"]).to_csv(folder / "predictions.csv", index=False)
    assert "no review list" in review_predictions(str(folder))
