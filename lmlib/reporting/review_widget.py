"""Review and correct in JupyterLab: the flagged landmarks of a prediction folder one at a time, largest region
first (:class:`~lmlib.review.ReviewSession`), each shown zoomed on its image (in 3D the three planes through it)
with its calibrated region.

    ReviewWidget(ReviewSession("new/pred"))   # the last expression of a cell shows it

*Accept* keeps the prediction; a click on the image, a drag, or the offset sliders move the point (mm along x,
y[, z], drawn live as the ``corrected`` series; in 3D a click in a plane keeps the coordinate across it) and *Save
correction* writes it; *Skip* leaves it for later. Clicks need ``ipympl`` (the notebooks extra: the figure is its
interactive canvas, with zoom and pan in its toolbar); without it the sliders alone move the point. Every decision is written at
once by the session (``reviewed/decisions.csv`` and the image's annotation file), so a dead kernel loses nothing
and a new widget on the same folder starts at the first undecided landmark. Drawing is
:func:`lmlib.reporting.viewer.draw_view`; the buttons' actions are methods (:meth:`accept`, :meth:`correct`,
:meth:`skip`, and :meth:`place` for a click), testable without a browser.
"""
from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.backend_bases import MouseEvent
from matplotlib.figure import Figure

from lmlib.reporting.figure_widget import figure_image, show_figure
from lmlib.reporting.viewer import PLANES, ViewState, draw_view
from lmlib.review import ReviewItem, ReviewSession

PREDICTED, CORRECTED = "prediction", "corrected"


class ReviewWidget:
    """The review loop's widget (see the module docstring). ``zoom_mm``: half-width of the view around the
    landmark (default: twice its region, at least 10 mm); the sliders reach as far. ``clicks``: draw on ipympl's
    interactive canvas (None: when ipympl is installed)."""

    def __init__(self, session: ReviewSession, zoom_mm: float | None = None, clicks: bool | None = None) -> None:
        import ipywidgets as w

        self.session, self.zoom_mm = session, zoom_mm
        self.queue: list[ReviewItem] = session.pending
        self.position = 0
        size = (6.0, 6.0) if session.ndim == 2 else (12.0, 4.5)
        self.canvas = _click_canvas(Figure(figsize=size)) if clicks is not False else None
        if clicks and self.canvas is None:
            raise ImportError("clicks=True needs ipympl (pip install ipympl, in the notebooks extra)")
        if self.canvas is not None:
            self.fig = self.canvas.figure
            self._dragging = False
            self.canvas.mpl_connect("button_press_event", self._press)
            self.canvas.mpl_connect("motion_notify_event", self._drag)
            self.canvas.mpl_connect("button_release_event", self._release)
        else:
            self.fig = plt.figure(figsize=size)
            plt.close(self.fig)  # shown as the picture widget's PNG only
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
        self.picture = figure_image()
        self.widget = w.VBox([self.title, w.HBox([w.VBox(self.offsets), w.VBox(list(self.buttons.values()))]),
                              self.status, self.canvas if self.canvas is not None else self.picture])
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

    def place(self, plane: int, x: float, y: float) -> None:
        """Move the point to a clicked place: ``(x, y)`` the data coordinates of axes number ``plane`` (2D: the
        image, 0; 3D: axial, coronal, sagittal), i.e. continuous pixel indices of the two axes it draws; in 3D the
        coordinate across the plane is kept."""
        item = self.item
        if item is None:
            return
        geometry = self.session.sample(item.image_id).geometry
        drawn = (0, 1) if self.session.ndim == 2 else PLANES[plane][2]
        index = geometry.world_to_index(self.candidate_mm().reshape(1, -1))[0]
        index[list(drawn)] = x, y
        self._set_offsets(geometry.index_to_world(index.reshape(1, -1))[0] - np.asarray(item.predicted_mm))

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
            reach = self._zoom(item)  # as far as the view shows: a click anywhere in it fits the sliders
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
            state = ViewState(series=(PREDICTED, CORRECTED), names=True, landmark=k, voxel=voxel,
                              zoom_mm=self._zoom(item))
            draw_view(sample, {PREDICTED: predicted, CORRECTED: corrected}, state, regions, self.fig)
        if self.canvas is not None:
            self.canvas.draw_idle()
            return
        show_figure(self.picture, self.fig)

    def _zoom(self, item: ReviewItem) -> float:
        return self.zoom_mm if self.zoom_mm is not None else max(2.0 * item.region_mm, 10.0)

    def _set_offsets(self, offset_mm: np.ndarray) -> None:
        """Set the sliders to ``offset_mm`` (widening one that does not reach) and draw once."""
        for slider, value in zip(self.offsets, offset_mm):
            slider.unobserve_all("value")
            slider.min, slider.max = min(slider.min, float(value)), max(slider.max, float(value))
            slider.value = float(value)
            slider.observe(lambda _: self.render(), names="value")
        self.render()

    # ---- the mouse (ipympl's canvas): press places the point, a drag moves it; ignored while zooming or panning
    def _press(self, event: MouseEvent) -> None:
        mode = getattr(getattr(self.canvas, "toolbar", None), "mode", "")  # zoom or pan chosen in the toolbar
        if event.inaxes is None or event.button != 1 or mode:
            return
        self._dragging = True
        self._drag(event)

    def _drag(self, event: MouseEvent) -> None:
        if self._dragging and event.inaxes in self.fig.axes and event.xdata is not None and event.ydata is not None:
            self.place(self.fig.axes.index(event.inaxes), float(event.xdata), float(event.ydata))

    def _release(self, event: MouseEvent) -> None:
        self._dragging = False

    def __repr__(self) -> str:
        return (f"ReviewWidget: {len(self.queue)} flagged landmark(s) to review in {self.session.folder} "
                "(interactive in a live JupyterLab kernel)")

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """The widget in a live frontend; one line of text where widgets do not render (stored notebooks)."""
        bundle = self.widget._repr_mimebundle_(**kwargs) or {}
        return {**bundle, "text/plain": repr(self)}


def _click_canvas(fig: Figure) -> Any:
    """ipympl's interactive canvas (a widget) for ``fig``, or None without ipympl."""
    try:
        from ipympl.backend_nbagg import Canvas, FigureManager
    except ImportError:
        return None
    canvas = Canvas(fig)
    FigureManager(canvas, 0)  # gives the canvas its toolbar (zoom, pan)
    canvas.header_visible = False
    return canvas


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
    try:
        session.sample(session.pending[0].image_id)
    except (FileNotFoundError, ValueError) as exc:  # no file (made in memory, or moved), or a format without spacing
        return f"nothing to open for review: {exc}"
    return ReviewWidget(session)
