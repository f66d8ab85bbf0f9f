"""Every declared notebook, executed through the driver with smoke parameters on synthetic data.

Jobs run in the declared order into one results folder per dataset (the comparison reads what the
methods wrote), then each output folder is checked for the values it should contain.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from lmlib.outputs.contract import read_run
from lmlib.reporting.benchmark import PYTORCH_LAYERS_VARIANT
from lmlib.reporting.peer import peer_python
from lmlib.run import SYNTHETIC, jobs

pytestmark = pytest.mark.notebook


@pytest.fixture(scope="module", params=SYNTHETIC)
def pipeline(request: pytest.FixtureRequest, synthetic_pipeline: Callable[..., Path]) -> tuple[str, Path]:
    """Every job of the data set, run once per session (``conftest.synthetic_pipeline``)."""
    return request.param, synthetic_pipeline(request.param)


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_job_left_a_complete_folder(pipeline: tuple[str, Path]) -> None:
    dataset, root = pipeline
    for job in jobs():
        if dataset not in job.datasets:
            continue
        folder = root / job.method
        assert (folder / job.notebook).is_file(), f"{folder}: executed notebook missing"
        manifest = _json(folder / "manifest.json")
        assert manifest["parameters"]["dataset"] == dataset
        assert manifest["driver"]["profile"] == "smoke"
        assert manifest["seed"] == 0 and manifest["data_checksum"]
    assert not list(root.glob(".tmp-*")), "a temporary run folder was left behind"


def test_exploration_values(pipeline: tuple[str, Path]) -> None:
    dataset, root = pipeline
    summary = _json(root / "exploration" / "summary.json")
    assert summary["n_images"] == 12
    assert summary["ndim"] == (2 if dataset == "synthetic2d" else 3)
    assert summary["n_masked"] == 0 and summary["n_report_rows"] == 0
    assert 0.5 < summary["mean_rms_spread_mm"] < 50
    images = pd.read_csv(root / "exploration" / "table_images.csv")
    assert len(images) == 12
    for name in ("fig_overlay.png", "fig_mean_shape.png", "fig_augmented.png", "fig_intensity_histograms.png"):
        assert (root / "exploration" / name).stat().st_size > 5_000


# run (a method, or method/stage for a cascade) -> the files of its own its folder must hold beyond the contract
# (predictions.csv, metrics.json, manifest.json): a method without an entry gets the contract checks alone
METHOD_FILES: dict[str, tuple[str, ...]] = {
    "heatmap_unet": ("fig_loss.png", "fig_mean_error.png", "fig_training_progress.gif", "checkpoints/best.ckpt",
                     "val_predictions.csv"),
    "dilation_erosion": ("fig_dice.png", "fig_dice_per_landmark.png", "fig_training_progress.gif",
                         "overlays/epoch_001.png"),
    "global_local/global": ("fig_loss.png", "fig_mean_error.png", "checkpoints/best.ckpt", "val_predictions.csv"),
    "global_local/local": ("fig_loss.png", "checkpoints/best.ckpt", "val_predictions.csv"),
    "htc": ("fig_heatmaps.png", "fig_attention.png", "fig_mean_error.png", "checkpoints/best.ckpt",
            "quarter_head/predictions.csv", "half_head/manifest.json", "val_predictions.csv",
            "quarter_head/val_predictions.csv"),
    "htc_quarter_only": ("fig_heatmaps.png",),
    "htc_half_only": ("fig_heatmaps.png",),
    "registration+local/local1": ("fig_loss.png", "checkpoints/best.ckpt", "../fig_refinement.png",
                                  "../base_val_predictions.csv"),
    "htc+local/local2": ("checkpoints/best.ckpt", "../fig_refinement.png"),
    "prior_guided/coarse": ("fig_loss.png", "checkpoints/best.ckpt"),
    "prior_guided/independent": ("checkpoints/best.ckpt",),
    "prior_guided/correlated": ("checkpoints/best.ckpt", "../fig_stage_slices_0.png", "../fig_stage_errors.png",
                                "../correlated_gain.csv"),
}
#: a 2-epoch smoke run checks the plumbing, not accuracy (the committed default-profile runs and the method tests
#: do: test_committed_synthetic_runs_beat_the_mean_shape); its error must stay within this many mean-shape errors
SMOKE_BOUND_FACTOR = 12.0


def _trained_runs(root: Path) -> list[str]:
    """Every trained run under ``root`` (a method, a cascade stage or a decoding variant): ``metrics.json`` with
    epochs > 0."""
    runs = []
    for metrics in sorted(root.rglob("metrics.json")):
        name = metrics.parent.relative_to(root).as_posix()
        if name.split("/")[0] not in ("reference", "registration", "predict", "comparison", "benchmark") \
                and int(_json(metrics).get("epochs") or 0) > 0:
            runs.append(name)
    return runs


def test_method_values(pipeline: tuple[str, Path]) -> None:
    dataset, root = pipeline
    n_test = {"synthetic2d": 12, "synthetic3d": 6}[dataset]  # 20 % of the phantom set
    bound = SMOKE_BOUND_FACTOR * _json(root / "reference" / "mean_shape" / "metrics.json")["mre_mm"]
    runs = _trained_runs(root)
    assert set(METHOD_FILES) & set(runs), runs
    for method in runs:
        metrics = _json(root / method / "metrics.json")
        assert metrics["n_images"] == n_test, method
        assert math.isfinite(metrics["mre_mm"]) and metrics["mre_mm"] < bound, (method, metrics["mre_mm"], bound)
        assert metrics["train_seconds"] > 0 and metrics["peak_rss_mb"] > 0
        params = _json(root / method / "manifest.json")["parameters"]  # effective: defaults + overrides
        assert params["max_epochs"] == 2 and params["output_dir"].endswith(method)
        for name in ("predictions.csv", "metrics.json", "manifest.json", *METHOD_FILES.get(method, ())):
            assert (root / method / name).exists(), f"{method}: {name} missing"


def test_registration_values(pipeline: tuple[str, Path]) -> None:
    """The classical baseline: no training, its atlases from the train split, beats the mean shape clearly."""
    dataset, root = pipeline
    metrics = _json(root / "registration" / "metrics.json")
    mean_shape = _json(root / "reference" / "mean_shape" / "metrics.json")["mre_mm"]
    assert metrics["train_seconds"] == 0 and metrics["infer_seconds_per_image"] > 0 and metrics["epochs"] == 0
    assert len(metrics["atlases"]) == 2 and metrics["n_images"] == {"synthetic2d": 12, "synthetic3d": 6}[dataset]
    assert metrics["mre_mm"] < 0.85 * mean_shape, (metrics["mre_mm"], mean_shape)


def test_ensemble_values(pipeline: tuple[str, Path]) -> None:
    """The ensemble of the smoke runs: its members' summed costs, its figure, and no worse than its worst member
    (the median of three lies within their spread)."""
    dataset, root = pipeline
    if not (root / "ensemble").exists():
        pytest.skip(f"no ensemble job on {dataset}")
    metrics = _json(root / "ensemble" / "metrics.json")
    members = _json(root / "ensemble" / "manifest.json")["members"]
    runs = {m: _json(root / m / "metrics.json") for m in members}
    assert len(runs) == 3 and metrics["epochs"] == 0
    assert metrics["train_seconds"] == pytest.approx(sum(r["train_seconds"] for r in runs.values()))
    assert metrics["infer_seconds_per_image"] >= sum(r["infer_seconds_per_image"] for r in runs.values())
    assert metrics["mre_mm"] <= max(r["mre_mm"] for r in runs.values()), (metrics["mre_mm"], runs)
    assert (root / "ensemble" / "fig_cost.png").stat().st_size > 5_000


def test_ensemble_chosen_on_val_values(pipeline: tuple[str, Path]) -> None:
    """The ensemble chosen on val among the smoke runs: its steps, members among the candidates (their own
    val_predictions.csv), every candidate's training in its row."""
    dataset, root = pipeline
    if not (root / "ensemble_val").exists():
        pytest.skip(f"no ensemble_val job on {dataset}")
    metrics = _json(root / "ensemble_val" / "metrics.json")
    manifest = _json(root / "ensemble_val" / "manifest.json")
    candidates = manifest["candidates"]
    assert len(candidates) == 4 and set(manifest["members"]) <= set(candidates) and metrics["epochs"] == 0
    assert all(c["val_predictions"] == f"{name}/val_predictions.csv" for name, c in candidates.items())
    assert metrics["train_seconds"] >= sum(_json(root / n / "metrics.json")["train_seconds"] for n in candidates)
    steps = pd.read_csv(root / "ensemble_val" / "selection.csv")
    assert list(steps["step"]) == [1, 2, 3, 4] and steps["kept"].sum() == len(manifest["members"])
    assert steps.loc[steps["kept"], "added"].tolist() == list(manifest["members"])


def test_test_time_scales_values(pipeline: tuple[str, Path]) -> None:
    """Multi-scale TTA of the smoke runs: the base run's training time, three grids, the base's own scale reproduced
    (else the run would have stopped), inference over the three scales."""
    dataset, root = pipeline
    for job, base in (("heatmap_unet+tta", "heatmap_unet"), ("htc+tta", "htc")):
        if not (root / job).exists():
            continue
        metrics, own = _json(root / job / "metrics.json"), _json(root / base / "metrics.json")
        assert metrics["train_seconds"] == pytest.approx(own["train_seconds"]) and len(metrics["grid_sizes"]) == 3
        assert metrics["infer_seconds_per_image"] > own["infer_seconds_per_image"]
        assert _json(root / job / "manifest.json")["base_run"] == f"../{base}"


def test_shape_prior_values(pipeline: tuple[str, Path]) -> None:
    """The shape prior after the heatmap U-Net's smoke run: every variant scored on val, the lowest chosen and
    applied to test, the base run's costs counted, its val predictions kept beside the row."""
    dataset, root = pipeline
    folder = root / "heatmap_unet+shape"
    if not folder.exists():
        pytest.skip(f"no shape prior job on {dataset}")
    metrics, own = _json(folder / "metrics.json"), _json(root / "heatmap_unet" / "metrics.json")
    table = pd.read_csv(folder / "table_val_choice.csv")
    assert list(table["variant"]) == ["none", "similarity/outliers", "similarity/shape", "affine/outliers",
                                      "affine/shape"]
    assert table.loc[table["chosen"], "variant"].item() == metrics["chosen_variant"]
    assert table.loc[table["chosen"], "val_mre_mm"].item() == table["val_mre_mm"].min()
    assert metrics["train_seconds"] > own["train_seconds"] and metrics["epochs"] == 0
    assert metrics["infer_seconds_per_image"] > own["infer_seconds_per_image"]
    # the base run's val predictions are its own val_predictions.csv (no cache of them made): "none" scores them
    own_val = pd.read_csv(root / "heatmap_unet" / "val_predictions.csv")["error_mm"].mean()
    assert table.loc[table["variant"] == "none", "val_mre_mm"].item() == pytest.approx(own_val, abs=1e-3)
    assert not (folder / "base_val_predictions.csv").exists()
    assert _json(folder / "manifest.json")["base_run"] == "../heatmap_unet"


def test_generalisation_study_values(pipeline: tuple[str, Path]) -> None:
    """The study of the smoke runs: the base and its declared variant, the choice on validation, each run's test
    MRE its own."""
    dataset, root = pipeline
    if not (root / "generalisation").exists():
        pytest.skip(f"no generalisation job on {dataset}")
    record = _json(root / "generalisation" / "study.json")
    table = pd.read_csv(root / "generalisation" / "table_study.csv", index_col="run")
    assert record["runs"] == ["heatmap_unet_cpu", "heatmap_unet_cpu_aug_half"] == list(table.index)
    assert record["chosen"] == table["val MRE (mm)"].idxmin() and table["chosen"].sum() == 1
    for run in record["runs"]:
        own = _json(root / run / "metrics.json")
        assert table.loc[run, "val MRE (mm)"] == pytest.approx(own["best_val_mre_mm"])
        assert table.loc[run, "test MRE (mm)"] == pytest.approx(own["mre_mm"], abs=1e-3)
    assert table.loc["heatmap_unet_cpu_aug_half", "changes"] == "rotation_deg 10.0 -> 20.0; scale_range 0.1 -> 0.25"
    assert (root / "generalisation" / "fig_val_test.png").stat().st_size > 5_000


def test_comparison_values(pipeline: tuple[str, Path]) -> None:
    dataset, root = pipeline
    table = pd.read_csv(root / "comparison" / "table_main.csv", index_col="method")
    untrained = ("registration", "ensemble", "ensemble_val", "heatmap_unet+tta", "htc+tta",
                 "heatmap_unet+shape")  # epochs 0
    methods = {m for m in (*_trained_runs(root), *untrained) if (root / m).exists()}
    assert methods and set(table.index[table["kind"] == "method"]) == methods
    assert table.loc["reference/mean_shape", "kind"] == "reference"
    assert set(table.loc[table["kind"] == "method", "profile"]) == {"smoke"}
    assert (table["mre_mm"].diff().dropna() >= 0).all(), "Table 1 is sorted by MRE"
    for name in ("fig_sdr_curve.png", "fig_error_boxplot.png", "table_main.md", "table_main.tex"):
        assert (root / "comparison" / name).stat().st_size > 200


def test_mean_shape_reference_row(pipeline: tuple[str, Path]) -> None:
    dataset, root = pipeline
    metrics = _json(root / "reference" / "mean_shape" / "metrics.json")
    assert metrics["kind"] == "reference"
    assert metrics["mre_mm"] == pytest.approx({"synthetic2d": 6.55, "synthetic3d": 3.09}[dataset], abs=0.05)


def test_method_runs_follow_the_contract(pipeline: tuple[str, Path]) -> None:
    _, root = pipeline
    for folder in sorted(p.parent for p in root.rglob("predictions.csv") if "predict" not in p.relative_to(root).parts):
        preds, metrics = read_run(folder)
        assert math.isfinite(metrics["mre_mm"]) and metrics["mre_mm"] >= 0, folder.name
        assert metrics["n_images"] == preds["image_id"].nunique()


def test_predict_notebook_values(pipeline: tuple[str, Path]) -> None:
    """The predict notebook on the heatmap U-Net's test split: every landmark predicted, exports per image,
    regions at both levels calibrated on the validation split, coverage measured, the review list consistent."""
    dataset, root = pipeline
    folder = root / "predict"
    table = pd.read_csv(folder / "predictions.csv", dtype={"image_id": str})
    test = pd.read_csv(root / "heatmap_unet" / "predictions.csv", dtype={"image_id": str})
    assert set(table["image_id"]) == set(test["image_id"]) and len(table) == len(test)
    suffix = ".json" if dataset == "synthetic2d" else ".mrk.json"
    assert all((folder / f"{i}{suffix}").is_file() for i in set(table["image_id"]))
    assert {"region_90_mm", "region_95_mm", "uncertainty_mm", "review"} <= set(table.columns)
    assert (table["region_95_mm"] >= table["region_90_mm"]).all()
    assert len(pd.read_csv(folder / "review.csv")) == int(table["review"].sum())
    coverage = pd.read_csv(folder / "coverage.csv", index_col="nominal")
    assert set(coverage.index) == {"90 %", "95 %"} and coverage["n_points"].min() == len(table)
    assert len(list(folder.glob("fig_regions_*.png"))) == 2


def test_benchmark_values(pipeline: tuple[str, Path]) -> None:
    dataset, root = pipeline
    if not (root / "benchmark").exists():
        pytest.skip(f"no benchmark job on {dataset}")
    speed = pd.read_csv(root / "benchmark" / "table_speed.csv", index_col="method")
    assert set(speed.index) == {"heatmap_unet", "dilation_erosion", "global_local", "htc", "prior_guided"}
    assert (speed["gflop_per_step"] > 0).all() and (speed["step_s"] > 0).all()
    assert ((speed["pct_of_peak"] > 0) & (speed["pct_of_peak"] < 150)).all()
    layers = pd.read_csv(root / "benchmark" / "table_layers.csv", index_col=["method", "layer"])
    for unet in ("heatmap_unet", "dilation_erosion"):  # each U-Net's step split by convolution, whole
        assert layers.loc[unet, "gflop"].sum() == pytest.approx(speed.loc[unet, "gflop_per_step"], rel=1e-2)
        assert layers.loc[(unet, "rest of the step"), "pct_of_step"] > 0
    variants = pd.read_csv(root / "benchmark" / "table_variants.csv", index_col=0)
    assert variants.loc["as is (fp32)", "speedup"] == 1.0 and len(variants) == 5
    assert variants.loc[PYTORCH_LAYERS_VARIANT, "step_s"] > 0  # the U-Net with PyTorch's norm/PReLU backward
    assert variants.loc["head_channels 16", "step_s"] > 0  # the heatmap U-Net's 16-channel head, timed beside it
    local = pd.read_csv(root / "benchmark" / "table_local_inference.csv", index_col="method").loc["global_local"]
    assert local["nets_grouped_s"] > 0 and local["nets_one_by_one_s"] > 0  # the local stage at inference, both ways
    assert local["stage_s_grouped"] == pytest.approx(local["data_s"] + local["nets_grouped_s"], abs=2e-4)
    runs = pd.read_csv(root / "benchmark" / "table_runs.csv", index_col="method")
    assert {"heatmap_unet", "dilation_erosion"} <= set(runs.index) and (runs["mre_mm"] > 0).all()
    peer = root / "benchmark" / "table_peer.csv"
    if peer_python() is None:  # the peer section says it was skipped and leaves nothing half-written
        assert not peer.exists() and not (root / "benchmark" / "peer_result.json").exists()
    else:
        table = pd.read_csv(peer, index_col="quantity")
        assert list(table.index) == ["MRE (mm)", "training time (s)", "inference (s/image)"]
        assert (table["ours"] > 0).all() and (table["peer"] > 0).all()
        assert table.loc["MRE (mm)", "ratio_ci_low"] <= table.loc["MRE (mm)", "ratio"] <= table.loc["MRE (mm)", "ratio_ci_high"]
