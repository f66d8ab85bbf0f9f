"""An ensemble of finished runs (lmlib.methods.ensemble): the median removes one member's gross miss, the row counts
every member's cost, and a member it cannot use is refused with a message naming it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lmlib.engine.runner import load_run_data, run_method
from lmlib.evaluation.metrics import mean_radial_error
from lmlib.methods.ensemble import RunEnsemble, combine_points, select_on_val
from lmlib.outputs.contract import ContractError, predictions_frame, read_run, write_outputs
from lmlib.outputs.manifest import write_manifest

COSTS = {"a": (100.0, 0.10), "b": (200.0, 0.20), "c/local": (300.0, 0.30)}  # train s, s per image


def _member(root: Path, name: str, dataset: str, world: list[np.ndarray], costs: tuple[float, float], test) -> None:
    folder = root / name
    write_outputs(folder, predictions_frame(test, world), {"train_seconds": costs[0], "infer_seconds_per_image":
                                                           costs[1], "peak_rss_mb": 1.0}, {"method": name})
    write_manifest(folder, {"dataset": dataset, "output_dir": str(folder)}, device="cpu")  # each run's own key


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """Three fake finished runs on synthetic2d's test split: a and b within 1 mm of the truth (independent noise),
    c/local as good but 20 mm off on landmark 0 of every image (one member's gross miss)."""
    root = tmp_path_factory.mktemp("ensemble") / "synthetic2d"
    test = load_run_data({"dataset": "synthetic2d"}).split("test")
    rng = np.random.default_rng(0)
    for name in COSTS:
        world = [s.landmarks_mm + rng.normal(0.0, 0.6, s.landmarks_mm.shape) for s in test]
        if name == "c/local":
            for w in world:
                w[0] += 20.0
        _member(root, name, "synthetic2d", world, COSTS[name], test)
    return root, test


def test_the_median_removes_one_members_gross_miss_and_the_mean_does_not() -> None:
    truth = np.zeros((2, 2))
    runs = [[truth + 0.1], [truth - 0.1], [truth + np.array([[30.0, 0.0], [0.0, 0.0]])]]
    median, mean = combine_points(runs, "median")[0], combine_points(runs, "mean")[0]
    assert np.abs(median).max() == pytest.approx(0.1) and mean[0, 0] == pytest.approx(10.0)
    runs[0][0] = np.array([[np.nan, np.nan], [0.1, 0.1]])  # a member without landmark 0: left out there
    both = combine_points(runs, "median")[0]
    assert both[0, 0] == pytest.approx(14.95) and both[1, 0] == pytest.approx(0.0)


def test_the_ensemble_beats_every_member_and_counts_their_costs(members: tuple[Path, list]) -> None:
    root, test = members
    result = run_method("ensemble", {"dataset": "synthetic2d", "output_dir": str(root / "ensemble"),
                                     "members": list(COSTS)})
    mre = {name: read_run(root / name)[1]["mre_mm"] for name in COSTS}
    assert result.metrics["mre_mm"] < 0.9 * min(mre.values()), (result.metrics["mre_mm"], mre)
    assert mre["c/local"] > 3.0  # the gross miss (20 mm on 1 of 8 landmarks) is in that member's own row
    assert result.metrics["train_seconds"] == pytest.approx(600.0)
    assert 0.6 <= result.metrics["infer_seconds_per_image"] < 0.7 and result.metrics["epochs"] == 0
    manifest = json.loads((root / "ensemble" / "manifest.json").read_text())
    assert list(manifest["members"]) == list(COSTS) and manifest["members"]["b"]["device"] == "cpu"
    from lmlib.reporting.ensemble_figures import ensemble_table, fig_cost

    table = ensemble_table(root / "ensemble")
    assert list(table.index) == [*COSTS, "ensemble (median of 3)"]
    assert table.loc["ensemble (median of 3)", "train (min)"] == pytest.approx(10.0)
    fig_cost(table, root / "ensemble" / "fig_cost.png")
    assert (root / "ensemble" / "fig_cost.png").stat().st_size > 5_000


def test_a_member_it_cannot_use_is_refused_naming_it(members: tuple[Path, list]) -> None:
    root, test = members
    params = {"dataset": "synthetic2d", "output_dir": str(root / "refused")}
    with pytest.raises(FileNotFoundError, match=r"missing/stage: no finished run here .*run the 'missing' job"):
        run_method("ensemble", {**params, "members": ["a", "missing/stage"]})
    _member(root, "other", "synthetic3d", [s.landmarks_mm for s in test], (1.0, 1.0), test)
    with pytest.raises(ContractError, match=r"other/manifest.json: a run on 'synthetic3d', not on 'synthetic2d'"):
        run_method("ensemble", {**params, "members": ["a", "other"]})
    with pytest.raises(ValueError, match=r"members=\['a'\]: must be a list of at least two run folder names"):
        run_method("ensemble", {**params, "members": ["a"]})
    with pytest.raises(ValueError, match="at least two different member runs"):
        RunEnsemble(2, 2, members=["a", "a"])
    # a cascade's later stage already counts its first stage's training time: not an independent member
    _member(root, "c/global", "synthetic2d", [s.landmarks_mm for s in test], (1.0, 1.0), test)
    (root / "c" / "manifest.json").write_text(json.dumps({"stages": ["global", "local"]}))
    with pytest.raises(ValueError, match=r"c/local: its row already includes the run 'c/global'"):
        run_method("ensemble", {**params, "members": ["c/global", "c/local"]})


def test_a_3d_ensemble_combines_every_axis(tmp_path: Path) -> None:
    """3D (afids-templates' ensemble): the median over four members on each of x, y and z; one member's gross miss
    along z on one landmark does not reach the combined row, and the row keeps every member's cost."""
    root = tmp_path / "synthetic3d"
    test = load_run_data({"dataset": "synthetic3d"}).split("test")
    rng = np.random.default_rng(1)
    costs = {"reg": (0.0, 40.0), "unet": (1000.0, 0.3), "gl/local": (1100.0, 0.6), "pg/correlated": (1500.0, 0.7)}
    for name, cost in costs.items():
        world = [s.landmarks_mm + rng.normal(0.0, 0.6, s.landmarks_mm.shape) for s in test]
        if name == "gl/local":
            for w in world:
                w[0, 2] += 25.0
        _member(root, name, "synthetic3d", world, cost, test)
    result = run_method("ensemble", {"dataset": "synthetic3d", "output_dir": str(root / "ensemble"),
                                     "members": list(costs)})
    mre = {name: read_run(root / name)[1]["mre_mm"] for name in costs}
    assert result.metrics["mre_mm"] < 0.9 * min(mre.values()), (result.metrics["mre_mm"], mre)
    frame = read_run(root / "ensemble")[0]
    assert {"x_mm", "y_mm", "z_mm"} <= set(frame.columns) and frame["error_mm"].max() < 5.0
    assert result.metrics["train_seconds"] == pytest.approx(3600.0)


def test_select_on_val_keeps_the_path_prefix_of_lowest_val_error() -> None:
    """Greedy forward selection: the best single candidate first, then the addition that gives the combination the
    lowest val MRE, on to max_members; the members are the prefix of lowest val MRE, so a biased candidate added last
    is left out, and a median of two (their mean) that validates worse than the best run alone does not stop the path
    before a third member that beats it."""
    val = load_run_data({"dataset": "synthetic2d"}).split("val")
    rng = np.random.default_rng(3)
    noisy = {name: [s.landmarks_mm + rng.normal(0.0, sd, s.landmarks_mm.shape) for s in val]
             for name, sd in (("a", 0.5), ("b", 0.6), ("c", 0.6))}
    noisy["biased"] = [s.landmarks_mm + 3.0 for s in val]
    chosen, steps = select_on_val({"biased": noisy["biased"], **noisy}, val, "median", max_members=4)
    assert chosen[0] == "a" and set(chosen) == {"a", "b", "c"}, chosen
    singles = {n: mean_radial_error(p, val) for n, p in noisy.items()}
    assert [s["added"] for s in steps] == [*chosen, "biased"] and [s["kept"] for s in steps] == [True] * 3 + [False]
    assert steps[0]["val_mre_mm"] == pytest.approx(singles["a"])
    assert steps[2]["val_mre_mm"] < steps[1]["val_mre_mm"] < steps[0]["val_mre_mm"] < 0.9 * singles["b"]
    assert select_on_val(noisy, val, max_members=2)[0] == chosen[:2]  # the cap
    # "b" as noisy as "a" but far off on landmark 0: its mean with "a" is worse than "a", the median of three with "c"
    # (far off on landmark 1) removes both misses
    far = {"a": noisy["a"], **{name: [s.landmarks_mm + rng.normal(0.0, 0.5, s.landmarks_mm.shape) + shift
                                      for s in val] for name, shift in (("b", np.eye(8, 2)[:, [0, 0]] * 8.0),
                                                                        ("c", np.eye(8, 2, -1)[:, [0, 0]] * 8.0))}}
    chosen, steps = select_on_val(far, val, "median", max_members=3)
    assert steps[1]["val_mre_mm"] > steps[0]["val_mre_mm"] > steps[2]["val_mre_mm"] and len(chosen) == 3, steps
    ensemble = RunEnsemble(2, 8, members=list(noisy), select="val", max_members=2)
    assert ensemble.choose(noisy, val)[0] == select_on_val(noisy, val, max_members=2)[0]
    assert RunEnsemble(2, 8, members=list(noisy)).choose({}, val) == (list(noisy), [])  # select none: as listed


def test_an_ensemble_chosen_on_val_reads_the_val_predictions_on_record_and_counts_every_candidate(
        members: tuple[Path, list], tmp_path: Path) -> None:
    """Candidates with their val predictions: a's and c/local's own val_predictions.csv, b's from a refinement's
    cache beside it made from b (key = b's manifest hash); the row's training time is all candidates' (each had to be
    trained to be compared), its time per image the chosen members'. A candidate without val predictions on record,
    a cache made from another run, and a refit are refused naming the folder."""
    import shutil

    from lmlib.engine.base_run import manifest_key
    from lmlib.outputs.contract import BASE_VAL_CACHE, write_val_predictions

    root = tmp_path / "synthetic2d"
    shutil.copytree(members[0], root)
    val = load_run_data({"dataset": "synthetic2d"}).split("val")
    rng = np.random.default_rng(4)
    for name in ("a", "c/local"):
        world = [s.landmarks_mm + rng.normal(0.0, 0.6, s.landmarks_mm.shape) for s in val]
        if name == "c/local":
            world = [w + 5.0 for w in world]  # 7 mm off everywhere on val
        write_val_predictions(root / name, val, world)
    cache = root / "b+local" / BASE_VAL_CACHE
    params = {"dataset": "synthetic2d", "output_dir": str(root / "chosen"), "members": list(COSTS), "select": "val"}
    with pytest.raises(FileNotFoundError, match=r"synthetic2d/b: no val predictions on record"):
        run_method("ensemble", params)
    cache.parent.mkdir()
    predictions_frame(val, [s.landmarks_mm + rng.normal(0.0, 0.6, s.landmarks_mm.shape) for s in val]).to_csv(
        cache, index=False)
    cache.with_suffix(".key").write_text("0123456789ab\n1.0\n")  # made from another run
    with pytest.raises(FileNotFoundError, match=r"synthetic2d/b: no val predictions on record"):
        run_method("ensemble", params)
    cache.with_suffix(".key").write_text(f"{manifest_key(root / 'b')}\n1.0\n")
    result = run_method("ensemble", params)
    manifest = json.loads((root / "chosen" / "manifest.json").read_text())
    assert manifest["parameters"]["select"] == "val" and list(manifest["candidates"]) == list(COSTS)
    chosen = list(manifest["members"])
    assert "c/local" not in chosen and len(chosen) == 2, chosen  # its val error keeps it out
    steps = pd.read_csv(root / "chosen" / "selection.csv")
    assert list(steps["added"]) == [*chosen, "c/local"] and list(steps["kept"]) == [True, True, False]
    # a + b + c/local, though c/local is not used, and their val predictions: a's and c/local's own files, 12 images
    # x their time per image; b's cache records 1.0 s
    assert result.metrics["train_seconds"] == pytest.approx(600.0 + 12 * 0.1 + 1.0 + 12 * 0.3)
    assert result.metrics["infer_seconds_per_image"] == pytest.approx(0.3, abs=0.01)  # a + b
    assert result.metrics["mre_mm"] < min(read_run(root / n)[1]["mre_mm"] for n in chosen)
    from lmlib.reporting.ensemble_figures import ensemble_table, fig_cost, selection_table

    table = ensemble_table(root / "chosen")
    label = "ensemble (median of 2, chosen on val among 3)"
    assert list(table.index) == [*COSTS, label] and list(table["chosen"]) == [True, True, False, True]
    assert table.loc["c/local", "val MRE (mm)"] > 5.0 and table.loc[label, "train (min)"] == pytest.approx(605.8 / 60)
    assert list(selection_table(root / "chosen")["added"]) == [*chosen, "c/local"]
    fig_cost(table, tmp_path / "fig_cost.png")
    refit = json.loads((root / "a" / "manifest.json").read_text())
    refit["parameters"]["fit_splits"] = "train+val"
    (root / "a" / "manifest.json").write_text(json.dumps(refit))
    with pytest.raises(ValueError, match=r"synthetic2d/a: a refit .* choosing on its val predictions"):
        run_method("ensemble", params)


def test_a_candidate_and_a_refinement_built_on_it_are_never_combined_and_counted_once(
        members: tuple[Path, list], tmp_path: Path) -> None:
    """Candidates may include a run and a refinement's stage built on it (hand-xray's heatmap_unet and
    heatmap_unet+local/local2): before this the run was refused as a non-independent member. The pair is never
    combined (the path ends when nothing else may be added), and the base's training is counted once, in the
    refinement's row. Two runs built on a third are refused (both rows count its training)."""
    import shutil

    from lmlib.outputs.contract import write_val_predictions

    root = tmp_path / "synthetic2d"
    shutil.copytree(members[0], root)
    test = members[1]
    val = load_run_data({"dataset": "synthetic2d"}).split("val")
    rng = np.random.default_rng(5)
    # a+ref/local2: the last stage of a refinement of a (its row counts a's 100 s and its own 50 s), the best on val;
    # laid out as the driver writes a refinement (the stages and the base run in the parent folder's manifest)
    _member(root, "a+ref/local2", "synthetic2d", [s.landmarks_mm + rng.normal(0.0, 0.3, s.landmarks_mm.shape)
                                                  for s in test], (150.0, 0.15), test)
    (root / "a+ref" / "manifest.json").write_text(json.dumps({"stages": ["local1", "local2"], "base_run": "../a"}))
    for name, sd in (("a", 0.6), ("b", 0.6), ("a+ref/local2", 0.3)):
        write_val_predictions(root / name, val, [s.landmarks_mm + rng.normal(0.0, sd, s.landmarks_mm.shape)
                                                 for s in val])
    params = {"dataset": "synthetic2d", "output_dir": str(root / "chosen"), "members": ["a", "b", "a+ref/local2"],
              "select": "val", "max_members": 3}
    result = run_method("ensemble", params)
    steps = pd.read_csv(root / "chosen" / "selection.csv")
    assert list(steps["added"]) == ["a+ref/local2", "b"], steps  # a is never added beside its refinement
    manifest = json.loads((root / "chosen" / "manifest.json").read_text())
    assert manifest["candidates"]["a"]["counted_in"] == "a+ref/local2"
    assert "counted_in" not in manifest["candidates"]["b"]
    # a+ref/local2 (with a inside) and b, with their val predictions (own files: 12 images x their time per image)
    assert result.metrics["train_seconds"] == pytest.approx(150.0 + 12 * 0.15 + 200.0 + 12 * 0.2)
    with pytest.raises(ValueError, match=r"a\+ref/local2: its row already includes the run 'a'"):
        run_method("ensemble", {**params, "select": "none"})  # listed as members: refused as before
    _member(root, "a+tta", "synthetic2d", [s.landmarks_mm for s in test], (100.0, 0.3), test)
    tta = json.loads((root / "a+tta" / "manifest.json").read_text())
    (root / "a+tta" / "manifest.json").write_text(json.dumps({**tta, "base_run": "../a"}))
    with pytest.raises(ValueError, match=r"a\+ref/local2 and .*a\+tta: both built on .*synthetic2d/a, whose"):
        run_method("ensemble", {**params, "members": ["b", "a+ref/local2", "a+tta"]})
    # select_on_val alone: x clearly best, y never beside it, z added
    noisy = {n: [s.landmarks_mm + rng.normal(0.0, sd, s.landmarks_mm.shape) for s in val]
             for n, sd in (("x", 0.2), ("y", 0.5), ("z", 0.5))}
    for apart in ({"y": {"x"}}, {"x": {"y"}}):
        chosen, steps = select_on_val(noisy, val, "median", 3, apart=apart)
        assert [s["added"] for s in steps] == ["x", "z"], (apart, steps)


@pytest.mark.slow
def test_a_trained_run_writes_its_val_predictions_and_a_refit_does_not(tmp_path: Path) -> None:
    """val_predictions.csv: every val image and landmark, from the kept weights (their MRE is the validation error
    the run selected its epoch on); a refit (val images trained on) writes none."""
    tiny = {"dataset": "synthetic2d", "device": "cpu", "max_epochs": 2, "max_train_images": 8}
    run_method("heatmap_unet", {**tiny, "output_dir": str(tmp_path / "unet")})
    val = load_run_data({"dataset": "synthetic2d"}).split("val")
    table = pd.read_csv(tmp_path / "unet" / "val_predictions.csv", dtype={"image_id": str})
    assert len(table) == len(val) * 8 and set(table["image_id"]) == {s.image_id for s in val}
    metrics = read_run(tmp_path / "unet")[1]
    assert table["error_mm"].mean() == pytest.approx(metrics["best_val_mre_mm"], rel=1e-3)
    run_method("heatmap_unet", {**tiny, "output_dir": str(tmp_path / "refit"), "fit_splits": "train+val"})
    assert not (tmp_path / "refit" / "val_predictions.csv").exists()


def test_own_val_predictions_win_over_a_cache_and_hidden_folders_are_not_searched(
        members: tuple[Path, list], tmp_path: Path) -> None:
    """A run's own val_predictions.csv is read before any cache made from it; a cache in the driver's hidden scratch
    folders (.tmp-*, .old-*) is never read; a run that one candidate dominates on val is a one-member ensemble whose
    row is that run's predictions."""
    import shutil

    from lmlib.engine.base_run import manifest_key, stored_val_predictions
    from lmlib.outputs.contract import BASE_VAL_CACHE, write_val_predictions

    root = tmp_path / "synthetic2d"
    shutil.copytree(members[0], root)
    val = load_run_data({"dataset": "synthetic2d"}).split("val")
    good = [s.landmarks_mm + 0.1 for s in val]
    write_val_predictions(root / "a", val, good)
    for folder in ("a+local", ".tmp-b+local"):  # a cache made from a (worse), and one in a scratch folder from b
        run = "a" if folder == "a+local" else "b"
        (root / folder).mkdir()
        predictions_frame(val, [s.landmarks_mm + 2.0 for s in val]).to_csv(root / folder / BASE_VAL_CACHE, index=False)
        (root / folder / BASE_VAL_CACHE).with_suffix(".key").write_text(f"{manifest_key(root / run)}\n5.0\n")
    world, source, seconds = stored_val_predictions(root / "a", val)
    assert source == root / "a" / "val_predictions.csv" and np.allclose(world[0], good[0], atol=1e-4)
    assert seconds == pytest.approx(12 * 0.1)  # not kept: the images x the run's time per image
    with pytest.raises(FileNotFoundError, match=r"synthetic2d/b: no val predictions on record"):
        stored_val_predictions(root / "b", val)
    write_val_predictions(root / "b", val, [s.landmarks_mm + 3.0 for s in val])
    result = run_method("ensemble", {"dataset": "synthetic2d", "output_dir": str(root / "one"), "members": ["a", "b"],
                                     "select": "val"})
    assert list(json.loads((root / "one" / "manifest.json").read_text())["members"]) == ["a"]
    assert result.metrics["mre_mm"] == pytest.approx(read_run(root / "a")[1]["mre_mm"], abs=1e-4)
    assert list(pd.read_csv(root / "one" / "selection.csv")["kept"]) == [True, False]


def test_a_refinement_starts_from_its_base_runs_own_val_predictions(members: tuple[Path, list]) -> None:
    """A base run with val_predictions.csv needs no checkpoint to be refined: its val predictions are read, charged
    the val images x its time per image; without them (and without checkpoints) the error says what is missing."""
    from lmlib.engine.base_run import load_base_run
    from lmlib.outputs.contract import write_val_predictions

    root, test = members
    data = load_run_data({"dataset": "synthetic2d"})
    train, val = data.split("train"), data.split("val")
    with pytest.raises(FileNotFoundError, match=r"synthetic2d/b: the base run has no checkpoints"):
        load_base_run(root / "b", "synthetic2d", train, val, test)
    write_val_predictions(root / "b", val, [s.landmarks_mm + 0.5 for s in val])
    start = load_base_run(root / "b", "synthetic2d", train, val, test)
    assert np.allclose(start.val.world_mm[0], val[0].landmarks_mm + 0.5, atol=1e-4)
    assert start.train_seconds == pytest.approx(200.0 + len(val) * 0.2)
    (root / "b" / "val_predictions.csv").unlink()
