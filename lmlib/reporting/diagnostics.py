"""Where a trained model's error comes from: the same checkpoint scored on every split.

    python -m lmlib.reporting.diagnostics results/hamedan-ceph/htc
    python -m lmlib.reporting.diagnostics results/hamedan-ceph/htc --conformal 0.9 0.95

A train-split error far below the validation/test error says the model fits its training images but
does not generalise (more data, augmentation or regularisation help more than resolution or epochs); a
train error close to them says it underfits (capacity, epochs or the output resolution limit it).
``--conformal``: per-landmark prediction regions calibrated on the validation split and their coverage on
the test split (:mod:`lmlib.evaluation.conformal`).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lmlib.data.refit import check_held_out_val
from lmlib.engine.runner import DEFAULT_CHECKPOINT, split_predictions
from lmlib.evaluation.conformal import coverage_table
from lmlib.evaluation.metrics import summarize
from lmlib.outputs.contract import read_manifest


def split_error_arrays(run_dir: str | Path, checkpoint: str = DEFAULT_CHECKPOINT, batch_size: int = 4,
                       splits: Sequence[str] = ("train", "val", "test")) -> tuple[dict[str, np.ndarray], list[str]]:
    """Radial errors ``(n_images, N)`` (mm, NaN = masked) of ``run_dir``'s checkpoint on each split (see
    :func:`split_predictions`), and the landmark names."""
    scored = split_predictions(run_dir, checkpoint, batch_size, splits)
    return scored.errors, scored.landmark_names


def split_errors(run_dir: str | Path, checkpoint: str = DEFAULT_CHECKPOINT, batch_size: int = 4) -> pd.DataFrame:
    """MRE, median and SDR 2 mm (mm, %) of ``run_dir``'s checkpoint on its dataset's train, val and test
    splits; one row per split."""
    arrays, _ = split_error_arrays(run_dir, checkpoint, batch_size)
    rows = {}
    for split, errors in arrays.items():
        stats = summarize(errors.reshape(-1))
        rows[split] = {"n_images": len(errors), "mre_mm": stats["mre_mm"], "median_mm": stats["median_mm"],
                       "sdr_2mm": stats["sdr_2mm"]}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "split"
    return frame


def conformal_coverage(run_dir: str | Path, levels: Sequence[float] = (0.9, 0.95),
                       checkpoint: str = DEFAULT_CHECKPOINT, batch_size: int = 4,
                       review_mm: float | None = None) -> pd.DataFrame:
    """Per-landmark prediction regions calibrated on the validation split (split conformal: fixed radii from
    the radial errors, adaptive ones from the errors over the predictions' own uncertainty) and their empirical
    coverage and mean radius on the test split (:func:`lmlib.evaluation.conformal.coverage_table`)."""
    check_held_out_val((read_manifest(Path(run_dir)) or {}).get("parameters"), run_dir, "calibrating regions")
    s = split_predictions(run_dir, checkpoint, batch_size, ("val", "test"))
    return coverage_table(s.errors["val"], s.errors["test"], levels, s.landmark_names, s.spread_mm["val"],
                          s.spread_mm["test"], review_mm, s.confidence["val"], s.confidence["test"], s.subjects("val"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmlib.reporting.diagnostics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a method's run folder (holding manifest.json and checkpoints/)")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="relative to the run folder")
    parser.add_argument("--conformal", type=float, nargs="+", metavar="LEVEL",
                        help="instead: per-landmark regions calibrated on val at these levels (e.g. 0.9 0.95), "
                             "their coverage and mean radius on test (fixed and adaptive regions)")
    parser.add_argument("--review-mm", type=float, default=None,
                        help="with --conformal: also the share of test points whose region is larger than this (mm)")
    args = parser.parse_args(argv)
    try:
        if args.conformal:
            table = conformal_coverage(args.run_dir, args.conformal, args.checkpoint, review_mm=args.review_mm)
        else:
            table = split_errors(args.run_dir, args.checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table.round(3).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
