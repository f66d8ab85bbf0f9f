"""A refit (``fit_splits: train+val``, lmlib.data.refit): the val images join training as copies with their labels
(fused like the training labels), val and test stay as they are, the run keeps its last epoch and records no
validation error to choose on, and what needs held-out validation refuses such a run with a line naming why."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import pytest
import torch

from lmlib.data.datasets import Dataset, load_dataset
from lmlib.data.example_dataset import write_example_dataset
from lmlib.data.label_fusion import fuse_training_labels
from lmlib.data.refit import FIT_SPLITS, check_held_out_val, is_refit, with_val_in_train
from lmlib.engine.parameters import SharedParameters
from lmlib.engine.runner import _split, check_refit, load_run_data, run_method, write_run_split
from lmlib.methods.base import method_class


def _phantoms() -> Dataset:
    data = load_dataset("synthetic2d", n_images=12, size=(48, 48))
    data.annotator = "a"
    return data


def test_the_val_images_join_training_and_val_and_test_stay() -> None:
    data = _phantoms()
    refit = with_val_in_train(data)
    train, val = data.split("train"), data.split("val")
    assert [s.image_id for s in refit.split("train")] == [s.image_id for s in train + val]
    for copy, original in zip(refit.split("train")[len(train):], val):
        assert copy.meta["refit"] and copy.image is original.image
        np.testing.assert_array_equal(copy.landmarks_mm, original.landmarks_mm)
    for split in ("val", "test"):
        assert [s.image_id for s in refit.split(split)] == [s.image_id for s in data.split(split)]
    assert all(s.meta["split"] == "val" for s in refit.split("val"))  # the originals keep their split
    empty = replace(data, samples=[s for s in data.samples if s.meta.get("split") != "val"])
    with pytest.raises(ValueError, match="synthetic2d: fit_splits='train\\+val'.*empty"):
        with_val_in_train(empty)


def test_the_val_copies_get_the_fused_training_labels_and_val_keeps_the_reference() -> None:
    ref = _phantoms()
    offset = np.random.default_rng(0).normal(0.0, 1.0, (len(ref.landmark_names), ref.spec.ndim))
    noise = np.random.default_rng(1).normal(0.0, 1.0, (len(ref.samples), *offset.shape))
    other = replace(ref, annotator="b", samples=[replace(s, landmarks_mm=s.landmarks_mm + offset + noise[i])
                                                 for i, s in enumerate(ref.samples)])
    fused, _ = fuse_training_labels(with_val_in_train(ref), [with_val_in_train(other)], "mean")
    val_ids = [s.image_id for s in ref.split("val")]
    copies = [s for s in fused.split("train") if s.meta.get("refit")]
    assert [s.image_id for s in copies] == val_ids
    index = {s.image_id: i for i, s in enumerate(ref.samples)}
    for s in copies:  # the mean of both annotators, as for every training image
        expected = ref[s.image_id].landmarks_mm + (offset + noise[index[s.image_id]]) / 2
        np.testing.assert_allclose(s.landmarks_mm, expected, atol=1e-9)
    for original, kept in zip(ref.split("val"), fused.split("val")):
        assert kept is original


def test_max_train_images_trims_the_training_images_and_keeps_the_val_copies() -> None:
    refit = with_val_in_train(_phantoms())
    n_val = len(refit.split("val"))
    trimmed = _split(refit, "train", 3)
    assert len(trimmed) == 3 + n_val and sum(bool(s.meta.get("refit")) for s in trimmed) == n_val


def test_the_seeded_split_file_of_a_refit_records_the_val_images_as_val(tmp_path: Path) -> None:
    declaration = write_example_dataset(tmp_path / "toy", n_images=20, n_new=1)
    params = {"dataset": str(declaration), "fit_splits": "train+val"}
    data, plain = load_run_data(params), load_run_data({**params, "fit_splits": "train"})
    written = write_run_split(data, tmp_path / "run")
    expected = write_run_split(plain, tmp_path / "plain")
    assert written is not None and expected is not None
    assert written.read_text() == expected.read_text() and ",val" in written.read_text()


def test_fit_splits_is_a_checked_shared_parameter() -> None:
    assert FIT_SPLITS == ("train", "train+val")
    assert SharedParameters.model_validate({"fit_splits": "train+val"}).fit_splits == "train+val"
    with pytest.raises(ValueError):
        SharedParameters.model_validate({"fit_splits": "val"})
    assert is_refit({"fit_splits": "train+val"}) and not is_refit({}) and not is_refit(None)


@pytest.mark.parametrize("method, why", [("global_local", "cascade"), ("ensemble", "finished runs"),
                                         ("registration", "trains nothing"), ("tta", "finished runs")])
def test_what_selects_on_val_refuses_a_refit(method: str, why: str) -> None:
    with pytest.raises(ValueError, match=f"fit_splits='train\\+val': {method} .*{why}"):
        check_refit(method_class(method), {"fit_splits": "train+val"})
    check_refit(method_class(method), {"fit_splits": "train"})  # the default: nothing to refuse


@pytest.mark.slow
def test_a_refit_run_trains_on_train_and_val_and_keeps_its_last_epoch(tmp_path: Path) -> None:
    from lmlib.engine.base_run import val_predictions
    from lmlib.predict import calibrate_run
    from lmlib.reporting.diagnostics import conformal_coverage

    out = tmp_path / "refit"
    params = {"dataset": "synthetic2d", "output_dir": str(out), "device": "cpu", "max_epochs": 3,
              "image_size": [48, 48], "channels": [4, 8, 16], "batch_size": 4, "fit_splits": "train+val",
              "overlay_every": 3}
    run_method("heatmap_unet", params)
    data, plain = load_run_data(params), load_run_data({**params, "fit_splits": "train"})
    assert len(data.split("train")) == len(plain.split("train")) + len(plain.split("val"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_val_mre_mm"] is None and metrics["epochs"] == 3
    best = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert best["epoch"] == 2  # the last of the three epochs, whatever its (in-sample) validation error
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"]["fit_splits"] == "train+val"
    callbacks = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["callbacks"]
    assert any(key.startswith("ModelCheckpoint{'monitor': None, 'mode': 'max'") for key in callbacks)  # no val choice
    assert not any("val/mre_mm" in key for key in callbacks)
    with pytest.raises(ValueError, match="refit.*in-sample.*calibrating prediction regions"):
        calibrate_run(out, (0.9,))
    with pytest.raises(ValueError, match="refit.*in-sample.*calibrating regions"):
        conformal_coverage(out, (0.9,))
    with pytest.raises(ValueError, match="refit.*in-sample.*val predictions"):
        val_predictions(out, manifest, data.split("train"), data.split("val"))


def test_a_refit_is_left_out_of_the_peer_benchmark_choice() -> None:
    from lmlib.reporting.peer import our_candidates

    runs = pd.DataFrame({"device": ["cpu", "cpu"], "train_s": [900.0, 1000.0], "epochs": [140, 140],
                         "mre_mm": [1.0, 1.1], "val_mre_mm": [0.9, 1.0], "refit": [True, False]},
                        index=["a_refit", "b"])
    assert list(our_candidates(runs).index) == ["b"]


def test_the_held_out_check_names_the_run_and_what_needs_it() -> None:
    check_held_out_val({"fit_splits": "train"}, "runs/x", "anything")
    check_held_out_val(None, "runs/x", "anything")
    with pytest.raises(ValueError, match="runs/x: a refit .* in-sample: a choice needs a run trained on train"):
        check_held_out_val({"fit_splits": "train+val"}, "runs/x", "a choice")


def test_the_epoch_lines_of_a_refit_mark_the_val_error_in_sample() -> None:
    from lmlib.engine.training import EpochLines, progress_callback

    lines = progress_callback(1, None, "lines", in_sample=True)
    assert isinstance(lines, EpochLines) and lines.val_label == "val MRE (in-sample)"
    assert cast(EpochLines, progress_callback(1, None, "lines")).val_label == "val MRE"
