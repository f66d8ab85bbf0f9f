"""The qualitative figure: one image with its ground truth and predictions (2D; 3D as three
orthogonal slices), shared by the run path (worst test image) and the comparison."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.figure import Figure

from lmlib.data.sample import Sample
from lmlib.outputs.figure_files import DPI, save_figure


def finish(fig: Figure, path: Path | str | None, dpi: int) -> Figure:
    """Close ``fig`` and save it to ``path`` (if given) as a size-capped PNG."""
    plt.close(fig)
    if path is not None:
        save_figure(fig, path, dpi)
    return fig


def method_colors(methods: Sequence[str], reference_methods: Iterable[str] = ()) -> dict[str, tuple]:
    """One colour per method, by position: tab10 without its green (the ground truth marker colour);
    reference methods (the mean shape, the inter-observer run) get black and greys."""
    refs = set(reference_methods)
    tab = [c for k, c in enumerate(sns.color_palette("tab10", 10)) if k != 2]
    greys = [(0.0, 0.0, 0.0), (0.4, 0.4, 0.4), (0.6, 0.6, 0.6)]
    out: dict[str, tuple] = {}
    for method in methods:
        pool, used = (greys, [m for m in out if m in refs]) if method in refs else (tab, [m for m in out if m not in refs])
        out[method] = tuple(pool[len(used) % len(pool)])
    return out


REFERENCE_MARKER_COLORS: tuple[str, ...] = ("yellow", "cyan", "white")  # reference rows, visible on dark images


def _markers(ax: plt.Axes, pts: dict[str, np.ndarray], colors: dict[str, tuple], cols: tuple[int, int],
             refs: set[str]) -> None:
    ref_colors = {name: REFERENCE_MARKER_COLORS[k % len(REFERENCE_MARKER_COLORS)]
                  for k, name in enumerate(n for n in pts if n in refs)}
    for name, xy in pts.items():
        ok = ~np.isnan(xy).any(axis=1)
        if name == "ground truth":
            ax.scatter(xy[ok, cols[0]], xy[ok, cols[1]], s=40, facecolors="none", edgecolors="lime",
                       linewidths=1.2, label=name, zorder=3)
        elif name in refs:  # a reference row (second annotator, mean shape): a light plus
            ax.scatter(xy[ok, cols[0]], xy[ok, cols[1]], s=30, marker="+", color=ref_colors[name],
                       linewidths=1.0, label=name, zorder=4)
        else:
            ax.scatter(xy[ok, cols[0]], xy[ok, cols[1]], s=22, marker="x", color=colors[name],
                       linewidths=1.0, label=name, zorder=4)


def show_plane(ax: plt.Axes, plane: np.ndarray, aspect: float, lohi: tuple[float, float],
               origin: Literal["upper", "lower"]) -> None:
    ax.imshow(plane, cmap="gray", vmin=lohi[0], vmax=lohi[1], aspect=aspect, origin=origin,
              interpolation="antialiased")
    ax.set_xticks([])
    ax.set_yticks([])


def fig_qualitative(sample: Sample, predictions: dict[str, np.ndarray], path: Path | str | None = None,
                    title: str | None = None, reference_methods: Iterable[str] = (), dpi: int = DPI) -> Figure:
    """Ground truth (green circles) and each method's predictions (crosses) on one image.

    ``predictions``: method -> (N, D) world mm in ``sample.landmark_names`` order. 2D: the image
    with markers. 3D: axial, coronal and sagittal slices through the centroid of the valid ground
    truth landmarks, with every point projected onto each slice. Reference methods: a plus in yellow,
    cyan, white (in order).
    """
    geo = sample.geometry
    pts = {"ground truth": geo.world_to_index(sample.landmarks_mm)}
    pts.update({m: geo.world_to_index(np.asarray(p, dtype=np.float64).reshape(-1, sample.ndim))
                for m, p in predictions.items()})
    refs = set(reference_methods)
    colors = method_colors(list(predictions), refs)
    img = sample.image
    lo, hi = np.percentile(img, [1, 99.5])
    lohi = (float(lo), float(hi))
    sp = geo.spacing
    if sample.ndim == 2:
        h_in = min(7.0, 6.0 * (img.shape[1] * sp[1]) / max(img.shape[0] * sp[0], 1e-6))
        fig, ax = plt.subplots(figsize=(6.0, max(h_in, 3.0)))
        show_plane(ax, img.T, sp[1] / sp[0], lohi, "upper")
        _markers(ax, pts, colors, (0, 1), refs)
        axes = [ax]
    else:
        gt = pts["ground truth"]
        centre = np.nanmean(gt, axis=0) if np.isfinite(gt).any() else np.array(img.shape) / 2.0
        c = np.clip(np.round(centre).astype(int), 0, np.array(img.shape) - 1)
        fig, axes = plt.subplots(1, 3, figsize=(12.0, 4.5))
        views = [(f"axial z={c[2]}", img[:, :, c[2]].T, sp[1] / sp[0], (0, 1)),
                 (f"coronal y={c[1]}", img[:, c[1], :].T, sp[2] / sp[0], (0, 2)),
                 (f"sagittal x={c[0]}", img[c[0], :, :].T, sp[2] / sp[1], (1, 2))]
        for ax, (name, plane, aspect, cols) in zip(axes, views):
            show_plane(ax, plane, aspect, lohi, "upper" if cols == (0, 1) else "lower")
            _markers(ax, pts, colors, cols, refs)
            ax.set_title(f"{name} (points projected)", fontsize=9)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title or f"image {sample.image_id}: ground truth and predictions", fontsize=10)
    return finish(fig, path, dpi)
