import numpy as np
import pytest
import SimpleITK as sitk

from lmlib.data.geometry import Geometry


def _rotation_3d(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])


@pytest.mark.parametrize("dim", [2, 3])
def test_matches_simpleitk(dim: int) -> None:
    rng = np.random.default_rng(0)
    spacing = np.array([0.5, 1.7, 3.0][:dim])
    origin = np.array([-10.0, 22.5, 7.0][:dim])
    direction = _rotation_3d(30)[:dim, :dim] if dim == 3 else np.array([[0.0, -1.0], [1.0, 0.0]])
    image = sitk.Image([5] * dim, sitk.sitkFloat32)
    geo = Geometry(spacing, origin, direction)
    geo.apply_to(image)
    idx = rng.uniform(-2, 6, size=(7, dim))
    expected = np.array([image.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in idx])
    np.testing.assert_allclose(geo.index_to_world(idx), expected, atol=1e-9)
    np.testing.assert_allclose(geo.world_to_index(expected), idx, atol=1e-9)
    assert Geometry.from_sitk(image).spacing.tolist() == spacing.tolist()


def test_anisotropic_spacing_scales_axes_separately() -> None:
    geo = Geometry([0.5, 2.0])
    np.testing.assert_allclose(geo.index_to_world([[2, 3]]), [[1.0, 6.0]])


def test_nan_passes_through() -> None:
    geo = Geometry([1.0, 1.0, 1.0])
    out = geo.index_to_world([[np.nan, np.nan, np.nan], [1, 2, 3]])
    assert np.isnan(out[0]).all() and np.allclose(out[1], [1, 2, 3])


def test_scaled_keeps_physical_extent() -> None:
    geo = Geometry([0.1, 0.2], origin=[5.0, -3.0], direction=[[0, 1], [1, 0]])
    small = geo.scaled([0.25, 0.5])  # 400x200 grid -> 100x100
    # the outer pixel edges coincide: edge of index -0.5 in both grids maps to the same point
    np.testing.assert_allclose(geo.index_to_world([[-0.5, -0.5]]), small.index_to_world([[-0.5, -0.5]]), atol=1e-12)
    np.testing.assert_allclose(geo.index_to_world([[399.5, 199.5]]), small.index_to_world([[99.5, 99.5]]), atol=1e-12)
    np.testing.assert_allclose(small.spacing, [0.4, 0.4])


def test_invalid_geometry_raises() -> None:
    with pytest.raises(ValueError, match="positive"):
        Geometry([1.0, 0.0])
    with pytest.raises(ValueError, match="orthonormal"):
        Geometry([1.0, 1.0], direction=[[2, 0], [0, 1]])
