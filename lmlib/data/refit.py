"""A refit: the final network trained on the train and val splits together (a run's ``fit_splits``).

The settings of a method are chosen on ``val`` (its epoch, its augmentation, ...). Once chosen, the same setting can
be trained again on every annotated image outside ``test`` (scikit-learn's ``refit``, nnU-Net's final training): more
images for the network, nothing to select on any more. A refit therefore keeps the last epoch (no checkpoint is
chosen on images the network trained on), its validation errors are in-sample (logged, never used to choose), and
its ``val`` split cannot calibrate conformal regions or be a candidate of the generalisation study. ``test`` is
untouched: it is scored exactly as for any run.

``with_val_in_train`` adds a training copy of each validation image (same image, landmarks and id, ``meta["split"]
== "train"``, ``meta["refit"] = True``); the validation samples themselves stay, so the training loop still reports
its (in-sample) validation error per epoch.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from lmlib.data.datasets import Dataset

#: the splits a run's network trains on: ``train`` (select on val) or ``train+val`` (a refit, the last epoch kept)
FIT_SPLITS: tuple[str, ...] = ("train", "train+val")


def with_val_in_train(data: Dataset) -> Dataset:
    """``data`` with a training copy of every ``val`` sample appended (module docstring); raises naming the data
    set when it has no validation image to add."""
    val = data.split("val")
    if not val:
        raise ValueError(f"{data.spec.name}: fit_splits='train+val' adds the val split to training, and it is empty")
    copies = [replace(s, meta={**s.meta, "split": "train", "refit": True}) for s in val]
    return replace(data, samples=[*data.samples, *copies])


def is_refit(params: Mapping[str, object] | None) -> bool:
    """Whether a run's parameters (its manifest's ``parameters``) trained on train+val."""
    return params is not None and str(params.get("fit_splits") or "train") == "train+val"


def check_held_out_val(params: Mapping[str, object] | None, run: str | Path, use: str) -> None:
    """Raise naming ``run`` when its parameters are a refit's: ``use`` (what needs its val split held out, e.g.
    "calibrating prediction regions") would read in-sample errors."""
    if is_refit(params):
        raise ValueError(f"{run}: a refit (fit_splits='train+val') trained on its validation images, so their errors "
                         f"are in-sample: {use} needs a run trained on train (the same setting without the refit)")
