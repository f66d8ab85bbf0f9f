"""Heatmap-regression U-Net: the baseline every landmark paper compares against (2D and 3D).

- Targets: one Gaussian per landmark on the network grid, ``amplitude * exp(-r^2 / (2 sigma^2))``,
  ``sigma`` in pixels of that grid (:func:`lmlib.methods.targets.gaussian_heatmaps`).
- Network: MONAI U-Net (:func:`lmlib.methods.networks.build_network`), one raw output channel per landmark.
- Loss: mean squared error over the pixels of valid landmarks' channels; with ``foreground_weight`` w > 1
  each pixel's squared error is weighted by ``1 + (w - 1) * target / amplitude`` (a simple remedy for
  the mostly-zero targets; w = 1 is plain MSE). ``loss="bce"`` instead fits ``sigmoid(output)`` to
  ``target / amplitude`` with binary cross-entropy.
- Defaults (:class:`HeatmapUNetParameters`): ``amplitude=100`` (Payer et al.'s heatmap scale) and a
  foreground weight: on the synthetic phantoms plain MSE with peak 1 collapsed to an all-zero output, BCE to a
  flat map, and foreground weighting with amplitude 100 learnt; the weight's default is the phantoms' choice
  (a larger one left gross misses there), the full profiles set their own (``lmlib/profiles.yaml``).
- Decoding: sub-pixel, ``"quadratic"`` (argmax + log-parabola refinement; exact for Gaussians) by
  default, or ``"centroid"`` / ``"soft_argmax"`` in a window around the peak
  (:mod:`lmlib.methods.decoding`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lmlib.methods.base import LandmarkMethod, Targets, UNetParameters, foreground_weighted, masked_mean
from lmlib.methods.config import defaults
from lmlib.methods.decoding import gaussian_decoder_kwargs
from lmlib.methods.targets import dice_scores, gaussian_heatmaps
from lmlib.typed import Number, field

LOSSES: tuple[str, ...] = ("mse", "bce")


class HeatmapUNetParameters(UNetParameters):
    """The heatmap U-Net's notebook parameters (beyond the shared ones)."""

    sigma: Number = field(2.0, "Gaussian sigma, px of the network grid", "a number > 0 (px)", gt=0)
    amplitude: Number = field(100.0, "heatmap peak value", "a number > 0", gt=0)
    foreground_weight: Number = field(30.0, "MSE weight at the peak (1: plain MSE)", "a number >= 1", ge=1)


_D = defaults(HeatmapUNetParameters)


class HeatmapUNet(LandmarkMethod[torch.Tensor]):
    """Gaussian heatmap regression with a U-Net (see the module docstring)."""

    name = "heatmap_unet"
    Parameters = HeatmapUNetParameters

    def __init__(self, spatial_dims: int, n_landmarks: int, sigma: float = _D["sigma"],
                 amplitude: float = _D["amplitude"], foreground_weight: float = _D["foreground_weight"],
                 loss: str = "mse", network: dict[str, Any] | None = None, decoder: str = _D["decoder"],
                 decoder_kwargs: dict[str, Any] | None = None, **base: Any) -> None:
        super().__init__(spatial_dims, n_landmarks, network, decoder, decoder_kwargs, **base)
        if sigma <= 0 or amplitude <= 0 or foreground_weight < 1:
            raise ValueError("need sigma > 0, amplitude > 0, foreground_weight >= 1")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.sigma, self.amplitude, self.foreground_weight = float(sigma), float(amplitude), float(foreground_weight)
        self.decoder_kwargs = gaussian_decoder_kwargs(self.decoder, self.sigma, self.decoder_kwargs)
        self.loss_name = loss

    def config(self) -> dict[str, Any]:
        return {**super().config(), "sigma": self.sigma, "amplitude": self.amplitude,
                "foreground_weight": self.foreground_weight, "loss": self.loss_name}

    @classmethod
    def parameter_config(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """Notebook parameters: ``sigma`` (px of the network grid), ``amplitude``, ``foreground_weight``."""
        return {**super().parameter_config(params),
                **{k: float(params[k]) for k in ("sigma", "amplitude", "foreground_weight") if k in params}}

    def encode_targets(self, landmarks: torch.Tensor, valid: torch.Tensor, size: Sequence[int], epoch: int) -> Targets:
        return {"heatmap": gaussian_heatmaps(landmarks, size, self.sigma, valid, self.amplitude)}

    def loss_epoch(self, epoch: int) -> int:
        return 0  # the Gaussian targets and their loss are the same at every epoch

    def maps(self, output: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "bce":
            return self.amplitude * torch.sigmoid(output.float())
        return output

    def loss(self, output: torch.Tensor, targets: Targets, valid: torch.Tensor, epoch: int) -> torch.Tensor:
        target = targets["heatmap"]
        if self.loss_name == "bce":
            err = F.binary_cross_entropy_with_logits(output.float(), target / self.amplitude, reduction="none")
        else:
            err = F.mse_loss(output.float(), target, reduction="none")  # one fused kernel each way
        return masked_mean(foreground_weighted(err, target, self.foreground_weight, self.amplitude), valid,
                           self.spatial_dims)

    def dice(self, output: torch.Tensor, targets: Targets, valid: torch.Tensor) -> torch.Tensor:
        """Dice of ``output > amplitude / 2`` vs ``target > amplitude / 2`` (the half-maximum disk)."""
        half = 0.5 * self.amplitude
        d = dice_scores(self.maps(output) > half, targets["heatmap"] > half, self.spatial_dims)
        return torch.where(valid, d, torch.full_like(d, float("nan")))


METHOD = HeatmapUNet
