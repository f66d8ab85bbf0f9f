"""Training figures: curves from the training log, overlays during training, a GIF of the progression.

The seed's outputs, written under the run folder:
- :func:`plot_training_curves`: ``fig_loss.png`` (train/val loss), ``fig_mean_error.png`` (validation
  mean radial error, mm), ``fig_dice.png`` (validation Dice), ``fig_mean_error_per_landmark.png``
  and ``fig_dice_per_landmark.png``, from the CSVLogger file ``training_log/metrics.csv``;
- :class:`OverlayCallback`: every ``every_n_epochs`` epochs, ``overlays/epoch_NNN.png`` with a few
  validation images, ground truth in **blue** and prediction in **red** (network-grid pixels), and at
  the end of training ``fig_training_progress.gif`` (imageio) of those frames.
Images are indexed ``(x, y[, z])`` and shown as ``image.T`` (y down); 3D images show the axial
(x, y) slice through the ground-truth landmarks' median z, with all landmarks projected onto it.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import lightning.pytorch as pl
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from lightning.pytorch.callbacks import Callback
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from lmlib.data.loaders import collate_landmarks
from lmlib.engine.training import LandmarkModule, errors_mm
from lmlib.outputs.figure_files import save_figure

GT_COLOR = "tab:blue"
PRED_COLOR = "red"


def read_history(history_csv: str | Path) -> pd.DataFrame:
    """One row per epoch (index ``epoch``) from a CSVLogger ``metrics.csv`` (step rows merged)."""
    df = pd.read_csv(history_csv)
    if "epoch" not in df.columns:
        raise ValueError(f"{history_csv}: no 'epoch' column")
    df = df.dropna(subset=["epoch"])
    df["epoch"] = df["epoch"].astype(int)
    return df.groupby("epoch").last()  # last non-NaN value of each column in the epoch


def _line_figure(history: pd.DataFrame, columns: dict[str, str], ylabel: str, title: str,
                 logy: bool = False, mark_min: str = "") -> Figure | None:
    """One line per present column; ``mark_min`` (a unit) marks and labels each line's minimum (the
    selected epoch when the column is the selection metric)."""
    present = {c: label for c, label in columns.items() if c in history.columns and history[c].notna().any()}
    if not present:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for col, label in present.items():
        s = history[col].dropna()
        ax.plot(s.index + 1, s.to_numpy(), marker="o" if len(s) < 30 else None, ms=3, label=label)
        if mark_min and len(s):
            best = s.idxmin()
            ax.plot(best + 1, s[best], "*", color="red", ms=9,
                    label=f"best {s[best]:.3g} {mark_min} (epoch {best + 1})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig


def _per_landmark_figure(history: pd.DataFrame, prefix: str, ylabel: str, title: str) -> Figure | None:
    cols = [c for c in history.columns if c.startswith(prefix) and history[c].notna().any()]
    if not cols:
        return None
    n = len(cols)
    ncol = min(5, n)
    nrow = int(np.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.2 * ncol, 1.7 * nrow), sharex=True, sharey=True, squeeze=False)
    for ax, col in zip(axes.ravel(), cols):
        s = history[col].dropna()
        ax.plot(s.index + 1, s.to_numpy(), lw=1.2)
        ax.set_title(col[len(prefix):], fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.supxlabel("epoch", fontsize=8)
    fig.supylabel(ylabel, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_training_curves(history_csv: str | Path, output_dir: str | Path | None = None,
                         in_sample: bool = False) -> dict[str, Figure]:
    """Loss, mean error (mm) and Dice curves, overall and per landmark; saved as PNGs in ``output_dir``.
    ``in_sample``: a refit trained on its val images (:mod:`lmlib.data.refit`): the curves say so, and no best epoch is
    marked (the last is kept).

    Returns the figures by file name (missing metrics give no figure).
    """
    h = read_history(history_csv)
    val = "validation (in-sample)" if in_sample else "validation"
    drawn = {
        "fig_loss.png": _line_figure(h, {"train/loss": "train", "val/loss": val}, "loss", "Loss", logy=True),
        "fig_mean_error.png": _line_figure(h, {"val/mre_mm": val}, "mean radial error (mm, log scale)",
                                           "Mean landmark error", logy=True, mark_min="" if in_sample else "mm"),
        "fig_dice.png": _line_figure(h, {"val/dice": val}, "Dice", "Dice (thresholded output vs target)"),
        "fig_mean_error_per_landmark.png": _per_landmark_figure(h, "val/err_mm/", "mean radial error (mm)",
                                                                f"{val.capitalize()} error per landmark"),
        "fig_dice_per_landmark.png": _per_landmark_figure(h, "val/dice/", "Dice", f"{val.capitalize()} Dice per landmark"),
    }
    figs = {k: v for k, v in drawn.items() if v is not None}
    if output_dir is not None:
        for name, fig in figs.items():
            save_figure(fig, Path(output_dir) / name)
    return figs


def _display_plane(image: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """2D image to show: the image itself (2D) or the axial slice at the median ground-truth z (3D)."""
    if image.ndim == 2:
        return image
    z = np.nanmedian(gt[:, 2]) if np.isfinite(gt[:, 2]).any() else image.shape[2] / 2
    return image[:, :, int(np.clip(np.round(z), 0, image.shape[2] - 1))]


def fig_training_overlay(images: Sequence[np.ndarray], gt_index: Sequence[np.ndarray], pred_index: Sequence[np.ndarray],
                titles: Sequence[str] | None = None, suptitle: str = "", panel_inches: float = 2.6) -> Figure:
    """Panels of images (x, y[, z]) with ground truth (blue dots) and predictions (red crosses), in
    network-grid pixel indices (N, D)."""
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(panel_inches * n, panel_inches * 1.1), squeeze=False)
    for k, ax in enumerate(axes[0]):
        plane = _display_plane(np.asarray(images[k]), np.asarray(gt_index[k]))
        lo, hi = np.percentile(plane, (1, 99))
        ax.imshow(plane.T, cmap="gray", vmin=lo, vmax=hi, origin="upper")
        g, p = np.asarray(gt_index[k]), np.asarray(pred_index[k])
        ax.plot(g[:, 0], g[:, 1], "o", color=GT_COLOR, ms=3, label="ground truth")
        ax.plot(p[:, 0], p[:, 1], "x", color=PRED_COLOR, ms=4, mew=1.2, label="prediction")
        for a, b in zip(g, p):
            if np.isfinite(a).all() and np.isfinite(b).all():
                ax.plot([a[0], b[0]], [a[1], b[1]], "-", color="yellow", lw=0.6)
        ax.set_xticks([])
        ax.set_yticks([])
        if titles is not None:
            ax.set_title(titles[k], fontsize=7)
    axes[0][0].legend(fontsize=6, loc="lower left")
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    plt.close(fig)
    return fig


def make_gif(frame_paths: Sequence[str | Path], path: str | Path, fps: float = 10.0, max_bytes: int = 1_000_000
             ) -> Path | None:
    """Write the PNG frames as an animated GIF (looping) with imageio; halves the frame size until the
    file is under ``max_bytes``. Returns None when there are no frames."""
    import imageio.v2 as imageio

    frames = [np.asarray(imageio.imread(str(p)))[..., :3] for p in frame_paths]
    if not frames:
        return None
    shape = min((f.shape for f in frames), key=lambda s: s[0] * s[1])
    frames = [f[: shape[0], : shape[1]] for f in frames]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    step = 1
    while True:
        small: list[ArrayLike] = [f[::step, ::step] for f in frames]
        imageio.mimsave(str(path), small, duration=1000.0 / fps, loop=0)
        if path.stat().st_size <= max_bytes or step >= 8:
            return path
        step *= 2


class OverlayCallback(Callback):
    """Every ``every_n_epochs`` epochs (and at the last), draw ``n_images`` validation images with
    ground truth (blue) and prediction (red) into ``<output_dir>/overlays/epoch_NNN.png``; at the end
    of fitting, write ``<output_dir>/fig_training_progress.gif`` (``fps`` frames per second).

    Needs the trainer's datamodule to be a :class:`lmlib.data.loaders.LandmarkDataModule`.
    """

    def __init__(self, output_dir: str | Path, every_n_epochs: int = 10, n_images: int = 4, fps: float = 10.0,
                 dpi: int = 80) -> None:
        self.output_dir = Path(output_dir)
        self.every, self.n_images, self.fps, self.dpi = max(1, int(every_n_epochs)), int(n_images), fps, dpi

    @property
    def frame_dir(self) -> Path:
        return self.output_dir / "overlays"

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:  # several processes: rank 0 draws
            return
        epoch = int(trainer.current_epoch)
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        if (epoch + 1) % self.every and epoch != 0 and not last:
            return
        # Lightning's data connector sets Trainer.datamodule at run time; the class does not declare it
        ds = trainer.datamodule.datasets["val"]  # type: ignore[attr-defined]
        idx = list(range(min(self.n_images, len(ds))))
        if not idx:
            return
        module = cast(LandmarkModule, pl_module)  # what this callback trains with (see the class docstring)
        images, gts, preds, titles = [], [], [], []
        for k in idx:
            batch = collate_landmarks([ds[k]])
            coords, _, _ = module.predict_batch(batch)
            err = errors_mm(coords.cpu(), batch)[0].numpy()
            gt = batch["landmarks"][0].double().numpy()
            gt[~batch["valid"][0].numpy()] = np.nan
            pred = coords[0].cpu().double().numpy()
            if batch["index_to_world"].ndim == 4:  # stacked patches: channel 0 shows landmark 0 only
                gt[1:], pred[1:] = np.nan, np.nan
            images.append(batch["image"][0, 0].cpu().numpy())
            gts.append(gt)
            preds.append(pred)
            titles.append(f"{batch['image_id'][0]}: {np.nanmean(err):.2f} mm")
        fig = fig_training_overlay(images, gts, preds, titles, suptitle=f"epoch {epoch + 1}")
        self.frame_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.frame_dir / f"epoch_{epoch + 1:03d}.png", dpi=self.dpi)

    def frames(self) -> list[Path]:
        """Overlay frames written so far, in epoch order."""
        paths = [p for p in self.frame_dir.glob("epoch_*.png") if re.fullmatch(r"epoch_\d+\.png", p.name)]
        return sorted(paths, key=lambda p: int(p.stem.split("_")[1]))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            make_gif(self.frames(), self.output_dir / "fig_training_progress.gif", self.fps)
