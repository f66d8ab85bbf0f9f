"""One Lightning module for every method, plus ``fit`` / ``predict`` helpers used by the notebooks.

:class:`LandmarkModule` wraps a :class:`~lmlib.methods.LandmarkMethod`: it builds the method's network,
encodes targets on each batch (on the device, given the epoch), computes the method's loss, and in
validation decodes coordinates and measures the radial error in **world mm** against the sample's
original (unaugmented) landmarks, through the network grid's geometry
(:meth:`lmlib.data.loaders.LandmarkDataset.to_world`). Logged per epoch (CSVLogger, ``training_log/metrics.csv``):
``train/loss``, ``val/loss``, ``val/mre_mm``, ``val/dice``, per landmark ``val/err_mm/<name>`` and
``val/dice/<name>``, ``lr``, and the method's ``epoch_info`` (e.g. the mask radius).

:func:`fit` sets up the run (seed, device, flush-denormal on CPU via :func:`lmlib.runtime.setup`), a
Trainer with a TQDM progress bar, ``ModelCheckpoint`` on ``val/mre_mm`` (``checkpoints/best.ckpt``
and ``last.ckpt``), resumes from ``resume`` (a ``.ckpt`` path) when given, and returns the module
with the best weights loaded. :func:`predict` maps predictions back to world mm in the ORIGINAL image.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from lmlib.data.loaders import LandmarkDataModule, LandmarkDataset, collate_landmarks
from lmlib.methods import LandmarkMethod, build_method
from lmlib.runtime import setup
from lmlib.data.sample import Sample

MONITOR = "val/mre_mm"


class EpochProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar for the training epochs only (validation bars hidden), refreshed every
    ``refresh_rate`` batches: short enough for notebook outputs, still live in a terminal."""

    def init_validation_tqdm(self):  # type: ignore[override]
        bar = super().init_validation_tqdm()
        bar.disable = True
        return bar


def _eval_dataset(trainer: pl.Trainer | None, split: str) -> LandmarkDataset | None:
    """The LandmarkDataset behind the trainer's val/test loader (None when unknown)."""
    if trainer is None:
        return None
    dm = getattr(trainer, "datamodule", None)
    if dm is not None and getattr(dm, "datasets", None) and split in dm.datasets:
        return dm.datasets[split]
    loaders = trainer.val_dataloaders if split == "val" else trainer.test_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    ds = getattr(loader, "dataset", None)
    return ds if isinstance(ds, LandmarkDataset) else None


class LandmarkModule(pl.LightningModule):
    """Training/validation of any :class:`LandmarkMethod` (see the module docstring).

    Args:
        method: the method (its ``config()`` is saved in checkpoints as hyperparameters).
        learning_rate: Adam learning rate.
        weight_decay: Adam weight decay.
        lr_schedule: ``"cosine"`` (to 1% of the rate over ``max_epochs``) or ``"constant"`` (the seed).
        max_epochs: horizon of the cosine schedule.
        landmark_names: for the per-landmark log columns (default ``lm0``, ``lm1``...).
    """

    def __init__(self, method: LandmarkMethod, learning_rate: float = 1e-3, weight_decay: float = 0.0,
                 lr_schedule: str = "cosine", max_epochs: int = 100,
                 landmark_names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.method = method
        self.net = method.build_network()
        self.landmark_names = tuple(landmark_names or (f"lm{k}" for k in range(method.n_landmarks)))
        if len(self.landmark_names) != method.n_landmarks:
            raise ValueError(f"{len(self.landmark_names)} landmark names for {method.n_landmarks} outputs")
        self.save_hyperparameters({"method": method.name, "method_config": method.config(),
                                   "learning_rate": learning_rate, "weight_decay": weight_decay,
                                   "lr_schedule": lr_schedule, "max_epochs": max_epochs,
                                   "landmark_names": list(self.landmark_names)})
        self.trained_epochs = 0  # epochs finished; decoding state of epoch-dependent methods
        self._val: list[dict[str, torch.Tensor]] = []

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "LandmarkModule":
        """Rebuild method and module from a checkpoint written by :func:`fit`."""
        ckpt = torch.load(str(path), map_location=map_location, weights_only=False)
        hp = dict(ckpt["hyper_parameters"])
        method = build_method(hp.pop("method"), **hp.pop("method_config"))
        module = cls(method, **hp)
        module.load_state_dict(ckpt["state_dict"])
        module.trained_epochs = int(ckpt.get("trained_epochs", ckpt.get("epoch", 0) + 1))
        return module

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["trained_epochs"] = int(self.current_epoch) + 1

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.trained_epochs = int(checkpoint.get("trained_epochs", 0))

    @property
    def decode_epoch(self) -> int:
        """Epoch whose target state decoding should assume (the current one while training)."""
        if self._trainer is not None:
            return int(self.current_epoch)
        return max(0, self.trained_epochs - 1)

    # ------------------------------------------------------------------ steps
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)

    def _targets_and_loss(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict, torch.Tensor]:
        image, landmarks, valid = batch["image"], batch["landmarks"], batch["valid"]
        size = tuple(image.shape[2:])
        targets = self.method.encode_targets(landmarks, valid, size, epoch)
        output = self(image)
        return output, targets, self.method.loss(output, targets, valid, epoch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        _, _, loss = self._targets_and_loss(batch, int(self.current_epoch))
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch["image"]))
        return loss

    def on_train_epoch_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        size = getattr(dm, "target_size", None)
        if size is not None:
            for key, value in self.method.epoch_info(int(self.current_epoch), tuple(size)).items():
                self.log(f"train/{key}", value, on_step=False, on_epoch=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=False, on_epoch=True)

    def on_train_epoch_end(self) -> None:
        self.trained_epochs = int(self.current_epoch) + 1

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        epoch = int(self.current_epoch)
        output, targets, loss = self._targets_and_loss(batch, epoch)
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=False, batch_size=len(batch["image"]))
        coords, _ = self.method.decode(output, epoch)
        dice = self.method.dice(output, targets, batch["valid"])
        err = self._errors_mm(batch, coords, "val")
        rec = {"err": err.cpu()}
        if dice is not None:
            rec["dice"] = dice.detach().float().cpu()
        self._val.append(rec)

    def _errors_mm(self, batch: dict[str, Any], coords: torch.Tensor, split: str) -> torch.Tensor:
        """Radial errors ``(B, N)`` in world mm (NaN where the reference is invalid)."""
        ds = _eval_dataset(self._trainer, split)
        pred = coords.detach().cpu().double().numpy()
        out = np.full(pred.shape[:2], np.nan)
        for b in range(pred.shape[0]):
            if ds is not None:
                k = int(batch["index"][b])
                world = ds.to_world(k, pred[b])
                gt = ds.preprocessed(k).landmarks_mm
            else:  # no geometry known: pixel errors on the grid
                world = pred[b]
                gt = batch["landmarks"][b].cpu().double().numpy()
                gt[~batch["valid"][b].cpu().numpy()] = np.nan
            out[b] = np.sqrt(np.sum((world - gt) ** 2, axis=-1))
        return torch.as_tensor(out)

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        err = torch.cat([r["err"] for r in self._val]).double()
        self.log(MONITOR, float(np.nanmean(err.numpy())) if np.isfinite(err.numpy()).any() else math.inf,
                 prog_bar=True)
        per_lm = np.nanmean(np.where(np.isfinite(err.numpy()), err.numpy(), np.nan), axis=0) \
            if np.isfinite(err.numpy()).any() else np.full(err.shape[1], np.nan)
        for name, v in zip(self.landmark_names, per_lm):
            self.log(f"val/err_mm/{name}", float(v))
        if all("dice" in r for r in self._val):
            dice = torch.cat([r["dice"] for r in self._val]).double().numpy()
            if np.isfinite(dice).any():
                self.log("val/dice", float(np.nanmean(dice)), prog_bar=True)
                with np.errstate(all="ignore"):
                    for name, v in zip(self.landmark_names, np.nanmean(dice, axis=0)):
                        self.log(f"val/dice/{name}", float(v))
        self._val.clear()

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.Adam(self.parameters(), lr=hp["learning_rate"], weight_decay=hp["weight_decay"])
        if hp["lr_schedule"] == "constant":
            return opt
        if hp["lr_schedule"] != "cosine":
            raise ValueError(f"unknown lr_schedule {hp['lr_schedule']!r}")
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(hp["max_epochs"])),
                                                           eta_min=0.01 * hp["learning_rate"])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict_index(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Network-grid coordinates ``(B, N, D)``, confidences ``(B, N)`` and maps ``(B, N, *size)``."""
        output = self(image.to(self.device))
        coords, conf = self.method.decode(output, self.decode_epoch)
        return coords, conf, self.method.maps(output)


def trainer_device(device: torch.device) -> tuple[str, Any]:
    """Lightning ``(accelerator, devices)`` for a torch device."""
    if device.type == "cuda":
        return "gpu", [device.index or 0]
    if device.type == "mps":
        return "mps", 1
    return "cpu", 1


@dataclass
class FitResult:
    """What :func:`fit` returns: the module (best weights), the trainer, paths and timings."""

    module: LandmarkModule
    trainer: pl.Trainer
    best_checkpoint: str
    last_checkpoint: str
    train_seconds: float
    epochs: int
    history_csv: Path
    device: torch.device
    extra: dict[str, Any] = field(default_factory=dict)


def fit(method: LandmarkMethod, datamodule: LandmarkDataModule, output_dir: str | Path, max_epochs: int,
        learning_rate: float = 1e-3, device: str = "auto", seed: int = 0, resume: str | Path = "",
        lr_schedule: str = "cosine", weight_decay: float = 0.0, callbacks: Sequence[Callback] = (),
        landmark_names: Sequence[str] | None = None, check_val_every_n_epoch: int = 1,
        progress_refresh_rate: int | None = None, gradient_clip_val: float | None = None,
        precision: str = "32-true", checkpoint_dir: str | Path | None = None) -> FitResult:
    """Train ``method`` on ``datamodule`` (train split; select on val by ``val/mre_mm``).

    Writes into ``output_dir``: ``training_log/metrics.csv`` (+ ``hparams.yaml``) and
    ``checkpoints/{best,last}.ckpt`` (or into ``checkpoint_dir``). ``resume``: a checkpoint to continue
    from (its epoch, optimizer and scheduler state); the run then trains up to ``max_epochs`` in total.
    ``progress_refresh_rate``: batches between progress-bar updates (default: once per epoch, which
    keeps notebook outputs short).
    """
    dev = setup(seed, device)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else out / "checkpoints"
    datamodule.setup()
    n_train = len(datamodule.datasets["train"])
    if n_train == 0 or len(datamodule.datasets["val"]) == 0:
        raise ValueError(f"need train and val samples (got {n_train} train, {len(datamodule.datasets['val'])} val)")
    names = landmark_names or datamodule.samples[0].landmark_names
    module = LandmarkModule(method, learning_rate, weight_decay, lr_schedule, max_epochs, names)
    if datamodule.target_size is not None:
        from lmlib.methods.networks import check_input_size
        check_input_size(datamodule.target_size, method.size_multiple())
    n_batches = max(1, math.ceil(n_train / datamodule.batch_size))
    refresh = progress_refresh_rate or n_batches
    # best by validation error; "last" every epoch (Lightning >= 2.5 writes save_last only when the
    # monitored checkpoint improves, so a second callback keeps the resumable latest state). Both save
    # at the end of the training epoch, after validation: a resume starts with the next epoch.
    checkpoint = ModelCheckpoint(dirpath=str(ckpt_dir), filename="best", monitor=MONITOR, mode="min",
                                 save_top_k=1, auto_insert_metric_name=False, save_on_train_epoch_end=True)
    latest = ModelCheckpoint(dirpath=str(ckpt_dir), filename="last", monitor=None, save_top_k=1,
                             save_on_train_epoch_end=True)
    accelerator, devices = trainer_device(dev)
    trainer = pl.Trainer(
        max_epochs=max_epochs, accelerator=accelerator, devices=devices, precision=precision,
        logger=CSVLogger(save_dir=str(out), name="", version="training_log"),
        callbacks=[checkpoint, latest, EpochProgressBar(refresh_rate=refresh), *callbacks],
        check_val_every_n_epoch=check_val_every_n_epoch, num_sanity_val_steps=0, log_every_n_steps=1,
        enable_model_summary=True, gradient_clip_val=gradient_clip_val, deterministic=False,
        default_root_dir=str(out))
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    seconds = time.perf_counter() - start
    best = checkpoint.best_model_path or latest.best_model_path
    last = latest.best_model_path
    if best:
        state = torch.load(best, map_location="cpu", weights_only=False)
        module.load_state_dict(state["state_dict"])
        module.trained_epochs = int(state.get("trained_epochs", module.trained_epochs))
    module.to(dev).eval()
    history = out / "training_log" / "metrics.csv"
    return FitResult(module, trainer, best, last, seconds, int(trainer.current_epoch), history, dev,
                     {"best_score": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None
                      else None})


@dataclass
class Predictions:
    """World-mm predictions for samples (ORIGINAL image coordinates) and what produced them."""

    world_mm: list[np.ndarray]  # per sample (N, D), world mm, (x, y[, z])
    index: list[np.ndarray]  # per sample (N, D), network-grid index
    confidence: list[np.ndarray]  # per sample (N,)
    seconds_per_image: float  # preprocessing + network + decoding, per image


def predict(module: LandmarkModule, samples: Sequence[Sample], target_size: Sequence[int] | None = None,
            target_spacing: Sequence[float] | None = None, normalize: str | None = "zscore",
            batch_size: int = 4, device: str | torch.device | None = None) -> Predictions:
    """Predict landmarks of ``samples`` in world mm of the original images.

    Each image is preprocessed onto the network grid exactly as in training (same ``target_size`` /
    ``target_spacing`` / ``normalize``), decoded to sub-pixel grid indices, and mapped back through the
    grid's geometry (resize, crop/pad) to world mm. Timing includes preprocessing.
    """
    dev = torch.device(device) if device is not None else module.device
    module = module.to(dev).eval()
    start = time.perf_counter()
    ds = LandmarkDataset(samples, target_size, target_spacing, normalize, cache=True)
    world, index, conf = [], [], []
    for lo in range(0, len(ds), batch_size):
        items = [ds[k] for k in range(lo, min(lo + batch_size, len(ds)))]
        batch = collate_landmarks(items)
        coords, c, _ = module.predict_index(batch["image"])
        for b, item in enumerate(items):
            idx = coords[b].cpu().double().numpy()
            world.append(ds.to_world(item["index"], idx))
            index.append(idx)
            conf.append(c[b].cpu().numpy())
    seconds = (time.perf_counter() - start) / max(1, len(samples))
    return Predictions(world, index, conf, seconds)
