import json

import numpy as np
import pandas as pd
import pytest

from lmlib.data.geometry import Geometry
from lmlib.data.sample import Sample
from lmlib.outputs.contract import (
    METRIC_KEYS,
    PREDICTION_COLUMNS,
    ContractError,
    predictions_frame,
    read_run,
    write_outputs,
)

TIMINGS = {"train_seconds": 1.5, "infer_seconds_per_image": 0.1, "peak_rss_mb": 100.0}


def _samples() -> list[Sample]:
    geo = Geometry([0.5, 0.5])
    a = Sample.from_index("a", np.zeros((10, 10)), geo, [[0, 0], [4, 4]], ["p", "q"])
    b = Sample.from_index("b", np.zeros((10, 10)), geo, [[2, 2], [np.nan, np.nan]], ["p", "q"])
    return [a, b]


def test_predictions_frame_errors_and_masking() -> None:
    samples = _samples()
    preds = [s.landmarks_mm + np.array([3.0, 4.0]) for s in samples]
    preds[1][1] = [1.0, 1.0]  # a prediction for a masked reference: kept, error empty
    df = predictions_frame(samples, preds)
    assert list(df.columns) == list(PREDICTION_COLUMNS)
    assert len(df) == 4
    np.testing.assert_allclose(df["error_mm"].iloc[:3], 5.0)
    assert np.isnan(df["error_mm"].iloc[3]) and df["x_mm"].iloc[3] == 1.0
    assert df["z_mm"].isna().all()


def test_write_and_read_roundtrip(tmp_path) -> None:
    samples = _samples()
    df = predictions_frame(samples, [s.landmarks_mm + np.array([0.0, 1.0]) for s in samples])
    metrics = write_outputs(tmp_path, df, TIMINGS)
    assert metrics["mre_mm"] == pytest.approx(1.0)
    assert metrics["sdr_2mm"] == 100.0 and metrics["n_masked"] == 1 and metrics["n_images"] == 2
    preds, read = read_run(tmp_path)
    assert set(METRIC_KEYS) <= set(read)
    assert preds["image_id"].tolist() == ["a", "a", "b", "b"]


def test_read_run_names_the_bad_file(tmp_path) -> None:
    with pytest.raises(ContractError, match="predictions.csv: missing"):
        read_run(tmp_path)
    pd.DataFrame({"image_id": ["a"]}).to_csv(tmp_path / "predictions.csv", index=False)
    (tmp_path / "metrics.json").write_text(json.dumps({k: 0 for k in METRIC_KEYS}))
    with pytest.raises(ContractError, match=r"predictions.csv: missing columns \['landmark'"):
        read_run(tmp_path)


def test_write_outputs_requires_timings(tmp_path) -> None:
    df = predictions_frame(_samples(), [s.landmarks_mm for s in _samples()])
    with pytest.raises(ValueError, match="peak_rss_mb"):
        write_outputs(tmp_path, df, {"train_seconds": 0, "infer_seconds_per_image": 0})


def test_a_run_written_in_place_first_clears_the_earlier_runs_outputs(tmp_path, monkeypatch, capsys):
    """A method notebook run by hand into an existing folder kept the earlier run's sub-run folders (rows of a model
    that no longer exists beside the new one) and, interrupted, left new predictions beside the old manifest."""
    from lmlib.engine import runner
    from lmlib.outputs.contract import clear_earlier_run

    out = tmp_path / "htc"
    for folder in (out, out / "quarter_head", out / "half_head"):
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("predictions.csv", "metrics.json", "manifest.json"):
            (folder / name).write_text("earlier")
    (out / "val_predictions.csv").write_text("earlier")  # the earlier run's val predictions go with its test ones
    for kept in ("checkpoints/last.ckpt", "training_log/metrics.csv", "base_val_predictions.csv"):
        (out / kept).parent.mkdir(exist_ok=True)
        (out / kept).write_text("kept")

    def stop(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(runner, "fit", stop)
    with pytest.raises(RuntimeError, match="interrupted"):
        runner.run_method("heatmap_unet", {"dataset": "synthetic2d", "output_dir": str(out), "device": "cpu",
                                           "max_epochs": 1, "max_train_images": 4})
    assert "removed 10 output file(s) of an earlier run" in capsys.readouterr().out
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "base_val_predictions.csv", "checkpoints/last.ckpt", "splits.csv", "training_log/metrics.csv"]
    assert clear_earlier_run(out) == [] and clear_earlier_run(tmp_path / "none") == []
    # a folder of runs (no run's files of its own) is no run folder: its runs are not touched
    (out / "metrics.json").write_text("a run in a folder of runs")
    assert clear_earlier_run(tmp_path) == [] and (out / "metrics.json").is_file()


def test_a_refused_run_keeps_the_earlier_runs_split_record(tmp_path):
    """The split record was written before the run's checks: a run refused by them (here a cascade asked to refit on
    train + val) overwrote the finished run's splits.csv beside its untouched manifest."""
    from lmlib.engine import runner

    out = tmp_path / "global_local"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    (out / "splits.csv").write_text("image_id,split\nearlier,train\n")
    with pytest.raises(ValueError, match="fit_splits"):
        runner.run_method("global_local", {"dataset": "synthetic2d", "output_dir": str(out), "device": "cpu",
                                           "max_epochs": 1, "fit_splits": "train+val"})
    assert (out / "splits.csv").read_text() == "image_id,split\nearlier,train\n"
