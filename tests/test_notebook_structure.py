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


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if any("notebook_parameters(" in s for s in _code_cells(p))],
                         ids=lambda p: p.stem)
def test_a_notebook_passes_its_declared_parameters_not_its_scratch_variables(path: Path):
    """A variable typed while exploring (``n = 3``) made run_method fail with "parameters ['n'] are not used":
    only the parameters cell's names (with papermill's injected values) are parameters."""
    import papermill as pm

    from lmlib.engine.runner import notebook_parameters

    namespace = _parameters_cell(path)
    exec("seed = 7\n", namespace)  # papermill's injected cell
    exec("n = 3\nscratch = [1, 2]\n", namespace)  # exploring
    params = notebook_parameters(namespace)
    assert set(params) == set(pm.inspect_notebook(str(path))) and params["seed"] == 7


def _parameters_cell(path: Path) -> dict:
    """The values a notebook's parameters cell binds, run as the kernel runs it."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    cell = next("".join(c["source"]) for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    namespace: dict = {}
    exec(compile(cell, f"{path.name}:parameters", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if any("run_method(" in s for s in _code_cells(p))],
                         ids=lambda p: p.stem)
def test_a_training_notebooks_shared_defaults_are_the_models(path: Path):
    """One source of truth: a shared parameter's default lives in lmlib.engine.parameters.SharedParameters; a
    training notebook's parameters cell repeats it (papermill needs a literal) and must not disagree."""
    from lmlib.engine.parameters import SET_BY_EACH_NOTEBOOK, SharedParameters, check_shared, shared_default

    values = _parameters_cell(path)
    shared = {k: v for k, v in values.items() if k in SharedParameters.model_fields}
    check_shared(shared)  # the notebook's own defaults are valid
    own = set(SET_BY_EACH_NOTEBOOK) | ({"device"} if path.stem == "50_registration_baseline" else set())  # CPU only
    differ = {k: (v, shared_default(k)) for k, v in shared.items()
              if k not in own and shared_default(k) is not None and v != shared_default(k)}
    assert not differ, f"{path.name}: parameters cell vs SharedParameters (notebook, model): {differ}"


def _method_of(path: Path) -> str | None:
    """The method a training notebook runs (the driver's reading: ``run_method("<name>", ...)``)."""
    from lmlib.run import method_notebooks

    found = [m for m, nb in method_notebooks(path.parent).items() if nb == path.name]
    assert len(found) <= 1, f"{path.name} runs {found}"
    return next(iter(found), None)


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if _method_of(p)], ids=lambda p: p.stem)
def test_a_training_notebooks_method_defaults_are_the_models(path: Path):
    """One source of truth for a method's own parameters: its ``Parameters`` model. The notebook declares every
    field with the model's default (papermill needs the literal); before, foreground_weight was 100 in the
    heatmap U-Net's module and 30 in its notebook, local_epochs 30 in global_local's code and 40 in its notebook."""
    from lmlib.methods.base import method_class
    from lmlib.methods.config import defaults

    cls = method_class(_method_of(path))
    values = _parameters_cell(path)
    model = defaults(cls.Parameters)
    missing = sorted(set(model) - set(values))
    assert not missing, f"{path.name}: the parameters cell does not declare {missing} of {cls.__name__}.Parameters"
    differ = {k: (values[k], v) for k, v in model.items() if values[k] != v}
    assert not differ, f"{path.name}: parameters cell vs {cls.__name__}.Parameters (notebook, model): {differ}"
    cls.values(values)  # and they validate
