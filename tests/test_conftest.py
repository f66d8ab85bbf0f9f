"""The suite's split over xdist workers (tests/conftest.py): a synthetic pipeline's tests stay together, every other
test with its module, and the groups handed out first exist."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import FIRST, group

from lmlib.run import SYNTHETIC


def test_a_pipelines_tests_share_a_group_and_other_tests_their_modules() -> None:
    assert group("tests/test_notebooks.py::test_method_values[synthetic2d]") == "pipeline-synthetic2d"
    assert group("tests/test_notebooks.py::test_comparison_values[synthetic3d]") == "pipeline-synthetic3d"
    assert group("tests/test_tta.py::test_each_scale_maps_back_through_its_own_grid") == "tests/test_tta.py"
    assert group("tests/test_registration.py::test_x[3-size2-demons]") == "tests/test_registration.py"


def test_the_groups_handed_out_first_exist(repo_root: Path) -> None:
    for name in FIRST:  # a renamed module or data set would silently lose its place
        assert name.removeprefix("pipeline-") in SYNTHETIC or (repo_root / name).is_file(), name


def test_the_suite_runs_without_xdist(repo_root: Path) -> None:
    """conftest's xdist hooks are optional: plain pytest (no xdist plugin) still collects and runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}  # not a worker's child
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q",
                           "tests/test_conftest.py::test_the_groups_handed_out_first_exist"],
                          cwd=repo_root, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
