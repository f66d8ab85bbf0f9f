"""Local refinement after any method (lmlib.methods.refine, lmlib.engine.base_run): it improves a finished run's
predictions clearly, counts the base run's cost, and refuses a base run it cannot use with a message naming it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lmlib.data.datasets import load_dataset
from lmlib.engine.base_run import load_base_run, read_predictions, run_grid, validation_errors
from lmlib.engine.cascade import model_checkpoints
from lmlib.engine.runner import run_method
from lmlib.methods.refine import LocalRefinement
from lmlib.outputs.contract import ContractError, read_run

REGISTRATION = {"dataset": "synthetic2d", "n_atlases": 2, "levels": 2, "affine_iterations": 30,
                "demons_iterations": 10, "device": "cpu"}


@pytest.fixture(scope="module")
def refined(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """registration (fast settings, about 3 mm on the phantoms), then two refinement stages of 12 epochs."""
    root = tmp_path_factory.mktemp("refine") / "synthetic2d"
    run_method("registration", {**REGISTRATION, "output_dir": str(root / "registration")})
    run_method("refine", {"dataset": "synthetic2d", "output_dir": str(root / "registration+local"), "max_epochs": 12,
                          "local_channels": [16, 32], "learning_rate": 3e-3, "device": "cpu", "progress": "lines"})
    return root


@pytest.mark.slow
def test_refinement_halves_the_registration_error(refined: Path) -> None:
    """Measured: registration 3.1 mm, local1 1.8, local2 1.1 (a stage that does nothing, or a patch centred on
    the wrong points, stays at the registration's error)."""
    base = read_run(refined / "registration")[1]["mre_mm"]
    first = read_run(refined / "registration+local" / "local1")[1]["mre_mm"]
    last = read_run(refined / "registration+local" / "local2")[1]["mre_mm"]
    assert last < 0.5 * base and first < 0.8 * base, (base, first, last)


@pytest.mark.slow
def test_the_rows_count_the_base_runs_cost_and_name_it(refined: Path) -> None:
    base = read_run(refined / "registration")[1]
    one, two = (read_run(refined / "registration+local" / s)[1] for s in ("local1", "local2"))
    assert one["infer_seconds_per_image"] > base["infer_seconds_per_image"] > 0
    assert two["train_seconds"] > one["train_seconds"] > 0
    manifest = json.loads((refined / "registration+local" / "manifest.json").read_text())
    assert manifest["base_run"] == "../registration" and manifest["stages"] == ["local1", "local2"]
    stage = json.loads((refined / "registration+local" / "local1" / "manifest.json").read_text())
    assert "registration (base run)" in stage["method_config"]["patch_choice"]["reason"]
    # the row's grid is the one its base run started from, not the default grid (the stages use patches)
    grid = json.loads((refined / "registration" / "manifest.json").read_text())["parameters"]["image_size"]
    assert stage["parameters"]["image_size"] == manifest["parameters"]["image_size"] == grid
    assert run_grid(refined / "registration+local" / "local2") == grid


@pytest.mark.slow
def test_base_val_predictions_are_kept_and_match_a_fresh_registration(refined: Path) -> None:
    """The val predictions were made by running the registration again (same atlases): reading them back gives
    the same errors as the stage's patch rule recorded."""
    data = load_dataset("synthetic2d")
    split = {k: [s for s in data.samples if s.meta.get("split") == k] for k in ("train", "val", "test")}
    start = load_base_run(refined / "registration", "synthetic2d", split["train"], split["val"], split["test"],
                          cache_dir=refined / "registration+local")
    key, seconds = (refined / "registration+local" / "base_val_predictions.key").read_text().split()
    assert len(key) == 12 and float(seconds) > 0  # the time the val registrations took, charged to the row
    recorded = json.loads((refined / "registration+local" / "local1" / "manifest.json").read_text())
    assert validation_errors(split["val"], start.val.world_mm) == pytest.approx(
        recorded["method_config"]["patch_choice"]["global_val_errors_mm"])
    assert start.test.world_mm[0] == pytest.approx(read_predictions(refined / "registration" / "predictions.csv",
                                                                    split["test"][:1])[0])


@pytest.mark.slow
def test_predicting_new_images_from_a_refined_registration_is_refused_by_name(refined: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"refines the run \.\./registration, which cannot predict"):
        model_checkpoints(refined / "registration+local")


def test_a_refined_trained_run_chains_the_base_checkpoints_first(tmp_path: Path) -> None:
    base, top = tmp_path / "htc", tmp_path / "htc+local"
    for ckpt in (base / "checkpoints" / "best.ckpt", top / "local1" / "checkpoints" / "best.ckpt"):
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"")
    (top / "manifest.json").write_text(json.dumps({"stages": ["local1"], "base_run": "../htc"}))
    assert model_checkpoints(top) == [(base / "checkpoints" / "best.ckpt").resolve(),
                                      top / "local1" / "checkpoints" / "best.ckpt"]


def test_the_base_folder_defaults_to_the_sibling_run() -> None:
    assert LocalRefinement.base_folder({"output_dir": "results/x/htc+local", "base_method": "htc"}) == \
        Path("results/x/htc")
    assert LocalRefinement.base_folder({"output_dir": "a/b", "base_run": "elsewhere/run"}) == Path("elsewhere/run")


def _samples() -> dict[str, list]:
    data = load_dataset("synthetic2d", n_images=12)
    return {k: [s for s in data.samples if s.meta.get("split") == k] or data.samples[:2] for k in ("train", "val", "test")}


def test_a_missing_base_run_names_the_folder_and_the_job(tmp_path: Path) -> None:
    s = _samples()
    with pytest.raises(FileNotFoundError, match=r"registration: no finished run here .*run the 'registration' job"):
        load_base_run(tmp_path / "registration", "synthetic2d", s["train"], s["val"], s["test"])


def test_a_base_run_on_other_images_or_another_dataset_is_refused_naming_the_file(tmp_path: Path) -> None:
    s = _samples()
    folder = tmp_path / "registration"
    folder.mkdir()
    rows = [{"image_id": "elsewhere", "landmark": "L01", "x_mm": 1.0, "y_mm": 2.0, "z_mm": np.nan, "gt_x_mm": 1.0,
             "gt_y_mm": 2.0, "gt_z_mm": np.nan, "error_mm": 0.0}]
    pd.DataFrame(rows).to_csv(folder / "predictions.csv", index=False)
    metrics = {k: 0.0 for k in ("mre_mm", "sd_mm", "median_mm", "sdr_2mm", "sdr_2.5mm", "sdr_3mm", "sdr_4mm",
                                "n_images", "n_landmarks", "train_seconds", "infer_seconds_per_image", "peak_rss_mb")}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "manifest.json").write_text(json.dumps({"method": "registration", "parameters": {"dataset": "synthetic3d"}}))
    with pytest.raises(ContractError, match="a run on 'synthetic3d', not on 'synthetic2d'"):
        load_base_run(folder, "synthetic2d", s["train"], s["val"], s["test"])
    (folder / "manifest.json").write_text(json.dumps({"method": "registration", "parameters": {"dataset": "synthetic2d"}}))
    with pytest.raises(ContractError, match=r"predictions\.csv: no prediction for 8 landmark\(s\) of image"):
        load_base_run(folder, "synthetic2d", s["train"], s["val"], s["test"])
    shutil.rmtree(folder)


def test_the_base_runs_val_predictions_are_charged_to_the_refinement(tmp_path: Path) -> None:
    """registration trains nothing, so its val predictions (a registration of every val image, which the refinement
    needs to size its patches) are training cost: the rows counted the base run's train_seconds (0) alone."""
    import hashlib

    from lmlib.outputs.contract import predictions_frame, write_json, write_outputs

    s = _samples()
    folder, cache_dir = tmp_path / "registration", tmp_path / "registration+local"
    write_outputs(folder, predictions_frame(s["test"], [x.landmarks_mm for x in s["test"]]),
                  {"train_seconds": 0.0, "infer_seconds_per_image": 2.0, "peak_rss_mb": 1.0})
    write_json(folder / "manifest.json", {"method": "registration", "parameters": {"dataset": "synthetic2d"}})
    cache_dir.mkdir()
    predictions_frame(s["val"], [x.landmarks_mm for x in s["val"]]).to_csv(cache_dir / "base_val_predictions.csv",
                                                                           index=False)
    key = hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()[:12]
    (cache_dir / "base_val_predictions.key").write_text(key + "\n")  # a cache written before the time was kept
    start = load_base_run(folder, "synthetic2d", s["train"], s["val"], s["test"], cache_dir=cache_dir)
    assert start.train_seconds == pytest.approx(len(s["val"]) * 2.0)
    (cache_dir / "base_val_predictions.key").write_text(f"{key}\n37.5\n")
    start = load_base_run(folder, "synthetic2d", s["train"], s["val"], s["test"], cache_dir=cache_dir)
    assert start.train_seconds == pytest.approx(37.5) and start.infer_seconds_per_image == 2.0


def test_a_stage_keeps_the_previous_prediction_where_it_is_not_better_on_val() -> None:
    """Per landmark on val: landmark 0 improved (kept by the stage), landmark 1 worse and landmark 2 equal (both
    left to the previous stage), a masked landmark counts only where annotated."""
    from types import SimpleNamespace

    from lmlib.engine.cascade import chain, worse_on_val
    from lmlib.engine.training import Predictions, without_landmarks

    gt = np.array([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]])
    samples = [SimpleNamespace(landmarks_mm=gt.copy(), valid=np.array([True, True, i == 0])) for i in range(2)]
    previous = Predictions([gt + [[2, 0], [1, 0], [1, 0]] for _ in samples], [np.ones(3)] * 2, 0.0)
    current = Predictions([gt + [[1, 0], [3, 0], [1, 0]] for _ in samples], [np.ones(3)] * 2, 0.0)
    assert worse_on_val(samples, previous, current) == [1, 2]
    merged = chain(previous, without_landmarks(current, [1, 2]))
    assert np.allclose(merged.world_mm[0], gt + [[1, 0], [1, 0], [1, 0]])
