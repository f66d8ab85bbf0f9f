"""One Lightning module for every method, plus ``fit`` / ``predict``.

:class:`LandmarkModule` wraps a :class:`~lmlib.methods.base.LandmarkMethod` and nothing method-specific:
the method's ``forward`` gives the outputs (one tensor or several named ones), its ``training_loss`` the
loss, its ``decode_batch`` the coordinates on each item's grid, its ``configure_optimizers`` the
optimizer and schedule. Validation errors are measured in **world mm** for every view (whole image,
crop, patch) through the item's own grid (``index_to_world``) against the sample's original landmarks
(``reference_mm``), accumulated with torchmetrics. Logged per epoch (CSVLogger,
``training_log/metrics.csv``, kept across resumes): ``train/loss``, ``val/loss``, ``val/mre_mm``, per
landmark ``val/err_mm/<name>``, Dice where the method defines it, ``lr`` and the method's ``epoch_info``.
A resumed run continues exactly (random streams derived from (seed, epoch)); ``train_seconds`` sums
the runs.

Checkpoints describe themselves (Lightning hyper-parameters): method name and configuration, the
training and evaluation views (grid size, spacing, padding, normalisation), landmark names, the
dataset's name and spacing policy, the lmlib version and checkpoint format. The epoch whose state the
decoder assumes (e.g. the dilation-erosion mask radius) is a buffer of the module, so it is saved and
restored with the weights: predictions after :func:`fit` equal predictions from the best checkpoint
loaded anywhere else. :func:`predict` needs only a checkpoint (or module) and samples.
"""
from __future__ import annotations

import copy
import csv
import functools
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torchmetrics.aggregation import CatMetric

import lmlib
from lmlib.data.loaders import (
    STREAM_GLOBAL,
    LandmarkDataModule,
    LandmarkDataset,
    PatchSources,
    ViewSpec,
    collate_landmarks,
    epoch_seed,
)
from lmlib.data.sample import Sample
from lmlib.methods.base import LandmarkMethod, Outputs, build_method, loss_key
from lmlib.methods.networks import match_device_layout
from lmlib.runtime import PROGRESS_MODES, peak_rss_mb, setup

if TYPE_CHECKING:
    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
    from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

MONITOR = "val/mre_mm"
#: how :func:`fit` chooses the weights it keeps (``best.ckpt``): the epoch of lowest ``MONITOR``, or the last one
SELECT: tuple[str, ...] = ("val", "last")
CHECKPOINT_FORMAT = 2  # bump when a checkpoint written by an older version can no longer be read


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit this version of lmlib or the samples it is asked to predict."""


class EpochProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar for the training epochs only (validation bars hidden), refreshed every
    ``refresh_rate`` batches: short enough for notebook outputs, still live in a terminal."""

    def init_validation_tqdm(self) -> Tqdm:
        bar = super().init_validation_tqdm()
        bar.disable = True
        return bar


class EpochLines(Callback):
    """Progress as short lines (for batch runs whose output is stored, e.g. papermill notebooks):
    about ``n_lines`` lines over the run plus the last epoch, each with the training loss, the
    validation mean radial error (mm; ``in_sample``: marked so, a refit trains on its val images) and the elapsed
    time. A live bar in such a notebook would store hundreds of carriage-return updates."""

    def __init__(self, n_lines: int = 20, in_sample: bool = False) -> None:
        self.n_lines, self.start, self.first = int(n_lines), 0.0, 0
        self.val_label = "val MRE (in-sample)" if in_sample else "val MRE"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start, self.first = time.perf_counter(), int(trainer.current_epoch)  # > 0 when resumed

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch, total = int(trainer.current_epoch) + 1, int(trainer.max_epochs or 0)
        every = max(1, total // max(1, self.n_lines))
        if epoch % every and epoch != total and epoch != 1:
            return
        m = trainer.callback_metrics
        loss, mre = m.get("train/loss"), m.get(MONITOR)
        elapsed = time.perf_counter() - self.start
        per_epoch = elapsed / max(1, epoch - self.first)
        left = f", ~{_duration(per_epoch * (total - epoch))} left" if epoch < total else ""
        print(f"epoch {epoch:>4}/{total}  train loss {float(loss) if loss is not None else float('nan'):.4g}  "
              f"{self.val_label} {float(mre) if mre is not None else float('nan'):.3f} mm  "
              f"({elapsed:.0f} s, {per_epoch:.1f} s/epoch{left})", flush=True)


def _duration(seconds: float) -> str:
    """``95`` -> ``1 min 35 s``; ``4000`` -> ``1 h 7 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def progress_callback(n_batches: int, refresh_rate: int | None, progress: str = "bar",
                      in_sample: bool = False) -> Callback:
    """The live TQDM bar (``progress="bar"``), or :class:`EpochLines` (``"lines"``: the driver's choice, so that
    stored notebooks hold epoch lines, not bar fragments; ``in_sample``: the val error is marked in-sample)."""
    if progress not in PROGRESS_MODES:
        raise ValueError(f"progress={progress!r}: must be one of {PROGRESS_MODES}")
    if progress == "lines":
        return EpochLines(in_sample=in_sample)
    return EpochProgressBar(refresh_rate=refresh_rate or n_batches)


def errors_mm(coords: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
    """Radial errors ``(B, K)`` in world mm of grid coordinates ``coords`` ``(B, K, D)`` (x, y[, z])
    through each item's ``index_to_world`` against its ``reference_mm`` (NaN where masked)."""
    world = to_world(coords, batch["index_to_world"])
    ref = torch.as_tensor(batch["reference_mm"], dtype=torch.float64, device=world.device)
    return torch.linalg.vector_norm(world - ref, dim=-1)


def spread_to_mm(spread: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Per-axis spreads ``(B, K, D)`` in grid px -> one radius ``(B, K)`` in mm, ``sqrt(sum_a (s_a h_a)^2)`` with
    ``h_a`` the grid's spacing along axis a (the affine's column norms; per-item or per-landmark affines)."""
    a = torch.as_tensor(affine, dtype=torch.float64).to(spread.device)
    d = a.shape[-2]
    h = torch.linalg.norm(a[..., :d], dim=-2)  # (B, D) or (B, K, D)
    h = h[:, None, :] if h.ndim == 2 else h
    return ((spread.double() * h) ** 2).sum(-1).sqrt()


def to_world(coords: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Grid indices ``(B, K, D)`` -> world mm ``(B, K, D)`` with per-item affines ``(B, D, D+1)``, or
    per-landmark affines ``(B, K, D, D+1)`` (stacked patches: landmark k on its own patch's grid)."""
    a = torch.as_tensor(affine, dtype=torch.float64).to(coords.device)
    d = a.shape[-2]
    if a.ndim == 4:
        return torch.einsum("bkij,bkj->bki", a[..., :d], coords.double()) + a[..., d]
    return torch.einsum("bij,bkj->bki", a[..., :d], coords.double()) + a[..., None, :, d]


class LandmarkModule(pl.LightningModule):
    """Training/validation of any :class:`LandmarkMethod` (see the module docstring).

    Built from plain, JSON-safe arguments so that Lightning's ``load_from_checkpoint`` rebuilds it
    from the checkpoint alone: ``method`` / ``method_config`` (``build_method(method, **config)``),
    ``landmark_names`` (all of the dataset's; items say which they hold), ``view`` / ``eval_view``
    (:class:`ViewSpec` dicts), ``max_epochs`` (schedule horizon) and ``data`` (dataset name, spacing
    policy: provenance stored with the weights). ``kept_previous``: indices of the landmarks this cascade
    stage does not serve, because it did not improve them on the validation split
    (:func:`~lmlib.engine.cascade.fit_cascade`); :func:`predict` leaves them to the previous stage.
    """

    method_epoch: torch.Tensor  # a buffer (registered in __init__)

    def __init__(self, method: str, method_config: dict[str, Any], landmark_names: Sequence[str],
                 view: dict[str, Any], eval_view: dict[str, Any] | None = None, max_epochs: int = 100,
                 data: dict[str, Any] | None = None, lmlib_version: str = lmlib.__version__,
                 checkpoint_format: int = CHECKPOINT_FORMAT, kept_previous: Sequence[int] = ()) -> None:
        super().__init__()
        if int(checkpoint_format) != CHECKPOINT_FORMAT:
            raise CheckpointMismatch(f"checkpoint format {checkpoint_format} (lmlib {lmlib_version}) cannot be read by "
                                     f"lmlib {lmlib.__version__} (format {CHECKPOINT_FORMAT}); retrain or use that version")
        self.save_hyperparameters()
        self.method: LandmarkMethod = build_method(method, **method_config)
        self.net = self.method.build_network()
        # the dataset's landmarks; a stage serving a subset or one landmark per item predicts fewer channels
        self.landmark_names = tuple(landmark_names)
        if len(self.landmark_names) < self.method.n_landmarks:
            raise ValueError(f"{len(self.landmark_names)} landmark names for {self.method.n_landmarks} outputs")
        # the epoch whose target state decoding assumes; a buffer, so it is saved with the weights
        self.register_buffer("method_epoch", torch.zeros((), dtype=torch.long))
        self._compile_loss = False  # compile_for_training sets it
        # NaNs kept ("disable"): values and landmark ids must stay aligned; _per_landmark drops them
        self._val_err = CatMetric(nan_strategy="disable")
        self._val_ids = CatMetric(nan_strategy="disable")
        self._val_dice = CatMetric(nan_strategy="disable")
        self._val_dice_ids = CatMetric(nan_strategy="disable")
        # the val item of each value: under DDP the val sampler pads every rank to one length by repeating items
        self._val_items = CatMetric(nan_strategy="disable")
        self._val_dice_items = CatMetric(nan_strategy="disable")

    def _apply(self, fn: Any, recurse: bool = True) -> LandmarkModule:
        """Every move (``to``, ``cuda``, ``cpu``, the trainer's) also sets the networks' memory layout for the new
        device (:func:`lmlib.methods.networks.match_device_layout`: channels-last on the CPU only)."""
        super()._apply(fn, recurse)
        if "net" in self._modules:
            match_device_layout(self.net)
        return self

    @classmethod
    def from_method(cls, method: LandmarkMethod, landmark_names: Sequence[str], view: ViewSpec,
                    eval_view: ViewSpec | None = None, max_epochs: int = 100,
                    data: dict[str, Any] | None = None) -> LandmarkModule:
        return cls(method.name, method.config(), list(landmark_names), view.to_dict(),
                   eval_view.to_dict() if eval_view is not None else None, max_epochs, data or {})

    @property
    def view(self) -> ViewSpec:
        return ViewSpec.from_dict(self.hparams["view"])

    @property
    def eval_view(self) -> ViewSpec:
        ev = self.hparams.get("eval_view")
        return ViewSpec.from_dict(ev) if ev else self.view

    @property
    def decode_epoch(self) -> int:
        return int(self.method_epoch)

    # ------------------------------------------------------------------ steps
    def forward(self, batch: Mapping[str, Any]) -> Outputs:
        return self.method.forward(self.net, batch)

    def training_loss(self, outputs: Outputs, batch: Mapping[str, Any], epoch: int
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The method's training loss and extras; compiled by ``torch.compile`` after :func:`compile_for_training`
        where the method allows it (:meth:`~lmlib.methods.base.LandmarkMethod.loss_epoch` not None: one graph per
        value of it and batch shape, the targets fused into the loss and never written out), then without extras.
        The compiled loss sees the batch's tensors only."""
        key = loss_key(self.method, epoch) if self._compile_loss else None
        if key is None:
            return self.method.training_loss(outputs, batch, epoch)
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        # a dilation-erosion run has a graph per radius stage and one more per stage for a short last batch
        config = torch._dynamo.config  # the limit's name since torch 2.7; before it, cache_size_limit
        with config.patch({"recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit":
                           LOSS_GRAPHS}):
            return _compiled_loss()(self.method, outputs, tensors, key), {}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, extras = self.training_loss(self(batch), batch, int(self.current_epoch))
        if not torch.isfinite(loss):  # every later step would be NaN too, and the run would still end with exit 0
            raise FloatingPointError(f"epoch {int(self.current_epoch) + 1}, batch {batch_idx}: the training loss is "
                                     f"{float(loss)} (images {list(batch.get('image_id', []))}); lower learning_rate or "
                                     "check these images")
        n = len(batch["image"])
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        for key, value in extras.get("log", {}).items():
            self.log(f"train/{key}", value, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def on_train_start(self) -> None:
        """A resumed run whose schedule grew (``max_epochs``): the optimizer comes back with the rate the old
        schedule gave the epoch about to run; set it from the scheduler's function of the epoch, which has the new
        horizon (else that one epoch ran at the old rate). A fresh or same-length run: the same value."""
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler
            if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
                for group, base, factor in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                    group["lr"] = base * factor(sched.last_epoch)

    def on_train_epoch_start(self) -> None:
        self.method_epoch.fill_(int(self.current_epoch))
        size = self.view.size
        if size is not None:
            for key, value in self.method.epoch_info(int(self.current_epoch), tuple(size)).items():
                self.log(f"train/{key}", float(value), on_step=False, on_epoch=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=False, on_epoch=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        epoch = int(self.current_epoch)
        # scored as predict() scores the test split: in full precision (under bf16-mixed Lightning runs this step in
        # autocast) and with test-time flipping when the method uses it, so the checkpoint is chosen on those numbers
        with torch.autocast(self.device.type, enabled=False):
            if self.method.test_time_flip:  # the image's and its mirror's pass; the loss from the image's
                coords, _, outputs = self.method.predict_coords(self.net, batch, epoch)
            else:
                outputs = self(batch)
                coords, _ = self.method.decode_batch(outputs, batch, epoch)
            loss, extras = self.method.training_loss(outputs, batch, epoch)
        self.log("val/loss", loss, on_step=False, on_epoch=True, batch_size=len(batch["image"]))
        err = errors_mm(coords, batch)
        ids = batch["landmark_ids"].to(err.device)
        items = torch.as_tensor(batch["item_index"], device=err.device).reshape(-1, 1).expand_as(ids)
        self._val_err.update(err.reshape(-1).float())
        self._val_ids.update(torch.where(torch.isfinite(err), ids, -1).reshape(-1).float())
        self._val_items.update(items.reshape(-1).double())
        if "targets" in extras:
            dice = self.method.dice(outputs, extras["targets"], batch["valid"])
            if dice is not None:
                self._val_dice.update(dice.detach().reshape(-1).float())
                self._val_dice_ids.update(torch.where(torch.isfinite(dice), ids, -1).reshape(-1).float())
                self._val_dice_items.update(items.reshape(-1).double())

    def _per_landmark(self, values: CatMetric, ids: CatMetric, items: CatMetric) -> tuple[float, np.ndarray] | None:
        """Mean over all and per landmark of the accumulated values (NaN-free; None if nothing), each (val item,
        landmark) once: the copies a DDP sampler pads the ranks with are counted once."""
        if not values.update_called:
            return None
        v, i = values.compute().double().cpu().numpy().ravel(), ids.compute().cpu().numpy().ravel().astype(int)
        item = items.compute().cpu().numpy().ravel().astype(np.int64)
        for metric in (values, ids, items):
            metric.reset()
        keep = (i >= 0) & np.isfinite(v)
        v, i, item = v[keep], i[keep], item[keep]
        _, first = np.unique(item * len(self.landmark_names) + i, return_index=True)
        first = np.sort(first)  # in their order: without repeats, the same sums to the last bit as before
        v, i = v[first], i[first]
        if v.size == 0:
            return None
        per = np.full(len(self.landmark_names), np.nan)
        for k in np.unique(i):
            per[k] = v[i == k].mean()
        return float(v.mean()), per

    def on_validation_epoch_end(self) -> None:
        err = self._per_landmark(self._val_err, self._val_ids, self._val_items)
        self.log(MONITOR, err[0] if err else math.inf, prog_bar=True)
        if err:
            for name, value in zip(self.landmark_names, err[1]):
                self.log(f"val/err_mm/{name}", float(value))
        dice = self._per_landmark(self._val_dice, self._val_dice_ids, self._val_dice_items)
        if dice:
            self.log("val/dice", dice[0], prog_bar=True)
            for name, value in zip(self.landmark_names, dice[1]):
                self.log(f"val/dice/{name}", float(value))

    def configure_optimizers(self) -> Any:
        return self.method.configure_optimizers(self.parameters(), int(self.hparams["max_epochs"]))

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        clock = getattr(self, "_clock", None)
        checkpoint["train_seconds"] = clock.total() if clock is not None else 0.0
        checkpoint["peak_rss_mb"] = self.peak_rss_mb()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._loaded_train_seconds = float(checkpoint.get("train_seconds", 0.0))
        self._loaded_peak_rss_mb = float(checkpoint.get("peak_rss_mb", 0.0))

    def peak_rss_mb(self) -> float:
        """Peak resident memory (MiB) of the training so far: this process's, or that of the run it was
        resumed from when larger (a resumed run that trains little would otherwise report its own small peak)."""
        return max(peak_rss_mb(), float(getattr(self, "_loaded_peak_rss_mb", 0.0)))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict_batch(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Outputs]:
        """Grid coordinates ``(B, K, D)``, confidences ``(B, K)`` and raw outputs, with the decoding
        state of the loaded weights (:attr:`decode_epoch`)."""
        batch = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        return self.method.predict_coords(self.net, batch, self.decode_epoch)


class _EpochSeeds(Callback):
    """Reseeds Python's, NumPy's and torch's global generators from ``(seed, epoch)`` at the start of
    every training epoch (dropout, anything a method draws there), so a resumed run continues them
    exactly; the data streams are the train loader's (:class:`~lmlib.data.loaders.EpochSampler`)."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank = int(trainer.global_rank)  # each DDP process its own dropout; rank 0 a single process's
        value = epoch_seed(self.seed, int(trainer.current_epoch), *((STREAM_GLOBAL, rank) if rank else (STREAM_GLOBAL,)))
        random.seed(value)
        np.random.seed(value)
        torch.manual_seed(value)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic: each checkpoint is written to a hidden temporary file in
    the same folder, flushed to disk and renamed over the target (``os.replace``). A full disk or a kill
    mid-write leaves the previous ``last.ckpt``/``best.ckpt`` intact (Lightning writes the target file in
    place, so a full disk left a torn ``last.ckpt`` that ``--resume`` could not read) and no temporary file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class _BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps the best validation score of the run it resumes when the checkpoint folder is
    another one (a resume into a new folder, or a run folder moved before ``--resume``): Lightning then restores
    only the best file's path, so the first resumed epoch was saved as the best however bad it was. The earlier
    best checkpoint is copied into this folder (Lightning would otherwise delete the other run's file when a new
    best replaces it); ``resumed_from``: the folder of the checkpoint resumed, where a moved run's file now is."""

    def __init__(self, *args: Any, resumed_from: Path | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resumed_from = resumed_from

    def _generate_state_key(self, **kwargs: Any) -> str:
        """``ModelCheckpoint``'s key: checkpoints written before (and :func:`_from_workers`) find its state by it."""
        return f"ModelCheckpoint{kwargs!r}"

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        moved = state_dict.get("dirpath", self.dirpath) != self.dirpath
        with warnings.catch_warnings():  # "The dirpath has changed ...": handled below
            warnings.filterwarnings("ignore", message="The dirpath has changed")
            super().load_state_dict(state_dict)
        score, path = state_dict.get("best_model_score"), state_dict.get("best_model_path")
        if not moved or score is None or not path or self.dirpath is None:
            return
        here = Path(self.dirpath) / Path(path).name
        found = [p for p in (Path(path), *([self._resumed_from / Path(path).name] if self._resumed_from else []))
                 if p.is_file()]
        if not found:  # the earlier best is gone: Lightning's behaviour (the next epoch becomes the best)
            return
        stale = not here.is_file() or not found[0].samefile(here)  # a file of another run may sit here: replaced
        if stale and getattr(rank_zero_only, "rank", 0) == 0:  # one copy under DDP (every process restores this state)
            here.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(found[0], here)
        self.best_model_score = self.kth_value = score
        self.best_model_path = self.kth_best_model_path = str(here)
        self.best_k_models = {str(here): score}


class _Clock(Callback):
    """Training time in seconds, summed over resumed runs: the running total is written into every
    checkpoint (``train_seconds``, :meth:`LandmarkModule.on_save_checkpoint`) and read back on resume
    (:meth:`LandmarkModule.on_load_checkpoint`, before ``on_train_start``)."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.module: pl.LightningModule | None = None

    def total(self) -> float:
        # the resumed total is read when asked, not in a training hook: resuming a run that had already
        # finished restores the checkpoint but trains no epoch (no on_train_start), and still has its time
        before = float(getattr(self.module, "_loaded_train_seconds", 0.0)) if self.module is not None else 0.0
        return before + (time.perf_counter() - self.start if self.start is not None else 0.0)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start, self.module = time.perf_counter(), pl_module
        # torch types Module.__setattr__ for tensors and modules only; a plain attribute is fine at run time
        pl_module._clock = self  # type: ignore[assignment]


def _resume_epoch(checkpoint: str | Path) -> int:
    """The first epoch a resume from ``checkpoint`` trains (the epochs before it are done)."""
    ckpt = torch.load(str(checkpoint), map_location="cpu", weights_only=False, mmap=True)
    try:
        return int(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return int(ckpt.get("epoch", -1)) + 1


def _earlier_history(out: Path, resume: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of the epochs before the resume, from ``training_log/metrics.csv`` of the
    checkpoint's run folder (``<run>/checkpoints/x.ckpt``), else of ``out``: rows of later epochs
    (logged after the checkpoint was written, e.g. the killed epoch) are dropped, since the resumed
    run logs them again."""
    for csv_path in (Path(resume).parent.parent / "training_log" / "metrics.csv",
                     out / "training_log" / "metrics.csv"):
        if csv_path.is_file():
            break
    else:
        return [], []
    first = _resume_epoch(resume)
    with open(csv_path, newline="") as file:
        reader = csv.DictReader(file)
        rows = [row for row in reader if row.get("epoch") not in (None, "") and float(row["epoch"]) < first]
        return list(reader.fieldnames or []), rows


def _history_logger(out: Path, resume: str | Path) -> CSVLogger:
    """``training_log/metrics.csv`` logger that writes every log at once (a killed run keeps what it
    logged) and, on resume, starts from the earlier epochs' rows (Lightning's writer would delete them)."""
    header, rows = _earlier_history(out, resume) if resume else ([], [])
    logger = CSVLogger(save_dir=str(out), name="", version="training_log", flush_logs_every_n_steps=1)
    with warnings.catch_warnings():  # "previous log files will be deleted": the history is kept below
        warnings.filterwarnings("ignore", message="Experiment logs directory")
        writer = logger.experiment  # created now: it deletes an existing metrics.csv
    if rows:
        with open(writer.metrics_file_path, "w", newline="") as file:
            out_csv = csv.DictWriter(file, fieldnames=header)
            out_csv.writeheader()
            out_csv.writerows(rows)
        writer.metrics_keys = list(header)  # new rows are appended under this header (widened if needed)
    return logger


def in_notebook_kernel() -> bool:
    """Whether this process is a Jupyter kernel (papermill runs notebooks in one)."""
    return "ipykernel" in sys.modules and type(sys.stdout).__module__.startswith("ipykernel")


def _fit_as_script(arguments: dict[str, Any]) -> FitResult:
    """:func:`fit` with several processes, run from a notebook kernel: the arguments go to a file, a
    ``python -m lmlib.engine.ddp_script`` process trains (Lightning launches its other ranks), and this
    process reads the result and the best weights back (see :mod:`lmlib.engine.ddp_script`)."""
    import subprocess

    out = Path(arguments["output_dir"])
    folder = out / ".ddp"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").unlink(missing_ok=True)
    torch.save({**arguments, "strategy": "ddp_find_unused_parameters_true"}, folder / "arguments.pt")
    dev = setup(arguments["seed"], arguments["device"])
    proc = subprocess.run([sys.executable, "-m", "lmlib.engine.ddp_script", str(folder / "arguments.pt")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(proc.stdout[-4000:], end="")  # the ranks' output (epoch lines), shown in the notebook
    if proc.returncode != 0 or not (folder / "result.json").is_file():
        raise RuntimeError(f"DDP training ({arguments['devices']} x {arguments['num_nodes']} processes) failed with "
                           f"exit status {proc.returncode}; its output ends: {proc.stdout[-800:]}")
    r = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    module = LandmarkModule.load_from_checkpoint(r["best_checkpoint"], map_location="cpu").to(dev).eval()
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    return FitResult(module, None, r["best_checkpoint"], r["last_checkpoint"], float(r["train_seconds"]),
                     int(r["epochs"]), out / "training_log" / "metrics.csv", dev, r["best_score"],
                     max(float(r["peak_rss_mb"]), peak_rss_mb(children=True)),
                     int(arguments["devices"]) * int(arguments["num_nodes"]))


def ddp_strategy(strategy: str, accelerator: str) -> str:
    """The Lightning strategy for several processes: ``"ddp"`` when a launcher started them (``torchrun``,
    SLURM ``srun``: every process runs the same notebook and joins), else this process starts them: fork on
    the CPU (cheap, works inside a notebook kernel), spawn on GPUs (CUDA cannot be forked once initialised).
    The process group uses gloo on the CPU and NCCL on GPUs (Lightning's choice). Unused parameters are
    looked for: per-landmark networks train only the nets of the landmarks in a batch. An explicit
    ``strategy`` other than ``"auto"`` is used as given."""
    if strategy != "auto":
        return strategy
    launched = "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    launched = launched or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if launched:
        return "ddp_find_unused_parameters_true"
    return "ddp_fork_find_unused_parameters_true" if accelerator == "cpu" else "ddp_spawn_find_unused_parameters_true"


def _load_ckpt(path: str | Path) -> dict[str, Any]:
    return torch.load(str(path), map_location="cpu", weights_only=False, mmap=True)


#: what a resumed run must share with the checkpoint it continues
RESUME_MUST_MATCH: tuple[str, ...] = ("method", "method_config", "landmark_names", "view", "eval_view", "data")
#: what may differ within ``method_config``: ``max_epochs`` may grow (a longer schedule), and with it the schedule a
#: method derives from it (the dilation-erosion U-Net's shrinking targets)
RESUME_MAY_CHANGE: frozenset[str] = frozenset({"max_epochs", "schedule"})


def check_resumable(checkpoint: str | Path, module: LandmarkModule) -> None:
    """Raise :class:`CheckpointMismatch` naming ``checkpoint`` and each setting in which the run that wrote it
    differs from ``module`` (the run about to continue it): Lightning restores the optimizer's state, so a changed
    learning rate or weight decay would be silently ignored, and a changed network fail in ``load_state_dict``."""
    def plain(value: Any) -> Any:  # tuples and lists alike, as JSON
        return json.loads(json.dumps(value, default=str))

    try:
        saved = _load_ckpt(checkpoint).get("hyper_parameters") or {}
    except Exception as exc:  # truncated, or no checkpoint: name the file (torch's message names none)
        raise CheckpointMismatch(f"{checkpoint}: not a readable checkpoint ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    differ = []
    for key in RESUME_MUST_MATCH:
        old, new = plain(saved.get(key)), plain(module.hparams.get(key))
        if key == "method_config" and isinstance(old, dict) and isinstance(new, dict):
            for name in sorted((set(old) | set(new)) - RESUME_MAY_CHANGE):
                if old.get(name) != new.get(name):
                    differ.append(f"{key}.{name}: {old.get(name)!r} -> {new.get(name)!r}")
        elif key == "data" and isinstance(old, dict) and isinstance(new, dict):
            # what both record (an older checkpoint records fewer of the training stream's settings)
            differ += [f"{key}.{name}: {old[name]!r} -> {new[name]!r}" for name in sorted(set(old) & set(new))
                       if old[name] != new[name]]
        elif old != new:
            differ.append(f"{key}: {old!r} -> {new!r}")
    if differ:
        raise CheckpointMismatch(f"{checkpoint}: cannot be resumed with other settings ({'; '.join(differ)}); "
                                 "resume with the settings it was trained with, or start a new run")


def _from_workers(ckpt_dir: Path, best: str) -> tuple[str, str, int, float | None]:
    """Best and last checkpoint paths, epochs trained and best score when the training ran in worker
    processes (their callbacks' state stays there; the checkpoints they wrote say it)."""
    best_path = Path(best) if best else ckpt_dir / "best.ckpt"
    last_path = ckpt_dir / "last.ckpt"
    best_s = str(best_path) if best_path.is_file() else ""
    last_s = str(last_path) if last_path.is_file() else ""
    epochs, score = 0, None
    if last_s:
        epochs = int(_load_ckpt(last_s).get("epoch", -1)) + 1
    if best_s:
        for key, state in _load_ckpt(best_s).get("callbacks", {}).items():
            if key.startswith("ModelCheckpoint") and MONITOR in key and state.get("best_model_score") is not None:
                score = float(state["best_model_score"])
    return best_s or last_s, last_s, epochs, score


def trainer_device(device: torch.device) -> tuple[str, Any]:
    """Lightning ``(accelerator, devices)`` for a torch device."""
    if device.type == "cuda":
        return "gpu", [device.index or 0]
    if device.type == "mps":
        return "mps", 1
    return "cpu", 1


def _moved_here(path: str, *folders: Path) -> str:
    """``path``, or the file of that name in one of ``folders`` when ``path`` is gone: Lightning restores the
    best checkpoint's absolute path from a resumed checkpoint, so a run folder moved (or renamed) between the
    interruption and ``--resume`` named a file that no longer exists (FileNotFoundError after training)."""
    if not path or Path(path).is_file():
        return path
    for folder in folders:
        if (Path(folder) / Path(path).name).is_file():
            return str(Path(folder) / Path(path).name)
    raise FileNotFoundError(f"{path}: the best checkpoint of the resumed run is gone (not in {', '.join(map(str, folders))})")


@dataclass
class FitResult:
    """What :func:`fit` returns: the module (best weights), paths and timings."""

    module: LandmarkModule
    trainer: pl.Trainer | None  # None when the training ran in another process (DDP from a notebook)
    best_checkpoint: str
    last_checkpoint: str
    train_seconds: float  # summed over resumed runs
    epochs: int
    history_csv: Path
    device: torch.device
    best_score: float | None = None  # best validation MRE (mm)
    peak_rss_mb: float = 0.0  # peak resident memory of the training (MiB), over resumed runs
    world_size: int = 1  # training processes (DDP: devices x num_nodes)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LandmarkModule:
    """A trained module from a checkpoint written by :func:`fit` (Lightning ``load_from_checkpoint``);
    a checkpoint of another format or lmlib version gives a :class:`CheckpointMismatch`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        meta = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... by what is wrong
        raise CheckpointMismatch(f"{path}: not a readable checkpoint ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); truncated by a full "
                                 "disk or an interrupted copy, or not a checkpoint at all") from None
    hp = meta.get("hyper_parameters", {}) if isinstance(meta, dict) else {}
    if "method" not in hp or "view" not in hp:
        raise CheckpointMismatch(f"{path}: not an lmlib checkpoint of format {CHECKPOINT_FORMAT} "
                                 f"(written by an older lmlib, or by another program); retrain it")
    try:
        module = LandmarkModule.load_from_checkpoint(str(path), map_location=map_location)
    except CheckpointMismatch as exc:
        raise CheckpointMismatch(f"{path}: {exc}") from None
    return module.eval()


def check_landmarks(module: LandmarkModule, samples: Sequence[Sample], source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatch` when the samples' landmarks are not those the model predicts."""
    for s in samples:
        if tuple(s.landmark_names) != module.landmark_names:
            raise CheckpointMismatch(
                f"{source}: trained for landmarks {list(module.landmark_names)[:5]}... "
                f"({len(module.landmark_names)}, dataset {module.hparams.get('data', {}).get('dataset', '?')!r}); "
                f"image {s.image_id} has {list(s.landmark_names)[:5]}... ({len(s.landmark_names)})")
        if s.ndim != module.method.spatial_dims:
            raise CheckpointMismatch(f"{source}: a {module.method.spatial_dims}D model; image {s.image_id} is {s.ndim}D")


#: the most compiled training-loss graphs in one process (LandmarkModule.training_loss; one compiled function serves
#: every method and run): a graph per method, value of its loss_epoch and batch shape (the last, shorter batch of an
#: epoch); beyond it a loss that needs a new graph runs eager (torch logs a warning)
LOSS_GRAPHS = 64


def _loss_value(method: LandmarkMethod, outputs: Outputs, batch: Mapping[str, torch.Tensor], epoch: int
                ) -> torch.Tensor:
    return method.training_loss(outputs, batch, epoch)[0]


@functools.cache
def _compiled_loss() -> Any:
    return torch.compile(_loss_value, dynamic=False)


def _import_inductor() -> None:
    """Import torch's compiler backend (inductor) once. It reads its kernel templates with ``open()`` in the locale's
    encoding, and its import fails under an ASCII ``LC_CTYPE`` (C), which a library may set mid-process (it happened
    in the test suite): import it under UTF-8, then restore the locale."""
    import locale

    if "torch._inductor.compile_fx" in sys.modules or locale.getpreferredencoding(False).lower() in ("utf-8", "utf8"):
        return
    before = locale.setlocale(locale.LC_CTYPE)
    try:
        locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
    except locale.Error:  # no UTF-8 locale on this system: import as it is (and fail with torch's own error)
        return
    try:
        import torch._inductor.compile_fx  # noqa: F401
    finally:
        locale.setlocale(locale.LC_CTYPE, before)


def compile_for_training(module: LandmarkModule, loss: bool = True) -> None:
    """Compile ``module``'s network in place with ``torch.compile`` (so its checkpoints keep the eager keys), and
    (``loss``) its training loss where the method allows it (:meth:`LandmarkModule.training_loss`): one graph per
    batch shape (the last batch of an epoch and validation compile once each) rather than dynamic shapes, whose
    kernels are slower. What ``fit(torch_compile=True)`` trains, and what the benchmark times."""
    _import_inductor()
    module.net.compile(dynamic=False)
    module._compile_loss = loss


def fit(method: LandmarkMethod, datamodule: LandmarkDataModule, output_dir: str | Path, max_epochs: int,
        device: str = "auto", seed: int = 0, resume: str | Path = "", callbacks: Sequence[Callback] = (),
        landmark_names: Sequence[str] | None = None, learning_rate: float | None = None,
        lr_schedule: str | None = None, weight_decay: float | None = None, check_val_every_n_epoch: int = 1,
        progress_refresh_rate: int | None = None, gradient_clip_val: float | None = None,
        precision: str = "32-true", checkpoint_dir: str | Path | None = None,
        data: dict[str, Any] | None = None, devices: int = 1, num_nodes: int = 1, strategy: str = "auto",
        progress: str = "bar", torch_compile: bool = False, select: str = "val") -> FitResult:
    """Train ``method`` on ``datamodule`` (train split; select on val by ``val/mre_mm``, or keep the last epoch).

    Writes into ``output_dir``: ``training_log/metrics.csv`` (+ ``hparams.yaml``) and
    ``checkpoints/{best,last}.ckpt`` (or into ``checkpoint_dir``). ``resume``: a checkpoint to continue
    from (its epoch, optimizer and scheduler state); the run then trains up to ``max_epochs`` in total,
    exactly as an uninterrupted run would (random streams derived from (seed, epoch): data order,
    augmentation, crops, jitter, global generators), keeps the earlier epochs in ``metrics.csv`` and
    sums ``train_seconds`` over the runs.
    ``learning_rate`` / ``lr_schedule`` / ``weight_decay`` override the method's optimizer settings (of the
    trained copy, ``result.module.method``; ``method`` itself is not changed).
    ``data``: provenance stored in the checkpoint (dataset name, spacing policy).
    ``progress``: ``bar`` (a live bar per epoch) or ``lines`` (a line every few epochs with the validation error,
    time per epoch and time left); ``progress_refresh_rate``: batches between bar updates (default: once per epoch).
    ``devices`` / ``num_nodes`` / ``strategy``: data-parallel training with Lightning DDP (processes per node,
    nodes; see :func:`ddp_strategy`): each process sees ``datamodule.batch_size`` images per step, so the
    global batch is ``batch_size * devices * num_nodes``; only rank 0 writes logs, checkpoints and figures, and
    this process continues with the best weights.
    ``torch_compile``: train the network compiled by ``torch.compile`` (in place, so the checkpoints' keys are
    the eager network's; the returned module is loaded from the best checkpoint, eager), and the training loss too
    where the method allows it (:func:`compile_for_training`).
    ``select``: ``"val"`` (``best.ckpt`` holds the epoch of lowest validation MRE) or ``"last"`` (``best.ckpt`` holds
    the last epoch and ``best_score`` is None: a refit whose val images are also training images, see
    :data:`lmlib.data.refit.FIT_SPLITS`).
    """
    if select not in SELECT:
        raise ValueError(f"select={select!r}: one of {SELECT}")
    if select == "val" and int(check_val_every_n_epoch) > int(max_epochs):
        # no epoch would be validated: best.ckpt would silently be the last epoch, with no validation error
        raise ValueError(f"check_val_every_n_epoch={check_val_every_n_epoch} > max_epochs={max_epochs}: no epoch is "
                         "validated, so none can be selected on val (select='last' keeps the last epoch)")
    world = int(devices) * int(num_nodes)
    if world > 1 and strategy == "auto" and in_notebook_kernel():
        return _fit_as_script({k: v for k, v in locals().items() if k != "world"})
    overrides = {"lr": learning_rate, "schedule": lr_schedule, "weight_decay": weight_decay}
    if any(v is not None for v in overrides.values()):  # on a copy: the caller's method keeps its settings
        method = copy.copy(method)
        method.optimizer = {**method.optimizer, **{k: v for k, v in overrides.items() if v is not None}}
    dev = setup(seed, device)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else out / "checkpoints"
    datamodule.setup()
    n_train, n_val = len(datamodule.datasets["train"]), len(datamodule.datasets["val"])
    if n_train == 0 or n_val == 0:
        raise ValueError(f"need train and val samples (got {n_train} train, {n_val} val)")
    names = landmark_names or datamodule.samples[0].landmark_names
    module = LandmarkModule.from_method(method, names, datamodule.view, datamodule.eval_view, max_epochs, data)
    if resume:
        check_resumable(resume, module)
    if torch_compile:
        compile_for_training(module)
    if datamodule.view.size is not None:
        from lmlib.methods.networks import check_input_size
        check_input_size(datamodule.view.size, method.size_multiple())
    n_batches = max(1, math.ceil(n_train / datamodule.batch_size))
    # best by validation error (select="last": the latest epoch); "last" every epoch (Lightning >= 2.5 writes
    # save_last only when the monitored checkpoint improves, so a second callback keeps the resumable latest state).
    # Both save at the end of the training epoch, after validation: a resume starts with the next epoch.
    # (select="last": no monitor; mode "max" only makes its state key differ from the "last" callback's, which
    # Lightning requires of two checkpoint callbacks; without a monitor the mode chooses nothing)
    checkpoint = _BestCheckpoint(dirpath=str(ckpt_dir), filename="best", monitor=MONITOR if select == "val" else None,
                                 mode="min" if select == "val" else "max", save_top_k=1, auto_insert_metric_name=False,
                                 save_on_train_epoch_end=True, enable_version_counter=False,
                                 resumed_from=Path(resume).parent if resume else None)
    latest = ModelCheckpoint(dirpath=str(ckpt_dir), filename="last", monitor=None, save_top_k=1,
                             save_on_train_epoch_end=True, enable_version_counter=False)
    clock = _Clock()
    accelerator, device_ids = trainer_device(dev)
    parallel = {} if world == 1 else {"devices": int(devices), "num_nodes": int(num_nodes),
                                      "strategy": ddp_strategy(strategy, accelerator)}
    trainer = pl.Trainer(
        max_epochs=max_epochs, accelerator=accelerator,
        precision=cast("_PRECISION_INPUT", precision),  # one of PRECISIONS (parameters.py); Lightning checks it
        **({"devices": device_ids} | parallel),
        logger=_history_logger(out, resume),
        callbacks=[clock, _EpochSeeds(seed), checkpoint, latest,
                   progress_callback(n_batches, progress_refresh_rate, progress, select == "last"),
                   *callbacks],
        enable_progress_bar=progress != "lines",
        check_val_every_n_epoch=check_val_every_n_epoch, num_sanity_val_steps=0, log_every_n_steps=1,
        enable_model_summary=True, gradient_clip_val=gradient_clip_val, deterministic=False,
        default_root_dir=str(out), plugins=[AtomicCheckpointIO()])
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    seconds, peak = clock.total(), module.peak_rss_mb()
    best = checkpoint.best_model_path or latest.best_model_path
    last = latest.best_model_path
    epochs = int(trainer.current_epoch)
    score = float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None
    if clock.start is None:  # the epochs ran in worker processes (DDP): read what they saved
        best, last, epochs, score = _from_workers(ckpt_dir, best)
        before = float(_load_ckpt(resume).get("train_seconds", 0.0)) if resume else 0.0
        seconds, peak = before + time.perf_counter() - started, max(peak, peak_rss_mb(children=True))
    best = _moved_here(best, ckpt_dir, Path(resume).parent if resume else ckpt_dir)
    if best:  # the selected weights AND the decoding state saved with them
        module = LandmarkModule.load_from_checkpoint(best, map_location="cpu")
    module.to(dev).eval()
    return FitResult(module, trainer, best, last, seconds, epochs, out / "training_log" / "metrics.csv", dev, score,
                     peak, world)


@dataclass
class Predictions:
    """World-mm predictions for samples (ORIGINAL image coordinates) and what produced them."""

    world_mm: list[np.ndarray]  # per sample (N, D), world mm, (x, y[, z]); NaN where not predicted
    confidence: list[np.ndarray]  # per sample (N,)
    seconds_per_image: float  # resampling + network + decoding, per image
    spread_mm: list[np.ndarray] | None = None  # per sample (N,): the output's own spread (mm), NaN where none


def predict(model: LandmarkModule | str | Path, samples: Sequence[Sample], batch_size: int = 4,
            device: str | torch.device | None = None,
            centres: Mapping[str, np.ndarray] | None = None, view: ViewSpec | None = None,
            sources: PatchSources | None = None) -> Predictions:
    """Predict landmarks of ``samples`` in world mm of the original images.

    ``model``: a trained module or the path of a checkpoint written by :func:`fit` (nothing else is
    needed: the checkpoint holds the method, its views and landmark names). Each image is resampled
    onto the evaluation view's grid exactly as in validation, decoded to sub-pixel grid indices, and
    mapped back through that grid to world mm. ``centres``: ``{image_id: (N, D) world mm}`` for patch
    views (a previous stage's predictions). Each image is prepared once (normalised, smoothed) even when
    it yields one patch per landmark, and ``sources`` (:class:`~lmlib.data.loaders.PatchSources`, for a patch view)
    shares that preparation with the other stages of a cascade given the same one. Timing includes resampling (and
    the preparation when this call makes it). ``batch_size``: items per batch; for per-landmark nets that run
    grouped, images per batch (all their patches).
    """
    source = str(model) if not isinstance(model, LandmarkModule) else "model"
    module = model if isinstance(model, LandmarkModule) else load_checkpoint(model)
    check_landmarks(module, samples, source)
    if (view or module.eval_view).kind == "patch" and centres is None:
        # the dataset would centre the patches on the ground truth (NaN for new images): a silent wrong number
        raise ValueError(f"{source}: a patch stage predicts around an earlier stage's predictions (centres), and "
                         "none were given: predict with the cascade's run folder (or its stage's folder, which "
                         "chains the stages up to it)")
    dev = torch.device(device) if device is not None else module.device
    module = module.to(dev).eval()
    n, d = len(module.landmark_names), module.method.spatial_dims
    world = [np.full((n, d), np.nan) for _ in samples]
    conf = [np.full(n, np.nan) for _ in samples]
    spread = [np.full(n, np.nan) for _ in samples]
    start = time.perf_counter()
    ds = LandmarkDataset(samples, view=view or module.eval_view,
                         centres=dict(centres) if centres is not None else None, cache=True, sources=sources)
    # per-landmark nets that run grouped (lmlib.methods.networks.PerLandmark): a batch holds every patch of
    # batch_size images (one round per image); otherwise batch_size items
    grouped = getattr(module.net, "group", None) is not None and ds.view.kind == "patch" and ds.view.per_landmark
    step = batch_size * len(ds.served) if grouped else batch_size
    for lo in range(0, len(ds), step):
        batch = collate_landmarks([ds[k] for k in range(lo, min(lo + step, len(ds)))])
        coords, c, outputs = module.predict_batch(batch)
        w = to_world(coords.cpu(), batch["index_to_world"]).numpy()
        sp = spread_to_mm(module.method.spread(outputs, coords, batch).cpu(), batch["index_to_world"]).numpy()
        for b in range(len(w)):
            ids = batch["landmark_ids"][b].numpy()
            world[int(batch["index"][b])][ids] = w[b]
            conf[int(batch["index"][b])][ids] = c[b].cpu().double().numpy()
            spread[int(batch["index"][b])][ids] = sp[b]
    seconds = (time.perf_counter() - start) / max(1, len(samples))
    kept = [int(k) for k in module.hparams.get("kept_previous") or ()]  # left to the previous stage
    return without_landmarks(Predictions(world, conf, seconds, spread), kept)


def without_landmarks(pred: Predictions, landmarks: Sequence[int]) -> Predictions:
    """``pred`` with the ``landmarks`` (indices) unpredicted: NaN, which a cascade fills from the previous stage."""
    if not len(landmarks):
        return pred
    idx = [int(k) for k in landmarks]

    def masked(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        out = [a.copy() for a in arrays]
        for a in out:
            a[idx] = np.nan
        return out

    return Predictions(masked(pred.world_mm), masked(pred.confidence), pred.seconds_per_image,
                       masked(pred.spread_mm) if pred.spread_mm is not None else None)


def set_kept_previous(module: LandmarkModule, kept: Sequence[int], checkpoint: str | Path | None = None) -> None:
    """Record on ``module`` (and in ``checkpoint``'s hyper-parameters, rewritten atomically) the landmark indices
    whose previous-stage predictions it keeps (see :class:`LandmarkModule`)."""
    module.hparams["kept_previous"] = [int(k) for k in kept]
    if checkpoint is None:
        return
    path = Path(checkpoint)
    ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    ckpt.setdefault("hyper_parameters", {})["kept_previous"] = [int(k) for k in kept]
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(ckpt, str(tmp))
    os.replace(tmp, path)
