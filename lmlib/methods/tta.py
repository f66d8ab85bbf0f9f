"""Multi-scale test-time augmentation of a finished run: its trained network applied to each test image at several
grid scales, the predictions combined per landmark.

Nothing is trained here. The base run (``base_method``: its run folder beside this run's, or ``base_run``) must
hold its checkpoint (one network: a heatmap U-Net, the HTC, the dilation-erosion U-Net; committed run folders keep
no checkpoints, so run its job first). Its evaluation view (the whole image resampled onto its grid, aspect ratio
kept) is applied at each of ``scales`` x its grid size (each side rounded to the network's size multiple, so a scale is
met to within that rounding; the grids are recorded): at 1.1 the image is drawn about 10 % larger on a larger grid,
so the network sees the anatomy at another size, as the training's scale augmentation did. A view at a fixed
spacing (crop or pad instead of scale) is refused. Every prediction is mapped back to world mm through its own grid, and the
predictions are combined per landmark and axis (median or mean, :func:`lmlib.methods.ensemble.combine_points`).

Honest use: the scales are fixed in advance (``val`` is not used; nothing is chosen on ``test``); the scale 1.0
(required) prediction must reproduce the base run's own ``predictions.csv`` to 0.01 mm (so a checkpoint of another
run is refused). The row's
training time is the base run's, its inference time the sum over the scales.

Coordinates: world mm ``(x, y[, z])``; grid sizes in px ``(x, y[, z])``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from lmlib.methods.base import LandmarkMethod
from lmlib.methods.config import MethodParameters, base_run_field, base_run_folder, defaults
from lmlib.methods.ensemble import COMBINE
from lmlib.typed import Number, field, one_of


def _with_own_scale(scales: list[float]) -> list[float]:
    """At least two different scales, 1.0 among them (its prediction is checked against the base run's)."""
    if 1.0 not in scales or len(set(scales)) != len(scales):
        raise ValueError("scales must be different and include 1.0")
    return scales


class TTAParameters(MethodParameters):
    """The test-time augmentation's notebook parameters (beyond the shared ones)."""

    base_method: str = field("heatmap_unet", "the finished run augmented: the run folder of this name beside "
                                             "output_dir (one network, its checkpoint kept)", "a run folder name",
                             min_length=1)
    base_run: str = base_run_field()
    scales: Annotated[list[Annotated[Number, Field(gt=0.5, lt=2.0)]], AfterValidator(_with_own_scale)] = field(
        [0.9, 1.0, 1.1], "grid scales applied to the base run's evaluation grid (1.0, its own, is required: it "
                         "must reproduce the run's predictions)",
        "a list of at least two different numbers between 0.5 and 2, 1.0 among them", min_length=2)
    combine: Annotated[str, one_of(COMBINE)] = field(
        "median", "per landmark and axis over the scales: median | mean", "median or mean")


_D = defaults(TTAParameters)


class ScaleTTA(LandmarkMethod):
    """Multi-scale test-time augmentation of a finished run (see the module docstring).

    Args:
        spatial_dims / n_landmarks: as every method.
        base_method / base_run: the finished run (folder name beside this run's, or a path).
        scales: grid scales (each > 0.5 and < 2; at least two, each once).
        combine: ``"median"`` or ``"mean"`` over the scales.
    """

    name = "tta"
    trainable = False
    derived_from = "checkpoint"  # the run path loads the base run's checkpoint (lmlib.engine.runner)
    Parameters = TTAParameters

    def __init__(self, spatial_dims: int, n_landmarks: int, base_method: str = _D["base_method"],
                 base_run: str = _D["base_run"], scales: Sequence[float] = _D["scales"],
                 combine: str = _D["combine"], **_: Any) -> None:
        super().__init__(spatial_dims, n_landmarks)
        values = [float(s) for s in scales]
        if len(values) < 2 or len(set(values)) != len(values) or not all(0.5 < s < 2.0 for s in values) \
                or 1.0 not in values:
            raise ValueError(f"scales must be at least two different numbers between 0.5 and 2, 1.0 among them (its "
                             f"prediction is checked against the base run's), got {values}")
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
        self.base_method, self.base_run, self.scales, self.combine = str(base_method), str(base_run), values, combine

    def config(self) -> dict[str, Any]:
        return {"spatial_dims": self.spatial_dims, "n_landmarks": self.n_landmarks, "base_method": self.base_method,
                "base_run": self.base_run, "scales": list(self.scales), "combine": self.combine}

    @classmethod
    def from_parameters(cls, spatial_dims: int, n_landmarks: int, params: Mapping[str, Any],
                        **shared: Any) -> ScaleTTA:
        return cls(spatial_dims, n_landmarks, **cls.values(params))

    def build_network(self) -> Any:
        raise TypeError("test-time augmentation has no network of its own: it applies the base run's checkpoint")

    def base_folder(self, output_dir: str | Path) -> Path:
        """The finished run augmented: ``base_run``, else ``<output_dir>/../<base_method>``."""
        return base_run_folder(self.base_run, self.base_method, output_dir)

    def base_job(self) -> str:
        """The driver job that makes the base run (a cascade stage's job: before the ``/``)."""
        return Path(self.base_run).name if self.base_run else self.base_method.split("/")[0]

    def grid_sizes(self, size: Sequence[int], multiple: int) -> list[tuple[int, ...]]:
        """Each scale's grid (px): ``scale`` x ``size`` per axis, rounded to ``multiple`` (at least one multiple)."""
        return [tuple(max(multiple, int(round(s * n / multiple)) * multiple) for n in size) for s in self.scales]


METHOD = ScaleTTA
