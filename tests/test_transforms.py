"""Landmarks follow the pixels: blob-peak tests for every random transform, 2D and 3D, and
preprocessing round trips (world mm unchanged, image equal to SimpleITK resampling onto the new grid)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from lmlib.data.geometry import Geometry
from lmlib.data.sample import Sample
from lmlib.data.transforms import (RandAffineLandmarksd, RandElasticLandmarksd, RandFlipLandmarksd, build_augmentation,
                              intensity_transforms, left_right_index_pairs, make_item, mark_outside)
from lmlib.data.grids import preprocess
from monai.transforms import Compose

SIZES = {2: (64, 72), 3: (40, 42, 38)}
N = 5


def blob_image(size: tuple[int, ...], points: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """Dark image with a unit Gaussian blob (sigma px) at each point (indices, x, y[, z])."""
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in size], indexing="ij")
    img = np.zeros(size)
    for p in points:
        img += np.exp(-sum((g - c) ** 2 for g, c in zip(grids, p)) / (2 * sigma ** 2))
    return img.astype(np.float32)


def blob_peak(img: np.ndarray, near: np.ndarray, r: int = 3) -> np.ndarray:
    """Sub-pixel peak: local max within r px of ``near``, then intensity-weighted centroid around it."""
    def window(centre: np.ndarray) -> tuple[slice, ...]:
        return tuple(slice(max(int(c) - r, 0), int(c) + r + 1) for c in centre)
    sl = window(np.round(near))
    m = np.array(np.unravel_index(np.argmax(img[sl]), img[sl].shape)) + [s.start for s in sl]
    sl = window(m)
    w = img[sl] - 0.1 * img[sl].max()
    w = np.clip(w, 0, None)
    grids = np.meshgrid(*[np.arange(s.start, s.start + n) for s, n in zip(sl, w.shape)], indexing="ij")
    return np.array([(g * w).sum() / w.sum() for g in grids])


def landmarks(ndim: int, seed: int = 0) -> np.ndarray:
    """N well-separated points away from the border."""
    rng = np.random.default_rng(seed)
    size = np.array(SIZES[ndim])
    while True:
        pts = rng.uniform(0.3 * size, 0.7 * size, (N, ndim)) if ndim == 3 else rng.uniform(12, size - 12, (N, ndim))
        d = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + np.eye(N) * 99
        if d.min() > 9:
            return pts


def check_peaks(out: dict, min_valid: int = 3, border: int = 4) -> None:
    img = out["image"][0].numpy()
    size = np.array(img.shape)
    checked = 0
    for p, v in zip(out["landmarks"], out["valid"]):
        assert v == (not np.isnan(p).any())
        if v and np.all(p > border) and np.all(p < size - 1 - border):
            err = np.linalg.norm(blob_peak(img, p) - p)
            assert err < 0.5, f"blob peak {err:.3f} px from landmark {p}"
            checked += 1
    assert checked >= min_valid


def make_transform(kind: str, ndim: int):
    pairs = [(0, 1), (2, 3)]
    if kind == "affine":
        return RandAffineLandmarksd(ndim, rotation_deg=25, scale=0.15, translation_frac=0.05, shear=0.1)
    if kind == "elastic":
        return RandElasticLandmarksd(sigma_frac=0.2, magnitude_frac=0.08)
    if kind == "flip":
        return RandFlipLandmarksd(prob=1.0, axis=ndim - 1, left_right_pairs=pairs)
    return build_augmentation(ndim, pairs, flip_prob=0.5, rotation_deg=20, scale=0.1, translation_frac=0.05,
                              shear=0.05, elastic=True, elastic_prob=1.0, elastic_sigma_frac=0.2,
                              elastic_magnitude_frac=0.06, intensity=False)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("kind", ["affine", "elastic", "flip", "combined"])
def test_blob_peak_follows_landmark(ndim: int, kind: str) -> None:
    pts = landmarks(ndim)
    img = blob_image(SIZES[ndim], pts)
    t = make_transform(kind, ndim)
    moved = 0.0
    for seed in range(5):
        t.set_random_state(seed)
        out = t(make_item(img, pts, np.ones(N, bool)))
        assert out["image"].shape == (1, *SIZES[ndim])
        check_peaks(out)
        moved = max(moved, np.nanmax(np.linalg.norm(out["landmarks"] - pts, axis=1)))
    assert moved > 1.0  # the transform did something


@pytest.mark.parametrize("ndim", [2, 3])
def test_intensity_leaves_landmarks(ndim: int) -> None:
    pts = landmarks(ndim)
    t = Compose(intensity_transforms(prob=1.0, noise_std=0.02)).set_random_state(1)
    data = make_item(blob_image(SIZES[ndim], pts), pts, np.ones(N, bool))
    out = t(data)
    assert not np.allclose(out["image"].numpy(), data["image"].numpy())
    np.testing.assert_array_equal(out["landmarks"], pts)
    np.testing.assert_array_equal(out["valid"], data["valid"])
    check_peaks(out, min_valid=N)


def test_flip_swaps_pairs() -> None:
    pts, valid = landmarks(2), np.array([True, False, True, True, True])
    out = RandFlipLandmarksd(prob=1.0, axis=0, left_right_pairs=[(0, 1), (2, 3)])(
        make_item(blob_image(SIZES[2], pts), pts, valid))
    mirrored = pts.copy()
    mirrored[:, 0] = SIZES[2][0] - 1 - pts[:, 0]
    np.testing.assert_array_equal(out["valid"], [False, True, True, True, True])
    np.testing.assert_allclose(out["landmarks"][1], mirrored[0])
    np.testing.assert_allclose(out["landmarks"][[2, 3, 4]], mirrored[[3, 2, 4]])
    assert left_right_index_pairs(["a", "L", "R"], [("L", "R")]) == [(1, 2)]


def test_leaving_landmarks_become_invalid() -> None:
    pts = np.array([[2.0, 30.0], [32.0, 36.0], [61.0, 70.0]])
    t = RandAffineLandmarksd(2, rotation_deg=0, scale=0, translation_frac=0.4)
    n_invalid = 0
    for seed in range(10):
        out = t.set_random_state(seed)(make_item(np.zeros(SIZES[2]), pts, np.ones(3, bool)))
        n_invalid += int((~out["valid"]).sum())
        assert np.isnan(out["landmarks"][~out["valid"]]).all()
        assert np.all(np.abs(out["landmarks"][out["valid"]] - (np.array(SIZES[2]) - 1) / 2)
                      <= np.array(SIZES[2]) / 2)
    assert n_invalid > 0
    edge = mark_outside(make_item(np.zeros((10, 10)), [[-0.5, 9.5], [-0.51, 3.0]], [True, True]))
    np.testing.assert_array_equal(edge["valid"], [True, False])


def test_build_augmentation_is_seeded() -> None:
    pts = landmarks(2)
    img = blob_image(SIZES[2], pts)
    outs = [build_augmentation(2, elastic=True, flip_prob=0.5, seed=7)(make_item(img, pts, np.ones(N, bool)))
            for _ in range(2)]
    np.testing.assert_array_equal(outs[0]["image"].numpy(), outs[1]["image"].numpy())
    np.testing.assert_array_equal(outs[0]["landmarks"], outs[1]["landmarks"])


def oblique_sample(ndim: int, size: tuple[int, ...], spacing: tuple[float, ...], seed: int = 0) -> Sample:
    rot = Rotation.from_euler("xyz", [10, 20, 30], degrees=True).as_matrix()
    direction = rot if ndim == 3 else Rotation.from_euler("z", 25, degrees=True).as_matrix()[:2, :2]
    geom = Geometry(np.array(spacing), np.arange(ndim) * 3.0 - 7.5, direction)
    rng = np.random.default_rng(seed)
    idx = rng.uniform(3, np.array(size) - 4, (4, ndim))
    return Sample.from_index("s", rng.random(size).astype(np.float32), geom, idx, ["a", "b", "c", "d"],
                             valid=[True, True, False, True])


@pytest.mark.parametrize("ndim,size,spacing", [(2, (50, 37), (0.8, 1.3)), (3, (30, 26, 20), (0.7, 1.1, 2.0))])
@pytest.mark.parametrize("config", ["size", "spacing", "spacing+crop", "spacing+pad"])
def test_preprocess_round_trip(ndim: int, size: tuple, spacing: tuple, config: str) -> None:
    s = oblique_sample(ndim, size, spacing)
    kw = {"size": dict(target_size=tuple(int(n * 1.7) for n in size)),
          "spacing": dict(target_spacing=(0.5,) * ndim),
          "spacing+crop": dict(target_spacing=(0.5,) * ndim, target_size=(40,) * ndim),
          "spacing+pad": dict(target_spacing=(0.6,) * ndim, target_size=(96, 96) if ndim == 2 else (72,) * 3)}[config]
    out = preprocess(s, normalize=None, **kw)
    if "target_size" in kw:
        assert out.size == kw["target_size"]
    # world coordinates unchanged; indices changed; the new geometry maps them back to the same mm
    np.testing.assert_array_equal(out.valid, s.valid)
    world_back = out.geometry.index_to_world(out.landmarks_index)
    np.testing.assert_allclose(world_back[s.valid], s.landmarks_mm[s.valid], atol=1e-6)
    assert np.abs(out.landmarks_index[s.valid] - s.landmarks_index[s.valid]).max() > 1.0
    # the resampled pixels are those SimpleITK samples at the claimed geometry (upsampling: no anti-aliasing)
    g = out.geometry
    ref = sitk.Resample(s.to_sitk(), list(out.size), sitk.Transform(), sitk.sitkLinear, g.origin.tolist(),
                        g.spacing.tolist(), g.direction.ravel().tolist(), 0.0)
    ref_arr = sitk.GetArrayFromImage(ref).T
    inner = tuple(slice(3, n - 3) for n in out.size)
    inside = ref_arr[inner] != 0  # exclude padding and samples beyond the source edge
    assert inside.sum() > 100
    np.testing.assert_allclose(out.image[inner][inside], ref_arr[inner][inside], atol=1e-4)


def test_preprocess_downsample_blob_and_normalise() -> None:
    """A cephalogram-like downsampling (~3.3x, anisotropic): blobs stay on their landmarks."""
    size, target = (210, 262), (64, 80)
    pts = np.array([[50.0, 60.0], [150.3, 200.7], [100.6, 131.2]])
    s = Sample.from_index("c", blob_image(size, pts, sigma=5.0) * 1000 + 50, Geometry(np.array([0.1, 0.1])),
                          pts, ["a", "b", "c"])
    out = preprocess(s, target_size=target)
    assert abs(out.image.mean()) < 1e-4 and abs(out.image.std() - 1) < 1e-3
    np.testing.assert_allclose(out.geometry.spacing, 0.1 * np.array(size) / np.array(target))
    for p in out.landmarks_index:
        assert np.linalg.norm(blob_peak(out.image - out.image.min(), p) - p) < 0.5
    pct = preprocess(s, target_size=target, normalize="percentile").image
    assert pct.min() == 0.0 and pct.max() == 1.0
