"""An ensemble of finished runs: each landmark's predictions of several runs combined, with their summed cost.

Nothing is trained here. The members are finished run folders beside this run's (``members``: job names, or a
cascade's stage as ``<job>/<stage>``, e.g. ``global_local/local``), read by the engine
(:func:`lmlib.engine.base_run.read_finished_run`): each member's test predictions are its own ``predictions.csv``
(the numbers of its comparison row). Per test image, landmark and axis the members' points are combined by their
median (``combine="median"``: with three or more members one member's gross miss does not move the result) or
mean. A member without a point for a landmark (NaN) is left out of that landmark's combination.

Honest use: the members are fixed before any test number is read (a profile lists them; with ``select="none"``
nothing is chosen here, so ``val`` is not needed). The row's cost is the members' together: its training time is
the sum of theirs and its inference time per image the sum of theirs (run one after the other on one machine) plus
the combination, so the comparison shows accuracy per CPU minute, not accuracy alone.

Chosen on val (``select="val"``): ``members`` are then candidates, and the members are chosen among them on the
validation split alone by greedy forward selection (Caruana et al., ICML 2004, without replacement): the candidate
of lowest val MRE first, then each time the candidate whose addition gives the combination the lowest val MRE, up to
``max_members``; the members are the prefix of that path with the lowest val MRE (:func:`select_on_val`). Each
candidate's val predictions are read from its folder (:func:`lmlib.engine.base_run.stored_val_predictions`); a
refit, whose val images were training images, is refused. Candidates may be built on one another (a refinement
and the run it starts from): such a pair is never combined (``apart``: not a second opinion, and the one's cost is in
the other's row). Every candidate had to be trained to be compared, so the row's training time is the sum over all
candidates, each counted once (a candidate inside another's row is not added again); its time per image is the
chosen members' only.

Coordinates: world mm ``(x, y[, z])`` throughout.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Annotated, Any

import numpy as np
from pydantic import Field

from lmlib.evaluation.metrics import mean_radial_error
from lmlib.methods.base import LandmarkMethod
from lmlib.methods.config import MethodParameters, defaults
from lmlib.typed import Int, field, one_of

COMBINE = ("median", "mean")
#: how the members are set: as listed (``none``), or chosen among the listed candidates on the val split (``val``)
SELECT = ("none", "val")


class EnsembleParameters(MethodParameters):
    """The ensemble's notebook parameters (beyond the shared ones)."""

    members: list[Annotated[str, Field(min_length=1)]] = field(
        ["heatmap_unet", "htc", "global_local/local"],
        "finished runs combined: run folders beside output_dir (a cascade's stage as <job>/<stage>)",
        "a list of at least two run folder names", min_length=2)
    combine: Annotated[str, one_of(COMBINE)] = field(
        "median", "per landmark and axis: median (robust to one member's gross miss) | mean", "median or mean")
    select: Annotated[str, one_of(SELECT)] = field(
        "none", "none: every listed run is a member | val: the listed runs are candidates, the members chosen among "
        "them on the val split (greedy forward selection; the row counts the training time of all candidates)",
        "none or val")
    max_members: Int = field(5, 'with select "val": at most this many members', "an integer >= 1", ge=1)


_D = defaults(EnsembleParameters)


class RunEnsemble(LandmarkMethod):
    """Per-landmark combination of finished runs' predictions (see the module docstring).

    Args:
        spatial_dims / n_landmarks: as every method.
        members: run folder names beside the ensemble's own (at least two, each once).
        combine: ``"median"`` or ``"mean"`` of each coordinate over the members.
        select: ``"none"`` (every listed run a member) or ``"val"`` (``members`` are candidates, chosen on val).
        max_members: with ``select="val"``, the most members chosen.
    """

    name = "ensemble"
    trainable = False
    derived_from = "runs"  # the run path reads its members' folders (lmlib.engine.runner)
    Parameters = EnsembleParameters

    def __init__(self, spatial_dims: int, n_landmarks: int, members: Sequence[str] = _D["members"],
                 combine: str = _D["combine"], select: str = _D["select"], max_members: int = _D["max_members"],
                 **_: Any) -> None:
        super().__init__(spatial_dims, n_landmarks)
        if combine not in COMBINE or select not in SELECT:
            raise ValueError(f"combine must be one of {COMBINE} and select one of {SELECT}, got {combine!r}, "
                             f"{select!r}")
        if int(max_members) < 1:
            raise ValueError(f"max_members must be >= 1, got {max_members}")
        names = [str(m) for m in members]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"an ensemble needs at least two different member runs, got {names}")
        self.members, self.combine, self.select, self.max_members = names, combine, select, int(max_members)

    def config(self) -> dict[str, Any]:
        return {"spatial_dims": self.spatial_dims, "n_landmarks": self.n_landmarks, "members": list(self.members),
                "combine": self.combine, "select": self.select, "max_members": self.max_members}

    @classmethod
    def from_parameters(cls, spatial_dims: int, n_landmarks: int, params: Mapping[str, Any],
                        **shared: Any) -> RunEnsemble:
        return cls(spatial_dims, n_landmarks, **cls.values(params))

    def build_network(self) -> Any:
        raise TypeError("an ensemble has no network: it combines finished runs' predictions (combine_points)")

    def choose(self, val_mm: Mapping[str, Sequence[np.ndarray]], val: Sequence[Any],
               apart: Mapping[str, Collection[str]] | None = None) -> tuple[list[str], list[dict[str, Any]]]:
        """The members: every listed run (``select="none"``; ``val_mm`` unused), or those :func:`select_on_val`
        chooses among the candidates from their val predictions ``val_mm[name][i]`` (world mm) on ``val``'s
        samples, never combining a candidate with those in ``apart[name]``; with the selection's steps (empty
        without one)."""
        if self.select == "none":
            return list(self.members), []
        missing = [m for m in self.members if m not in val_mm]
        if missing:
            raise ValueError(f"select='val': no val predictions given for {missing}")
        return select_on_val({m: val_mm[m] for m in self.members}, val, self.combine, self.max_members, apart)


def select_on_val(val_mm: Mapping[str, Sequence[np.ndarray]], val: Sequence[Any], how: str = "median",
                  max_members: int = 5, apart: Mapping[str, Collection[str]] | None = None
                  ) -> tuple[list[str], list[dict[str, Any]]]:
    """Greedy forward selection without replacement (module docstring) of the keys of ``val_mm`` (candidate -> ``(K, D)``
    world-mm points per val sample, in ``val``'s order) by the val MRE (mm) of their combination (``how``). As Caruana
    et al. (2004) the path runs on to ``max_members`` (or until no candidate may be added) and the prefix of lowest
    val MRE is kept (the shorter one on a tie): a median of two members is their mean, which may validate worse than
    the best member alone where three members beat it. Returns the kept names in the order chosen and one row per
    step: ``step``, ``added``, ``val_unpredicted`` (annotated val points the combination leaves without a prediction),
    ``val_mre_mm`` of the combination so far (over the predicted points) and ``kept``. A combination that leaves fewer
    points unpredicted ranks first (the MRE leaves those points out, which would favour a run that does not answer).
    Ties go to the earlier candidate. ``apart[n]``: the candidates never combined with ``n`` (either way round: a run
    built on ``n`` or one ``n`` is built on); the path ends early when no candidate may be added."""
    if not val_mm:
        raise ValueError("select_on_val: no candidates")
    apart = apart or {}

    def allowed(name: str, path: Sequence[str]) -> bool:
        return name not in path and not any(name in apart.get(p, ()) or p in apart.get(name, ()) for p in path)

    def score(names: Sequence[str]) -> tuple[int, float]:
        combined = combine_points([val_mm[n] for n in names], how)
        unpredicted = sum(int((~np.isfinite(p).all(axis=1) & np.isfinite(s.landmarks_mm).all(axis=1)).sum())
                          for p, s in zip(combined, val))
        return unpredicted, mean_radial_error(combined, val)

    path: list[str] = []
    steps: list[dict[str, Any]] = []
    ranks: list[tuple[int, float]] = []
    while len(path) < max_members:
        trials = {n: score([*path, n]) for n in val_mm if allowed(n, path)}
        if not trials:
            break
        best = min(trials, key=lambda n: trials[n])  # dicts keep order: ties go to the earlier candidate
        path.append(best)
        ranks.append(trials[best])
        steps.append({"step": len(path), "added": best, "val_unpredicted": trials[best][0],
                      "val_mre_mm": trials[best][1]})
    size = min(range(len(steps)), key=lambda k: ranks[k]) + 1  # min() keeps the first (shorter) tie
    for row in steps:
        row["kept"] = row["step"] <= size
    return path[:size], steps


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
