"""The benchmark's step timing: compiled by ``torch.compile`` beside eager (before/after per method), with the
GFLOP counted on the eager step so that the two rates compare the same work; the finished runs' machine beside their
times."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from lmlib.engine.runner import load_run_data
from lmlib.reporting.benchmark import profile_methods
from lmlib.run import job_parameters


@pytest.mark.slow
def test_compiled_steps_are_timed_beside_eager_ones() -> None:
    data = load_run_data({"dataset": "synthetic2d", "data_dir": ""})
    data.samples = data.split("train")
    params = {**job_parameters("heatmap_unet", "synthetic2d", "smoke"), "image_size": [64, 64]}
    htc = {**job_parameters("htc", "synthetic2d", "smoke"), "image_size": [64, 64]}
    table = profile_methods({"heatmap_unet": params, "htc": htc}, data, n_steps=2, peak_gflops=100.0, compiled=True)
    row = table.loc["heatmap_unet"]
    # a U-Net's step before channels-last networks and the compiled loss, beside; none for a method without them
    assert row["before_step_s"] > 0 and row["before_compiled_step_s"] > 0
    assert table.loc["htc", ["before_step_s", "before_compiled_step_s"]].isna().all()
    assert row["compiled_step_s"] > 0 and np.isfinite(row["compile_speedup"])
    assert row["compile_speedup"] == pytest.approx(row["step_s"] / row["compiled_step_s"])
    # the GFLOP of both are counted on the eager step: their rates differ by the compute time only
    assert row["compiled_pct_of_peak"] / row["pct_of_peak"] > 0.5 * row["compile_speedup"]


def test_the_runs_table_names_each_runs_machine_and_grid() -> None:
    """Runs of different sessions may have trained on different machines: ``table_runs.csv`` says which, from
    each manifest, so that their times are not set side by side unmarked. Its grid is the whole-image grid a row
    starts from; a refinement's is its base run's (its manifest recorded the default 128 x 128, which gave the
    peer a 128 x 128 input beside ``htc+local`` on hand-xray)."""
    import json
    from pathlib import Path

    from lmlib.reporting.benchmark import runs_summary

    results = Path(__file__).resolve().parents[1] / "results"
    if not (results / "hand-xray" / "comparison").exists():
        pytest.skip("no committed hand-xray results")
    runs, _ = runs_summary(str(results), "hand-xray", "full")
    for method in runs.index:
        folder = results / "hand-xray" / method
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        assert runs.loc[method, "machine"] == manifest["environment"]["platform"] != "", method
        assert runs.loc[method, "cpu"] == manifest["environment"].get("cpu", ""), method  # empty before recorded
        assert runs.loc[method, "cpu_features"] == manifest["environment"].get("cpu_features", ""), method
    for refined in ("htc+local/local1", "htc+local/local2"):
        assert runs.loc[refined, "image_size"] == runs.loc["htc", "image_size"] == "256x320"
    assert runs.loc["registration+local/local1", "image_size"] == runs.loc["registration", "image_size"]


def test_each_timing_keeps_its_fastest_round_and_rounds_interleave() -> None:
    """``_fastest``: every timing once per round, in order (so a slow spell of the machine hits one round of
    several timings, not every round of one), and the fastest step of each kept."""
    from lmlib.reporting.benchmark import _fastest

    calls: list[str] = []
    steps = {"a": iter([0.3, 0.1, 0.2]), "b": iter([0.5, 0.6, 0.4])}

    def timing(key: str):
        def run() -> dict:
            calls.append(key)
            return {"step_s": next(steps[key]), "key": key}
        return run

    best = _fastest({"a": timing("a"), "b": timing("b")}, rounds=3)
    assert calls == ["a", "b"] * 3
    assert best["a"]["step_s"] == 0.1 and best["b"]["step_s"] == 0.4


def _layer_params() -> tuple[Any, dict[str, Any]]:
    data = load_run_data({"dataset": "synthetic2d", "data_dir": ""})
    data.samples = data.split("train")
    return data, {**job_parameters("heatmap_unet", "synthetic2d", "smoke"), "image_size": [64, 48]}


def _conv_rows(table: pd.DataFrame) -> pd.DataFrame:
    return table.drop(index=[r for r in ("other convolutions", "rest of the step") if r in table.index])


def test_the_layer_profile_splits_the_step_by_convolution() -> None:
    """``profile_layers``: every convolution of the network found once per step with its forward and its backward,
    its GFLOP (read from the profiler's shapes) summing to what ``FlopCounterMode`` counts for the same step (the
    U-Net's arithmetic is all convolutions), and time left for the rest of the step."""
    import torch

    from lmlib.reporting.benchmark import _first_stage, profile_layers, profile_training

    data, params = _layer_params()
    table = profile_layers("heatmap_unet", params, data, n_steps=2, peak_gflops=100.0, top=50)
    counted = profile_training("heatmap_unet", params, data, n_steps=1)["gflop_per_step"]
    assert table["gflop"].sum() == pytest.approx(counted, rel=1e-6)
    assert list(table.index[-1:]) == ["rest of the step"] and "other convolutions" not in table.index  # top=50
    assert table.loc["rest of the step", "pct_of_step"] > 0
    convs = _conv_rows(table)
    assert (convs["forward_ms"] > 0).all() and (convs["backward_ms"] > 0).all()  # each forward met its backward
    network = _first_stage("heatmap_unet", params, data, [64, 48])[0].build_network()
    assert convs["per_step"].sum() == sum(isinstance(m, torch.nn.modules.conv._ConvNd) for m in network.modules())
    # the grid in (x, y) order: the last up-sampling convolution outputs the full 64 x 48 grid
    assert any("transposed" in label and label.endswith("32x24 -> 64x48") for label in table.index)
    assert table.index.is_unique
    assert np.allclose(table["pct_of_peak"].dropna(), table["achieved_gflops"].dropna())  # a peak of 100 GFLOP/s
    top = profile_layers("heatmap_unet", params, data, n_steps=1, top=3)
    assert list(top.index[3:]) == ["other convolutions", "rest of the step"]
    assert top.loc["other convolutions", "per_step"] == convs["per_step"].sum() - _conv_rows(top)["per_step"].sum()


@pytest.mark.slow
def test_the_layer_profile_of_a_compiled_step() -> None:
    """Compiled as training compiles it, the step still shows every convolution (inductor calls them as extern
    kernels) with the same GFLOP; a step that fell back to eager would raise, not pass as compiled."""
    from lmlib.reporting.benchmark import profile_layers

    data, params = _layer_params()
    eager = profile_layers("heatmap_unet", params, data, n_steps=1, top=50)
    compiled = profile_layers("heatmap_unet", params, data, n_steps=2, top=50, torch_compile=True)
    assert compiled["gflop"].sum() == pytest.approx(eager["gflop"].sum(), rel=1e-6)
    assert sorted(compiled.index) == sorted(eager.index)
    assert (_conv_rows(compiled)["backward_ms"] > 0).all()


def test_the_layer_profile_prints_nothing_to_stderr() -> None:
    """The profiler's backend printed "profiler_start/stop" lines to stderr, which landed in the executed benchmark
    notebook: a fresh process (the level is read at its first profile) shows none."""
    import os
    import subprocess
    import sys

    code = ("from lmlib.engine.runner import load_run_data\nfrom lmlib.run import job_parameters\n"
            "from lmlib.reporting.benchmark import profile_layers\n"
            "data = load_run_data({'dataset': 'synthetic2d', 'data_dir': ''})\ndata.samples = data.split('train')\n"
            "params = {**job_parameters('heatmap_unet', 'synthetic2d', 'smoke'), 'image_size': [32, 32]}\n"
            "profile_layers('heatmap_unet', params, data, n_steps=1)\n")
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "profiler_start" not in done.stderr and "profiler_stop" not in done.stderr


def test_a_local_stage_is_timed_at_inference_with_its_nets_one_by_one_and_grouped() -> None:
    """The benchmark's local-stage row: one patch per landmark per image, the nets' time both ways and the stage's
    (patches + nets); the grouped nets are the ones prediction uses."""
    from lmlib.reporting.benchmark import time_local_inference

    data = load_run_data({"dataset": "synthetic2d"})
    row = time_local_inference(job_parameters("global_local", "synthetic2d", "smoke"), data, n_images=2, rounds=1)
    assert row["landmarks"] == len(data.landmark_names) and row["images"] == 2
    assert row["patch_px"] > 0 and row["spacing_mm"] > 0
    for key in ("data_s", "prepare_s", "nets_one_by_one_s", "nets_grouped_s"):
        assert row[key] > 0
    assert row["prepare_s"] < row["data_s"]  # the preparation is part of the patches' time
    assert row["stage_s_grouped"] == pytest.approx(row["data_s"] + row["nets_grouped_s"])
    assert row["nets_speedup"] == pytest.approx(row["nets_one_by_one_s"] / row["nets_grouped_s"])
