"""Figures of the multiresolution HTC (:mod:`lmlib.methods.htc`), from a finished run.

- :func:`fig_heatmaps`: for a few test images, the image with the ground truth (blue) and the prediction
  (red), then the predicted heatmaps at 1/4 and at 1/2 resolution (maximum over the landmarks), drawn on
  the image at their true extent, each head's own decoded points (x) on them.
- :func:`fig_attention`: per backbone stage, the spatial attention maps of the double-attention block
  (the softmax over positions that pools the global descriptors) for one test image: the ``n_maps``
  most concentrated maps of each stage (lowest entropy), on the image.
- :func:`show_htc`: both, saved as ``fig_heatmaps.png`` / ``fig_attention.png`` in the run folder and
  displayed (notebook).

``result`` is the :class:`lmlib.engine.runner.RunResult` of ``run_method("htc", ...)``: its
``fits[""].module`` (the selected weights) and ``test_samples``. 2D runs only (images ``(x, y)``,
drawn as ``image.T``).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from lmlib.data.loaders import LandmarkDataset, collate_landmarks
from lmlib.methods.decoding import decode_maps
from lmlib.methods.htc import HEAD_STRIDES, to_input_index
from lmlib.outputs.figure_files import DPI
from lmlib.outputs.qualitative import finish

GT_COLOR, PRED_COLOR = "tab:blue", "red"


def htc_outputs(module: Any, samples: Sequence[Any], keep_attention: bool = False
                ) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[torch.Tensor]]:
    """The batch (whole images on the evaluation grid), the heads' heatmaps and decoded ``coords``
    ``(B, N, D)`` (input-grid index), and with ``keep_attention`` each stage's spatial attention maps
    ``(B, m, *size_stage)``."""
    ds = LandmarkDataset(list(samples), view=module.eval_view, cache=False)
    batch = collate_landmarks([ds[k] for k in range(len(ds))])
    net, method = module.net, module.method
    net.keep_attention(keep_attention)
    try:
        with torch.no_grad():
            out = method.forward(net, {k: v.to(module.device) if isinstance(v, torch.Tensor) else v
                                       for k, v in batch.items()})
            coords, _ = method.decode_batch(out, batch, 0)
        attention = [s.attention.attention.cpu() for s in net.stages] if keep_attention else []
    finally:
        net.keep_attention(False)
    out = {k: v.float().cpu() for k, v in out.items()}
    out["coords"] = coords.cpu()
    return batch, out, attention


def _frame(ax: plt.Axes, plane: np.ndarray, title: str) -> None:
    ax.set_xlim(-0.5, plane.shape[0] - 0.5)
    ax.set_ylim(plane.shape[1] - 0.5, -0.5)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _check_2d(module: Any) -> None:
    if module.method.spatial_dims != 2:
        raise ValueError("HTC figures are drawn for 2D runs only")


def fig_heatmaps(result: Any, n_images: int = 3, path: str | Path | None = None) -> Figure:
    """Rows: test images; columns: image + points, 1/4-resolution heatmap, 1/2-resolution heatmap."""
    module = result.fits[""].module
    _check_2d(module)
    samples = list(result.test_samples)[: max(1, int(n_images))]
    batch, out, _ = htc_outputs(module, samples)
    heads = [h for h in ("quarter", "half") if h in out]
    fig, axes = plt.subplots(len(samples), 1 + len(heads), figsize=(3.0 * (1 + len(heads)), 3.4 * len(samples)),
                             squeeze=False)
    shown = None
    for b in range(len(samples)):
        image = batch["image"][b, 0].numpy()
        lo, hi = np.percentile(image, (1, 99))
        gt = batch["landmarks"][b].double().numpy()
        gt[~batch["valid"][b].numpy()] = np.nan
        pred = out["coords"][b].numpy()
        ax = axes[b][0]
        ax.imshow(image.T, cmap="gray", vmin=lo, vmax=hi)
        ax.plot(gt[:, 0], gt[:, 1], "o", mfc="none", color=GT_COLOR, ms=5, label="ground truth")
        ax.plot(pred[:, 0], pred[:, 1], "x", color=PRED_COLOR, ms=4, mew=1.0, label="prediction (mean of heads)")
        _frame(ax, image, f"{batch['image_id'][b]}")
        for j, head in enumerate(heads, 1):
            s = HEAD_STRIDES[head]
            maps = out[head][b]
            own = to_input_index(decode_maps(maps[None], 2, module.method.decoder)[0][0], s).numpy()
            ax = axes[b][j]
            ax.imshow(image.T, cmap="gray", vmin=lo, vmax=hi)
            heat = maps.max(dim=0).values.numpy()
            extent = (-0.5, heat.shape[0] * s - 0.5, heat.shape[1] * s - 0.5, -0.5)
            shown = ax.imshow(heat.T, cmap="magma", alpha=0.6, vmin=0, vmax=1, extent=extent, interpolation="nearest")
            ax.plot(own[:, 0], own[:, 1], "x", color="cyan", ms=3, mew=0.8)
            _frame(ax, image, f"1/{s} resolution ({heat.shape[0]} x {heat.shape[1]})")
    axes[0][0].legend(fontsize=6, loc="lower left")
    if shown is not None:
        fig.colorbar(shown, ax=axes[:, 1:].ravel().tolist(), shrink=0.6, label="heatmap (max over landmarks)")
    fig.suptitle("Predicted heatmaps at both resolutions (x: each head's decoded points)", fontsize=9)
    return finish(fig, path, DPI)


def _entropy(maps: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each spatial distribution ``(m, *size)`` -> ``(m,)``."""
    p = maps.flatten(1).clamp_min(1e-12)
    return -(p * p.log()).sum(1)


def fig_attention(result: Any, n_maps: int = 4, image: int = 0, path: str | Path | None = None) -> Figure:
    """Rows: backbone stages (stride 2-16); columns: the ``n_maps`` most concentrated spatial attention
    maps of the stage's double attention on test image ``image``."""
    module = result.fits[""].module
    _check_2d(module)
    sample = list(result.test_samples)[int(image)]
    batch, _, attention = htc_outputs(module, [sample], keep_attention=True)
    img = batch["image"][0, 0].numpy()
    lo, hi = np.percentile(img, (1, 99))
    gt = batch["landmarks"][0].double().numpy()
    fig, axes = plt.subplots(len(attention), n_maps, figsize=(2.6 * n_maps, 3.0 * len(attention)), squeeze=False)
    for i, maps in enumerate(attention):
        maps = maps[0]
        order = torch.argsort(_entropy(maps))[:n_maps].tolist()
        stride = img.shape[0] // maps.shape[1]
        for j in range(n_maps):
            ax = axes[i][j]
            ax.imshow(img.T, cmap="gray", vmin=lo, vmax=hi)
            if j < len(order):
                a = maps[order[j]].numpy()
                extent = (-0.5, a.shape[0] * stride - 0.5, a.shape[1] * stride - 0.5, -0.5)
                ax.imshow((a / a.max()).T, cmap="inferno", alpha=0.65, extent=extent, interpolation="nearest")
            ax.plot(gt[:, 0], gt[:, 1], ".", color=GT_COLOR, ms=2)
            _frame(ax, img, f"stage {i + 1} (stride {stride}), map {order[j] if j < len(order) else '-'}")
    fig.suptitle(f"{batch['image_id'][0]}: most concentrated spatial attention maps of each stage's double "
                 "attention (normalised to their maximum)", fontsize=9)
    return finish(fig, path, DPI)


def show_htc(result: Any, n_images: int = 3) -> dict[str, Path]:
    """Draw :func:`fig_heatmaps` and :func:`fig_attention` into the run folder and display them."""
    from IPython.display import Image, display

    folder = Path(result.output_dir)
    paths = {"fig_heatmaps.png": folder / "fig_heatmaps.png", "fig_attention.png": folder / "fig_attention.png"}
    fig_heatmaps(result, n_images, paths["fig_heatmaps.png"])
    fig_attention(result, path=paths["fig_attention.png"])
    for path in paths.values():
        display(Image(filename=str(path)))
    return paths
