"""The finished run a cascade starts from (:meth:`~lmlib.methods.stages.CascadeMethod.base_folder`, e.g. the
refinement after any method, :mod:`lmlib.methods.refine`): its predictions on the val and test splits. The
members of an ensemble (:mod:`lmlib.methods.ensemble`) are read by the same :func:`read_finished_run`.

- **test**: the run folder's own ``predictions.csv`` (the numbers of its comparison row), every test image and
  landmark required;
- **val**: the run's predictions on the val split: its own ``val_predictions.csv`` (a trained run writes it since
  that file was added), else made from its checkpoints (:func:`~lmlib.engine.cascade.predict_cascade`), or, for a
  method with nothing to train (registration), by running it again with the parameters its manifest records (same
  seed, so the same atlases), then kept in the refining run's folder (``base_val_predictions.csv``) so that a
  resumed run does not redo them.

Costs: the base run's training time plus the time its val predictions took (the refining run needs them to size
its patches and choose per landmark: for registration, which trains nothing, that is a whole registration of every
val image), and its inference time per image. The val time is kept beside the cached predictions
(``base_val_predictions.key``); a cache written without it, and the run's own file, are charged the val images
times the base run's inference time per image.

A run's val predictions on record, without its checkpoints (an ensemble chosen on val,
:func:`stored_val_predictions`): its own ``val_predictions.csv``, else the ``base_val_predictions.csv`` that a
refinement or shape prior beside it made (from its checkpoints, or registration run again), used only where that
cache's key is the run's manifest hash (made from this very run).

Coordinates are world mm ``(x, y[, z])``. A missing folder, image or landmark is an error naming the file.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lmlib.data.refit import check_held_out_val
from lmlib.data.sample import Sample
from lmlib.engine.cascade import Start, landmark_errors, model_checkpoints, predict_cascade
from lmlib.engine.training import Predictions
from lmlib.outputs.contract import (
    BASE_VAL_CACHE,
    VAL_PREDICTIONS,
    ContractError,
    predictions_frame,
    read_manifest,
    read_run,
)
from lmlib.outputs.manifest import check_same_split

#: where the base run's val predictions are kept in the refining run's folder
VAL_CACHE = BASE_VAL_CACHE


def read_predictions(path: Path, samples: Sequence[Sample]) -> list[np.ndarray]:
    """``(N, D)`` world mm per sample (in the samples' landmark order) from a ``predictions.csv``; a sample or
    landmark the file lacks is a :class:`ContractError` naming the file."""
    table = pd.read_csv(path, dtype={"image_id": str, "landmark": str}).set_index(["image_id", "landmark"])
    axes = ["x_mm", "y_mm", "z_mm"]
    out = []
    for s in samples:
        keys = [(s.image_id, name) for name in s.landmark_names]
        missing = [k for k in keys if k not in table.index]
        if missing:
            raise ContractError(f"{path}: no prediction for {len(missing)} landmark(s) of image {s.image_id!r} "
                                f"(e.g. {missing[0][1]!r}): the run was made on other images")
        out.append(table.loc[keys, axes[:s.landmarks_mm.shape[1]]].to_numpy(dtype=np.float64))
    return out


def validation_errors(samples: Sequence[Sample], world_mm: Sequence[np.ndarray]) -> dict[str, float]:
    """Per-landmark mean radial error (mm) over the samples where the landmark is annotated."""
    errors = landmark_errors(samples, world_mm)
    names = samples[0].landmark_names
    return {n: float(np.nanmean(errors[:, k])) for k, n in enumerate(names) if np.isfinite(errors[:, k]).any()}


def _untrained_val(manifest: dict[str, Any], folder: Path, train: Sequence[Sample], val: Sequence[Sample]
                   ) -> list[np.ndarray]:
    """A method with nothing to train, run again on ``val`` with its manifest's parameters (its atlases checked)."""
    from lmlib.methods.base import method_class

    params = dict(manifest.get("parameters") or {})
    cls = method_class(str(manifest["method"]))
    grid = params.get("image_size")
    if not grid:
        raise ContractError(f"{folder / 'manifest.json'}: no image_size among its parameters")
    model: Any = cls.from_parameters(val[0].landmarks_mm.shape[1], len(val[0].landmark_names), params)
    atlases = model.choose_atlases(list(train))
    recorded = manifest.get("atlases")
    if recorded and [a.image_id for a in atlases] != list(recorded):
        raise ContractError(f"{folder / 'manifest.json'}: its atlases {recorded} are not those chosen again "
                            f"({[a.image_id for a in atlases]}): the training images differ")
    world, _ = model.predict_samples(atlases, list(val), [int(g) for g in grid])
    return [np.asarray(w, dtype=np.float64) for w in world]


def val_predictions(folder: Path, manifest: dict[str, Any], train: Sequence[Sample], val: Sequence[Sample]
                    ) -> list[np.ndarray]:
    """The base run's predictions on ``val`` (world mm): from its checkpoints, or by running an untrained method
    again; an error saying what is missing otherwise."""
    from lmlib.methods.base import method_class

    method = str(manifest.get("method", ""))
    check_held_out_val(manifest.get("parameters"), folder, "starting from its val predictions (a refinement's "
                       "patch sizes and kept landmarks, a shape prior's variant)")
    if method and getattr(method_class(method), "derived_from", None):
        raise ContractError(f"{folder / 'manifest.json'}: a {method} run is derived from other runs and keeps no "
                            "checkpoint to predict the val split with: start from one of the runs it is derived from")
    try:
        checkpoints = model_checkpoints(folder)
    except FileNotFoundError:
        checkpoints = []
    if checkpoints:
        return predict_cascade(checkpoints, val).world_mm
    if method and not getattr(method_class(method), "trainable", True):
        return _untrained_val(manifest, folder, train, val)
    raise FileNotFoundError(f"{folder}: the {method or 'base'} run has no checkpoints (checkpoints/best.ckpt or its "
                            "stages') to predict the val split with: run its job again here (committed run folders "
                            "do not keep checkpoints)")


def started_from(folder: Path) -> Path | None:
    """The run ``folder``'s predictions start from: its manifest's ``base_run`` (a refinement, test-time scales),
    or, for a stage of a cascade that starts from a finished run, the cascade's; None for a run of its own."""
    own = read_manifest(folder) or {}
    if own.get("base_run"):
        return folder / str(own["base_run"])
    parent = read_manifest(folder.parent) or {}
    if folder.name in [str(s) for s in parent.get("stages") or []] and parent.get("base_run"):
        return folder.parent / str(parent["base_run"])
    return None


def run_ancestors(folder: Path) -> set[Path]:
    """The run folders (resolved) whose training time ``folder``'s row already counts: a cascade's earlier stages,
    the run a refinement or test-time augmentation starts from (its manifest's ``base_run``), and theirs."""
    out: set[Path] = set()
    todo = [Path(folder).resolve()]
    while todo:
        here = todo.pop()
        found: list[Path] = []
        stages = [str(s) for s in (read_manifest(here.parent) or {}).get("stages") or []]
        if here.name in stages:  # a cascade stage: the stages before it
            found += [here.parent / s for s in stages[:stages.index(here.name)]]
        base = started_from(here)
        if base is not None:
            found.append(base)
        for f in (p.resolve() for p in found):
            if f not in out:
                out.add(f)
                todo.append(f)
    return out


def run_grid(folder: Path) -> list[int] | None:
    """The whole-image grid (px, ``(x, y[, z])``) a run's predictions start from: its manifest's ``image_size``,
    or, for a run that starts from another run (its own or its cascade's ``base_run``: a refinement, whose stages
    work on patches, or test-time scales), that run's, followed back. None where no manifest records one."""
    base = started_from(Path(folder))
    if base is not None:
        return run_grid(base)
    size = ((read_manifest(Path(folder)) or {}).get("parameters") or {}).get("image_size")
    return [int(v) for v in size] if size else None


def read_finished_run(folder: Path, dataset: str, test: Sequence[Sample], job: str, way_out: str = "",
                      samples: Sequence[Sample] = ()) -> tuple[dict[str, Any], dict[str, Any], list[np.ndarray]]:
    """A finished run's manifest, metrics and test predictions (world mm, the samples' landmark order); no run
    there (``job``: the driver job that makes it; ``way_out``: what else the caller may do), a run on another data
    set, an image it did not predict, or ``samples`` (the data set as loaded now) split otherwise than the run saw
    them (:func:`~lmlib.outputs.manifest.check_same_split`) is an error naming the folder or file."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(f"{folder}: no finished run here (no manifest.json): run the {job!r} job on "
                                f"{dataset} first" + (f", {way_out}" if way_out else ""))
    _, metrics = read_run(folder)
    ran_on = str((manifest.get("parameters") or {}).get("dataset", ""))
    if Path(ran_on).stem != Path(dataset).stem:
        raise ContractError(f"{folder / 'manifest.json'}: a run on {ran_on!r}, not on {dataset!r}")
    if samples:
        check_same_split(folder, samples)
    return manifest, metrics, read_predictions(folder / "predictions.csv", test)


def manifest_key(folder: Path) -> str:
    """The key a val-prediction cache of the run in ``folder`` is kept under: its manifest's hash."""
    return hashlib.sha256((Path(folder) / "manifest.json").read_bytes()).hexdigest()[:12]


def recorded_val_predictions(folder: Path, val: Sequence[Sample], per_image: float, caches: Sequence[Path] = ()
                             ) -> tuple[list[np.ndarray], Path, float] | None:
    """The val predictions on record of the finished run in ``folder`` (world mm, ``val``'s order): its own
    :data:`VAL_PREDICTIONS`, else the first of ``caches`` (:data:`VAL_CACHE` files) whose key file names its manifest
    hash; with the file and what they cost (s): the time a cache's key file records, else ``len(val)`` x
    ``per_image`` (the run's inference time per image). None when there are none."""
    own = Path(folder) / VAL_PREDICTIONS
    if own.is_file():
        return read_predictions(own, val), own, len(val) * per_image
    key = manifest_key(folder)
    for cache in caches:
        keyfile = cache.with_suffix(".key")
        stored = keyfile.read_text().split() if keyfile.is_file() else []
        if cache.is_file() and stored[:1] == [key]:
            return read_predictions(cache, val), cache, float(stored[1]) if len(stored) > 1 else len(val) * per_image
    return None


def stored_val_predictions(folder: Path, val: Sequence[Sample], search: Path | None = None
                           ) -> tuple[list[np.ndarray], Path, float]:
    """The finished run in ``folder``'s predictions on ``val`` (world mm) from the files on record
    (:func:`recorded_val_predictions`; the caches under ``search``, default ``folder``'s parent: the run folders beside
    it and their stages, not the driver's hidden scratch folders), the file they came from and their cost (s). A
    refit (its val images were training images) and a run with none on record are errors naming the folder."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(f"{folder}: no finished run here (no manifest.json)")
    check_held_out_val(manifest.get("parameters"), folder, "choosing on its val predictions")
    if not val:
        raise ValueError(f"{folder}: the data set has no val images to choose on")
    root = Path(search) if search is not None else folder.parent
    caches = sorted(p for pattern in (f"*/{VAL_CACHE}", f"*/*/{VAL_CACHE}") for p in root.glob(pattern)
                    if not any(part.startswith(".") for part in p.relative_to(root).parts))
    found = recorded_val_predictions(folder, val, float(read_run(folder)[1]["infer_seconds_per_image"]), caches)
    if found is None:
        raise FileNotFoundError(
            f"{folder}: no val predictions on record (a trained run writes {VAL_PREDICTIONS}: run its job again if it "
            f"predates that file; for a run with nothing to train, e.g. registration, or one derived from other runs, "
            f"a refinement started from it, e.g. registration+local, keeps them in its {VAL_CACHE})")
    return found


def load_base_run(folder: str | Path, dataset: str, train: Sequence[Sample], val: Sequence[Sample],
                  test: Sequence[Sample], cache_dir: str | Path | None = None) -> Start:
    """The predictions of the finished run in ``folder`` on ``val`` and ``test`` and its costs (see the module
    docstring). ``cache_dir``: where the val predictions are kept (keyed by the base run's manifest)."""
    folder = Path(folder)
    manifest, metrics, test_mm = read_finished_run(folder, dataset, test, folder.name,
                                                 "or name another run folder with base_run", [*train, *val, *test])
    cache = Path(cache_dir) / VAL_CACHE if cache_dir is not None else None
    per_image = float(metrics["infer_seconds_per_image"])
    found = recorded_val_predictions(folder, val, per_image, [cache] if cache is not None else [])
    if found is not None:
        val_mm, source, val_seconds = found
        timed = source == cache and len(cache.with_suffix(".key").read_text().split()) > 1
        print(f"base run {folder.name}: val predictions from {source.name} ("
              + (f"they took {val_seconds:.0f} s)" if timed else
                 f"their time not kept: charged {len(val)} images x {per_image:.3f} s = {val_seconds:.0f} s)"))
    else:
        t0 = time.perf_counter()
        print(f"base run {folder.name}: predicting the {len(val)} val images ...", flush=True)
        val_mm = val_predictions(folder, manifest, train, val)
        val_seconds = time.perf_counter() - t0
        print(f"base run {folder.name}: val predictions in {val_seconds:.0f} s")
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            predictions_frame(val, val_mm).to_csv(tmp, index=False)
            tmp.replace(cache)
            # the key last: an interruption between the two leaves a cache that no key names, never an old one named
            cache.with_suffix(".key").write_text(f"{manifest_key(folder)}\n{val_seconds:.3f}\n")

    def ones(world: list[np.ndarray]) -> list[np.ndarray]:
        return [np.ones(len(p)) for p in world]

    return Start(folder.name, Predictions(val_mm, ones(val_mm), 0.0), Predictions(test_mm, ones(test_mm), per_image),
                 float(metrics["train_seconds"]) + val_seconds, per_image)
