"""The code, the tests, the scripts, the notebooks and the docs hooks pass ruff with the project's rules ([tool.ruff] in
pyproject.toml) with zero findings, and the package type-checks with mypy ([tool.mypy]) with zero findings."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def test_ruff_finds_nothing(repo_root: Path) -> None:
    pytest.importorskip("ruff", reason="ruff is in the dev extra (make test installs it)")
    paths = ["lmlib", "tests", "scripts", "notebooks", "docs/_hooks"]
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *paths],
                          cwd=repo_root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow  # about a minute without a cache
def test_mypy_finds_nothing_in_lmlib(repo_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy is in the dev extra (make test installs it)")
    # the files and options are pyproject.toml's; the cache goes to tmp_path, never into the repository
    done = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy_cache")],
                          cwd=repo_root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
