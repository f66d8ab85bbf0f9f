"""Cascades: stage k is trained on its own view and evaluated around stage k-1's predictions; each
stage has its own folder and checkpoint; chaining the checkpoints alone reproduces the predictions."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lmlib.data.loaders import LandmarkDataset, ViewSpec
from lmlib.data.phantoms import make_phantom_dataset
from lmlib.engine.cascade import Stage, as_centres, chain, fit_cascade, model_checkpoints, predict_cascade
from lmlib.engine.training import Predictions, predict
from lmlib.methods import build_method

pytestmark = pytest.mark.slow  # its module fixture trains a cascade
SIZE = (64, 64)
NET = {"channels": (8, 16, 32), "num_res_units": 1}


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    samples = make_phantom_dataset(2, n_images=30, seed=5, size=SIZE, n_landmarks=3)
    stages = [
        Stage("global", build_method("heatmap_unet", spatial_dims=2, n_landmarks=3, network=NET),
              ViewSpec("whole", SIZE), max_epochs=3),
        # landmarks 0 and 2 only, each in its own 32-px patch (per-landmark items), centres jittered by 3 mm
        Stage("local", build_method("heatmap_unet", spatial_dims=2, n_landmarks=1, network=NET),
              ViewSpec("patch", (32, 32), landmarks=(0, 2), per_landmark=True, jitter=("uniform", 3.0)),
              max_epochs=2),
    ]
    out = tmp_path_factory.mktemp("cascade")
    return samples, out, fit_cascade(stages, samples, out, device="cpu", seed=0)


def test_each_stage_has_its_folder_checkpoint_and_summed_times(cascade):
    _, out, results = cascade
    assert [r.stage.name for r in results] == ["global", "local"]
    for r in results:
        assert (out / r.stage.name / "checkpoints" / "best.ckpt").is_file()
        assert (out / r.stage.name / "training_log" / "metrics.csv").is_file()
    assert results[1].train_seconds > results[0].train_seconds > 0
    assert results[1].infer_seconds_per_image > results[0].infer_seconds_per_image


def test_unserved_landmarks_keep_the_previous_stage(cascade):
    _, _, (first, second) = cascade
    for a, b in zip(first.test.world_mm, second.test.world_mm):
        np.testing.assert_array_equal(a[1], b[1])  # landmark 1 is not refined by the local stage
        assert np.all(np.isfinite(b))


def test_local_stage_looks_around_the_previous_predictions(cascade):
    samples, _, (first, _) = cascade
    test = [s for s in samples if s.meta["split"] == "test"]
    ds = LandmarkDataset(test, view=ViewSpec("patch", (32, 32), landmarks=(0, 2), per_landmark=True),
                         centres=as_centres(test, first.test))
    item = ds[1]  # image 0, landmark 2
    centre = item["index_to_world"][:, :2] @ np.full(2, 15.5) + item["index_to_world"][:, 2]
    np.testing.assert_allclose(centre, first.test.world_mm[0][2], atol=1e-6)


def test_checkpoints_alone_chain_to_the_same_predictions(cascade):
    samples, _, results = cascade
    test = [s for s in samples if s.meta["split"] == "test"]
    chained = predict_cascade([r.fit.best_checkpoint for r in results], test)
    for a, b in zip(chained.world_mm, results[-1].test.world_mm):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_stage_folder_chains_the_stages_up_to_it_and_a_patch_stage_alone_is_refused(cascade):
    """The local stage's folder (``lmlib.predict results/.../global_local/local``, a base run or ensemble member
    named ``method/stage``) predicted with that stage alone, its patches centred on the ground truth (NaN for new
    images): a silent wrong number. A stage's folder now chains the cascade's stages up to it, and a patch stage
    given no centres is refused."""
    samples, out, results = cascade
    test = [s for s in samples if s.meta["split"] == "test"]
    (out / "manifest.json").write_text(json.dumps({"stages": ["global", "local"]}))  # as the driver writes it
    best = [out / name / "checkpoints" / "best.ckpt" for name in ("global", "local")]
    assert model_checkpoints(out / "local") == best and model_checkpoints(out / "global") == best[:1]
    for a, b in zip(predict_cascade(model_checkpoints(out / "local"), test).world_mm, results[-1].test.world_mm):
        np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="patch stage"):
        predict(best[1], test)


def test_chain_fills_only_missing_rows():
    prev = Predictions([np.array([[1.0, 2.0], [3.0, 4.0]])], [np.array([0.5, 0.5])], 0.1)
    cur = Predictions([np.array([[9.0, 9.0], [np.nan, np.nan]])], [np.array([0.9, np.nan])], 0.2)
    out = chain(prev, cur)
    np.testing.assert_array_equal(out.world_mm[0], [[9.0, 9.0], [3.0, 4.0]])
    np.testing.assert_array_equal(out.confidence[0], [0.9, 0.5])
