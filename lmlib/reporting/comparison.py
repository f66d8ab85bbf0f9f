"""Collect every run of a dataset, align them, and write the comparison tables.

A run is a folder ``results/<dataset>/<method>/`` following :mod:`lmlib.outputs.contract`
(``predictions.csv``, ``metrics.json``, ``manifest.json``). A run folder may also hold stage sub-runs
``<method>/<stage>/`` (cascade stages, or the reference rows of ``05_reference_rows``), each a full
contract run: they become rows named ``<method>/<stage>``. Only runs whose manifest says
``parameters.dataset == dataset`` are read; runs that are missing files, malformed, or of another
dataset are collected by name with the reason (``Comparison.skipped``) and the rest still compare.

Every row carries the driver profile it was run with (``manifest["driver"]["profile"]``: default,
smoke, full; ``-`` when run outside the driver) and its device. Method runs of another profile than
the comparison's are left out and named (``Comparison.excluded``, ``Comparison.notes``), and so are runs
scored against another annotator than the data set's reference (:func:`filter_annotator`); reference
runs (``metrics.json`` ``"kind": "reference"``: the mean shape, a second annotator) need no training,
are profile-independent and always compared, drawn dashed in the figures.

Errors are recomputed from the coordinate columns (world mm, ``(x, y[, z])``) and methods are aligned
on the (image, landmark) pairs that every run has.
"""
from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lmlib.data.datasets import (
    SYNTHETIC,
    dataset_name,
    dataset_notes,
    get_spec,
    is_single_template,
    load_dataset,
    subject_of,
    subjects_of_all,
)
from lmlib.data.sample import Sample
from lmlib.evaluation import metrics as M
from lmlib.evaluation import statistics as stats
from lmlib.outputs.contract import (
    REFERENCE_KIND,
    REFERENCE_TIMINGS,
    RUN_FILES,
    ContractError,
    predictions_frame,
    read_manifest,
    read_run,
    write_json,
    write_outputs,
)
from lmlib.outputs.reference_runs import MEAN_SHAPE, OWN_IMAGES, match_annotator

EXCLUDED_FOLDERS: tuple[str, ...] = ("comparison", "exploration", "predict", "benchmark", "generalisation")  # not runs
TIMING_KEYS: tuple[str, ...] = ("train_seconds", "infer_seconds_per_image", "peak_rss_mb")
KEY = ["image_id", "landmark"]
CSV_TOLERANCE_MM = 0.01  # predictions.csv stores 4 decimals
UNKNOWN = "-"  # profile/device of a run whose manifest does not say
#: variants shown beside the main rows in the matrix figures (a matrix over every variant of a data set with many
#: ablation jobs is unreadable at any size that a notebook embeds)
MATRIX_BEST_VARIANTS = 5


@dataclass
class Run:
    """One run that follows the contract: row name (``<method>`` or ``<method>/<stage>``), its folder,
    predictions (world mm), metrics and manifest."""

    name: str
    folder: Path
    predictions: pd.DataFrame
    metrics: dict[str, Any]
    manifest: dict[str, Any]

    @property
    def kind(self) -> str:
        """``"reference"`` (no training: mean shape, second annotator) or ``"method"``."""
        return str(self.metrics.get("kind", "method"))

    @property
    def profile(self) -> str:
        """The driver profile (default / smoke / full), ``-`` when run outside the driver."""
        return run_profile(self.manifest)

    @property
    def device(self) -> str:
        """The device the run computed on (``cpu``, ``cuda:0``, ...), ``-`` when unknown."""
        return run_device(self.manifest)


def profile_label(manifest: dict[str, Any]) -> str:
    """The profile as the tables show it: ``default + max_epochs=20`` for a run the driver made with ``--set``
    overrides (it said ``default`` before, as if run at the declared settings)."""
    driver = manifest.get("driver")
    overrides = driver.get("overrides") if isinstance(driver, dict) else None
    base = run_profile(manifest)
    if not overrides:
        return base
    return f"{base} + " + ", ".join(f"{k}={v}" for k, v in sorted(overrides.items()))


def run_profile(manifest: dict[str, Any]) -> str:
    """``manifest["driver"]["profile"]``, or ``-`` when the run did not go through the driver."""
    driver = manifest.get("driver")
    profile = driver.get("profile") if isinstance(driver, dict) else None
    return str(profile) if profile else UNKNOWN


def run_device(manifest: dict[str, Any]) -> str:
    """``manifest["device"]``, or ``-`` when absent."""
    device = manifest.get("device")
    return str(device) if device not in (None, "", "None") else UNKNOWN


@dataclass
class Comparison:
    """Aligned runs of one dataset.

    ``errors``: one column per method (mm), index (image_id, landmark) = the pairs all runs share;
    NaN where the reference is masked or the method gave no prediction. ``profile``: the driver
    profile of the compared method runs; ``excluded``: runs left out for another profile or annotator.
    """

    dataset: str
    predictions: dict[str, pd.DataFrame]
    run_metrics: dict[str, dict[str, Any]]
    errors: pd.DataFrame
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    profile: str = UNKNOWN
    excluded: list[tuple[str, str]] = field(default_factory=list)
    own_images: dict[str, Run] = field(default_factory=dict)  # reference rows scored on other images (intra-observer)
    roles: dict[str, str] = field(default_factory=dict)  # row -> main | ablation | reference (see row_role)

    def main_methods(self, order: Sequence[str] | None = None) -> list[str]:
        """The rows of the main figures, one series per method: ``main`` and ``reference`` rows (in ``order``)."""
        return [m for m in (order or self.methods) if self.roles.get(m, MAIN) != ABLATION and m in self.errors]

    def matrix_methods(self, order: Sequence[str], n_best: int = MATRIX_BEST_VARIANTS) -> list[str]:
        """The rows of the matrix figures (significance, error per landmark), in ``order`` (the main table's:
        lowest MRE first): the main figures' rows plus the first ``n_best`` variants in it, so the best row of the
        table is in them whatever its role. Every pair and landmark stays in the tables."""
        best, main = set(self.ablation_methods(order)[:n_best]), set(self.main_methods(order))
        return [m for m in order if m in best or m in main]

    def ablation_methods(self, order: Sequence[str] | None = None) -> list[str]:
        """Variants (decoding heads, intermediate cascade stages, ablation and other-setting jobs), in ``order``."""
        return [m for m in (order or self.methods) if self.roles.get(m) == ABLATION and m in self.errors]

    @property
    def methods(self) -> list[str]:
        return list(self.errors.columns)

    @property
    def reference_methods(self) -> list[str]:
        return [m for m in self.methods if self.run_metrics[m].get("kind") == REFERENCE_KIND]

    def run_profile(self, method: str) -> str:
        """The driver profile of ``method``'s run (``-`` if unknown)."""
        return run_profile(self.manifests.get(method, {}))

    def run_device(self, method: str) -> str:
        """The device of ``method``'s run (``-`` if unknown)."""
        return run_device(self.manifests.get(method, {}))

    def dataset_options(self) -> dict[str, Any]:
        """Keywords of ``load_dataset`` that rebuild the images the runs were scored on: for afids-mni the
        deformation set (``n_deformed`` of the runs' manifests; the largest where they differ)."""
        counts = {int(m.get("parameters", {}).get("n_deformed") or 0) for m in self.manifests.values()} - {0}
        return {"deformed": max(counts)} if counts and is_single_template(self.dataset) else {}

    @property
    def subjects(self) -> dict[str, str]:
        """image id -> subject for every test image where the data set declares subjects (afids-templates: the
        posed copies of one anatomy are one independent unit for the intervals and the paired tests); else empty."""
        return subjects_of_images(self.dataset, self.errors)

    def method_errors(self, method: str) -> pd.DataFrame:
        """Images x landmarks errors (mm) of one method over the aligned pairs."""
        return self._wide(self.errors[method])

    def unpredicted_pairs(self, method: str) -> pd.Series:
        """Over the aligned pairs, True where ``method`` gave no prediction for a landmark with a reference: its error
        is NaN like a masked landmark's, but it is a miss in the SDR."""
        preds = self.predictions.get(method)
        flags = (np.zeros(len(self.errors), dtype=bool) if preds is None else
                 M.nan_split(preds.set_index(KEY).reindex(self.errors.index))[1])
        return pd.Series(flags, index=self.errors.index, name=method)

    def unpredicted(self) -> pd.DataFrame:
        """:meth:`unpredicted_pairs` of every method, like ``errors``."""
        return pd.DataFrame({m: self.unpredicted_pairs(m) for m in self.methods}, index=self.errors.index)

    def method_unpredicted(self, method: str) -> pd.DataFrame:
        """Images x landmarks, True where ``method`` left a landmark with a reference unpredicted (False where the
        aligned pairs have no such image and landmark)."""
        return self._wide(self.unpredicted_pairs(method)).fillna(False).astype(bool)

    def _wide(self, column: pd.Series) -> pd.DataFrame:
        """One method's column of the aligned pairs as images x landmarks (the images' and landmarks' order)."""
        order = pd.unique(self.errors.index.get_level_values("landmark"))
        return column.unstack("landmark").reindex(index=pd.unique(self.errors.index.get_level_values("image_id")),
                                                  columns=order)

    def errors_long(self) -> pd.DataFrame:
        """Long table: method, image_id, landmark, error_mm (aligned pairs, NaN kept), unpredicted (a landmark with
        a reference and no prediction)."""
        long = self.errors.melt(ignore_index=False, var_name="method", value_name="error_mm").reset_index()
        long["unpredicted"] = self.unpredicted().melt(ignore_index=False, value_name="u")["u"].to_numpy()
        return long[["method", *KEY, "error_mm", "unpredicted"]]


def _check_predictions(preds: pd.DataFrame) -> str | None:
    """Reason a contract-shaped predictions table is still unusable, or None."""
    if preds.empty:
        return "predictions.csv has no rows"
    if preds.duplicated(KEY).any():
        return f"predictions.csv repeats {int(preds.duplicated(KEY).sum())} (image_id, landmark) pairs"
    coords = [*M.PRED_COLS, *M.GT_COLS, "error_mm"]
    bad = [c for c in coords if not pd.api.types.is_numeric_dtype(preds[c])]
    return f"predictions.csv has non-numeric columns {bad}" if bad else None


def _is_run_folder(folder: Path) -> bool:
    return any((folder / name).is_file() for name in RUN_FILES)


def read_contract_run(folder: Path, name: str, dataset: str, parent_manifest: dict[str, Any] | None = None) -> Run:
    """Read and check one run folder of ``dataset``; raise :class:`ContractError` with a reason that
    names no machine path. A stage sub-run without its own manifest uses its parent's."""
    try:
        preds, met = read_run(folder)
        manifest = read_manifest(folder)
    except ContractError as exc:
        raise ContractError(str(exc).replace(str(folder) + "/", "")) from exc
    if manifest is None:
        manifest = parent_manifest
    if manifest is None:
        raise ContractError("manifest.json: missing (cannot tell which dataset and profile the run is of)")
    params = manifest.get("parameters")
    run_dataset = params.get("dataset") if isinstance(params, dict) else None
    if run_dataset != dataset and _filed_under(run_dataset) != _filed_under(dataset):
        raise ContractError(f"run of dataset {run_dataset!r}, not {dataset!r} (manifest.json parameters.dataset)")
    reason = _check_predictions(preds)
    if reason:
        raise ContractError(reason)
    return Run(name, folder, preds, met, manifest)


MAIN, ABLATION = "main", "ablation"


def row_role(run: Run) -> str:
    """``reference`` (no training), ``ablation`` (a decoding variant, a cascade stage before the last, or a run of a
    driver job that is not a main job: one-head HTC, the shared-plane prior, the CPU copy of a GPU setting, the
    paper-scale GPU run) or ``main`` (one row per method: its run, or its cascade's last stage)."""
    if run.kind == REFERENCE_KIND:
        return REFERENCE_KIND
    top, _, sub = run.name.partition("/")
    from lmlib.run import JOBS  # the driver declares which jobs are not main jobs (discovered methods' jobs are)

    job = next((j for j in JOBS if j.method == top), None)
    if job is not None and not job.main:
        return ABLATION
    if sub:
        if run.manifest.get("variant"):
            return ABLATION
        try:
            stages = (read_manifest(run.folder.parent) or {}).get("stages") or []
        except ContractError:
            stages = []
        if stages and sub != stages[-1]:
            return ABLATION
    return MAIN


def _filed_under(dataset: Any) -> str | None:
    """The results folder name of ``dataset`` (a name, or a declaration file that may no longer exist)."""
    try:
        return dataset_name(dataset) if dataset is not None else None
    except (OSError, ValueError):
        return str(dataset)


def discover_runs(results_dir: Path | str, dataset: str, exclude: Iterable[str] = EXCLUDED_FOLDERS
                  ) -> tuple[dict[str, Run], list[tuple[str, str]]]:
    """Read every run under ``results_dir/dataset`` (sorted by name), stage sub-runs included.

    Returns (runs: row name -> :class:`Run`, skipped: [(row name, reason)]). A folder is a run when it
    holds ``predictions.csv`` or ``metrics.json``; its sub-folders that do are stage sub-runs named
    ``<method>/<stage>`` (other sub-folders, e.g. ``checkpoints``, are ignored). A folder with neither
    and no stage sub-run is skipped as missing files. Folders named in ``exclude`` and hidden ones
    (``.tmp-*`` of the driver) are not runs and are ignored silently.
    """
    root = Path(results_dir) / dataset_name(dataset)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no results folder for dataset {dataset!r}")
    runs: dict[str, Run] = {}
    skipped: list[tuple[str, str]] = []
    excluded = set(exclude)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        name = folder.name
        if name in excluded or name.startswith((".", "_")):
            continue
        stages = sorted(p for p in folder.iterdir()
                        if p.is_dir() and not p.name.startswith((".", "_")) and _is_run_folder(p))
        try:
            parent_manifest = read_manifest(folder)
        except ContractError:
            parent_manifest = None
        candidates = [(name, folder)] if _is_run_folder(folder) or not stages else []
        candidates += [(f"{name}/{stage.name}", stage) for stage in stages]
        for row, path in candidates:
            try:
                runs[row] = read_contract_run(path, row, dataset, parent_manifest if path != folder else None)
            except ContractError as exc:
                skipped.append((row, str(exc)))
    return runs, skipped


def _same_predictions(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Whether two predictions tables hold the same (image, landmark) pairs and coordinates (mm)."""
    cols = list(M.PRED_COLS)
    a, b = a.set_index(KEY).sort_index(), b.set_index(KEY).sort_index()
    if not a.index.equals(b.index):
        return False
    diff = np.abs(a[cols].to_numpy(dtype=np.float64) - b[cols].to_numpy(dtype=np.float64))
    same_nan = np.isnan(a[cols].to_numpy(dtype=np.float64)) == np.isnan(b[cols].to_numpy(dtype=np.float64))
    return bool(same_nan.all() and np.all(np.nan_to_num(diff) <= CSV_TOLERANCE_MM))


def drop_duplicate_tops(runs: dict[str, Run]) -> tuple[dict[str, Run], list[str]]:
    """Leave out a run folder's own row when it repeats one of its stage sub-runs (e.g. a cascade that
    copies its last stage's outputs to the top folder); return (runs, notes naming them)."""
    kept, notes = dict(runs), []
    for name, run in runs.items():
        stages = [(s, r) for s, r in runs.items() if s.startswith(name + "/")]
        twin = next((s for s, r in stages if _same_predictions(run.predictions, r.predictions)), None)
        if twin is not None:
            del kept[name]
            notes.append(f"{name}: same predictions as its stage {twin}, shown once as {twin}")
    return kept, notes


def choose_profile(runs: dict[str, Run], profile: str | None = None) -> str:
    """The profile to compare: ``profile`` when given, else the most common among the method runs
    (ties: the one of the most recently finished run); ``-`` when no method run names one."""
    if profile:
        return profile
    known = [r for r in runs.values() if r.kind != REFERENCE_KIND and r.profile != UNKNOWN]
    if not known:
        return UNKNOWN
    counts = Counter(r.profile for r in known)
    latest = {p: max(str(r.manifest.get("finished", "")) for r in known if r.profile == p) for p in counts}
    return max(counts, key=lambda p: (counts[p], latest[p]))


def filter_profile(runs: dict[str, Run], profile: str) -> tuple[dict[str, Run], list[tuple[str, str]], list[str]]:
    """Keep reference runs and method runs of ``profile``; return (kept, excluded, notes).

    A method run of another profile is excluded (``"stale run of profile smoke"``); a method run
    whose profile is unknown (run outside the driver) is kept with a note.
    """
    kept: dict[str, Run] = {}
    excluded: list[tuple[str, str]] = []
    unknown: list[str] = []
    for name, run in runs.items():
        if run.kind == REFERENCE_KIND or run.profile == profile or profile == UNKNOWN:
            kept[name] = run
        elif run.profile == UNKNOWN:
            kept[name] = run
            unknown.append(name)
        else:
            excluded.append((name, f"stale run of profile {run.profile}"))
    notes = []
    by_profile: dict[str, list[str]] = {}
    for name, reason in excluded:
        by_profile.setdefault(reason, []).append(name)
    notes += [f"{reason}: {', '.join(names)} (left out; comparing profile {profile})"
              for reason, names in by_profile.items()]
    if unknown:
        notes.append(f"profile unknown (run outside the driver), compared anyway: {', '.join(unknown)}")
    return kept, excluded, notes


def reference_annotator(dataset: str) -> str | None:
    """The annotator a declared data set scores against (its first, :attr:`DatasetSpec.reference`); None for
    synthetic data."""
    return None if str(dataset) in SYNTHETIC else get_spec(dataset).reference


def run_annotator(run: Run, reference: str | None) -> str | None:
    """The annotator a run was trained and scored against: its notebook's ``annotator`` parameter (empty: the data
    set's reference)."""
    params = run.manifest.get("parameters")
    chosen = params.get("annotator") if isinstance(params, dict) else None
    return str(chosen) if chosen else reference


def filter_annotator(runs: dict[str, Run], dataset: str) -> tuple[dict[str, Run], list[tuple[str, str]], list[str]]:
    """Leave out runs scored against another annotator than the data set's reference; return (kept, excluded,
    notes). Their errors are distances to other points (an inter-observer offset apart): in one table with the
    others they would rank by the annotator, not the method. The reference rows (the second annotator scored
    against the reference) are always kept."""
    reference = reference_annotator(dataset)
    kept: dict[str, Run] = {}
    excluded: list[tuple[str, str]] = []
    for name, run in runs.items():
        other = run_annotator(run, reference)
        if run.kind == REFERENCE_KIND or other == reference:
            kept[name] = run
        else:
            excluded.append((name, f"scored against annotator {other}'s points, not the reference annotator "
                                   f"{reference}'s"))
    notes = [f"{name}: {reason} (left out: its errors are distances to other points)" for name, reason in excluded]
    return kept, excluded, notes


def align_runs(predictions: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, list[str]]:
    """Errors (mm) of every method on the (image, landmark) pairs all of them have; plus notes.

    Notes name the methods that lost pairs, whose ``error_mm`` disagrees with their coordinates
    (errors are always recomputed from coordinates), whose reference points differ, or that left landmarks with
    a reference unpredicted (NaN: out of their MRE, misses in their SDR, counted in Table 1's Unpredicted column).
    """
    notes: list[str] = []
    if not predictions:
        return pd.DataFrame(index=pd.MultiIndex.from_arrays([[], []], names=KEY)), notes
    indexed = {m: p.set_index(KEY) for m, p in predictions.items()}
    first = next(iter(indexed.values()))
    common = first.index
    for p in indexed.values():
        common = common.intersection(p.index, sort=False)
    if len(common) == 0:
        raise ValueError(f"runs {sorted(predictions)} share no (image_id, landmark) pair")
    cols: dict[str, np.ndarray] = {}
    ref_gt = first.loc[common, list(M.GT_COLS)].to_numpy(dtype=np.float64)
    for p in indexed.values():  # a pair one run masked (e.g. a second annotator's missing point): another's point
        ref_gt = np.where(np.isnan(ref_gt), p.loc[common, list(M.GT_COLS)].to_numpy(dtype=np.float64), ref_gt)
    for method, p in indexed.items():
        if len(p) > len(common):
            notes.append(f"{method}: {len(p) - len(common)} of {len(p)} rows not shared by all runs, left out")
        rows = p.loc[common]
        err = M.compute_errors(rows)
        written = rows["error_mm"].to_numpy(dtype=np.float64)
        diff = np.abs(np.nan_to_num(err, nan=-1.0) - np.nan_to_num(written, nan=-1.0))
        if np.any(diff > CSV_TOLERANCE_MM):
            notes.append(f"{method}: error_mm disagrees with its coordinates on {int(np.sum(diff > CSV_TOLERANCE_MM))} "
                         f"rows (max {np.max(diff):.3g} mm); using errors recomputed from coordinates")
        gt = rows[list(M.GT_COLS)].to_numpy(dtype=np.float64)
        present = ~np.isnan(gt).all(axis=1)
        known = ~np.isnan(ref_gt).all(axis=1)
        differ = present & known & np.any(np.abs(gt - ref_gt) > CSV_TOLERANCE_MM, axis=1)  # NaN z in 2D: False
        if differ.any():
            notes.append(f"{method}: reference points differ from the other runs' on {int(differ.sum())} pairs")
        if (known & ~present).any():
            notes.append(f"{method}: {int((known & ~present).sum())} pairs masked in its own reference (e.g. points "
                         "a second annotator did not give), scored in the other runs")
        unpredicted = int(M.nan_split(rows)[1].sum())
        if unpredicted:
            valid = unpredicted + int(np.isfinite(err).sum())
            notes.append(f"{method}: {unpredicted} of {valid} landmarks with a reference have no prediction: out of "
                         f"its MRE, misses in its SDR (Table 1's Unpredicted column)")
        cols[method] = err
    return pd.DataFrame(cols, index=common), notes


def restrict_to_test_split(runs: dict[str, Run], test_ids: Iterable[str]) -> list[str]:
    """Keep only the rows of images in the dataset's current test split (a corrected split file moves images
    out of it); return notes naming the images left out and of which runs."""
    keep = set(test_ids)
    dropped: dict[tuple[str, ...], list[str]] = {}
    for name, run in runs.items():
        ids = run.predictions["image_id"].astype(str)
        gone = tuple(sorted(set(ids) - keep))
        if gone:
            run.predictions = run.predictions[ids.isin(keep).to_numpy()].reset_index(drop=True)
            dropped.setdefault(gone, []).append(name)
    return [f"images {', '.join(gone)} are not in the dataset's current test split: their rows are left out of "
            f"{', '.join(names)}" for gone, names in dropped.items()]


def load_comparison(results_dir: Path | str, dataset: str, exclude: Iterable[str] = EXCLUDED_FOLDERS,
                    profile: str | None = None, test_ids: Iterable[str] | None = None) -> Comparison:
    """Discover, validate and align every run of ``dataset`` of one profile; raise if none is usable.

    ``profile``: default / smoke / full; empty or None = the most common profile of the method runs
    (:func:`choose_profile`). Reference runs are always included; the notes say when the mean-shape
    reference row is missing. ``test_ids``: the dataset's current test split (:func:`current_test_ids`); rows
    of other images are left out, with a note. Reference rows scored on their own images (``scored_on``, the
    intra-observer row) are kept apart (``Comparison.own_images``) and never aligned with the others.
    """
    found, skipped = discover_runs(results_dir, dataset, exclude)
    found, duplicate_notes = drop_duplicate_tops(found)
    own = {m: r for m, r in found.items() if r.metrics.get("scored_on") == OWN_IMAGES}
    found = {m: r for m, r in found.items() if m not in own}
    chosen = choose_profile(found, profile)
    runs, excluded, notes = filter_profile(found, chosen)
    runs, other_annotator, annotator_notes = filter_annotator(runs, dataset)
    excluded += other_annotator
    notes = [*dataset_notes(dataset), *duplicate_notes, *notes, *annotator_notes,
             *(restrict_to_test_split(runs, test_ids) if test_ids is not None else [])]
    if not runs:
        raise ValueError(f"no usable run under {Path(results_dir) / dataset}; skipped: {skipped}; excluded: {excluded}")
    if not any(r.metrics.get("method") == MEAN_SHAPE and r.kind == REFERENCE_KIND for r in runs.values()):
        notes.append(f"no {MEAN_SHAPE} reference run of {dataset} (written by notebooks/05_reference_rows.ipynb)")
    preds = {m: r.predictions for m, r in runs.items()}
    errors, align_notes = align_runs(preds)
    notes += [f"{m}: scored on its own images ({r.metrics.get('n_images')} images, "
              f"{r.metrics.get('n_points')} points), not on the test split" for m, r in own.items()]
    images = [str(i) for i in pd.unique(errors.index.get_level_values("image_id"))] if len(errors) else []
    subjects = subjects_of_images(dataset, errors)
    n_units, unit = (len(set(subjects.values())), "subject") if subjects else (len(images), "image")
    if 0 < n_units < stats.MIN_TEST_IMAGES:
        of_images = f"; {len(images)} images" if unit == "subject" else ""
        notes.append(f"only {n_units} test {unit}(s) (fewer than {stats.MIN_TEST_IMAGES}{of_images}): the "
                     f"95 % intervals (bootstrap over {unit}s) and the paired tests (by {unit}) are indicative only")
    return Comparison(dataset, preds, {m: r.metrics for m, r in runs.items()}, errors, skipped,
                      notes + align_notes, {m: r.manifest for m, r in runs.items()}, chosen, excluded, own,
                      {m: row_role(r) for m, r in runs.items()})


def subjects_of_images(dataset: str, errors: pd.DataFrame) -> dict[str, str]:
    """image id -> subject for every image of ``errors`` (index with an ``image_id`` level) where ``dataset``
    declares subjects (:func:`~lmlib.data.datasets.subject_of`); empty where it does not, or misses one."""
    images = [str(i) for i in pd.unique(errors.index.get_level_values("image_id"))] if len(errors) else []
    subjects = subjects_of_all(dataset, images)
    return dict(zip(images, subjects)) if subjects else {}


def current_test_ids(dataset: str, data_dir: str | None = None) -> list[str] | None:
    """Image ids of a file-based dataset's current test split (headers only), or None for synthetic and
    single-template datasets and when the data folder is absent (then every run's rows are kept)."""
    if dataset in SYNTHETIC or is_single_template(dataset):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the loader's annotation report is the exploration's business
            return [s.image_id for s in load_dataset(dataset, data_dir or None, split="test", load_images=False)]
    except FileNotFoundError:
        return None


def table_main(comp: Comparison, n_bootstrap: int = 2000, seed: int = 0,
               thresholds_mm: Sequence[float] = M.DEFAULT_THRESHOLDS_MM,
               outlier_thresholds_mm: Sequence[float] = M.DEFAULT_OUTLIER_THRESHOLDS_MM) -> pd.DataFrame:
    """Table 1: one row per method (sorted by MRE), numeric.

    Columns: kind, profile (driver profile, ``-`` if unknown), device, n_images, n_points, n_masked,
    n_unpredicted, mre_mm (+ _ci_low/_ci_high), sd_mm, median_mm, max_mm, sdr_<t>mm (+ CIs, %), n_over_<t>mm,
    and the run's train_seconds,
    infer_seconds_per_image, peak_rss_mb. CIs: bootstrap over images (over subjects where the data set declares
    them, :attr:`Comparison.subjects`), the same resamples for all methods.
    """
    subjects = comp.subjects  # the unit resampled: subjects where declared, else images
    groups = [subjects[str(i)] for i in pd.unique(comp.errors.index.get_level_values("image_id"))] if subjects else None
    n_units = len(set(groups)) if groups else comp.errors.index.get_level_values("image_id").nunique()
    idx = stats.resample_indices(n_units, n_bootstrap, seed)
    rows = []
    for method in comp.methods:
        aligned = comp.predictions[method].set_index(KEY).loc[comp.errors.index].reset_index()
        aligned["error_mm"] = comp.errors[method].to_numpy()
        row: dict[str, Any] = {"method": method, "kind": comp.run_metrics[method].get("kind", "method"),
                               "profile": profile_label(comp.manifests.get(method, {})),
                               "device": comp.run_device(method)}
        row.update(M.overall_metrics(aligned, thresholds_mm, outlier_thresholds_mm).iloc[0].to_dict())
        ci = stats.bootstrap_ci(comp.method_errors(method), thresholds_mm=thresholds_mm, indices=idx, groups=groups,
                                unpredicted=comp.method_unpredicted(method))
        for key in ci.index:
            row[f"{key}_ci_low"], row[f"{key}_ci_high"] = ci.loc[key, "ci_low"], ci.loc[key, "ci_high"]
        row.update({k: comp.run_metrics[method].get(k, np.nan) for k in TIMING_KEYS})
        rows.append(row)
    for method, run in comp.own_images.items():  # on its own images: own CIs, never in the ranking's pairs
        row = {"method": method, "kind": run.kind, "profile": profile_label(run.manifest), "device": run.device}
        row.update(M.overall_metrics(run.predictions, thresholds_mm, outlier_thresholds_mm).iloc[0].to_dict())
        wide = run.predictions.pivot_table(index="image_id", columns="landmark", values="error_mm", dropna=False)
        missing = run.predictions.assign(u=M.nan_split(run.predictions)[1]).pivot_table(
            index="image_id", columns="landmark", values="u", dropna=False).reindex_like(wide)
        ci = stats.bootstrap_ci(wide, n_bootstrap=n_bootstrap, seed=seed, thresholds_mm=thresholds_mm,
                                unpredicted=missing.fillna(False).astype(bool))
        for key in ci.index:
            row[f"{key}_ci_low"], row[f"{key}_ci_high"] = ci.loc[key, "ci_low"], ci.loc[key, "ci_high"]
        row.update({k: run.metrics.get(k, np.nan) for k in TIMING_KEYS})
        rows.append(row)
    table = pd.DataFrame(rows).set_index("method")
    counts = [c for c in table.columns if c.startswith("n_")]
    table[counts] = table[counts].astype("Int64")
    front = ["kind", "profile", "device", "n_images", "n_landmarks", "n_points", "n_masked", "n_unpredicted",
             "mre_mm", "mre_mm_ci_low", "mre_mm_ci_high", "sd_mm", "median_mm", "max_mm"]
    sdr = [c for t in thresholds_mm for c in (M.sdr_key(t), f"{M.sdr_key(t)}_ci_low", f"{M.sdr_key(t)}_ci_high")]
    rest = [c for c in table.columns if c not in front + sdr]
    return table[front + sdr + rest].sort_values("mre_mm", kind="stable")


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None or pd.isna(value) else format(float(value), fmt)


def unpredicted_label(n_unpredicted: Any, n_points: Any) -> str:
    """``0``, or ``12 (0.5 %)``: landmarks with a reference and no prediction, and their share of all landmarks
    with a reference (scored + unpredicted)."""
    if n_unpredicted is None or pd.isna(n_unpredicted):
        return "-"
    n, scored = int(n_unpredicted), int(n_points) if not pd.isna(n_points) else 0
    return "0" if n == 0 else f"{n} ({100.0 * n / (n + scored):.1f} %)"


def format_table_main(table: pd.DataFrame, thresholds_mm: Sequence[float] = M.DEFAULT_THRESHOLDS_MM) -> pd.DataFrame:
    """Table 1 as display strings: 'MRE ± SD [CI]', median, unpredicted landmarks, 'SDR [CI]', profile, device,
    timings; one row per method (reference rows show ``-`` for device and timings: nothing was trained or run)."""
    out = pd.DataFrame(index=table.index.rename("Method"))
    out["MRE ± SD (mm) [95% CI]"] = [
        f"{_num(r.mre_mm, '.2f')} ± {_num(r.sd_mm, '.2f')} [{_num(r.mre_mm_ci_low, '.2f')}, {_num(r.mre_mm_ci_high, '.2f')}]"
        for r in table.itertuples()]
    out["Median (mm)"] = [_num(v, ".2f") for v in table["median_mm"]]
    # landmarks with a reference but no prediction are out of the MRE: a method that skips its hard cases would look
    # better unmarked
    out["Unpredicted"] = [unpredicted_label(r.n_unpredicted, r.n_points) for r in table.itertuples()]
    for t in thresholds_mm:
        k = M.sdr_key(t)
        out[f"SDR {t:g} mm (%)"] = [f"{_num(r[k], '.1f')} [{_num(r[k + '_ci_low'], '.1f')}, {_num(r[k + '_ci_high'], '.1f')}]"
                                    for _, r in table.iterrows()]
    ref = table["kind"].eq(REFERENCE_KIND)
    missing = pd.Series(UNKNOWN, index=table.index)
    out["Profile"] = [v if isinstance(v, str) and v else UNKNOWN for v in table.get("profile", missing)]
    out["Device"] = [UNKNOWN if is_ref or not isinstance(v, str) or not v else v  # references ran nothing
                     for v, is_ref in zip(table.get("device", missing), ref)]
    out["Train (s)"] = [("-" if is_ref else _num(v, ".0f")) for v, is_ref in zip(table["train_seconds"], ref)]
    out["Inference (s/image)"] = [("-" if is_ref else _num(v, ".3f")) for v, is_ref in zip(table["infer_seconds_per_image"], ref)]
    out["Peak memory (MB)"] = [("-" if is_ref else _num(v, ".0f")) for v, is_ref in zip(table["peak_rss_mb"], ref)]
    return out


def table_landmarks(comp: Comparison, methods: Sequence[str] | None = None) -> pd.DataFrame:
    """Table 2: MRE (mm) per landmark (rows, dataset order) and method (columns, given order)."""
    methods = list(methods) if methods is not None else comp.methods
    order = pd.unique(comp.errors.index.get_level_values("landmark"))
    table = comp.errors[methods].groupby(level="landmark", sort=False).mean().reindex(order)
    table.columns.name = "method"
    return table


def table_subjects(comp: Comparison, methods: Sequence[str] | None = None) -> pd.DataFrame | None:
    """MRE (mm) per test subject (rows; ``n_images`` counts its images, posed copies included) and method
    (columns), for a data set that declares subjects (afids-templates: per test anatomy); None otherwise."""
    methods = list(methods) if methods is not None else comp.methods
    images = pd.unique(comp.errors.index.get_level_values("image_id"))
    subjects = subject_of(comp.dataset, list(images)) if len(images) else {}
    if not subjects:
        return None
    key = comp.errors.index.get_level_values("image_id").map(lambda i: subjects.get(i, "-"))
    table = comp.errors[methods].groupby(key.to_numpy(), sort=True).mean()
    counts = pd.Series(list(subjects.values())).value_counts()
    table.insert(0, "n_images", [int(counts.get(k, 0)) for k in table.index])
    table.index.name = "subject"
    return table


def markdown_table(frame: pd.DataFrame, float_format: str = ".2f") -> str:
    """A GitHub-flavoured Markdown table (index as first column), without extra dependencies."""
    def cell(v: Any) -> str:
        text = format(v, float_format) if isinstance(v, (float, np.floating)) and not pd.isna(v) else str(v)
        return text.replace("|", "\\|")
    head = [str(frame.index.name or ""), *map(str, frame.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(frame.columns)) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in (idx, *row)) + " |" for idx, row in zip(frame.index, frame.to_numpy())]
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    table = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
             "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}", "±": r"$\pm$"}
    return "".join(table.get(ch, ch) for ch in text)


def latex_table(frame: pd.DataFrame, caption: str = "", label: str = "", float_format: str = ".2f") -> str:
    """A booktabs LaTeX table (index as first column) written by hand (no jinja2 needed)."""
    def cell(v: Any) -> str:
        text = format(v, float_format) if isinstance(v, (float, np.floating)) and not pd.isna(v) else str(v)
        return _latex_escape(text)
    head = [str(frame.index.name or ""), *map(str, frame.columns)]
    body = [" & ".join(cell(v) for v in (idx, *row)) + r" \\" for idx, row in zip(frame.index, frame.to_numpy())]
    lines = [r"\begin{table}[t]", r"\centering"]
    lines += [rf"\caption{{{_latex_escape(caption)}}}"] if caption else []
    lines += [rf"\label{{{label}}}"] if label else []
    lines += [r"\begin{tabular}{l" + "r" * len(frame.columns) + "}", r"\toprule",
              " & ".join(_latex_escape(h) for h in head) + r" \\", r"\midrule", *body,
              r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table(numeric: pd.DataFrame, output_dir: Path | str, stem: str, display: pd.DataFrame | None = None,
                caption: str = "") -> list[Path]:
    """Write ``<stem>.csv`` (numeric) and ``<stem>.md`` / ``<stem>.tex`` (``display``, else numeric)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    shown = numeric if display is None else display
    paths = [out / f"{stem}.csv", out / f"{stem}.md", out / f"{stem}.tex"]
    numeric.to_csv(paths[0], float_format="%.4f")
    paths[1].write_text(markdown_table(shown), encoding="utf-8")
    paths[2].write_text(latex_table(shown, caption=caption, label=f"tab:{stem}"), encoding="utf-8")
    return paths


def predictions_for_image(comp: Comparison, image_id: str, landmark_names: Sequence[str],
                          methods: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Method -> (N, D) predicted world mm of one image, rows in ``landmark_names`` order (NaN if absent)."""
    out: dict[str, np.ndarray] = {}
    for method in (methods if methods is not None else comp.methods):
        p = comp.predictions[method]
        rows = p[p["image_id"] == str(image_id)].set_index("landmark").reindex(list(landmark_names))
        out[method] = rows[list(M.PRED_COLS[:M.frame_ndim(p)])].to_numpy(dtype=np.float64)
    return out


def qualitative_samples(dataset: str, data_dir: str | None, image_ids: Iterable[str], n: int = 3,
                        **options: Any) -> tuple[list[Sample], str]:
    """Up to ``n`` test samples of ``dataset`` whose ids are in ``image_ids``, and a status message.

    Uses ``lmlib.data.datasets.load_dataset(dataset, data_dir or None, split="test", **options)`` (options:
    :meth:`Comparison.dataset_options`); when that is not available or fails, returns no sample and a
    message saying why (overlays are optional).
    """
    try:
        from lmlib.data.datasets import load_dataset
    except ImportError as exc:
        return [], f"qualitative overlays skipped: lmlib.data.datasets is not available ({exc})"
    try:
        loaded = load_dataset(dataset, data_dir or None, split="test", **options)
    except Exception as exc:  # noqa: BLE001 - overlays must not stop the comparison
        return [], f"qualitative overlays skipped: could not load {dataset!r} ({type(exc).__name__}: {exc})"
    wanted = [str(i) for i in image_ids]
    by_id = {s.image_id: s for s in loaded.samples}
    chosen = [by_id[i] for i in wanted if i in by_id][:max(n, 0)]
    if not chosen:
        return [], "qualitative overlays skipped: no loaded test image matches the compared runs' image ids"
    return chosen, f"qualitative overlays of {len(chosen)} image(s): {', '.join(s.image_id for s in chosen)}"


def write_reference_run(samples_reference: Sequence[Sample], samples_other: Sequence[Sample],
                        output_dir: Path | str, method_name: str = "inter-observer") -> dict[str, Any]:
    """Write a second annotator as if it were a method run, scored against the reference annotator.

    Samples are matched by ``image_id`` and landmarks by name (a name the other annotator lacks is masked:
    a comparison not made; :func:`lmlib.outputs.reference_runs.match_annotator`). Timings are 0 and
    ``metrics.json`` has ``"kind": "reference"``. Writes predictions.csv and metrics.json only
    (:func:`lmlib.outputs.reference_runs.write_inter_observer_run` also writes the manifest).
    """
    refs, points = match_annotator(samples_reference, samples_other)
    extra = {"kind": REFERENCE_KIND, "method": method_name,
             "n_unmatched_images": len(samples_reference) + len(samples_other) - 2 * len(refs)}
    return write_outputs(output_dir, predictions_frame(refs, points), dict(REFERENCE_TIMINGS), extra)


def write_comparison_summary(comp: Comparison, output_dir: Path | str, table: pd.DataFrame,
                             pairwise: pd.DataFrame) -> Path:
    """Write ``comparison.json``: profile, methods in Table 1 order with kind/profile/device, skipped and
    excluded runs with reasons, notes, tests."""
    data = {"dataset": comp.dataset, "profile": comp.profile, "methods": list(table.index),
            "reference_methods": comp.reference_methods,
            "runs": {m: {"kind": str(table.loc[m, "kind"]), "profile": str(table.loc[m, "profile"]),
                         "device": str(table.loc[m, "device"])} for m in table.index},
            "scored_on_own_images": list(comp.own_images),
            "roles": {m: comp.roles.get(m, REFERENCE_KIND if m in comp.own_images else MAIN) for m in table.index},
            "skipped": [{"method": m, "reason": r} for m, r in comp.skipped],
            "excluded": [{"method": m, "reason": r} for m, r in comp.excluded], "notes": comp.notes,
            "n_pairs": int(len(comp.errors)),
            "mre_mm": {m: table.loc[m, "mre_mm"] for m in table.index},
            "pairwise_wilcoxon_holm": pairwise.to_dict(orient="records")}
    return write_json(Path(output_dir) / "comparison.json", data)
