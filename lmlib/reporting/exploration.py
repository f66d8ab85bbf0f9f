"""Data exploration: per-image summary tables, intensity histograms, overlays, mean shape.

Works on any list of :class:`~lmlib.data.sample.Sample`, 2D or 3D. Coordinates in tables are world mm,
``(x, y[, z])``. Figures are matplotlib Figures (Agg-safe); callers save them.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from lmlib.data.sample import Sample

AXES = ("x", "y", "z")


def summary_table(samples: Sequence[Sample]) -> pd.DataFrame:
    """One row per image: id, split, size (px), spacing (mm) and where it comes from (header, declaration, or the
    calibration distance of ``spacing_from_landmarks`` with its pixel length), physical extent (mm), landmarks,
    intensities."""
    rows = []
    for s in samples:
        rows.append({
            "image_id": s.image_id, "split": s.meta.get("split", ""),
            "size_px": "x".join(map(str, s.size)),
            "spacing_mm": "x".join(f"{v:.4g}" for v in s.geometry.spacing),
            "spacing_source": s.meta.get("spacing_source", ""),
            "extent_mm": "x".join(f"{v:.1f}" for v in np.array(s.size) * s.geometry.spacing),
            "n_valid": int(s.valid.sum()), "n_masked": int((~s.valid).sum()),
            "min": float(s.image.min()), "mean": float(s.image.mean()), "max": float(s.image.max()),
        })
    return pd.DataFrame(rows)


def landmark_table(samples: Sequence[Sample]) -> pd.DataFrame:
    """Long table: image_id, landmark, x_mm, y_mm[, z_mm], valid."""
    rows = []
    for s in samples:
        for k, name in enumerate(s.landmark_names):
            row = {"image_id": s.image_id, "landmark": name, "valid": bool(s.valid[k])}
            row.update({f"{a}_mm": float(s.landmarks_mm[k, i]) for i, a in enumerate(AXES[: s.ndim])})
            rows.append(row)
    return pd.DataFrame(rows)


def centred_landmarks(samples: Sequence[Sample]) -> np.ndarray:
    """Landmarks (n_images, N, D) in mm with each image's valid-landmark centroid moved to 0."""
    pts = np.stack([s.landmarks_mm for s in samples])
    return pts - np.nanmean(pts, axis=1, keepdims=True)


def mean_shape_table(samples: Sequence[Sample]) -> pd.DataFrame:
    """Per landmark: mean centred position (mm), SD per axis (mm), RMS distance to the mean (mm), count.

    Translation is removed per image (centroid of its valid landmarks); rotation and scale are not,
    so the spread includes pose variation, which is what a detector has to cope with.
    """
    pts = centred_landmarks(samples)
    mean = np.nanmean(pts, axis=0)
    dist = np.sqrt(np.nansum((pts - mean) ** 2, axis=-1))
    dist[np.isnan(pts).any(axis=-1)] = np.nan
    names = samples[0].landmark_names
    out = pd.DataFrame({"landmark": names})
    for i, a in enumerate(AXES[: pts.shape[-1]]):
        out[f"mean_{a}_mm"] = mean[:, i]
    for i, a in enumerate(AXES[: pts.shape[-1]]):
        out[f"sd_{a}_mm"] = np.nanstd(pts[..., i], axis=0, ddof=1)
    out["rms_spread_mm"] = np.sqrt(np.nanmean(dist**2, axis=0))
    out["n"] = (~np.isnan(dist)).sum(axis=0)
    return out


def fig_mean_shape(samples: Sequence[Sample]) -> Figure:
    """Scatter of every image's centred landmarks (x-y plane, mm) with the mean shape and 2-SD ellipses."""
    pts = centred_landmarks(samples)
    table = mean_shape_table(samples)
    fig, ax = plt.subplots(figsize=(6, 6))
    colors = sns.color_palette("husl", pts.shape[1])
    for k, name in enumerate(table["landmark"]):
        ax.scatter(pts[:, k, 0], pts[:, k, 1], s=6, alpha=0.35, color=colors[k])
        mx, my, sx, sy = table.loc[k, ["mean_x_mm", "mean_y_mm", "sd_x_mm", "sd_y_mm"]]
        t = np.linspace(0, 2 * np.pi, 60)
        ax.plot(mx + 2 * sx * np.cos(t), my + 2 * sy * np.sin(t), color=colors[k], lw=1)
        ax.annotate(str(name), (mx, my), fontsize=7, ha="center", va="center", weight="bold")
    ax.set_aspect("equal")
    ax.invert_yaxis()  # image convention: y grows downwards
    ax.set(xlabel="x (mm, centred)", ylabel="y (mm, centred)", title=f"Mean shape and 2-SD spread ({len(samples)} images)")
    fig.tight_layout()
    return fig


def fig_intensity_histograms(samples: Sequence[Sample], max_images: int = 12, bins: int = 64) -> Figure:
    """Overlaid intensity histograms (density) of up to ``max_images`` images."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for s in samples[:max_images]:
        values = s.image.reshape(-1)
        if values.size > 500_000:  # subsample for speed; the shape of the histogram is unchanged
            values = values[:: values.size // 500_000]
        ax.hist(values, bins=bins, histtype="step", density=True, alpha=0.7, label=s.image_id)
    ax.set(xlabel="intensity", ylabel="density", title="Intensity histograms")
    if len(samples[:max_images]) <= 12:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def _slices(sample: Sample, centre_index: np.ndarray) -> list[tuple[np.ndarray, tuple[int, int], str, float]]:
    """Three orthogonal slices (2D arrays for imshow) through ``centre_index`` of a 3D sample."""
    c = np.clip(np.round(centre_index).astype(int), 0, np.array(sample.size) - 1)
    sp = sample.geometry.spacing
    img = sample.image
    return [  # (slice.T for imshow, (horizontal axis, vertical axis), title, pixel aspect)
        (img[:, :, c[2]].T, (0, 1), f"axial z={c[2]}", sp[1] / sp[0]),
        (img[:, c[1], :].T, (0, 2), f"coronal y={c[1]}", sp[2] / sp[0]),
        (img[c[0], :, :].T, (1, 2), f"sagittal x={c[0]}", sp[2] / sp[1]),
    ]


def fig_overlay(sample: Sample, points: dict[str, np.ndarray] | None = None, annotate: bool = True,
                slab_mm: float = 5.0) -> Figure:
    """Image with its landmarks (and optional extra point sets, world mm) drawn on it.

    2D: one panel. 3D: axial/coronal/sagittal slices through the landmarks' centroid; a landmark is
    drawn on a slice if it lies within ``slab_mm`` of it.
    """
    sets = {"reference": sample.landmarks_mm, **(points or {})}
    colors = dict(zip(sets, ["tab:blue", "tab:red", "tab:orange", "tab:green", "tab:purple"]))
    idx = {k: sample.geometry.world_to_index(v) for k, v in sets.items()}
    if sample.ndim == 2:
        fig, ax = plt.subplots(figsize=(6, 6 * sample.size[1] / sample.size[0]))
        ax.imshow(sample.image.T, cmap="gray", aspect=sample.geometry.spacing[1] / sample.geometry.spacing[0])
        for name, pts in idx.items():
            ax.scatter(pts[:, 0], pts[:, 1], s=18, c=colors[name], marker="+" if name == "reference" else "x", label=name)
        if annotate:
            for k, label in enumerate(sample.landmark_names):
                if sample.valid[k]:
                    ax.annotate(label, (idx["reference"][k, 0], idx["reference"][k, 1]), fontsize=6, color="yellow",
                                xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"{sample.image_id}")
        ax.axis("off")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        return fig
    centre = np.nanmean(idx["reference"], axis=0)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, (plane, (h, v), title, aspect) in zip(axes, _slices(sample, centre)):
        ax.imshow(plane, cmap="gray", aspect=aspect, origin="lower" if v == 2 else "upper")
        normal = ({0, 1, 2} - {h, v}).pop()
        for name, pts in idx.items():
            near = np.abs(pts[:, normal] - np.round(centre[normal])) * sample.geometry.spacing[normal] <= slab_mm
            ax.scatter(pts[near, h], pts[near, v], s=18, c=colors[name], marker="+" if name == "reference" else "x", label=name)
        ax.set_title(f"{sample.image_id} {title}")
        ax.axis("off")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def fig_gallery(samples: Sequence[Sample], n: int = 6, cols: int = 3) -> Figure:
    """Grid of 2D images (or 3D axial slices through the landmark centroid) with landmarks."""
    chosen = list(samples[:n])
    rows = int(np.ceil(len(chosen) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, chosen):
        pts = s.landmarks_index
        if s.ndim == 2:
            ax.imshow(s.image.T, cmap="gray", aspect=s.geometry.spacing[1] / s.geometry.spacing[0])
            ax.scatter(pts[:, 0], pts[:, 1], s=8, c="tab:red")
        else:
            z = int(np.clip(np.round(np.nanmean(pts[:, 2])), 0, s.size[2] - 1))
            ax.imshow(s.image[:, :, z].T, cmap="gray", aspect=s.geometry.spacing[1] / s.geometry.spacing[0])
            near = np.abs(pts[:, 2] - z) * s.geometry.spacing[2] <= 5.0
            ax.scatter(pts[near, 0], pts[near, 1], s=8, c="tab:red")
        ax.set_title(s.image_id, fontsize=8)
    fig.tight_layout()
    return fig


def interobserver_table(reference_mm: np.ndarray, other_mm: np.ndarray, names: Sequence[str]) -> pd.DataFrame:
    """Per-landmark inter-observer errors (mm) plus an ``ALL`` row.

    ``reference_mm``/``other_mm``: ``(n_images, N, D)`` world mm of the same images (NaN = masked).
    Columns: landmark, and :func:`lmlib.evaluation.metrics.summarize`'s keys.
    """
    from lmlib.evaluation.metrics import radial_errors, summarize

    err = radial_errors(other_mm, reference_mm)
    rows = [{"landmark": n, **summarize(err[:, k])} for k, n in enumerate(names)]
    rows.append({"landmark": "ALL", **summarize(err)})
    return pd.DataFrame(rows)


def augmented_examples(sample: Sample, n: int, seed: int = 0,
                       left_right_pairs: Sequence[tuple[int, int]] = (), **augmentation: Any) -> list[Sample]:
    """``n`` randomly augmented copies of ``sample`` (same grid), landmarks moved with the pixels.

    Uses :func:`lmlib.data.transforms.build_augmentation` (MONAI); keyword arguments go to it.
    """
    from lmlib.data.transforms import build_augmentation, make_item

    aug = build_augmentation(sample.ndim, left_right_pairs, seed=seed, **augmentation)
    out = []
    for i in range(n):
        item = aug(make_item(sample.image, sample.landmarks_index, sample.valid))
        image = np.asarray(item["image"])[0]
        out.append(Sample.from_index(f"{sample.image_id}_aug{i}", image, sample.geometry, item["landmarks"],
                                     sample.landmark_names, valid=item["valid"], meta=dict(sample.meta)))
    return out
