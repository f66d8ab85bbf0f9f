"""An interactive viewer for JupyterLab (ipywidgets): images of a run, a comparison or a prediction folder with the
ground truth, each method's predictions, the calibrated regions and the landmark names, each toggled; a landmark
list with each method's error (mm) beside it, where choosing a landmark centres the view on it (in 3D: the three
orthogonal planes move to its voxel; sliders move each plane).

    viewer = LandmarkViewer(samples, {"htc": htc_mm, "heatmap_unet": unet_mm}, regions_mm=radii)
    viewer                   # the last expression of a cell shows it

One call per notebook: :func:`for_run` (a method notebook's ``result``), :func:`for_comparison` (the comparison's
``comp``), :func:`for_predictions` (the prediction notebook's ``result``) and :func:`for_dataset` (the exploration's
images, each masked landmark listed with the report's reason). Executed without a live frontend (papermill, the
committed result notebooks) a viewer shows one line saying what it holds.

Drawing is :func:`draw_view` (matplotlib, testable without a browser); the widgets only choose its arguments.
The figure is a PNG in an ``ipywidgets.Image`` (:mod:`lmlib.reporting.figure_widget`); choosing a landmark zooms
on it. Committed result notebooks keep static figures: widgets render only in a live kernel.

Coordinates: points are world mm ``(x, y[, z])`` (:class:`~lmlib.data.sample.Sample` geometry); the planes are
drawn in voxel indices of the image's own grid.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse

from lmlib.data.sample import Sample
from lmlib.outputs.qualitative import show_plane
from lmlib.reporting.figure_widget import figure_image, show_figure

TRUTH = "ground truth"
COLORS = cast("tuple[tuple[float, float, float], ...]", cast(ListedColormap, plt.get_cmap("tab10")).colors)  # RGB
PLANES = (("axial", 2, (0, 1)), ("coronal", 1, (0, 2)), ("sagittal", 0, (1, 2)))  # name, normal axis, drawn axes


def predictions_by_image(frame: pd.DataFrame, samples: Sequence[Sample]) -> list[np.ndarray]:
    """A run's long predictions table (``predictions.csv``: image_id, landmark, x_mm, y_mm[, z_mm]) as one
    ``(K, D)`` array per sample, in each sample's landmark order (NaN where the table has no row)."""
    cols = ["x_mm", "y_mm", "z_mm"]
    table = frame.assign(image_id=frame["image_id"].astype(str)).set_index(["image_id", "landmark"])
    out = []
    for s in samples:
        pts = np.full((len(s.landmark_names), s.ndim), np.nan)
        for k, name in enumerate(s.landmark_names):
            if (s.image_id, name) in table.index:
                pts[k] = table.loc[(s.image_id, name), cols[:s.ndim]].to_numpy(dtype=np.float64)
        out.append(pts)
    return out


@dataclass
class ViewState:
    """What :func:`draw_view` shows: the image, the series drawn, names and regions on or off, the landmark the view
    centres on (index or None) and, in 3D, the voxel ``(x, y, z)`` where the three planes cut the volume."""

    image: int = 0
    series: tuple[str, ...] = ()
    names: bool = False
    regions: bool = True
    landmark: int | None = None
    voxel: tuple[int, ...] | None = None
    zoom_mm: float = 0.0  # half-width of the window around the chosen landmark (0: the whole image)


def anchor_mm(sample: Sample, predictions: Mapping[str, np.ndarray], k: int) -> np.ndarray:
    """Where the view centres for landmark ``k``: its truth (world mm), else the first series' point."""
    truth = np.asarray(sample.landmarks_mm[k], dtype=np.float64)
    if np.isfinite(truth).all() or not predictions:
        return truth
    return np.asarray(next(iter(predictions.values()))[k], dtype=np.float64)


def landmark_errors(sample: Sample, predictions: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Radial error (mm) of each series per landmark of one image (NaN where the truth or the point is missing)."""
    truth = np.asarray(sample.landmarks_mm, dtype=np.float64)
    return pd.DataFrame({name: np.linalg.norm(np.asarray(p, dtype=np.float64) - truth, axis=1)
                         for name, p in predictions.items()}, index=list(sample.landmark_names))


def draw_view(sample: Sample, predictions: Mapping[str, np.ndarray], state: ViewState,
              regions_mm: np.ndarray | None = None, fig: Figure | None = None) -> Figure:
    """Draw one image (2D) or three planes (3D) with the truth and the series in ``state.series``; returns the
    figure (reused when given, so a widget redraws in place)."""
    ndim = sample.ndim
    fig = fig or plt.figure(figsize=(6.0, 6.0) if ndim == 2 else (12.0, 4.5))
    fig.clear()
    geo, img = sample.geometry, np.asarray(sample.image)
    sp = np.asarray(geo.spacing, dtype=np.float64)
    lo, hi = np.percentile(img, [1, 99.5])
    lohi = (float(lo), float(hi))
    points = {TRUTH: np.asarray(sample.landmarks_mm, dtype=np.float64)} if TRUTH in state.series else {}
    points.update({k: np.asarray(v, dtype=np.float64) for k, v in predictions.items() if k in state.series})
    index = {k: geo.world_to_index(v.reshape(-1, ndim)) for k, v in points.items()}
    colors = {k: ("lime" if k == TRUTH else COLORS[i % len(COLORS)]) for i, k in enumerate([TRUTH, *predictions])}
    names = list(sample.landmark_names)
    views: list[tuple[str, tuple[int, int] | None, tuple[int, int], np.ndarray]]  # title, 3D cut, axes, plane
    if ndim == 2:
        views = [("", None, (0, 1), img.T)]
    else:
        voxel = np.clip(np.asarray(state.voxel if state.voxel is not None else np.array(img.shape) // 2), 0,
                        np.array(img.shape) - 1).astype(int)
        views = [(f"{name} {'xyz'[normal]}={voxel[normal]}", (normal, int(voxel[normal])), cols,
                  np.take(img, int(voxel[normal]), axis=normal).T) for name, normal, cols in PLANES]
    axes = fig.subplots(1, len(views), squeeze=False)[0]
    for ax, (title, cut, cols, plane) in zip(axes, views):
        origin: Literal["upper", "lower"] = "upper" if cols == (0, 1) else "lower"
        show_plane(ax, plane, sp[cols[1]] / sp[cols[0]], lohi, origin)
        for key, idx in index.items():
            near = np.isfinite(idx).all(1)
            if cut is not None:  # 3D: the points within 3 mm of the plane
                near &= np.abs(idx[:, cut[0]] - cut[1]) * sp[cut[0]] < 3.0
            ax.scatter(idx[near, cols[0]], idx[near, cols[1]], s=28 if key == TRUTH else 14,
                       facecolors="none" if key == TRUTH else colors[key], edgecolors=colors[key], linewidths=1.0,
                       label=key)
            if state.regions and regions_mm is not None and key == next(iter(predictions), None):
                for k in np.flatnonzero(near):
                    r = float(regions_mm[k])
                    if cut is not None:  # the ball's radius where the plane cuts it
                        depth = (idx[k, cut[0]] - cut[1]) * sp[cut[0]]
                        r = float(np.sqrt(max(r * r - depth * depth, 0.0)))
                    ax.add_patch(Ellipse((idx[k, cols[0]], idx[k, cols[1]]), 2 * r / sp[cols[0]], 2 * r / sp[cols[1]],
                                         fill=False, color=colors[key], linewidth=0.8, alpha=0.7))
            if state.names and key == (TRUTH if TRUTH in index else next(iter(index), None)):
                for k in np.flatnonzero(near):
                    ax.annotate(names[k], (idx[k, cols[0]], idx[k, cols[1]]), fontsize=6, color="yellow",
                                xytext=(3, 3), textcoords="offset points")
        if state.landmark is not None and state.zoom_mm > 0:
            centre = geo.world_to_index(anchor_mm(sample, predictions, state.landmark).reshape(1, ndim))[0]
            half = state.zoom_mm / sp[list(cols)]
            ax.set_xlim(centre[cols[0]] - half[0], centre[cols[0]] + half[0])
            lo, hi = centre[cols[1]] - half[1], centre[cols[1]] + half[1]
            ax.set_ylim((hi, lo) if origin == "upper" else (lo, hi))
        ax.set_title(title, fontsize=9)
    if index:
        axes[0].legend(fontsize=7, loc="lower right", framealpha=0.6)
    fig.suptitle(f"{sample.image_id}" + (f": {names[state.landmark]}" if state.landmark is not None else ""),
                 fontsize=10)
    return fig


class LandmarkViewer:
    """The widget (see the module docstring): ``samples`` with their truth (NaN where unknown), ``predictions``
    series -> one ``(K, D)`` world-mm array per sample, ``regions_mm`` one ``(K,)`` radius array per sample for
    the first series (optional)."""

    def __init__(self, samples: Sequence[Sample], predictions: Mapping[str, Sequence[np.ndarray]],
                 regions_mm: Sequence[np.ndarray] | None = None, zoom_mm: float = 20.0,
                 notes: Mapping[tuple[str, str], str] | None = None) -> None:
        import ipywidgets as w

        if not samples:
            raise ValueError("no images to show")
        bad = {k: len(v) for k, v in predictions.items() if len(v) != len(samples)}
        if bad:
            raise ValueError(f"each series needs one prediction array per image ({len(samples)}); got {bad}")
        self.samples, self.predictions, self.regions_mm = list(samples), dict(predictions), regions_mm
        self.notes = dict(notes or {})  # (image id, landmark name) -> a note shown in the list (a masking reason)
        self.state = ViewState(series=(TRUTH, *self.predictions), zoom_mm=0.0)
        self.zoom_mm = float(zoom_mm)
        self.fig = plt.figure(figsize=(6.0, 6.0) if samples[0].ndim == 2 else (12.0, 4.5))
        plt.close(self.fig)  # shown as the picture widget's PNG only
        self.picture = figure_image()
        self.image = w.Dropdown(options=[(s.image_id, i) for i, s in enumerate(self.samples)], description="image")
        self.series = w.SelectMultiple(options=[TRUTH, *self.predictions], value=self.state.series,
                                       description="show", rows=min(6, 1 + len(self.predictions)))
        self.names = w.Checkbox(value=False, description="names")
        self.regions = w.Checkbox(value=True, description="regions", disabled=regions_mm is None)
        self.landmark = w.Select(description="landmark", rows=10)
        self.sliders = [w.IntSlider(description=a, min=0, max=int(n) - 1, value=int(n) // 2, continuous_update=False)
                        for a, n in zip("xyz", self.samples[0].size)] if samples[0].ndim == 3 else []
        for control in (self.image, self.series, self.names, self.regions, self.landmark, *self.sliders):
            control.observe(self._changed, names="value")
        self._fill_landmarks()
        controls = w.VBox([self.image, self.series, self.names, self.regions, *self.sliders])
        self.widget = w.VBox([w.HBox([controls, self.landmark]), self.picture])
        self.render()

    def _fill_landmarks(self) -> None:
        """Landmark list of the current image: name and each series' error (mm) where the truth is known."""
        s = self.samples[self.state.image]
        errors = landmark_errors(s, {k: v[self.state.image] for k, v in self.predictions.items()})
        labels = [f"{name}  " + "  ".join(f"{k} {e:.2f} mm" for k, e in row.items() if np.isfinite(e))
                  + (f"  [{self.notes[(s.image_id, name)]}]" if (s.image_id, name) in self.notes else "")
                  for name, row in errors.iterrows()]
        self._updating = True
        self.landmark.options = [("(whole image)", -1)] + [(label, k) for k, label in enumerate(labels)]
        self.landmark.value = -1
        self._updating = False

    def _changed(self, change: Mapping[str, object]) -> None:
        if getattr(self, "_updating", False):
            return
        owner = change["owner"]
        if owner is self.image:
            self.state.image = int(self.image.value)
            self._fill_landmarks()
            self.state.landmark, self.state.zoom_mm = None, 0.0
        elif owner is self.landmark:
            self.select_landmark(None if self.landmark.value in (-1, None) else int(self.landmark.value))
            return
        self.state.series = tuple(self.series.value)
        self.state.names, self.state.regions = bool(self.names.value), bool(self.regions.value)
        if self.sliders:
            self.state.voxel = tuple(int(s.value) for s in self.sliders)
        self.render()

    def select_landmark(self, k: int | None) -> None:
        """Centre the view on landmark ``k`` (its truth, else the first series' point); None: the whole image."""
        self.state.landmark, self.state.zoom_mm = k, (self.zoom_mm if k is not None else 0.0)
        s = self.samples[self.state.image]
        if k is not None and self.sliders:
            point = anchor_mm(s, {n: v[self.state.image] for n, v in self.predictions.items()}, k)
            voxel = np.clip(np.round(s.geometry.world_to_index(point.reshape(1, 3))[0]), 0,
                            np.array(s.size) - 1).astype(int)
            self._updating = True
            for slider, v in zip(self.sliders, voxel):
                slider.value = int(v)
            self._updating = False
            self.state.voxel = tuple(int(v) for v in voxel)
        self.render()

    def render(self) -> None:
        i = self.state.image
        draw_view(self.samples[i], {k: v[i] for k, v in self.predictions.items()}, self.state,
                  None if self.regions_mm is None else self.regions_mm[i], self.fig)
        show_figure(self.picture, self.fig)

    def __repr__(self) -> str:
        n = len(self.samples)
        return (f"LandmarkViewer: {n} image{'s' * (n != 1)} ({self.samples[0].ndim}D), series: "
                f"{', '.join([TRUTH, *self.predictions])} (interactive in a live JupyterLab kernel)")

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """The widget in a live frontend; one line of text where widgets do not render (stored notebooks)."""
        bundle = self.widget._repr_mimebundle_(**kwargs) or {}
        return {**bundle, "text/plain": repr(self)}


def for_run(result: Any) -> LandmarkViewer:
    """The test images of a finished run (:class:`~lmlib.engine.runner.RunResult`) with its predictions; a cascade
    shows the last stage (its earlier stages are in their own folders)."""
    name = str(result.metrics.get("method") or Path(result.output_dir).name)
    return LandmarkViewer(result.test_samples, {name: result.world_mm})


def for_comparison(comp: Any, dataset: str, data_dir: str | None = None,
                   methods: Sequence[str] | None = None) -> LandmarkViewer | str:
    """Every compared test image with each method's predictions (``comp``: a loaded comparison,
    :func:`lmlib.reporting.comparison.load_comparison`; ``methods``: its main rows by default); where the images
    cannot be loaded (the data folder is absent), the reason instead (the comparison itself needs no image)."""
    from lmlib.reporting.comparison import predictions_for_image, qualitative_samples

    ids = list(comp.errors.index.get_level_values("image_id").unique())
    samples, message = qualitative_samples(dataset, data_dir, ids, len(ids), **comp.dataset_options())
    if not samples:
        return f"viewer: {message}"
    chosen = list(methods) if methods is not None else comp.main_methods(list(comp.methods))
    per_image = [predictions_for_image(comp, s.image_id, s.landmark_names, chosen) for s in samples]
    return LandmarkViewer(samples, {m: [p[m] for p in per_image] for m in chosen})


def for_predictions(result: Any) -> LandmarkViewer | str:
    """The images a prediction notebook kept (:class:`~lmlib.predict.PredictResult`, its first images) with the
    predictions and, when calibrated, the widest level's region of each landmark; the reason when none was kept."""
    table = result.table.assign(image_id=result.table["image_id"].astype(str))
    samples = list(result.samples)
    if not samples:
        return f"viewer: {result.out_dir}: no image kept to show (n_figures = 0)"
    preds = predictions_by_image(table, samples)
    levels = sorted((c for c in table.columns if c.startswith("region_") and c.endswith("_mm")),
                    key=lambda c: float(c[len("region_"):-len("_mm")]))
    regions = None
    if levels:
        radius = table.set_index(["image_id", "landmark"])[levels[-1]]
        regions = [np.array([radius.get((s.image_id, n), np.nan) for n in s.landmark_names]) for s in samples]
    return LandmarkViewer(samples, {"prediction": preds}, regions_mm=regions)


def for_dataset(samples: Sequence[Sample], report: pd.DataFrame | None = None) -> LandmarkViewer:
    """A data set's images with their annotations; each masked landmark (invalid in the shown annotation) is listed
    with the annotation report's reason for it, from the rows of the shown annotator (``report``:
    :attr:`lmlib.data.datasets.Dataset.report`)."""
    notes: dict[tuple[str, str], str] = {}
    if report is not None and not report.empty:
        for s in samples:
            label_to_name = dict(zip(s.meta.get("landmark_labels", s.landmark_names), s.landmark_names))
            rows = report[report["image_id"].astype(str) == s.image_id]
            if s.meta.get("annotator") and "annotator" in rows:
                rows = rows[rows["annotator"].astype(str) == str(s.meta["annotator"])]
            masked = {n for n, ok in zip(s.landmark_names, s.valid) if not ok}
            for _, row in rows.iterrows():
                name = label_to_name.get(str(row["landmark"]), str(row["landmark"]))
                if name in masked:
                    notes[(s.image_id, name)] = f"{row['issue']}: {row['detail']}"
    return LandmarkViewer(samples, {}, notes=notes)
