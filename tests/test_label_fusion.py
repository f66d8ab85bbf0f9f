"""Training labels fused over annotators (lmlib.data.label_fusion): only the train split changes, a second
annotator's constant convention is removed exactly by ``mean_aligned`` and kept (halved) by ``mean``, masked points
are filled from the other annotator, and bad requests fail with the data set's name."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from lmlib.data.datasets import Dataset, load_dataset
from lmlib.data.geometry import Geometry
from lmlib.data.label_fusion import annotator_offsets, fuse_training_labels
from lmlib.engine.parameters import SharedParameters


def _phantoms() -> Dataset:
    data = load_dataset("synthetic2d", n_images=12, size=(48, 48))
    data.annotator = "a"
    return data


def _second(data: Dataset, offset: np.ndarray, noise: np.ndarray | None = None) -> Dataset:
    """The same images annotated by "b": every point moved by ``offset`` (N, D) plus per-image ``noise``."""
    samples = []
    for i, s in enumerate(data.samples):
        moved = s.landmarks_mm + offset + (0.0 if noise is None else noise[i])
        samples.append(replace(s, landmarks_mm=moved))
    return replace(data, samples=samples, annotator="b")


def _train_points(data: Dataset) -> np.ndarray:
    return np.stack([s.landmarks_mm for s in data.split("train")])


def test_mean_aligned_removes_a_constant_convention_and_mean_keeps_half_of_it() -> None:
    ref = _phantoms()
    n, d = len(ref.landmark_names), ref.spec.ndim
    offset = np.random.default_rng(0).normal(0.0, 1.5, (n, d))
    other = _second(ref, offset)
    aligned, offsets = fuse_training_labels(ref, [other], "mean_aligned")
    np.testing.assert_allclose(_train_points(aligned), _train_points(ref), atol=1e-9)
    np.testing.assert_allclose(offsets["b"][["dx_mm", "dy_mm"]].to_numpy(), -offset, atol=1e-9)
    mean, none = fuse_training_labels(ref, [other], "mean")
    assert none == {}
    np.testing.assert_allclose(_train_points(mean), _train_points(ref) + offset / 2, atol=1e-9)
    for fused in (aligned, mean):  # model selection and scoring keep the reference's points
        for split in ("val", "test"):
            assert fused.split(split) and all(a is b for a, b in zip(fused.split(split), ref.split(split)))


def test_mean_aligned_halves_independent_placement_noise() -> None:
    ref = _phantoms()
    n, d = len(ref.landmark_names), ref.spec.ndim
    noise = np.random.default_rng(1).normal(0.0, 1.0, (len(ref.samples), n, d))
    other = _second(ref, np.full((n, d), 2.0), noise)
    fused, _ = fuse_training_labels(ref, [other], "mean_aligned")
    train = [i for i, s in enumerate(ref.samples) if s.meta.get("split") == "train"]
    expected = _train_points(ref) + (noise[train] - noise[train].mean(axis=0)) / 2
    np.testing.assert_allclose(_train_points(fused), expected, atol=1e-9)


def test_a_point_only_the_other_annotator_gave_is_filled_and_one_nobody_gave_stays_masked() -> None:
    ref = _phantoms()
    first = ref.split("train")[0]
    valid = first.valid.copy()
    valid[0] = False
    gap = replace(first, valid=valid)
    ref = replace(ref, samples=[gap if s is first else s for s in ref.samples])
    other = _second(ref, np.zeros((len(ref.landmark_names), ref.spec.ndim)))
    other_first = other.split("train")[0]
    both_gone = other_first.valid.copy()
    both_gone[:2] = [True, False]
    other = replace(other, samples=[replace(other_first, valid=both_gone, landmarks_mm=first.landmarks_mm.copy())
                                    if s is other_first else s for s in other.samples])
    ref_first = ref.split("train")[0]
    ref_valid = ref_first.valid.copy()
    ref_valid[1] = False
    ref = replace(ref, samples=[replace(ref_first, valid=ref_valid) if s is ref_first else s for s in ref.samples])
    fused, _ = fuse_training_labels(ref, [other], "mean")
    out = fused.split("train")[0]
    assert out.valid[0] and not out.valid[1]
    np.testing.assert_allclose(out.landmarks_mm[0], first.landmarks_mm[0])
    assert out.meta["n_annotators"][:2] == [1, 0]


def test_bad_requests_name_the_data_set() -> None:
    ref = _phantoms()
    with pytest.raises(ValueError, match="synthetic2d.*needs a second annotator"):
        fuse_training_labels(ref, [], "mean_aligned")
    with pytest.raises(ValueError, match="train_labels must be one of"):
        fuse_training_labels(ref, [ref], "median")
    turned = [replace(s, geometry=Geometry(s.geometry.spacing, direction=[[0, 1], [1, 0]])) if i == 0 else s
              for i, s in enumerate(ref.split("train"))]
    mixed = replace(ref, samples=turned + ref.split("val") + ref.split("test"))
    with pytest.raises(ValueError, match="share one orientation"):
        fuse_training_labels(mixed, [mixed], "mean_aligned")
    with pytest.raises(ValueError):
        SharedParameters.model_validate({"train_labels": "median"})
    assert fuse_training_labels(ref, [], "reference")[0] is ref


def test_hamedan_annotators_differ_by_a_convention_the_aligned_mean_removes(shared_data: Path) -> None:
    """On the real two-annotator set: annotator2's mean offset to annotator1 over the training images is not
    negligible (what the plain mean would add to the targets), and the aligned mean is closer to annotator1's
    points than annotator2's are, landmark by landmark on average."""
    try:
        a1 = load_dataset("hamedan-ceph", shared_data, load_images=False)
        a2 = load_dataset("hamedan-ceph", shared_data, annotator="annotator2", load_images=False)
    except FileNotFoundError:
        pytest.skip("hamedan-ceph is not in ../shared/data")
    table = annotator_offsets(a1, a2)
    assert table["n_images"].min() >= 100 and table["norm_mm"].mean() > 0.3
    fused, _ = fuse_training_labels(a1, [a2], "mean_aligned")
    ref, mine = _train_points(a1), _train_points(fused)
    other = np.stack([{s.image_id: s for s in a2.split("train")}[s.image_id].landmarks_mm for s in a1.split("train")])
    to_fused = np.nanmean(np.linalg.norm(mine - ref, axis=2))
    to_other = np.nanmean(np.linalg.norm(other - ref, axis=2))
    assert to_fused < 0.55 * to_other
