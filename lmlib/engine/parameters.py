"""The shared run parameters as one typed model (pydantic v2): each name's type, bounds, default and a one-line
description with its units. The engine consumes these names; a method's own parameters are its ``parameters``.

:func:`validate_parameters` (in :mod:`lmlib.engine.runner`) checks a run's values against :class:`SharedParameters`
before any work; the documentation's parameter table is generated from it (:func:`parameter_table`). A default
is ``None`` where each method notebook (or method) sets its own (``max_epochs``, ``learning_rate``, the
optimizer's settings, the notebook's dataset); ``tests/test_notebook_structure.py`` holds every training notebook's
parameters cell to the other defaults.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, StrictBool, ValidationError

from lmlib.data.label_fusion import TRAIN_LABELS
from lmlib.data.refit import FIT_SPLITS
from lmlib.methods.base import OPTIMIZERS, SCHEDULES
from lmlib.runtime import PROGRESS_MODES
from lmlib.typed import Grid, Int, Number, Text, allowed_text, model_table, one_line_error, one_of
from lmlib.typed import field as _field

PRECISIONS: tuple[str, ...] = ("32-true", "bf16-mixed", "16-mixed", "64-true")


class SharedParameters(BaseModel):
    """The parameters every method notebook may declare (it declares those it uses). Units in the descriptions."""

    model_config = ConfigDict(extra="ignore")

    dataset: Text | None = _field(None, "dataset name (synthetic2d, synthetic3d, hamedan-ceph, afids-mni, ...) or a "
                                       "declaration file (.yaml); each notebook's default is its dimension's phantoms")
    data_dir: Text | None = _field("", "folder of a real dataset (empty: the shared default location)")
    output_dir: Text | None = _field(None, "run folder (results/<dataset>/<method>)")
    annotator: Text | None = _field("", "reference annotator (empty: the dataset's first)")
    train_labels: Annotated[str, one_of(TRAIN_LABELS)] = _field(
        "reference", "training labels: reference (the reference annotator's) | mean (every annotator's mean) | "
        "mean_aligned (the mean after each other annotator's mean offset per landmark is removed); val and test "
        "keep the reference's", "reference, mean or mean_aligned")
    fit_splits: Annotated[str, one_of(FIT_SPLITS)] = _field(
        "train", "the splits the network trains on: train (the epoch chosen on val) | train+val (a refit once the "
        "settings are chosen: the last epoch is kept, val errors are in-sample); test is never trained on",
        "train or train+val")
    seed: Int = _field(0, "random seed (data order, augmentation, initialisation)", "an integer >= 0", ge=0)
    device: Text | None = _field("auto", "auto | cpu | cuda | cuda:1 | mps")
    devices: Int = _field(1, "training processes per node (DDP; CPU: processes, GPU: GPUs); the global batch is "
                              "batch_size x devices x num_nodes", "an integer >= 1 (training processes per node)", ge=1)
    num_nodes: Int = _field(1, "nodes of a multi-node DDP run (launched by torchrun or SLURM srun)",
                            "an integer >= 1", ge=1)
    strategy: Text | None = _field("auto", "auto (one process: none; several: fork on CPU, spawn on GPUs, ddp under "
                                   "torchrun/srun) | ddp | ddp_spawn | ...")
    precision: Annotated[str, one_of(PRECISIONS)] = _field(
        "32-true", "32-true | bf16-mixed (bf16 autocast; its speed on this CPU: the benchmark notebook)",
        "32-true, bf16-mixed, 16-mixed (GPU) or 64-true")
    torch_compile: StrictBool = _field(
        False, "train with the network (and, where the method allows it, the loss) compiled by torch.compile "
               "(inductor: fused kernels, a C++ compiler needed; the first epochs pay the compilation; checkpoints and "
               "prediction stay eager)", "true or false")
    num_workers: Int = _field(0, "data-loader worker processes", "an integer >= 0", ge=0)
    max_epochs: Int = _field(100, "training epochs (each method notebook sets its own)", "an integer >= 1", ge=1)
    batch_size: Int = _field(4, "images per batch", "an integer >= 1", ge=1)
    learning_rate: Number = _field(None, "optimizer learning rate (each method notebook sets its own)",
                                   "a number > 0", gt=0)
    lr_schedule: Annotated[str, one_of(SCHEDULES)] = _field(
        None, f"{' | '.join(SCHEDULES)} (unset: the method's)", f"one of {', '.join(map(repr, SCHEDULES))}")
    weight_decay: Number = _field(None, "optimizer weight decay (unset: the method's, DEFAULT_OPTIMIZER or its own)",
                                  "a number >= 0", ge=0)
    optimizer: Annotated[str, one_of(OPTIMIZERS)] = _field(
        None, f"{' | '.join(OPTIMIZERS)} (unset: the method's)", f"one of {', '.join(map(repr, OPTIMIZERS))}")
    warmup_epochs: Int = _field(None, "linear warm-up epochs before the schedule (unset: the method's)",
                                "an integer >= 0", ge=0)
    image_size: Grid = _field([], "network grid in px (x, y[, z]); empty: 128^2 in 2D, 64^3 in 3D",
                              "empty (the default grid) or 2 or 3 integers >= 1")
    augment: StrictBool = _field(True, "random affine + intensity augmentation on the train split", "true or false")
    rotation_deg: Number = _field(10.0, "augmentation: max rotation (degrees)", "a number of degrees in [0, 180]",
                                  ge=0, le=180)
    scale_range: Number = _field(0.1, "augmentation: scale 1 +- this", "a number in [0, 1) (scale 1 +- it)",
                                 ge=0, lt=1)
    elastic: StrictBool = _field(False, "augmentation: add a smooth elastic deformation", "true or false")
    blur_sigma_px: Number = _field(0.0, "augmentation: Gaussian blur of half of the training items, sigma up to this "
                                        "(px of the network grid; 0 = none)", "a number >= 0 (px)", ge=0)
    flip_prob: Number = _field(0.0, "augmentation: probability of mirroring along x (left/right pairs swapped; a "
                                    "patch that serves one side of a pair alone is refused)", "a number in [0, 1]",
                               ge=0, le=1)
    flip_test: StrictBool = _field(False, "test-time flip averaging (left/right pairs swapped)", "true or false")
    overlay_every: Int = _field(10, "epochs between overlay frames (GT blue, prediction red)",
                                "an integer >= 1 (epochs)", ge=1)
    gif_fps: Number = _field(10.0, "frames per second of fig_training_progress.gif", "a number > 0", gt=0)
    resume: Text | None = _field("", "checkpoint (.ckpt) to continue training from")
    progress: Annotated[str, one_of(PROGRESS_MODES)] = _field(
        "bar", "training progress: bar (a live bar per epoch) | lines (a line every few epochs with the validation "
               "error and the time left; the driver's choice, so that stored notebooks hold epoch lines)",
        "bar or lines")
    max_train_images: Int = _field(0, "0 = all; trims the train split only", "an integer >= 0 (0 = all)", ge=0)
    n_deformed: Int = _field(None, "afids-mni: random deformations of the template (train/val/test 60/20/20 %, "
                                   "seed 0; the template itself is one more test image)", "an integer >= 0", ge=0)


#: parameter name -> what it means (units): the names the engine consumes, methods the rest
SHARED_PARAMETERS: dict[str, str] = {name: f.description or "" for name, f in SharedParameters.model_fields.items()}


#: shared names whose default each training notebook sets for its method (the model's is a fallback or None)
SET_BY_EACH_NOTEBOOK: tuple[str, ...] = ("dataset", "output_dir", "max_epochs", "learning_rate", "n_deformed")


def shared_default(name: str) -> Any:
    """The model's default of a shared parameter (``None``: the notebook's or the method's own)."""
    return SharedParameters.model_fields[name].default


def shared_value(params: Mapping[str, Any], name: str) -> Any:
    """``params[name]``, else the model's default (the one fallback of every shared name)."""
    return params.get(name, shared_default(name))


def allowed(name: str) -> str | None:
    """What a shared parameter accepts, in words (the tail of its one-line error); None for free text."""
    return allowed_text(SharedParameters, name)


def check_shared(params: dict[str, Any]) -> None:
    """Raise a one-line ``ValueError`` ``name=value: must be <allowed>`` for the first shared parameter (in the
    model's order) whose value the model refuses; absent names keep their defaults and are not checked."""
    present = {k: v for k, v in params.items() if k in SharedParameters.model_fields}
    try:
        SharedParameters.model_validate(present)
    except ValidationError as exc:
        raise one_line_error(SharedParameters, exc, present) from None


def parameter_table() -> str:
    """The shared parameters as a Markdown table (name, default, what it accepts, meaning), for the documentation."""
    return model_table(SharedParameters, {name: "(the notebook's)" for name in SET_BY_EACH_NOTEBOOK},
                       none_text="(the method's)")


def method_parameter_tables() -> str:
    """Each discovered method's own parameters (its ``Parameters`` model) as a Markdown section with a table."""
    from lmlib.methods.base import method_class, method_names

    parts = []
    for name in method_names():
        cls = method_class(name)
        doc = " ".join((cls.Parameters.__doc__ or "").strip().split("\n\n")[0].split())
        parts.append(f"### `{name}`\n\n{doc} Model: `{cls.__module__}.{cls.Parameters.__name__}`.\n\n"
                     f"{model_table(cls.Parameters)}")
    return "\n\n".join(parts)
