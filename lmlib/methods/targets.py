"""Training targets made from landmark indices: Gaussian heatmaps and dilation-erosion masks (2D / 3D).

All functions take landmarks as continuous indices ``(..., N, D)`` in ``(x, y[, z])`` order on the grid
of the network (index 0 = centre of the first pixel) and a grid ``size`` ``(x, y[, z])``; they return
one channel per landmark, ``(..., N, *size)``, so channel ``k`` of a tensor indexed ``[x, y(, z)]``
lines up with the image tensor ``(C, x, y[, z])``. Invalid landmarks give an all-zero channel.

Torch functions work on batches on any device (targets are made on the batch, inside the training
step, because the dilation-erosion radius changes with the epoch); the ``*_np`` wrappers take and
return NumPy arrays for one image.

Dilation-erosion masks (Suh et al., MIDL 2023; the seed's training tool): the landmark pixel dilated
``k`` times with the 4-connected cross element is the L1 ball ``|dx| + |dy| (+ |dz|) <= k`` around the
landmark pixel (2k^2 + 2k + 1 pixels in 2D, (2k+1)(2k^2+2k+3)/3 voxels in 3D); :func:`diamond_masks`
uses this exact formula (tested against ``scipy.ndimage.binary_dilation``). The seed shrinks ``k``
from 65 by 10 every 50 epochs down to 5 on a 512-px (padded square) image; :class:`ShrinkSchedule`
keeps those seed-unit radii and scales them to a grid by ``max(size) / 512``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

SEED_GRID_PX = 512  # the seed pads each image to a square and resizes it to 512 x 512


def _grid(size: Sequence[int], device: torch.device | None = None, dtype: torch.dtype = torch.float32
          ) -> list[torch.Tensor]:
    """Per-axis index vectors reshaped for broadcasting against ``(..., N, *size)``."""
    d = len(size)
    out = []
    for axis, n in enumerate(size):
        shape = [1] * d
        shape[axis] = int(n)
        out.append(torch.arange(int(n), device=device, dtype=dtype).reshape(shape))
    return out


def _prep(landmarks: torch.Tensor, valid: torch.Tensor | None, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    lm = torch.as_tensor(landmarks)
    if lm.shape[-1] != len(size):
        raise ValueError(f"landmarks have {lm.shape[-1]} coordinates but the grid has {len(size)} axes")
    lm = lm.float()
    ok = ~torch.isnan(lm).any(-1)
    if valid is not None:
        ok = ok & torch.as_tensor(valid, device=lm.device).bool()
    return torch.nan_to_num(lm, nan=0.0), ok


def gaussian_heatmaps(landmarks: torch.Tensor, size: Sequence[int], sigma: float | Sequence[float] = 2.0,
                      valid: torch.Tensor | None = None, amplitude: float = 1.0) -> torch.Tensor:
    """Gaussian heatmaps ``(..., N, *size)``: ``amplitude * exp(-sum_d (i_d - p_d)^2 / (2 sigma_d^2))``.

    ``landmarks``: ``(..., N, D)`` continuous indices (pixels); ``sigma`` in pixels (one value or one per
    axis); the peak value ``amplitude`` is reached exactly at the landmark (off-grid landmarks give a
    lower sampled maximum). Invalid/NaN landmarks give zeros.
    """
    lm, ok = _prep(landmarks, valid, size)
    d = len(size)
    # a Python number stays one (the training losses pass one): torch.compile traces it into the compiled loss
    # without the graph break NumPy would make
    if isinstance(sigma, int | float):
        sig = [float(sigma)] * d
    else:
        sig = [float(v) for v in np.broadcast_to(np.asarray(sigma, dtype=np.float64), (d,))]
    # separable: exp(-sum_d t_d) = prod_d exp(-t_d), one exp per axis along that axis only and one product over the
    # grid (an exp and five other passes over every pixel of (B, N, *size) were a large share of the heatmap U-Net's
    # training step on a CPU: the benchmark notebook's step times, forward_s)
    heat: torch.Tensor | None = None
    for axis, g in enumerate(_grid(size, lm.device)):
        p = lm[..., axis].reshape(*lm.shape[:-1], *([1] * d))
        factor = torch.exp((g - p) ** 2 * (-0.5 / sig[axis] ** 2))
        if heat is None:  # the amplitude and the validity ride on the first axis' line
            heat = factor * (amplitude * ok.reshape(*ok.shape, *([1] * d)).to(factor.dtype))
        else:
            heat = heat * factor
    assert heat is not None  # a grid has at least one axis
    return heat


def diamond_masks(landmarks: torch.Tensor, size: Sequence[int], radius: int | float,
                  valid: torch.Tensor | None = None, centre: str = "round") -> torch.Tensor:
    """Binary L1-ball masks ``(..., N, *size)`` (float 0/1): ``sum_d |i_d - c_d| <= radius``.

    ``centre="round"`` (the seed): ``c = round(p)``, equal to dilating the landmark's pixel ``radius``
    times with the cross structuring element (``scipy.ndimage.generate_binary_structure(D, 1)``).
    ``centre="exact"``: ``c = p`` (the ball around the sub-pixel landmark; its pixel centroid is on
    average 0.27 px from ``p`` instead of 0.37 px for the rounded one). ``radius`` 0 with "round" marks
    the landmark pixel only; invalid landmarks and landmarks whose pixel lies outside the grid give an
    empty mask (the seed gives invisible landmarks an empty mask too).
    """
    if centre not in ("round", "exact"):
        raise ValueError(f"centre must be 'round' or 'exact', got {centre!r}")
    lm, ok = _prep(landmarks, valid, size)
    d = len(size)
    centre_t = torch.round(lm)
    sz = torch.as_tensor(list(size), device=lm.device, dtype=lm.dtype)
    ok = ok & ((centre_t >= 0) & (centre_t <= sz - 1)).all(-1)
    if centre == "exact":
        centre_t = lm
    dist: torch.Tensor | None = None
    for axis, g in enumerate(_grid(size, lm.device)):
        p = centre_t[..., axis].reshape(*centre_t.shape[:-1], *([1] * d))
        term = (g - p).abs()
        dist = term if dist is None else dist + term
    assert dist is not None  # a grid has at least one axis
    mask = (dist <= float(radius) + 1e-6).float()
    return mask * ok.reshape(*ok.shape, *([1] * d)).float()


def diamond_area(radius: int, ndim: int = 2) -> int:
    """Number of pixels in the L1 ball of integer ``radius`` (2k^2+2k+1 in 2D, (2k+1)(2k^2+2k+3)/3 in 3D)."""
    k = int(radius)
    if ndim == 2:
        return 2 * k * k + 2 * k + 1
    if ndim == 3:
        return (2 * k + 1) * (2 * k * k + 2 * k + 3) // 3
    raise ValueError(f"ndim must be 2 or 3, got {ndim}")


def mask_pos_weight(radius: int, size: Sequence[int]) -> float:
    """The seed's BCE ``pos_weight = (S - n) / n``: background over foreground area of one mask.

    ``S`` is the grid's pixel count and ``n`` the nominal mask area :func:`diamond_area` (the seed:
    29.5 at k=65 and 4,296 at k=5 on 512 x 512).
    """
    s = 1.0  # a plain loop, not NumPy: traced into the compiled loss without a graph break
    for v in size:
        s *= int(v)
    n = float(min(diamond_area(radius, len(size)), s))
    return (s - n) / n


@dataclass(frozen=True)
class ShrinkSchedule:
    """Mask radius per epoch: ``start`` minus ``step`` every ``every`` epochs, never below ``stop``.

    Radii are in *seed units* (pixels of the seed's 512-px padded square); :meth:`radius_px` scales them
    to a grid by ``max(size) / 512`` (the longest side is what the seed maps to 512 px), rounds, and
    keeps at least 1 px. The seed: ``ShrinkSchedule(65, 10, 5, every=50)`` over 350 epochs.
    """

    start: int = 65
    step: int = 10
    stop: int = 5
    every: int = 50

    @property
    def n_stages(self) -> int:
        return (self.start - self.stop) // self.step + 1 if self.step > 0 else 1

    @classmethod
    def fit_to(cls, max_epochs: int, start: int = 65, step: int = 10, stop: int = 5) -> ShrinkSchedule:
        """The seed's radii spread evenly over ``max_epochs`` (the seed: 7 stages x 50 of 350 epochs)."""
        n = (start - stop) // step + 1 if step > 0 else 1
        return cls(start, step, stop, max(1, int(max_epochs) // n))

    def radius(self, epoch: int) -> int:
        """Radius in seed units at ``epoch`` (0-based)."""
        if self.step <= 0:
            return self.start
        return max(self.stop, self.start - self.step * (int(epoch) // self.every))

    def radius_px(self, epoch: int, size: Sequence[int]) -> int:
        """Radius in pixels of a grid of ``size`` (x, y[, z]) at ``epoch``."""
        return max(1, int(round(self.radius(epoch) * max(int(s) for s in size) / SEED_GRID_PX)))


def dice_scores(pred_mask: torch.Tensor, target_mask: torch.Tensor, spatial_dims: int, eps: float = 1e-6
                ) -> torch.Tensor:
    """Dice ``2|A and B| / (|A| + |B|)`` per channel ``(..., N)`` of binary masks ``(..., N, *size)``.

    NaN where both masks are empty (nothing to compare).
    """
    axes = tuple(range(-spatial_dims, 0))
    a, b = pred_mask.float(), target_mask.float()
    inter = (a * b).sum(axes)
    total = a.sum(axes) + b.sum(axes)
    dice = 2 * inter / total.clamp_min(eps)
    return torch.where(total > 0, dice, torch.full_like(dice, float("nan")))


# ----------------------------------------------------------------------------- NumPy conveniences
def gaussian_heatmaps_np(landmarks_index: np.ndarray, size: Sequence[int], sigma: float | Sequence[float] = 2.0,
                         valid: np.ndarray | None = None, amplitude: float = 1.0) -> np.ndarray:
    """NumPy version of :func:`gaussian_heatmaps` for one image: ``(N, D)`` -> ``(N, *size)`` float32."""
    v = None if valid is None else torch.as_tensor(np.asarray(valid, dtype=bool))
    return gaussian_heatmaps(torch.as_tensor(np.asarray(landmarks_index, dtype=np.float32)), size, sigma, v,
                             amplitude).numpy()


def diamond_masks_np(landmarks_index: np.ndarray, size: Sequence[int], radius: int,
                     valid: np.ndarray | None = None, centre: str = "round") -> np.ndarray:
    """NumPy version of :func:`diamond_masks` for one image: ``(N, D)`` -> ``(N, *size)`` bool."""
    v = None if valid is None else torch.as_tensor(np.asarray(valid, dtype=bool))
    return diamond_masks(torch.as_tensor(np.asarray(landmarks_index, dtype=np.float32)), size, radius, v,
                         centre).numpy().astype(bool)
