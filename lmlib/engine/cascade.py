"""Cascades: a method made of stages, each trained by the same :func:`~lmlib.engine.training.fit`.

Stage k trains on its own view (e.g. patches around the ground truth plus jitter drawn like stage
k-1's measured errors) and is validated and tested on views centred on stage k-1's predictions, so
each stage's gain is measured, not assumed. Landmarks a stage does not serve (a subset view) keep the
previous stage's prediction. Every stage writes a full run folder ``<output_dir>/<stage>/`` (the
output contract + manifest): the comparison shows one row per stage (``<method>/<stage>``), with
training and inference times summed over the stages up to it; peak memory is the process's peak.

Prediction from checkpoints alone: :func:`predict_cascade` chains the stages' checkpoints.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.callbacks import Callback

from lmlib.data.loaders import LandmarkDataModule, PatchSources
from lmlib.data.sample import Sample
from lmlib.engine.training import (
    FitResult,
    LandmarkModule,
    Predictions,
    fit,
    predict,
    set_kept_previous,
    without_landmarks,
)
from lmlib.evaluation.metrics import radial_errors
from lmlib.methods.stages import Stage  # re-exported: the cascade's unit
from lmlib.outputs.contract import read_manifest

Centres = dict[str, np.ndarray]  # image_id -> (N, D) world mm


@dataclass
class StageResult:
    """A trained stage with its validation/test predictions (chained: unserved landmarks filled)."""

    stage: Stage
    fit: FitResult
    val: Predictions
    test: Predictions
    train_seconds: float  # summed over this and the previous stages
    infer_seconds_per_image: float  # likewise
    kept_previous: list[str] | None = None  # landmarks left to the previous stage (worse on val), when chosen


@dataclass
class Start:
    """Predictions a cascade starts from instead of the images alone: a finished run's (:mod:`lmlib.engine.base_run`),
    on the val and test samples in split order, with what it cost (added to every stage's times)."""

    name: str  # the run refined (its folder name)
    val: Predictions
    test: Predictions
    train_seconds: float  # the run's training and its val predictions (see lmlib.engine.base_run)
    infer_seconds_per_image: float


def as_centres(samples: Sequence[Sample], pred: Predictions) -> Centres:
    """``{image_id: (N, D) world mm}`` of predictions, the next stage's patch centres."""
    return {s.image_id: np.asarray(w, dtype=np.float64) for s, w in zip(samples, pred.world_mm)}


def landmark_errors(samples: Sequence[Sample], world_mm: Sequence[np.ndarray]) -> np.ndarray:
    """Radial errors ``(samples, landmarks)`` in mm of predictions ``world_mm``; NaN where a landmark is not annotated
    or not predicted."""
    return np.stack([np.where(s.valid, radial_errors(p, s.landmarks_mm), np.nan) for s, p in zip(samples, world_mm)])


def worse_on_val(samples: Sequence[Sample], previous: Predictions, current: Predictions) -> list[int]:
    """Indices of the landmarks whose mean validation error (mm, over the samples where annotated) is not lower
    with ``current`` than with ``previous`` (or that ``current`` does not predict)."""
    before, after = landmark_errors(samples, previous.world_mm), landmark_errors(samples, current.world_mm)
    out = []
    for k in range(before.shape[1]):
        annotated = np.isfinite(before[:, k]) | np.isfinite(after[:, k])
        if not annotated.any():
            continue
        if not np.isfinite(after[annotated, k]).all() or np.nanmean(after[annotated, k]) >= np.nanmean(before[annotated, k]):
            out.append(k)
    return out


def chain(previous: Predictions | None, current: Predictions) -> Predictions:
    """Current predictions where the stage predicted a landmark, else the previous stage's."""
    if previous is None:
        return current
    world = [np.where(np.isnan(c), p, c) for p, c in zip(previous.world_mm, current.world_mm)]
    conf = [np.where(np.isnan(c), p, c) for p, c in zip(previous.confidence, current.confidence)]
    spread = None
    if previous.spread_mm is not None and current.spread_mm is not None:  # of the stage that gave the point
        spread = [np.where(np.isnan(w[:, 0]), p, c)
                  for p, c, w in zip(previous.spread_mm, current.spread_mm, current.world_mm)]
    return Predictions(world, conf, current.seconds_per_image, spread)


def fit_cascade(stages: Sequence[Stage], samples: Sequence[Sample], output_dir: str | Path, device: str = "auto",
                seed: int = 0, num_workers: int = 0, resume: bool = False,
                callbacks: Callable[[Stage, Path], Sequence[Callback]] | None = None,
                data: dict[str, Any] | None = None, settings: Mapping[str, Any] | None = None,
                start: Start | None = None) -> list[StageResult]:
    """Train ``stages`` in order on ``samples`` (split by ``meta["split"]``) into ``<output_dir>/<stage>/``.

    ``resume``: continue each stage from its ``checkpoints/last.ckpt`` when present. ``callbacks``: a
    function (stage, stage folder) -> Lightning callbacks (e.g. overlays). ``settings``: keywords of
    :func:`~lmlib.engine.training.fit` for every stage (``devices``, ``num_nodes``, ``strategy`` of DDP,
    ``precision``, ``progress``). ``start``: a finished run's predictions the first stage is centred on (its
    times are counted in every stage's).
    """
    out = Path(output_dir)
    val = [s for s in samples if s.meta.get("split") == "val"]
    test = [s for s in samples if s.meta.get("split") == "test"]
    results: list[StageResult] = []
    prev_val: Predictions | None = start.val if start else None
    prev_test: Predictions | None = start.test if start else None
    train_total = start.train_seconds if start else 0.0
    infer_total = start.infer_seconds_per_image if start else 0.0
    # the patch stages' val/test predictions prepare each image once; this holds one normalised float32 copy of
    # each val/test image from the first patch stage's predictions on (through later stages' training: memory for
    # inference time); the stage that prepares pays in its timing
    sources = PatchSources()
    for stage in stages:
        folder = out / stage.name
        centres = None if prev_val is None or prev_test is None else {  # both None before the first stage only
            "val": as_centres(val, prev_val), "test": as_centres(test, prev_test)}
        dm = LandmarkDataModule(samples, view=stage.view, eval_view=stage.eval_view, centres=centres,
                                batch_size=stage.batch_size, num_workers=num_workers, seed=seed,
                                augmentation=stage.augmentation)
        last = folder / "checkpoints" / "last.ckpt"
        result = fit(stage.method, dm, folder, max_epochs=stage.max_epochs, device=device, seed=seed,
                     resume=last if resume and last.is_file() else "",
                     callbacks=list(callbacks(stage, folder)) if callbacks else [], data=data, **(settings or {}))
        set_kept_previous(result.module, [])  # every landmark, to measure them all (a resumed stage's choice is redone)
        cv = predict(result.module, val, batch_size=stage.batch_size, centres=centres["val"] if centres else None,
                     sources=sources)
        ct = predict(result.module, test, batch_size=stage.batch_size, centres=centres["test"] if centres else None,
                     sources=sources)
        kept_names = None
        if stage.keep_previous_where_worse and prev_val is not None:
            kept = worse_on_val(val, prev_val, cv)
            names = list(result.module.landmark_names)
            kept_names = [names[k] for k in kept]
            set_kept_previous(result.module, kept, result.best_checkpoint)
            cv, ct = without_landmarks(cv, kept), without_landmarks(ct, kept)
            print(f"{stage.name}: keeps the previous predictions of {len(kept)} of {len(names)} landmarks, not improved "
                  f"on val{': ' + ', '.join(kept_names) if kept_names else ''}")
        pv, pt = chain(prev_val, cv), chain(prev_test, ct)
        train_total += result.train_seconds
        infer_total += pt.seconds_per_image
        results.append(StageResult(stage, result, pv, pt, train_total, infer_total, kept_names))
        prev_val, prev_test = pv, pt
    return results


def predict_cascade(checkpoints: Sequence[str | Path | LandmarkModule], samples: Sequence[Sample],
                    batch_size: int = 4, device: str | None = None) -> Predictions:
    """Chain the stages' checkpoints (first to last) on ``samples``; each stage after the first looks
    at views centred on the previous stage's predictions; patch stages prepare each image once
    (:class:`~lmlib.data.loaders.PatchSources`). Seconds per image are summed."""
    pred: Predictions | None = None
    seconds = 0.0
    sources = PatchSources()
    for ckpt in checkpoints:
        centres: Mapping[str, np.ndarray] | None = as_centres(samples, pred) if pred is not None else None
        current = predict(ckpt, samples, batch_size=batch_size, device=device, centres=centres, sources=sources)
        seconds += current.seconds_per_image
        pred = chain(pred, current)
    if pred is None:
        raise ValueError("predict_cascade needs at least one checkpoint")
    return Predictions(pred.world_mm, pred.confidence, seconds, pred.spread_mm)


def model_checkpoints(model: str | Path) -> list[Path]:
    """The checkpoints to chain for ``model`` (see the module docstring), first stage first. One stage's folder of
    a cascade (``global_local/local``) chains the cascade's stages up to and including it: a later stage looks at
    views centred on the earlier stages' predictions and predicts nothing meaningful alone."""
    p = Path(model)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such checkpoint file or run folder")
    if (p / "checkpoints" / "best.ckpt").is_file():
        own = p / "checkpoints" / "best.ckpt"
        if p.name in [str(s) for s in (read_manifest(p.parent) or {}).get("stages") or ()]:
            chain = model_checkpoints(p.parent)
            return chain[:chain.index(own) + 1]
        return [own]
    manifest = read_manifest(p) or {}
    stages = manifest.get("stages")
    base: list[Path] = []
    if stages and manifest.get("base_run"):  # a refinement: the run it refines first
        try:
            base = model_checkpoints((p / str(manifest["base_run"])).resolve())
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{p}: refines the run {manifest['base_run']}, which cannot predict new images "
                                    f"from checkpoints ({exc})") from None
    if not stages:
        raise FileNotFoundError(f"{p}: not a run folder (no checkpoints/best.ckpt, no manifest.json listing stages)")
    ckpts = [p / str(s) / "checkpoints" / "best.ckpt" for s in stages]
    missing = [str(c) for c in ckpts if not c.is_file()]
    if missing:
        raise FileNotFoundError(f"{p}: the cascade's stage checkpoints are missing: {missing}")
    return base + ckpts
