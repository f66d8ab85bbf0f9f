"""Tests for lmlib.data.phantoms: determinism, geometry, and that structures sit at the landmarks."""
from __future__ import annotations

import numpy as np
import pytest

from lmlib.data.phantoms import KINDS, assign_splits, make_phantom, make_phantom_dataset


@pytest.mark.parametrize("ndim", [2, 3])
def test_deterministic_and_seed_dependent(ndim: int) -> None:
    a, b, c = make_phantom(ndim, 5), make_phantom(ndim, 5), make_phantom(ndim, 6)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.landmarks_mm, b.landmarks_mm)
    assert not np.array_equal(a.image, c.image)
    assert np.abs(a.landmarks_mm - c.landmarks_mm).max() > 1.0


@pytest.mark.parametrize("ndim,size,spacing,n", [(2, None, None, None), (2, (96, 80), (0.5, 0.7), 16),
                                                 (2, (64, 64), None, 3), (3, None, None, None),
                                                 (3, (40, 48, 36), (1.2, 1.0, 1.5), 10)])
def test_shapes_geometry_and_landmarks_inside(ndim: int, size, spacing, n) -> None:
    for seed in range(4):
        s = make_phantom(ndim, seed, size=size, spacing=spacing, n_landmarks=n)
        exp_size = size or (128, 128) if ndim == 2 else size or (64, 64, 64)
        assert s.size == tuple(exp_size) and s.image.dtype == np.float32
        assert len(s.landmark_names) == (n or (8 if ndim == 2 else 6)) and s.valid.all()
        np.testing.assert_allclose(s.geometry.spacing, spacing or (1.0,) * ndim)
        assert np.abs(s.geometry.origin).min() > 1e-3  # non-trivial origin
        idx = s.landmarks_index
        assert np.all(idx >= 2) and np.all(idx <= np.array(s.size) - 3)
        np.testing.assert_allclose(s.geometry.index_to_world(idx), s.landmarks_mm, atol=1e-9)
        assert len(set(s.landmark_names)) == len(s.landmark_names)


def _check_structures(s, tol_px: float = 0.5) -> None:
    """Intensity-weighted centroid of each (noise-free) structure = landmark + documented offset."""
    g = s.geometry
    idx = np.stack(np.meshgrid(*[np.arange(k) for k in s.size], indexing="ij"), -1).reshape(-1, s.ndim)
    world = g.index_to_world(idx)
    vals = s.image.reshape(-1)
    for lm, st in zip(s.landmarks_mm, s.meta["structures"]):
        near = np.linalg.norm(world - lm, axis=1) <= st["extent_mm"] + 1.5 * g.spacing.max()
        f = (vals[near] - s.meta["body_level"]) / st["contrast"]
        assert f.max() > 0.6 and f.min() > -0.02, st["name"]  # isolated structure on flat body
        centroid = (f[:, None] * world[near]).sum(0) / f.sum()
        err_px = np.abs((centroid - lm - np.array(st["centroid_offset_mm"])) / g.spacing)
        assert err_px.max() < tol_px, (st["name"], err_px)
        if st["kind"] in ("apex", "corner", "bar_end"):  # tip: structure behind, nothing ahead
            d = np.array(st["direction"])
            ahead = np.linalg.norm(world - (lm + 1.5 * g.spacing.max() * d), axis=1) < 0.5 * g.spacing.min()
            assert np.all(np.abs(vals[ahead] - s.meta["body_level"]) < 1e-6), st["name"]
        if st["kind"] in ("disc", "cross", "tee"):  # bright at the landmark itself
            assert s.image[tuple(np.round(g.world_to_index(lm)[0]).astype(int))] > s.meta["body_level"]


@pytest.mark.parametrize("ndim,spacing,n", [(2, None, None), (2, (0.5, 0.7), 10), (3, None, None),
                                            (3, (1.0, 0.8, 1.3), 8)])
def test_structure_sits_at_landmark(ndim: int, spacing, n) -> None:
    size = (160, 140) if ndim == 2 else None
    for seed in range(3):
        s = make_phantom(ndim, seed, size=size, spacing=spacing, n_landmarks=n, noise=0.0, bias=0.0)
        assert {st["kind"] for st in s.meta["structures"]} <= set(KINDS)
        _check_structures(s)


def test_noise_and_bias_change_image_not_landmarks() -> None:
    a, b = make_phantom(2, 1), make_phantom(2, 1, noise=0.0, bias=0.0)
    np.testing.assert_array_equal(a.landmarks_mm, b.landmarks_mm)
    assert 0.01 < np.std(a.image - b.image) < 0.2


def test_mean_shape_consistency_across_images() -> None:
    """Same landmark in different images: similar place (a learnable layout), but not identical."""
    lms = np.stack([make_phantom(2, s).landmarks_index for s in range(20)])
    sd = lms.std(axis=0).mean()
    assert 1.0 < sd < 10.0
    mean_d = np.linalg.norm(lms.mean(0)[:, None] - lms.mean(0)[None], axis=-1)
    assert mean_d[~np.eye(8, dtype=bool)].min() > 3 * sd  # landmarks do not swap places


def test_dataset_ids_splits_deterministic() -> None:
    ds = make_phantom_dataset(2, n_images=10, seed=3, size=(64, 64))
    ds2 = make_phantom_dataset(2, n_images=10, seed=3, size=(64, 64))
    assert [s.image_id for s in ds] == [f"syn2d_{i:03d}" for i in range(10)]
    assert [s.meta["split"] for s in ds] == [s.meta["split"] for s in ds2]
    assert sorted(s.meta["split"] for s in ds).count("train") == 6
    assert {s.meta["split"] for s in ds} == {"train", "val", "test"}
    np.testing.assert_array_equal(ds[4].image, ds2[4].image)
    assert not np.array_equal(ds[0].image, ds[1].image)
    assert all(s.meta["left_right_pairs"] == [] for s in ds)
    ds3 = make_phantom_dataset(3, n_images=4, seed=0, size=(32, 32, 32))
    assert ds3[0].image_id == "syn3d_000" and ds3[0].image.shape == (32, 32, 32)


def test_assign_splits() -> None:
    assert assign_splits(60, 0).count("val") == 12 and assign_splits(60, 0).count("test") == 12
    assert assign_splits(3, 1).count("test") == 1
    assert assign_splits(10, 0, (1.0, 0.0, 0.0)) == ["train"] * 10
    with pytest.raises(ValueError):
        assign_splits(10, 0, (0.5, -0.1, 0.6))
