"""Figures of the refinement after any method (:mod:`lmlib.methods.refine`), from a finished run.

- :func:`refinement_errors`: per (test image, landmark) the error of the base run and of each refinement stage
  (mm) and how far the last stage moved the base prediction;
- :func:`fig_refinement`: per landmark, the mean error of the base run and of each stage, and the moves;
- :func:`show_refinement`: the rows' metrics, the figure (``fig_refinement.png`` in the run folder) and the
  per-landmark table, displayed (notebook).

``result`` is the :class:`lmlib.engine.runner.RunResult` of ``run_method("refine", ...)``; its folder's manifest
names the base run (``base_run``, relative to the folder) and the stages.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lmlib.outputs.contract import read_manifest, read_run, read_stage_predictions
from lmlib.outputs.qualitative import finish

DPI = 110
KEYS = ["image_id", "landmark"]


def refinement_rows(output_dir: str | Path) -> tuple[str, Path, list[str]]:
    """(base run name, base run folder, stage names) from the refinement run's manifest."""
    folder = Path(output_dir)
    manifest = read_manifest(folder) or {}
    if not manifest.get("base_run") or not manifest.get("stages"):
        raise FileNotFoundError(f"{folder / 'manifest.json'}: not a refinement run (no base_run and stages)")
    base = (folder / str(manifest["base_run"])).resolve()
    return base.name, base, [str(s) for s in manifest["stages"]]


def refinement_errors(output_dir: str | Path) -> pd.DataFrame:
    """Per (test image, landmark): ``<base>_mm`` and ``<stage>_mm`` errors and ``moved_mm`` (last stage - base)."""
    name, base, stages = refinement_rows(output_dir)
    frames = {name: read_run(base)[0], **read_stage_predictions(output_dir, stages)}
    last = frames[stages[-1]]
    table = last[KEYS].copy()
    axes = [a for a in ("x", "y", "z") if last[f"{a}_mm"].notna().any()]
    for run, frame in frames.items():
        table = table.merge(frame[[*KEYS, *(f"{a}_mm" for a in axes), "error_mm"]].rename(
            columns={"error_mm": f"{run}_mm", **{f"{a}_mm": f"{a}_{run}" for a in axes}}), on=KEYS, how="left")
    table["moved_mm"] = np.sqrt(sum((table[f"{a}_{stages[-1]}"] - table[f"{a}_{name}"]) ** 2 for a in axes))
    return table[[*KEYS, *(f"{r}_mm" for r in frames), "moved_mm"]]


def fig_refinement(table: pd.DataFrame, path: str | Path | None = None) -> Figure:
    """Per landmark: the mean error (test split, mm) of the base run and each stage (left), and how far the last
    stage moved each base prediction (right, box plot)."""
    runs = [c[:-3] for c in table.columns if c.endswith("_mm") and c != "moved_mm"]
    names = list(dict.fromkeys(table["landmark"]))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8.0, 0.45 * len(names) + 5), 3.8))
    per = table.groupby("landmark")[[f"{r}_mm" for r in runs]].mean().reindex(names)
    x, width = np.arange(len(names)), 0.8 / len(runs)
    for i, r in enumerate(runs):
        a1.bar(x + (i - (len(runs) - 1) / 2) * width, per[f"{r}_mm"], width,
               label=f"{r} ({table[f'{r}_mm'].mean():.2f} mm)")
    a1.set_xticks(x, names, rotation=90, fontsize=7)
    a1.set_ylabel("mean radial error (mm)")
    a1.set_title("Error per landmark, test split", fontsize=9)
    a1.legend(fontsize=7)
    a2.boxplot([table.loc[table["landmark"] == n, "moved_mm"].dropna().to_numpy() for n in names],
               showfliers=True, flierprops={"markersize": 3})
    a2.set_xticks(range(1, len(names) + 1), names, rotation=90, fontsize=7)
    a2.set_ylabel("|refined - base| (mm)")
    a2.set_title("How far the refinement moved each prediction", fontsize=9)
    for ax in (a1, a2):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return finish(fig, path, DPI)


def show_refinement(result: Any) -> Path:
    """The base run's and each stage's test metrics, :func:`fig_refinement` (saved as ``fig_refinement.png``) and
    the per-landmark means, displayed."""
    from IPython.display import Image, display

    folder = Path(result.output_dir)
    name, base, stages = refinement_rows(folder)
    cols = ["mre_mm", "median_mm", "sdr_2mm", "sdr_4mm", "train_seconds", "infer_seconds_per_image"]
    rows = {name: read_run(base)[1], **{s: read_run(folder / s)[1] for s in stages}}
    display(pd.DataFrame({k: {c: m.get(c) for c in cols} for k, m in rows.items()}).T.round(3))
    table = refinement_errors(folder)
    path = folder / "fig_refinement.png"
    fig_refinement(table, path)
    display(Image(filename=str(path)))
    print(table.groupby("landmark")[[c for c in table.columns if c.endswith("_mm")]].mean().round(2).to_string())
    return path
