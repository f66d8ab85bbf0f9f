"""Shared training: a tiny run learns; decoding state travels with the weights (predictions after
``fit`` equal those of the best checkpoint loaded in a fresh process); checkpoints describe
themselves and refuse mismatched data; resume continues; figures are written."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lmlib.data.loaders import LandmarkDataModule
from lmlib.data.phantoms import make_phantom_dataset
from lmlib.data.transforms import build_augmentation
from lmlib.engine.training import CheckpointMismatch, LandmarkModule, fit, load_checkpoint, predict, trainer_device
from lmlib.engine.training_figures import OverlayCallback, plot_training_curves, read_history
from lmlib.methods import build_method
from lmlib.methods.base import DEFAULT_OPTIMIZER

SIZE = (64, 64)
NET = {"channels": (8, 16, 32), "num_res_units": 1}
EPOCHS = 8
PHANTOMS = dict(n_images=40, seed=3, size=SIZE, n_landmarks=3)


@pytest.fixture(scope="module")
def samples():
    return make_phantom_dataset(2, **PHANTOMS)


def _dm(samples, batch_size=2):
    return LandmarkDataModule(samples, target_size=SIZE, batch_size=batch_size, seed=0)


class WorseAtTheEnd(Callback):
    """Reports a huge validation error in the last epoch, so the best checkpoint is an earlier epoch
    (whose mask radius differs from the last epoch's)."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == trainer.max_epochs - 1:
            trainer.callback_metrics["val/mre_mm"] = torch.tensor(1e9)


@pytest.fixture(scope="module")
def trained(samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    # radius shrinks every epoch (64, 56, ... seed units): the decoding window depends on the epoch
    method = build_method("dilation_erosion", spatial_dims=2, n_landmarks=3, max_epochs=EPOCHS, network=NET,
                          schedule={"start": 64, "step": 8, "stop": 8, "every": 1})
    result = fit(method, _dm(samples), out, max_epochs=EPOCHS, learning_rate=3e-3, device="cpu", seed=0,
                 callbacks=[OverlayCallback(out, every_n_epochs=4, n_images=2), WorseAtTheEnd()])
    assert method.optimizer["lr"] == DEFAULT_OPTIMIZER["lr"] != 3e-3  # fit overrode a copy, not the caller's method
    assert result.module.method.optimizer["lr"] == 3e-3
    return out, result


def test_tiny_run_reduces_loss_and_val_error(trained):
    out, result = trained
    hist = read_history(result.history_csv)
    assert list(hist.index) == list(range(EPOCHS))
    assert hist["val/mre_mm"].iloc[:-1].min() < 0.7 * hist["val/mre_mm"].iloc[0]
    assert {"val/dice", "train/mask_radius_px", "val/err_mm/" + result.module.landmark_names[0]} <= set(hist.columns)
    assert (out / "checkpoints" / "best.ckpt").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    assert result.train_seconds > 0 and result.device.type == "cpu"


def test_decoding_state_is_that_of_the_selected_weights(trained):
    """The bug: decoding used the trainer's last epoch, not the epoch of the loaded best checkpoint."""
    _, result = trained
    best_epoch = torch.load(result.best_checkpoint, map_location="cpu", weights_only=False)["epoch"]
    assert best_epoch < EPOCHS - 1  # the fixture made the last epoch the worst
    assert result.module.decode_epoch == best_epoch
    method = result.module.method
    assert method.radius(result.module.decode_epoch, SIZE) != method.radius(EPOCHS - 1, SIZE)


@pytest.mark.slow
def test_predictions_after_fit_equal_a_fresh_process_loading_best(trained, samples, tmp_path):
    _, result = trained
    test = [s for s in samples if s.meta["split"] == "test"]
    here = np.stack(predict(result.module, test).world_mm)
    script = (
        "import json, sys, numpy as np\n"
        "from lmlib.data.phantoms import make_phantom_dataset\n"
        "from lmlib.engine.training import predict\n"
        "s = [x for x in make_phantom_dataset(2, **json.loads(sys.argv[2])) if x.meta['split'] == 'test']\n"
        "np.save(sys.argv[3], np.stack(predict(sys.argv[1], s).world_mm))\n")
    phantoms = {**PHANTOMS, "size": list(SIZE)}
    subprocess.run([sys.executable, "-c", script, result.best_checkpoint, json.dumps(phantoms), str(tmp_path / "p.npy")],
                   check=True)
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), here, atol=1e-6, equal_nan=True)


def test_training_figures_overlays_and_gif(trained):
    out, result = trained
    figs = plot_training_curves(result.history_csv, out)
    for name in ("fig_loss.png", "fig_mean_error.png", "fig_dice.png", "fig_mean_error_per_landmark.png",
                 "fig_dice_per_landmark.png"):
        assert name in figs and (out / name).is_file()
    frames = sorted(p.name for p in (out / "overlays").glob("*.png"))
    assert frames == ["epoch_001.png", "epoch_004.png", "epoch_008.png"]
    gif = out / "fig_training_progress.gif"
    assert gif.is_file() and 0 < gif.stat().st_size < 1_000_000


def test_predict_maps_back_through_resize(trained, samples):
    """Upsampled originals (2x) predicted on the 64-px grid land on the same world positions."""
    from lmlib.data.grids import preprocess

    _, result = trained
    s = [x for x in samples if x.meta["split"] == "test"][0]
    big = preprocess(s, target_size=(128, 128), normalize=None)
    a = predict(result.module, [s]).world_mm[0]
    b = predict(result.module, [big]).world_mm[0]
    # a wrong scale or offset moves every landmark by tens of px; a weak tiny model may flip one
    assert np.nanmedian(np.linalg.norm(a - b, axis=1)) < 2.0 * s.geometry.spacing.max()


def test_checkpoint_describes_itself(trained):
    _, result = trained
    hp = torch.load(result.best_checkpoint, map_location="cpu", weights_only=False)["hyper_parameters"]
    assert hp["method"] == "dilation_erosion" and hp["landmark_names"] == list(result.module.landmark_names)
    assert hp["view"]["size"] == list(SIZE) or tuple(hp["view"]["size"]) == SIZE
    assert hp["lmlib_version"] and hp["checkpoint_format"] >= 2
    module = load_checkpoint(result.best_checkpoint)
    x = {"image": torch.randn(1, 1, *SIZE)}
    with torch.no_grad():
        torch.testing.assert_close(module(x), result.module.cpu()(x))


def test_checkpoint_refuses_other_landmarks_and_formats(trained, tmp_path):
    _, result = trained
    other = make_phantom_dataset(2, n_images=5, seed=1, size=SIZE, n_landmarks=4)
    with pytest.raises(CheckpointMismatch, match="trained for landmarks"):
        predict(result.best_checkpoint, other)
    ckpt = torch.load(result.best_checkpoint, map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["checkpoint_format"] = 1
    torch.save(ckpt, tmp_path / "old.ckpt")
    with pytest.raises(CheckpointMismatch, match="format 1"):
        load_checkpoint(tmp_path / "old.ckpt")


def test_resume_continues_from_saved_epoch(samples, tmp_path):
    method = build_method("heatmap_unet", spatial_dims=2, n_landmarks=3, sigma=2.0, network=NET)
    first = fit(method, _dm(samples), tmp_path / "a", max_epochs=2, device="cpu")
    assert first.epochs == 2
    second = fit(method, _dm(samples), tmp_path / "b", max_epochs=3, device="cpu", resume=first.last_checkpoint)
    hist = pd.read_csv(second.history_csv)
    # only the new epoch ran; the history of the resumed run (another folder here) is carried over
    assert sorted(hist.dropna(subset=["train/loss"])["epoch"].astype(int)) == [0, 1, 2]
    old = pd.read_csv(first.history_csv)
    pd.testing.assert_frame_equal(hist.iloc[:len(old)][old.columns], old, check_dtype=False)
    assert second.epochs == 3
    assert second.train_seconds > first.train_seconds  # training time summed across the resume
    # resuming a run that had finished trains nothing and keeps its time (it reported ~0 s before)
    again = fit(method, _dm(samples), tmp_path / "c", max_epochs=3, device="cpu", resume=second.last_checkpoint)
    saved = float(torch.load(second.last_checkpoint, map_location="cpu", weights_only=False)["train_seconds"])
    assert again.epochs == 3 and again.train_seconds >= saved > 0.5 * second.train_seconds
    # ... and the peak memory of its training, not the smaller one of the resuming process (it reported
    # the latter before): a checkpoint saying 10 TB must come back as the run's peak
    ckpt = torch.load(second.last_checkpoint, map_location="cpu", weights_only=False)
    assert 0 < ckpt["peak_rss_mb"] < 1e6
    ckpt["peak_rss_mb"] = 1e7
    torch.save(ckpt, tmp_path / "big.ckpt")
    again = fit(method, _dm(samples), tmp_path / "d", max_epochs=3, device="cpu", resume=tmp_path / "big.ckpt")
    assert again.peak_rss_mb == 1e7


def test_a_resumed_run_with_a_longer_schedule_uses_its_rate_from_the_first_epoch(samples, tmp_path):
    """The optimizer's restored rate was the old schedule's (cosine over 2 epochs: its floor at epoch 2), so the
    first resumed epoch of a run lengthened to 4 epochs trained at it."""
    method = build_method("heatmap_unet", spatial_dims=2, n_landmarks=3, sigma=2.0, network=NET)
    first = fit(method, _dm(samples), tmp_path / "a", max_epochs=2, device="cpu")
    second = fit(method, _dm(samples), tmp_path / "b", max_epochs=4, device="cpu", resume=first.last_checkpoint)
    lr = pd.read_csv(second.history_csv).dropna(subset=["lr"]).set_index("epoch")["lr"]
    conf = method.configure_optimizers([torch.nn.Parameter(torch.zeros(1))], max_epochs=4)
    sched = conf["lr_scheduler"]["scheduler"]
    expected = []
    for _ in range(4):
        expected.append(sched.optimizer.param_groups[0]["lr"])
        sched.step()
    np.testing.assert_allclose(lr.loc[[2, 3]].to_numpy(), expected[2:], rtol=1e-6)


def test_a_run_folder_moved_before_resume_finds_its_best_checkpoint(samples, tmp_path):
    """A checkpoint names its best checkpoint by absolute path: after the scratch folder was moved, --resume
    trained and then failed FileNotFoundError on the old path (seen moving a hand-xray run between worktrees)."""
    import shutil

    method = build_method("heatmap_unet", spatial_dims=2, n_landmarks=3, sigma=2.0, network=NET)
    fit(method, _dm(samples), tmp_path / "a", max_epochs=1, device="cpu")
    shutil.move(str(tmp_path / "a"), str(tmp_path / "moved"))
    folder = tmp_path / "moved" / "checkpoints"
    # a finished stage of a cascade resumes without training (no new best is saved to replace the old path)
    again = fit(method, _dm(samples), tmp_path / "moved", max_epochs=1, device="cpu", resume=folder / "last.ckpt")
    assert again.epochs == 1 and Path(again.best_checkpoint).parent == folder


def test_a_full_disk_mid_checkpoint_keeps_the_last_good_one_resumable(samples, tmp_path, monkeypatch):
    """Lightning wrote last.ckpt in place: a full disk left it torn and --resume failed "checkpoint file is
    corrupted" (issue 25). Writes now go to a temporary file renamed over the target."""
    import lightning.fabric.plugins.io.torch_io as torch_io

    method = build_method("heatmap_unet", spatial_dims=2, n_landmarks=3, sigma=2.0, network=NET)
    real, calls = torch_io._atomic_save, []

    def disk_full_on_the_second_last(checkpoint, path):  # epoch 0 writes last; epoch 1's last fails half-way
        calls.append(str(path))
        if sum("last.ckpt" in c for c in calls) == 2:
            with open(path, "wb") as handle:
                handle.write(b"torn")  # what a full disk leaves half-way
            raise OSError(28, "No space left on device")
        real(checkpoint, path)

    monkeypatch.setattr(torch_io, "_atomic_save", disk_full_on_the_second_last)
    with pytest.raises(OSError, match="No space left"):
        fit(method, _dm(samples), tmp_path / "a", max_epochs=3, device="cpu")
    monkeypatch.setattr(torch_io, "_atomic_save", real)
    folder = tmp_path / "a" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]  # no temporary file left
    assert torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 0
    again = fit(method, _dm(samples), tmp_path / "a", max_epochs=3, device="cpu", resume=folder / "last.ckpt")
    assert again.epochs == 3


# ------------------------------------------------------------------ exact resume
RESUME_EPOCHS, KILL_AT = 4, 2


class Killed(RuntimeError):
    """Raised by :class:`KillAt` in place of a kill."""


class KillAt(Callback):
    """Stands in for a killed job: raises at the start of epoch ``epoch`` (``last.ckpt`` then holds the
    epoch before), with the same ``max_epochs`` (schedule horizon) as the uninterrupted run."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise Killed(f"killed at epoch {self.epoch}")


class EpochTimes(Callback):
    """Wall time from the start of the first training epoch to the end of the last one of a fit."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.end: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter() if self.start is None else self.start

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.end = time.perf_counter()


def _aug_fit(samples, out, resume="", callbacks=()):
    """A tiny run with augmentation (affine + intensity) and shuffling on."""
    method = build_method("heatmap_unet", spatial_dims=2, n_landmarks=3, sigma=2.0, network=NET)
    dm = LandmarkDataModule(samples, target_size=SIZE, batch_size=4, seed=0, shuffle=True,
                            augmentation=build_augmentation(2, seed=0))
    return fit(method, dm, out, max_epochs=RESUME_EPOCHS, learning_rate=3e-3, device="cpu", seed=0,
               resume=resume, callbacks=callbacks)


@pytest.fixture(scope="module")
def resumed(samples, tmp_path_factory):
    """An uninterrupted run, a run killed at epoch KILL_AT and resumed from its last.ckpt (same folder)."""
    full = _aug_fit(samples, tmp_path_factory.mktemp("full"))
    out = tmp_path_factory.mktemp("killed")
    with pytest.raises(Killed):
        _aug_fit(samples, out, callbacks=[KillAt(KILL_AT)])
    last = out / "checkpoints" / "last.ckpt"
    before = {"history": pd.read_csv(out / "training_log" / "metrics.csv"),
              "ckpt": torch.load(last, map_location="cpu", weights_only=False)}
    times = EpochTimes()
    second = _aug_fit(samples, out, resume=last, callbacks=[times])
    return full, before, second, times


def _test_predictions(result, samples) -> np.ndarray:
    return np.stack(predict(result.module, [s for s in samples if s.meta["split"] == "test"]).world_mm)


def test_resume_continues_the_random_streams(resumed, samples):
    """Killed and resumed from last.ckpt = uninterrupted (data order, augmentation, crop streams)."""
    full, before, second, _ = resumed
    assert before["ckpt"]["epoch"] == KILL_AT - 1 and second.epochs == RESUME_EPOCHS
    a, b = read_history(full.history_csv).loc[KILL_AT:], read_history(second.history_csv).loc[KILL_AT:]
    print("val/mre_mm uninterrupted", a["val/mre_mm"].tolist(), "resumed", b["val/mre_mm"].tolist())
    assert list(b.index) == list(range(KILL_AT, RESUME_EPOCHS))
    np.testing.assert_allclose(b["train/loss"].to_numpy(), a["train/loss"].to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(b["val/mre_mm"].to_numpy(), a["val/mre_mm"].to_numpy(), rtol=1e-6, atol=1e-6)
    assert second.best_score == pytest.approx(full.best_score, rel=1e-6, abs=1e-6)
    np.testing.assert_allclose(_test_predictions(second, samples), _test_predictions(full, samples), atol=1e-6,
                               equal_nan=True)


def test_same_seed_same_run(resumed, samples, tmp_path):
    full, *_ = resumed
    again = _aug_fit(samples, tmp_path)
    pd.testing.assert_frame_equal(read_history(again.history_csv).drop(columns="step"),
                                  read_history(full.history_csv).drop(columns="step"))
    np.testing.assert_array_equal(_test_predictions(again, samples), _test_predictions(full, samples))


def test_resume_keeps_the_whole_history(resumed):
    """metrics.csv after the resume holds every epoch once; the rows before the kill are unchanged."""
    _, before, second, _ = resumed
    hist = pd.read_csv(second.history_csv)
    assert sorted(read_history(second.history_csv).index) == list(range(RESUME_EPOCHS))
    for column in ("train/loss", "val/mre_mm"):  # one value per epoch, none twice
        assert sorted(hist.dropna(subset=[column])["epoch"].astype(int)) == list(range(RESUME_EPOCHS))
    old = before["history"]
    pd.testing.assert_frame_equal(hist.iloc[:len(old)][old.columns].reset_index(drop=True), old,
                                  check_dtype=False)


def test_train_seconds_summed_across_resumes(resumed):
    _, before, second, times = resumed
    first_seconds = float(before["ckpt"]["train_seconds"])
    assert first_seconds > 0
    resumed_part = times.end - times.start
    assert second.train_seconds >= first_seconds + resumed_part
    last = torch.load(second.last_checkpoint, map_location="cpu", weights_only=False)
    assert first_seconds + resumed_part <= last["train_seconds"] <= second.train_seconds


def test_optimizer_warmup_then_cosine():
    method = build_method("heatmap_unet", spatial_dims=2, n_landmarks=3, network=NET,
                          optimizer={"name": "adamw", "lr": 1.0, "weight_decay": 0.01, "warmup_epochs": 4})
    conf = method.configure_optimizers([torch.nn.Parameter(torch.zeros(1))], max_epochs=14)
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.AdamW)
    rates = []
    for _ in range(14):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # linear warm-up
    assert rates[4] == pytest.approx(1.0) and rates[-1] < 0.05  # then cosine decay to 1 %
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))


def test_trainer_device_mapping():
    assert trainer_device(torch.device("cpu")) == ("cpu", 1)
    assert trainer_device(torch.device("cuda", 1)) == ("gpu", [1])


def test_module_rebuilds_from_plain_arguments():
    module = LandmarkModule("heatmap_unet", {"spatial_dims": 2, "n_landmarks": 2, "network": NET}, ["a", "b"],
                            {"kind": "whole", "size": [32, 32]})
    assert module.method.name == "heatmap_unet" and module.decode_epoch == 0
    with pytest.raises(ValueError, match="2 outputs"):
        LandmarkModule("heatmap_unet", {"spatial_dims": 2, "n_landmarks": 2, "network": NET}, ["a"],
                       {"kind": "whole", "size": [32, 32]})


def test_per_landmark_means_keep_values_and_ids_aligned_with_nans():
    """NaN values (e.g. Dice of a patch whose target left the grid) were dropped by the metric while
    their landmark ids were kept, so the two no longer lined up (broadcast error in the cascade)."""
    module = LandmarkModule("heatmap_unet", {"spatial_dims": 2, "n_landmarks": 3, "network": NET}, ["a", "b", "c"],
                            {"kind": "whole", "size": [32, 32]})
    values = torch.tensor([[1.0, float("nan"), 3.0], [float("nan"), 5.0, 7.0]])
    ids = torch.tensor([[0, 1, 2], [0, 1, 2]])
    module._val_dice.update(values.reshape(-1))
    module._val_dice_ids.update(torch.where(torch.isfinite(values), ids, -1).reshape(-1).float())
    module._val_dice_items.update(torch.tensor([[0, 0, 0], [1, 1, 1]]).reshape(-1).double())
    mean, per = module._per_landmark(module._val_dice, module._val_dice_ids, module._val_dice_items)
    assert mean == pytest.approx(4.0)
    np.testing.assert_allclose(per, [1.0, 5.0, 5.0])


def test_batch_runs_print_epoch_lines_instead_of_a_live_bar(samples, tmp_path, capsys):
    """``progress="lines"`` (a parameter, the driver's choice; before, an environment variable switched it)."""
    method = build_method("heatmap_unet", spatial_dims=2, n_landmarks=3, sigma=2.0, network=NET)
    fit(method, _dm(samples), tmp_path, max_epochs=3, device="cpu", progress="lines")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all("val MRE" in line and line.rstrip().endswith(")") and " s/epoch" in line for line in lines)
    # the time left (issue 24: nothing estimated an epoch's time before committing to 200 epochs)
    assert "left)" in lines[0] and "left)" in lines[1] and "left" not in lines[2]


@pytest.mark.slow
def test_a_compiled_training_follows_the_eager_one_and_keeps_eager_checkpoints(samples, tmp_path):
    """``torch_compile``: the same training, step for step, as eager (fused kernels round differently, so equal
    within float tolerance); the checkpoints hold the eager network's keys and load into a fresh process's module."""
    def run(folder: str, compiled: bool):
        method = build_method("heatmap_unet", spatial_dims=2, n_landmarks=3, network=NET)
        return fit(method, _dm(samples), tmp_path / folder, max_epochs=2, learning_rate=3e-3, device="cpu", seed=0,
                   torch_compile=compiled)

    from torch._dynamo.utils import counters

    eager = run("eager", False)
    frames = counters["frames"]["ok"]
    compiled = run("compiled", True)
    assert counters["frames"]["ok"] > frames  # it did compile
    a, b = read_history(eager.history_csv), read_history(compiled.history_csv)
    np.testing.assert_allclose(b["train/loss"].to_numpy(), a["train/loss"].to_numpy(), rtol=1e-3)
    np.testing.assert_allclose(b["val/mre_mm"].dropna().to_numpy(), a["val/mre_mm"].dropna().to_numpy(), rtol=1e-3)
    keys = torch.load(compiled.best_checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    assert keys.keys() == torch.load(eager.best_checkpoint, map_location="cpu", weights_only=False)["state_dict"].keys()
    assert not any("_orig_mod" in k for k in keys)
    test = [s for s in samples if s.meta["split"] == "test"]
    np.testing.assert_allclose(np.stack(predict(compiled.best_checkpoint, test).world_mm),
                               np.stack(predict(eager.best_checkpoint, test).world_mm), atol=0.05)


def test_the_loss_epoch_keys_the_loss_by_what_changes_it():
    """``loss_epoch``: the dilation-erosion loss at an epoch equals its loss at the key (the radius stage's first
    epoch, also past the last stage), and there is one key per radius; the heatmap U-Net's loss has one key."""
    de = build_method("dilation_erosion", spatial_dims=2, n_landmarks=3, max_epochs=60, network=NET)
    size = (64, 80)
    keys = {e: de.loss_epoch(e) for e in range(80)}
    assert all(de.radius(k, size) == de.radius(e, size) and k <= e for e, k in keys.items())
    assert len(set(keys.values())) == len({de.radius(e, size) for e in range(80)})
    assert {build_method("heatmap_unet", spatial_dims=2, n_landmarks=3).loss_epoch(e) for e in range(9)} == {0}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["heatmap_unet", "dilation_erosion"])
def test_the_compiled_loss_is_the_eager_loss_with_one_graph_per_key(name):
    """After ``compile_for_training`` the training loss is compiled (targets fused into it): its value and gradient
    are the eager ones at every epoch, and it compiles once per ``loss_epoch`` key, not once per epoch."""
    from torch._dynamo.utils import counters

    from lmlib.data.loaders import ViewSpec
    from lmlib.engine.training import compile_for_training

    torch._dynamo.reset()  # no graph left by an earlier test with the same guards
    extra = {"max_epochs": 40} if name == "dilation_erosion" else {}
    method = build_method(name, spatial_dims=2, n_landmarks=3, network=NET, **extra)
    module = LandmarkModule.from_method(method, ["a", "b", "c"], ViewSpec(kind="whole", size=(64, 80)))
    compile_for_training(module)
    torch.manual_seed(0)
    batch = {"image": torch.randn(2, 1, 64, 80), "landmarks": torch.rand(2, 3, 2) * 60,
             "valid": torch.tensor([[True, True, False], [True, True, True]]), "image_id": ["a", "b"]}
    out = torch.randn(2, 3, 64, 80, requires_grad=True)
    graphs = counters["stats"]["unique_graphs"]
    for epoch in range(0, 40, 3):
        loss, _ = module.training_loss(out, batch, epoch)
        (grad,) = torch.autograd.grad(loss, out)
        ref, _ = method.training_loss(out, batch, epoch)
        (ref_grad,) = torch.autograd.grad(ref, out)
        torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-9)
    keys = {method.loss_epoch(e) for e in range(0, 40, 3)}
    assert 0 < counters["stats"]["unique_graphs"] - graphs <= len(keys)


def test_a_subclass_that_redefines_the_loss_is_not_compiled_under_its_parents_key():
    """``loss_key``: a method class below the one that defines ``loss_epoch`` and redefining the loss keeps its loss
    eager (None) unless it says again what the loss depends on."""
    from lmlib.methods.base import loss_key
    from lmlib.methods.heatmap_unet import HeatmapUNet

    class EpochLoss(HeatmapUNet):
        def loss(self, output, targets, valid, epoch):
            return super().loss(output, targets, valid, epoch) * (1 + epoch)

    class Keyed(EpochLoss):
        def loss_epoch(self, epoch):
            return epoch

    assert loss_key(HeatmapUNet(2, 3), 5) == 0
    assert loss_key(EpochLoss(2, 3), 5) is None
    assert loss_key(Keyed(2, 3), 5) == 5


def test_the_compiler_imports_under_an_ascii_locale():
    """torch's inductor reads its templates in the locale's encoding; with ``LC_CTYPE=C`` set mid-process (as in a
    CI run of the suite) ``fit(torch_compile=True)`` failed at its import. ``compile_for_training`` imports it under
    UTF-8 (a fresh process: the import happens once)."""
    code = ("import locale; locale.setlocale(locale.LC_CTYPE, 'C'); "
            "from lmlib.engine.training import _import_inductor; _import_inductor(); "
            "import torch._inductor.compile_fx; assert locale.setlocale(locale.LC_CTYPE) == 'C'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-800:]


def test_a_resume_with_other_settings_is_refused_naming_them(samples, tmp_path):
    """Lightning restored the checkpoint's optimizer: a resume with another learning rate trained on at the old one
    while the manifest said the new; another network failed in load_state_dict, naming no file."""
    method = build_method("heatmap_unet", spatial_dims=2, n_landmarks=3, sigma=2.0, network=NET)
    first = fit(method, _dm(samples), tmp_path / "a", max_epochs=1, device="cpu")
    with pytest.raises(CheckpointMismatch, match=r"last\.ckpt: cannot be resumed with other settings "
                                                 r"\(method_config\.optimizer: .*'lr': 1e-05"):
        fit(method, _dm(samples), tmp_path / "b", max_epochs=2, device="cpu", resume=first.last_checkpoint,
            learning_rate=1e-5)
    wider = build_method("heatmap_unet", spatial_dims=2, n_landmarks=3, sigma=3.0, network=NET)
    with pytest.raises(CheckpointMismatch, match=r"method_config\.sigma: 2\.0 -> 3\.0"):
        fit(wider, _dm(samples), tmp_path / "c", max_epochs=2, device="cpu", resume=first.last_checkpoint)
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_a_resume_in_another_folder_keeps_the_earlier_best(samples, tmp_path):
    """Lightning restores the best score only in the same checkpoint folder: resumed elsewhere (or after the run
    folder moved), the first resumed epoch was saved as best.ckpt however bad, and its weights were returned."""

    class Ruin(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                with torch.no_grad():
                    for p in pl_module.net.parameters():
                        p.zero_()

    method = build_method("heatmap_unet", spatial_dims=2, n_landmarks=3, sigma=2.0, network=NET)
    first = fit(method, _dm(samples), tmp_path / "a", max_epochs=2, device="cpu")
    again = fit(method, _dm(samples), tmp_path / "b", max_epochs=3, device="cpu", resume=first.last_checkpoint,
                callbacks=[Ruin()])
    hist = pd.read_csv(again.history_csv).dropna(subset=["val/mre_mm"]).set_index("epoch")["val/mre_mm"]
    assert hist.loc[2] > hist.loc[[0, 1]].min()  # the ruined epoch is worse
    assert again.best_score == pytest.approx(first.best_score)
    assert Path(again.best_checkpoint).parent == tmp_path / "b" / "checkpoints"
    assert torch.load(again.best_checkpoint, map_location="cpu", weights_only=False)["epoch"] < 2
    assert Path(first.best_checkpoint).is_file()  # the other run's file is not touched


def test_a_longer_schedule_resumes_and_a_torn_resume_checkpoint_is_named(samples, tmp_path):
    """max_epochs may grow on resume, and with it the dilation-erosion U-Net's shrink schedule (derived from it);
    a truncated resume checkpoint was a raw torch error naming no file."""
    from lmlib.engine.training import check_resumable
    from lmlib.methods.targets import ShrinkSchedule

    short = build_method("dilation_erosion", spatial_dims=2, n_landmarks=3, max_epochs=7, network=NET,
                         schedule=ShrinkSchedule.fit_to(7))
    first = fit(short, _dm(samples), tmp_path / "a", max_epochs=1, device="cpu")
    longer = build_method("dilation_erosion", spatial_dims=2, n_landmarks=3, max_epochs=14, network=NET,
                          schedule=ShrinkSchedule.fit_to(14))
    assert longer.config()["schedule"] != short.config()["schedule"]
    module = LandmarkModule.from_method(longer, first.module.landmark_names, first.module.view,
                                        first.module.eval_view, max_epochs=14)
    check_resumable(first.last_checkpoint, module)  # no error
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(Path(first.last_checkpoint).read_bytes()[:1000])
    with pytest.raises(CheckpointMismatch, match=r"torn\.ckpt: not a readable checkpoint"):
        check_resumable(torn, module)


def test_a_stale_best_in_the_resume_folder_is_replaced(samples, tmp_path):
    """Resumed into a folder holding another run's best.ckpt, the earlier run's score was attached to those weights."""
    method = build_method("heatmap_unet", spatial_dims=2, n_landmarks=3, sigma=2.0, network=NET)
    first = fit(method, _dm(samples), tmp_path / "a", max_epochs=1, device="cpu")
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    (tmp_path / "b" / "checkpoints" / "best.ckpt").write_bytes(b"another run's weights")
    again = fit(method, _dm(samples), tmp_path / "b", max_epochs=1, device="cpu", resume=first.last_checkpoint)
    assert Path(again.best_checkpoint).read_bytes() == Path(first.best_checkpoint).read_bytes()


@pytest.mark.parametrize("precision, flip", [("bf16", False), ("32", True)])
def test_validation_scores_what_prediction_predicts(samples, precision: str, flip: bool) -> None:
    """The checkpoint is chosen on the validation error: under bf16 autocast validation decoded bf16 maps while
    predict() (the test numbers) runs in full precision, and validation ignored test-time flipping, so the chosen
    epoch and best_val_mre_mm followed other numbers than the test predictions."""
    torch.manual_seed(0)
    method = build_method("heatmap_unet", spatial_dims=2, n_landmarks=3, network=NET, test_time_flip=flip)
    dm = _dm(samples, batch_size=4)
    dm.setup()
    module = LandmarkModule.from_method(method, samples[0].landmark_names, dm.view, dm.eval_view).eval()
    val = list(dm.datasets["val"].samples) if hasattr(dm.datasets["val"], "samples") else dm.split_samples("val")
    expected = np.concatenate([np.linalg.norm(p - s.landmarks_mm, axis=1) for p, s in
                               zip(predict(module, val, batch_size=4, device="cpu").world_mm, val)])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for k, batch in enumerate(dm.val_dataloader()):
            module.validation_step(batch, k)
    got = module._val_err.compute().double().numpy()
    np.testing.assert_allclose(np.sort(got), np.sort(expected), atol=1e-4)


def test_a_val_item_seen_twice_counts_once(samples) -> None:
    """Under DDP the val sampler pads every rank to one length by repeating items (30 val images on 4 ranks: two
    counted twice), and that biased val MRE chose the checkpoint: each (item, landmark) now counts once."""
    torch.manual_seed(0)
    method = build_method("heatmap_unet", spatial_dims=2, n_landmarks=3, network=NET)
    dm = _dm(samples, batch_size=3)
    dm.setup()
    module = LandmarkModule.from_method(method, samples[0].landmark_names, dm.view, dm.eval_view).eval()
    batches = list(dm.val_dataloader())
    scores = []
    for passes in (batches, batches + batches[:1]):  # the first batch again, as a padded rank sees it
        with torch.no_grad():
            for k, batch in enumerate(passes):
                module.validation_step(batch, k)
        scores.append(module._per_landmark(module._val_err, module._val_ids, module._val_items))
    assert scores[0][0] == pytest.approx(scores[1][0], rel=1e-12)
    np.testing.assert_allclose(scores[0][1], scores[1][1], rtol=1e-12)


def test_selection_on_val_without_a_validated_epoch_is_refused(samples, tmp_path):
    """With validation every 5 epochs and 3 epochs to train, best.ckpt silently fell back to the last epoch."""
    method = build_method("heatmap_unet", spatial_dims=2, n_landmarks=3, sigma=2.0, network=NET)
    with pytest.raises(ValueError, match=r"check_val_every_n_epoch=5 > max_epochs=3: no epoch is validated"):
        fit(method, _dm(samples), tmp_path, max_epochs=3, device="cpu", check_val_every_n_epoch=5)


def test_a_resume_with_another_training_stream_is_refused(samples, tmp_path):
    """Seed, batch size, augmentation, labels and the images trained on were not compared: a resume with other
    values went on silently as a mix of two runs. An older checkpoint that records fewer of them still resumes."""
    method = build_method("heatmap_unet", spatial_dims=2, n_landmarks=3, sigma=2.0, network=NET)
    data = {"dataset": "toy", "seed": 0, "batch_size": 2, "rotation_deg": 10.0}
    first = fit(method, _dm(samples), tmp_path / "a", max_epochs=1, device="cpu", data=data)
    with pytest.raises(CheckpointMismatch, match=r"data\.rotation_deg: 10\.0 -> 20\.0"):
        fit(method, _dm(samples), tmp_path / "b", max_epochs=2, device="cpu", resume=first.last_checkpoint,
            data={**data, "rotation_deg": 20.0})
    older = fit(method, _dm(samples), tmp_path / "c", max_epochs=1, device="cpu", data={"dataset": "toy"})
    again = fit(method, _dm(samples), tmp_path / "d", max_epochs=2, device="cpu", resume=older.last_checkpoint,
                data=data)
    assert again.epochs == 2
