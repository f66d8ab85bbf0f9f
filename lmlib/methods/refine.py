"""Local refinement after any method: per-landmark patch nets centred on a finished run's predictions.

The first stage of this cascade is not trained here: it is a finished run of any method (``base_method``, e.g.
the registration baseline or the HTC), read from its run folder. The engine (:mod:`lmlib.engine.base_run`)
takes its test predictions from the folder's ``predictions.csv`` (the base row's own numbers) and its validation
predictions from its ``val_predictions.csv``, or makes them (from its checkpoints, or by running a method with
nothing to train again), so that:

- each refinement stage is the global-to-local FCNN's local stage (:class:`~lmlib.methods.global_local.LocalFCNN`
  per landmark, displacement + presence heads, presence-weighted voting), trained on patches with the landmark
  uniformly at random inside them and validated and tested on patches centred on the previous predictions;
- the first patch is sized from the base run's per-landmark mean **validation** errors (``local_patch_factor`` x
  each error on each side, :class:`~lmlib.methods.global_local.PatchRule`; at most ``local_max_patch_px`` px, the
  spacing coarsened up to ``local_max_spacing_mm`` beyond that); each further stage (``refine_stages``) from the
  stage before it (its selected epoch's validation errors), so a coarse first patch that reaches a gross miss
  is followed by a finer one;
- each stage is a row of the comparison (``<job>/local1``, ``<job>/local2``, ...) whose training and inference
  times include the base run's (its ``metrics.json``): the table shows what the refinement adds and what the
  pipeline costs.

Coordinates: world mm ``(x, y[, z])`` between stages; each stage's grid is its own patch.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import StrictBool

from lmlib.methods.config import base_run_field, base_run_folder
from lmlib.methods.global_local import (
    DISPLACEMENT_CODES,
    GlobalLocalFCNN,
    LocalPatchParameters,
    LocalStage,
    PatchRule,
)
from lmlib.methods.stages import BASE_ERRORS, Stage
from lmlib.typed import Int, Number, field, one_of


class RefineParameters(LocalPatchParameters):
    """The refinement's notebook parameters (each stage trains ``max_epochs``, the shared one)."""

    base_method: str = field("registration", "the finished run refined: the run folder of this name beside "
                                             "output_dir (a method or job name, e.g. registration, htc)",
                             "a run folder name", min_length=1)
    base_run: str = base_run_field()
    refine_stages: Int = field(2, "local stages in a row, each patch sized from the previous predictions' val "
                                  "errors", "an integer >= 1", ge=1, le=4)
    local_max_spacing_mm: Number = field(4.0, "coarsest patch spacing (mm/px) a stage may use to cover its "
                                              "wanted extent", "a number > 0 (mm/px)", gt=0)
    keep_previous_where_worse: StrictBool = field(
        True, "per landmark, keep the previous prediction where a stage's mean val error is not lower", "true or false")
    displacement: Annotated[str, one_of(DISPLACEMENT_CODES)] = field(
        "log", "log: sign(d) log10(|d| + 1) (paper) | linear", "log or linear")


class LocalRefinement(GlobalLocalFCNN):
    """One refinement stage: the global-to-local FCNN's local stage (see the module docstring)."""

    name = "refine"
    Parameters = RefineParameters

    def __init__(self, spatial_dims: int, n_landmarks: int, stage: str = "local", **kwargs: Any) -> None:
        if stage != "local":
            raise ValueError(f"a refinement stage is a local stage, got stage={stage!r}")
        super().__init__(spatial_dims, n_landmarks, stage="local", **kwargs)

    @classmethod
    def parameter_config(cls, params: Mapping[str, Any], stage: str = "local") -> dict[str, Any]:
        return super().parameter_config(params, "local")

    @classmethod
    def base_folder(cls, params: Mapping[str, Any]) -> Path:
        """The finished run refined: ``base_run``, else ``<output_dir>/../<base_method>``."""
        p = cls.values(params)
        return base_run_folder(str(p["base_run"]), str(p["base_method"]), params["output_dir"])

    @staticmethod
    def stage_names(n: int) -> list[str]:
        """``local1``, ``local2``, ... (``local`` when there is one)."""
        return ["local"] if n == 1 else [f"local{k + 1}" for k in range(n)]

    @classmethod
    def build_stages(cls, spatial_dims: int, n_landmarks: int, params: Mapping[str, Any], grid: Sequence[int],
                     shared: Mapping[str, Any]) -> list[Stage]:
        """``refine_stages`` local stages; the first sized from ``shared[BASE_ERRORS]`` (the base run's
        per-landmark mean validation errors, mm), each later one from the stage before it."""
        if BASE_ERRORS not in shared:
            raise ValueError(f"{cls.name}: the base run's validation errors ({BASE_ERRORS}) are missing: the engine "
                             "reads them from the base run before building the stages")
        p = cls.values(params)
        base_errors = {str(k): float(v) for k, v in dict(shared[BASE_ERRORS]).items()}
        out = Path(params["output_dir"]) if params.get("output_dir") else None
        stages: list[Stage] = []
        previous: Path | None = None
        for k, name in enumerate(cls.stage_names(int(p["refine_stages"]))):
            method = cls.from_parameters(spatial_dims, n_landmarks, params, "local", **shared)
            rule = PatchRule(spatial_dims, float(p["local_spacing_mm"]), float(p["local_patch_mm"]) if k == 0 else 0.0,
                             float(p["local_patch_factor"]), int(p["local_max_patch_px"]),
                             max_spacing_mm=float(p["local_max_spacing_mm"]),
                             per_landmark=bool(p["local_patch_per_landmark"]),
                             source=f"{p['base_method']} (base run)" if k == 0 else "previous stage")
            stages.append(LocalStage(name, method, None, None, max_epochs=int(shared["max_epochs"]),
                                     batch_size=int(p["local_batch_size"]), rule=rule, global_folder=previous,
                                     errors=(lambda: base_errors) if k == 0 else None,
                                     landmark_names=shared.get("landmark_names", ()),
                                     keep_previous_where_worse=bool(p["keep_previous_where_worse"])))
            previous = out / name if out is not None else None
        return stages


METHOD = LocalRefinement
