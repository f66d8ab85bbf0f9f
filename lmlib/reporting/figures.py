"""Comparison figures (matplotlib + seaborn; no display needed, works under the Agg backend).

Every function returns the Figure (already closed in pyplot, so a notebook shows it once when it
is the cell's value) and, given ``path``, saves a PNG at ``dpi`` (default 120) kept under 1 MB.
Files are named after what they show: ``fig_error_boxplot.png``, ``fig_sdr_curve.png``,
``fig_landmark_heatmap.png``, ``fig_significance.png``, ``fig_qualitative_<image>.png``.
Errors are in mm; images are indexed ``(x, y[, z])`` and shown as ``image.T``.
"""
from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from lmlib.evaluation.metrics import DEFAULT_THRESHOLDS_MM, sdr_curve
from lmlib.evaluation.statistics import holm_within, significance_matrix
from lmlib.outputs.figure_files import DPI, save_figure  # noqa: F401 (save_figure re-exported)
from lmlib.outputs.qualitative import fig_qualitative, method_colors  # noqa: F401 (re-exported)
from lmlib.outputs.qualitative import finish as _finish


def _method_errors(errors_long: pd.DataFrame, reference_methods: Iterable[str]) -> np.ndarray:
    """Finite errors (mm) of the trained methods; of every row when all rows are references."""
    refs = set(reference_methods)
    mask = ~errors_long["method"].isin(refs)
    err = errors_long.loc[mask if mask.any() else slice(None), "error_mm"].to_numpy(dtype=np.float64)
    return err[np.isfinite(err)]


def fig_error_boxplot(errors_long: pd.DataFrame, methods: Sequence[str] | None = None,
                      reference_methods: Iterable[str] = (), path: Path | str | None = None,
                      dpi: int = DPI, max_mm: float | None = None) -> Figure:
    """Box plots of radial error (mm) per landmark, one box per method (hue).

    ``errors_long``: columns method, landmark, error_mm (NaN rows are left out). The y axis ends at
    ``max_mm``; by default just above the trained methods' largest error when reference rows (e.g. the
    mean shape) reach more than 1.5 x beyond it, said in the title.
    """
    data = errors_long.dropna(subset=["error_mm"])
    methods = list(methods) if methods is not None else list(pd.unique(errors_long["method"]))
    landmarks = list(pd.unique(errors_long["landmark"]))
    width = min(max(6.0, 0.35 * len(landmarks) * max(len(methods), 2) ** 0.5 + 2), 22.0)
    refs = set(reference_methods)
    palette = {m: (tuple(0.55 + 0.45 * np.asarray(c)) if m in refs else c)  # light grey boxes: medians stay visible
               for m, c in method_colors(methods, refs).items()}
    fig, ax = plt.subplots(figsize=(width, 4.5))
    with warnings.catch_warnings():  # seaborn 0.13 passes matplotlib's deprecated `vert`
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*vert.*")
        sns.boxplot(data=data, x="landmark", y="error_mm", hue="method", order=landmarks, hue_order=methods,
                    palette=palette, fliersize=1.5, linewidth=0.7, ax=ax)
    ax.set_xlabel("landmark")
    ax.set_ylabel("radial error (mm)")
    ax.tick_params(axis="x", rotation=90 if len(landmarks) > 8 else 0, labelsize=8)
    title = "Radial error per landmark"
    all_err = data["error_mm"].to_numpy(dtype=np.float64)
    if max_mm is None and set(reference_methods) & set(methods):
        trained = _method_errors(errors_long, reference_methods)
        limit = 1.05 * float(np.max(trained)) if trained.size else 0.0
        if limit > 0 and all_err.size and float(np.max(all_err)) > 1.5 * limit:
            max_mm = limit  # every trained method's point stays visible; far-off reference boxes are cut
    if max_mm is not None and all_err.size and float(np.max(all_err)) > max_mm:
        title += f" (axis clipped at {max_mm:.1f} mm)"
    ax.set_ylim(bottom=0, top=max_mm)
    ax.legend(title="method", fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title)
    return _finish(fig, path, dpi)


def fig_sdr_curve(errors_long: pd.DataFrame, methods: Sequence[str] | None = None,
                  reference_methods: Iterable[str] = (), max_mm: float | None = None,
                  marks_mm: Sequence[float] = DEFAULT_THRESHOLDS_MM, path: Path | str | None = None,
                  dpi: int = DPI) -> Figure:
    """Cumulative error distribution: % of landmarks with error < x mm, per method (a landmark with a reference
    and no prediction, ``errors_long["unpredicted"]``, is a miss at every x).

    Reference methods (the mean shape, the inter-observer run) are drawn dashed in black/grey; dotted
    vertical lines mark ``marks_mm``. ``max_mm`` defaults to the 97th percentile of the trained
    methods' errors (of all rows if there are only references; at least 5 mm), so a far-off reference
    row does not squeeze the methods' curves.
    """
    methods = list(methods) if methods is not None else list(pd.unique(errors_long["method"]))
    refs = set(reference_methods)
    if max_mm is None:
        finite = _method_errors(errors_long, refs)
        max_mm = max(5.0, float(np.ceil(np.percentile(finite, 97)))) if finite.size else 5.0
    grid = np.linspace(0.0, max_mm, 400)
    colors = method_colors(methods, refs)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for t in marks_mm:
        ax.axvline(t, color="0.8", linestyle=":", linewidth=0.8, zorder=0)
    for method in methods:
        rows = errors_long[errors_long["method"] == method]
        missed = int(rows["unpredicted"].sum()) if "unpredicted" in rows else 0  # no prediction: a miss
        ax.plot(grid, sdr_curve(rows["error_mm"].to_numpy(dtype=np.float64), grid, missed), label=method,
                linewidth=1.6, color=colors[method],
                linestyle="--" if method in refs else "-")
    ax.set_xlim(0, max_mm)
    ax.set_ylim(0, 100.5)
    ax.set_xlabel("error threshold (mm)")
    ax.set_ylabel("landmarks with error < threshold (%)")
    ax.set_title("Cumulative error distribution (SDR curve)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _finish(fig, path, dpi)


def fig_landmark_heatmap(table: pd.DataFrame, path: Path | str | None = None, dpi: int = DPI,
                         reference_methods: Iterable[str] = ()) -> Figure:
    """Heat table of MRE (mm): landmarks (rows) x methods (columns), values written in the cells.

    The colour scale spans the trained methods' columns; reference columns (e.g. the mean shape)
    above it saturate (their values are still written).
    """
    n_rows, n_cols = table.shape
    values = table.astype(float)
    trained = values[[c for c in values.columns if c not in set(reference_methods)]].to_numpy()
    vmax = float(np.nanmax(trained)) if np.isfinite(trained).any() else None
    fig, ax = plt.subplots(figsize=(min(2.5 + 1.1 * n_cols, 20.0), min(1.5 + 0.32 * n_rows, 24.0)))
    sns.heatmap(values, annot=True, fmt=".2f", cmap="rocket_r", linewidths=0.5, vmin=0.0, vmax=vmax,
                annot_kws={"fontsize": 7}, cbar_kws={"label": "MRE (mm)"}, ax=ax)
    ax.set_xlabel("method")
    ax.set_ylabel("landmark")
    _slanted_method_labels(ax)
    ax.tick_params(axis="y", rotation=0, labelsize=8)
    ax.set_title("Mean radial error per landmark")
    return _finish(fig, path, dpi)


def _slanted_method_labels(ax: Axes) -> None:
    """Method names under the x axis, slanted so that long names end at their column."""
    ax.tick_params(axis="x", labelsize=8)
    plt.setp(ax.get_xticklabels(), rotation=35, ha="right", rotation_mode="anchor")


def _p_text(p: float) -> str:
    return "" if np.isnan(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


def fig_significance(pairwise: pd.DataFrame, methods: Sequence[str] | None = None, alpha: float = 0.05,
                     path: Path | str | None = None, dpi: int = DPI) -> Figure:
    """Pairwise significance matrix from :func:`lmlib.evaluation.statistics.pairwise_wilcoxon`.

    Cell (row A, column B): Holm-corrected p (over the pairs of ``methods`` shown, the figure's family) and the mean
    paired difference A - B (mm; negative = row better). Colour: -log10(p), cells with p >= ``alpha`` greyed out.
    """
    if methods is not None:
        pairwise = holm_within(pairwise, itertools.combinations(methods, 2))
    p = significance_matrix(pairwise, methods, "p_holm")
    diff = pd.DataFrame(np.nan, index=p.index, columns=p.columns)
    for r in pairwise.itertuples(index=False):
        if r.method_a in diff.index and r.method_b in diff.index:
            diff.loc[r.method_a, r.method_b], diff.loc[r.method_b, r.method_a] = r.mean_diff_mm, -r.mean_diff_mm
    text = [[("" if np.isnan(p.iloc[i, j]) else f"{_p_text(p.iloc[i, j])}\nΔ {diff.iloc[i, j]:+.2f}")
             for j in range(p.shape[1])] for i in range(p.shape[0])]
    score = (-np.log10(p.clip(lower=1e-10).astype(float))).where(p < alpha)
    vmin = -np.log10(alpha)
    vmax = max(float(score.max().max()), vmin + 1.0) if score.notna().any().any() else vmin + 1.0
    n = len(p)
    fig, ax = plt.subplots(figsize=(min(2.5 + 1.2 * n, 16.0), min(2.0 + 0.9 * n, 14.0)))
    sns.heatmap(score, annot=np.array(text, dtype=object), fmt="", cmap="crest", vmin=vmin, vmax=vmax,
                linewidths=0.5, linecolor="white", annot_kws={"fontsize": 7},
                cbar_kws={"label": "-log10 p (Holm), significant cells"}, ax=ax)
    ax.set_facecolor("0.9")  # non-significant / diagonal cells
    for i in range(n):
        for j in range(n):
            if i != j and not p.iloc[i, j] < alpha and not np.isnan(p.iloc[i, j]):
                ax.text(j + 0.5, i + 0.5, text[i][j], ha="center", va="center", fontsize=7, color="0.35")
    ax.set_xlabel("method B")
    ax.set_ylabel("method A")
    _slanted_method_labels(ax)
    ax.tick_params(axis="y", rotation=0, labelsize=8)
    ax.set_title(f"Wilcoxon signed-rank, Holm-corrected (alpha {alpha:g}); Δ = mean error A - B (mm)", fontsize=9)
    return _finish(fig, path, dpi)
