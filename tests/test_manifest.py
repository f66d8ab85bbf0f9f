import json

import numpy as np
import pytest

from lmlib.data.geometry import Geometry
from lmlib.data.sample import Sample
from lmlib.outputs.manifest import checksum_files, checksum_samples, write_manifest


def _sample(value: float = 0.0) -> Sample:
    return Sample.from_index("a", np.full((4, 4), value), Geometry([1, 1]), [[1, 2]], ["p"])


def test_checksum_samples_is_stable_and_sensitive() -> None:
    assert checksum_samples([_sample()]) == checksum_samples([_sample()])
    assert checksum_samples([_sample()]) != checksum_samples([_sample(1.0)])


def test_checksum_files(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("x")
    first = checksum_files(tmp_path)
    (tmp_path / "a.txt").write_text("y")
    assert checksum_files(tmp_path) != first


def test_manifest_fields(tmp_path) -> None:
    path = write_manifest(tmp_path, {"seed": 3, "device": "cpu", "max_epochs": 2}, samples=[_sample()])
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in ("parameters", "git_commit", "data_checksum", "seed", "device", "started", "finished", "environment"):
        assert key in data
    assert data["seed"] == 3 and data["parameters"]["max_epochs"] == 2
    assert data["data_checksum"] == checksum_samples([_sample()])
    assert data["environment"]["torch"].startswith("2.")
    assert data["environment"]["cpu"]  # runs on one platform string ran on CPUs of different speeds
    assert data["environment"]["cpu_features"]  # a virtual machine's model name does not name them


def test_the_cpu_model_is_read_from_cpuinfo(tmp_path) -> None:
    from lmlib.runtime import cpu_model

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"
                    "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Processor\n", encoding="utf-8")
    assert cpu_model(str(info)) == "Intel(R) Xeon(R) Processor"
    assert cpu_model(str(tmp_path / "absent")) != ""  # no /proc: the platform's word, or "unknown"


def test_the_cpu_features_are_read_from_cpuinfo(tmp_path) -> None:
    """The vector and bf16 instruction sets, in a fixed order, from the flags line; said when none or unknown."""
    from lmlib.runtime import cpu_features

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx2 amx_bf16 amx_tile\n", encoding="utf-8")
    assert cpu_features(str(info)) == "avx2 avx512f amx_bf16"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse sse2\n", encoding="utf-8")
    assert cpu_features(str(info)) == "none"
    assert cpu_features(str(tmp_path / "absent")) == "unknown"


def test_rewritten_results_do_not_make_the_tree_dirty(tmp_path):
    import subprocess

    from lmlib.outputs.manifest import git_state

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "pkg").mkdir()
    (tmp_path / "results" / "metrics.json").write_text("{}")
    (tmp_path / "pkg" / "code.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("<!-- results -->\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    (tmp_path / "results" / "metrics.json").write_text('{"mre_mm": 1}')
    (tmp_path / "README.md").write_text("<!-- results -->\n| table |\n")  # the comparison's generated block
    (tmp_path / "results-refit").mkdir()  # a --results-dir beside results/ (docs/how-to/own-data.md)
    (tmp_path / "results-refit" / "metrics.json").write_text("{}")
    assert git_state(tmp_path / "pkg") == {"git_commit": git_state(tmp_path)["git_commit"], "git_dirty": False}
    (tmp_path / "pkg" / "new_method.py").write_text("x = 3\n")  # not committed: HEAD lacks the code that ran
    assert git_state(tmp_path / "pkg")["git_dirty"] is True
    (tmp_path / "pkg" / "new_method.py").unlink()
    (tmp_path / "pkg" / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path / "pkg")["git_dirty"] is True


def test_a_slow_git_status_is_waited_for_not_recorded_as_unknown(monkeypatch) -> None:
    """In a fresh worktree git status took 18 s; a 10-s limit recorded git_dirty null for a clean run."""
    import subprocess

    from lmlib.outputs import manifest

    real = subprocess.run

    def slow_git(args, **kwargs):
        if kwargs.get("timeout", 0) < 60:  # as git would on a fresh worktree of a 2-core machine
            raise subprocess.TimeoutExpired(args, kwargs.get("timeout"))
        return real(args, **kwargs)

    monkeypatch.setattr(manifest.subprocess, "run", slow_git)
    state = manifest.git_state(manifest.Path(__file__).parent)
    assert state["git_commit"] and state["git_dirty"] is not None


def test_the_manifest_records_which_split_each_image_was_in(tmp_path) -> None:
    """Nothing in a manifest told two runs' splits apart (a split file that moved or dropped images changed the test
    set silently)."""
    from dataclasses import replace

    from lmlib.data.datasets import load_dataset
    from lmlib.outputs.manifest import split_record

    samples = load_dataset("synthetic2d").samples
    write_manifest(tmp_path, {"dataset": "synthetic2d"}, samples=samples)
    record = json.loads((tmp_path / "manifest.json").read_text())
    counts = {k: sum(s.meta["split"] == k for s in samples) for k in ("train", "val", "test")}
    assert record["split_counts"] == counts and len(record["splits_sha256"]) == 64
    first = samples[0]
    other = "train" if first.meta["split"] == "test" else "test"
    moved = [replace(first, meta={**first.meta, "split": other}), *samples[1:]]
    assert split_record(moved)["splits_sha256"] != record["splits_sha256"]
    assert split_record(list(reversed(samples))) == split_record(samples)  # the order of the samples does not matter


def test_images_the_split_file_leaves_out_are_named_when_a_run_starts(capsys) -> None:
    import pandas as pd

    from lmlib.data.datasets import load_dataset
    from lmlib.engine.runner import warn_not_in_split

    data = load_dataset("synthetic2d")
    warn_not_in_split(data)
    assert capsys.readouterr().out == ""
    report = pd.DataFrame([{"image_id": f"img{k}", "annotator": "", "landmark": "", "issue": "not_in_split",
                            "detail": "", "file": ""} for k in range(10)])
    warn_not_in_split(type(data)(data.spec, data.samples, report))
    out = capsys.readouterr().out
    assert "warning: 10 image(s) of synthetic2d are in no split" in out and "img0" in out and "and 2 more" in out


def test_a_reporting_notebook_prints_warnings_without_the_library_source_line(capsys: pytest.CaptureFixture[str],
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison notebooks call print_environment and no setup: their data warnings came out as
    "/work/<worktree>/lmlib/data/datasets.py:504: UserWarning: ..." plus the source line, the machine's path in a
    committed notebook."""
    import warnings

    from lmlib.runtime import print_environment

    monkeypatch.setattr(warnings, "formatwarning", lambda m, c, f, n, line=None: f"{f}:{n}: {c.__name__}: {m}\n")
    print_environment()
    text = warnings.formatwarning("a.json: landmark 'l11' duplicate", UserWarning, "/work/x/lmlib/data/d.py", 504,
                                  "ds = load(...)")
    assert text == "UserWarning: a.json: landmark 'l11' duplicate\n"


def test_a_finished_run_is_read_only_on_the_split_it_saw(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """Shape priors, refinements, ensembles and test-time scales read a finished run on today's split: an image the
    run trained on, now in val, would bias the val choice a shape prior or refinement makes (unchecked before)."""
    from dataclasses import replace

    from lmlib.data.phantoms import make_phantom_dataset
    from lmlib.engine.base_run import read_finished_run
    from lmlib.outputs.manifest import check_same_split, write_split_file
    from lmlib.outputs.reference_runs import write_mean_shape_run

    samples = make_phantom_dataset(2, n_images=10, seed=1, size=(32, 32), n_landmarks=3)
    train = [s for s in samples if s.meta["split"] == "train"]
    test = [s for s in samples if s.meta["split"] == "test"]
    folder = tmp_path / "run"
    write_mean_shape_run(train, test, folder, {"dataset": "synthetic2d"})
    check_same_split(folder, samples)  # no record yet: said, not checked
    assert "not checked" in capsys.readouterr().out
    write_split_file(samples, folder)
    read_finished_run(folder, "synthetic2d", test, "reference", samples=samples)  # its own split: read
    moved = [replace(s, meta={**s.meta, "split": "val"}) if s is train[0] else s for s in samples]
    with pytest.raises(ValueError, match=rf"splits.csv: 1 image\(s\) are in another split .*\({train[0].image_id} "
                                         r"train -> val\)"):
        read_finished_run(folder, "synthetic2d", test, "reference", samples=moved)
