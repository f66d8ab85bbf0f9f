"""A generalisation study: one finished run (the base) against variants of it, each with one setting changed.

The variants are run folders beside the base's, full trainings of the same method; the driver declares them as
jobs with ``variant_of=<base>`` (``lmlib.run.variants_of``). The choice is made on the **validation** split only:
the variant (or the base) with the lowest validation MRE (``metrics.json`` ``best_val_mre_mm``: the checkpoint the
training kept) is the one chosen; the test split is read afterwards, to report what the choice gives and what each
setting did.

- :func:`changed_settings`: what a variant's parameters change against the base's (its manifest's);
- :func:`study_table`: one row per run: changed settings, validation MRE, test MRE [95 % bootstrap CI over images],
  the test difference to the base (Wilcoxon paired by image, Holm), training minutes, seconds per image, the choice;
- :func:`fig_val_test`: validation against test MRE, one point per run (does validation rank them as test does?);
- :func:`write_study`: both written into a folder (``table_study.csv/.md``, ``fig_val_test.png``, ``study.json``);
  :func:`conclusion` says what the choice gives; :func:`write_study_manifest` records the study.

Errors are in mm (world coordinates of each image, as in every run's ``predictions.csv``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lmlib.engine.parameters import SHARED_PARAMETERS, shared_value
from lmlib.evaluation.metrics import error_matrix
from lmlib.evaluation.statistics import bootstrap_ci, holm, pairwise_wilcoxon, resample_indices
from lmlib.outputs.contract import read_manifest, read_run, write_json
from lmlib.outputs.manifest import RunRecord
from lmlib.outputs.qualitative import finish
from lmlib.reporting.comparison import UNKNOWN, run_profile

DPI = 110
#: run parameters that say where or how a run was written, not what it learnt: never a "changed setting"
NOT_SETTINGS: frozenset[str] = frozenset({"output_dir", "data_dir", "progress", "resume", "overlay_every", "gif_fps",
                                          "num_workers"})


def _manifest(folder: Path) -> dict[str, Any]:
    manifest = read_manifest(folder)
    if not manifest:
        raise FileNotFoundError(f"{folder / 'manifest.json'}: missing (run the job first)")
    return manifest


def changed_settings(base: dict[str, Any], variant: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Parameter name -> (base value, variant value) for every run parameter that differs (manifests'
    ``parameters``; where-and-how names such as ``output_dir`` left out). A shared parameter one run does not record
    (a name its notebook declared only later) counts at its default, which is what that run used."""
    a, b = base.get("parameters") or {}, variant.get("parameters") or {}

    def value(params: dict[str, Any], name: str) -> Any:
        return shared_value(params, name) if name in SHARED_PARAMETERS else params.get(name)

    return {k: (value(a, k), value(b, k)) for k in sorted(set(a) | set(b))
            if k not in NOT_SETTINGS and value(a, k) != value(b, k)}


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()) or "(the base)"


def _check_comparable(root: Path, base: str, manifests: dict[str, dict[str, Any]], profile: str | None) -> None:
    """Every run must be of the base's data set and data checksum and of one driver profile (``profile``, else the
    base's); else an error naming the run's folder."""
    first = manifests[base]
    want = profile or run_profile(first)
    if want == UNKNOWN:
        raise ValueError(f"{root / base / 'manifest.json'}: no driver profile (not made by the driver): the study "
                         "compares runs of one driver profile")
    base_dataset = (first.get("parameters") or {}).get("dataset")
    for name, manifest in manifests.items():
        folder = root / name
        run_dataset = (manifest.get("parameters") or {}).get("dataset")
        if run_dataset != base_dataset:
            raise ValueError(f"{folder}: a run of {run_dataset!r}, the base {base!r} is of {base_dataset!r}")
        if run_profile(manifest) != want:
            raise ValueError(f"{folder}: made with driver profile {run_profile(manifest)!r}, the study compares "
                             f"{want!r} runs: run it with --profile {want}")
        relabelled = "train_labels" in changed_settings(first, manifest)  # the training landmarks are the setting
        if manifest.get("data_checksum") != first.get("data_checksum") and not relabelled:
            raise ValueError(f"{folder}: data checksum {manifest.get('data_checksum')!r}, the base's is "
                             f"{first.get('data_checksum')!r}: the runs did not see the same data")


def study_table(results_dir: str | Path, dataset: str, base: str, variants: list[str], profile: str | None = None,
                n_bootstrap: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per run (the base first): what it changes, validation and test MRE (mm), the test difference to the
    base, its cost, and ``chosen`` (the lowest validation MRE; the test split plays no part).

    ``variants``: run folders beside the base's; ``profile``: the driver profile every run must have been made with
    (None: the base's). Test MRE: 95 % percentile bootstrap CI over images, the same resamples for every run.
    ``vs base (mm)``: the difference of the test MREs; ``p (Holm)``: two-sided Wilcoxon signed-rank test of the
    per-image mean errors over the points both runs have (paired by image, not by point), Holm-corrected over the
    variants. A missing run, one of another data set, profile or data checksum, with other test images or
    landmarks, or without a validation MRE, is an error naming the folder.
    """
    from lmlib.data.datasets import dataset_name

    root = Path(results_dir) / dataset_name(dataset)
    if not variants:
        raise ValueError(f"no variants of {base!r} to study (the driver's: jobs declared with variant_of={base!r})")
    names = [base, *variants]
    manifests = {n: _manifest(root / n) for n in names}
    _check_comparable(root, base, manifests, profile)
    errors, rows = {}, []
    for name in names:
        folder = root / name
        predictions, metrics = read_run(folder)
        val = metrics.get("best_val_mre_mm")
        if val is None or not math.isfinite(float(val)):
            raise ValueError(f"{folder / 'metrics.json'}: no best_val_mre_mm (a run without a validation split, or a "
                             "refit on train+val, cannot take part in a choice made on validation)")
        errors[name] = error_matrix(predictions)
        rows.append({"run": name, "changes": _describe(changed_settings(manifests[base], manifests[name])),
                     "val MRE (mm)": float(val), "train (min)": float(metrics["train_seconds"]) / 60.0,
                     "s / image": float(metrics["infer_seconds_per_image"]), "epochs": metrics.get("epochs")})
    table = pd.DataFrame(rows).set_index("run")
    images, landmarks = errors[base].index, errors[base].columns
    for name, err in errors.items():  # every run on the base's test images and landmarks, in the base's order
        if set(err.index) != set(images) or set(err.columns) != set(landmarks):
            raise ValueError(f"{root / name}: its test images or landmarks differ from the base's ({base}): the "
                             "runs must share one split")
        errors[name] = err.reindex(index=images, columns=landmarks)
    idx = resample_indices(len(images), n_bootstrap, seed)
    for name, err in errors.items():
        ci = bootstrap_ci(err, indices=idx).loc["mre_mm"]
        table.loc[name, ["test MRE (mm)", "CI low", "CI high"]] = [ci["estimate"], ci["ci_low"], ci["ci_high"]]
    table["vs base (mm)"] = table["test MRE (mm)"] - table.loc[base, "test MRE (mm)"]
    tests = [pairwise_wilcoxon(pd.concat({name: errors[name].stack(), base: errors[base].stack()}, axis=1),
                               [name, base], by="image").iloc[0] for name in variants]
    table["p (Holm)"] = [np.nan, *holm([float(t["p_value"]) for t in tests])]
    table["chosen"] = table.index == table["val MRE (mm)"].idxmin()
    return table[["changes", "val MRE (mm)", "test MRE (mm)", "CI low", "CI high", "vs base (mm)", "p (Holm)",
                  "epochs", "train (min)", "s / image", "chosen"]]


def fig_val_test(table: pd.DataFrame, path: str | Path | None = None) -> Figure:
    """Validation MRE against test MRE (mm), one point per run (the chosen one a star; test CIs as bars); the base is
    the table's first row, the variants are labelled by what follows its name."""
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    base = str(table.index[0])
    for name, row in table.iterrows():
        label = "base" if name == base else str(name).removeprefix(f"{base}_")  # short labels: they overlap less
        chosen = bool(row["chosen"])
        y, lo, hi = row["test MRE (mm)"], row["CI low"], row["CI high"]
        ax.errorbar(row["val MRE (mm)"], y, yerr=[[y - lo], [hi - y]], fmt="*" if chosen else "o",
                    ms=12 if chosen else 6, capsize=3, zorder=3)
        ax.annotate(label, (row["val MRE (mm)"], y), xytext=(5, 4), textcoords="offset points", fontsize=8)
    ax.set_xlabel("validation MRE (mm): what the choice sees")
    ax.set_ylabel("test MRE (mm) [95% CI]")
    ax.set_title(f"variants of {base}: chosen on validation (star)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.25, y=0.15)  # room for the labels
    return finish(fig, path, DPI)


def _markdown(table: pd.DataFrame) -> str:
    lines = ["| run | changes | val MRE (mm) | test MRE (mm) [95% CI] | vs base (mm) | p (Holm) | train (min) "
             "| s / image | chosen |", "|---|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for name, r in table.iterrows():
        p = "-" if pd.isna(r["p (Holm)"]) else f"{r['p (Holm)']:.2g}"
        lines.append(f"| {name} | {r['changes']} | {r['val MRE (mm)']:.2f} | {r['test MRE (mm)']:.2f} "
                     f"[{r['CI low']:.2f}, {r['CI high']:.2f}] | {r['vs base (mm)']:+.2f} | {p} "
                     f"| {r['train (min)']:.0f} | {r['s / image']:.3f} | {'yes' if r['chosen'] else ''} |")
    return "\n".join(lines) + "\n"


def write_study(table: pd.DataFrame, output_dir: str | Path, base: str) -> dict[str, Any]:
    """Write ``table_study.csv/.md``, ``fig_val_test.png`` and ``study.json`` (the choice and what it gives on
    test against the base) into ``output_dir``; return the ``study.json`` record."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "table_study.csv")
    (out / "table_study.md").write_text(_markdown(table), encoding="utf-8")
    fig_val_test(table, out / "fig_val_test.png")
    chosen = str(table.index[table["chosen"]][0])
    row = table.loc[chosen]
    record = {"base": base, "chosen": chosen, "chosen_on": "validation MRE (best_val_mre_mm)",
              "chosen_val_mre_mm": float(row["val MRE (mm)"]), "chosen_test_mre_mm": float(row["test MRE (mm)"]),
              "base_test_mre_mm": float(table.loc[base, "test MRE (mm)"]),
              "test_diff_vs_base_mm": float(row["vs base (mm)"]),
              "p_holm_vs_base": None if pd.isna(row["p (Holm)"]) else float(row["p (Holm)"]),
              "best_on_test": str(table["test MRE (mm)"].idxmin()), "runs": list(map(str, table.index))}
    write_json(out / "study.json", record)
    return record


def conclusion(record: dict[str, Any]) -> list[str]:
    """What the choice gives, in words: the chosen run, its test MRE against the base's, and whether the run with
    the lowest test MRE is another one (which the study must not report as its result)."""
    p = record["p_holm_vs_base"]
    lines = [f"chosen on validation: {record['chosen']} (val {record['chosen_val_mre_mm']:.2f} mm)",
             f"test: {record['chosen_test_mre_mm']:.2f} mm against the base's {record['base_test_mre_mm']:.2f} mm "
             f"({record['test_diff_vs_base_mm']:+.2f} mm" + ("" if p is None else f", p = {p:.2g} Holm, paired by "
                                                              "image") + ")"]
    if record["best_on_test"] != record["chosen"]:
        lines.append(f"the lowest test MRE is {record['best_on_test']}'s, which validation did not pick: reporting it "
                     "as the study's result would be choosing on test")
    return lines


def write_study_manifest(output_dir: str | Path, parameters: dict[str, Any], base_folder: str | Path,
                         record: dict[str, Any], started: str, seed: int, device: str) -> Path:
    """The study's manifest: its parameters and record, and the base run's data checksum (every run of the study
    has the same one, :func:`study_table` checks)."""
    checksum = _manifest(Path(base_folder)).get("data_checksum")
    return RunRecord(parameters, started).write(output_dir, checksum, seed=seed, device=device,
                                                extra={"study": record})
