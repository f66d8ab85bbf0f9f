"""The generalisation study (lmlib.reporting.study): the choice is made on validation only, even when another run is
better on test; each row says what it changed and is paired with the base by image; runs it cannot compare are
refused with the folder named."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmlib.engine.runner import load_run_data
from lmlib.evaluation.metrics import error_matrix
from lmlib.evaluation.statistics import bootstrap_ci, holm, resample_indices, wilcoxon_paired
from lmlib.outputs.contract import predictions_frame, read_run, write_outputs
from lmlib.outputs.manifest import write_manifest
from lmlib.reporting import study

BASE = {"dataset": "synthetic2d", "output_dir": "x", "rotation_deg": 10.0, "image_size": [128, 128]}
# run -> (validation MRE mm, test noise SD mm, its parameters)
RUNS = {"base": (1.0, 1.0, BASE),
        "picked_on_val": (0.8, 1.3, {**BASE, "output_dir": "y", "rotation_deg": 20.0}),
        "best_on_test": (1.2, 0.4, {**BASE, "output_dir": "z", "image_size": [160, 160]})}


def _run(root: Path, name: str, val: float | None, sd: float, params: dict, test: list, profile: str | None = "full",
         seed: int = 0, reverse: bool = False, masked: bool = False, checksum_of: list | None = None) -> None:
    """A fake finished run: the truth plus Gaussian noise of ``sd`` mm; ``reverse``: its predictions.csv lists the
    images in reverse order; ``masked``: landmark 0 of the first image unpredicted."""
    rng = np.random.default_rng(seed)
    world = [s.landmarks_mm + rng.normal(0.0, sd, s.landmarks_mm.shape) for s in test]
    if masked:
        world[0][0] = np.nan
    extra = {"epochs": 10, **({} if val is None else {"best_val_mre_mm": val})}
    order = slice(None, None, -1) if reverse else slice(None)
    write_outputs(root / name, predictions_frame(test[order], world[order]),
                  {"train_seconds": 600.0, "infer_seconds_per_image": 0.1, "peak_rss_mb": 1.0}, extra)
    write_manifest(root / name, params, samples=checksum_of or test, device="cpu",
                   extra={"driver": {"profile": profile}} if profile else None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """The base and two variants on synthetic2d's test split; best_on_test listed in reverse image order and with one
    masked point (the study must align and pair them all the same)."""
    results = tmp_path_factory.mktemp("study")
    test = load_run_data({"dataset": "synthetic2d"}).split("test")
    for k, (name, (val, sd, params)) in enumerate(RUNS.items()):
        _run(results / "synthetic2d", name, val, sd, params, test, seed=k, reverse=name == "best_on_test",
             masked=name == "best_on_test")
    return results, test


def test_the_choice_is_made_on_validation_even_when_another_run_wins_on_test(runs: tuple[Path, list],
                                                                          tmp_path: Path) -> None:
    results, test = runs
    root = results / "synthetic2d"
    table = study.study_table(results, "synthetic2d", "base", ["picked_on_val", "best_on_test"], n_bootstrap=200)
    assert list(table.index[table["chosen"]]) == ["picked_on_val"]
    assert table["test MRE (mm)"].idxmin() == "best_on_test"
    # each row: what it changed against the base (where it was written is not a setting)
    assert table.loc["base", "changes"] == "(the base)"
    assert table.loc["picked_on_val", "changes"] == "rotation_deg 10.0 -> 20.0"
    assert table.loc["best_on_test", "changes"] == "image_size [128, 128] -> [160, 160]"
    errors = {name: error_matrix(read_run(root / name)[0]) for name in RUNS}
    images = errors["base"].index
    idx = resample_indices(len(images), 200, 0)
    for name in RUNS:
        own = read_run(root / name)[1]["mre_mm"]  # the run's own metrics.json (predictions.csv: 4 decimals)
        row = table.loc[name]
        assert row["test MRE (mm)"] == pytest.approx(own, abs=1e-4)
        assert row["vs base (mm)"] == pytest.approx(row["test MRE (mm)"] - table.loc["base", "test MRE (mm)"])
        # the same image resamples for every run, drawn over the base's image order
        ci = bootstrap_ci(errors[name].reindex(images), indices=idx).loc["mre_mm"]
        assert (row["CI low"], row["CI high"]) == pytest.approx((ci["ci_low"], ci["ci_high"]))
    # paired by image over the points both runs have, Holm over the two variants
    p = []
    for name in ("picked_on_val", "best_on_test"):
        a = errors[name].reindex(images)
        b = errors["base"].where(a.notna())
        p.append(wilcoxon_paired(a.mean(axis=1).to_numpy(), b.mean(axis=1).to_numpy())["p_value"])
    assert list(table.loc[["picked_on_val", "best_on_test"], "p (Holm)"]) == pytest.approx(list(holm(p)))
    assert table.loc["best_on_test", "vs base (mm)"] < -0.5 and table.loc["best_on_test", "p (Holm)"] < 0.01
    assert table.loc["picked_on_val", "vs base (mm)"] > 0.0
    record = study.write_study(table, tmp_path, "base")
    assert record["chosen"] == "picked_on_val" and record["best_on_test"] == "best_on_test"
    assert record["test_diff_vs_base_mm"] == pytest.approx(table.loc["picked_on_val", "vs base (mm)"])
    assert json.loads((tmp_path / "study.json").read_text()) == record
    assert "| picked_on_val | rotation_deg 10.0 -> 20.0 | 0.80 |" in (tmp_path / "table_study.md").read_text()
    assert (tmp_path / "fig_val_test.png").stat().st_size > 5_000
    words = study.conclusion(record)
    assert words[0].startswith("chosen on validation: picked_on_val") and "best_on_test" in words[-1]
    study.write_study_manifest(tmp_path, {"base": "base"}, root / "base", record, "now", 0, "cpu")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["data_checksum"] == json.loads((root / "base" / "manifest.json").read_text())["data_checksum"]
    assert manifest["study"] == record


def test_runs_it_cannot_compare_are_refused_naming_the_folder(runs: tuple[Path, list]) -> None:
    results, test = runs
    root = results / "synthetic2d"
    _run(root, "smoke_run", 0.5, 1.0, BASE, test, profile="smoke")
    with pytest.raises(ValueError, match=r"smoke_run: made with driver profile 'smoke', the study compares 'full'"):
        study.study_table(results, "synthetic2d", "base", ["smoke_run"])
    with pytest.raises(ValueError, match=r"base: made with driver profile 'full', the study compares 'smoke'"):
        study.study_table(results, "synthetic2d", "base", ["smoke_run"], profile="smoke")
    _run(root, "by_hand", 0.5, 1.0, BASE, test, profile=None)
    with pytest.raises(ValueError, match=r"by_hand/manifest.json: no driver profile \(not made by the driver\)"):
        study.study_table(results, "synthetic2d", "by_hand", ["base"])
    _run(root, "other_data", 0.5, 1.0, BASE, test, checksum_of=test[:1])
    with pytest.raises(ValueError, match=r"other_data: data checksum .* the runs did not see the same data"):
        study.study_table(results, "synthetic2d", "base", ["other_data"])
    _run(root, "no_val", None, 1.0, BASE, test)
    with pytest.raises(ValueError, match=r"no_val/metrics.json: no best_val_mre_mm"):
        study.study_table(results, "synthetic2d", "base", ["no_val"])
    _run(root, "fewer_images", 0.5, 1.0, BASE, test[:-1], checksum_of=test)
    with pytest.raises(ValueError, match=r"fewer_images: its test images or landmarks differ from the base's"):
        study.study_table(results, "synthetic2d", "base", ["fewer_images"])
    with pytest.raises(FileNotFoundError, match=r"missing/manifest.json: missing \(run the job first\)"):
        study.study_table(results, "synthetic2d", "base", ["missing"])
    with pytest.raises(ValueError, match=r"no variants of 'base'"):
        study.study_table(results, "synthetic2d", "base", [])


def test_the_variants_are_the_jobs_declared_as_such() -> None:
    from lmlib.run import JOBS, variants_of

    variants = variants_of("heatmap_unet_cpu", "hamedan-ceph")
    assert variants == ["heatmap_unet_cpu_aug_paper", "heatmap_unet_cpu_aug_half", "heatmap_unet_cpu_fine_grid",
                        "heatmap_unet_cpu_long", "heatmap_unet_cpu_labels_aligned"]
    assert variants_of("heatmap_unet_cpu", "synthetic2d") == ["heatmap_unet_cpu_aug_half"]  # the smoke run's
    jobs = {job.method: job for job in JOBS}
    base = jobs["heatmap_unet_cpu"].parameters("hamedan-ceph", "full")
    for name in variants:  # a full training of the same method, one setting (or one pair of ranges) changed
        job = jobs[name]
        assert job.runs == jobs["heatmap_unet_cpu"].runs and set(job.datasets) >= {"hamedan-ceph"}
        changed = {k for k, v in job.parameters("hamedan-ceph", "full").items() if base.get(k) != v}
        # a finer grid keeps the target's width in mm: sigma (px of the grid) scaled with it
        assert changed in ({"rotation_deg", "scale_range"}, {"image_size", "sigma"}, {"max_epochs"},
                           {"train_labels"}), (name, changed)
        if "sigma" in changed:
            params = job.parameters("hamedan-ceph", "full")
            assert params["sigma"] / base["sigma"] == params["image_size"][0] / base["image_size"][0]
    assert variants_of("htc", "hamedan-ceph") == []


def test_a_variant_of_the_training_labels_may_differ_in_checksum_and_an_unrecorded_name_counts_at_its_default(
        runs: tuple[Path, list]) -> None:
    """Fused training labels change the training landmarks, so the data checksum: that variant is compared (its test
    images are checked as any run's); another checksum without that setting is still refused. A shared name the base
    never recorded (declared by its notebook later) is no change when the variant holds its default."""
    results, test = runs
    root = results / "synthetic2d"
    _run(root, "labels", 0.9, 1.0, {**BASE, "train_labels": "mean_aligned", "torch_compile": False}, test,
         checksum_of=test[:1])
    table = study.study_table(results, "synthetic2d", "base", ["labels"], n_bootstrap=50)
    assert table.loc["labels", "changes"] == "train_labels reference -> mean_aligned"
    _run(root, "not_labels", 0.9, 1.0, {**BASE, "train_labels": "reference"}, test, checksum_of=test[:1])
    with pytest.raises(ValueError, match=r"not_labels: data checksum .* the runs did not see the same data"):
        study.study_table(results, "synthetic2d", "base", ["not_labels"])
