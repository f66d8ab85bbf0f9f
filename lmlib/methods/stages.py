"""What a stage of a multi-stage method is: a method, the view it trains on and the one it is evaluated
on, and its training settings. A method made of stages returns them from ``build_stages``;
:func:`lmlib.engine.cascade.fit_cascade` trains them in order (kept here so that methods never import
the engine)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from lmlib.data.loaders import ViewSpec
from lmlib.methods.base import LandmarkMethod, OutputsT

#: the ``shared`` key through which the engine gives ``build_stages`` the per-landmark mean validation errors (mm)
#: of the finished run a cascade starts from (:meth:`CascadeMethod.base_folder`)
BASE_ERRORS = "base_val_errors_mm"


@dataclass
class Stage:
    """One stage: a method, the view it trains on (and is evaluated on), and its training settings."""

    name: str
    method: LandmarkMethod
    view: ViewSpec
    eval_view: ViewSpec | None = None
    max_epochs: int = 50
    batch_size: int = 4
    augmentation: Any = None
    #: per landmark, keep the previous stage's prediction where this stage's mean validation error is not lower
    #: (a choice made on ``val``, recorded in the stage's checkpoint and manifest)
    keep_previous_where_worse: bool = False


class CascadeMethod(LandmarkMethod[OutputsT]):
    """A method made of stages, trained in order by :func:`lmlib.engine.cascade.fit_cascade`: it says so by
    subclassing this and defining :meth:`build_stages` (the engine tests the type, not an attribute)."""

    @classmethod
    def build_stages(cls, spatial_dims: int, n_landmarks: int, params: Mapping[str, Any], grid: Sequence[int],
                     shared: Mapping[str, Any]) -> list[Stage]:
        """The stages, in training order, from notebook ``params``, the run's ``grid`` (px) and the engine's
        ``shared`` settings (optimizer, flip pairs, ``max_epochs`` and ``batch_size`` of the first stage)."""
        raise NotImplementedError

    @classmethod
    def base_folder(cls, params: Mapping[str, Any]) -> Path | None:
        """A finished run (folder) whose predictions the first stage starts from, e.g. to refine them; None (the
        default): the first stage starts from the images alone."""
        return None


def is_cascade(cls: type[LandmarkMethod]) -> TypeGuard[type[CascadeMethod]]:
    """Whether method class ``cls`` is made of stages (a :class:`CascadeMethod`)."""
    return issubclass(cls, CascadeMethod)


class DeferredStage(Stage):
    """A :class:`Stage` whose views are settled on first access, i.e. by
    :func:`~lmlib.engine.cascade.fit_cascade` after the previous stage trained (e.g. a patch size or a
    training jitter set from the previous stage's measured validation errors). Subclasses define
    :meth:`settle`; pass ``view=None, eval_view=None``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._view: ViewSpec | None = None
        self._eval_view: ViewSpec | None = None
        super().__init__(*args, **kwargs)

    def settle(self) -> tuple[ViewSpec, ViewSpec]:
        """(training view, evaluation view), computed once the previous stage has trained."""
        raise NotImplementedError

    def _settle(self) -> None:
        if self._view is None:
            self._view, self._eval_view = self.settle()

    def __repr__(self) -> str:  # without settling the views
        state = "settled" if self._view is not None else "settled after the previous stage"
        return f"{type(self).__name__}(name={self.name!r}, method={self.method!r}, views {state}, " \
               f"max_epochs={self.max_epochs})"

    @property
    def view(self) -> Any:
        self._settle()
        return self._view

    @view.setter
    def view(self, value: Any) -> None:
        self._view = value

    @property
    def eval_view(self) -> Any:
        self._settle()
        return self._eval_view

    @eval_view.setter
    def eval_view(self, value: Any) -> None:
        self._eval_view = value


def stage_validation_errors(history_csv: str | Path) -> dict[str, float]:
    """Per-landmark mean validation error (mm) of the selected (lowest ``val/mre_mm``) epoch of a
    stage's training log (``training_log/metrics.csv``); ``{"all": MRE}`` when none is logged per landmark."""
    import pandas as pd

    df = pd.read_csv(history_csv)
    if "val/mre_mm" not in df.columns or df["val/mre_mm"].dropna().empty:
        raise ValueError(f"{history_csv}: no validation error logged")
    row = df.loc[df["val/mre_mm"].astype(float).idxmin()]
    prefix = "val/err_mm/"
    per = {c[len(prefix):]: float(row[c]) for c in df.columns if c.startswith(prefix) and np.isfinite(row[c])}
    return per or {"all": float(row["val/mre_mm"])}
