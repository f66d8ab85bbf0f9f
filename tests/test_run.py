"""The papermill driver: parameters checked, atomic output folders, failures reported."""
import json
import os
import shutil
from pathlib import Path

import nbformat
import pytest

from lmlib import run
from lmlib.engine.runner import run_method
from lmlib.run import JOBS, Job, check_parameters, main, run_job, select

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _write_notebook(root: Path, name: str, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('dataset: str = "x"\noutput_dir: str = "out"\nfail: bool = False\nseed: int = 0\n'
                                       'device: str = "auto"')
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
def test_a_rerun_gets_the_finished_runs_reusable_files(tmp_path: Path) -> None:
    """A refinement re-run in a fresh clone failed: committed run folders keep no checkpoints, so its base run's
    val predictions could not be made again, and the driver's scratch folder did not hold the finished run's
    cache of them (valid while the base run's manifest is unchanged)."""
    body = BODY + "(out / 'seen.txt').write_text((out / 'base_val_predictions.key').read_text())\n"
    _write_notebook(tmp_path, "toy.ipynb", body)
    final = tmp_path / "results" / "synthetic2d" / "toy"
    final.mkdir(parents=True)
    (final / "base_val_predictions.csv").write_text("image_id,landmark\n")
    (final / "base_val_predictions.key").write_text("abc123\n")
    (final / "stale.txt").write_text("not carried")
    run_job(Job("toy.ipynb", "toy", ("synthetic2d",)), "synthetic2d", root=tmp_path)
    assert (final / "seen.txt").read_text() == "abc123\n" and (final / "base_val_predictions.csv").is_file()
    assert not (final / "stale.txt").exists()


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


def test_every_profile_is_valid_for_the_models() -> None:
    """A profile holds overrides only, each valid for the typed models: the shared ones for SharedParameters, the
    method's own for its ``Parameters`` (a value out of bounds or of the wrong type fails here, not mid-run)."""
    from lmlib.engine.parameters import check_shared
    from lmlib.methods.base import method_class

    for job in (j for j in JOBS if j.runs):
        cls = method_class(job.runs)
        for dataset in job.datasets:
            for profile in run.PROFILES:
                params = job.parameters(dataset, profile)
                try:
                    check_shared(params)
                    cls.values(params)
                except ValueError as exc:
                    raise AssertionError(f"{job.method} on {dataset} ({profile}): {exc}") from None


@pytest.mark.parametrize("text, match", [
    ("toy:\n  smoke: {max_epochs: 2}\n  fast: {max_epochs: 1}\n", r"toy: must be a mapping of smoke, full and datasets"),
    ("toy:\n  datasets:\n    hamedan: {max_epochs: 2}\n", r"datasets: 'hamedan' is not <dataset>"),
    ("toy:\n  datasets:\n    hand-xray:fast: {max_epochs: 2}\n", r"datasets: 'hand-xray:fast' is not"),
])
def test_a_bad_profiles_file_names_the_file_and_the_entry(tmp_path: Path, text: str, match: str) -> None:
    """The profiles are YAML (lmlib/profiles.yaml): an entry the driver would not read is an error, not ignored."""
    path = tmp_path / "profiles.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=match) as info:
        run.load_profiles(path)
    assert str(info.value).startswith(str(path))
    good = run.load_profiles(run.PROFILES_FILE)
    assert good["heatmap_unet"]["per_dataset"]["afids-templates:full"] == {"max_epochs": 90}
    assert set(good) <= {j.method for j in JOBS}, "a profile for a job that does not exist (a misspelt job name)"


def test_every_method_is_run_by_a_job_that_names_it() -> None:
    """A job names the method it trains (``runs``), never matched by a name prefix; every discovered method with a
    notebook has a job (declared, or made by ``jobs()``), and a job whose notebook trains (calls run_method) names
    one."""
    from lmlib.methods.base import method_names

    assert {j.runs for j in run.jobs() if j.runs} == set(method_names()) & set(run.method_notebooks(NOTEBOOKS))
    for job in run.jobs():
        trains = "run_method(" in (NOTEBOOKS / job.notebook).read_text(encoding="utf-8")
        assert (job.runs is not None) == trains, job.method


_TOY_PACKAGE = """
from lmlib.methods.heatmap_unet import HeatmapUNet


class Toy(HeatmapUNet):
    \"\"\"A new method: the heatmap U-Net under another name.\"\"\"
    name = "toy"
"""


@pytest.mark.slow
def test_a_new_method_is_its_module_and_its_notebook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A method added as a module (here an installed package's entry point, seen by the notebook's kernel too)
    and a notebook that calls run_method on it runs through the driver with no JOBS entry and no test table edited:
    its job comes from jobs(), its smoke profile is the generic one, and its folder holds the run contract."""
    site = tmp_path / "site"
    (site / "toy_method").mkdir(parents=True)
    (site / "toy_method" / "__init__.py").write_text(_TOY_PACKAGE, encoding="utf-8")
    info = site / "toy_method-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-method\nVersion: 0.1\n", encoding="utf-8")
    (info / "entry_points.txt").write_text("[lmlib.methods]\ntoy = toy_method:Toy\n", encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(site))
    import importlib

    importlib.invalidate_caches()
    project = tmp_path / "project"
    shutil.copytree(NOTEBOOKS, project / "notebooks")
    source = (NOTEBOOKS / "15_heatmap_unet.ipynb").read_text(encoding="utf-8")
    (project / "notebooks" / "60_toy.ipynb").write_text(
        source.replace('run_method(\\"heatmap_unet\\"', 'run_method(\\"toy\\"'), encoding="utf-8")
    monkeypatch.chdir(project)

    job = next(j for j in run.jobs() if j.method == "toy")
    assert job.runs == "toy" and job.notebook == "60_toy.ipynb" and "synthetic2d" in job.datasets
    assert job.parameters("synthetic2d", "smoke") == run.GENERIC_SMOKE
    code = main(["--only", "toy", "--dataset", "synthetic2d", "--profile", "smoke", "--device", "cpu",
                 "--results-dir", str(tmp_path / "results")])
    assert code == 0
    folder = tmp_path / "results" / "synthetic2d" / "toy"
    for name in ("60_toy.ipynb", "predictions.csv", "metrics.json", "manifest.json"):
        assert (folder / name).is_file(), name
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["method"] == "toy" and manifest["parameters"]["max_epochs"] == 2


def test_methods_are_discovered_from_their_modules_and_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding a method needs no list edited: a module with METHOD, or an installed package's entry point."""
    from lmlib.methods import base
    from lmlib.methods.heatmap_unet import HeatmapUNet

    class Toy(HeatmapUNet):
        name = "toy"

    class EntryPoint:
        name, value = "toy", "toy_package:Toy"

        def load(self) -> type:
            return Toy

    assert "heatmap_unet" in base.method_names() and "base" not in base.method_names()
    monkeypatch.setattr(base, "_entry_points", lambda: {"toy": EntryPoint()})
    assert "toy" in base.method_names() and base.method_class("toy") is Toy
    with pytest.raises(ValueError, match="unknown method 'nope'.*entry point"):
        base.method_class("nope")


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


def _fake_executed(tmp: Path, name: str, params: dict) -> None:
    """What papermill leaves in the scratch folder: an executed notebook naming ``.tmp-<method>``."""
    from papermill.translators import translate_parameters

    nb = nbformat.v4.new_notebook()
    declared = nbformat.v4.new_code_cell('dataset: str = "x"\noutput_dir: str = "out"')
    declared.metadata["tags"] = ["parameters"]
    injected = nbformat.v4.new_code_cell(translate_parameters("lmlib", "python", params, "Parameters"))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells = [declared, injected, nbformat.v4.new_code_cell("print(1)")]
    nb.metadata["kernelspec"] = {"name": "lmlib", "display_name": "Python (lmlib)", "language": "python"}
    nb.metadata["papermill"] = {"parameters": dict(params), "input_path": "/abs/notebooks/" + name,
                                "output_path": f"/abs/{params['output_dir']}/{name}"}
    tmp.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, tmp / name)


def test_finalise_shows_the_final_folder_in_the_executed_notebook(tmp_path: Path) -> None:
    job = Job("90_x.ipynb", "comparison", ("hamedan-ceph",))
    scratch = "results/hamedan-ceph/.tmp-comparison"
    params = {"dataset": "hamedan-ceph", "output_dir": scratch, "results_dir": "results"}
    tmp, final = tmp_path / scratch, tmp_path / "results" / "hamedan-ceph" / "comparison"
    _fake_executed(tmp, job.notebook, params)
    (tmp / "manifest.json").write_text(json.dumps({"parameters": dict(params), "device": "cpu"}))
    (tmp / "stage").mkdir()  # a sub-run (cascade stage / reference row) with its own manifest
    (tmp / "stage" / "manifest.json").write_text(json.dumps(
        {"parameters": {**params, "output_dir": f"{scratch}/stage"}, "device": "cpu"}))
    final.mkdir(parents=True)
    (final / "old.txt").write_text("previous run")

    run._finalise(tmp, final, params, job, "smoke", 12.34)

    assert not tmp.exists() and not (final / "old.txt").exists()
    text = (final / job.notebook).read_text(encoding="utf-8")
    assert ".tmp-" not in text and "/abs/" not in text
    nb = nbformat.read(final / job.notebook, as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    assert 'output_dir = "results/hamedan-ceph/comparison"' in injected[0].source
    assert 'dataset = "hamedan-ceph"' in injected[0].source and 'results_dir = "results"' in injected[0].source
    meta = nb.metadata["papermill"]
    assert meta["parameters"]["output_dir"] == "results/hamedan-ceph/comparison"
    assert meta["input_path"] == "notebooks/90_x.ipynb"
    assert meta["output_path"] == "results/hamedan-ceph/comparison/90_x.ipynb"
    top = json.loads((final / "manifest.json").read_text(encoding="utf-8"))
    assert top["parameters"]["output_dir"] == "results/hamedan-ceph/comparison"
    assert top["driver"] == {"notebook": "notebooks/90_x.ipynb", "profile": "smoke", "wall_seconds": 12.3}
    stage = json.loads((final / "stage" / "manifest.json").read_text(encoding="utf-8"))
    assert stage["parameters"]["output_dir"] == "results/hamedan-ceph/comparison/stage"
    assert stage["driver"]["profile"] == "smoke"


def test_finalise_refuses_a_run_without_manifest(tmp_path: Path) -> None:
    job = Job("toy.ipynb", "toy", ("synthetic2d",))
    params = {"dataset": "synthetic2d", "output_dir": "results/synthetic2d/.tmp-toy"}
    tmp = tmp_path / params["output_dir"]
    _fake_executed(tmp, job.notebook, params)
    with pytest.raises(RuntimeError, match="no manifest.json"):
        run._finalise(tmp, tmp_path / "results" / "synthetic2d" / "toy", params, job, "default", 1.0)
    assert tmp.exists()


def _fake_papermill(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """papermill replaced by a fake that records the parameters and writes an executed notebook + manifest."""
    import papermill as pm

    seen: list[dict] = []

    def fake_execute(input_path: str, output_path: str, parameters: dict, **kwargs) -> None:
        seen.append(dict(parameters))
        out = Path(kwargs["cwd"]) / parameters["output_dir"]
        _fake_executed(out, Path(output_path).name, parameters)
        (out / "manifest.json").write_text(json.dumps({"parameters": dict(parameters)}))

    monkeypatch.setattr(pm, "execute_notebook", fake_execute)
    return seen


def _toy_and_a_variant(root: Path, name: str, declares: str) -> None:
    """``notebooks/toy.ipynb`` and a copy ``name`` whose parameters cell also declares ``declares``."""
    _write_notebook(root, "toy.ipynb", BODY)
    nb = nbformat.read(root / "notebooks" / "toy.ipynb", as_version=4)
    nb.cells[0].source += "\n" + declares
    nbformat.write(nb, root / "notebooks" / name)


def test_profile_is_passed_to_notebooks_that_declare_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _fake_papermill(monkeypatch)
    _toy_and_a_variant(tmp_path, "with_profile.ipynb", 'profile: str = ""\nresults_dir: str = "results"')
    run_job(Job("toy.ipynb", "toy", ("synthetic2d",)), "synthetic2d", profile="full", root=tmp_path)
    run_job(Job("with_profile.ipynb", "cmp", ("synthetic2d",)), "synthetic2d", profile="full", root=tmp_path)
    assert "profile" not in seen[0] and "results_dir" not in seen[0]
    assert seen[1]["profile"] == "full" and seen[1]["results_dir"] == "results"
    executed = nbformat.read(tmp_path / "results" / "synthetic2d" / "cmp" / "with_profile.ipynb", as_version=4)
    assert 'profile = "full"' in executed.cells[1].source
    assert 'output_dir = "results/synthetic2d/cmp"' in executed.cells[1].source


def test_the_driver_asks_training_notebooks_for_epoch_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stored notebooks hold epoch lines, not bar fragments: the driver passes ``progress="lines"`` to a notebook
    that declares it (an explicit parameter; before, an environment variable of the driver's process), and
    nothing to one that does not."""
    seen = _fake_papermill(monkeypatch)
    _toy_and_a_variant(tmp_path, "trains.ipynb", 'progress: str = "bar"')
    run_job(Job("toy.ipynb", "toy", ("synthetic2d",)), "synthetic2d", profile="smoke", root=tmp_path)
    run_job(Job("trains.ipynb", "trains", ("synthetic2d",)), "synthetic2d", profile="smoke", root=tmp_path)
    assert "progress" not in seen[0] and seen[1]["progress"] == "lines"
    assert "LMLIB_PROGRESS" not in os.environ


def test_a_notebook_under_the_driver_draws_no_progress_bars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tqdm bars (posed copies, registration, predict) left frozen fragments such as "0%| 0/3" in stored notebooks:
    the kernel starts with TQDM_DISABLE set, and the driver's own environment is as it was afterwards."""
    import papermill as pm

    seen: list[str | None] = []
    fake = _fake_papermill(monkeypatch)
    inner = pm.execute_notebook
    monkeypatch.setattr(pm, "execute_notebook", lambda *a, **k: seen.append(os.environ.get("TQDM_DISABLE")) or inner(*a, **k))
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    _toy_and_a_variant(tmp_path, "trains.ipynb", 'progress: str = "bar"')
    run_job(Job("toy.ipynb", "toy", ("synthetic2d",)), "synthetic2d", profile="smoke", root=tmp_path)
    assert seen == ["1"] and len(fake) == 1 and "TQDM_DISABLE" not in os.environ
    monkeypatch.setenv("TQDM_DISABLE", "0")  # a user's own choice is kept
    run_job(Job("toy.ipynb", "toy", ("synthetic2d",)), "synthetic2d", profile="smoke", root=tmp_path)
    assert seen[-1] == "0" and os.environ["TQDM_DISABLE"] == "0"


@pytest.mark.parametrize("value, off", [("1", True), ("0", False), ("", False)])
def test_the_bars_of_lmlib_follow_the_driver_s_setting_explicitly(monkeypatch: pytest.MonkeyPatch, value: str,
                                                                  off: bool) -> None:
    """tqdm's notebook bar (tqdm.auto in a kernel with ipywidgets) ignores TQDM_DISABLE, so the variable alone left
    "posed copies: 0%| 0/3" in a stored comparison notebook: lmlib's bars pass ``disable=`` themselves."""
    import tqdm.auto

    from lmlib.data.datasets import with_posed_copies
    from lmlib.data.phantoms import make_phantom_dataset

    seen: list[bool] = []

    class Bar:  # as tqdm.notebook.tqdm: the variable plays no part, only the argument
        def __init__(self, iterable, **kwargs) -> None:
            seen.append(bool(kwargs.get("disable", False)))
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    monkeypatch.setenv("TQDM_DISABLE", value)
    samples = make_phantom_dataset(3, n_images=2, seed=0, size=(12, 12, 12), n_landmarks=3)
    with_posed_copies(samples, {"train": 1, "seed": 0})
    assert seen == [off]


def test_notebook_failure_names_the_exception_and_the_partial_notebook(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import papermill as pm

    job = next(j for j in JOBS if j.method == "dilation_erosion")
    partial = tmp_path / "synthetic2d" / ".tmp-dilation_erosion" / job.notebook

    def fail(*args, **kwargs):
        partial.parent.mkdir(parents=True)
        partial.write_text("{}")
        raise pm.PapermillExecutionError(3, 4, "result = run_method(...)", "ValueError",
                                         "max_epochs=0: must be an integer >= 1", ["Traceback ...", "ValueError: ..."])

    monkeypatch.setattr(run, "run_job", fail)
    assert main(["--only", "dilation_erosion", "--dataset", "synthetic2d", "--results-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAILED in cell [4]: ValueError: max_epochs=0: must be an integer >= 1" in out
    assert f"partial notebook: {partial}" in out
    assert "-----" not in out


def test_unknown_dataset_is_refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[tuple] = []
    monkeypatch.setattr(run, "run_job", lambda *a, **k: calls.append(a) or Path("x"))
    for argv in (["--dataset", "nosuch"], ["--dataset", "synthetic2d", "nosuch"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "unknown dataset" in err and "'nosuch'" in err
        assert "synthetic2d" in err and "synthetic3d" in err and "hamedan-ceph" in err
    assert calls == []


def test_gpu_only_jobs_are_skipped_without_a_gpu(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[str] = []
    monkeypatch.setattr(run, "run_job", lambda job, *a, **k: calls.append(job.method) or Path("x"))
    monkeypatch.setattr(run, "_cuda_available", lambda: False)
    assert main(["--dataset", "hamedan-ceph", "--profile", "full", "--only", "htc", "htc_gpu"]) == 0
    assert calls == ["htc"] and "skipping hamedan-ceph/htc_gpu: needs a GPU" in capsys.readouterr().out
    assert main(["--dataset", "hamedan-ceph", "--only", "htc_gpu", "--device", "cuda"]) == 0
    assert calls == ["htc", "htc_gpu"]
    monkeypatch.setattr(run, "_cuda_available", lambda: True)
    assert main(["--dataset", "hamedan-ceph", "--only", "htc_gpu"]) == 0 and calls[-1] == "htc_gpu"


def _resumable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """A toy notebook that declares ``resume``, and papermill replaced by a fake recording its parameters."""
    seen = _fake_papermill(monkeypatch)
    _write_notebook(tmp_path, "toy.ipynb", BODY)
    nb = nbformat.read(tmp_path / "notebooks" / "toy.ipynb", as_version=4)
    nb.cells[0].source += '\nresume: str = ""'
    nbformat.write(nb, tmp_path / "notebooks" / "toy.ipynb")
    return seen


def _interrupted(tmp_path: Path) -> Path:
    tmp = tmp_path / "results" / "synthetic2d" / ".tmp-toy"
    (tmp / "checkpoints").mkdir(parents=True)
    (tmp / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    (tmp / "from_before.txt").write_text("kept")
    return tmp


def test_resume_continues_an_interrupted_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _resumable(tmp_path, monkeypatch)
    _interrupted(tmp_path)
    final = run_job(Job("toy.ipynb", "toy", ("synthetic2d",)), "synthetic2d", root=tmp_path, resume=True)
    assert seen[-1]["resume"] == "results/synthetic2d/.tmp-toy/checkpoints/last.ckpt"
    assert (final / "from_before.txt").read_text() == "kept" and (final / "checkpoints" / "last.ckpt").is_file()
    manifest = json.loads((final / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["parameters"]["resume"] == "results/synthetic2d/toy/checkpoints/last.ckpt"


def test_without_resume_an_interrupted_job_starts_afresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _resumable(tmp_path, monkeypatch)
    _interrupted(tmp_path)
    final = run_job(Job("toy.ipynb", "toy", ("synthetic2d",)), "synthetic2d", root=tmp_path)
    assert "resume" not in seen[-1] and not (final / "from_before.txt").exists()
    # --resume with nothing to resume from: an ordinary run
    final = run_job(Job("toy.ipynb", "toy", ("synthetic2d",)), "synthetic2d", root=tmp_path, resume=True)
    assert "resume" not in seen[-1]


def test_main_passes_resume(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[dict] = []
    monkeypatch.setattr(run, "run_job", lambda *a, **k: seen.append(k) or tmp_path)
    assert main(["--only", "exploration", "--dataset", "synthetic2d", "--resume"]) == 0
    assert main(["--only", "exploration", "--dataset", "synthetic2d"]) == 0
    assert [k.get("resume") for k in seen] == [True, False]


def test_unknown_only_name_is_refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[tuple] = []
    monkeypatch.setattr(run, "run_job", lambda *a, **k: calls.append(a) or Path("x"))
    assert main(["--dataset", "synthetic2d", "--only", "exploration", "nothing"]) == 2
    err = capsys.readouterr().err
    assert "'nothing'" in err and "dilation_erosion" in err and calls == []


def test_any_method_runs_on_any_dataset_unless_built_for_the_other_dimension(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from lmlib.methods.base import method_class

    calls: list[tuple] = []
    monkeypatch.setattr(run, "run_job", lambda *a, **k: calls.append(a) or Path("x"))
    # dilation_erosion lists 2D datasets only; named, it runs on the 3D one (with the profile's parameters)
    assert main(["--dataset", "afids-mni", "--only", "dilation_erosion"]) == 0
    assert [(job.method, d) for job, d, *_ in calls] == [("dilation_erosion", "afids-mni")]
    assert select(JOBS, ["afids-mni"], []) == [p for p in select(JOBS, ["afids-mni"], []) if "afids-mni" in p[0].datasets]
    # a method built for one dimension is refused, naming both, before anything runs
    monkeypatch.setattr(method_class("htc"), "supported_dims", (2,))
    calls.clear()
    assert main(["--dataset", "synthetic3d", "--only", "htc"]) == 2
    err = capsys.readouterr().err
    assert "htc (notebooks/20_multires_htc.ipynb) works on 2D images; dataset 'synthetic3d' is 3D" in err and calls == []
    with pytest.raises(ValueError, match="htc works on 2D images; dataset 'synthetic3d' is 3D"):
        run_method("htc", {"dataset": "synthetic3d", "output_dir": "never-written", "device": "cpu"})


def test_resume_checkpoint_of_a_cascade(tmp_path: Path) -> None:
    tmp = Path("results/synthetic2d/.tmp-toy")
    assert run.resume_checkpoint(tmp_path, tmp) is None
    (tmp_path / tmp / "coarse" / "checkpoints").mkdir(parents=True)
    (tmp_path / tmp / "coarse" / "checkpoints" / "last.ckpt").write_bytes(b"w")
    assert run.resume_checkpoint(tmp_path, tmp) == tmp / "coarse" / "checkpoints" / "last.ckpt"
    (tmp_path / tmp / "checkpoints").mkdir()
    (tmp_path / tmp / "checkpoints" / "last.ckpt").write_bytes(b"w")
    assert run.resume_checkpoint(tmp_path, tmp) == tmp / "checkpoints" / "last.ckpt"


def test_set_overrides_reach_every_selected_job(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[dict] = []
    monkeypatch.setattr(run, "run_job", lambda *a, **k: seen.append(k) or tmp_path)
    assert main(["--only", "heatmap_unet", "--dataset", "synthetic2d", "--set", "max_epochs=20",
                 "--set", "image_size=[128, 192]", "--set", "device=cpu"]) == 0
    assert seen[0]["extra"] == {"max_epochs": 20, "image_size": [128, 192], "device": "cpu"}


def test_set_applies_to_the_jobs_that_declare_it_and_names_the_others(monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``--only heatmap_unet reference comparison --set max_epochs=3`` failed because the reference notebook
    has no max_epochs (issue 24); now each job gets the names its notebook declares."""
    seen: dict[str, dict] = {}
    monkeypatch.setattr(run, "run_job", lambda job, *a, **k: seen.setdefault(job.method, k["extra"]) and Path("x")
                        or Path("x"))
    assert main(["--only", "heatmap_unet", "reference", "--dataset", "synthetic2d", "--set", "max_epochs=3"]) == 0
    assert seen == {"heatmap_unet": {"max_epochs": 3}, "reference": {}}
    assert "synthetic2d/reference: --set max_epochs ignored (not a parameter of notebooks/05_reference_rows.ipynb)" \
        in capsys.readouterr().out


def test_set_is_checked_against_the_parameters_cell_before_any_run(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[tuple] = []
    monkeypatch.setattr(run, "run_job", lambda *a, **k: calls.append(a) or Path("x"))
    assert main(["--only", "heatmap_unet", "--dataset", "synthetic2d", "--set", "max_epoch=20"]) == 2
    err = capsys.readouterr().err
    assert "['max_epoch'] not a parameter of any selected notebook" in err and "15_heatmap_unet.ipynb" in err
    assert calls == []
    assert main(["--only", "heatmap_unet", "--set", "20"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err and calls == []


def test_a_second_driver_on_the_same_job_stops_at_once_naming_the_first(tmp_path: Path) -> None:
    """Two drivers on one results folder cleared and rewrote each other's scratch files, failing later with
    a ParserError or foreign manifest fields (issue 25); the second now stops before touching anything."""
    import os

    from lmlib.run import JobLocked, job_lock

    job = next(j for j in JOBS if j.method == "exploration")
    scratch = tmp_path / "synthetic2d" / ".tmp-exploration"
    scratch.mkdir(parents=True)
    (scratch / "training_log.csv").write_text("the first driver's file")
    with job_lock(scratch):
        with pytest.raises(JobLocked, match=rf"\.tmp-exploration: this job is running already \(process {os.getpid()} "):
            run_job(job, "synthetic2d", results_dir=tmp_path)
        assert (scratch / "training_log.csv").read_text() == "the first driver's file"
    with job_lock(scratch):  # released when the holder finishes (or dies: flock)
        pass
    # and removed then: CI found a .tmp-<job>.lock left in every results folder
    assert sorted(p.name for p in scratch.parent.iterdir()) == [".tmp-exploration"]


def test_the_driver_echoes_what_notebooks_print_to_its_console(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A terminal run was silent until the notebook ended (13 minutes for 80 epochs, issue 24): what the
    kernel prints (epoch lines with the time left) is echoed line by line, prefixed with the job."""
    import papermill as pm

    from lmlib.run import ConsoleEcho

    echo = ConsoleEcho("synthetic2d/heatmap_unet")
    echo.write("epoch    1/80  val MRE 9.1 mm (20 s, 20.0 s/epoch, ~26 min 20 s left)\nepoch  ")
    echo.write("  5/80 ...\n\n")
    assert capsys.readouterr().out.splitlines() == [
        "  [synthetic2d/heatmap_unet] epoch    1/80  val MRE 9.1 mm (20 s, 20.0 s/epoch, ~26 min 20 s left)",
        "  [synthetic2d/heatmap_unet] epoch    5/80 ..."]
    given = []

    def fake_execute(input_path: str, output_path: str, parameters: dict, **kwargs) -> None:
        given.append(kwargs.get("stdout_file"))
        raise RuntimeError("stop here")

    monkeypatch.setattr(pm, "execute_notebook", fake_execute)
    main(["--dataset", "synthetic2d", "--only", "exploration", "--results-dir", str(tmp_path)])
    main(["--dataset", "synthetic2d", "--only", "exploration", "--results-dir", str(tmp_path), "--quiet"])
    assert isinstance(given[0], ConsoleEcho) and given[0].label == "synthetic2d/exploration" and given[1] is None


def test_the_manifest_records_set_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_papermill(monkeypatch)
    _write_notebook(tmp_path, "toy.ipynb", BODY)
    run_job(Job("toy.ipynb", "toy", ("synthetic2d",)), "synthetic2d", root=tmp_path, extra={"seed": 3})
    manifest = json.loads((tmp_path / "results" / "synthetic2d" / "toy" / "manifest.json").read_text())
    assert manifest["driver"]["overrides"] == {"seed": 3}


def test_seed_and_device_are_recorded_as_overrides_and_replacing_a_profile_value_is_said(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``--seed 0`` on the seed jobs trained three identical runs labelled plain ``full`` (a seeds ensemble of one
    model): --seed and --device replaced the profile's values and were not recorded as overrides."""
    _fake_papermill(monkeypatch)
    _write_notebook(tmp_path, "toy.ipynb", BODY)
    run_job(Job("toy.ipynb", "toy", ("synthetic2d",), smoke={"seed": 1}), "synthetic2d", profile="smoke",
            root=tmp_path, seed=0)
    manifest = json.loads((tmp_path / "results" / "synthetic2d" / "toy" / "manifest.json").read_text())
    assert manifest["driver"]["overrides"] == {"seed": 0}
    assert "synthetic2d/toy: seed=0 replaces the profile's seed=1" in capsys.readouterr().out
    # the notebook's own default seed and a device the profile does not set change nothing a label should say
    # (the comparison's Device column names the device): a plain run stays "smoke", as the test pipeline's
    shutil.rmtree(tmp_path / "results")
    run_job(Job("toy.ipynb", "toy", ("synthetic2d",)), "synthetic2d", profile="smoke", root=tmp_path, seed=0,
            device="cpu")
    manifest = json.loads((tmp_path / "results" / "synthetic2d" / "toy" / "manifest.json").read_text())
    assert manifest["driver"].get("overrides", {}) == {}


def test_set_tuples_arrive_as_lists_and_resume_is_the_drivers() -> None:
    """``--set image_size=128,192`` (a tuple to Python) reached the notebook as the string '(128, 192)';
    ``--set resume=...`` of a scratch folder's checkpoint was deleted with that folder before the run began."""
    from lmlib.run import parse_overrides

    assert parse_overrides(["image_size=128,192", "pairs=((0, 1), (2, 3))"]) == {
        "image_size": [128, 192], "pairs": [[0, 1], [2, 3]]}
    with pytest.raises(ValueError, match="use --resume"):
        parse_overrides(["resume=results/x/.tmp-htc/checkpoints/last.ckpt"])
