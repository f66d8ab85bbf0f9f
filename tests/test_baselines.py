"""Reference rows without training: the mean-shape baseline and the second annotator as runs."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from lmlib.data.datasets import load_dataset
from lmlib.data.geometry import Geometry
from lmlib.data.sample import Sample
from lmlib.evaluation import baselines
from lmlib.evaluation.metrics import mean_radial_error
from lmlib.outputs import reference_runs
from lmlib.outputs.contract import read_run

NAMES = ("P", "Q", "R")


def _sample(image_id: str, size: tuple[int, ...], geometry: Geometry, index: list[list[float]],
            valid: list[bool]) -> Sample:
    return Sample.from_index(image_id, np.zeros(size, np.float32), geometry, np.array(index, float), NAMES,
                             np.array(valid))


def test_mean_shape_by_hand_different_sizes_spacings_and_geometry() -> None:
    # train a: 10 x 20 px, 1 mm; P at index (4.5, 9.5) -> u = (0.5, 0.5); Q at (0.5, 3.5) -> u = (0.1, 0.2)
    a = _sample("a", (10, 20), Geometry((1.0, 1.0)), [[4.5, 9.5], [0.5, 3.5], [1.0, 1.0]], [True, True, False])
    # train b: 20 x 10 px, 2 x 0.5 mm, shifted origin; P at (14.5, 1.5) -> u = (0.75, 0.2); Q masked
    b = _sample("b", (20, 10), Geometry((2.0, 0.5), origin=(100.0, -50.0)),
                [[14.5, 1.5], [3.0, 3.0], [2.0, 2.0]], [True, False, False])
    np.testing.assert_allclose(baselines.mean_normalised_shape([a, b]),
                               [[0.625, 0.35], [0.1, 0.2], [np.nan, np.nan]], equal_nan=True)
    # test: 8 x 40 px, 0.5 x 2 mm, origin (10, 20), axes rotated by 90 degrees
    rot = np.array([[0.0, -1.0], [1.0, 0.0]])
    t = _sample("t", (8, 40), Geometry((0.5, 2.0), origin=(10.0, 20.0), direction=rot),
                [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], [True, True, True])
    (pred,) = baselines.mean_shape_predictions([a, b], [t])
    # in network orientation t is 40 x 8 px of 2 x 0.5 mm, identity direction, its index (0, 0) at the old index
    # (0, 39): world (10, 20) + rot @ (0, 78) = (-68, 20)
    # P: index = u * size - 0.5 = (24.5, 2.3) -> scaled (49, 1.15) -> + origin
    # Q: index = (3.5, 1.1) -> scaled (7, 0.55) -> + origin; R: never seen
    np.testing.assert_allclose(pred, [[-19.0, 21.15], [-61.0, 20.55], [np.nan, np.nan]], equal_nan=True)
    (centre,) = baselines.image_centre_predictions([t])
    np.testing.assert_allclose(t.geometry.world_to_index(centre), [[3.5, 19.5]] * 3)
    with pytest.raises(ValueError, match="no training samples"):
        baselines.mean_shape_predictions([], [t])


def test_mean_shape_of_one_anatomy_stored_mirrored_is_exact() -> None:
    """afids-templates stores some templates RAS and some LAS: averaged in the raw array frame, a landmark met
    its own mirror image (the mean shape put both landmarks at the centre line)."""
    size, truth = (100, 60), np.array([[20.0, 50.0], [80.0, 40.0]])  # world mm
    ras = Sample("ras", np.zeros(size, np.float32), Geometry((1.0, 1.0)), truth, [True, True], ("P", "Q"))
    las = Sample("las", np.zeros(size, np.float32), Geometry((1.0, 1.0), origin=(99.0, 0.0),
                                                             direction=np.diag([-1.0, 1.0])), truth, [True, True],
                 ("P", "Q"))
    for train, test in (([ras, las], ras), ([ras, las], las), ([las], ras)):
        (pred,) = baselines.mean_shape_predictions(train, [test])
        np.testing.assert_allclose(pred, truth, atol=1e-9)


def test_mean_shape_3d_roundtrip_and_name_check() -> None:
    geo = Geometry((1.0, 2.0, 3.0), origin=(5.0, 6.0, 7.0))
    s = Sample.from_index("v", np.zeros((10, 8, 6), np.float32), geo, np.array([[2.0, 3.0, 4.0]]), ("P",))
    (pred,) = baselines.mean_shape_predictions([s], [s])  # one training image: its own landmarks back
    np.testing.assert_allclose(pred, s.landmarks_mm)
    other = Sample.from_index("w", np.zeros((10, 8, 6), np.float32), geo, np.array([[2.0, 3.0, 4.0]]), ("Z",))
    with pytest.raises(ValueError, match="landmarks"):
        baselines.mean_shape_predictions([s], [other])


@pytest.mark.parametrize(("dataset", "mean_shape_mm", "centre_mm"),
                         [("synthetic2d", 6.55, 31.81), ("synthetic3d", 3.09, 12.70)])
def test_mean_shape_on_synthetic_test_sets(dataset: str, mean_shape_mm: float, centre_mm: float) -> None:
    data = load_dataset(dataset)
    train, test = data.split("train"), data.split("test")
    assert train and test
    assert mean_radial_error(baselines.mean_shape_predictions(train, test), test) == pytest.approx(mean_shape_mm, abs=0.3)
    assert mean_radial_error(baselines.image_centre_predictions(test), test) == pytest.approx(centre_mm, abs=0.3)


def test_write_mean_shape_run_follows_the_contract(tmp_path: Path) -> None:
    geo = Geometry((0.5, 0.5))
    rng = np.random.default_rng(0)
    train = [_sample(f"tr{i}", (40, 30), geo, rng.uniform(5, 25, (3, 2)).tolist(), [True, True, i != 0])
             for i in range(4)]
    test = [_sample(f"te{i}", (40, 30), geo, rng.uniform(5, 25, (3, 2)).tolist(), [True, True, True])
            for i in range(2)]
    out = tmp_path / "reference" / "mean_shape"
    metrics = reference_runs.write_mean_shape_run(train, test, out, {"dataset": "toy", "seed": 3})
    preds, stored = read_run(out)
    assert stored["kind"] == "reference" and stored["method"] == "mean_shape" and stored["n_train_images"] == 4
    assert stored["train_seconds"] == 0.0 and metrics["n_images"] == 2 and len(preds) == 6
    assert stored["mre_mm"] == pytest.approx(mean_radial_error(baselines.mean_shape_predictions(train, test), test), abs=1e-3)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["parameters"]["dataset"] == "toy" and manifest["parameters"]["output_dir"] == str(out)
    assert manifest["seed"] == 3 and manifest["device"] == "cpu" and manifest["data_checksum"]


def test_write_inter_observer_run_writes_a_manifest(tmp_path: Path) -> None:
    geo = Geometry((1.0, 1.0))
    ref = [_sample("a", (8, 8), geo, [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], [True, True, True])]
    other = [_sample("a", (8, 8), geo, [[1.0, 4.0], [2.0, 2.0], [3.0, 3.0]], [True, True, False]),
             _sample("b", (8, 8), geo, [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], [True, True, True])]
    metrics = reference_runs.write_inter_observer_run(ref, other, tmp_path / "inter-observer", {"dataset": "toy"})
    preds, stored = read_run(tmp_path / "inter-observer")
    np.testing.assert_allclose(preds["error_mm"], [3.0, 0.0, np.nan])
    assert stored["kind"] == "reference" and stored["method"] == "inter-observer"
    assert metrics["mre_mm"] == pytest.approx(1.5) and stored["n_unmatched_images"] == 1
    # the second annotator's missing point is a comparison not made, not a miss: 1 of 2 points within 2 mm
    assert (stored["n_masked"], stored["n_unpredicted"], stored["sdr_2mm"]) == (1, 0, pytest.approx(50.0))
    assert (tmp_path / "inter-observer" / "manifest.json").is_file()


def test_reference_rows_on_hamedan_ceph(shared_data: Path) -> None:
    root = shared_data / "hamedan-ceph"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the loader reports the known annotation defects
        data = load_dataset("hamedan-ceph", root, load_images=False)
        second = load_dataset("hamedan-ceph", root, annotator="annotator2", load_images=False).split("test")
    train, test = data.split("train"), data.split("test")
    assert (len(train), len(test)) == (103, 28)  # the corrected split
    assert mean_radial_error(baselines.mean_shape_predictions(train, test), test) == pytest.approx(7.48, abs=0.05)
    refs, points = reference_runs.match_annotator(test, second)
    assert mean_radial_error(points, refs) == pytest.approx(1.40, abs=0.05)  # README: inter-observer MRE on test
