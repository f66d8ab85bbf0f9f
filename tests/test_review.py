"""Review and correct: the flagged landmarks of a prediction folder, largest region first; each decision written at
once and resumable; the reviewed folder loads as a declared data set with the decided points (2D labelme, 3D
Slicer markups)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lmlib.data.datasets import load_dataset
from lmlib.data.sample import Sample
from lmlib.review import ReviewSession

PredictionFolder = Callable[[int], tuple[Path, list[Sample]]]  # the conftest fixture: ndim -> folder, phantoms



@pytest.mark.parametrize("ndim", [2, 3])
def test_review_decisions_are_written_at_once_resume_and_load_as_a_dataset(
        prediction_folder: PredictionFolder, ndim: int) -> None:
    folder, phantoms = prediction_folder(ndim)
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


def test_a_folder_without_a_review_list_is_refused_with_the_way_out(prediction_folder: PredictionFolder) -> None:
    folder, _ = prediction_folder(2)
    table = pd.read_csv(folder / "predictions.csv").drop(columns=["review"])
    table.to_csv(folder / "predictions.csv", index=False)
    with pytest.raises(ValueError, match="--regions 0.9 0.95 --review-mm"):
        ReviewSession(folder)
    with pytest.raises(FileNotFoundError, match="no predictions.csv"):
        ReviewSession(folder.parent / "images")


@pytest.mark.parametrize("ndim", [2, 3])
def test_the_review_widget_accepts_moves_and_skips_through_the_list(
        prediction_folder: PredictionFolder, ndim: int) -> None:
    """The buttons' actions without a browser: Accept keeps the prediction, the offset sliders move the point (drawn
    as the 'corrected' series) and Save correction writes it, Skip leaves it for a later widget, which resumes."""
    pytest.importorskip("ipywidgets", reason="the widget needs ipywidgets (the notebooks extra)")
    from lmlib.reporting.review_widget import ReviewWidget

    folder, phantoms = prediction_folder(ndim)
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


def test_without_clicks_the_review_figure_is_a_png_redrawn_by_the_sliders(prediction_folder: PredictionFolder) -> None:
    """Without ipympl's canvas the figure is a PNG widget (lmlib.reporting.figure_widget), redrawn when a slider
    moves the point."""
    pytest.importorskip("ipywidgets", reason="the widget needs ipywidgets (the notebooks extra)")
    from lmlib.reporting.review_widget import ReviewWidget

    folder, _ = prediction_folder(2)
    widget = ReviewWidget(ReviewSession(folder), clicks=False)
    before = bytes(widget.picture.value)
    widget.offsets[0].value = 0.5
    after = bytes(widget.picture.value)
    assert before.startswith(b"\x89PNG") and after.startswith(b"\x89PNG") and after != before
    assert widget.picture in widget.widget.children


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_click_or_a_drag_on_the_image_places_the_point(
        prediction_folder: PredictionFolder, ndim: int) -> None:
    """With ipympl's canvas a mouse press in a plane puts the point there (3D: the coordinate across the plane kept),
    a drag moves it, the sliders follow, and Save correction writes the clicked place."""
    pytest.importorskip("ipympl", reason="clicks need ipympl (the notebooks extra)")
    from matplotlib.backend_bases import MouseEvent

    from lmlib.reporting.review_widget import ReviewWidget

    folder, _ = prediction_folder(ndim)
    widget = ReviewWidget(ReviewSession(folder), clicks=True)
    item = widget.item
    geometry = widget.session.sample(item.image_id).geometry
    predicted = np.asarray(item.predicted_mm, dtype=float)

    def press(plane: int, world: np.ndarray, name: str = "button_press_event") -> None:
        drawn = (0, 1) if ndim == 2 else ((0, 1), (0, 2), (1, 2))[plane]
        index = geometry.world_to_index(world.reshape(1, -1))[0]
        ax = widget.fig.axes[plane]
        x, y = ax.transData.transform((index[drawn[0]], index[drawn[1]]))
        widget.canvas.callbacks.process(name, MouseEvent(name, widget.canvas, x, y, button=1))

    target = predicted + np.array([2.0, -1.5, 1.0])[:ndim]
    press(0, target)
    expected = target.copy()
    if ndim == 3:
        expected[2] = predicted[2]  # the axial plane: z kept
    np.testing.assert_allclose(widget.candidate_mm(), expected, atol=1e-6)
    np.testing.assert_allclose([s.value for s in widget.offsets], expected - predicted, atol=1e-6)
    dragged = expected + np.array([-0.5, 0.5, 0.0])[:ndim]
    press(0, dragged, "motion_notify_event")
    press(0, dragged, "button_release_event")
    press(0, predicted, "motion_notify_event")  # released: a move without the button does nothing
    np.testing.assert_allclose(widget.candidate_mm(), dragged, atol=1e-6)
    if ndim == 3:  # the sagittal plane (y, z): x kept
        press(2, predicted + np.array([5.0, 1.0, -2.0]))
        np.testing.assert_allclose(widget.candidate_mm(), [dragged[0], predicted[1] + 1.0, predicted[2] - 2.0],
                                   atol=1e-6)
    placed = widget.candidate_mm()
    widget.correct()
    log = pd.read_csv(folder / "reviewed" / "decisions.csv", dtype={"image_id": str})
    np.testing.assert_allclose(log.iloc[0][["x_mm", "y_mm", "z_mm"][:ndim]].to_numpy(float), placed, atol=1e-6)


def test_notebook_80_says_why_there_is_nothing_to_review(prediction_folder: PredictionFolder) -> None:
    """No review column, or images that are not files (phantoms made in memory): a message, not a failure."""
    pytest.importorskip("ipywidgets", reason="the widget needs ipywidgets (the notebooks extra)")
    from lmlib.reporting.review_widget import ReviewWidget, review_predictions

    folder, _ = prediction_folder(2)
    assert isinstance(review_predictions(str(folder)), ReviewWidget)
    table = pd.read_csv(folder / "predictions.csv")
    table.assign(image_path="gone/" + table["image_id"].astype(str) + ".mha").to_csv(folder / "predictions.csv",
                                                                                     index=False)
    assert review_predictions(str(folder)).startswith("nothing to open for review: ")
    table.drop(columns=["review"]).to_csv(folder / "predictions.csv", index=False)
    assert "no review list" in review_predictions(str(folder))
