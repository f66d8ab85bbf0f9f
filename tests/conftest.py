"""Shared fixtures: the repository root, the real data folder beside it (when present) and the 2D phantom set
the accuracy tests train on; the ``slow`` tier (see ``pyproject.toml``); the synthetic pipelines; the split over
pytest-xdist workers (``make test`` runs ``-n auto``)."""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import pytest
import torch
from filelock import FileLock

from lmlib.data.datasets import SYNTHETIC, shared_data_dir
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


def _cores() -> int:
    """The CPUs this process may run on (a container's or a CI runner's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


#: at most this many xdist workers for ``-n auto``: the two synthetic pipelines and a few long modules set the
#: wall time; more workers only add memory (about 1-2 GB each)
MAX_WORKERS = 4


@pytest.hookimpl(optionalhook=True)  # xdist's hooks: plain pytest without xdist runs too
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per CPU of this process (xdist's own count, physical cores, gives 1 on a 2-vCPU
    runner whose vCPUs are one core's two threads), at most :data:`MAX_WORKERS`; xdist's
    ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still decides when set."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS", "").isdigit():
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    return min(_cores(), MAX_WORKERS)


def _is_worker(config: pytest.Config) -> bool:
    """Whether this process is an xdist worker (its config, not inherited environment variables, says so)."""
    return hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    """On several xdist workers, each worker and the notebook kernels it starts get an equal share of the cores
    (torch's default, one thread per core in every process, would oversubscribe them)."""
    workers = int(config.workerinput["workercount"]) if _is_worker(config) else 1  # type: ignore[attr-defined]
    if workers > 1:
        threads = max(1, _cores() // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by papermill's kernels and DDP's processes
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A notebook test runs papermill and trains: it is in the slow tier too. On xdist workers, the groups of
    :data:`FIRST` come first (the scheduler hands groups out in collection order)."""
    for item in items:
        if item.get_closest_marker("notebook") is not None:
            item.add_marker(pytest.mark.slow)
    if _is_worker(config):
        rank = {name: i for i, name in enumerate(FIRST)}
        items.sort(key=lambda item: rank.get(group(item.nodeid), len(FIRST)))


def group(nodeid: str) -> str:
    """The xdist group of a test, run on one worker: its module (its module fixtures are built once), except the
    tests of one synthetic pipeline (``test_notebooks.py``, parametrized by data set), grouped by data set."""
    path, _, name = nodeid.partition("::")
    if Path(path).name == "test_notebooks.py":
        for dataset in SYNTHETIC:
            if name.endswith(f"[{dataset}]"):
                return f"pipeline-{dataset}"
    return path


#: the longest groups (``pytest --durations``), handed out first so that the workers finish together
FIRST = ("pipeline-synthetic2d", "tests/test_reproduction.py", "pipeline-synthetic3d", "tests/test_hand_xray.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's ``loadscope`` with this suite's groups (:func:`group`), in collection order, for ``-n`` alone (or
    ``--dist load``/``loadscope``); another ``--dist`` keeps xdist's own scheduler. (xdist's own ``loadgroup`` marks
    do not reach its scheduler under pytest 9.2: it renames ``item._nodeid``, which pytest no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    if config.getvalue("dist") not in ("load", "loadscope"):
        return None

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group(nodeid)

    config.option.loadscopereorder = False
    return GroupScheduling(config, log)


@pytest.fixture(scope="session")
def synthetic_pipeline(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Callable[..., Path]:
    """``synthetic_pipeline(dataset, copy="results", skip=())``: every job of a synthetic data set but those named
    in ``skip``, run through the driver (smoke profile, CPU, seed 0), once per session and copy, shared by the xdist
    workers; that data set's results folder (``<copy>-<dataset>/<dataset>``: copies lie at the same depth, so their
    relative paths are equal). The first test to ask builds a copy under a file lock, the others wait for it; a
    build that failed is started again from empty."""
    from lmlib.run import jobs, run_job

    base = tmp_path_factory.getbasetemp()
    if _is_worker(pytestconfig):
        base = base.parent  # the session's folder, shared by its workers

    def get(dataset: str, copy: str = "results", skip: tuple[str, ...] = ()) -> Path:
        folder = base / f"{copy}-{dataset}"
        with FileLock(f"{folder}.lock"):
            if not (folder / ".complete").exists():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
                for job in jobs():  # the declared jobs and those of discovered methods
                    if dataset in job.datasets and job.method not in skip:
                        run_job(job, dataset, profile="smoke", results_dir=folder, device="cpu", seed=0)
                (folder / ".complete").touch()
        return folder / dataset

    return get


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
