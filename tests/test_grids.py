"""Grid (index <-> world against SimpleITK, every constructor's geometry) and resample (a blob at a known
world point lands at ``grid.world_to_index(point)`` on downsampled, oblique and off-pixel patch grids)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from lmlib.data import grids
from lmlib.data.geometry import Geometry
from lmlib.data.grids import (
    Grid,
    SourceImage,
    antialias_sigma_mm,
    crop_array,
    discrete_gaussian_kernel,
    normalize_intensity,
    on_sub_grid,
    preprocess,
    preprocessing_grids,
    resample,
    shrink_factors,
)
from lmlib.data.sample import Sample


def rotation(ndim: int, deg: float = 25.0) -> np.ndarray:
    if ndim == 2:
        return Rotation.from_euler("z", deg, degrees=True).as_matrix()[:2, :2]
    return Rotation.from_euler("xyz", [deg, -0.6 * deg, 0.4 * deg], degrees=True).as_matrix()


def oblique_grid(ndim: int) -> Grid:
    size = (37, 52) if ndim == 2 else (21, 18, 15)
    spacing = (0.7, 1.3) if ndim == 2 else (0.8, 1.1, 2.5)
    return Grid(size, Geometry(np.array(spacing), np.array([4.0, -7.5, 12.25][:ndim]), rotation(ndim)))


def sitk_image(grid: Grid) -> sitk.Image:
    return grid.geometry.apply_to(sitk.Image(list(grid.size), sitk.sitkFloat32))


# ------------------------------------------------------------------------------------ index <-> world
@pytest.mark.parametrize("ndim", [2, 3])
def test_index_world_against_sitk(ndim: int) -> None:
    grid = oblique_grid(ndim)
    img = sitk_image(grid)
    idx = np.random.default_rng(0).uniform(-3, 40, (20, ndim))
    expected = np.array([img.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in idx])
    np.testing.assert_allclose(grid.index_to_world(idx), expected, rtol=0, atol=1e-9)
    back = np.array([img.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in expected])
    np.testing.assert_allclose(grid.world_to_index(expected), back, rtol=0, atol=1e-9)
    np.testing.assert_allclose(grid.world_to_index(grid.index_to_world(idx)), idx, rtol=0, atol=1e-9)
    a = grid.affine()
    assert a.shape == (ndim, ndim + 1) and a.dtype == np.float64
    np.testing.assert_allclose(idx @ a[:, :ndim].T + a[:, ndim], expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("ndim", [2, 3])
def test_to_dict_round_trip(ndim: int) -> None:
    grid = oblique_grid(ndim)
    back = Grid.from_dict(json.loads(json.dumps(grid.to_dict())))
    assert back == grid and back.size == grid.size
    assert grid != grid.crop((1,) * ndim, grid.size)


# --------------------------------------------------------------------------------------- constructors
def corners(grid: Grid) -> np.ndarray:
    """World mm of the outer pixel-edge corners (index -0.5 and size - 0.5 on every axis)."""
    lo, hi = np.full(grid.ndim, -0.5), np.asarray(grid.size) - 0.5
    pts = np.array(np.meshgrid(*[[a, b] for a, b in zip(lo, hi)], indexing="ij")).reshape(grid.ndim, -1).T
    return grid.index_to_world(pts)


@pytest.mark.parametrize("ndim", [2, 3])
def test_of_image_and_whole(ndim: int) -> None:
    g = oblique_grid(ndim)
    s = Sample("s", np.zeros(g.size, np.float32), g.geometry, np.zeros((1, ndim)), [True], ["a"])
    assert Grid.of_image(s) == g and Grid.of_image(sitk_image(g)) == g
    new_size = (16, 30) if ndim == 2 else (9, 12, 7)
    w = Grid.whole(s, size=new_size)
    assert w.size == new_size
    np.testing.assert_allclose(w.spacing, g.spacing * np.asarray(g.size) / np.asarray(new_size), rtol=1e-12)
    np.testing.assert_allclose(corners(w), corners(g), atol=1e-9)  # FOV edges kept
    np.testing.assert_allclose(w.direction, g.direction)
    target = 1.9
    w2 = Grid.whole(g, spacing=target)
    assert w2.size == tuple(int(n) for n in np.maximum(1, np.round(np.asarray(g.size) * g.spacing / target)))
    np.testing.assert_allclose(corners(w2), corners(g), atol=1e-9)
    assert np.abs(w2.spacing - target).max() < 0.5 * target
    assert Grid.whole(g) == g and Grid.whole(g, size=g.size) == g
    with pytest.raises(ValueError):
        Grid.whole(g, size=new_size, spacing=1.0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_pad_crop_and_centred(ndim: int) -> None:
    g = oblique_grid(ndim)
    p = g.padded_to_multiple(8)
    assert all(n % 8 == 0 and 0 <= n - m < 8 for n, m in zip(p.size, g.size))
    np.testing.assert_array_equal(p.origin, g.origin)
    assert g.padded_to_multiple(1) == g
    # centre crop/pad: new index 0 = old index (old - new) // 2 (negative where padding)
    size = (20, 60) if ndim == 2 else (10, 24, 15)
    c = g.centre_crop_or_pad(size)
    start = (np.asarray(g.size) - np.asarray(size)) // 2
    assert c.size == size
    np.testing.assert_allclose(c.index_to_world(np.zeros((1, ndim))), g.index_to_world(start[None]), atol=1e-9)
    np.testing.assert_allclose(c.world_to_index(g.index_to_world(start[None] + 2.25)), [[2.25] * ndim], atol=1e-9)
    # integer crop
    k = g.crop((3, -2, 1)[:ndim], (5, 6, 7)[:ndim])
    np.testing.assert_allclose(k.index_to_world([[1.0] * ndim]), g.index_to_world([[4.0, -1.0, 2.0][:ndim]]),
                               atol=1e-9)
    # centred: the centre index (size - 1) / 2 lies exactly on the point, for odd and even sizes
    centre = np.array([3.3, -1.7, 8.05][:ndim])
    for size in [(7, 8, 9)[:ndim], (16, 16, 16)[:ndim]]:
        q = Grid.centred(centre, size, (0.6, 1.4, 2.0)[:ndim], rotation(ndim, 40))
        np.testing.assert_allclose(q.index_to_world(((np.asarray(size) - 1) / 2)[None])[0], centre, atol=1e-9)
        np.testing.assert_allclose(q.direction, rotation(ndim, 40))
        np.testing.assert_allclose(q.spacing, (0.6, 1.4, 2.0)[:ndim])


def test_random_crop_uniform_and_oversized() -> None:
    g = Grid((20, 9), Geometry(np.array([0.5, 2.0]), np.array([1.0, 2.0])))
    rng = np.random.default_rng(0)
    starts = np.array([g.world_to_index(g.random_crop((6, 13), rng).origin[None])[0] for _ in range(400)])
    np.testing.assert_allclose(starts, np.round(starts), atol=1e-9)  # integer sub-grids
    assert starts[:, 0].min() == 0 and starts[:, 0].max() == 14  # every start 0..20-6 reachable
    assert len(np.unique(starts[:, 0])) == 15
    np.testing.assert_array_equal(starts[:, 1], (9 - 13) // 2)  # larger than the grid: centred
    a = g.random_crop((6, 4), np.random.default_rng(5))
    assert a == g.random_crop((6, 4), np.random.default_rng(5))


# ------------------------------------------------------------------------------------------ resample
def blob_sample(ndim: int, point: np.ndarray, sigma_mm: float) -> Sample:
    """An oblique, anisotropic source with a Gaussian blob (sigma_mm, isotropic in world) at ``point`` mm."""
    size = (120, 110) if ndim == 2 else (44, 40, 36)
    spacing = np.array([0.5, 0.6] if ndim == 2 else [0.9, 1.0, 1.2])
    centre_idx = (np.asarray(size) - 1) / 2
    direction = rotation(ndim, 15)
    origin = point - direction @ (spacing * (centre_idx + np.array([3.3, -2.6, 1.7][:ndim])))
    geom = Geometry(spacing, origin, direction)
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in size], indexing="ij"), -1).reshape(-1, ndim)
    d2 = np.sum((geom.index_to_world(idx) - point) ** 2, axis=1)
    img = (np.exp(-d2 / (2 * sigma_mm ** 2)) * 100 + 10).reshape(size).astype(np.float32)
    return Sample("blob", img, geom, point[None], [True], ["p"])


def peak(img: np.ndarray) -> np.ndarray:
    """Sub-pixel peak: argmax + a parabola through log intensities on each axis (exact for a Gaussian)."""
    m = np.array(np.unravel_index(np.argmax(img), img.shape))
    assert np.all(m > 0) and np.all(m < np.asarray(img.shape) - 1), "peak on the border"
    out = m.astype(np.float64)
    for ax in range(img.ndim):
        vals = []
        for d in (-1, 0, 1):
            q = m.copy()
            q[ax] += d
            vals.append(np.log(img[tuple(q)]))
        lo, mid, hi = vals
        out[ax] += 0.5 * (lo - hi) / (lo - 2 * mid + hi)
    return out


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("case", ["downsampled_whole", "oblique", "patch_off_pixel"])
def test_resample_blob_lands_on_world_point(ndim: int, case: str) -> None:
    point = np.array([12.3, -4.1, 7.7][:ndim])
    s = blob_sample(ndim, point, sigma_mm=3.0)
    if case == "downsampled_whole":
        grid = Grid.whole(s, size=tuple(int(n) // 4 + 1 for n in s.size))  # ~4x coarser, non-integer factor
    elif case == "oblique":
        grid = Grid.centred(point + np.array([2.2, -1.3, 0.9][:ndim]), (25,) * ndim, (0.9, 1.3, 1.1)[:ndim],
                            rotation(ndim, -50))
    else:
        # centre 0.15 / -0.2 / 0.1 px of the patch away from the point: expected index 7.35 / 7.7 / 7.4
        off = s.geometry.direction @ (s.geometry.spacing * np.array([0.15, -0.2, 0.1][:ndim]))
        grid = Grid.centred(point + off, (16,) * ndim, s.geometry.spacing, s.geometry.direction)
    out = resample(s, grid, default_value=10.0)
    assert out.shape == grid.size and out.dtype == np.float32
    expected = grid.world_to_index(point[None])[0]
    err = np.abs(peak(out - 9.0) - expected)
    assert err.max() < 0.3, (case, err)
    if case == "patch_off_pixel":  # not on a pixel centre of the patch: a half-pixel shift would fail above
        assert np.abs(expected - np.round(expected)).min() > 0.25


def test_resample_matches_sitk_and_antialiases() -> None:
    rng = np.random.default_rng(0)
    geom = Geometry(np.array([0.5, 0.5]), np.array([1.0, 2.0]))
    noise = rng.normal(size=(200, 160)).astype(np.float32)
    s = Sample("n", noise, geom, np.zeros((1, 2)), [True], ["a"])
    # upsampling: exactly SimpleITK's linear resampling (no smoothing)
    up = Grid.whole(s, size=(300, 200))
    g = up.geometry
    ref = sitk.Resample(s.to_sitk(), list(up.size), sitk.Transform(), sitk.sitkLinear, g.origin.tolist(),
                        g.spacing.tolist(), g.direction.ravel().tolist(), 0.0)
    np.testing.assert_allclose(resample(s, up), sitk.GetArrayFromImage(ref).T, atol=1e-6)
    np.testing.assert_allclose(antialias_sigma_mm(Grid.of_image(s), up), 0.0)
    # 4x downsampling: sigma = (4 - 1) / 2 = 1.5 source px on each axis; white noise loses most variance
    down = Grid.whole(s, size=(50, 40))
    np.testing.assert_allclose(antialias_sigma_mm(Grid.of_image(s), down), 1.5 * 0.5, atol=1e-12)
    smooth, aliased = resample(s, down), resample(s, down, antialias=False)
    assert smooth.std() < 0.45 * aliased.std()
    assert abs(smooth.std() / (1 / (2 * np.sqrt(np.pi) * 1.5)) - 1) < 0.15  # white noise through a 1.5 px Gaussian
    # anisotropic: only the coarser axis is smoothed
    np.testing.assert_allclose(antialias_sigma_mm(Grid.of_image(s), Grid.whole(s, size=(200, 40))), [0.0, 0.75])
    # a SourceImage shrinks and smooths once per spacing for large grids (cached) ...
    src = SourceImage(s)
    np.testing.assert_allclose(resample(src, down), smooth, atol=1e-6)
    np.testing.assert_allclose(resample(src, down), smooth, atol=1e-6)
    assert list(src._levels) == [(2, 2)] and len(src._levels[(2, 2)]._smoothed) == 1 and src._smoothed == {}
    # ... and small grids (patches) less than 4x coarser smooth their own region only, uncached, with the same
    # values (4x and coarser: test_patches_sample_a_shrunk_region)
    full = src.smoothed(np.array([0.5, 0.5]))  # the 1.5-mm patches' sigma: (3 - 1) / 2 px of 0.5 mm
    for c in rng.uniform(20, 60, (5, 2)):
        patch = Grid.centred(c, (8, 8), (1.5, 1.5))
        np.testing.assert_allclose(antialias_sigma_mm(src.grid, patch), [0.5, 0.5])
        np.testing.assert_allclose(resample(src, patch), resample(full, patch, antialias=False), atol=1e-5)
        np.testing.assert_allclose(resample(src, patch), resample(s, patch), atol=1e-5)
    assert len(src._smoothed) == 1  # the patches used the cached copy of the same sigma and added nothing
    fresh = SourceImage(s)
    for c in rng.uniform(20, 60, (5, 2)):
        patch = Grid.centred(c, (8, 8), (1.5, 1.5))
        np.testing.assert_allclose(resample(fresh, patch), resample(full, patch, antialias=False), atol=1e-5)
    assert fresh._smoothed == {}  # without one, each patch smooths its own region, uncached


def test_large_coarse_grids_sample_a_shrunk_copy_with_the_same_result() -> None:
    """A 1350 x 1950 px radiograph onto a 240 x 272 grid was smoothed at full resolution (2 s per image on a
    busy machine, issue 24): a grid at least 4x coarser samples a block-averaged copy, smoothed by the rest of
    the Gaussian, with the same values within 1 % of the image's spread (RMS) on a smooth image."""
    rng = np.random.default_rng(5)
    geom = Geometry(np.array([0.15, 0.15]), np.array([-3.0, 7.0]))
    x, y = np.meshgrid(np.arange(1350), np.arange(1950), indexing="ij")
    image = (np.sin(x / 37.0) * np.cos(y / 23.0) + 0.5 * ((x - 600) ** 2 + (y - 900) ** 2 < 300 ** 2)
             + 0.05 * rng.normal(size=x.shape)).astype(np.float32)
    s = Sample("big", image, geom, np.array([[100.0, 150.0]]), [True], ["a"])
    grid, final = preprocessing_grids(s, (240, 272))  # the network grid: aspect kept, 1.076 mm, then padded
    assert shrink_factors(Grid.of_image(s), grid) == (3, 3)
    assert shrink_factors(Grid.of_image(s), Grid.whole(s, size=(675, 975))) == (1, 1)  # 2x: full resolution
    src = SourceImage(s, cache=False)
    level, sigma = src.for_grid(grid)
    assert level.image.GetSize() == (450, 650) and np.all(sigma < antialias_sigma_mm(src.grid, grid))
    full_res = resample(src.smoothed(antialias_sigma_mm(src.grid, grid)), grid, antialias=False)
    shrunk = resample(s, grid)
    inner = (slice(2, -2), slice(2, -2))
    assert np.sqrt(np.mean((shrunk - full_res)[inner] ** 2)) < 0.01 * full_res.std()
    assert abs(shrunk.std() / full_res.std() - 1) < 0.02
    # the geometry is unchanged: landmarks map to the same indices
    assert Grid.of_image(preprocess(s, (240, 272))) == final


def test_patches_sample_a_shrunk_region() -> None:
    """Per-landmark patches on a large radiograph smoothed their region at full resolution, one filter per
    patch (most of the global-to-local FCNN's inference time on hand-xray, issue 28): a patch at least 4x
    coarser than the image block-averages only its region, on the same blocks as the whole shrunk copy (so
    the values equal that copy's), within 1 % of the image's spread (RMS) of smoothing at full resolution,
    and caches nothing."""
    rng = np.random.default_rng(7)
    geom = Geometry(np.array([0.1, 0.1]), np.array([2.0, -5.0]))
    x, y = np.meshgrid(np.arange(900), np.arange(1100), indexing="ij")
    image = (np.sin(x / 31.0) * np.cos(y / 19.0) + 0.5 * ((x - 400) ** 2 + (y - 500) ** 2 < 200 ** 2)
             + 0.05 * rng.normal(size=x.shape)).astype(np.float32)
    s = Sample("hand", image, geom, np.array([[10.0, 20.0]]), [True], ["a"])
    src = SourceImage(s)
    errors = []
    for spacing in (0.45, 0.7, 1.25):  # 4.5, 7 and 12.5 source px: shrunk by 2, 3 and 6
        for c in rng.uniform(15, 75, (4, 2)):
            patch = Grid.centred(c, (20, 20), spacing)
            k = shrink_factors(src.grid, patch)
            assert k == (int(spacing / 0.2),) * 2
            level, sigma = src.for_grid(patch)
            assert all(a < b for a, b in zip(level.image.GetSize(), src.image.GetSize()))  # the region alone
            full_res = resample(src.smoothed(antialias_sigma_mm(src.grid, patch)), patch, antialias=False)
            got = resample(src, patch)
            whole = SourceImage(s, cache=False)
            whole_level = SourceImage(sitk.BinShrink(whole.image, list(k)))
            np.testing.assert_allclose(got, resample(whole_level.smoothed(sigma), patch, antialias=False), atol=1e-5)
            errors.append(np.sqrt(np.mean((got - full_res) ** 2)))
    assert max(errors) < 0.01 * image.std(), errors
    assert src._levels == {} and len(src._smoothed) == 3  # only the full-resolution references above


def test_patches_at_many_spacings_keep_no_full_copies() -> None:
    """Per-landmark 3D patches, each at its own spacing: the region smoothing equals the full-volume one
    inside the patch and caches nothing (a full copy per spacing ran a 3D training out of memory)."""
    rng = np.random.default_rng(3)
    g = Grid((60, 70, 50), Geometry([1.0, 1.0, 1.2]))
    s = Sample("v", rng.random(g.size).astype(np.float32), g.geometry, np.zeros((1, 3)), [True], ["a"])
    src = SourceImage(s)
    for spacing in (1.3, 1.7, 2.2, 2.9):
        patch = Grid.centred(rng.uniform(20, 40, 3), (8, 8, 8), spacing)
        sigma = antialias_sigma_mm(src.grid, patch)
        full = SourceImage(s).smoothed(sigma)
        np.testing.assert_allclose(resample(src, patch), resample(full, patch, antialias=False), atol=1e-5)
    assert src._smoothed == {}


def test_discrete_gaussian_kernel_is_simpleitks() -> None:
    rng = np.random.default_rng(4)
    image = rng.random((40, 30)).astype(np.float32)
    for variance in (0.0, 0.04, 0.3, 1.0, 4.5, 30.0):  # px^2
        kernel = discrete_gaussian_kernel(variance)
        assert len(kernel) % 2 == 1 and abs(kernel.sum() - 1.0) < 1e-12
        f = sitk.DiscreteGaussianImageFilter()
        f.SetVariance([variance, 0.0])
        f.SetUseImageSpacing(False)
        f.SetMaximumError(1e-3)
        f.SetMaximumKernelWidth(4096)
        ref = sitk.GetArrayFromImage(f.Execute(sitk.GetImageFromArray(image.T.copy()))).T
        ours = np.stack([np.convolve(np.pad(row, len(kernel) // 2, mode="edge"), kernel, "valid") for row in image.T]).T
        np.testing.assert_allclose(ours, ref, atol=1e-6)


def _simpleitk_patch(src: SourceImage, grid: Grid, default_value: float) -> np.ndarray:
    """The SimpleITK route that :func:`resample` takes for grids that are not patches."""
    level, sigma = src.for_grid(grid)
    image, g = level.smoothed(sigma, grid), grid.geometry
    out = sitk.Resample(image, list(grid.size), sitk.Transform(), sitk.sitkLinear, g.origin.tolist(),
                        g.spacing.tolist(), g.direction.ravel().tolist(), default_value, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).T


@pytest.mark.parametrize("ndim", [2, 3])
def test_patches_in_numpy_equal_simpleitk(ndim: int) -> None:
    """Patches are sampled in NumPy/SciPy (per-call overhead, see grids._resample_patch) with SimpleITK's values:
    oblique and anisotropic source and patches, finer and coarser than the source (no smoothing, a Gaussian, block
    averages), patches across the image's border (the default value outside)."""
    rng = np.random.default_rng(11)
    size = (301, 259) if ndim == 2 else (121, 99, 61)  # not multiples of the blocks: a partial last block
    geom = Geometry(np.array([0.2, 0.25, 0.6][:ndim]), np.array([3.0, -4.0, 8.0][:ndim]), rotation(ndim, 12))
    x = np.meshgrid(*[np.arange(n) for n in size], indexing="ij")
    image = (np.sin(x[0] / 9.0) * np.cos(x[1] / 7.0) + 0.2 * rng.normal(size=size)).astype(np.float32)
    s = Sample("p", image, geom, np.zeros((1, ndim)), [True], ["a"])
    src = SourceImage(s)
    centre = geom.index_to_world((np.asarray(size) - 1)[None] / 2)[0]
    corner = geom.index_to_world(np.zeros((1, ndim)))[0]
    far = geom.index_to_world((np.asarray(size) - 1)[None])[0]  # the last pixel's corner
    patch = (12,) * ndim if ndim == 2 else (8,) * ndim
    outside = 0
    for spacing in (0.1, 0.3, 0.55, 1.3 if ndim == 2 else 0.9):  # finer than the source, a Gaussian, block averages
        for c in (centre + rng.normal(0, 3, ndim), corner + 0.5 * spacing, far - 0.5 * spacing):  # in; both borders
            grid = Grid.centred(c, patch, spacing, rotation(ndim, -20))
            got = grids._resample_patch(src, grid, -7.0)
            assert got is not None, (spacing, c)  # small grids take the NumPy route
            np.testing.assert_allclose(got, _simpleitk_patch(src, grid, -7.0), atol=1e-5)
            np.testing.assert_array_equal(resample(src, grid, default_value=-7.0), got)
            outside += int(np.any(got == -7.0))
    assert outside == 8  # the border patches reached outside the image


@pytest.mark.parametrize("ndim", [2, 3])
def test_patches_resampled_together_equal_each_alone(ndim: int) -> None:
    """``resample_patches`` (one image's patches planned, smoothed and interpolated together) gives each grid what
    ``resample`` gives it alone, bit for bit: patches inside, across either border (other block shapes, the default
    value outside), at spacings finer and coarser than the source (no smoothing, a Gaussian, block averages), of two
    sizes and two directions in one call, and one too large for the NumPy route (SimpleITK's)."""
    rng = np.random.default_rng(5)
    size = (301, 259) if ndim == 2 else (121, 99, 61)
    geom = Geometry(np.array([0.2, 0.25, 0.6][:ndim]), np.array([3.0, -4.0, 8.0][:ndim]), rotation(ndim, 12))
    image = rng.normal(size=size).astype(np.float32)
    src = SourceImage(Sample("p", image, geom, np.zeros((1, ndim)), [True], ["a"]))
    lo_c, hi_c = geom.index_to_world(np.zeros((1, ndim)))[0], geom.index_to_world((np.asarray(size) - 1)[None])[0]
    patch = (12,) * ndim if ndim == 2 else (8,) * ndim
    grid_list = []
    for spacing in (0.1, 0.3, 0.55, 1.3 if ndim == 2 else 0.9):
        for turn in (-20, 7):
            centres = [lo_c + (hi_c - lo_c) * rng.uniform(0.3, 0.7, ndim) for _ in range(4)] + [lo_c, hi_c]
            grid_list += [Grid.centred(c, patch, spacing, rotation(ndim, turn)) for c in centres]
    grid_list.append(Grid.centred(lo_c, (6,) * ndim, 0.3, rotation(ndim, 7)))  # another size
    grid_list.append(Grid.centred((lo_c + hi_c) / 2, tuple(int(n * 0.8) for n in size), 0.25, np.eye(ndim)))  # large
    together = grids.resample_patches(src, grid_list, default_value=-7.0)
    assert len(together) == len(grid_list)
    for grid, got in zip(grid_list, together):
        assert got.shape == tuple(grid.size) and got.dtype == np.float32
        np.testing.assert_array_equal(got, resample(src, grid, default_value=-7.0))
    assert sum(bool(np.any(g == -7.0)) for g in together) >= 16  # the border patches reached outside


@pytest.mark.parametrize("ndim", [2, 3])
def test_integer_sub_grid_is_exact(ndim: int) -> None:
    g = oblique_grid(ndim)
    img = np.random.default_rng(1).random(g.size).astype(np.float32)
    s = Sample("s", img, g.geometry, np.zeros((1, ndim)), [True], ["a"])
    sub = g.crop((-2, 3, 1)[:ndim], (12, 9, 6)[:ndim])
    exact = on_sub_grid(img, g, sub)
    np.testing.assert_array_equal(exact, crop_array(img, (-2, 3, 1)[:ndim], sub.size))
    inner = (slice(2, None),) + (slice(None),) * (ndim - 1)  # first two columns are padding
    np.testing.assert_allclose(resample(s, sub)[inner], exact[inner], atol=1e-5)
    assert np.all(exact[:2] == 0)
    with pytest.raises(ValueError):
        on_sub_grid(img, g, Grid.centred(g.origin + 0.1, (4,) * ndim, g.spacing, g.direction))


def test_preprocess_is_grid_plus_resample() -> None:
    g = Geometry(np.array([0.4, 0.7]), np.array([1.0, -3.0]), rotation(2, 10))
    img = np.random.default_rng(2).random((90, 60)).astype(np.float32) * 5 + 3
    s = Sample("s", img, g, np.array([[10.0, 5.0]]), [True], ["a"])
    out = preprocess(s, target_size=(40, 30), keep_aspect=False)
    whole = Grid.whole(s, size=(40, 30))
    assert Grid.of_image(out) == whole
    np.testing.assert_allclose(out.image, normalize_intensity(resample(s, whole)), atol=1e-5)
    both = preprocess(s, target_size=(64, 16), target_spacing=0.5)
    w = Grid.whole(s, spacing=0.5)
    final = w.centre_crop_or_pad((64, 16))
    assert Grid.of_image(both) == final
    # z-score over the whole resampled image, then the crop/pad with zeros
    np.testing.assert_allclose(both.image, on_sub_grid(normalize_intensity(resample(s, w)), w, final), atol=1e-5)
    same = preprocess(s, normalize=None)
    assert Grid.of_image(same) == Grid.of_image(s)
    np.testing.assert_array_equal(same.image, s.image)


@pytest.mark.parametrize("ndim", [2, 3])
def test_preprocess_keeps_the_aspect_ratio_and_pads(ndim: int) -> None:
    """A non-square image on a square grid: isotropic spacing, the whole field of view inside, the anatomy's
    shape kept (a bright pixel lands where its landmark's index says), zero padding on the short axis."""
    size = (90, 40, 30)[:ndim]
    spacing = np.array([0.4, 0.5, 0.8])[:ndim]
    g = Geometry(spacing, np.array([1.0, -3.0, 2.0])[:ndim], rotation(ndim, 10))
    img = np.zeros(size, np.float32)
    spot = (70, 12, 20)[:ndim]
    img[spot] = 1.0
    world = g.index_to_world(np.array([spot], dtype=np.float64))
    s = Sample("s", img, g, world, [True], ["a"])
    target = (32,) * ndim
    out = preprocess(s, target_size=target, normalize=None)
    grid = Grid.of_image(out)
    assert grid.size == target
    np.testing.assert_allclose(grid.spacing, np.full(ndim, 90 * 0.4 / 32))  # the longest extent fits exactly
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in size], indexing="ij")).reshape(ndim, -1).T
    inside = grid.world_to_index(g.index_to_world(corners))
    assert np.all(inside >= -0.5 - 1e-6) and np.all(inside <= np.array(target) - 0.5 + 1e-6)
    peak = np.unravel_index(np.argmax(out.image), out.image.shape)
    np.testing.assert_allclose(peak, grid.world_to_index(world)[0], atol=1.0)
    pad_axis = 1  # 16 mm (2D) or 20 mm (3D) of 36 mm: about half the grid is padding on axis 1
    assert np.all(np.take(out.image, [0, target[1] - 1], axis=pad_axis) == 0)
    squashed = Grid.of_image(preprocess(s, target_size=target, normalize=None, keep_aspect=False))
    assert not np.allclose(squashed.spacing, squashed.spacing[0])  # the old behaviour, still available


def test_wide_smoothing_stays_finite_and_keeps_the_mean():
    """A 3.6 mm Gaussian on a 0.1264 mm image (~28 px) came out all NaN from the discrete filter."""
    import SimpleITK as sitk

    from lmlib.data.geometry import Geometry
    from lmlib.data.grids import SourceImage

    img = np.random.default_rng(0).random((400, 420)).astype(np.float32)
    for sigma_mm in (0.5, 3.6):
        out = sitk.GetArrayFromImage(SourceImage(img, Geometry([0.1264, 0.1264])).smoothed(np.array([sigma_mm] * 2)))
        assert np.isfinite(out).all()
        assert abs(float(out.mean()) - float(img.mean())) < 0.01
        assert out.std() < img.std()
