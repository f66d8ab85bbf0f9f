"""Review and correct in JupyterLab: the flagged landmarks of a prediction folder one at a time, largest region
first (:class:`~lmlib.review.ReviewSession`), each shown zoomed on its image (in 3D the three planes through it)
with its calibrated region.

    ReviewWidget(ReviewSession("new/pred"))   # the last expression of a cell shows it

*Accept* keeps the prediction; the offset sliders move the point (mm along x, y[, z], drawn live as the
``corrected`` series) and *Save correction* writes it; *Skip* leaves it for later. Every decision is written at
once by the session (``reviewed/decisions.csv`` and the image's annotation file), so a dead kernel loses nothing
and a new widget on the same folder starts at the first undecided landmark. Drawing is
:func:`lmlib.reporting.viewer.draw_view`; the buttons' actions are methods (:meth:`accept`, :meth:`correct`,
:meth:`skip`), testable without a browser.
"""
from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from lmlib.reporting.viewer import ViewState, draw_view
from lmlib.review import ReviewItem, ReviewSession

PREDICTED, CORRECTED = "prediction", "corrected"


class ReviewWidget:
    """The review loop's widget (see the module docstring). ``zoom_mm``: half-width of the view around the
    landmark (default: twice its region, at least 10 mm); the sliders reach 1.5 x the region (at least 5 mm)."""

    def __init__(self, session: ReviewSession, zoom_mm: float | None = None) -> None:
        import ipywidgets as w

        self.session, self.zoom_mm = session, zoom_mm
        self.queue: list[ReviewItem] = session.pending
        self.position = 0
        self.fig = plt.figure(figsize=(6.0, 6.0) if session.ndim == 2 else (12.0, 4.5))
        plt.close(self.fig)  # shown by the widget's output only
        self.title = w.HTML()
        self.offsets = [w.FloatSlider(description=f"d{a} (mm)", continuous_update=False, readout_format=".2f")
                        for a in "xyz"[:session.ndim]]
        for slider in self.offsets:
            slider.observe(lambda _: self.render(), names="value")
        self.buttons = {name: w.Button(description=name) for name in ("Accept", "Save correction", "Skip")}
        self.buttons["Accept"].on_click(lambda _: self.accept())
        self.buttons["Save correction"].on_click(lambda _: self.correct())
        self.buttons["Skip"].on_click(lambda _: self.skip())
        self.status = w.HTML()
        self.out = w.Output()
        self.widget = w.VBox([self.title, w.HBox([w.VBox(self.offsets), w.VBox(list(self.buttons.values()))]),
                              self.status, self.out])
        self._show()

    # ---- the list
    @property
    def item(self) -> ReviewItem | None:
        """The landmark under review (None when the list is done)."""
        return self.queue[self.position] if self.position < len(self.queue) else None

    def candidate_mm(self) -> np.ndarray:
        """The current item's point moved by the sliders (world mm)."""
        item = self.item
        if item is None:
            raise ValueError("the review list is done")
        return np.asarray(item.predicted_mm, dtype=np.float64) + np.array([s.value for s in self.offsets])

    # ---- the buttons
    def accept(self) -> None:
        """Keep the prediction and go to the next landmark."""
        item = self.item
        if item is not None:
            path = self.session.accept(item)
            self._next(f"accepted {item.image_id} / {item.landmark}: {path.name} written")

    def correct(self) -> None:
        """Write the moved point as the correction and go to the next landmark."""
        item = self.item
        if item is not None:
            point = self.candidate_mm()
            path = self.session.correct(item, point)
            moved = float(np.linalg.norm(point - np.asarray(item.predicted_mm)))
            self._next(f"corrected {item.image_id} / {item.landmark} by {moved:.2f} mm: {path.name} written")

    def skip(self) -> None:
        """Leave the landmark undecided (a later session shows it again) and go to the next one."""
        item = self.item
        if item is not None:
            self._next(f"skipped {item.image_id} / {item.landmark}")

    def _next(self, message: str) -> None:
        self.position += 1
        self.status.value = message
        self._show()

    # ---- drawing
    def _show(self) -> None:
        """Set the title and the sliders for the current item, then draw."""
        item = self.item
        for slider in self.offsets:
            slider.unobserve_all("value")
        if item is None:
            left = len(self.session.pending)
            self.title.value = (f"<b>done</b>: {len(self.queue) - left} of {len(self.queue)} decided"
                                + (f"; {left} skipped (a new widget shows them)" if left else ""))
            for b in self.buttons.values():
                b.disabled = True
        else:
            reach = max(1.5 * item.region_mm, 5.0)
            for slider in self.offsets:
                slider.min, slider.max, slider.value = -reach, reach, 0.0
                slider.step = reach / 200
            self.title.value = (f"<b>{self.position + 1} of {len(self.queue)}</b>: {item.image_id} / {item.landmark}, "
                                f"region {item.region_mm:.2f} mm")
        for slider in self.offsets:
            slider.observe(lambda _: self.render(), names="value")
        self.render()

    def render(self) -> None:
        item = self.item
        if item is None:
            self.fig.clear()
        else:
            sample = self.session.sample(item.image_id)
            names = list(sample.landmark_names)
            k = names.index(item.landmark)
            predicted = self.session.points(item.image_id)
            predicted[k] = item.predicted_mm
            corrected = np.full_like(predicted, np.nan)
            corrected[k] = self.candidate_mm()
            regions = np.full(len(names), np.nan)
            regions[k] = item.region_mm
            voxel = None
            if sample.ndim == 3:
                idx = sample.geometry.world_to_index(corrected[k].reshape(1, 3))[0]
                voxel = tuple(int(v) for v in np.clip(np.round(idx), 0, np.array(sample.size) - 1))
            zoom = self.zoom_mm if self.zoom_mm is not None else max(2.0 * item.region_mm, 10.0)
            state = ViewState(series=(PREDICTED, CORRECTED), names=True, landmark=k, voxel=voxel, zoom_mm=zoom)
            draw_view(sample, {PREDICTED: predicted, CORRECTED: corrected}, state, regions, self.fig)
        from IPython.display import display

        with self.out:
            self.out.clear_output(wait=True)
            display(self.fig)

    def __repr__(self) -> str:
        return (f"ReviewWidget: {len(self.queue)} flagged landmark(s) to review in {self.session.folder} "
                "(interactive in a live JupyterLab kernel)")

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """The widget in a live frontend; one line of text where widgets do not render (stored notebooks)."""
        bundle = self.widget._repr_mimebundle_(**kwargs) or {}
        return {**bundle, "text/plain": repr(self)}


def review_predictions(folder: str, spacing_mm: list[float] | None = None) -> ReviewWidget | str:
    """The review widget of a prediction folder (notebook 80's last cell), or why there is nothing to review: a
    folder predicted without calibrated regions has no review list, an empty list nothing to decide, and images that
    are not files (the synthetic phantoms, made in memory) nothing to open."""
    import pandas as pd

    from lmlib.review import ReviewSession

    table = pd.read_csv(f"{folder}/predictions.csv", nrows=1)
    if "review" not in table:
        return (f"{folder}: no review list (predict with calibrated regions and review_mm > 0 to get one; "
                "python -m lmlib.predict --regions 0.9 0.95 --review-mm MM)")
    session = ReviewSession(folder, spacing_mm)
    if not session.pending:
        return f"{folder}: nothing to review ({len(session.flagged)} flagged landmark(s), all decided)"
    from lmlib.predict import image_id

    first = session.pending[0]
    try:
        path = session.image_path(first.image_id)
        if image_id(path) != first.image_id:  # a copy made in memory (posed, deformed) names its original's file
            return (f"nothing to open for review: the file {path.name} does not carry the id {first.image_id} (a "
                    "copy made in memory, posed or deformed, names its original's file): the file may not be the "
                    "image predicted")
        session.sample(first.image_id)
    except (FileNotFoundError, ValueError) as exc:  # no file (phantoms), or a format without spacing
        return f"nothing to open for review: {exc}"
    return ReviewWidget(session)
