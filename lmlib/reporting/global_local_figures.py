"""Figures of the global-to-local FCNN (:mod:`lmlib.methods.global_local`), from a finished run.

- :func:`fig_votes`: for a few test images, the global stage's votes (patch centre + decoded
  displacement of every output cell, one colour per landmark, marker area ~ presence probability) with
  the ground truth (blue) and the global prediction (red), and below each the presence map (largest
  presence probability over the landmarks per output cell) on the image. 3D: the axial slice through
  the landmarks' median z, votes projected onto it, presence maximal over z.
- :func:`fig_global_to_local`: per landmark, how far the local stage moved the global estimate
  (test split, mm) and the mean error of both stages.
- :func:`show_global_local`: both, saved as ``fig_votes.png`` / ``fig_global_to_local.png`` in the
  run folder and displayed (notebook).

``result`` is the :class:`lmlib.engine.runner.RunResult` of ``run_method("global_local", ...)``: its
``fits["global"].module`` (the selected global weights), ``test_samples`` and ``output_dir`` (the
stages' ``predictions.csv``). Images are indexed ``(x, y[, z])`` and drawn as ``image.T``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from lmlib.data.loaders import LandmarkDataset, collate_landmarks
from lmlib.methods.global_local import votes
from lmlib.outputs.contract import read_stage_predictions
from lmlib.outputs.figure_files import DPI
from lmlib.outputs.qualitative import finish

GT_COLOR, PRED_COLOR = "tab:blue", "red"


def global_outputs(module: Any, samples: Sequence[Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The batch (whole images on the global evaluation grid) and the global net's raw outputs plus
    ``votes`` ``(B, N, D, *P)``, ``probability`` ``(B, N, *P)`` and decoded ``coords`` ``(B, N, D)``."""
    ds = LandmarkDataset(list(samples), view=module.eval_view, cache=False)
    batch = collate_landmarks([ds[k] for k in range(len(ds))])
    method = module.method
    with torch.no_grad():
        out = method.forward(module.net, {k: v.to(module.device) if isinstance(v, torch.Tensor) else v
                                          for k, v in batch.items()})
        coords, _ = method.decode_batch(out, batch, 0)
    out = {k: v.cpu() for k, v in out.items()}
    out["votes"] = votes(out["displacement"], method.stride, method.displacement)
    out["probability"] = torch.sigmoid(out["presence"].float())
    out["coords"] = coords.cpu()
    return batch, out


def _plane(image: np.ndarray, z: float | None) -> np.ndarray:
    if image.ndim == 2:
        return image
    k = int(np.clip(np.round(z if z is not None else image.shape[2] / 2), 0, image.shape[2] - 1))
    return image[:, :, k]


def fig_votes(result: Any, n_images: int = 3, path: str | Path | None = None) -> Figure:
    """Vote clouds (top) and presence maps (bottom) of the global stage on ``n_images`` test images."""
    module = result.fits["global"].module
    samples = list(result.test_samples)[: max(1, int(n_images))]
    batch, out = global_outputs(module, samples)
    stride = module.method.stride
    n = len(samples)
    n_lm = out["probability"].shape[1]
    colors = plt.get_cmap("tab20" if n_lm > 10 else "tab10")(np.arange(n_lm) % (20 if n_lm > 10 else 10))
    fig, axes = plt.subplots(2, n, figsize=(3.4 * n, 6.6), squeeze=False)
    for b in range(n):
        image = batch["image"][b, 0].numpy()
        gt = batch["landmarks"][b].double().numpy()
        gt[~batch["valid"][b].numpy()] = np.nan
        z = float(np.nanmedian(gt[:, 2])) if image.ndim == 3 and np.isfinite(gt[:, 2]).any() else None
        plane = _plane(image, z)
        lo, hi = np.percentile(plane, (1, 99))
        prob = out["probability"][b].numpy()  # (N, *P)
        v = out["votes"][b].numpy()  # (N, D, *P)
        pred = out["coords"][b].numpy()
        ax = axes[0][b]
        ax.imshow(plane.T, cmap="gray", vmin=lo, vmax=hi)
        for k in range(n_lm):
            pts, w = v[k, :2].reshape(2, -1), prob[k].reshape(-1)
            ax.scatter(pts[0], pts[1], s=2 + 40 * w, color=colors[k], alpha=0.6, linewidths=0)
        ax.plot(gt[:, 0], gt[:, 1], "o", mfc="none", color=GT_COLOR, ms=6, label="ground truth")
        ax.plot(pred[:, 0], pred[:, 1], "x", color=PRED_COLOR, ms=5, mew=1.2, label="global estimate")
        ax.set_xlim(-0.5, plane.shape[0] - 0.5)
        ax.set_ylim(plane.shape[1] - 0.5, -0.5)
        ax.set_title(f"{batch['image_id'][b]}: votes", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        presence = prob.max(axis=0)
        if presence.ndim == 3:
            presence = presence.max(axis=2)
        ax = axes[1][b]
        ax.imshow(plane.T, cmap="gray", vmin=lo, vmax=hi)
        extent = (-0.5, presence.shape[0] * stride - 0.5, presence.shape[1] * stride - 0.5, -0.5)
        shown = ax.imshow(presence.T, cmap="magma", alpha=0.55, vmin=0, vmax=1, extent=extent, interpolation="nearest")
        ax.plot(gt[:, 0], gt[:, 1], "o", mfc="none", color=GT_COLOR, ms=6)
        ax.set_xlim(-0.5, plane.shape[0] - 0.5)
        ax.set_ylim(plane.shape[1] - 0.5, -0.5)
        ax.set_title(f"presence, {stride}-px cells", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize=6, loc="lower left")
    fig.colorbar(shown, ax=axes[1].tolist(), shrink=0.7, label="presence probability")
    fig.suptitle("Global stage: every output cell votes for every landmark (marker area ~ presence)", fontsize=9)
    return finish(fig, path, DPI)


def global_to_local(output_dir: str | Path) -> pd.DataFrame:
    """Per (image, landmark): the local stage's move from the global estimate (``moved_mm``) and both
    stages' errors (``global_mm``, ``local_mm``), test split."""
    preds = read_stage_predictions(output_dir, ("global", "local"))
    if set(preds) != {"global", "local"}:
        raise FileNotFoundError(f"{output_dir}: needs global/ and local/ predictions.csv")
    g, loc = preds["global"], preds["local"]
    keys = ["image_id", "landmark"]
    m = g.merge(loc, on=keys, suffixes=("_g", "_l"))
    axes = [a for a in ("x", "y", "z") if m[f"{a}_mm_g"].notna().any()]
    moved = np.sqrt(sum((m[f"{a}_mm_l"] - m[f"{a}_mm_g"]) ** 2 for a in axes))
    return pd.DataFrame({"image_id": m["image_id"], "landmark": m["landmark"], "moved_mm": moved,
                         "global_mm": m["error_mm_g"], "local_mm": m["error_mm_l"]})


def fig_global_to_local(result: Any, path: str | Path | None = None) -> Figure:
    """Per landmark: distance the local stage moved each global estimate (box plot) and the mean error
    of the global and local stages (test split, mm)."""
    table = global_to_local(result.output_dir)
    names = list(dict.fromkeys(table["landmark"]))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(7.0, 0.5 * len(names) + 4), 3.8))
    a1.boxplot([table.loc[table["landmark"] == n, "moved_mm"].dropna().to_numpy() for n in names],
               showfliers=True, flierprops={"markersize": 3})
    a1.set_xticks(range(1, len(names) + 1), names, rotation=90, fontsize=7)
    a1.set_ylabel("|local - global| (mm)")
    a1.set_title("Global-to-local displacement", fontsize=9)
    x = np.arange(len(names))
    per = table.groupby("landmark")[["global_mm", "local_mm"]].mean().reindex(names)
    a2.bar(x - 0.2, per["global_mm"], 0.4, label=f"global ({table['global_mm'].mean():.2f} mm)")
    a2.bar(x + 0.2, per["local_mm"], 0.4, label=f"local ({table['local_mm'].mean():.2f} mm)")
    a2.set_xticks(x, names, rotation=90, fontsize=7)
    a2.set_ylabel("mean radial error (mm)")
    a2.set_title("Error per landmark, test split", fontsize=9)
    a2.legend(fontsize=7)
    for ax in (a1, a2):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return finish(fig, path, DPI)


def show_global_local(result: Any, n_images: int = 3) -> dict[str, Path]:
    """Draw :func:`fig_votes` and :func:`fig_global_to_local` into the run folder and display them."""
    from IPython.display import Image, display

    folder = Path(result.output_dir)
    paths = {"fig_votes.png": folder / "fig_votes.png", "fig_global_to_local.png": folder / "fig_global_to_local.png"}
    fig_votes(result, n_images, paths["fig_votes.png"])
    fig_global_to_local(result, paths["fig_global_to_local.png"])
    per_landmark = global_to_local(folder).groupby("landmark")[["moved_mm", "global_mm", "local_mm"]].mean()
    print(per_landmark.round(2).to_string())
    for path in paths.values():
        display(Image(filename=str(path)))
    return paths
