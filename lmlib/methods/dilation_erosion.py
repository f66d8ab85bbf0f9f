"""U-Net with dilation-erosion landmark masks (Suh et al., MIDL 2023 short paper; the seed's tool).

- Targets: per landmark a binary L1-ball ("diamond") mask = the landmark pixel dilated ``k`` times
  with the cross element; ``k`` shrinks on a schedule (:class:`lmlib.methods.targets.ShrinkSchedule`: the
  seed's 65 -> 5 by 10 every 50 of 350 epochs on a 512-px image; here the same 7 radii spread over
  ``max_epochs`` and scaled to the grid by ``max(size) / 512``). Our choice: by default the ball is
  centred on the sub-pixel landmark (``mask_centre="exact"``) rather than on its rounded pixel (the
  seed, ``"round"``), which removes part of the quantisation the masks would otherwise teach.
- Loss: ``BCEWithLogits`` with ``pos_weight = (S - n) / n`` (background / foreground area of one mask,
  recomputed whenever the radius changes), averaged over the channels of valid landmarks. Our
  choice where the seed differs: a masked (ambiguous) landmark is left out of the loss instead of
  being trained as an empty mask.
- Decoding: the seed takes the integer argmax of the sigmoid; we take the weighted centroid of
  ``p - threshold * peak`` (default threshold 0.5) within ``radius + 2`` px of the peak, so the
  coordinate is sub-pixel (the centre of the confident blob, which for a diamond is the landmark).
- Dice: ``sigmoid > 0.5`` vs the current target mask, per landmark (the seed's Dice).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import torch
import torch.nn.functional as F

from lmlib.methods.base import LandmarkMethod, Targets, UNetParameters, masked_mean
from lmlib.methods.config import defaults
from lmlib.methods.decoding import DECODERS, decode_maps
from lmlib.methods.targets import ShrinkSchedule, diamond_masks, dice_scores, mask_pos_weight
from lmlib.typed import Int, field, one_of

MASK_CENTRES: tuple[str, ...] = ("exact", "round")


class DilationErosionParameters(UNetParameters):
    """The dilation-erosion U-Net's notebook parameters (beyond the shared ones); radii in the seed's 512-px
    units (scaled to the network grid)."""

    decoder: Annotated[str, one_of(DECODERS)] = field(
        "centroid", f"sub-pixel decoding of each mask: {' | '.join(DECODERS)} (the seed: argmax)",
        f"one of {', '.join(DECODERS)}")
    radius_start: Int = field(ShrinkSchedule.start, "first mask radius (seed units)", "an integer >= 1", ge=1)
    radius_step: Int = field(ShrinkSchedule.step, "radius decrement per stage (seed units)", "an integer >= 0", ge=0)
    radius_stop: Int = field(ShrinkSchedule.stop, "final mask radius (seed units)", "an integer >= 1", ge=1)
    mask_centre: Annotated[str, one_of(MASK_CENTRES)] = field(
        "exact", "exact (sub-pixel landmark) | round (the seed)", "exact or round")


_D = defaults(DilationErosionParameters)


class DilationErosionUNet(LandmarkMethod[torch.Tensor]):
    """Shrinking binary masks + positive-weighted BCE (see the module docstring).

    ``schedule``: a :class:`ShrinkSchedule` or a dict of its fields; None = the seed's radii spread
    evenly over ``max_epochs`` (:meth:`ShrinkSchedule.fit_to`).
    """

    name = "dilation_erosion"
    Parameters = DilationErosionParameters

    def __init__(self, spatial_dims: int, n_landmarks: int, max_epochs: int = 350,
                 schedule: ShrinkSchedule | dict[str, int] | None = None, network: dict[str, Any] | None = None,
                 decoder: str = _D["decoder"], decoder_kwargs: dict[str, Any] | None = None,
                 threshold: float = 0.5, mask_centre: str = _D["mask_centre"], **base: Any) -> None:
        super().__init__(spatial_dims, n_landmarks, network, decoder, decoder_kwargs, **base)
        if isinstance(schedule, dict):
            schedule = ShrinkSchedule(**schedule)
        self.max_epochs = int(max_epochs)
        self.schedule = schedule or ShrinkSchedule.fit_to(self.max_epochs)
        self.threshold = float(threshold)
        self.mask_centre = mask_centre

    def config(self) -> dict[str, Any]:
        s = self.schedule
        return {**super().config(), "max_epochs": self.max_epochs, "threshold": self.threshold,
                "mask_centre": self.mask_centre,
                "schedule": {"start": s.start, "step": s.step, "stop": s.stop, "every": s.every}}

    @classmethod
    def parameter_config(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """Notebook parameters besides the radii: ``channels``, ``head_channels``, ``decoder``, ``mask_centre``."""
        out = super().parameter_config(params)
        if "mask_centre" in params:
            out["mask_centre"] = params["mask_centre"]
        return out

    @classmethod
    def from_parameters(cls, spatial_dims: int, n_landmarks: int, params: Mapping[str, Any],
                        **shared: Any) -> DilationErosionUNet:
        """The seven radii (``radius_start/step/stop``, seed 512-px units) spread over ``max_epochs``
        (a shared engine setting)."""
        values = cls.values(params)
        kwargs = cls.parameter_config(values)
        max_epochs = int(shared.get("max_epochs", 350))
        radii = {k.removeprefix("radius_"): int(values[k]) for k in ("radius_start", "radius_step", "radius_stop")}
        base = {k: shared[k] for k in ("optimizer", "test_time_flip", "flip_pairs") if k in shared}
        return cls(spatial_dims, n_landmarks, max_epochs=max_epochs, schedule=ShrinkSchedule.fit_to(max_epochs, **radii),
                   **kwargs, **base)

    def radius(self, epoch: int, size: Sequence[int]) -> int:
        """Mask radius in grid pixels at ``epoch``."""
        return self.schedule.radius_px(epoch, size)

    def loss_epoch(self, epoch: int) -> int:
        """The first epoch of ``epoch``'s radius stage (the masks and their weight change only between stages)."""
        sch = self.schedule
        start = sch.every * (int(epoch) // sch.every)
        while start > 0 and sch.radius(start - sch.every) == sch.radius(start):  # past the last stage
            start -= sch.every
        return start

    def encode_targets(self, landmarks: torch.Tensor, valid: torch.Tensor, size: Sequence[int], epoch: int) -> Targets:
        return {"mask": diamond_masks(landmarks, size, self.radius(epoch, size), valid, self.mask_centre)}

    def loss(self, output: torch.Tensor, targets: Targets, valid: torch.Tensor, epoch: int) -> torch.Tensor:
        size = tuple(output.shape[-self.spatial_dims:])
        pw = torch.tensor(mask_pos_weight(self.radius(epoch, size), size), device=output.device)
        bce = F.binary_cross_entropy_with_logits(output.float(), targets["mask"], pos_weight=pw, reduction="none")
        return masked_mean(bce, valid, self.spatial_dims)

    def maps(self, output: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(output.float())

    def decode(self, output: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = dict(self.decoder_kwargs)
        if self.decoder == "centroid":
            size = tuple(output.shape[-self.spatial_dims:])
            kwargs.setdefault("radius", self.radius(epoch, size) + 2)
            kwargs.setdefault("threshold", self.threshold)
        return decode_maps(self.maps(output), self.spatial_dims, self.decoder, **kwargs)

    def dice(self, output: torch.Tensor, targets: Targets, valid: torch.Tensor) -> torch.Tensor:
        d = dice_scores(self.maps(output) > 0.5, targets["mask"] > 0.5, self.spatial_dims)
        return torch.where(valid, d, torch.full_like(d, float("nan")))

    def epoch_info(self, epoch: int, size: Sequence[int]) -> dict[str, float]:
        r = self.radius(epoch, size)
        return {"mask_radius_px": float(r), "pos_weight": float(mask_pos_weight(r, size))}


METHOD = DilationErosionUNet
