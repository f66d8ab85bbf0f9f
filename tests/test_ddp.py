"""Data-parallel training with Lightning DDP on the CPU (gloo): two processes reach the validation error of
one at the same global batch; only rank 0 writes; the outputs record the world size; the strategy follows
how the processes were started."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lmlib.data.loaders import LandmarkDataModule
from lmlib.data.transforms import build_augmentation
from lmlib.engine.training import ddp_strategy, fit
from lmlib.evaluation.baselines import mean_shape_predictions
from lmlib.evaluation.metrics import mean_radial_error
from lmlib.methods import build_method

pytestmark = pytest.mark.slow
SIZE = (64, 64)  # the phantoms2d fixture's grid (tests/conftest.py)


def _val_mre(samples, processes: int, batch: int, out: Path):
    method = build_method("heatmap_unet", spatial_dims=2, n_landmarks=3, sigma=2.0, foreground_weight=10.0,
                          network={"channels": (8, 16, 32, 64), "num_res_units": 1})
    dm = LandmarkDataModule(samples, target_size=SIZE, batch_size=batch, seed=0,
                            augmentation=build_augmentation(2, rotation_deg=5, scale=0.05, seed=0))
    return fit(method, dm, out, max_epochs=100, learning_rate=3e-3, device="cpu", seed=0, devices=processes)


def test_two_gloo_processes_reach_the_error_of_one_at_the_same_global_batch(tmp_path: Path, phantoms2d) -> None:
    samples, train, val = phantoms2d["all"], phantoms2d["train"], phantoms2d["val"]
    baseline = mean_radial_error(mean_shape_predictions(train, val), val)
    one = _val_mre(samples, 1, 4, tmp_path / "one")
    two = _val_mre(samples, 2, 2, tmp_path / "two")  # 2 processes x 2 images = the same global batch of 4
    assert one.world_size == 1 and two.world_size == 2 and two.epochs == 100
    assert one.best_score < baseline / 3 and two.best_score < baseline / 3, (one.best_score, two.best_score, baseline)
    assert abs(two.best_score - one.best_score) < 0.25 * one.best_score + 0.05, (one.best_score, two.best_score)
    # rank 0 alone wrote: one history row per epoch, one best and one last checkpoint; this process got its weights
    with open(tmp_path / "two" / "training_log" / "metrics.csv") as f:
        epochs = {row["epoch"] for row in csv.DictReader(f) if row.get("val/mre_mm")}
    assert len(epochs) == 100
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert Path(two.best_checkpoint).name == "best.ckpt" and two.train_seconds > 0


def test_run_outputs_record_the_world_size(tmp_path: Path) -> None:
    from lmlib.engine.runner import run_method

    out = tmp_path / "run"
    run_method("heatmap_unet", {"dataset": "synthetic2d", "output_dir": str(out), "device": "cpu", "max_epochs": 2,
                                "image_size": [48, 48], "channels": [4, 8, 16], "batch_size": 2, "devices": 2,
                                "overlay_every": 1})
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["parameters"]["devices"] == 2
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["epoch_001.png", "epoch_002.png"]  # rank 0 only


def test_the_strategy_follows_how_the_processes_were_started(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("LOCAL_RANK", "WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    assert ddp_strategy("auto", "cpu") == "ddp_fork_find_unused_parameters_true"
    assert ddp_strategy("auto", "gpu") == "ddp_spawn_find_unused_parameters_true"
    assert ddp_strategy("ddp_spawn", "cpu") == "ddp_spawn"
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")  # torchrun
    assert ddp_strategy("auto", "gpu") == "ddp_find_unused_parameters_true"
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS", "4")  # srun
    assert ddp_strategy("auto", "cpu") == "ddp_find_unused_parameters_true"


@pytest.mark.notebook
def test_a_notebook_trains_with_two_processes(tmp_path: Path) -> None:
    """From a notebook kernel (where Lightning cannot fork or spawn) the training runs as a script with two
    gloo processes; the run folder is complete and written once, by rank 0."""
    from lmlib import run

    assert run.main(["--dataset", "synthetic2d", "--only", "heatmap_unet", "--profile", "smoke", "--device", "cpu",
                     "--set", "devices=2", "--results-dir", str(tmp_path)]) == 0
    folder = tmp_path / "synthetic2d" / "heatmap_unet"
    assert json.loads((folder / "metrics.json").read_text())["world_size"] == 2
    assert json.loads((folder / "manifest.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert not (folder / ".ddp").exists() and not list((tmp_path / "synthetic2d").glob(".*"))
