"""An ensemble of finished runs: each landmark's predictions of several runs combined, with their summed cost.

Nothing is trained here. The members are finished run folders beside this run's (``members``: job names, or a
cascade's stage as ``<job>/<stage>``, e.g. ``global_local/local``), read by the engine
(:func:`lmlib.engine.base_run.read_finished_run`): each member's test predictions are its own ``predictions.csv``
(the numbers of its comparison row). Per test image, landmark and axis the members' points are combined by their
median (``combine="median"``: with three or more members one member's gross miss does not move the result) or
mean. A member without a point for a landmark (NaN) is left out of that landmark's combination.

Honest use: the members are fixed before any test number is read (a profile lists them; nothing is chosen here,
so ``val`` is not needed). The row's cost is the members' together: its training time is the sum of theirs and
its inference time per image the sum of theirs (run one after the other on one machine) plus the combination, so
the comparison shows accuracy per CPU minute, not accuracy alone.

Coordinates: world mm ``(x, y[, z])`` throughout.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import numpy as np
from pydantic import Field

from lmlib.methods.base import LandmarkMethod
from lmlib.methods.config import MethodParameters, defaults
from lmlib.typed import field, one_of

COMBINE = ("median", "mean")


class EnsembleParameters(MethodParameters):
    """The ensemble's notebook parameters (beyond the shared ones)."""

    members: list[Annotated[str, Field(min_length=1)]] = field(
        ["heatmap_unet", "htc", "global_local/local"],
        "finished runs combined: run folders beside output_dir (a cascade's stage as <job>/<stage>)",
        "a list of at least two run folder names", min_length=2)
    combine: Annotated[str, one_of(COMBINE)] = field(
        "median", "per landmark and axis: median (robust to one member's gross miss) | mean", "median or mean")


_D = defaults(EnsembleParameters)


class RunEnsemble(LandmarkMethod):
    """Per-landmark combination of finished runs' predictions (see the module docstring).

    Args:
        spatial_dims / n_landmarks: as every method.
        members: run folder names beside the ensemble's own (at least two, each once).
        combine: ``"median"`` or ``"mean"`` of each coordinate over the members.
    """

    name = "ensemble"
    trainable = False
    derived_from = "runs"  # the run path reads its members' folders (lmlib.engine.runner)
    Parameters = EnsembleParameters

    def __init__(self, spatial_dims: int, n_landmarks: int, members: Sequence[str] = _D["members"],
                 combine: str = _D["combine"], **_: Any) -> None:
        super().__init__(spatial_dims, n_landmarks)
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
        names = [str(m) for m in members]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"an ensemble needs at least two different member runs, got {names}")
        self.members, self.combine = names, combine

    def config(self) -> dict[str, Any]:
        return {"spatial_dims": self.spatial_dims, "n_landmarks": self.n_landmarks, "members": list(self.members),
                "combine": self.combine}

    @classmethod
    def from_parameters(cls, spatial_dims: int, n_landmarks: int, params: Mapping[str, Any],
                        **shared: Any) -> RunEnsemble:
        return cls(spatial_dims, n_landmarks, **cls.values(params))

    def build_network(self) -> Any:
        raise TypeError("an ensemble has no network: it combines finished runs' predictions (combine_points)")

    def combine_points(self, member_mm: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
        """``member_mm[m][i]``: member ``m``'s ``(K, D)`` world-mm points on image ``i`` -> one ``(K, D)`` array
        per image (:func:`combine_points`)."""
        if len(member_mm) != len(self.members):
            raise ValueError(f"{len(member_mm)} members' predictions for {len(self.members)} members")
        return combine_points(member_mm, self.combine)


def combine_points(member_mm: Sequence[Sequence[np.ndarray]], how: str = "median") -> list[np.ndarray]:
    """``member_mm[m][i]``: prediction set ``m``'s ``(K, D)`` world-mm points on image ``i`` -> one ``(K, D)`` array
    per image: the median or mean (``how``) of each coordinate over the predictions, NaN ones left out (NaN where
    none has the landmark)."""
    if how not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, got {how!r}")
    reduce = np.nanmedian if how == "median" else np.nanmean
    out = []
    for per_image in zip(*member_mm):
        stack = np.stack([np.asarray(p, dtype=np.float64) for p in per_image])  # (M, K, D)
        known = np.isfinite(stack).all(axis=2).any(axis=0)  # (K,): a member has the landmark
        combined = np.full(stack.shape[1:], np.nan)
        if known.any():
            combined[known] = reduce(stack[:, known], axis=0)
        out.append(combined)
    return out


METHOD = RunEnsemble
