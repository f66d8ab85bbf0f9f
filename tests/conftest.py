"""Shared fixtures: the repository root, the real data folder beside it (when present) and the 2D phantom set
the accuracy tests train on; the ``slow`` tier (see ``pyproject.toml``)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib
import pytest

from lmlib.data.datasets import shared_data_dir
from lmlib.data.phantoms import make_phantom_dataset
from lmlib.data.sample import Sample

matplotlib.use("Agg")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = shared_data_dir()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; tests using it are skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A notebook test runs papermill and trains: it is in the slow tier too."""
    for item in items:
        if item.get_closest_marker("notebook") is not None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def phantoms2d() -> dict[str, list[Sample]]:
    """60 seeded 64 x 64 px 2D phantoms (1 mm pixels), 3 landmarks: ``{"all", "train", "val", "test"}``. The
    accuracy tests (method, cascade, DDP) train on it; its mean-shape MRE on test is 3-5 mm."""
    samples = make_phantom_dataset(2, n_images=60, seed=3, size=(64, 64), n_landmarks=3)
    return {"all": samples, **{k: [s for s in samples if s.meta["split"] == k] for k in ("train", "val", "test")}}


PredictionFolder = Callable[[int], tuple[Path, list[Sample]]]


@pytest.fixture
def prediction_folder(tmp_path: Path) -> PredictionFolder:
    """Makes, for ``ndim``, what ``lmlib.predict --regions 0.9 0.95 --review-mm 2`` writes, for two phantoms saved as
    ``.mha`` images: predictions 1 mm off the truth, every other landmark flagged with a region of its own size;
    returns the prediction folder and the phantoms (the review tests, the browser test)."""
    import numpy as np
    import SimpleITK as sitk

    from lmlib.outputs.exports import prediction_table
    from lmlib.predict import load_images

    def make(ndim: int) -> tuple[Path, list[Sample]]:
        size = (48, 40) if ndim == 2 else (24, 20, 16)
        phantoms = make_phantom_dataset(ndim, n_images=2, seed=4, size=size, n_landmarks=3)
        paths = []
        for s in phantoms:
            image = sitk.GetImageFromArray(np.asarray(s.image, np.float32).T)
            image.SetSpacing([float(v) for v in s.geometry.spacing])
            image.SetOrigin([float(v) for v in s.geometry.origin])
            paths.append(tmp_path / "images" / f"{s.image_id}.mha")
            paths[-1].parent.mkdir(exist_ok=True)
            sitk.WriteImage(image, str(paths[-1]))
        folder = tmp_path / "pred"
        folder.mkdir()
        samples = load_images(paths, phantoms[0].landmark_names, ndim)
        predicted = [s.landmarks_mm + 1.0 for s in phantoms]
        table = prediction_table(samples, predicted, [np.ones(3)] * 2, paths, relative_to=folder)
        table["region_90_mm"] = np.arange(len(table), dtype=float)
        table["region_95_mm"] = table["region_90_mm"] + 0.5
        table["review"] = np.arange(len(table)) % 2 == 1
        table.to_csv(folder / "predictions.csv", index=False)
        return folder, phantoms

    return make
