"""Landmarks follow the pixels: blob-peak tests for every random transform, 2D and 3D (including the
one-pass flip + affine + elastic composite), the one-pass image against an independent two-pass
reference, ``keep_outside``, reseeding, and preprocessing round trips (world mm unchanged, image equal
to SimpleITK resampling onto the new grid)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.transforms import Affine, Compose, Resample
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

from lmlib.data.geometry import Geometry
from lmlib.data.grids import preprocess
from lmlib.data.sample import Sample
from lmlib.data.transforms import (
    RandAffineLandmarksd,
    RandElasticLandmarksd,
    RandFlipLandmarksd,
    RandSpatialLandmarksd,
    SpatialParams,
    build_augmentation,
    dense_mean_square,
    intensity_transforms,
    left_right_index_pairs,
    make_item,
    mark_outside,
)

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


def one_pass(ndim: int, flip_prob: float = 1.0) -> RandSpatialLandmarksd:
    """Flip + affine + elastic, all drawn with probability 1 (strong enough to move points by pixels)."""
    return RandSpatialLandmarksd(ndim, [(0, 1), (2, 3)], flip_prob=flip_prob, flip_axis=ndim - 1,
                                 rotation_deg=20, scale=0.1, translation_frac=0.05, shear=0.05, elastic_prob=1.0,
                                 elastic_sigma_frac=0.2, elastic_magnitude_frac=0.06)


def make_transform(kind: str, ndim: int):
    pairs = [(0, 1), (2, 3)]
    if kind == "affine":
        return RandAffineLandmarksd(ndim, rotation_deg=25, scale=0.15, translation_frac=0.05, shear=0.1)
    if kind == "elastic":
        return RandElasticLandmarksd(sigma_frac=0.2, magnitude_frac=0.08)
    if kind == "flip":
        return RandFlipLandmarksd(prob=1.0, axis=ndim - 1, left_right_pairs=pairs)
    if kind == "one_pass":  # every part on, one resampling
        return one_pass(ndim)
    return build_augmentation(ndim, pairs, flip_prob=0.5, rotation_deg=20, scale=0.1, translation_frac=0.05,
                              shear=0.05, elastic=True, elastic_prob=1.0, elastic_sigma_frac=0.2,
                              elastic_magnitude_frac=0.06, intensity=False)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("kind", ["affine", "elastic", "flip", "combined", "one_pass"])
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


@pytest.mark.parametrize("ndim", [2, 3])
def test_blur_leaves_landmarks_and_widens_the_blobs(ndim: int) -> None:
    """The blur augmentation (``blur_sigma``): the image blurred (its peak lowered, its mass kept), landmarks and
    their validity untouched, the same result for the same seed; without it the stage is absent."""
    pts = landmarks(ndim)
    data = make_item(blob_image(SIZES[ndim], pts), pts, np.ones(N, bool))
    kwargs = {"affine_prob": 0.0, "intensity": False, "intensity_prob": 1.0}
    outs = [build_augmentation(ndim, blur_sigma=2.0, seed=3, **kwargs)(data) for _ in range(2)]
    image, before = outs[0]["image"].numpy(), data["image"].numpy()
    np.testing.assert_array_equal(image, outs[1]["image"].numpy())
    assert image.max() < 0.9 * before.max() and abs(image.sum() - before.sum()) < 0.02 * before.sum()
    np.testing.assert_array_equal(outs[0]["landmarks"], pts)
    np.testing.assert_array_equal(outs[0]["valid"], data["valid"])
    check_peaks(outs[0], min_valid=N)
    assert len(build_augmentation(ndim, **kwargs).transforms) == 0


def test_flip_of_a_patch_item_swaps_its_own_rows_or_refuses() -> None:
    """Pairs are data set indices: a patch serving landmarks (2, 3) swapped rows 2 and 3 of a 2-row item (an
    IndexError), and a group (1, 2) with the pair (0, 1) swapped two landmarks that are no pair."""
    pts = landmarks(2)[:2]
    flip = RandSpatialLandmarksd(2, [(0, 1), (2, 3)], flip_prob=1.0, affine_prob=0.0)
    out = flip(make_item(blob_image(SIZES[2], pts), pts, np.ones(2, bool), landmark_ids=(2, 3)))
    mirrored = pts.copy()
    mirrored[:, 0] = SIZES[2][0] - 1 - pts[:, 0]
    np.testing.assert_allclose(out["landmarks"], mirrored[[1, 0]])  # its rows 0, 1 are the pair (2, 3)
    out = flip(make_item(blob_image(SIZES[2], pts), pts, np.ones(2, bool), landmark_ids=(4, 5)))
    np.testing.assert_allclose(out["landmarks"], mirrored)  # no pair served: mirrored, nothing to swap
    with pytest.raises(ValueError, match="landmark 1 without its left/right partner 0"):
        flip(make_item(blob_image(SIZES[2], pts), pts, np.ones(2, bool), landmark_ids=(1, 2)))
    with pytest.raises(ValueError, match="one patch per landmark"):
        flip(make_item(np.zeros((2, *SIZES[2])), pts, np.ones(2, bool), landmark_ids=(2, 3), per_channel=True))
    with pytest.raises(ValueError, match="flip_prob: 0"):
        RandFlipLandmarksd(prob=1.0, left_right_pairs=[(0, 1)])(
            make_item(blob_image(SIZES[2], pts[:1]), pts[:1], np.ones(1, bool), landmark_ids=(0,)))


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


@pytest.mark.parametrize("ndim", [2, 3])
def test_reseeding_reproduces(ndim: int) -> None:
    pts = landmarks(ndim)
    data = make_item(blob_image(SIZES[ndim], pts), pts, np.ones(N, bool))
    aug = build_augmentation(ndim, [(0, 1)], flip_prob=0.5, shear=0.05, elastic=True, elastic_prob=0.7, seed=None)

    def run(seed: int) -> list[dict]:
        aug.set_random_state(seed)
        return [aug(data) for _ in range(3)]

    first, again, other = run(11), run(11), run(12)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"].numpy(), b["image"].numpy())
        np.testing.assert_array_equal(a["landmarks"], b["landmarks"])
        np.testing.assert_array_equal(a["valid"], b["valid"])
    assert not np.array_equal(first[0]["image"].numpy(), first[1]["image"].numpy())  # draws differ per item
    assert not any(np.array_equal(a["image"].numpy(), b["image"].numpy()) for a, b in zip(first, other))


# ------------------------------------------------------------------------- one resampling pass
FLIP_ROWS = [1, 0, 3, 2, 4]  # output row i holds input row FLIP_ROWS[i] after a flip with pairs (0, 1), (2, 3)


def dense_field(params: SpatialParams) -> torch.Tensor:
    """The control-point field upsampled to every pixel (D, *size) px, float64, by torch (independent path)."""
    mode = "bilinear" if len(params.size) == 2 else "trilinear"
    return torch.nn.functional.interpolate(torch.as_tensor(params.field)[None], size=params.size, mode=mode,
                                           align_corners=True)[0]


def two_pass_reference(params: SpatialParams, image: torch.Tensor, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip (exact), MONAI ``Affine`` (1st resampling), dense elastic field + MONAI ``Resample`` (2nd);
    landmarks by the per-stage inverses (mirror, ``A^-1``, fixed point on the dense field)."""
    size = params.size
    c = (np.array(size) - 1) / 2
    img, lm = image, np.array(pts, dtype=np.float64)
    if params.flip:
        img = torch.flip(img, dims=(1 + params.flip_axis,))
        lm[:, params.flip_axis] = size[params.flip_axis] - 1 - lm[:, params.flip_axis]
    img = Affine(affine=torch.as_tensor(params.affine), padding_mode="zeros", image_only=True)(img)
    inv = np.linalg.inv(params.affine)
    lm = (lm - c) @ inv[:-1, :-1].T + inv[:-1, -1] + c
    dense = dense_field(params)
    ident = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) - (n - 1) / 2 for n in size],
                                       indexing="ij"))
    img = Resample(padding_mode="zeros", norm_coords=True)(img, ident + dense)
    o = lm.copy()
    for _ in range(100):
        o = lm - np.stack([map_coordinates(f, o.T, order=1, mode="nearest") for f in dense.numpy()], axis=1)
    return np.asarray(img[0]), o


@pytest.mark.parametrize("ndim", [2, 3])
def test_one_pass_equals_two_pass(ndim: int) -> None:
    """Same draw: the one-pass image equals the two-pass one up to interpolation, blurs less, and the
    landmarks agree with the per-stage inverses."""
    size, pts = SIZES[ndim], landmarks(ndim)
    t = one_pass(ndim)
    for seed in range(3):
        t.set_random_state(seed)
        t.randomize(size)
        p = t.params
        assert p.flip and p.affine is not None and p.field is not None
        rms = float(np.sqrt(np.mean(np.sum(dense_field(p).numpy() ** 2, axis=0))))
        p.field = p.field * (0.06 * min(size) / rms)  # the strongest elastic draw
        smooth = make_item(blob_image(size, pts, sigma=3.0), pts, np.ones(N, bool))
        out = t.apply(smooth, p)
        ref_img, ref_lm = two_pass_reference(p, smooth["image"], pts)
        diff = np.abs(out["image"][0].numpy() - ref_img)
        assert diff.max() < 0.08 and diff.mean() < 0.0015, (diff.max(), diff.mean())
        v = out["valid"]
        assert v.sum() >= 3
        np.testing.assert_allclose(out["landmarks"][v], ref_lm[FLIP_ROWS][v], atol=0.02)
        # white noise: one bilinear interpolation keeps more variance than two, away from the padding
        noise = make_item(np.random.default_rng(seed).random(size).astype(np.float32), pts, np.ones(N, bool))
        one, two = t.apply(noise, p)["image"][0].numpy(), two_pass_reference(p, noise["image"], pts)[0]
        pos = t.sampling_grid(p).numpy() + ((np.array(size) - 1) / 2).reshape(-1, *([1] * ndim))
        inner = np.all((pos > 3) & (pos < np.array(size).reshape(-1, *([1] * ndim)) - 4), axis=0)
        assert inner.mean() > 0.3
        assert one[inner].std() > 1.05 * two[inner].std()


@pytest.mark.parametrize("ndim", [2, 3])
def test_one_pass_sampling_grid_points_at_landmark(ndim: int) -> None:
    """Exact inverse: the sampling grid ``T`` interpolated at a moved landmark ``o`` gives back its input ``p``
    (a landmark moved forward, ``o = T(p)``, fails this by pixels)."""
    size, pts = SIZES[ndim], landmarks(ndim)
    c = (np.array(size) - 1) / 2
    t = one_pass(ndim, flip_prob=0.5)
    for seed in range(4):
        t.set_random_state(seed)
        out = t(make_item(np.zeros(size, np.float32), pts, np.ones(N, bool)))
        grid = t.sampling_grid(t.params).numpy().astype(np.float64)
        rows = FLIP_ROWS if t.params.flip else list(range(N))
        v = out["valid"]
        assert v.sum() >= 3
        o = out["landmarks"][v]
        back = np.stack([map_coordinates(g, o.T, order=1) for g in grid], axis=1) + c
        np.testing.assert_allclose(back, pts[rows][v], atol=0.01)
        assert np.abs(o - pts[rows][v]).max() > 1.0


def test_one_pass_flip_only_is_exact() -> None:
    pts = landmarks(2)
    data = make_item(blob_image(SIZES[2], pts), pts, np.array([True, False, True, True, True]))
    out = RandSpatialLandmarksd(2, [(0, 1), (2, 3)], flip_prob=1.0, flip_axis=1, affine_prob=0.0)(data)
    ref = RandFlipLandmarksd(1.0, 1, [(0, 1), (2, 3)])(data)
    np.testing.assert_array_equal(out["image"].numpy(), ref["image"].numpy())
    np.testing.assert_array_equal(out["landmarks"], ref["landmarks"])
    np.testing.assert_array_equal(out["valid"], ref["valid"])


def test_elastic_magnitude_is_dense_rms() -> None:
    """The random RMS is that of the dense (per-pixel) field, computed without building it."""
    t = RandElasticLandmarksd(sigma_frac=0.2, magnitude_frac=0.08).set_random_state(0)
    for size in (SIZES[2], SIZES[3]):
        rms = []
        for _ in range(5):
            field = t.random_field(size)
            dense = dense_field(SpatialParams(size, field=field)).numpy()
            ms = float(np.mean(np.sum(dense ** 2, axis=0)))
            assert dense_mean_square(field, size) == pytest.approx(ms, rel=1e-9)
            rms.append(np.sqrt(ms))
        assert max(rms) <= 0.08 * min(size) and np.ptp(rms) > 0


def test_keep_outside() -> None:
    pts = np.array([[2.0, 30.0], [32.0, 36.0], [61.0, 70.0]])
    t = RandAffineLandmarksd(2, rotation_deg=0, scale=0, translation_frac=0.4)
    n_outside = 0
    for seed in range(10):
        drop = t.set_random_state(seed)(make_item(np.zeros(SIZES[2]), pts, np.ones(3, bool)))
        keep = t.set_random_state(seed)(make_item(np.zeros(SIZES[2]), pts, np.ones(3, bool), keep_outside=True))
        assert keep["keep_outside"] and not drop["keep_outside"]
        assert keep["valid"].all() and not np.isnan(keep["landmarks"]).any()
        shift = keep["landmarks"] - pts  # a pure translation moves every point alike, inside or not
        np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-9)
        np.testing.assert_allclose(keep["landmarks"][drop["valid"]], drop["landmarks"][drop["valid"]])
        n_outside += int((~drop["valid"]).sum())
    assert n_outside > 0
    marked = mark_outside(make_item(np.zeros((10, 10)), [[-3.0, 5.0], [np.nan, 1.0], [4.0, 12.0]],
                                    [True, True, False], keep_outside=True))
    np.testing.assert_array_equal(marked["valid"], [True, False, False])
    np.testing.assert_array_equal(marked["landmarks"][0], [-3.0, 5.0])


def test_failed_elastic_inversion_is_invalid_even_when_keeping_outside() -> None:
    """A folding field (slope of d up to 2.4 at large y): points there fail and become invalid (NaN),
    also with ``keep_outside``; the others solve ``o + d(o) = p``."""
    size, coarse = SIZES[2], (17, 19)
    pattern = np.array([0.0, 1.0, 0.0, -1.0])[np.arange(coarse[0]) % 4]  # 4 nodes per period, ~3.9 px apart
    field = np.zeros((2, *coarse))
    field[0] = 9.5 * pattern[:, None] * np.linspace(0, 1, coarse[1])[None, :]
    params = SpatialParams(size, field=field)
    xs, ys = np.meshgrid(np.linspace(5, 58, 12), np.linspace(3, 68, 12), indexing="ij")
    pts = np.stack([xs.ravel(), ys.ravel()], axis=1)
    out = RandElasticLandmarksd().apply(make_item(np.zeros(size), pts, np.ones(len(pts), bool), keep_outside=True),
                                        params)
    v = out["valid"]
    assert 10 < v.sum() < len(pts) - 10
    assert np.isnan(out["landmarks"][~v]).all()
    o = out["landmarks"][v]
    np.testing.assert_allclose(o + params.displacement(o), pts[v], atol=1e-3)


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
    kw = {"size": dict(target_size=tuple(int(n * 1.7) for n in size), keep_aspect=False),
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
    out = preprocess(s, target_size=target, keep_aspect=False)
    assert abs(out.image.mean()) < 1e-4 and abs(out.image.std() - 1) < 1e-3
    np.testing.assert_allclose(out.geometry.spacing, 0.1 * np.array(size) / np.array(target))
    for p in out.landmarks_index:
        assert np.linalg.norm(blob_peak(out.image - out.image.min(), p) - p) < 0.5
    pct = preprocess(s, target_size=target, normalize="percentile", keep_aspect=False).image
    assert pct.min() == 0.0 and pct.max() == 1.0


@pytest.mark.parametrize("kwargs, name", [({"rotation_deg": -1000}, "rotation_deg=-1000"), ({"scale": 1.2}, "scale=1.2"),
                                          ({"flip_prob": 2}, "flip_prob=2"), ({"translation_frac": -0.1},
                                                                              "translation_frac=-0.1")])
def test_augmentation_ranges_out_of_bounds_are_refused_by_name(kwargs: dict, name: str) -> None:
    """A negative or huge range was drawn from silently (issue 25)."""
    with pytest.raises(ValueError, match=f"augmentation ranges out of bounds: {name} "):
        build_augmentation(2, **kwargs)
