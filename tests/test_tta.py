"""Multi-scale test-time augmentation (lmlib.methods.tta): the base run's checkpoint at several grid scales, its own
scale reproducing the run's predictions, the row's costs, and the refusals (a checkpoint of another run, a cascade,
no checkpoint)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lmlib.engine.runner import run_method
from lmlib.methods.tta import ScaleTTA
from lmlib.outputs.contract import ContractError, read_run

UNET = {"dataset": "synthetic2d", "device": "cpu", "max_epochs": 2, "image_size": [64, 64],
        "channels": [8, 16, 32], "overlay_every": 100, "max_train_images": 8}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small heatmap U-Net run (2 epochs on a 64-px grid: the plumbing, not accuracy) whose folder keeps its
    checkpoint."""
    root = tmp_path_factory.mktemp("tta") / "synthetic2d"
    run_method("heatmap_unet", {**UNET, "output_dir": str(root / "heatmap_unet")})
    return root


def test_grid_sizes_round_to_the_networks_multiple() -> None:
    tta = ScaleTTA(2, 3, scales=[0.9, 1.0, 1.1])
    assert tta.grid_sizes([256, 320], 16) == [(224, 288), (256, 320), (288, 352)]
    assert tta.grid_sizes([16, 16], 16) == [(16, 16), (16, 16), (16, 16)]  # never below one multiple
    with pytest.raises(ValueError, match="at least two different numbers between 0.5 and 2"):
        ScaleTTA(2, 3, scales=[1.0, 2.5])
    with pytest.raises(ValueError, match="1.0 among them"):  # the base run's own scale is its check
        ScaleTTA(2, 3, scales=[0.9, 1.1])


@pytest.mark.slow
def test_scales_combined_their_costs_and_the_base_reproduced(base: Path) -> None:
    result = run_method("tta", {"dataset": "synthetic2d", "output_dir": str(base / "tta"), "device": "cpu",
                                "base_method": "heatmap_unet", "scales": [0.875, 1.0, 1.125]})
    own = read_run(base / "heatmap_unet")[1]
    assert result.metrics["train_seconds"] == pytest.approx(own["train_seconds"])
    assert result.metrics["infer_seconds_per_image"] > own["infer_seconds_per_image"] > 0
    assert result.metrics["grid_sizes"] == [[56, 56], [64, 64], [72, 72]] and result.metrics["epochs"] == 0  # x 8
    manifest = json.loads((base / "tta" / "manifest.json").read_text())
    assert manifest["base_run"] == "../heatmap_unet" and manifest["method_config"]["scales"] == [0.875, 1.0, 1.125]


@pytest.mark.slow
def test_each_scale_maps_back_through_its_own_grid(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:
    """An oracle network (its grid coordinates are the batch's true landmarks, at every scale): the combined
    prediction is the truth to 1e-4 mm, so each scale's grid is mapped back to world mm by its own geometry (a
    prediction read through the base grid would be off by 1/8 of the image at scale 0.875)."""
    from lmlib.engine import runner
    from lmlib.engine.training import load_checkpoint

    grids = set()

    def oracle(path):
        module = load_checkpoint(path)
        original = module.predict_batch

        def truth(batch):
            grids.add(tuple(batch["image"].shape[2:]))
            coords, conf, outputs = original(batch)
            return batch["landmarks"].to(coords.dtype), conf, outputs

        module.predict_batch = truth
        return module

    monkeypatch.setattr(runner, "load_checkpoint", oracle)
    shutil.copytree(base / "heatmap_unet", tmp_path / "synthetic2d" / "heatmap_unet")
    table = pd.read_csv(tmp_path / "synthetic2d" / "heatmap_unet" / "predictions.csv")
    for axis in ("x", "y"):  # the oracle's own run: its predictions are the truth
        table[f"{axis}_mm"] = table[f"gt_{axis}_mm"]
    table.to_csv(tmp_path / "synthetic2d" / "heatmap_unet" / "predictions.csv", index=False)
    result = run_method("tta", {"dataset": "synthetic2d", "device": "cpu", "base_method": "heatmap_unet",
                                "output_dir": str(tmp_path / "synthetic2d" / "tta"), "scales": [0.875, 1.0, 1.125]})
    assert result.metrics["mre_mm"] < 1e-4  # float32 grid arithmetic
    assert grids == {(56, 56), (64, 64), (72, 72)}  # each scale was predicted on its own grid


@pytest.mark.slow
def test_a_base_it_cannot_use_is_refused_naming_it(base: Path, tmp_path: Path) -> None:
    params = {"dataset": "synthetic2d", "device": "cpu", "output_dir": str(tmp_path / "synthetic2d" / "tta")}
    other = tmp_path / "synthetic2d" / "moved"
    shutil.copytree(base / "heatmap_unet", other)
    table = pd.read_csv(other / "predictions.csv")
    table["x_mm"] += 1.0  # another run's predictions beside this checkpoint
    table.to_csv(other / "predictions.csv", index=False)
    with pytest.raises(ContractError, match=r"predicts up to 1\.0\d\d mm away from .*moved/predictions.csv"):
        run_method("tta", {**params, "base_method": "moved"})
    shutil.rmtree(other / "checkpoints")
    with pytest.raises(FileNotFoundError, match="moved: not a run folder"):
        run_method("tta", {**params, "base_method": "moved"})
    with pytest.raises(FileNotFoundError, match=r"missing: no finished run here .*run the 'missing' job"):
        run_method("tta", {**params, "base_method": "missing"})
    assert np.isfinite(read_run(base / "heatmap_unet")[1]["mre_mm"])
