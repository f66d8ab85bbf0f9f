"""Predictions on new images with their calibrated regions drawn (the predict notebook's figures).

A region is a disc (2D) or ball (3D) of radius ``r`` mm around the predicted point; on an image with
anisotropic spacing it is drawn as the ellipse it covers in pixels. 3D: three orthogonal slices through the
predictions' centroid, each region drawn where the ball cuts the slice (nothing where it misses it).
Regions larger than the review threshold are red, the others yellow; known ground truth (lime circles) is
shown when given.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse

from lmlib.data.sample import Sample
from lmlib.outputs.figure_files import DPI
from lmlib.outputs.qualitative import finish, show_plane

if TYPE_CHECKING:
    from lmlib.predict import PredictResult

REVIEW_COLOR, OK_COLOR, TRUTH_COLOR = "red", "yellow", "lime"


def _regions(ax: plt.Axes, centres: np.ndarray, radii_px: np.ndarray, review: np.ndarray, cols: tuple[int, int],
             names: Sequence[str], label: bool) -> None:
    """Ellipses ``radii_px`` ``(N, 2)`` (half-widths in the plotted axes) around ``centres`` ``(N, 2)``."""
    for k, (c, r, flag) in enumerate(zip(centres, radii_px, review)):
        if not (np.isfinite(c).all() and np.isfinite(r).all()):
            continue
        color = REVIEW_COLOR if flag else OK_COLOR
        ax.add_patch(Ellipse((c[0], c[1]), 2 * r[0], 2 * r[1], fill=False, color=color, linewidth=0.9))
        ax.scatter([c[0]], [c[1]], s=10, marker="x", color=color, linewidths=0.9, zorder=4)
        if label and flag:
            ax.annotate(names[k], (c[0], c[1]), xytext=(3, 3), textcoords="offset points", color=color, fontsize=6)


def _keep_image_extent(ax: plt.Axes, shape: tuple[int, ...], origin: str) -> None:
    """Axis limits of the shown plane (regions larger than the image are cut at its border)."""
    ax.set_xlim(-0.5, shape[1] - 0.5)
    ax.set_ylim((shape[0] - 0.5, -0.5) if origin == "upper" else (-0.5, shape[0] - 0.5))


def fig_prediction_regions(sample: Sample, predicted_mm: np.ndarray, radius_mm: np.ndarray, review: np.ndarray,
                           path: Path | str | None = None, truth_mm: np.ndarray | None = None, level: float = 0.9,
                           dpi: int = DPI) -> Figure:
    """One image with its predictions ``(N, D)`` (world mm), their regions of ``radius_mm`` ``(N,)`` at nominal
    ``level`` (red: ``review``), and the ground truth ``(N, D)`` when known."""
    geo = sample.geometry
    idx = geo.world_to_index(np.asarray(predicted_mm, dtype=np.float64).reshape(-1, sample.ndim))
    sp = np.asarray(geo.spacing, dtype=np.float64)
    radius = np.asarray(radius_mm, dtype=np.float64)
    review = np.asarray(review, dtype=bool)
    truth = geo.world_to_index(np.asarray(truth_mm, dtype=np.float64)) if truth_mm is not None else None
    img = sample.image
    lo, hi = np.percentile(img, [1, 99.5])
    lohi = (float(lo), float(hi))
    names = list(sample.landmark_names)
    if sample.ndim == 2:
        fig, ax = plt.subplots(figsize=(6.0, max(3.0, min(7.0, 6.0 * img.shape[1] * sp[1] / (img.shape[0] * sp[0])))))
        show_plane(ax, img.T, sp[1] / sp[0], lohi, "upper")
        _regions(ax, idx, radius[:, None] / sp[None, :], review, (0, 1), names, True)
        if truth is not None:
            ok = np.isfinite(truth).all(1)
            ax.scatter(truth[ok, 0], truth[ok, 1], s=30, facecolors="none", edgecolors=TRUTH_COLOR, linewidths=1.0)
        _keep_image_extent(ax, img.T.shape, "upper")
        axes = [ax]
    else:
        centre = np.nanmean(idx, axis=0) if np.isfinite(idx).any() else np.array(img.shape) / 2.0
        c = np.clip(np.round(centre).astype(int), 0, np.array(img.shape) - 1)
        fig, axes = plt.subplots(1, 3, figsize=(12.0, 4.5))
        views = [(f"axial z={c[2]}", img[:, :, c[2]].T, sp[1] / sp[0], (0, 1), 2),
                 (f"coronal y={c[1]}", img[:, c[1], :].T, sp[2] / sp[0], (0, 2), 1),
                 (f"sagittal x={c[0]}", img[c[0], :, :].T, sp[2] / sp[1], (1, 2), 0)]
        for ax, (name, plane, aspect, cols, normal) in zip(axes, views):
            show_plane(ax, plane, aspect, lohi, "upper" if cols == (0, 1) else "lower")
            depth_mm = (idx[:, normal] - c[normal]) * sp[normal]  # distance of each point from the slice
            cut = np.sqrt(np.clip(radius ** 2 - depth_mm ** 2, 0.0, None))  # the ball's radius in the slice
            cut = np.where(np.abs(depth_mm) < radius, cut, np.nan)
            _regions(ax, idx[:, list(cols)], cut[:, None] / sp[list(cols)][None, :], review, cols, names, False)
            if truth is not None:
                ok = np.isfinite(truth).all(1) & (np.abs(truth[:, normal] - c[normal]) * sp[normal] < 3.0)
                ax.scatter(truth[ok, cols[0]], truth[ok, cols[1]], s=25, facecolors="none", edgecolors=TRUTH_COLOR)
            _keep_image_extent(ax, plane.shape, "upper" if cols == (0, 1) else "lower")
            ax.set_title(f"{name} (regions cut by the slice)", fontsize=9)
    n_review = int(review.sum())
    axes[0].set_xlabel(f"{100 * level:g} % regions; red: larger than the review threshold ({n_review} of "
                       f"{len(review)})" + ("; lime: ground truth" if truth is not None else ""), fontsize=8)
    fig.suptitle(f"image {sample.image_id}: predictions and {100 * level:g} % prediction regions", fontsize=10)
    return finish(fig, path, dpi)


def write_prediction_figures(result: PredictResult, level: float | None = None) -> list[Path]:
    """``fig_regions_<image>.png`` in the result folder for each kept image: predictions, regions at ``level``
    (default: the smallest calibrated level; none without regions), review flags, and the ground truth where
    the image is annotated."""
    out = []
    levels = result.regions.levels if result.regions is not None else ()
    level = level if level is not None else (min(levels) if levels else None)
    for sample in result.samples:
        rows = result.table[result.table["image_id"] == sample.image_id]
        cols = list(("x_mm", "y_mm", "z_mm")[:sample.ndim])
        radius = rows[f"region_{100 * level:g}_mm"].to_numpy(float) if level is not None else np.full(len(rows), np.nan)
        review = rows["review"].to_numpy(bool) if "review" in rows else np.zeros(len(rows), bool)
        truth = np.where(sample.valid[:, None], sample.landmarks_mm, np.nan) if sample.valid.any() else None
        path = result.out_dir / f"fig_regions_{sample.image_id}.png"
        fig_prediction_regions(sample, rows[cols].to_numpy(float), radius, review, path, truth, level or 0.9)
        out.append(path)
    return out


def show_predictions(result: PredictResult) -> None:
    """Display what the predict notebook shows: the figures, the review list, the calibrated regions per
    landmark and, for annotated images, the regions' coverage (in a notebook)."""
    from IPython.display import Image, Markdown, display

    for path in write_prediction_figures(result):
        display(Image(filename=str(path)))
    n_images = result.table["image_id"].nunique()
    display(Markdown(f"**{n_images} images, {len(result.table)} landmarks predicted** -> `{result.out_dir}`: "
                     f"`predictions.csv`, {len(result.exports)} export files"
                     + (", `regions.csv`, `review.csv`" if result.regions is not None else "")))
    if result.regions is not None:
        shown = ["image_id", "landmark", "x_mm", "y_mm", "z_mm", "confidence", "uncertainty_mm",
                 *(f"region_{100 * lv:g}_mm" for lv in result.regions.levels)]
        review = result.review[[c for c in shown if c in result.review and result.review[c].notna().any()]]
        display(Markdown(f"**Review list**: {len(review)} of {len(result.table)} landmarks have a "
                         f"{100 * max(result.regions.levels):g} % region larger than the threshold"))
        display(review.round(3))
        display(Markdown(f"**Regions per landmark** (calibrated on {result.regions.n_calibration} validation "
                         f"{result.regions.unit}(s))"))
        display(result.regions.to_frame().round(3))
    if not result.coverage.empty:
        display(Markdown("**Coverage of the regions on these annotated images** (the model's test split)"))
        display(result.coverage.round(2))
