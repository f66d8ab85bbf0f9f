"""Figures render headless, return a Figure, and save small PNGs."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from lmlib.data.geometry import Geometry
from lmlib.data.sample import Sample
from lmlib.evaluation import statistics as stats
from lmlib.reporting import figures as plots

matplotlib.use("Agg")


@pytest.fixture()
def errors_long() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for method, scale in (("good", 0.6), ("bad", 1.5), ("inter-observer", 0.9)):
        for img in range(8):
            for lm in ("S", "N", "Or", "Po"):
                rows.append({"method": method, "image_id": f"{img:03d}", "landmark": lm,
                             "error_mm": float(rng.gamma(2.0, scale))})
    df = pd.DataFrame(rows)
    df.loc[3, "error_mm"] = np.nan
    return df


def _check(fig: Figure, path: Path) -> None:
    assert isinstance(fig, Figure)
    assert path.is_file() and 0 < path.stat().st_size < 1_000_000


def test_boxplot_sdr_heatmap(tmp_path: Path, errors_long: pd.DataFrame) -> None:
    fig = plots.fig_error_boxplot(errors_long, path=tmp_path / "fig_error_boxplot.png")
    _check(fig, tmp_path / "fig_error_boxplot.png")
    fig = plots.fig_sdr_curve(errors_long, reference_methods=["inter-observer"], path=tmp_path / "fig_sdr_curve.png")
    _check(fig, tmp_path / "fig_sdr_curve.png")
    dashed = [line for line in fig.axes[0].lines if line.get_label() == "inter-observer"]
    assert dashed and dashed[0].get_linestyle() == "--"
    table = errors_long.groupby(["landmark", "method"], sort=False)["error_mm"].mean().unstack("method")
    _check(plots.fig_landmark_heatmap(table, path=tmp_path / "fig_landmark_heatmap.png"),
           tmp_path / "fig_landmark_heatmap.png")


def test_significance(tmp_path: Path, errors_long: pd.DataFrame) -> None:
    wide = errors_long.pivot_table(index=["image_id", "landmark"], columns="method", values="error_mm", dropna=False)
    pairwise = stats.pairwise_wilcoxon(wide, ["good", "inter-observer", "bad"])
    fig = plots.fig_significance(pairwise, ["good", "inter-observer", "bad"], path=tmp_path / "fig_significance.png")
    _check(fig, tmp_path / "fig_significance.png")
    same = stats.pairwise_wilcoxon(pd.DataFrame({"a": [1.0, 2.0], "b": [1.0, 2.0]}))
    plots.fig_significance(same)  # nothing significant: still renders


def test_qualitative_2d_anisotropic(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    geo = Geometry(spacing=(0.5, 1.0), origin=(2.0, 3.0))
    img = rng.normal(size=(120, 80)).astype(np.float32)
    s = Sample.from_index("case 1", img, geo, np.array([[10.0, 20.0], [60.0, 40.0], [np.nan, np.nan]]), ("A", "B", "C"))
    preds = {"m1": s.landmarks_mm + 1.0, "m2": np.full((3, 2), np.nan)}
    fig = plots.fig_qualitative(s, preds, path=tmp_path / "fig_qualitative_case1.png")
    _check(fig, tmp_path / "fig_qualitative_case1.png")
    ax = fig.axes[0]
    gt = ax.collections[0].get_offsets()
    np.testing.assert_allclose(np.asarray(gt), [[10.0, 20.0], [60.0, 40.0]])  # index coordinates
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"ground truth", "m1", "m2"}


def test_qualitative_3d(tmp_path: Path) -> None:
    geo = Geometry(spacing=(1.0, 1.0, 2.0))
    img = np.random.default_rng(1).normal(size=(40, 36, 20)).astype(np.float32)
    s = Sample.from_index("vol", img, geo, np.array([[10.0, 12.0, 5.0], [30.0, 20.0, 15.0]]), ("P", "Q"))
    fig = plots.fig_qualitative(s, {"m": s.landmarks_mm + 2.0}, path=tmp_path / "fig_qualitative_vol.png")
    _check(fig, tmp_path / "fig_qualitative_vol.png")
    assert len(fig.axes) == 3


def test_save_figure_stays_under_limit(tmp_path: Path) -> None:
    noise = np.random.default_rng(2).random((600, 600))
    fig = Figure(figsize=(10, 10))
    fig.add_subplot().imshow(noise)
    path = plots.save_figure(fig, tmp_path / "noise.png", dpi=150, max_bytes=400_000)
    assert path.stat().st_size <= 400_000
    # a notebook showing the returned figure embeds the saved size, not the first (too large) resolution
    pylabtools = pytest.importorskip("IPython.core.pylabtools")  # IPython comes with the notebooks extra
    inline = pylabtools.print_figure(fig, "png")
    assert len(inline) <= 400_000
    assert Image.open(io.BytesIO(inline)).size == Image.open(path).size
