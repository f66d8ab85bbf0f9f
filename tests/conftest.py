"""Shared fixtures: the repository root, the real data folder beside it (when present) and the 2D phantom set
the accuracy tests train on; the ``slow`` tier (see ``pyproject.toml``)."""
from __future__ import annotations

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
