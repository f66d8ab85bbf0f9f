"""The papermill driver: parameters checked, atomic output folders, failures reported."""
import json
from pathlib import Path

import nbformat
import pytest

from lmlib import run
from lmlib.run import JOBS, Job, check_parameters, main, run_job, select

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _write_notebook(root: Path, name: str, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('dataset: str = "x"\noutput_dir: str = "out"\nfail: bool = False\nseed: int = 0')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "lmlib", "display_name": "Python (lmlib)", "language": "python"}
    (root / "notebooks").mkdir(exist_ok=True)
    nbformat.write(nb, root / "notebooks" / name)


BODY = """
import json, pathlib
from lmlib.outputs.manifest import write_manifest
out = pathlib.Path(output_dir)
(out / "value.txt").write_text(str(seed * 2))
if fail:
    raise RuntimeError("asked to fail")
write_manifest(out, {"dataset": dataset, "output_dir": output_dir, "seed": seed})
"""


@pytest.mark.notebook
def test_success_moves_folder_into_place(tmp_path: Path) -> None:
    _write_notebook(tmp_path, "toy.ipynb", BODY)
    job = Job("toy.ipynb", "toy", ("synthetic2d",))
    final = run_job(job, "synthetic2d", results_dir="results", seed=21, root=tmp_path)
    assert final == tmp_path / "results" / "synthetic2d" / "toy"
    assert (final / "value.txt").read_text(encoding="utf-8") == "42"
    executed = (final / "toy.ipynb").read_text(encoding="utf-8")
    assert str(tmp_path) not in executed and '"input_path": "notebooks/toy.ipynb"' in executed
    manifest = json.loads((final / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["parameters"]["output_dir"] == "results/synthetic2d/toy"
    assert manifest["driver"]["notebook"] == "notebooks/toy.ipynb"
    assert not (tmp_path / "results" / "synthetic2d" / ".tmp-toy").exists()


@pytest.mark.notebook
def test_failure_leaves_nothing_complete(tmp_path: Path) -> None:
    import papermill as pm

    _write_notebook(tmp_path, "toy.ipynb", BODY)
    job = Job("toy.ipynb", "toy", ("synthetic2d",), smoke={"fail": True})
    with pytest.raises(pm.PapermillExecutionError, match="asked to fail"):
        run_job(job, "synthetic2d", profile="smoke", root=tmp_path)
    assert not (tmp_path / "results" / "synthetic2d" / "toy").exists()
    assert (tmp_path / "results" / "synthetic2d" / ".tmp-toy" / "value.txt").exists()


def test_unknown_parameter_is_refused(tmp_path: Path) -> None:
    _write_notebook(tmp_path, "toy.ipynb", BODY)
    with pytest.raises(ValueError, match=r"\['max_epochs'\] are not declared"):
        check_parameters(tmp_path / "notebooks" / "toy.ipynb", {"max_epochs": 1})


def test_missing_real_data_is_a_clear_error(tmp_path: Path) -> None:
    _write_notebook(tmp_path, "toy.ipynb", BODY)
    job = Job("toy.ipynb", "toy", ("hamedan-ceph",))
    with pytest.raises(FileNotFoundError, match="nowhere.*hamedan-ceph"):
        run_job(job, "hamedan-ceph", data_dir=tmp_path / "nowhere", root=tmp_path)


def test_every_notebook_is_declared_and_its_parameters_exist() -> None:
    notebooks = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert notebooks, "no notebooks found"
    assert sorted({j.notebook for j in JOBS}) == notebooks
    for job in JOBS:
        for dataset in job.datasets:
            for profile in run.PROFILES:
                check_parameters(NOTEBOOKS / job.notebook,
                                 {"dataset": dataset, "output_dir": "x", "data_dir": "", "seed": 0, "device": "cpu",
                                  **job.parameters(dataset, profile)})


def test_select_filters_in_declared_order() -> None:
    pairs = select(JOBS, ["synthetic2d"], [])
    assert [j.method for j, _ in pairs][0] == "exploration"
    assert [j.method for j, _ in pairs][-1] == "comparison"
    assert select(JOBS, ["synthetic2d"], ["nothing"]) == []


def test_main_exit_status_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("bad")

    monkeypatch.setattr(run, "run_job", boom)
    assert main(["--dataset", "synthetic2d", "--results-dir", str(tmp_path)]) == 1
    assert main(["--list"]) == 0
