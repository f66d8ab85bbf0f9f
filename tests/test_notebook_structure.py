"""Source notebooks follow the conventions: one typed parameters cell, no outputs, no path hacks, and
no code copied between notebooks (logic lives in lmlib; notebooks orchestrate and show)."""
from __future__ import annotations

import json
import re
from itertools import combinations
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
MAX_SHARED_LINES = 3  # a code cell longer than this may appear in one notebook only


def _code_cells(path: Path) -> list[str]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def _normalised(source: str) -> str:
    lines = [re.sub(r"\s+#.*$", "", line).rstrip() for line in source.splitlines()]
    return "\n".join(line for line in lines if line.strip())


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4


@pytest.mark.parametrize("a,b", list(combinations(NOTEBOOKS, 2)), ids=lambda p: p.stem)
def test_no_code_cell_longer_than_three_lines_in_two_notebooks(a: Path, b: Path):
    long_a = {_normalised(s) for s in _code_cells(a) if len(_normalised(s).splitlines()) > MAX_SHARED_LINES}
    shared = [s for s in long_a if s in {_normalised(t) for t in _code_cells(b)}]
    assert not shared, f"{a.name} and {b.name} share code cells:\n" + "\n---\n".join(shared)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_source_notebook_conventions(path: Path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    cells = nb["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
    for line in "".join(tagged[0]["source"]).splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert re.match(r"^\w+: \w+ = ", line), f"{path.name}: untyped parameter line {line!r}"
    for c in cells:
        if c["cell_type"] == "code":
            assert not c.get("outputs") and c.get("execution_count") is None, f"{path.name}: committed with outputs"
            src = "".join(c["source"])
            assert "sys.path" not in src and "!pip" not in src and "/work/" not in src, f"{path.name}: {src[:80]}"
