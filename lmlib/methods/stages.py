"""What a stage of a multi-stage method is: a method, the view it trains on and the one it is evaluated
on, and its training settings. A method made of stages returns them from ``build_stages``;
:func:`lmlib.engine.cascade.fit_cascade` trains them in order (kept here so that methods never import
the engine)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmlib.data.loaders import ViewSpec
from lmlib.methods.base import LandmarkMethod


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
