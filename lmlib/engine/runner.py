"""The one run path every method notebook calls: data -> method -> fit -> test predictions -> outputs.

    result = run_method("dilation_erosion", notebook_parameters(globals()))
    show_run(result)

:func:`run_method` loads the dataset, builds the method from the notebook's parameters, trains it with
:func:`lmlib.engine.training.fit` (or :func:`lmlib.engine.cascade.fit_cascade` for a method made of
stages), predicts the test split in world mm, writes the output contract (``predictions.csv``,
``metrics.json``), the training figures and ``manifest.json`` (the *effective* parameters: the notebook's
defaults plus papermill's overrides, as collected by :func:`notebook_parameters`), and returns a
:class:`RunResult` to display.

Shared parameter names (every method notebook declares those it uses; their types, bounds, defaults and
meanings: :class:`lmlib.engine.parameters.SharedParameters`);
everything else must be one of the method's own parameters (``METHOD.parameters``), else a clear error.
Before any work, :func:`validate_parameters` checks the shared values (e.g. ``max_epochs`` >= 1, ``device``
available here) and :func:`check_output_dir` that the run folder can be written: one line each on failure.
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import pandas as pd

from lmlib.data.datasets import (
    SYNTHETIC,
    Dataset,
    dataset_ndim,
    get_spec,
    is_single_template,
    load_dataset,
    subjects_of_all,
)
from lmlib.data.label_fusion import describe_fusion, fuse_training_labels
from lmlib.data.loaders import LandmarkDataModule, ViewSpec
from lmlib.data.refit import is_refit, with_val_in_train
from lmlib.data.sample import Sample
from lmlib.data.transforms import build_augmentation
from lmlib.engine.cascade import model_checkpoints, predict_cascade
from lmlib.engine.parameters import SHARED_PARAMETERS, check_shared, shared_value
from lmlib.engine.training import FitResult, Predictions, fit, load_checkpoint, predict
from lmlib.engine.training_figures import OverlayCallback, plot_training_curves
from lmlib.methods.base import LandmarkMethod, build_method, method_class
from lmlib.methods.stages import BASE_ERRORS, CascadeMethod, is_cascade
from lmlib.outputs.contract import (
    SELECTION_FILE,
    clear_earlier_run,
    predictions_frame,
    read_manifest,
    read_run,
    write_outputs,
    write_val_predictions,
)
from lmlib.outputs.manifest import check_same_split, image_splits, utc_now, write_manifest, write_split_file
from lmlib.runtime import check_device, peak_rss_mb, print_environment, setup

DEFAULT_GRID: dict[int, list[int]] = {2: [128, 128], 3: [64, 64, 64]}
#: which atlases each test image kept, with their correlation after the affine stage (registration's atlas selection)
ATLAS_CHOICES = "atlas_choices.csv"

_IPYTHON_NAMES = {"In", "Out", "exit", "quit", "get_ipython", "open"}


def notebook_parameters(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The effective parameters of a notebook: the names its ``parameters`` cell declares (``name: type =
    default``, which the kernel records in ``__annotations__``) with their values after papermill's injected
    overrides. A scratch variable typed while exploring (``n = 3``) is not a parameter. Without annotations (a
    plain dict) every plain value (str, int, float, bool, list, dict, None) counts. Call it right after the
    parameters cell: ``notebook_parameters(globals())``. A misspelt override (``papermill -p max_epoch 5``) is not
    declared, so it is not passed: papermill warns about it, and the driver refuses it before running."""
    declared = namespace.get("__annotations__")
    if declared is None and callable(namespace.get("__annotate__")):  # Python >= 3.14: annotations are lazy
        declared = namespace["__annotate__"](1)  # format VALUE
    out: dict[str, Any] = {}
    for name, value in namespace.items():
        if name.startswith("_") or name in _IPYTHON_NAMES or (declared is not None and name not in declared):
            continue
        if value is None or isinstance(value, (str, int, float, bool, list, tuple, dict)):
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


@dataclass
class RunResult:
    """What :func:`run_method` produced (all files are already in ``output_dir``)."""

    output_dir: Path
    metrics: dict[str, Any]
    predictions: pd.DataFrame
    test_samples: list[Sample]
    world_mm: list[np.ndarray]
    figures: dict[str, Path] = field(default_factory=dict)
    fits: dict[str, FitResult] = field(default_factory=dict)  # stage name ("" for one stage) -> fit
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> its metrics (cascades)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # decoding variant -> its metrics

    def summary(self) -> pd.DataFrame:
        """One row per stage (or the run, then one per decoding variant): MRE, median, SDR, times, memory
        (mm, %, s, MB)."""
        rows = {**(self.stages or {"": self.metrics}), **self.variants}
        keys = ["mre_mm", "sd_mm", "median_mm", "sdr_2mm", "sdr_2.5mm", "sdr_3mm", "sdr_4mm", "max_mm",
                "train_seconds", "infer_seconds_per_image", "peak_rss_mb", "best_val_mre_mm", "epochs"]
        frame = pd.DataFrame([{k: m.get(k) for k in keys} for m in rows.values()], index=list(rows))
        frame.index.name = "stage"
        return frame


def load_run_data(params: Mapping[str, Any], data_dir: str | None = None) -> Dataset:
    """The dataset a run trains and tests on. afids-mni is one annotated template: its train/val/test images
    are ``n_deformed`` random smooth deformations of it (the data layer's fixed set, seed 0, shared with
    the reference rows), and the template itself is scored as one more test image. ``data_dir`` overrides the
    parameters' data folder (a finished run's data that moved)."""
    name = params["dataset"]
    options: dict[str, Any] = {}
    if is_single_template(name):
        n = _as_int(params.get("n_deformed", 0)) or 0
        if n < 5:
            raise ValueError(f"dataset={name!r} is a single template: set n_deformed >= 5 (got {n}) to train on "
                             "random deformations of it (60/20/20 % train/val/test)")
        options = {"deformed": n}
    folder = data_dir or params.get("data_dir") or None
    refit = is_refit(params)
    data = load_dataset(name, folder, annotator=params.get("annotator") or None, **options)
    data = with_val_in_train(data) if refit else data
    mode = str(params.get("train_labels") or "reference")
    if mode == "reference":
        return data
    others = [load_dataset(name, folder, annotator=who, load_images=False, **options)
              for who in data.spec.annotations if who != data.annotator]
    others = [with_val_in_train(o) for o in others] if refit else others
    fused, offsets = fuse_training_labels(data, others, mode)
    print(describe_fusion(fused, mode, offsets))
    return fused


def finished_run_data(run_dir: str | Path, manifest: Mapping[str, Any], data_dir: str | None = None) -> Dataset:
    """The dataset of a finished run (:func:`load_run_data` from its manifest's parameters), checked to split the
    images as the run did (:func:`~lmlib.outputs.manifest.check_same_split`): a run scored or calibrated on today's
    split must not meet images it trained on or chose its checkpoint with."""
    data = load_run_data(manifest["parameters"], data_dir)
    check_same_split(run_dir, data.samples)
    return data


def _split(data: Dataset, name: str, limit: int = 0) -> list[Sample]:
    """The split's samples; ``limit`` (``max_train_images``) keeps the first of its own images, a refit's copies of
    the val images (:mod:`lmlib.data.refit`) all kept after them."""
    samples = data.split(name)
    own = [s for s in samples if not s.meta.get("refit")]
    return own[: limit or None] + [s for s in samples if s.meta.get("refit")]


def warn_not_in_split(data: Dataset) -> None:
    """Say which images the split file leaves out (they are in no split: trained on, selected on and scored on by
    nothing), so a split file that drops images does not shrink a run unnoticed."""
    report = data.report
    rows = report[report["issue"] == "not_in_split"] if "issue" in report else report.iloc[:0]
    if len(rows):
        ids = sorted(set(rows["image_id"].astype(str)))
        shown = ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
        print(f"warning: {len(ids)} image(s) of {data.spec.name} are in no split (the split file leaves them out): "
              f"{shown}")


def write_run_split(data: Dataset, output_dir: Path) -> Path | None:
    """Write every image's split as this run sees it to ``<output_dir>/splits.csv``
    (:func:`~lmlib.outputs.manifest.write_split_file`); for a dataset split by a seed (its declaration names no
    split file) also announce the split and return that file (the run's manifest names it: ``seeded_split_file``),
    else None."""
    path = write_split_file(data.samples, output_dir)
    spec = data.spec
    if not spec.reader or spec.splits_file or spec.single_template or spec.subject_splits:
        return None
    splits = list(image_splits(data.samples).values())
    counts = {k: splits.count(k) for k in ("train", "val", "test")}
    print(f"{spec.name}: no split file; seeded split (fractions {list(spec.split_fractions)}, seed {spec.split_seed}, "
          f"by {spec.split_by}, from the dataset declaration): {counts} -> {path}")
    return path


def check_splits(name: str, data: Dataset, splits: Mapping[str, Sequence[Sample]]) -> None:
    """Raise naming every empty split, the counts, and where this dataset's splits come from."""
    empty = [k for k, v in splits.items() if not v]
    if not empty:
        return
    counts = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
    if name in SYNTHETIC:
        source = "the phantom generator (60/20/20 % train/val/test)"
    else:
        source = next((s.meta["split_source"] for s in data.samples if s.meta.get("split_source")),
                      "each sample's meta['split']")
    plural = "splits are" if len(empty) > 1 else "split is"
    raise ValueError(f"{name}: the {' and '.join(empty)} {plural} empty ({counts} of {len(data.samples)} images); "
                     f"a run needs images in train, val and test; here the splits come from {source}")


def check_parameters(method: type[LandmarkMethod], params: Mapping[str, Any]) -> None:
    """Raise naming every parameter that neither the engine nor the method uses, then check the method's own
    values against its model (:attr:`~lmlib.methods.base.LandmarkMethod.Parameters`): one ``ValueError`` line."""
    known = set(SHARED_PARAMETERS) | set(method.parameters) | set(getattr(method, "extra_parameters", ()))
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"parameters {unknown} are not used by {method.name} (shared: {sorted(SHARED_PARAMETERS)}; "
                         f"{method.name}: {sorted(method.parameters)})")
    method.values(params)


def _as_int(value: Any) -> int | None:
    """``value`` as an int when it is one (also 3.0 or "3"), else None (bools are not numbers here)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def validate_parameters(params: Mapping[str, Any]) -> None:
    """Raise a one-line ``ValueError`` naming the first shared parameter whose value cannot work, the value and
    what is allowed (:class:`~lmlib.engine.parameters.SharedParameters`, the dataset name, ``image_size`` vs the
    dataset's dimension,
    ``device`` vs this machine). Parameters that are absent keep their defaults and are not checked."""
    if "dataset" in params:
        try:
            get_spec(params["dataset"]) if params["dataset"] not in SYNTHETIC else None
        except (ValueError, FileNotFoundError) as exc:
            raise type(exc)(f"dataset={params['dataset']!r}: {exc}") from None
    check_shared(dict(params))
    grid, dataset = params.get("image_size"), params.get("dataset")
    if grid and dataset is not None and len(grid) != (ndim := dataset_ndim(dataset)):
        raise ValueError(f"image_size={list(grid)!r}: must be {ndim} integers >= 1 (or empty) because "
                         f"{dataset} is {ndim}D")
    if "device" in params:
        check_device(str(params["device"]))


def dimension_refusal(method: type[LandmarkMethod], dataset: str) -> str | None:
    """Why ``method`` cannot run on ``dataset`` (``"works on 2D images; dataset 'x' is 3D"``), or None when it
    is built for the dataset's dimension."""
    ndim = dataset_ndim(dataset)
    if ndim in method.supported_dims:
        return None
    return f"works on {' or '.join(f'{d}D' for d in method.supported_dims)} images; dataset {dataset!r} is {ndim}D"


def check_dimension(method: type[LandmarkMethod], dataset: str) -> None:
    """Raise when ``method`` is not built for the dataset's dimension (e.g. a 3D-only method on 2D images)."""
    reason = dimension_refusal(method, dataset)
    if reason is not None:
        raise ValueError(f"{method.name} {reason}")


def check_output_dir(output_dir: str | Path) -> Path:
    """Create ``output_dir`` and write (then delete) a probe file in it; raise ``OSError`` naming the folder
    when either fails, so an unwritable run folder is reported before any training."""
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"output_dir={str(folder)!r}: cannot create the folder ({exc.strerror or exc})") from exc
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OSError(f"output_dir={str(folder)!r}: cannot write into the folder ({exc.strerror or exc})") from exc
    return folder


def engine_settings(params: Mapping[str, Any], data: Dataset) -> dict[str, Any]:
    """Settings every method shares, from notebook parameters (optimizer, flip pairs, epochs, batch) and the data
    (landmark names, dataset order)."""
    optimizer = {k: params[p] for p, k in (("learning_rate", "lr"), ("lr_schedule", "schedule"),
                                           ("weight_decay", "weight_decay"), ("optimizer", "name"),
                                           ("warmup_epochs", "warmup_epochs")) if p in params}
    return {"optimizer": optimizer, "test_time_flip": bool(shared_value(params, "flip_test")),
            "flip_pairs": data.spec.pair_indices(), "landmark_names": list(data.landmark_names),
            "landmark_groups": data.spec.group_indices(),
            "max_epochs": int(shared_value(params, "max_epochs")),
            "batch_size": int(shared_value(params, "batch_size"))}


#: the notebook parameters that shape the training data stream (order, augmentation, labels, images): a resume must
#: keep them (:func:`lmlib.engine.training.check_resumable` compares what both checkpoints record)
#: (``num_workers`` not: it changes which random draws a run makes, not what they are drawn from)
STREAM_PARAMETERS: tuple[str, ...] = ("seed", "batch_size", "max_train_images", "train_labels", "fit_splits",
                                      "augment", "flip_prob", "rotation_deg", "scale_range", "elastic",
                                      "blur_sigma_px")


def provenance(params: Mapping[str, Any], data: Dataset) -> dict[str, Any]:
    """What checkpoints record about the data: dataset, how its pixel spacing is known, annotator, and the settings
    of the training stream (:data:`STREAM_PARAMETERS`)."""
    sp = data.spec.spacing_mm
    return {"dataset": params["dataset"], "annotator": params.get("annotator") or "",
            "spacing": f"override {list(sp)} mm/px (dataset description)" if sp else "image headers",
            **{name: shared_value(params, name) for name in STREAM_PARAMETERS}}


def fit_settings(params: Mapping[str, Any]) -> dict[str, Any]:
    """``devices``, ``num_nodes``, ``strategy``, ``precision``, ``torch_compile``, ``progress`` and ``select`` (the
    last epoch for a refit on train+val) of :func:`~lmlib.engine.training.fit` from notebook parameters."""
    return {"devices": int(shared_value(params, "devices")), "num_nodes": int(shared_value(params, "num_nodes")),
            "strategy": str(shared_value(params, "strategy")), "precision": str(shared_value(params, "precision")),
            "torch_compile": bool(shared_value(params, "torch_compile")),
            "progress": str(shared_value(params, "progress")), "select": "last" if is_refit(params) else "val"}


def check_refit(method: type[LandmarkMethod], params: Mapping[str, Any]) -> None:
    """Raise when ``fit_splits='train+val'`` (a refit) asks for something only a run selected on val can do: a cascade
    (its later stages keep a landmark by its validation error), a method that trains nothing, or a run made from
    other runs (ensemble, test-time augmentation: their members choose their own splits)."""
    if not is_refit(params):
        return
    why = ("is made from finished runs (refit its members instead)" if getattr(method, "derived_from", None)
           else "trains nothing" if not getattr(method, "trainable", True)
           else "is a cascade whose stages keep a landmark by its validation error" if is_cascade(method) else None)
    if why is not None:
        raise ValueError(f"fit_splits='train+val': {method.name} {why}; a refit trains one network on train+val and "
                         "keeps its last epoch")


def overlays(params: Mapping[str, Any], folder: Path) -> list[OverlayCallback]:
    """The training-overlay callback (frames every ``overlay_every`` epochs, GIF at ``gif_fps``)."""
    return [OverlayCallback(folder, every_n_epochs=int(shared_value(params, "overlay_every")), n_images=4,
                            fps=float(shared_value(params, "gif_fps")))]


def augmentation(params: Mapping[str, Any], ndim: int, seed: int,
                 left_right_pairs: Sequence[tuple[int, int]] = ()) -> Any:
    """The training augmentation the parameters ask for (None when ``augment`` is false); a mirror along x
    with probability ``flip_prob`` swaps ``left_right_pairs``."""
    if not shared_value(params, "augment"):
        return None
    return build_augmentation(ndim, left_right_pairs, flip_prob=float(shared_value(params, "flip_prob")),
                              rotation_deg=float(shared_value(params, "rotation_deg")),
                              scale=float(shared_value(params, "scale_range")), elastic=bool(shared_value(params, "elastic")),
                              blur_sigma=float(shared_value(params, "blur_sigma_px")), seed=seed)


def run_method(method: str, params: Mapping[str, Any]) -> RunResult:
    """Run ``method`` end to end with notebook parameters ``params`` (see the module docstring)."""
    cls = method_class(method)
    check_parameters(cls, params)
    validate_parameters(params)  # before any work: one clear line per bad value
    check_dimension(cls, params["dataset"])
    check_output_dir(params["output_dir"])
    started = utc_now()
    seed, output_dir = int(shared_value(params, "seed")), Path(params["output_dir"])
    dev = setup(seed, str(shared_value(params, "device")))
    print_environment(dev)
    data = load_run_data(params)
    warn_not_in_split(data)
    ndim, names = data.spec.ndim, data.landmark_names
    train = _split(data, "train", int(shared_value(params, "max_train_images")))
    val, test = _split(data, "val"), _split(data, "test")
    check_splits(params["dataset"], data, {"train": train, "val": val, "test": test})
    check_refit(cls, params)
    earlier = clear_earlier_run(output_dir)  # once the run is known to start, before it writes anything
    if earlier:
        print(f"output_dir: removed {len(earlier)} output file(s) of an earlier run (e.g. {earlier[0]}); checkpoints "
              "and the training log stay")
    seeded = write_run_split(data, output_dir)  # after the clearing: a run refused above keeps the earlier's record
    derived = getattr(cls, "derived_from", None)  # nothing trained: finished runs' predictions or checkpoint
    if derived is not None:  # no grid of its own (its members' or its base run's)
        effective = {**params, **cls.values(params), **({"seeded_split_file": seeded.name} if seeded else {})}
        print(f"{params['dataset']}: {ndim}D, {len(names)} landmarks; test {len(test)} images")
        if derived == "predictions":
            return _run_on_predictions(cls, params, effective, data, train, val, test, dev, started, seed)
        runs = {"runs": _run_ensemble, "checkpoint": _run_tta}
        if derived not in runs:
            raise ValueError(f"{cls.__name__}.derived_from = {derived!r}: one of 'runs', 'checkpoint', 'predictions'")
        return runs[derived](cls, params, effective, data, train + val + test, test, dev, started, seed)
    grid = [int(v) for v in params.get("image_size") or DEFAULT_GRID[ndim]]
    # the effective parameters: the method's own at the model's defaults where the notebook does not declare them
    effective = {**params, **cls.values(params), "image_size": grid,
                 **({"seeded_split_file": seeded.name} if seeded else {})}
    print(f"{params['dataset']}: {ndim}D, {len(names)} landmarks; train {len(train)}, val {len(val)}, "
          f"test {len(test)}; network grid {grid}")
    shared = engine_settings(params, data)
    if not getattr(cls, "trainable", True):
        return _run_without_training(cls, params, effective, data, train, test, grid, dev, started, seed)
    if is_cascade(cls):
        return _run_cascade(cls, params, effective, data, train, val, test, grid, shared, dev, started, seed)
    model = cls.from_parameters(ndim, len(names), params, **shared)
    print(model)
    view = ViewSpec(kind="whole", size=tuple(grid))
    datamodule = LandmarkDataModule(train + val + test, view=view, batch_size=int(shared_value(params, "batch_size")),
                                    num_workers=int(shared_value(params, "num_workers")), seed=seed,
                                    augmentation=augmentation(params, ndim, seed, shared["flip_pairs"]))
    result = fit(model, datamodule, output_dir, max_epochs=shared["max_epochs"], device=str(shared_value(params, "device")),
                 seed=seed, resume=params.get("resume") or "", callbacks=overlays(params, output_dir),
                 data=provenance(params, data), **fit_settings(params))
    kept = (f"best val MRE {result.best_score:.3f} mm" if result.best_score is not None
            else "the last epoch kept (a refit on train+val: its val MRE is in-sample)")
    print(f"trained {result.epochs} epochs in {result.train_seconds:.1f} s; {kept} ({Path(result.best_checkpoint).name})")
    batch_size = int(shared_value(params, "batch_size"))
    pred = predict(result.module, test, batch_size=batch_size)
    metrics, predictions = write_run_outputs(output_dir, test, pred, result, model, grid)
    held_out = val if not is_refit(params) else []  # a refit's val images were training images
    if held_out:
        write_val_predictions(output_dir, held_out, predict(result.module, held_out, batch_size=batch_size).world_mm)
    curves = plot_training_curves(result.history_csv, output_dir, in_sample=is_refit(params))
    figures = {name: output_dir / name for name in curves}
    figures.update(worst_image_figure(output_dir, test, predictions, pred, model.name))
    variants = {}
    for name, overrides in result.module.method.decoding_variants().items():
        folder = output_dir / name
        variants[name] = predict_variant(result, test, overrides, folder, grid, batch_size, held_out)
        write_manifest(folder, {**effective, "output_dir": str(folder)}, samples=train + val + test, seed=seed,
                       device=dev, started=started,
                       extra={"method": model.name, "variant": name, "method_config": {**model.config(), **overrides},
                              "best_checkpoint": Path(result.best_checkpoint).name, "epochs_trained": result.epochs})
    write_manifest(output_dir, effective, samples=train + val + test, seed=seed, device=dev, started=started,
                   extra={"method": model.name, "method_config": model.config(), "world_size": result.world_size,
                          "best_checkpoint": Path(result.best_checkpoint).name, "epochs_trained": result.epochs,
                          **({"variants": list(variants)} if variants else {})})
    return RunResult(output_dir, metrics, predictions, test, pred.world_mm, figures, {"": result}, variants=variants)


class UntrainedMethod(Protocol):
    """What the run path calls on a method with nothing to train (``trainable = False``, e.g.
    :class:`~lmlib.methods.registration.MultiAtlasRegistration`)."""

    def choose_atlases(self, train: Sequence[Sample]) -> list[Sample]: ...

    def predict_samples(self, atlases: Sequence[Sample], samples: Sequence[Sample], size: Sequence[int],
                        progress: bool | str = True, choices: list[dict[str, Any]] | None = None
                        ) -> tuple[list[np.ndarray], list[np.ndarray]]: ...


def _run_without_training(cls: type[LandmarkMethod], params: Mapping[str, Any], effective: dict[str, Any],
                          data: Dataset, train: list[Sample], test: list[Sample], grid: list[int], dev: Any,
                          started: str, seed: int) -> RunResult:
    """A method with nothing to train (``cls.trainable = False``, e.g. multi-atlas registration): it predicts the
    test split from the training images (``predict_samples(train_atlases, test, grid)``); its time per test image
    is its inference time, its training time 0. The same output contract, figures and manifest as a trained run."""
    output_dir = Path(params["output_dir"])
    model = cls.from_parameters(data.spec.ndim, len(data.landmark_names), params)
    print(model)
    untrained = cast(UntrainedMethod, model)  # trainable = False: it predicts without training
    atlases = untrained.choose_atlases(train)
    print(f"atlases ({len(atlases)} of {len(train)} training images): {', '.join(a.image_id for a in atlases)}")
    t0 = time.perf_counter()
    choices: list[dict[str, Any]] = []
    world_mm, spread_mm = untrained.predict_samples(atlases, test, grid, progress=str(shared_value(params, "progress")),
                                                    choices=choices)
    per_image = (time.perf_counter() - t0) / max(1, len(test))
    print(f"predicted {len(test)} test images in {per_image:.1f} s per image")
    if choices:  # which atlases each test image kept (registration's atlas selection, when it leaves some out)
        pd.DataFrame(choices).to_csv(output_dir / ATLAS_CHOICES, index=False, float_format="%.4f")
    ids = [a.image_id for a in atlases]
    return _write_untrained_run(output_dir, test, world_mm, model.name,
                                {"train_seconds": 0.0, "infer_seconds_per_image": per_image},
                                {"image_size": list(grid), "atlases": ids},
                                {"method_config": model.config(), "atlases": ids},
                                effective, train + test, seed, dev, started, spread_mm)


def _write_untrained_run(output_dir: Path, test: list[Sample], world_mm: list[np.ndarray], name: str,
                         timings: dict[str, float], metrics_extra: dict[str, Any], manifest_extra: dict[str, Any],
                         effective: dict[str, Any], used: list[Sample], seed: int, dev: Any, started: str,
                         spread_mm: list[np.ndarray] | None = None) -> RunResult:
    """The output contract, worst-image figure and manifest of a run that trained nothing (registration, an
    ensemble, test-time scales): ``timings`` give ``train_seconds``, ``infer_seconds_per_image`` and optionally
    ``peak_rss_mb`` (else this process's peak)."""
    pred = Predictions(world_mm, [np.ones(len(p)) for p in world_mm], float(timings["infer_seconds_per_image"]),
                       spread_mm)
    predictions = predictions_frame(test, pred.world_mm)
    metrics = write_outputs(output_dir, predictions, {"peak_rss_mb": peak_rss_mb(), **timings},
                            extra_metrics={"method": name, "epochs": 0, "world_size": 1, **metrics_extra})
    figures = worst_image_figure(output_dir, test, predictions, pred, name)
    write_manifest(output_dir, effective, samples=used, seed=seed, device=dev, started=started,
                   extra={"method": name, **manifest_extra})
    return RunResult(output_dir, metrics, predictions, test, pred.world_mm, figures)


def _run_ensemble(cls: type[LandmarkMethod], params: Mapping[str, Any], effective: dict[str, Any], data: Dataset,
                  used: list[Sample], test: list[Sample], dev: Any, started: str, seed: int) -> RunResult:
    """An ensemble of finished runs (``cls.derived_from == "runs"``, :mod:`lmlib.methods.ensemble`): each member's test
    predictions read from its folder beside ``output_dir``, combined per landmark; its training time and time per
    image are the members' sums (plus the combination's), its memory their largest, its device theirs. With
    ``select="val"`` the listed runs are candidates: the members are chosen on their val predictions on record
    (:func:`~lmlib.engine.base_run.stored_val_predictions`), the steps written to ``selection.csv``, and the training
    time (with the val predictions') and memory are every candidate's, a candidate inside another's row (a run a
    refinement starts from, a cascade's earlier stage) counted there only and never combined with it. The same output
    contract, figure and manifest as a run."""
    from lmlib.engine.base_run import read_finished_run, run_ancestors, stored_val_predictions
    from lmlib.evaluation.metrics import mean_radial_error
    from lmlib.methods.ensemble import combine_points

    output_dir = Path(params["output_dir"])
    model: Any = cls.from_parameters(data.spec.ndim, len(data.landmark_names), params)
    print(model)
    folders = {name: output_dir.parent / name for name in model.members}
    # within[m]: the listed runs whose rows already count m's training (a refinement of m, a later stage)
    ancestors = {name: run_ancestors(folder) for name, folder in folders.items()}
    within = {m: [n for n in folders if n != m and folders[m].resolve() in ancestors[n]] for m in folders}
    for name, rows in within.items():  # members inside another: its cost would be counted twice
        if rows and model.select == "none":
            raise ValueError(f"{folders[rows[0]]}: its row already includes the run {name!r} (a stage or a run built "
                             f"on it, whose training time it counts): an ensemble takes independent runs")
    for i, m in enumerate(folders):  # two runs built on a third: both rows count its training
        for n in list(folders)[i + 1:]:
            shared = ancestors[m] & ancestors[n]
            if shared and m not in within[n] and n not in within[m]:
                raise ValueError(f"{folders[m]} and {folders[n]}: both built on {sorted(shared)[0]}, whose training "
                                 f"time both rows count (the ensemble's would count it twice): list one of them")
    runs: dict[str, list[np.ndarray]] = {}
    costs: dict[str, dict[str, Any]] = {}
    for name, folder in folders.items():
        manifest, metrics, world = read_finished_run(folder, str(params["dataset"]), test, name.split("/")[0],
                                                     samples=used)
        runs[name] = world
        costs[name] = {"train_seconds": float(metrics["train_seconds"]),
                       "infer_seconds_per_image": float(metrics["infer_seconds_per_image"]),
                       "peak_rss_mb": float(metrics.get("peak_rss_mb") or 0.0),
                       "device": str(manifest.get("device", "")), "git_commit": manifest.get("git_commit")}
        print(f"{'candidate' if model.select == 'val' else 'member'} {name}: trained "
              f"{costs[name]['train_seconds']:.0f} s, {costs[name]['infer_seconds_per_image']:.3f} s per image "
              f"({costs[name]['device'] or 'device ?'})")
    val_mm: dict[str, list[np.ndarray]] = {}
    if model.select == "val":
        val = data.split("val")
        for name, folder in folders.items():
            val_mm[name], source, val_seconds = stored_val_predictions(folder, val, search=output_dir.parent)
            costs[name].update(val_mre_mm=mean_radial_error(val_mm[name], val), val_seconds=val_seconds,
                               val_predictions=os.path.relpath(source, output_dir.parent))
            print(f"candidate {name}: val MRE {costs[name]['val_mre_mm']:.3f} mm ({len(val)} images, "
                  f"{costs[name]['val_predictions']}; predicting them took {val_seconds:.0f} s)")
    # a run is never combined with one built on it
    chosen, steps = model.choose(val_mm, data.split("val") if val_mm else [], apart=within)
    if steps:
        output_dir.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(steps).to_csv(output_dir / SELECTION_FILE, index=False, float_format="%.4f")
        for row in steps:
            print(f"step {row['step']}: + {row['added']}: val MRE {row['val_mre_mm']:.3f} mm")
        print(f"chosen on val: {', '.join(chosen)} (the steps' lowest val MRE)")
    devices = sorted({costs[n]["device"] for n in costs})
    if len(devices) > 1:
        print(f"warning: the runs ran on different devices ({', '.join(devices)}): the summed times mix them")
    t0 = time.perf_counter()
    world_mm = combine_points([runs[n] for n in chosen], model.combine)
    combine_s = (time.perf_counter() - t0) / max(1, len(test))
    # every candidate was trained, and predicted val, to be compared (val_seconds: 0 without a choice); one inside
    # another's row (whose training time counts it and the val predictions it started from) is counted there
    for name, rows in within.items():
        if rows:
            costs[name]["counted_in"] = rows[0]
            print(f"candidate {name}: its training counted in {rows[0]}'s row")
    train_s = sum(c["train_seconds"] + c.get("val_seconds", 0.0) for c in costs.values() if "counted_in" not in c)
    infer_s = sum(costs[n]["infer_seconds_per_image"] for n in chosen) + combine_s
    print(f"{model.combine} of {len(chosen)} runs on {len(test)} test images: {train_s / 60:.1f} min of training"
          f"{f' (all {len(costs)} candidates)' if steps else ''}, {infer_s:.3f} s per image together")
    return _write_untrained_run(output_dir, test, world_mm, model.name,
                                {"train_seconds": train_s, "infer_seconds_per_image": infer_s,
                                 "peak_rss_mb": max(c["peak_rss_mb"] for c in costs.values())},
                                {"members": chosen, **({"candidates": list(costs)} if steps else {})},
                                {"method_config": model.config(), "members": {n: costs[n] for n in chosen},
                                 **({"candidates": costs, "selection": steps} if steps else {})},
                                effective, used, seed, " + ".join(devices) or dev, started)


def _run_tta(cls: type[LandmarkMethod], params: Mapping[str, Any], effective: dict[str, Any], data: Dataset,
             used: list[Sample], test: list[Sample], dev: Any, started: str, seed: int) -> RunResult:
    """Multi-scale test-time augmentation (``cls.derived_from == "checkpoint"``, :mod:`lmlib.methods.tta`): the
    base run's checkpoint applied to the test images at each scale of its evaluation grid, the predictions combined;
    the scale 1.0 prediction must reproduce the base run's ``predictions.csv``. Training time: the base run's;
    inference: the sum over the scales."""
    from dataclasses import replace

    from lmlib.engine.base_run import read_finished_run
    from lmlib.evaluation.metrics import mean_radial_error
    from lmlib.methods.ensemble import combine_points
    from lmlib.outputs.contract import ContractError

    output_dir = Path(params["output_dir"])
    model: Any = cls.from_parameters(data.spec.ndim, len(data.landmark_names), params)
    print(model)
    folder = model.base_folder(output_dir)
    manifest, metrics, base_world = read_finished_run(folder, str(params["dataset"]), test, model.base_job(),
                                                      "or name another run folder with base_run", used)
    checkpoints = model_checkpoints(folder)
    if len(checkpoints) != 1:
        raise ValueError(f"{folder}: a cascade of {len(checkpoints)} networks; test-time scales apply one network's "
                         "whole-image view (a heatmap U-Net, the HTC, the dilation-erosion U-Net)")
    module = load_checkpoint(checkpoints[0])
    view = module.eval_view
    if view.kind != "whole":
        raise ValueError(f"{checkpoints[0]}: its evaluation view is a {view.kind!r} view: test-time scales need a "
                         "whole-image view")
    if view.size is None or view.spacing is not None:
        raise ValueError(f"{checkpoints[0]}: its whole-image view is at a fixed spacing ({view.spacing} mm/px): a "
                         "larger grid would add margin, not scale the image; test-time scales need a view whose "
                         "field of view is resized onto its grid")
    sizes = model.grid_sizes(view.size, module.method.size_multiple())
    runs, seconds = [], 0.0
    for scale, size in zip(model.scales, sizes):
        pred = predict(module, test, batch_size=int(shared_value(params, "batch_size")), device=dev,
                       view=replace(view, size=size))
        runs.append(pred.world_mm)
        seconds += pred.seconds_per_image
        print(f"scale {scale:g}: grid {list(size)} px, test MRE {mean_radial_error(pred.world_mm, test):.3f} mm, "
              f"{pred.seconds_per_image:.3f} s per image")
        if scale == 1.0:
            moved = max(float(np.nanmax(np.abs(w - b))) for w, b in zip(pred.world_mm, base_world))
            if not moved < 0.01:
                raise ContractError(f"{checkpoints[0]}: at its own grid it predicts up to {moved:.3f} mm away from "
                                    f"{folder / 'predictions.csv'}: not the checkpoint of that run")
    t0 = time.perf_counter()
    world_mm = combine_points(runs, model.combine)
    infer_s = seconds + (time.perf_counter() - t0) / max(1, len(test))
    grids = [list(size) for size in sizes]
    effective = {**effective, "image_size": list(view.size)}  # the base run's grid (the scales': grid_sizes)
    return _write_untrained_run(output_dir, test, world_mm, model.name,
                                {"train_seconds": float(metrics["train_seconds"]), "infer_seconds_per_image": infer_s},
                                {"image_size": list(view.size), "grid_sizes": grids},
                                {"method_config": model.config(), "base_run": os.path.relpath(folder, output_dir),
                                 "base_device": manifest.get("device"), "base_git_commit": manifest.get("git_commit"),
                                 "grid_sizes": grids},
                                effective, used, seed, dev, started)


def _run_on_predictions(cls: type[LandmarkMethod], params: Mapping[str, Any], effective: dict[str, Any],
                        data: Dataset, train: list[Sample], val: list[Sample], test: list[Sample], dev: Any,
                        started: str, seed: int) -> RunResult:
    """A method derived from a finished run's predictions (``cls.derived_from == "predictions"``, e.g.
    :mod:`lmlib.methods.shape_fit`): the base run's val predictions (from its checkpoints, kept in this run's folder)
    and test predictions handed to the method's ``derive`` with the training landmarks and the val MRE; its training
    time and time per image are the base run's plus the method's own, its memory the larger of the two. The same
    output contract, figure and manifest as a run, and the method's tables as CSV."""
    from lmlib.engine.base_run import load_base_run
    from lmlib.evaluation.metrics import mean_radial_error

    output_dir = Path(params["output_dir"])
    model: Any = cls.from_parameters(data.spec.ndim, len(data.landmark_names), params)
    print(model)
    folder = model.base_folder(output_dir)
    start = load_base_run(folder, str(params["dataset"]), train, val, test, cache_dir=output_dir)
    manifest = read_manifest(folder) or {}
    base_peak = float(read_run(folder)[1].get("peak_rss_mb") or 0.0)
    print(f"base run {start.name}: val MRE {mean_radial_error(start.val.world_mm, val):.3f} mm, training and val "
          f"predictions {start.train_seconds:.0f} s, {start.infer_seconds_per_image:.3f} s per image")
    derived = model.derive([s.landmarks_mm for s in train], start.val.world_mm,
                           lambda moved: mean_radial_error(moved, val), start.test.world_mm, seed)
    for name, rows in derived.tables.items():
        pd.DataFrame(rows).to_csv(output_dir / f"{name}.csv", index=False)
    return _write_untrained_run(output_dir, test, derived.test_mm, model.name,
                                {"train_seconds": start.train_seconds + derived.train_seconds,
                                 "infer_seconds_per_image": start.infer_seconds_per_image
                                 + derived.infer_seconds_per_image, "peak_rss_mb": max(base_peak, peak_rss_mb())},
                                derived.metrics,
                                {"method_config": model.config(), "base_run": os.path.relpath(folder, output_dir),
                                 "base_device": manifest.get("device"), "base_git_commit": manifest.get("git_commit"),
                                 **derived.manifest},
                                effective, train + val + test, seed, dev, started)


def predict_variant(result: FitResult, test: Sequence[Sample], overrides: Mapping[str, Any], folder: Path,
                    grid: Sequence[int], batch_size: int = 4, val: Sequence[Sample] = ()) -> dict[str, Any]:
    """Predict ``test`` with the trained weights decoded by the method rebuilt with ``overrides`` (see
    :meth:`~lmlib.methods.base.LandmarkMethod.decoding_variants`); write its output contract into ``folder``, and
    its predictions on ``val`` (held out) where given."""
    module = result.module
    original = module.method
    module.method = build_method(original.name, **{**original.config(), **overrides})
    try:
        pred = predict(module, test, batch_size=batch_size)
        metrics, _ = write_run_outputs(folder, test, pred, result, module.method, grid)
        if val:
            write_val_predictions(folder, val, predict(module, val, batch_size=batch_size).world_mm)
    finally:
        module.method = original
    return metrics


def _run_cascade(cls: type[CascadeMethod], params: Mapping[str, Any], effective: dict[str, Any], data: Dataset,
                 train: list[Sample], val: list[Sample], test: list[Sample], grid: list[int],
                 shared: dict[str, Any], dev: Any, started: str, seed: int) -> RunResult:
    """A method made of stages (``cls.build_stages(spatial_dims, n_landmarks, params, grid, shared)``):
    each stage trained by :func:`fit_cascade` into ``<output_dir>/<stage>/`` with its own contract
    outputs and manifest; the top folder holds the run's manifest and the worst test image (no
    predictions of its own, so the comparison shows one row per stage)."""
    from lmlib.engine.cascade import fit_cascade

    if float(shared_value(params, "flip_prob")) > 0 and shared["flip_pairs"]:
        # every cascade here has per-landmark or stacked patch stages, whose items a mirror cannot relabel (the
        # transform refuses them when a flip is drawn: after the stages before had trained); refused before any
        raise ValueError(f"flip_prob={shared_value(params, 'flip_prob')}: {cls.name}'s patch stages serve one side of "
                         f"a left/right pair at a time, which a mirror cannot relabel: set flip_prob: 0 for it")
    output_dir = Path(params["output_dir"])
    start, base = None, cls.base_folder(params)
    if base is not None:  # a finished run's predictions: the first stage is centred on them
        from lmlib.engine.base_run import load_base_run, run_grid, validation_errors

        start = load_base_run(base, str(params["dataset"]), train, val, test, cache_dir=output_dir)
        errors = validation_errors(val, start.val.world_mm)
        print(f"base run {start.name}: val MRE {np.mean(list(errors.values())):.2f} mm (mean over landmarks), "
              f"worst {max(errors.values()):.2f} mm ({max(errors, key=lambda n: errors[n])})")
        shared = {**shared, BASE_ERRORS: errors}
        # the stages work on patches: the row's grid is the one its base run started from (not a default)
        effective = {**effective, "base_run": os.path.relpath(base, output_dir), "image_size": run_grid(base) or []}
    stages = cls.build_stages(data.spec.ndim, len(data.landmark_names), params, grid, shared)
    aug = augmentation(params, data.spec.ndim, seed, shared["flip_pairs"])
    for stage in stages:
        stage.augmentation = stage.augmentation if stage.augmentation is not None else aug
    results = fit_cascade(stages, train + val + test, output_dir, device=str(shared_value(params, "device")), seed=seed,
                          num_workers=int(shared_value(params, "num_workers")), resume=bool(params.get("resume")),
                          callbacks=lambda stage, folder: overlays(params, folder), data=provenance(params, data),
                          settings=fit_settings(params), start=start)
    figures: dict[str, Path] = {}
    stage_metrics: dict[str, dict[str, Any]] = {}
    for r in results:
        folder = output_dir / r.stage.name
        metrics, predictions = write_run_outputs(folder, test, r.test, r.fit, r.stage.method, r.stage.view.size or grid,
                                                 r.train_seconds, r.infer_seconds_per_image)
        if val and not is_refit(params):
            write_val_predictions(folder, val, r.val.world_mm)
        stage_metrics[r.stage.name] = metrics
        figures.update({f"{r.stage.name}/{n}": folder / n for n in plot_training_curves(r.fit.history_csv, folder)})
        write_manifest(folder, {**effective, "output_dir": str(folder), "stage": r.stage.name}, samples=train + val + test,
                       seed=seed, device=dev, started=started,
                       extra={"method": cls.name, "stage": r.stage.name, "method_config": r.stage.method.config(),
                              "view": r.stage.view.to_dict(), "epochs_trained": r.fit.epochs,
                              "world_size": r.fit.world_size,
                              **({"kept_previous": r.kept_previous} if r.kept_previous is not None else {})})
    last = results[-1]
    figures.update(worst_image_figure(output_dir, test, predictions, last.test, cls.name))
    write_manifest(output_dir, effective, samples=train + val + test, seed=seed, device=dev, started=started,
                   extra={"method": cls.name, "stages": [r.stage.name for r in results],
                          **({"base_run": effective["base_run"]} if start else {})})
    return RunResult(output_dir, stage_metrics[last.stage.name], predictions, test, last.test.world_mm, figures,
                     {r.stage.name: r.fit for r in results}, stage_metrics)


def write_run_outputs(output_dir: Path, test: Sequence[Sample], pred: Predictions, result: FitResult,
                      model: LandmarkMethod, grid: Sequence[int], train_seconds: float | None = None,
                      infer_seconds: float | None = None) -> tuple[dict[str, Any], pd.DataFrame]:
    """The output contract of one (stage) run; ``train_seconds``/``infer_seconds`` override the fit's
    (cascades pass the sums over their stages so far)."""
    predictions = predictions_frame(test, pred.world_mm)
    metrics = write_outputs(output_dir, predictions,
                            {"train_seconds": result.train_seconds if train_seconds is None else train_seconds,
                             "infer_seconds_per_image": pred.seconds_per_image if infer_seconds is None else infer_seconds,
                             "peak_rss_mb": max(peak_rss_mb(), result.peak_rss_mb)},
                            extra_metrics={"best_val_mre_mm": result.best_score, "epochs": result.epochs,
                                           "image_size": list(grid), "method": model.name,
                                           "world_size": result.world_size})
    return metrics, predictions


def worst_image_figure(output_dir: Path, test: Sequence[Sample], predictions: pd.DataFrame, pred: Predictions,
                       label: str) -> dict[str, Path]:
    """The test image with the largest mean error, ground truth and prediction drawn."""
    from lmlib.outputs.qualitative import fig_qualitative

    per_image = predictions.groupby("image_id")["error_mm"].mean()
    if per_image.dropna().empty:
        return {}
    worst = per_image.idxmax()
    k = next(i for i, s in enumerate(test) if s.image_id == worst)
    path = output_dir / f"fig_qualitative_{worst}.png"
    fig_qualitative(test[k], {label: pred.world_mm[k]}, path=path,
                    title=f"{worst}: worst test image ({per_image[worst]:.2f} mm)")
    return {path.name: path}


def show_run(result: RunResult, figures: Sequence[str] = ("fig_loss.png", "fig_mean_error.png", "fig_dice.png",
                                                          "fig_mean_error_per_landmark.png")) -> None:
    """Display the run's summary table, its training curves and its worst test image (in a notebook)."""
    from IPython.display import Image, display

    display(result.summary().round(3))
    for name in [*figures, *(n for n in result.figures if n.startswith("fig_qualitative"))]:
        if name in result.figures and result.figures[name].is_file():
            display(Image(filename=str(result.figures[name])))


@dataclass
class SplitPredictions:
    """A finished run's checkpoint scored on splits of its dataset: per split ``(n_images, N)`` arrays of radial
    errors (mm, NaN = masked), the predictions' own spreads (mm, NaN = none) and confidences."""

    errors: dict[str, np.ndarray]
    spread_mm: dict[str, np.ndarray]
    confidence: dict[str, np.ndarray]
    landmark_names: list[str]
    image_ids: dict[str, list[str]] = field(default_factory=dict)
    dataset: str = ""

    def subjects(self, split: str) -> list[str] | None:
        """The subject of each image of ``split`` where the data set declares subjects for all of them (posed copies
        of one anatomy are one subject), else None."""
        return subjects_of_all(self.dataset, self.image_ids.get(split, [])) if self.dataset else None


DEFAULT_CHECKPOINT = "checkpoints/best.ckpt"  #: a run folder's selected weights


def split_predictions(run_dir: str | Path, checkpoint: str = DEFAULT_CHECKPOINT, batch_size: int = 4,
                      splits: Sequence[str] = ("train", "val", "test"), data_dir: str | None = None,
                      device: str | None = None) -> SplitPredictions:
    """Score ``run_dir``'s checkpoint on each split of its dataset (the dataset and its options from the run's
    ``manifest.json``; ``data_dir`` overrides its data folder). A cascade's run folder chains its stages, and so
    does one stage's folder, up to that stage (its ``checkpoint`` last)."""
    run = Path(run_dir)
    manifest = read_manifest(run)
    if manifest is None:
        raise FileNotFoundError(f"{run / 'manifest.json'}: missing (not a run folder)")
    data = finished_run_data(run, manifest, data_dir)
    chosen = run / checkpoint
    # the run folder's chain (one stage of a cascade predicts around the stages before it), ``checkpoint`` last
    try:
        chain = model_checkpoints(run)
    except FileNotFoundError:  # no best.ckpt (a last.ckpt asked for): the file asked for alone
        if not chosen.is_file():
            raise
        chain = [chosen]
    ckpts = [*chain[:-1], chosen] if chosen.is_file() else chain
    modules = [load_checkpoint(c) for c in ckpts]
    out = SplitPredictions({}, {}, {}, list(data.landmark_names), dataset=str(manifest["parameters"]["dataset"]))
    for split in splits:
        samples = data.split(split)
        out.image_ids[split] = [s.image_id for s in samples]
        pred = predict_cascade(modules, samples, batch_size=batch_size, device=device)
        errors = np.stack([np.linalg.norm(p - s.landmarks_mm, axis=1) for p, s in zip(pred.world_mm, samples)])
        out.errors[split] = errors
        out.spread_mm[split] = np.stack(pred.spread_mm) if pred.spread_mm is not None else np.full_like(errors, np.nan)
        out.confidence[split] = np.stack(pred.confidence)
    return out
