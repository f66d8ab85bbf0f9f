"""The network sees one axis order and one handedness whatever the file's storage order (issue 23: a mirrored
storage order, NIfTI's LAS against RAS, made the heatmap U-Net put left landmarks on the right)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from lmlib.data.datasets import load_dataset
from lmlib.data.geometry import Geometry
from lmlib.data.grids import Grid, network_orientation, resample
from lmlib.data.loaders import LandmarkDataset, ViewSpec
from lmlib.data.sample import Sample


def _stored(sample: Sample, perm: tuple[int, ...], flip_axes: tuple[int, ...]) -> Sample:
    """The same image in world mm stored another way: array axes permuted by ``perm``, then flipped on
    ``flip_axes`` (the geometry follows exactly)."""
    g = sample.geometry
    image = np.transpose(sample.image, perm)
    direction, spacing = g.direction[:, list(perm)].copy(), g.spacing[list(perm)]
    start = np.zeros(sample.ndim)
    for a in flip_axes:
        image = np.flip(image, axis=a)
        direction[:, a] *= -1.0
        start[perm[a]] = sample.image.shape[perm[a]] - 1
    origin = g.index_to_world(start[None])[0]
    return replace(sample, image=np.ascontiguousarray(image), geometry=Geometry(spacing, origin, direction))


@pytest.fixture(scope="module")
def phantom() -> Sample:
    s = load_dataset("synthetic3d", n_images=2, seed=4).samples[0]
    return s


@pytest.mark.parametrize("perm, flips", [((0, 1, 2), (0,)), ((0, 1, 2), (2,)), ((2, 0, 1), ()), ((1, 0, 2), ()),
                                         ((0, 1, 2), (0, 1, 2))])
def test_a_storage_order_is_the_same_image_in_world_mm(phantom: Sample, perm: tuple, flips: tuple) -> None:
    stored = _stored(phantom, perm, flips)
    grid = Grid.centred(phantom.landmarks_mm.mean(axis=0), (20, 20, 20), 1.3)
    np.testing.assert_allclose(resample(stored, grid), resample(phantom, grid), atol=1e-5)


@pytest.mark.parametrize("perm, flips", [((0, 1, 2), (0,)), ((2, 0, 1), ()), ((1, 0, 2), ()), ((2, 0, 1), (1,))])
def test_the_network_sees_a_mirrored_or_transposed_file_as_the_original(phantom: Sample, perm: tuple,
                                                                        flips: tuple) -> None:
    """Storage mirrored along x (LAS against RAS) or with axes transposed: the same view arrays and landmark
    pixels as the original; before, the view followed the file's axes and the network saw a mirror image."""
    stored = _stored(phantom, perm, flips)
    oriented = network_orientation(stored)
    assert np.linalg.det(oriented.geometry.direction) > 0
    np.testing.assert_array_equal(oriented.landmarks_mm, phantom.landmarks_mm)
    view = ViewSpec("whole", (32, 32, 32))
    a = LandmarkDataset([phantom], view=view)[0]
    b = LandmarkDataset([stored], view=view)[0]
    np.testing.assert_allclose(np.asarray(b["image"]), np.asarray(a["image"]), atol=1e-4)
    np.testing.assert_allclose(b["landmarks"], a["landmarks"], atol=1e-6)


def test_a_proper_orientation_is_left_as_it_is(phantom: Sample) -> None:
    """Identity (LPS) and RAS (a 180-degree turn of it) are proper: the sample itself comes back."""
    assert network_orientation(phantom) is phantom
    ras = _stored(phantom, (0, 1, 2), (0, 1))
    assert network_orientation(ras) is ras
    flat = load_dataset("synthetic2d", n_images=2, seed=1).samples[0]
    assert network_orientation(flat) is flat


@pytest.mark.parametrize("perm, flips", [((0, 1, 2), (1,)), ((0, 1, 2), (2,)), ((1, 0, 2), (2,))])
def test_a_mirror_along_another_axis_becomes_a_turn_never_a_mirror(phantom: Sample, perm: tuple, flips: tuple) -> None:
    """Flipped along y or z: flipping x as well makes it a 180-degree turn of the original (proper), so a left
    landmark stays on the left of the anatomy the network sees."""
    oriented = network_orientation(_stored(phantom, perm, flips))
    d = oriented.geometry.direction
    assert np.linalg.det(d) > 0
    signs = np.sign(np.diag(np.linalg.solve(phantom.geometry.direction, d)))
    assert sorted(signs.tolist()) == [-1.0, -1.0, 1.0]
    np.testing.assert_array_equal(oriented.landmarks_mm, phantom.landmarks_mm)
