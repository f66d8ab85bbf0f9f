"""Figures and tables of the prior-guided coarse-to-fine method (:mod:`lmlib.methods.prior_guided`),
from a finished run's stage folders (``coarse/``, ``independent/``, ``correlated/``, each with its
``predictions.csv`` of the test split, world mm).

- :func:`stage_errors`: per (image, landmark) each stage's radial error (mm) and whether the landmark
  belongs to the correlated group.
- :func:`correlated_gain`: on the group's landmarks, independent vs correlated: mean errors and the
  paired Wilcoxon test (what the correlated model adds), and the same for the other landmarks (which
  it does not touch: identical by construction).
- :func:`fig_stage_slices`: orthogonal slices (through the ground truth centroid) of a few test
  images with the ground truth and every stage's predictions (:func:`~lmlib.outputs.qualitative.fig_qualitative`).
- :func:`fig_stage_errors`: mean error per landmark and stage, group landmarks marked.
- :func:`show_prior_guided`: all of them, saved in the run folder and displayed (notebook).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lmlib.evaluation.statistics import wilcoxon_paired
from lmlib.outputs.contract import read_manifest, read_stage_predictions
from lmlib.outputs.figure_files import DPI
from lmlib.outputs.qualitative import fig_qualitative, finish

STAGE_ORDER: tuple[str, ...] = ("coarse", "independent", "correlated")


def stage_frames(output_dir: str | Path) -> dict[str, pd.DataFrame]:
    """``{stage: predictions}`` of the stages the run wrote, in cascade order."""
    out = read_stage_predictions(output_dir, STAGE_ORDER)
    if not out:
        raise FileNotFoundError(f"{output_dir}: no stage predictions (coarse/predictions.csv, ...)")
    return out


def _group(output_dir: Path, frames: dict[str, pd.DataFrame]) -> list[str]:
    """Names of the correlated group's landmarks (from the correlated stage's manifest), else []."""
    manifest = read_manifest(output_dir / "correlated")
    if manifest is None or "correlated" not in frames:
        return []
    names = list(dict.fromkeys(frames["correlated"]["landmark"]))
    return [names[k] for k in manifest.get("method_config", {}).get("group") or []]


def stage_errors(output_dir: str | Path) -> pd.DataFrame:
    """One row per (image, landmark): ``<stage>_mm`` radial error of each stage and ``in_group``."""
    folder = Path(output_dir)
    frames = stage_frames(folder)
    keys = ["image_id", "landmark"]
    table = None
    for stage, df in frames.items():
        part = df[keys + ["error_mm"]].rename(columns={"error_mm": f"{stage}_mm"})
        table = part if table is None else table.merge(part, on=keys)
    assert table is not None  # stage_frames finds at least one stage (it raises otherwise)
    group = set(_group(folder, frames))
    table["in_group"] = table["landmark"].isin(group)
    return table


def correlated_gain(output_dir: str | Path) -> pd.DataFrame:
    """Independent vs correlated on the group's landmarks and on the others: n, mean errors (mm),
    mean difference (correlated - independent; negative = the correlated model helps), Wilcoxon p."""
    t = stage_errors(output_dir)
    if "correlated_mm" not in t or "independent_mm" not in t:
        return pd.DataFrame()
    rows = {}
    for label, part in (("group landmarks", t[t["in_group"]]), ("other landmarks", t[~t["in_group"]])):
        if part.empty:
            continue
        test = wilcoxon_paired(part["correlated_mm"].to_numpy(), part["independent_mm"].to_numpy())
        rows[label] = {"n": int(test["n_pairs"]), "independent_mm": part["independent_mm"].mean(),
                       "correlated_mm": part["correlated_mm"].mean(), "mean_diff_mm": test["mean_diff_mm"],
                       "p_value": test["p_value"]}
    return pd.DataFrame(rows).T


def fig_stage_slices(result: Any, n_images: int = 2, path: str | Path | None = None) -> list[Figure]:
    """Orthogonal slices of the first ``n_images`` test images: ground truth and each stage's
    predictions (one figure per image; ``path`` gets ``_<k>`` before its suffix)."""
    frames = stage_frames(result.output_dir)
    figs = []
    for k, sample in enumerate(result.test_samples[:n_images]):
        preds = {}
        for stage, df in frames.items():
            rows = df[df["image_id"] == sample.image_id].set_index("landmark").reindex(sample.landmark_names)
            preds[stage] = rows[["x_mm", "y_mm", "z_mm"][:sample.ndim]].to_numpy(dtype=np.float64)
        errs = {s: np.nanmean(np.linalg.norm(p - sample.landmarks_mm, axis=1)) for s, p in preds.items()}
        title = f"{sample.image_id}: " + ", ".join(f"{s} {e:.2f} mm" for s, e in errs.items())
        out = None if path is None else Path(path).with_name(f"{Path(path).stem}_{k}{Path(path).suffix}")
        figs.append(fig_qualitative(sample, preds, path=out, title=title))
    return figs


def fig_stage_errors(result: Any, path: str | Path | None = None) -> Figure:
    """Mean radial error per landmark and stage (test split); the group's landmarks are starred."""
    t = stage_errors(result.output_dir)
    stages = [s for s in STAGE_ORDER if f"{s}_mm" in t]
    names = list(dict.fromkeys(t["landmark"]))
    per = t.groupby("landmark")[[f"{s}_mm" for s in stages]].mean().reindex(names)
    group = set(t.loc[t["in_group"], "landmark"])
    fig, ax = plt.subplots(figsize=(max(7.0, 0.3 * len(names) + 3), 3.8))
    x = np.arange(len(names))
    w = 0.8 / len(stages)
    for i, s in enumerate(stages):
        ax.bar(x + (i - (len(stages) - 1) / 2) * w, per[f"{s}_mm"], w, label=f"{s} ({t[f'{s}_mm'].mean():.2f} mm)")
    ax.set_xticks(x, [f"{n} *" if n in group else n for n in names], rotation=90, fontsize=6)
    ax.set_ylabel("mean radial error (mm)")
    ax.set_title("Error per landmark and stage, test split (* = refined jointly by the correlated model)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return finish(fig, path, DPI)


def show_prior_guided(result: Any, n_images: int = 2) -> dict[str, Path]:
    """Draw the figures into the run folder, print the correlated model's gain, display everything."""
    from IPython.display import Image, display

    folder = Path(result.output_dir)
    fig_stage_slices(result, n_images, folder / "fig_stage_slices.png")
    paths = {f"fig_stage_slices_{k}.png": folder / f"fig_stage_slices_{k}.png"
             for k in range(min(n_images, len(result.test_samples)))}
    paths["fig_stage_errors.png"] = folder / "fig_stage_errors.png"
    fig_stage_errors(result, paths["fig_stage_errors.png"])
    gain = correlated_gain(folder)
    if not gain.empty:
        print("What the correlated model adds (test split; diff = correlated - independent, mm):")
        print(gain.to_string(float_format="{:.3f}".format, formatters={"n": "{:.0f}".format,
                                                                       "p_value": "{:.2g}".format}))
        gain.to_csv(folder / "correlated_gain.csv")
    for path in paths.values():
        display(Image(filename=str(path)))
    return paths
