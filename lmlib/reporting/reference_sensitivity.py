"""Does the ranking depend on whose annotations are the truth? Every compared run re-scored against each other
annotator and against the mean of all annotators (a Table 1 each), and the ranks side by side.

The runs' own ``predictions.csv`` hold their points scored against the reference annotator; here the same
points are scored against another reference: the other annotator's points, or the mean of every
annotator's points (where all of them have the landmark; masked otherwise, and counted). Reference rows
that are themselves an annotator (``inter-observer``) are left out: against that annotator they would score 0.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import kendalltau

from lmlib.evaluation import metrics as M
from lmlib.outputs.contract import REFERENCE_KIND
from lmlib.outputs.reference_runs import MEAN_SHAPE
from lmlib.reporting.comparison import Comparison, align_runs, table_main

MEAN_OF_ANNOTATORS = "mean of annotators"


def annotator_points(dataset: str, data_dir: str | None, image_ids: set[str], **options: Any
                     ) -> dict[str, dict[tuple[str, str], np.ndarray]]:
    """annotator -> {(image_id, landmark): world mm point (NaN where masked)} on ``image_ids``, for every
    annotator of a file-declared dataset (empty for synthetic or single-annotator data)."""
    from lmlib.data.datasets import SYNTHETIC, get_spec, load_dataset

    if dataset in SYNTHETIC or len(get_spec(dataset).annotations) < 2:
        return {}
    out = {}
    for annotator in get_spec(dataset).annotations:
        data = load_dataset(dataset, data_dir or None, annotator=annotator, load_images=False, **options)
        out[annotator] = {(s.image_id, n): np.where(ok, p, np.nan)
                          for s in data.samples if s.image_id in image_ids
                          for n, p, ok in zip(s.landmark_names, s.landmarks_mm, s.valid)}
    return out


def alternative_references(points: dict[str, dict[tuple[str, str], np.ndarray]]
                           ) -> dict[str, dict[tuple[str, str], np.ndarray]]:
    """Every annotator but the first (the runs' own reference), and the mean of all annotators."""
    names = list(points)
    if len(names) < 2:
        return {}
    keys = set.intersection(*(set(p) for p in points.values()))
    mean = {k: np.mean([points[a][k] for a in names], axis=0) for k in keys}  # NaN if any annotator masked it
    return {**{a: points[a] for a in names[1:]}, MEAN_OF_ANNOTATORS: mean}


def rescored(comp: Comparison, reference: dict[tuple[str, str], np.ndarray]) -> Comparison:
    """``comp`` with every run's points scored against ``reference`` (annotator rows left out)."""
    keep = [m for m in comp.methods if comp.run_metrics[m].get("kind") != REFERENCE_KIND
            or comp.run_metrics[m].get("method") == MEAN_SHAPE]
    preds = {}
    for method in keep:
        p = comp.predictions[method].copy()
        d = M.frame_ndim(p)
        gt = np.stack([reference.get((str(i), str(n)), np.full(d, np.nan)) for i, n in zip(p["image_id"], p["landmark"])])
        p[list(M.GT_COLS[:d])] = gt[:, :d]
        p["error_mm"] = M.compute_errors(p)
        preds[method] = p
    errors, _ = align_runs(preds)
    errors = errors.reindex(comp.errors.index)
    # own_images: the intra-observer row (annotator1 against itself on other images) is scored against no other
    # reference; kept, it stayed at its own 1.18 mm under every reference and ranked first "against annotator2"
    return replace(comp, predictions=preds, run_metrics={m: comp.run_metrics[m] for m in keep}, errors=errors,
                   notes=[], skipped=[], own_images={})


def reference_sensitivity(comp: Comparison, data_dir: str | None, n_bootstrap: int = 2000, seed: int = 0,
                          **options: Any) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Table 1 (:func:`~lmlib.reporting.comparison.table_main`) against each alternative reference, and the
    ranks: one row per run, columns ``mre_mm`` and ``rank`` per reference (the first: the runs' own), with
    Kendall's tau of each ranking against the first in ``ranks.attrs["kendall_tau"]``. Empty for datasets
    with one annotator."""
    image_ids = set(comp.errors.index.get_level_values("image_id").astype(str))
    points = annotator_points(comp.dataset, data_dir, image_ids, **options)
    references = alternative_references(points)
    if not references:
        return {}, pd.DataFrame()
    tables = {name: table_main(rescored(comp, ref), n_bootstrap, seed) for name, ref in references.items()}
    own = table_main(rescored(comp, points[next(iter(points))]), n_bootstrap, seed)
    columns = {}
    for name, table in {next(iter(points)): own, **tables}.items():
        columns[(name, "mre_mm")] = table["mre_mm"]
        columns[(name, "rank")] = table["mre_mm"].rank(method="min").astype(int)
    ranks = pd.DataFrame(columns).sort_values((next(iter(points)), "rank"))
    first = ranks[(next(iter(points)), "rank")]
    ranks.attrs["kendall_tau"] = {name: float(kendalltau(first, ranks[(name, "rank")]).statistic) for name in tables}
    return tables, ranks


def ranking_summary(ranks: pd.DataFrame) -> str:
    """One sentence per alternative reference: unchanged ranking, or which runs moved and Kendall's tau."""
    if ranks.empty:
        return "one annotator: no other reference to rank against"
    names = list(dict.fromkeys(c[0] for c in ranks.columns))
    own, lines = names[0], []
    for name in names[1:]:
        moved = [f"{m} {int(ranks.loc[m, (own, 'rank')])}->{int(ranks.loc[m, (name, 'rank')])}"
                 for m in ranks.index if ranks.loc[m, (own, "rank")] != ranks.loc[m, (name, "rank")]]
        tau = ranks.attrs.get("kendall_tau", {}).get(name, float("nan"))
        lines.append(f"against {name}: " + ("the ranking is unchanged" if not moved else
                                            f"ranks change ({', '.join(moved)}); Kendall tau {tau:.2f}"))
    return "; ".join(lines)



def write_reference_sensitivity(comp: Comparison, output_dir: Path | str, data_dir: str | None,
                                n_bootstrap: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Write ``table_main_vs_<reference>.csv/.md/.tex`` for each alternative reference and
    ``table_ranking_by_reference.csv``, print whether the ranking changes, and return the ranks (empty for
    one annotator)."""
    from lmlib.reporting.comparison import format_table_main, write_table

    tables, ranks = reference_sensitivity(comp, data_dir, n_bootstrap, seed, **comp.dataset_options())
    out = Path(output_dir)
    for name, table in tables.items():
        write_table(table, out, "table_main_vs_" + name.replace(" ", "_"), display=format_table_main(table),
                    caption=f"Landmark detection on {comp.dataset}, scored against {name}")
    if not ranks.empty:
        flat = ranks.copy()
        flat.columns = [f"{ref}_{what}" for ref, what in ranks.columns]
        flat.to_csv(out / "table_ranking_by_reference.csv", float_format="%.4f")
    print(ranking_summary(ranks))
    return ranks
