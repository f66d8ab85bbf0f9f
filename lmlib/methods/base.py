"""Landmark methods as small parts plugged into the shared training code (:mod:`lmlib.engine.training`).

A method is a :class:`LandmarkMethod`: it builds its network and says how to turn landmark indices
into targets, how to score outputs against them, and how to decode outputs into coordinates. Data
loading, augmentation, the training loop, checkpoints, logging, validation error in mm and the map
back to world mm are shared. Targets are encoded on the batch inside the training step (on the
device), because some depend on the epoch (the shrinking dilation-erosion masks).

Adding a method = one module ``lmlib/methods/<name>.py`` defining a subclass with ``name = "<name>"``
and ``METHOD = <the class>``; :func:`build_method` finds it by name.

Coordinates: ``landmarks`` are ``(B, N, D)`` continuous indices ``(x, y[, z])`` on the network grid,
``valid`` ``(B, N)`` bool (invalid rows hold 0), network outputs ``(B, N, *size)``.
"""
from __future__ import annotations

import importlib
from typing import Any, Sequence

import torch
from torch import nn

from lmlib.methods.decoding import decode_maps
from lmlib.methods.networks import build_network, size_multiple

Targets = dict[str, torch.Tensor]
METHOD_NAMES: tuple[str, ...] = ("heatmap_unet", "dilation_erosion")


class LandmarkMethod:
    """Base class: network builder + target encoder + loss + decoder (override the last three).

    Args:
        spatial_dims: 2 or 3.
        n_landmarks: output channels.
        network: keyword arguments of :func:`lmlib.methods.networks.build_network` (arch, channels, ...).
        decoder / decoder_kwargs: see :func:`lmlib.methods.decoding.decode_maps`.
    """

    name: str = "base"

    def __init__(self, spatial_dims: int, n_landmarks: int, network: dict[str, Any] | None = None,
                 decoder: str = "quadratic", decoder_kwargs: dict[str, Any] | None = None) -> None:
        self.spatial_dims, self.n_landmarks = int(spatial_dims), int(n_landmarks)
        self.network = dict(network or {})
        self.decoder, self.decoder_kwargs = decoder, dict(decoder_kwargs or {})

    # ---- description (stored in checkpoints; build_method(name, **config()) rebuilds the method)
    def config(self) -> dict[str, Any]:
        return {"spatial_dims": self.spatial_dims, "n_landmarks": self.n_landmarks, "network": self.network,
                "decoder": self.decoder, "decoder_kwargs": self.decoder_kwargs}

    def build_network(self) -> nn.Module:
        return build_network(self.spatial_dims, self.n_landmarks, **self.network)

    def size_multiple(self) -> int:
        """Grid sizes must be divisible by this."""
        keys = ("arch", "channels", "strides")
        return size_multiple(**{k: self.network[k] for k in keys if k in self.network})

    # ---- the parts a method defines
    def encode_targets(self, landmarks: torch.Tensor, valid: torch.Tensor, size: Sequence[int], epoch: int) -> Targets:
        """Targets for a batch (on the landmarks' device)."""
        raise NotImplementedError

    def loss(self, output: torch.Tensor, targets: Targets, valid: torch.Tensor, epoch: int) -> torch.Tensor:
        """Scalar training loss; invalid landmarks must not contribute."""
        raise NotImplementedError

    def maps(self, output: torch.Tensor) -> torch.Tensor:
        """Per-landmark maps to decode and show (probabilities, heatmaps): ``(B, N, *size)``."""
        return output

    def decode(self, output: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Coordinates ``(B, N, D)`` (network-grid index) and confidences ``(B, N)``."""
        return decode_maps(self.maps(output), self.spatial_dims, self.decoder, **self.decoder_kwargs)

    def dice(self, output: torch.Tensor, targets: Targets, valid: torch.Tensor) -> torch.Tensor | None:
        """Dice per landmark ``(B, N)`` of the thresholded output vs. target region (NaN = not defined)."""
        return None

    def epoch_info(self, epoch: int, size: Sequence[int]) -> dict[str, float]:
        """Scalars to log at each epoch (e.g. the mask radius)."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def build_method(name: str, **config: Any) -> LandmarkMethod:
    """Instantiate the method ``name`` (module ``lmlib.methods.<name>``, attribute ``METHOD``)."""
    try:
        module = importlib.import_module(f"lmlib.methods.{name}")
    except ModuleNotFoundError as exc:
        raise ValueError(f"unknown method {name!r} (no module lmlib.methods.{name}); known: {METHOD_NAMES}") from exc
    return module.METHOD(**config)


def masked_mean(values: torch.Tensor, valid: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Mean of per-pixel ``values`` ``(B, N, *size)`` over valid channels only (0 if none)."""
    per_channel = values.mean(dim=tuple(range(-spatial_dims, 0)))
    w = valid.to(per_channel.dtype)
    return (per_channel * w).sum() / w.sum().clamp_min(1.0)
