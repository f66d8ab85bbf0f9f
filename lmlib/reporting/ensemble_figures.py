"""Figures of an ensemble of finished runs (:mod:`lmlib.methods.ensemble`), from its run folder.

- :func:`ensemble_table`: the members and the ensemble on the test split: MRE (mm), median, training minutes and
  seconds per image (the ensemble's are the members' sums); an ensemble chosen on val lists every candidate, whether
  it was chosen and its val MRE;
- :func:`selection_table`: an ensemble chosen on val: the selection's steps (``selection.csv``);
- :func:`fig_cost`: test MRE against training minutes, one point per member and the ensemble (accuracy per CPU
  minute; candidates not chosen hollow);
- :func:`show_ensemble`: these, displayed (notebook); the figure is also written as ``fig_cost.png``.

``output_dir`` is the ensemble's run folder; its manifest names the members (folders beside it).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from lmlib.outputs.contract import SELECTION_FILE, read_manifest, read_run
from lmlib.outputs.qualitative import finish

DPI = 110


def ensemble_table(output_dir: str | Path) -> pd.DataFrame:
    """One row per member (per candidate, for an ensemble chosen on val: with ``chosen`` and ``val MRE (mm)``) and one
    for the ensemble (last): test MRE and median (mm), training minutes, seconds per test image, device."""
    folder = Path(output_dir)
    manifest = read_manifest(folder) or {}
    members = manifest.get("members")
    if not isinstance(members, dict) or not members:
        raise FileNotFoundError(f"{folder / 'manifest.json'}: not an ensemble run (no members)")
    candidates = manifest.get("candidates") or members
    config = manifest.get("method_config") or {}
    # not the folder's name: the driver writes into a scratch folder first
    label = f"ensemble ({config.get('combine', '?')} of {len(members)}" + (
        f", chosen on val among {len(candidates)})" if "candidates" in manifest else ")")
    rows = []
    for name, where in [*((m, folder.parent / m) for m in candidates), (label, folder)]:
        _, metrics = read_run(where)
        row = {"run": name, "MRE (mm)": float(metrics["mre_mm"]), "median (mm)": float(metrics["median_mm"]),
               "train (min)": float(metrics["train_seconds"]) / 60.0,
               "s / image": float(metrics["infer_seconds_per_image"]),
               "device": str(candidates.get(name, {}).get("device", manifest.get("device", "")))}
        if "candidates" in manifest:
            row["chosen"] = name in members or name == label
            row["val MRE (mm)"] = float(candidates.get(name, {}).get("val_mre_mm", float("nan")))
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")


def selection_table(output_dir: str | Path) -> pd.DataFrame | None:
    """An ensemble chosen on val: each step's added run, the val MRE (mm) of the combination so far and whether the
    step is kept (the members: the steps up to the lowest val MRE); None for an ensemble of listed members."""
    path = Path(output_dir) / SELECTION_FILE
    if not path.is_file():
        return None
    return pd.read_csv(path).set_index("step")


def fig_cost(table: pd.DataFrame, path: str | Path | None = None) -> Figure:
    """Test MRE (mm) against training time (min): the members and the ensemble (the members' summed time; all
    candidates' for one chosen on val, whose candidates not chosen are drawn hollow)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for k, (name, row) in enumerate(table.iterrows()):
        last = k == len(table) - 1
        left_out = not bool(row.get("chosen", True))
        colour = f"C{k % 10}"
        ax.scatter(row["train (min)"], row["MRE (mm)"], s=60 if last else 36, marker="*" if last else "o",
                   zorder=3, facecolors="none" if left_out else colour, edgecolors=colour)
        # the ensemble's long label on two lines, below its point and ending there: it is the rightmost point (the
        # summed time) and the members' labels lie to its upper left
        ax.annotate(str(name).replace(" (", "\n(", 1) if last else str(name), (row["train (min)"], row["MRE (mm)"]),
                    xytext=(4, -8) if last else (4, 4), textcoords="offset points", fontsize=8,
                    ha="right" if last else "left", va="top" if last else "baseline")
    ax.set_xlabel("training time (min)")
    ax.set_ylabel("test MRE (mm)")
    chosen_on_val = "chosen" in table.columns
    ax.set_title("accuracy and cost: candidates (hollow: not chosen on val) and their ensemble" if chosen_on_val
                 else "accuracy and cost: members and their ensemble", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.2, y=0.2)  # room for the labels
    return finish(fig, path, DPI)


def show_ensemble(output_dir: str | Path) -> None:
    """Display the members' and the ensemble's table, the selection's steps (chosen on val) and :func:`fig_cost`
    (written into the run folder as ``fig_cost.png``)."""
    from IPython.display import Image, display

    table = ensemble_table(output_dir)
    display(table.round(3))
    steps = selection_table(output_dir)
    if steps is not None:
        display(steps.round(3))
    path = Path(output_dir) / "fig_cost.png"
    fig_cost(table, path)
    display(Image(filename=str(path)))
