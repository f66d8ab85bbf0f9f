"""Tests for lmlib.data.deformations: the image and its landmarks move by exactly the same deformation."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from lmlib.data.datasets import shared_data_dir
from lmlib.data.deformations import (
    INVERSION_TOLERANCE_MM,
    deform_sample,
    deformed_copies,
    inverse_transform_points,
    random_deformation,
)
from lmlib.data.geometry import Geometry
from lmlib.data.sample import Sample, image_from_sitk

SIGMA_PX = 1.5
DATA_DIR = shared_data_dir()
TEMPLATE = DATA_DIR / "afids-mni" / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"


def _blob_sample(size: tuple[int, ...], geometry: Geometry, centres_idx: np.ndarray) -> Sample:
    """Blank image with a Gaussian blob (sigma 1.5 px) at each landmark index."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in size], indexing="ij"), axis=-1)
    image = np.zeros(size)
    for c in centres_idx:
        image += np.exp(-((grid - c) ** 2).sum(-1) / (2 * SIGMA_PX ** 2))
    names = [f"b{i}" for i in range(len(centres_idx))]
    return Sample.from_index("blobs", image, geometry, centres_idx, names)


def _peak_index(image: np.ndarray, guess: np.ndarray, half: int = 4) -> np.ndarray:
    """Sub-pixel peak: intensity-weighted centroid in a (2*half+1)^D window around the local max."""
    lo = np.maximum(np.round(guess).astype(int) - half, 0)
    win = image[tuple(slice(a, a + 2 * half + 1) for a in lo)]
    peak = lo + np.array(np.unravel_index(np.argmax(win), win.shape))
    lo = peak - half
    win = image[tuple(slice(a, a + 2 * half + 1) for a in lo)].astype(np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in win.shape], indexing="ij"), axis=-1)
    return lo + (win[..., None] * grid).reshape(-1, grid.shape[-1]).sum(0) / win.sum()


CASES = {
    "2d": ((72, 64), Geometry(np.array([0.8, 1.1]), np.array([-20.3, 35.7])),
           np.array([[18.2, 16.7], [54.4, 18.1], [36.0, 32.5], [20.6, 47.3], [52.3, 46.8]])),
    "2d_rotated_axes": ((64, 64), Geometry(np.array([1.0, 0.9]), np.array([10.0, -5.0]),
                                           np.array([[0.0, -1.0], [1.0, 0.0]])),
                        np.array([[16.3, 16.1], [46.5, 18.9], [31.7, 46.2]])),
    "3d": ((48, 48, 48), Geometry(np.array([1.0, 0.9, 1.2]), np.array([-30.0, 12.5, 40.0]),
                                  np.diag([-1.0, -1.0, 1.0])),
           np.array([[14.3, 14.6, 14.2], [33.7, 16.2, 30.4], [16.5, 32.8, 31.6], [32.2, 33.5, 16.9]])),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_blob_peaks_follow_landmarks(case: str, seed: int) -> None:
    size, geometry, centres = CASES[case]
    sample = _blob_sample(size, geometry, centres)
    kw = dict(max_rotation_deg=12.0, max_translation_mm=3.0, elastic_magnitude_mm=2.0, elastic_spacing_mm=20.0)
    transform = random_deformation(geometry, size, seed, **kw)
    out = deform_sample(sample, transform, "blobs_def")
    assert out.size == sample.size and out.valid.all()
    np.testing.assert_allclose(out.geometry.origin, geometry.origin)
    moved_idx = out.landmarks_index
    assert np.linalg.norm(moved_idx - centres, axis=1).mean() > 1.0  # it really moved
    # the elastic part matters: affine-only inverse is measurably different
    affine_only = inverse_transform_points(transform.GetNthTransform(1), sample.landmarks_mm)
    assert np.linalg.norm(affine_only - out.landmarks_mm, axis=1).mean() > 0.3
    for guess in moved_idx:
        err = np.linalg.norm(_peak_index(out.image, guess) - guess)
        assert err < 0.5, (case, seed, err)


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_and_determinism(case: str) -> None:
    size, geometry, centres = CASES[case]
    pts = geometry.index_to_world(centres)
    t1, t2 = random_deformation(geometry, size, 7), random_deformation(geometry, size, 7)
    y1, y2 = inverse_transform_points(t1, pts), inverse_transform_points(t2, pts)
    np.testing.assert_array_equal(y1, y2)
    back = np.array([t1.TransformPoint(p.tolist()) for p in y1])
    assert np.abs(back - pts).max() < INVERSION_TOLERANCE_MM
    y3 = inverse_transform_points(random_deformation(geometry, size, 8), pts)
    assert np.abs(y3 - y1).max() > 0.1


def test_affine_only_is_exact() -> None:
    size, geometry, centres = CASES["3d"]
    t = random_deformation(geometry, size, 3, elastic_magnitude_mm=0.0)
    assert t.GetNumberOfTransforms() == 1
    pts = geometry.index_to_world(centres)
    expected = np.array([t.GetNthTransform(0).GetInverse().TransformPoint(p.tolist()) for p in pts])
    np.testing.assert_allclose(inverse_transform_points(t, pts), expected, atol=1e-9)


def test_invalid_and_outside_landmarks() -> None:
    size, geometry, _ = CASES["2d"]
    centres = np.array([[30.0, 30.0], [np.nan, np.nan], [0.2, 30.0]])
    sample = _blob_sample(size, geometry, np.nan_to_num(centres))
    sample = Sample.from_index("x", sample.image, geometry, centres, ["a", "b", "edge"])
    # pure translation of +20 mm along x: the output shows input point y + 20, so landmarks move by -20 mm
    t = sitk.CompositeTransform([sitk.TranslationTransform(2, (20.0, 0.0))])
    out = deform_sample(sample, t, "shifted")
    assert out.valid.tolist() == [True, False, False]
    np.testing.assert_allclose(out.landmarks_mm[0], sample.landmarks_mm[0] - [20.0, 0.0], atol=1e-9)
    assert "edge" in out.meta["deform_warnings"][0] and np.isnan(out.landmarks_mm[1:]).all()


def test_deformed_copies() -> None:
    size, geometry, centres = CASES["2d"]
    template = _blob_sample(size, geometry, centres)
    copies = deformed_copies(template, 5, seed=4, elastic_spacing_mm=20.0)
    again = deformed_copies(template, 5, seed=4, elastic_spacing_mm=20.0)
    assert [c.image_id for c in copies] == [f"blobs_def{i:03d}" for i in range(5)]
    assert [c.meta["split"] for c in copies] == [c.meta["split"] for c in again]
    assert {c.meta["split"] for c in copies} == {"train", "val", "test"}
    np.testing.assert_array_equal(copies[2].image, again[2].image)
    assert np.abs(copies[0].landmarks_mm - copies[1].landmarks_mm).max() > 0.5
    assert all(c.meta["deformed_from"] == "blobs" for c in copies)


@pytest.mark.slow
@pytest.mark.skipif(not TEMPLATE.exists(), reason="afids-mni template not available")
def test_real_template_deformation() -> None:
    image, geometry = image_from_sitk(sitk.ReadImage(str(TEMPLATE)))
    pts = geometry.index_to_world(np.array([[96.0, 110.0, 70.0], [60.0, 120.0, 90.0], [130.0, 100.0, 60.0]]))
    sample = Sample("mni", image, geometry, pts, np.ones(3, bool), ("a", "b", "c"))
    transform = random_deformation(geometry, sample.size, 0)
    out = deform_sample(sample, transform, "mni_def")
    assert out.size == sample.size and out.valid.all()
    back = np.array([transform.TransformPoint(p.tolist()) for p in out.landmarks_mm])
    assert np.abs(back - pts).max() < INVERSION_TOLERANCE_MM


@pytest.mark.parametrize("ndim", [2, 3])
def test_default_elastic_field_does_not_fold(ndim: int) -> None:
    """Default field (3 mm RMS, 30 mm scale): Jacobian determinant of z -> z + d(z) stays > 0."""
    geometry = Geometry(np.ones(ndim))
    for seed in range(3):
        elastic = random_deformation(geometry, (96,) * ndim, seed).GetNthTransform(0)
        field = sitk.GetArrayFromImage(elastic.GetDisplacementField())[..., ::-1]  # components (z,)y,x
        step = elastic.GetDisplacementField().GetSpacing()[0]
        jac = np.stack([np.stack(np.gradient(field[..., k], step), -1) for k in range(ndim)], -2)
        assert np.linalg.det(jac + np.eye(ndim)).min() > 0.1
        assert 1.0 < np.sqrt((field ** 2).sum(-1).mean()) < 5.0


# Seeded transforms on an oblique grid and landmarks moved through a smooth deformation, hashed: run under two
# OpenBLAS kernels, which round a norm or a matrix product differently in the last bit.
_GENERATE = """
import hashlib
import os
import subprocess
import sys

import numpy as np
from scipy.spatial.transform import Rotation
from lmlib.data.deformations import inverse_transform_points, random_deformation
from lmlib.data.geometry import Geometry
geometry = Geometry([1.0, 1.2, 0.9], [-10.0, 5.0, 3.0], Rotation.from_rotvec([0.3, -0.2, 0.5]).as_matrix())
h = hashlib.sha256()
for seed in range(200):
    t = random_deformation(geometry, (12, 12, 12), seed, max_rotation_deg=25, max_translation_mm=20,
                           elastic_magnitude_mm=0.0).GetNthTransform(0)
    h.update(np.array(t.GetParameters() + t.GetFixedParameters()).tobytes())
t = random_deformation(geometry, (12, 12, 12), 7, elastic_magnitude_mm=2.0, elastic_spacing_mm=12.0)
h.update(inverse_transform_points(t, geometry.index_to_world(np.random.default_rng(0).uniform(2, 9, (20, 3)))).tobytes())
print(h.hexdigest())
"""


def test_the_generated_deformations_have_the_same_bits_whatever_blas_kernel_numpy_picks() -> None:
    """Posed and deformed copies are regenerated from their seeds on every machine and their checksum is in each
    run's manifest: np.linalg.norm and ``@`` went through OpenBLAS, whose kernel depends on the CPU (afids-mni's
    committed checksum did not reproduce on another machine). The Prescott kernel runs on any x86-64 CPU."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    digests = {}
    for core in ("", "Prescott"):
        kernel = {"OPENBLAS_CORETYPE": core} if core else {}
        digests[core] = subprocess.run([sys.executable, "-c", _GENERATE], env={**env, **kernel}, capture_output=True,
                                       text=True, check=True).stdout.strip()
    assert digests[""] == digests["Prescott"], digests


def test_the_elastic_smoothing_is_scipys_gaussian_filter_with_libm_weights() -> None:
    """The deformation's smoothing equals scipy's gaussian_filter (mode wrap) to rounding, with its kernel from libm
    (NumPy's AVX-512 exp changed the kernel's last bits, and with them every posed copy and its checksum)."""
    import math

    from scipy.ndimage import gaussian_filter

    from lmlib.data.deformations import gaussian_smooth
    from lmlib.data.geometry import libm_exp

    noise = np.random.default_rng(5).normal(size=(9, 10, 11))
    assert np.allclose(gaussian_smooth(noise, 2.0), gaussian_filter(noise, sigma=2.0, mode="wrap"), rtol=0, atol=1e-14)
    values = np.linspace(-3.0, 1.0, 7).reshape(7, 1)
    assert libm_exp(values).tolist() == [[math.exp(v)] for v in values.ravel().tolist()]
