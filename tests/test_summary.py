"""The cross-data-set summary: main rows only, ranks per data set, sentences from the Holm-corrected tests, and the
README block rewritten only from the results beside it."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from lmlib.evaluation.statistics import holm
from lmlib.reporting import summary

ROWS = {  # row -> (role, MRE per data set a / b)
    "heatmap_unet": ("main", 1.0, 2.0), "htc": ("main", 1.1, 1.5), "htc/half_head": ("ablation", 0.9, 1.4),
    "registration": ("main", 3.0, 1.6), "reference/mean_shape": ("reference", 8.0, 9.0),
    "reference/inter-observer": ("reference", 1.4, None)}


def _comparison(root: Path, dataset: str, column: int, p_value: dict[tuple[str, str], float]) -> None:
    folder = root / dataset / "comparison"
    folder.mkdir(parents=True)
    rows = {m: v for m, v in ROWS.items() if v[column] is not None}
    table = pd.DataFrame({"mre_mm": [v[column] for v in rows.values()], "mre_mm_ci_low": [v[column] - 0.1 for v in rows.values()],
                          "mre_mm_ci_high": [v[column] + 0.1 for v in rows.values()], "sdr_2mm": 80.0, "n_images": 20},
                         index=pd.Index(list(rows), name="method"))
    table.to_csv(folder / "table_main.csv")
    (folder / "comparison.json").write_text(json.dumps({"roles": {m: v[0] for m, v in rows.items()}}))
    sig = pd.DataFrame([{"method_a": a, "method_b": b, "p_value": p} for (a, b), p in p_value.items()],
                       columns=["method_a", "method_b", "p_value"])
    sig["p_holm"] = holm(sig["p_value"].to_numpy(dtype=float))  # over every pair of the table, as notebook 90
    sig.to_csv(folder / "table_significance.csv", index=False)


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    _comparison(root, "set-a", 1, {("heatmap_unet", "htc"): 0.2, ("heatmap_unet", "registration"): 0.0001,
                                   ("htc", "registration"): 0.001, ("heatmap_unet", "reference/mean_shape"): 0.0001})
    _comparison(root, "set-b", 2, {("htc", "registration"): 0.4, ("htc", "heatmap_unet"): 0.01,
                                   ("heatmap_unet", "registration"): 0.02, ("htc", "reference/mean_shape"): 0.0001})
    _comparison(root, "synthetic2d", 1, {})
    return root


def test_main_rows_ranked_per_data_set_and_on_average(results: Path) -> None:
    long = summary.summary_table(results)
    assert set(long["dataset"]) == {"set-a", "set-b"}  # synthetic sets left out
    assert "htc/half_head" not in set(long["row"])  # an ablation: not a main row
    rank = long.set_index(["dataset", "method"])["rank"]
    assert rank[("set-a", "heatmap_unet")] == 1 and rank[("set-b", "htc")] == 1 and rank[("set-b", "registration")] == 2
    assert pd.isna(rank[("set-a", "inter-observer")])  # observers are not ranked
    wide = summary.wide_table(long)
    assert list(wide.index[:2]) == ["htc", "heatmap_unet"]  # mean ranks 1.5 and 2.0
    assert wide.loc["heatmap_unet", "mean rank"] == "2.00 (2)" and wide.index[-1] == "inter-observer"


def test_sentences_say_what_the_ranking_shows_and_what_it_does_not(results: Path) -> None:
    text = summary.ranking_sentences(results, summary.summary_table(results))
    assert "heatmap_unet ranks first" in text["set-a"] and "not distinguishable from htc" in text["set-a"]
    assert "heatmap_unet, htc beat it" in text["set-a"]
    assert "htc ranks first" in text["set-b"] and "not distinguishable from registration" in text["set-b"]
    assert "no learned method beats it" in text["set-b"]  # heatmap_unet (2.0 mm) is worse than registration (1.6)


def test_the_readme_block_is_rewritten_only_from_the_results_beside_it(results: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{summary.README_START}\nold\n{summary.README_END}\nrest\n")
    out = summary.write_summary(results, readme=readme)
    assert out is not None and (out / "fig_summary.png").is_file()
    table = (out / "table_summary.md").read_text(encoding="utf-8").strip()
    assert readme.read_text(encoding="utf-8") == f"intro\n{summary.README_START}\n{table}\n{summary.README_END}\nrest\n"
    other = tmp_path / "elsewhere" / "README.md"
    other.parent.mkdir()
    other.write_text(f"{summary.README_START}\nold\n{summary.README_END}\n")
    summary.write_summary(results, readme=other)
    assert "old" in other.read_text(encoding="utf-8")


def test_the_committed_readme_shows_the_generated_summary(repo_root: Path) -> None:
    generated = repo_root / "results" / summary.SUMMARY_DIR / "table_summary.md"
    if not generated.is_file():
        pytest.skip("no results/summary yet")
    text = (repo_root / "README.md").read_text(encoding="utf-8")
    block = text.split(summary.README_START, 1)[1].split(summary.README_END, 1)[0]
    assert block.strip() == generated.read_text(encoding="utf-8").strip()


def test_a_comparison_being_written_is_summarised_from_its_own_folder(results: Path, tmp_path: Path) -> None:
    """The comparison notebook writes into the driver's scratch folder, moved into place after it ends: its
    summary read the previous comparison of its own data set (a stale p < 0.001 on afids-mni, where the new
    by-image tests gave p_holm 0.86)."""
    scratch = tmp_path / "scratch"
    _comparison(scratch, "set-a", 1, {("heatmap_unet", "htc"): 0.2, ("heatmap_unet", "registration"): 0.3,
                                      ("htc", "registration"): 0.3, ("heatmap_unet", "reference/mean_shape"): 0.3})
    summary.write_summary(results, fresh={"set-a": scratch / "set-a" / "comparison"})
    text = (results / "summary" / "table_summary.md").read_text(encoding="utf-8")
    assert "no learned method beats it" in text.split("**set-a**")[1].split("**set-b**")[0]
    summary.write_summary(results)  # without it: the folder in place
    assert "heatmap_unet, htc beat it" in (results / "summary" / "table_summary.md").read_text(encoding="utf-8")


@pytest.mark.xfail(strict=True, reason="issue 23's target is not met since the mean-shape row is computed in network "
                   "orientation (it averaged mirrored templates before): the global-to-local FCNN's final row is not "
                   "a third of it (with the shape prior after it, it is)")
def test_every_committed_learned_3d_row_on_unseen_anatomies_is_three_times_below_the_mean_shape(
        repo_root: Path) -> None:
    """Issue 23's target on the committed afids-templates split: every trained method's main row (training time > 0:
    the learned methods and the registration's local refinement) at most a third of the mean shape's MRE."""
    table = repo_root / "results" / summary.SUMMARY_DIR / "table_summary.csv"
    if not table.is_file():
        pytest.skip("no results/summary yet")
    long = pd.read_csv(table)
    rows = long[long["dataset"] == "afids-templates"].set_index("method")
    bound = rows.loc["mean_shape", "mre_mm"] / 3.0
    learned = rows[rows["train_seconds"] > 0]
    assert {"heatmap_unet", "global_local", "prior_guided"} <= set(learned.index)
    assert (learned["mre_mm"] <= bound).all(), learned.loc[learned["mre_mm"] > bound, "mre_mm"].to_dict()


def test_the_sentences_do_not_change_when_ablation_rows_join_the_table(tmp_path: Path) -> None:
    """Notebook 90 corrects over every pair of its table (1431 on hamedan-ceph, ablations included); the sentences
    read that p_holm for the main rows, so adding ablation jobs flipped "distinguishable" claims (hand-xray:
    heatmap_unet vs dilation_erosion, raw p 0.0019, 0.19 over all pairs, 0.020 over the main rows)."""
    main = {("heatmap_unet", "htc"): 0.002, ("heatmap_unet", "registration"): 0.0001, ("htc", "registration"): 0.001,
            ("heatmap_unet", "reference/mean_shape"): 0.0001}
    ablations = {(f"htc/variant{k}", "htc"): 0.5 for k in range(200)}
    texts = []
    for name, pairs in (("few", main), ("many", {**main, **ablations})):
        _comparison(tmp_path / name, "set-a", 1, pairs)
        texts.append(summary.ranking_sentences(tmp_path / name, summary.summary_table(tmp_path / name))["set-a"])
    assert texts[0] == texts[1] and "better than every other row" in texts[1]


def test_a_row_that_repeats_its_base_is_shown_not_ranked(tmp_path: Path) -> None:
    """A shape prior that validation left as it was gives its base's predictions: ranked beside it, the same result
    counted twice pushed every row below it down one rank (and "not distinguishable from" named the copy)."""
    _comparison(tmp_path, "set-a", 1, {("heatmap_unet", "htc"): 0.001, ("heatmap_unet", "registration"): 0.0001,
                                       ("htc", "registration"): 0.001, ("heatmap_unet", "heatmap_unet+shape"): 1.0,
                                       ("heatmap_unet+shape", "htc"): 0.001, ("heatmap_unet", "reference/mean_shape"): 1e-4})
    folder = tmp_path / "set-a" / "comparison"
    table = pd.read_csv(folder / "table_main.csv", index_col=0)
    table.loc["heatmap_unet+shape"] = table.loc["heatmap_unet"]
    table.to_csv(folder / "table_main.csv")
    roles = json.loads((folder / "comparison.json").read_text())
    (folder / "comparison.json").write_text(json.dumps({"roles": {**roles["roles"], "heatmap_unet+shape": "main"}}))
    sig = pd.read_csv(folder / "table_significance.csv")
    sig["n_pairs"], sig["unit"] = 20, "image"
    sig["n_nonzero"] = [0 if "heatmap_unet+shape" in (a, b) and "htc" not in (a, b) else 20
                        for a, b in zip(sig["method_a"], sig["method_b"])]
    sig.to_csv(folder / "table_significance.csv", index=False)
    long = summary.summary_table(tmp_path).set_index("method")
    assert long.loc["heatmap_unet+shape", "copy_of"] == "heatmap_unet" and pd.isna(long.loc["heatmap_unet+shape", "rank"])
    assert (long.loc["htc", "rank"], long.loc["registration", "rank"]) == (2, 3)
    assert summary.wide_table(long.reset_index()).loc["heatmap_unet+shape", "set-a"] == "= heatmap_unet"
    text = summary.ranking_sentences(tmp_path, long.reset_index())["set-a"]
    assert "better than every other row" in text and "heatmap_unet+shape gives heatmap_unet's test predictions" in text
    assert "not distinguishable" not in text


@pytest.mark.parametrize("n_pairs, unit, can", [(28, "image", True), (7, "image", False), (2, "subject", False)])
def test_a_set_too_small_for_any_test_to_reach_significance_says_so(tmp_path: Path, n_pairs: int, unit: str,
                                                                    can: bool) -> None:
    """With 2 anatomies (afids-templates) the smallest Wilcoxon p is 0.5, with 7 images 1/64 before Holm: "not
    distinguishable" there is the test's floor, not evidence of a tie."""
    _comparison(tmp_path, "set-a", 1, {("heatmap_unet", "htc"): 0.5, ("heatmap_unet", "registration"): 0.5,
                                       ("htc", "registration"): 0.5, ("heatmap_unet", "reference/mean_shape"): 0.5})
    path = tmp_path / "set-a" / "comparison" / "table_significance.csv"
    sig = pd.read_csv(path).assign(n_pairs=n_pairs, n_nonzero=n_pairs, unit=unit)
    sig.to_csv(path, index=False)
    text = summary.ranking_sentences(tmp_path, summary.summary_table(tmp_path))["set-a"]
    assert ("cannot show an order" not in text) == can
    assert ("cannot show whether a learned method beats it" in text) == (not can)
    assert ("no learned method beats it" in text) == can
    assert (f"of {n_pairs} subjects" in text) == (unit == "subject")
    assert summary.smallest_holm_p(7, 3) == pytest.approx(3 / 64) and summary.smallest_holm_p(2, 1) == 0.5


def test_an_observer_row_scored_on_other_images_says_which(tmp_path: Path, results: Path) -> None:
    table = results / "set-a" / "comparison" / "table_main.csv"
    main = pd.read_csv(table, index_col=0)
    main.loc["reference/intra-observer"] = main.loc["reference/inter-observer"]
    main.to_csv(table)
    for row in ("inter-observer", "intra-observer"):  # an inter-observer row is never "the annotator against itself"
        folder = results / "set-a" / "reference" / row
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"scored_on": "own_images", "n_pairs": 4,
                                                         "pair_splits": ["train"]}))
    notes = summary.observer_notes(results, summary.summary_table(results))
    assert notes == ["intra-observer (set-a): the annotator against itself on 4 pairs of identical images (train "
                     "split), not the test images; a model as good as the annotator would score about 0.99 mm "
                     "(the row / sqrt 2)"]
