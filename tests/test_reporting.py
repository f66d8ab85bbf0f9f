"""Run discovery, alignment, tables, the reference run, and the comparison notebook (papermill)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lmlib.data.geometry import Geometry
from lmlib.data.sample import Sample
from lmlib.evaluation import metrics as M
from lmlib.outputs import reference_runs
from lmlib.outputs.contract import predictions_frame, read_run, write_json, write_outputs
from lmlib.reporting import comparison as reporting
from lmlib.reporting import figures as plots

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "90_comparative_evaluation.ipynb"
NOISE_MM = {"alpha": 0.4, "beta": 1.2, "gamma": 3.0}  # expected MRE order alpha < beta < gamma


def synthetic_samples(n: int = 8) -> list[Sample]:
    """Test samples of the synthetic2d dataset when it can be loaded, else small hand-made ones."""
    try:
        from lmlib.data.datasets import load_dataset
        samples = load_dataset("synthetic2d", None, split="test").samples
        if samples:
            return samples[:n]
    except Exception:  # noqa: BLE001 - datasets/phantoms still being written
        pass
    rng = np.random.default_rng(0)
    geo = Geometry(spacing=(0.5, 0.5))
    names = ("S", "N", "Or", "Po", "A")
    out = []
    for i in range(n):
        idx = rng.uniform(10, 54, (len(names), 2))
        valid = np.ones(len(names), bool)
        valid[i % len(names)] = i % 3 != 0  # a few masked landmarks
        out.append(Sample.from_index(f"{i:03d}", rng.normal(size=(64, 64)), geo, idx, names, valid))
    return out


def noisy(samples: list[Sample], sigma: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [s.landmarks_mm + rng.normal(0.0, sigma, s.landmarks_mm.shape) for s in samples]


TIMINGS = {"train_seconds": 1.0, "infer_seconds_per_image": 0.1, "peak_rss_mb": 1.0}


def manifest(folder: Path, dataset: str = "synthetic2d", profile: str | None = "default", device: str = "cpu",
             finished: str = "2026-01-01T00:00:00+00:00") -> None:
    """The manifest a driver run leaves (``profile=None``: a run made outside the driver)."""
    data: dict = {"parameters": {"dataset": dataset}, "device": device, "finished": finished}
    if profile is not None:
        data["driver"] = {"notebook": "notebooks/x.ipynb", "profile": profile}
    write_json(folder / "manifest.json", data)


def method_run(folder: Path, samples: list[Sample], sigma: float, seed: int, profile: str | None = "default",
               dataset: str = "synthetic2d", device: str = "cpu", timings: dict | None = None) -> None:
    write_outputs(folder, predictions_frame(samples, noisy(samples, sigma, seed)), timings or TIMINGS)
    manifest(folder, dataset, profile, device)


@pytest.fixture()
def results(tmp_path: Path) -> tuple[Path, list[Sample]]:
    """results/synthetic2d/ with three good runs, a malformed one, reference runs and non-runs."""
    samples = synthetic_samples()
    root = tmp_path / "results" / "synthetic2d"
    for k, (method, sigma) in enumerate(NOISE_MM.items()):
        timings = {"train_seconds": 10.0 * (k + 1), "infer_seconds_per_image": 0.1, "peak_rss_mb": 500.0}
        method_run(root / method, samples, sigma, k, device="cuda:0" if method == "beta" else "cpu", timings=timings)
    broken = root / "broken"
    method_run(broken, samples, 1.0, 9)
    pd.read_csv(broken / "predictions.csv").drop(columns=["gt_y_mm"]).to_csv(broken / "predictions.csv", index=False)
    (root / "empty-method").mkdir()
    other = [s.with_landmarks_mm(p) for s, p in zip(samples, noisy(samples, 0.8, 7))]
    reporting.write_reference_run(samples, other, root / "inter-observer")
    manifest(root / "inter-observer", profile="smoke")  # references are compared whatever their profile
    # 05_reference_rows: output_dir reference/ holding the mean-shape sub-run (own manifest, no driver)
    reference_runs.write_mean_shape_run(samples[::2], samples, root / "reference" / "mean_shape", {"dataset": "synthetic2d"})
    manifest(root / "reference", profile="full")
    (root / "exploration").mkdir()
    (root / "exploration" / "manifest.json").write_text("{}")
    (root / ".tmp-comparison").mkdir()
    (root / "comparison").mkdir()
    return tmp_path / "results", samples


def test_discover_reports_malformed_by_name(results: tuple[Path, list[Sample]]) -> None:
    runs, skipped = reporting.discover_runs(results[0], "synthetic2d")
    assert sorted(runs) == ["alpha", "beta", "gamma", "inter-observer", "reference/mean_shape"]
    assert runs["reference/mean_shape"].kind == "reference" and runs["alpha"].kind == "method"
    reasons = dict(skipped)
    assert set(reasons) == {"broken", "empty-method"}
    assert "gt_y_mm" in reasons["broken"] and "missing" in reasons["empty-method"]
    assert str(results[0]) not in reasons["broken"]  # no machine paths in the report
    with pytest.raises(FileNotFoundError):
        reporting.discover_runs(results[0], "nope")


def test_table_main_order_cis_and_timings(results: tuple[Path, list[Sample]]) -> None:
    comp = reporting.load_comparison(results[0], "synthetic2d")
    assert comp.reference_methods == ["inter-observer", "reference/mean_shape"] and comp.profile == "default"
    table = reporting.table_main(comp, n_bootstrap=300, seed=0)
    order = [m for m in table.index if table.loc[m, "kind"] == "method"]
    assert order == ["alpha", "beta", "gamma"]
    assert list(table.columns[:3]) == ["kind", "profile", "device"]
    assert table.loc["beta", "device"] == "cuda:0" and table.loc["alpha", "profile"] == "default"
    assert table.loc["inter-observer", "profile"] == "smoke" and table.loc["reference/mean_shape", "profile"] == "-"
    assert table["mre_mm"].is_monotonic_increasing
    assert (table["mre_mm_ci_low"] <= table["mre_mm"]).all() and (table["mre_mm"] <= table["mre_mm_ci_high"]).all()
    assert table.loc["beta", "train_seconds"] == 20.0 and table.loc["inter-observer", "kind"] == "reference"
    preds, _ = read_run(results[0] / "synthetic2d" / "gamma")
    expected = M.overall_metrics(preds).iloc[0]
    for key in ("mre_mm", "sd_mm", "median_mm", "sdr_2mm", "n_masked", "n_over_4mm"):
        assert table.loc["gamma", key] == pytest.approx(expected[key], abs=1e-3)
    shown = reporting.format_table_main(table)
    assert shown.loc["inter-observer", "Train (s)"] == "-" and "±" in shown.loc["alpha", "MRE ± SD (mm) [95% CI]"]
    assert shown.loc["beta", "Device"] == "cuda:0" and shown.loc["inter-observer", "Device"] == "-"
    assert shown.loc["gamma", "Profile"] == "default" and shown.loc["reference/mean_shape", "Profile"] == "-"
    md = reporting.markdown_table(shown)
    assert "| Profile | Device |" in md and "cuda:0" in md
    assert "Profile & Device" in reporting.latex_table(shown)


def test_table_landmarks_and_writing(results: tuple[Path, list[Sample]], tmp_path: Path) -> None:
    comp = reporting.load_comparison(results[0], "synthetic2d")
    t2 = reporting.table_landmarks(comp, ["gamma", "alpha"])
    assert list(t2.columns) == ["gamma", "alpha"]
    assert list(t2.index) == list(results[1][0].landmark_names)
    preds, _ = read_run(results[0] / "synthetic2d" / "alpha")
    np.testing.assert_allclose(t2["alpha"], M.per_landmark_metrics(preds)["mre_mm"], atol=1e-3)
    paths = reporting.write_table(t2, tmp_path / "out", "table_landmarks")
    assert [p.name for p in paths] == ["table_landmarks.csv", "table_landmarks.md", "table_landmarks.tex"]
    md = paths[1].read_text(encoding="utf-8").splitlines()
    assert md[0].startswith("| landmark | gamma | alpha |") and len(md) == 2 + len(t2)
    assert r"\toprule" in paths[2].read_text(encoding="utf-8")


def test_markdown_and_latex_escaping() -> None:
    frame = pd.DataFrame({"MRE ± SD": ["1.0 ± 0.5"], "SDR 2 mm (%)": [88.123]}, index=pd.Index(["net_a|b"], name="Method"))
    md = reporting.markdown_table(frame)
    assert "net_a\\|b" in md and "88.12" in md
    tex = reporting.latex_table(frame, caption="50% & more", label="tab:x")
    assert r"net\_a|b" in tex and r"SDR 2 mm (\%)" in tex and r"$\pm$" in tex and r"50\% \& more" in tex


def test_alignment_drops_unshared_pairs_and_flags_bad_errors(tmp_path: Path) -> None:
    samples = synthetic_samples(4)
    full = predictions_frame(samples, noisy(samples, 1.0, 0))
    part = predictions_frame(samples, noisy(samples, 1.0, 1)).iloc[3:].copy()
    part["error_mm"] = part["error_mm"] * 10  # e.g. errors written in pixels
    errors, notes = reporting.align_runs({"full": full, "part": part})
    assert len(errors) == len(full) - 3
    assert any(n.startswith("full: 3 of") for n in notes)
    assert any(n.startswith("part: error_mm disagrees") for n in notes)
    np.testing.assert_allclose(errors["part"], M.compute_errors(part), equal_nan=True)


def test_a_pair_masked_in_one_run_s_reference_is_not_called_a_different_reference() -> None:
    """An observer row masks the points a second annotator did not give; the comparison noted that its "reference
    points differ" from the other runs' (and, had it been the first run, that every other run's did)."""
    samples = synthetic_samples(4)
    full = predictions_frame(samples, noisy(samples, 1.0, 0))
    observer = predictions_frame(samples, noisy(samples, 1.0, 1))
    observer.loc[[0, 5], ["gt_x_mm", "gt_y_mm", "gt_z_mm", "error_mm"]] = np.nan
    for runs in ({"full": full, "observer": observer}, {"observer": observer, "full": full}):
        _, notes = reporting.align_runs(runs)
        assert not any("differ" in n for n in notes), notes
        assert [n for n in notes if "masked in its own reference" in n] == [
            "observer: 2 pairs masked in its own reference (e.g. points a second annotator did not give), scored in "
            "the other runs"]
    moved = full.copy()
    moved.loc[1, "gt_x_mm"] += 3.0
    assert any(n.startswith("moved: reference points differ from the other runs' on 1 pairs")
               for n in reporting.align_runs({"full": full, "moved": moved})[1])


def test_unpredicted_landmarks_are_counted_in_table_1_and_named_in_the_notes(
        results: tuple[Path, list[Sample]]) -> None:
    """A run that leaves its worst landmarks unpredicted has them out of its MRE: Table 1 must show how many."""
    root, samples = results
    points = noisy(samples, 0.2, 11)
    points[0][0] = np.nan  # two landmarks with a reference, not predicted
    points[1][1] = np.nan
    method_run(root / "synthetic2d" / "skipper", samples, 0.2, 11)
    write_outputs(root / "synthetic2d" / "skipper", predictions_frame(samples, points), TIMINGS)
    comp = reporting.load_comparison(root, "synthetic2d")
    table = reporting.table_main(comp, n_bootstrap=50, seed=0)
    scored = int(table.loc["skipper", "n_points"])
    assert table.loc["skipper", "n_unpredicted"] == 2 and table.loc["alpha", "n_unpredicted"] == 0
    shown = reporting.format_table_main(table)
    assert shown.loc["skipper", "Unpredicted"] == f"2 ({100 * 2 / (scored + 2):.1f} %)"
    assert shown.loc["alpha", "Unpredicted"] == "0"
    assert any(n.startswith(f"skipper: 2 of {scored + 2} landmarks with a reference have no prediction")
               for n in comp.notes)
    hits = int((comp.errors["skipper"] < 2.0).sum())  # the unpredicted two are misses in the SDR and its CI
    assert table.loc["skipper", "sdr_2mm"] == pytest.approx(100 * hits / (scored + 2))
    assert table.loc["skipper", "sdr_2mm_ci_low"] <= table.loc["skipper", "sdr_2mm"] <= \
        table.loc["skipper", "sdr_2mm_ci_high"]
    assert int(comp.errors_long().query("method == 'skipper'")["unpredicted"].sum()) == 2
    assert not any(n.startswith("alpha:") for n in comp.notes)


def test_a_run_scored_against_another_annotator_is_left_out_and_named(tmp_path: Path) -> None:
    """hamedan-ceph scores against annotator1: a run trained and scored against annotator2 measures distances to
    other points, and must not rank beside the others (it was only noted that its reference points differ)."""
    samples = synthetic_samples(4)
    root = tmp_path / "hamedan-ceph"
    for name, annotator, sigma in (("a1", "", 1.0), ("a1-named", "annotator1", 1.2), ("a2", "annotator2", 0.1)):
        write_outputs(root / name, predictions_frame(samples, noisy(samples, sigma, 0)), TIMINGS)
        write_json(root / name / "manifest.json", {"parameters": {"dataset": "hamedan-ceph", "annotator": annotator},
                                                    "driver": {"profile": "full"}, "device": "cpu"})
    comp = reporting.load_comparison(tmp_path, "hamedan-ceph")
    assert sorted(comp.methods) == ["a1", "a1-named"]
    assert dict(comp.excluded) == {"a2": "scored against annotator annotator2's points, not the reference "
                                         "annotator annotator1's"}
    assert any(n.startswith("a2: scored against annotator annotator2") for n in comp.notes)


def test_pairs_that_do_not_fill_the_grid_are_not_unpredicted() -> None:
    """Runs sharing an uneven set of pairs left empty cells in the images x landmarks table, which the bootstrap read
    as unpredicted: SDR intervals below their own point estimate (95.3 [85.9, 100] for a row of 100 %)."""
    samples = synthetic_samples(4)
    full = predictions_frame(samples, [s.landmarks_mm + 0.1 for s in samples])
    part = predictions_frame(samples, noisy(samples, 1.0, 1)).iloc[3:].copy()
    errors, _ = reporting.align_runs({"full": full, "part": part})
    comp = reporting.Comparison("synthetic2d", {"full": full, "part": part}, {"full": {}, "part": {}}, errors)
    assert not comp.method_unpredicted("full").to_numpy().any()
    table = reporting.table_main(comp, n_bootstrap=200, seed=0)
    assert table.loc["full", "sdr_2mm"] == 100.0 and table.loc["full", "sdr_2mm_ci_low"] == 100.0


def test_write_reference_run_matches_by_id_and_name(tmp_path: Path) -> None:
    geo = Geometry(spacing=(1.0, 1.0))
    ref = [Sample("a", np.zeros((8, 8)), geo, [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]], [True, True, True], ("P", "Q", "R")),
           Sample("b", np.zeros((8, 8)), geo, [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]], [True, False, True], ("P", "Q", "R"))]
    # other annotator: different landmark order, lacks R, has an extra image
    other = [Sample("b", np.zeros((8, 8)), geo, [[1.0, 1.0], [3.0, 4.0]], [True, True], ("Q", "P")),
             Sample("a", np.zeros((8, 8)), geo, [[1.0, 1.0], [0.0, 0.5]], [True, True], ("Q", "P")),
             Sample("c", np.zeros((8, 8)), geo, [[1.0, 1.0], [0.0, 0.5]], [True, True], ("Q", "P"))]
    met = reporting.write_reference_run(ref, other, tmp_path / "inter-observer")
    preds, metrics = read_run(tmp_path / "inter-observer")
    assert metrics["kind"] == "reference" and metrics["train_seconds"] == 0.0
    np.testing.assert_allclose(preds["error_mm"].to_numpy(), [0.5, 0.0, np.nan, 5.0, np.nan, np.nan])
    assert met["mre_mm"] == pytest.approx(5.5 / 3) and met["n_images"] == 2
    row = M.overall_metrics(preds).iloc[0]
    # R, which the other annotator lacks, is a comparison not made (masked), not a miss: with Q of image b
    assert row["n_masked"] == 3 and row["n_unpredicted"] == 0
    with pytest.raises(ValueError):
        reporting.write_reference_run(ref, other[2:], tmp_path / "none")


def test_predictions_for_image_and_qualitative_fallback(results: tuple[Path, list[Sample]]) -> None:
    comp = reporting.load_comparison(results[0], "synthetic2d")
    sample = results[1][0]
    preds = reporting.predictions_for_image(comp, sample.image_id, sample.landmark_names)
    assert set(preds) == set(comp.methods) and preds["alpha"].shape == sample.landmarks_mm.shape
    samples, message = reporting.qualitative_samples("no-such-dataset", None, ["000"], 2)
    assert samples == [] and "skipped" in message


def test_other_dataset_and_missing_manifest_are_skipped(results: tuple[Path, list[Sample]]) -> None:
    results_dir, samples = results
    root = results_dir / "synthetic2d"
    method_run(root / "copied-3d", samples, 0.1, 1, dataset="synthetic3d")  # would be the best row
    write_outputs(root / "by-hand", predictions_frame(samples, noisy(samples, 0.1, 2)), TIMINGS)  # no manifest
    comp = reporting.load_comparison(results_dir, "synthetic2d")
    assert "copied-3d" not in comp.methods and "by-hand" not in comp.methods
    reasons = dict(comp.skipped)
    assert "'synthetic3d', not 'synthetic2d'" in reasons["copied-3d"]
    assert reasons["by-hand"].startswith("manifest.json: missing")


def test_method_runs_of_another_profile_are_excluded_and_named(results: tuple[Path, list[Sample]]) -> None:
    results_dir, samples = results
    root = results_dir / "synthetic2d"
    method_run(root / "heatmap_unet", samples, 0.1, 3, profile="smoke")
    method_run(root / "dilation_erosion", samples, 0.2, 4, profile="smoke")
    comp = reporting.load_comparison(results_dir, "synthetic2d")  # majority: 3 default vs 2 smoke
    assert comp.profile == "default"
    assert set(comp.methods) == {"alpha", "beta", "gamma", "inter-observer", "reference/mean_shape"}
    stale = "stale run of profile smoke"
    assert dict(comp.excluded) == {"heatmap_unet": stale, "dilation_erosion": stale}
    assert any(n.startswith("stale run of profile smoke: dilation_erosion, heatmap_unet") for n in comp.notes)
    smoke = reporting.load_comparison(results_dir, "synthetic2d", profile="smoke")
    assert set(smoke.methods) == {"heatmap_unet", "dilation_erosion", "inter-observer", "reference/mean_shape"}
    assert {m for m, _ in smoke.excluded} == {"alpha", "beta", "gamma"}
    method_run(root / "by-hand", samples, 0.3, 5, profile=None)  # outside the driver: kept, with a note
    comp = reporting.load_comparison(results_dir, "synthetic2d", profile="default")
    assert "by-hand" in comp.methods and any("profile unknown" in n and "by-hand" in n for n in comp.notes)


def test_majority_tie_goes_to_the_latest_profile(tmp_path: Path) -> None:
    samples = synthetic_samples(3)
    root = tmp_path / "synthetic2d"
    for name, profile, finished in (("a", "smoke", "2026-01-02"), ("b", "full", "2026-01-03")):
        write_outputs(root / name, predictions_frame(samples, noisy(samples, 1.0, 0)), TIMINGS)
        manifest(root / name, profile=profile, finished=finished)
    runs, _ = reporting.discover_runs(tmp_path, "synthetic2d")
    assert reporting.choose_profile(runs) == "full" and reporting.choose_profile(runs, "smoke") == "smoke"


def test_cascade_stage_sub_runs_are_rows(results: tuple[Path, list[Sample]]) -> None:
    results_dir, samples = results
    cascade = results_dir / "synthetic2d" / "global_local"
    method_run(cascade / "global", samples, 2.0, 11)
    method_run(cascade / "local", samples, 0.8, 12)
    write_outputs(cascade / "refine", predictions_frame(samples, noisy(samples, 1.0, 13)), TIMINGS)  # parent's manifest
    (cascade / "checkpoints").mkdir()  # not a run: ignored
    (cascade / "checkpoints" / "best.ckpt").write_bytes(b"x")
    manifest(cascade)
    broken = cascade / "bad"
    method_run(broken, samples, 1.0, 14)
    (broken / "metrics.json").write_text("{not json")
    comp = reporting.load_comparison(results_dir, "synthetic2d")
    assert {"global_local/global", "global_local/local", "global_local/refine"} <= set(comp.methods)
    assert "global_local" not in dict(comp.skipped)  # no predictions.csv of its own, but stages: not malformed
    assert "invalid JSON" in dict(comp.skipped)["global_local/bad"]
    assert not any("checkpoints" in m for m in [*comp.methods, *dict(comp.skipped)])
    table = reporting.table_main(comp, n_bootstrap=50)
    assert table.loc["global_local/local", "mre_mm"] < table.loc["global_local/global", "mre_mm"]
    assert table.loc["global_local/refine", "profile"] == "default"
    # a run folder with its own predictions keeps its row beside its stages ...
    method_run(results_dir / "synthetic2d" / "alpha" / "coarse", samples, 5.0, 15)
    comp = reporting.load_comparison(results_dir, "synthetic2d")
    assert {"alpha", "alpha/coarse"} <= set(comp.methods)
    # ... unless it is a copy of one of them (the last stage's outputs copied to the top folder)
    for name in ("predictions.csv", "metrics.json"):
        (cascade / name).write_bytes((cascade / "local" / name).read_bytes())
    comp = reporting.load_comparison(results_dir, "synthetic2d")
    assert "global_local" not in comp.methods and "global_local/local" in comp.methods
    assert "global_local: same predictions as its stage global_local/local, shown once as global_local/local" in comp.notes


def test_missing_mean_shape_is_noted(results: tuple[Path, list[Sample]]) -> None:
    results_dir, _ = results
    assert not any("mean_shape" in n for n in reporting.load_comparison(results_dir, "synthetic2d").notes)
    import shutil
    shutil.rmtree(results_dir / "synthetic2d" / "reference")
    comp = reporting.load_comparison(results_dir, "synthetic2d")
    assert any(n.startswith("no mean_shape reference run") for n in comp.notes)


def test_reference_rows_do_not_squeeze_the_figures(results: tuple[Path, list[Sample]]) -> None:
    results_dir, samples = results
    root = results_dir / "synthetic2d"
    far = [s.landmarks_mm + 60.0 for s in samples]  # a reference row far off every method
    reference_runs.write_reference_predictions(root / "reference" / "far", samples, far, "far", {"dataset": "synthetic2d"})
    comp = reporting.load_comparison(results_dir, "synthetic2d")
    assert "reference/far" in comp.reference_methods
    long = comp.errors_long()
    order = list(reporting.table_main(comp, n_bootstrap=20).index)
    trained_max = long.loc[~long["method"].isin(comp.reference_methods), "error_mm"].max()
    sdr = plots.fig_sdr_curve(long, order, reference_methods=comp.reference_methods)
    assert sdr.axes[0].get_xlim()[1] < 60.0
    assert [ln.get_linestyle() for ln in sdr.axes[0].lines if ln.get_label() == "reference/mean_shape"] == ["--"]
    box = plots.fig_error_boxplot(long, order, comp.reference_methods)
    assert trained_max <= box.axes[0].get_ylim()[1] < 60.0 and "clipped" in box.axes[0].get_title()
    assert plots.fig_error_boxplot(long, order).axes[0].get_ylim()[1] > 60.0  # no references named: no clipping
    heat = plots.fig_landmark_heatmap(reporting.table_landmarks(comp, order), reference_methods=comp.reference_methods)
    assert heat.axes[0].collections[0].get_clim()[1] < 60.0


@pytest.mark.notebook
def test_comparison_notebook(results: tuple[Path, list[Sample]], tmp_path: Path) -> None:
    pm = pytest.importorskip("papermill")
    results_dir, samples = results
    out = results_dir / "synthetic2d" / "comparison"
    pm.execute_notebook(str(NOTEBOOK), str(tmp_path / "executed.ipynb"), kernel_name="lmlib", cwd=str(REPO),
                        progress_bar=False, parameters={"dataset": "synthetic2d", "results_dir": str(results_dir),
                                                        "output_dir": str(out), "n_bootstrap": 200, "n_qualitative": 2})
    table = pd.read_csv(out / "table_main.csv", index_col="method")
    assert [m for m in table.index if table.loc[m, "kind"] == "method"] == ["alpha", "beta", "gamma"]
    assert table["mre_mm"].is_monotonic_increasing
    assert {"inter-observer", "reference/mean_shape"} <= set(table.index)
    assert set(table["profile"]) == {"default", "smoke", "-"} and table.loc["beta", "device"] == "cuda:0"
    assert "| Profile | Device |" in (out / "table_main.md").read_text(encoding="utf-8")
    for stem in ("table_main", "table_landmarks"):
        assert all((out / f"{stem}.{ext}").is_file() for ext in ("csv", "md", "tex"))
    for fig in ("fig_error_boxplot", "fig_sdr_curve", "fig_landmark_heatmap", "fig_significance"):
        assert 0 < (out / f"{fig}.png").stat().st_size < 1_000_000
    summary = json.loads((out / "comparison.json").read_text(encoding="utf-8"))
    assert {s["method"] for s in summary["skipped"]} == {"broken", "empty-method"}
    assert summary["methods"] == list(table.index) and summary["profile"] == "default"
    assert summary["runs"]["beta"] == {"kind": "method", "profile": "default", "device": "cuda:0"}
    text = (tmp_path / "executed.ipynb").read_text(encoding="utf-8")
    assert "SKIPPED broken" in text and "SKIPPED empty-method" in text
    assert (out / "manifest.json").is_file()
    overlays = sorted(out.glob("fig_qualitative_*.png"))
    if samples[0].meta.get("split") == "test":  # samples came from lmlib.data.datasets: overlays expected
        said = [line for line in text.split("\\n") if "qualitative overlays" in line]
        assert len(overlays) == 2, said
    else:
        assert "qualitative overlays skipped" in text


def test_dataset_options_rebuild_the_afids_deformation_set() -> None:
    from lmlib.reporting.comparison import Comparison

    manifests = {"a": {"parameters": {"n_deformed": 30}}, "reference/mean_shape": {"parameters": {"n_deformed": 30}},
                 "b": {"parameters": {}}}
    comp = Comparison("afids-mni", {}, {}, pd.DataFrame(), manifests=manifests)
    assert comp.dataset_options() == {"deformed": 30}
    assert Comparison("hamedan-ceph", {}, {}, pd.DataFrame(), manifests=manifests).dataset_options() == {}


def test_rows_of_images_outside_the_current_test_split_are_left_out_with_a_note(
        results: tuple[Path, list[Sample]]) -> None:
    root, samples = results
    keep = [s.image_id for s in samples[1:]]
    comp = reporting.load_comparison(root, "synthetic2d", test_ids=keep)
    assert set(comp.errors.index.get_level_values("image_id")) == set(keep)
    assert any(samples[0].image_id in n and "current test split" in n for n in comp.notes)
    full = reporting.load_comparison(root, "synthetic2d")
    assert set(full.errors.index.get_level_values("image_id")) == {s.image_id for s in samples}


def test_an_intra_observer_row_is_shown_beside_the_others_but_never_aligned(
        results: tuple[Path, list[Sample]]) -> None:
    root, samples = results
    # two "copies" of one picture: the same grid, the second annotation 0.5 mm off
    a, b = samples[0], samples[1]
    copy = Sample(b.image_id, a.image, a.geometry, a.landmarks_mm + 0.5, a.valid.copy(), a.landmark_names,
                  {"split": "train"})
    first = Sample(a.image_id, a.image, a.geometry, a.landmarks_mm, a.valid.copy(), a.landmark_names,
                   {"split": "train"})
    metrics = reference_runs.write_intra_observer_run([first, copy], [[a.image_id, b.image_id]],
                                                      root / "synthetic2d" / "reference" / "intra-observer",
                                                      {"dataset": "synthetic2d"})
    assert metrics["mre_mm"] == pytest.approx(0.5 * np.sqrt(2), abs=1e-3)
    assert metrics["scored_on"] == reference_runs.OWN_IMAGES and metrics["n_pairs"] == 1
    comp = reporting.load_comparison(root, "synthetic2d")
    assert "reference/intra-observer" not in comp.methods and "reference/intra-observer" in comp.own_images
    assert len(comp.errors) == len(samples) * len(samples[0].landmark_names)  # the others still align on all
    table = reporting.table_main(comp, n_bootstrap=50)
    assert table.loc["reference/intra-observer", "n_images"] == 1
    assert table.loc["reference/intra-observer", "mre_mm"] == pytest.approx(0.5 * np.sqrt(2), abs=1e-3)
    reporting.write_comparison_summary(comp, root / "out", table, pd.DataFrame())


def test_intra_observer_pairs_refuse_copies_on_different_grids() -> None:
    s = synthetic_samples(2)
    moved = Sample(s[1].image_id, s[0].image, Geometry(s[0].geometry.spacing * 2), s[0].landmarks_mm, s[0].valid,
                   s[0].landmark_names)
    with pytest.raises(ValueError, match="different grids"):
        reference_runs.intra_observer_pairs([s[0], moved], [[s[0].image_id, s[1].image_id]])
    assert reference_runs.intra_observer_pairs(s, [["absent", s[0].image_id]]) == ([], [])


def test_a_run_made_with_set_overrides_is_named_so_in_the_profile_column() -> None:
    """A --set run said "default" in the comparison as if run at the declared settings (issue 24)."""
    from lmlib.reporting.comparison import profile_label

    assert profile_label({"driver": {"profile": "default"}}) == "default"
    assert profile_label({"driver": {"profile": "default", "overrides": {"max_epochs": 20, "device": "cpu"}}}) == \
        "default + device=cpu, max_epochs=20"
    assert profile_label({}) == "-"


def test_matrix_figures_keep_main_rows_and_the_best_variants() -> None:
    names = ["a_main", "v1", "v2", "ref", "v3", "b_main"]
    errors = pd.DataFrame(np.ones((2, len(names))), columns=names)
    roles = {"a_main": "main", "b_main": "main", "ref": "reference", "v1": "ablation", "v2": "ablation",
             "v3": "ablation"}
    comp = reporting.Comparison("d", {}, {}, errors, roles=roles)
    order = ["v2", "a_main", "v3", "ref", "v1", "b_main"]  # the table's order, lowest MRE first
    assert comp.matrix_methods(order, n_best=2) == ["v2", "a_main", "v3", "ref", "b_main"]
    assert comp.matrix_methods(order, n_best=0) == comp.main_methods(order)
    assert comp.matrix_methods(order, n_best=10) == order


def test_few_test_images_are_noted_once_in_their_unit(results: tuple[Path, list[Sample]]) -> None:
    comp = reporting.load_comparison(results[0], "synthetic2d")
    n = len(results[1])
    assert f"only {n} test image(s) (fewer than 10): the 95 % intervals (bootstrap over images) and the paired tests " \
           "(by image) are indicative only" in comp.notes
