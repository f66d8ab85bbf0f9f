"""The ranking re-scored against another reference: each other annotator and the mean of all annotators."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from test_datasets import mini_hamedan  # noqa: F401  (fixture: 4 images, annotator2 = annotator1 + 1 px in x)

from lmlib.data.datasets import load_dataset
from lmlib.outputs.contract import predictions_frame
from lmlib.reporting.comparison import Comparison, Run, align_runs
from lmlib.reporting.reference_sensitivity import MEAN_OF_ANNOTATORS, ranking_summary, reference_sensitivity

SPACING = 0.1264


def test_the_ranking_follows_the_reference(mini_hamedan: Path) -> None:  # noqa: F811
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a1 = load_dataset("hamedan-ceph", mini_hamedan, split="test", load_images=False)
        a2 = load_dataset("hamedan-ceph", mini_hamedan, split="test", annotator="annotator2", load_images=False)
    runs = {"copies_annotator1": predictions_frame(a1.samples, [s.landmarks_mm for s in a1]),
            "copies_annotator2": predictions_frame(a1.samples, [a2[s.image_id].landmarks_mm for s in a1])}
    errors, _ = align_runs(runs)
    # the intra-observer row, scored on other images against annotator1 itself: it kept its error under every
    # reference and ranked first "against annotator2" (hamedan-ceph's committed table_ranking_by_reference)
    intra = Run("reference/intra-observer", Path("intra"), runs["copies_annotator2"], {"kind": "reference"}, {})
    comp = Comparison("hamedan-ceph", runs, {m: {"kind": "method"} for m in runs}, errors,
                      own_images={intra.name: intra})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tables, ranks = reference_sensitivity(comp, str(mini_hamedan), n_bootstrap=50)
    assert intra.name not in ranks.index and all(intra.name not in t.index for t in tables.values())
    assert list(tables) == ["annotator2", MEAN_OF_ANNOTATORS]
    assert ranks.loc["copies_annotator1", ("annotator1", "mre_mm")] == 0.0
    assert ranks.loc["copies_annotator2", ("annotator1", "mre_mm")] == pytest.approx(SPACING)
    assert ranks.loc["copies_annotator2", ("annotator2", "mre_mm")] == 0.0
    assert ranks.loc["copies_annotator1", ("annotator2", "rank")] == 2
    for run in runs:  # the mean of the two annotators is half a pixel from each
        assert ranks.loc[run, (MEAN_OF_ANNOTATORS, "mre_mm")] == pytest.approx(SPACING / 2)
    # annotator2's image 123 is excluded (drawn on 122): masked in the annotator2 and mean references
    assert tables["annotator2"].loc["copies_annotator1", "n_masked"] == 19
    assert tables[MEAN_OF_ANNOTATORS].loc["copies_annotator1", "n_masked"] == 19
    assert ranks.attrs["kendall_tau"]["annotator2"] == pytest.approx(-1.0)
    assert "against annotator2: ranks change (copies_annotator1 1->2, copies_annotator2 2->1)" in ranking_summary(ranks)


def test_one_annotator_has_no_other_reference() -> None:
    comp = Comparison("synthetic2d", {}, {}, align_runs({})[0])
    tables, ranks = reference_sensitivity(comp, None)
    assert tables == {} and ranks.empty and "one annotator" in ranking_summary(ranks)
