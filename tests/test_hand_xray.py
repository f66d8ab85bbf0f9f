"""hand-xray, the second 2D data set: its declaration on the real files, and a smoke pass of the driver on it
(skipped cleanly where ../shared/data is absent)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmlib.data.datasets import load_dataset, shared_data_dir
from lmlib.run import JOBS, run_job

ROOT = shared_data_dir() / "hand-xray"
pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(not ROOT.is_dir(), reason=f"hand-xray data not found at {ROOT}")]


def test_hand_xray_declaration_on_the_real_files() -> None:
    ds = load_dataset("hand-xray", ROOT, load_images=False)
    assert [len(ds.split(k)) for k in ("train", "val", "test")] == [91, 21, 21]  # shared/data/README.md
    assert len(ds.landmark_names) == 37 and ds.duplicates == [] and ds.report.empty
    for s in ds:  # the protocol: landmarks 2 and 6 (1-based) are 50 mm apart in every image, spacing isotropic
        assert np.linalg.norm(s.landmarks_mm[1] - s.landmarks_mm[5]) == pytest.approx(50.0, abs=1e-9)
        assert s.geometry.spacing[0] == s.geometry.spacing[1] and 0.05 < s.geometry.spacing[0] < 0.3
    one = ds["3143"]  # first row of landmarks.csv: 319,1854 is landmark 1 at pixel index (origin at a pixel centre)
    np.testing.assert_allclose(one.geometry.world_to_index(one.landmarks_mm[:1]), [[319.0, 1854.0]], atol=1e-9)


@pytest.mark.notebook
def test_the_driver_runs_on_hand_xray(tmp_path: Path) -> None:
    """Smoke profile: exploration, reference rows, registration, heatmap U-Net and the comparison on hand-xray."""
    for job in JOBS:
        if job.method in ("exploration", "reference", "registration", "heatmap_unet", "comparison"):
            run_job(job, "hand-xray", profile="smoke", results_dir=tmp_path, device="cpu", seed=0)
    root = tmp_path / "hand-xray"
    images = (root / "exploration" / "table_images.csv").read_text(encoding="utf-8")
    assert "50 mm between landmarks 2 and 6" in images  # the derived spacing per image
    mean_shape = json.loads((root / "reference" / "mean_shape" / "metrics.json").read_text(encoding="utf-8"))["mre_mm"]
    registration = json.loads((root / "registration" / "metrics.json").read_text(encoding="utf-8"))
    assert registration["n_images"] == 21 and registration["mre_mm"] < 0.95 * mean_shape
    table = (root / "comparison" / "table_main.md").read_text(encoding="utf-8")
    assert "registration" in table and "heatmap_unet" in table
