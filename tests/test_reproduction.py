"""Determinism on the CPU: the whole synthetic2d reproduction run twice with the same seed gives the same results.
Its own module, so that xdist runs the second copy beside the first (``conftest.FIRST``)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.notebook

TIMING = ["train_seconds", "infer_seconds_per_image", "peak_rss_mb"]
#: jobs that write no predictions and feed no comparison table: not run again
NOT_COMPARED = ("exploration", "benchmark", "generalisation")


def test_the_whole_reproduction_twice_gives_identical_tables(synthetic_pipeline: Callable[..., Path]) -> None:
    """Every job of synthetic2d that writes predictions, run again, gives byte-identical predictions and the same
    comparison tables (timing columns aside); one data set is enough (the 3D jobs take twice as long)."""
    # first: the other worker makes the first copy meanwhile
    again = synthetic_pipeline("synthetic2d", copy="again", skip=NOT_COMPARED)
    root = synthetic_pipeline("synthetic2d")
    predictions = sorted(root.rglob("predictions.csv"))
    assert len(predictions) > 10, predictions
    for first in predictions:
        assert (again / first.relative_to(root)).read_bytes() == first.read_bytes(), first.relative_to(root)
    for name in ("table_main.csv", "table_landmarks.csv", "table_significance.csv"):
        a = pd.read_csv(root / "comparison" / name).drop(columns=TIMING, errors="ignore")
        b = pd.read_csv(again / "comparison" / name).drop(columns=TIMING, errors="ignore")
        pd.testing.assert_frame_equal(a, b, check_exact=True)
