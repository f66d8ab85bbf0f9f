"""A training set from ONE annotated image: random smooth deformations with exactly moved landmarks.

A deformation is a SimpleITK transform ``T`` = elastic ∘ affine (``sitk.CompositeTransform([E, A])``,
A applied first). ``sitk.Resample`` uses it as a map from OUTPUT points to INPUT points:
``out(y) = in(T(y))``. A landmark at input point ``p`` therefore moves to ``y = T^-1(p)``: the affine
part is inverted exactly, the elastic part ``E(z) = z + d(z)`` numerically (fixed point
``z = p - d(z)``), and the result is checked (``|T(y) - p| < 1e-4 mm``) before it is used.
All coordinates are world mm, ``(x, y[, z])``.
"""
from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import correlate1d
from scipy.spatial.transform import Rotation

from lmlib.data.geometry import Geometry, apply_matrix, libm_exp, vector_norm
from lmlib.data.phantoms import assign_splits
from lmlib.data.sample import Sample, image_from_sitk

INVERSION_TOLERANCE_MM = 1e-4  # accepted residual |T(y) - p| of an inverted landmark, mm


def gaussian_smooth(array: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(array, sigma, mode="wrap")`` (float64) with its kernel computed by libm's
    ``exp`` (``math.exp``), not NumPy's: NumPy's vectorised ``exp`` gives other last bits on CPUs with AVX-512,
    which made the generated images differ by machine (the data checksum did). Why by hand: scipy computes the
    kernel with ``numpy.exp``; the separable correlation itself is scipy's (``correlate1d``, axis by axis)."""
    radius = int(truncate * float(sigma) + 0.5)
    x2 = (np.arange(-radius, radius + 1) ** 2).tolist()
    phi = libm_exp(np.array([-0.5 / (float(sigma) ** 2) * v for v in x2]))
    weights = (phi / phi.sum())[::-1]  # scipy's kernel, reversed for a correlation (it is symmetric)
    out = np.asarray(array, dtype=np.float64)
    for axis in range(out.ndim):
        out = correlate1d(out, weights, axis, output=np.float64, mode="wrap")
    return out


def _elastic_transform(geometry: Geometry, size: np.ndarray, rng: np.random.Generator,
                       magnitude_mm: float, spacing_mm: float) -> sitk.DisplacementFieldTransform:
    """Smooth random displacement field: Gaussian-smoothed noise on a coarse grid (step
    ``spacing_mm / 6``, sigma ``spacing_mm / 3``) covering the image plus a margin, scaled to an RMS
    displacement length of ``magnitude_mm``; linearly interpolated by ITK between grid nodes."""
    dim = geometry.ndim
    step, margin = spacing_mm / 6.0, spacing_mm
    extent = (size - 1) * geometry.spacing + 2 * margin  # mm along each image axis
    n = np.ceil(extent / step).astype(int) + 1
    noise = rng.normal(size=(dim, *n[::-1]))  # sitk array order: (z,) y, x
    field = np.stack([gaussian_smooth(c, sigma=2.0) for c in noise], axis=-1)
    rms = np.sqrt((field ** 2).sum(axis=-1).mean())
    field *= magnitude_mm / max(rms, 1e-12)
    image = sitk.GetImageFromArray(field.astype(np.float64), isVector=True)
    image.SetSpacing([step] * dim)
    image.SetOrigin((geometry.origin - apply_matrix(geometry.direction, np.full(dim, margin))).tolist())
    image.SetDirection(geometry.direction.reshape(-1).tolist())
    return sitk.DisplacementFieldTransform(image)


def random_deformation(geometry: Geometry, size: tuple[int, ...], seed: int,
                       max_rotation_deg: float = 10.0, max_scale: float = 0.1,
                       max_translation_mm: float = 5.0, elastic_magnitude_mm: float = 3.0,
                       elastic_spacing_mm: float = 30.0) -> sitk.Transform:
    """Random affine (about the image centre) followed by a smooth elastic displacement.

    Args:
        geometry, size: the image grid (size in pixels, ``(x, y[, z])``).
        seed: numpy Generator seed (same seed -> same transform).
        max_rotation_deg: rotation angle uniform in +-this (3D: about a random axis).
        max_scale: per-axis scale uniform in ``1 +- max_scale``.
        max_translation_mm: per-axis translation uniform in +-this (mm).
        elastic_magnitude_mm: RMS length of the elastic displacement (mm); 0 = affine only.
        elastic_spacing_mm: length scale of the elastic field (mm; smoothing sigma = 1/3 of it).

    Returns:
        ``sitk.CompositeTransform([elastic, affine])`` (or ``[affine]``), mapping output -> input
        points as ``sitk.Resample`` expects.
    """
    dim = geometry.ndim
    size_arr = np.asarray(size, dtype=np.float64)
    rng = np.random.default_rng(seed)
    # scalar libm and BLAS-free products: the same transform on every CPU (lmlib.data.geometry.apply_matrix)
    angle = math.radians(float(rng.uniform(-max_rotation_deg, max_rotation_deg)))
    if dim == 2:
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    else:
        axis = rng.normal(size=3)
        rot = Rotation.from_rotvec(axis / vector_norm(axis) * angle).as_matrix()
    matrix = rot * (1.0 + rng.uniform(-max_scale, max_scale, dim))  # = rot @ diag(scales)
    affine = sitk.AffineTransform(dim)
    affine.SetMatrix(matrix.reshape(-1).tolist())
    affine.SetCenter(geometry.index_to_world((size_arr - 1) / 2)[0].tolist())
    affine.SetTranslation(rng.uniform(-max_translation_mm, max_translation_mm, dim).tolist())
    if elastic_magnitude_mm <= 0:
        return sitk.CompositeTransform([affine])
    elastic = _elastic_transform(geometry, size_arr, rng, elastic_magnitude_mm, elastic_spacing_mm)
    return sitk.CompositeTransform([elastic, affine])


def _invert_displacement(t: sitk.Transform, p: np.ndarray, max_iter: int = 200) -> np.ndarray:
    """Solve ``t(z) = z + d(z) = p`` for z by fixed-point iteration ``z <- p - d(z)`` (mm)."""
    z = p.copy()
    for _ in range(max_iter):
        residual = np.asarray(t.TransformPoint(z.tolist())) - p  # = z + d(z) - p
        if vector_norm(residual) < 1e-7:
            break
        z = z - residual
    residual = vector_norm(np.asarray(t.TransformPoint(z.tolist())) - p)
    if residual > INVERSION_TOLERANCE_MM:
        raise RuntimeError(f"elastic inverse did not converge at {p.tolist()}: residual {residual:.2e} mm")
    return z


def inverse_transform_points(transform: sitk.Transform, points_mm: np.ndarray) -> np.ndarray:
    """Points ``p`` (N, D) mm -> ``T^-1(p)``: where a landmark at input point ``p`` lands in the
    output of ``sitk.Resample(image, transform)``. NaN rows stay NaN. Raises if the residual
    ``|T(T^-1(p)) - p|`` exceeds :data:`INVERSION_TOLERANCE_MM`."""
    pts = np.array(points_mm, dtype=np.float64, ndmin=2)
    out = np.full_like(pts, np.nan)
    for i, p in enumerate(pts):
        if np.isnan(p).any():
            continue
        out[i] = _inverse_point(transform, p)
        residual = vector_norm(np.asarray(transform.TransformPoint(out[i].tolist())) - p)
        if residual > INVERSION_TOLERANCE_MM:
            raise RuntimeError(f"inverse transform failed at {p.tolist()}: residual {residual:.2e} mm")
    return out


def _inverse_point(t: sitk.Transform, p: np.ndarray) -> np.ndarray:
    if isinstance(t, sitk.CompositeTransform):  # T = T0(T1(...)): undo T0 first
        for k in range(t.GetNumberOfTransforms()):
            p = _inverse_point(t.GetNthTransform(k), p)
        return p
    if isinstance(t, (sitk.DisplacementFieldTransform, sitk.BSplineTransform)):
        return _invert_displacement(t, p)
    return np.asarray(t.GetInverse().TransformPoint(p.tolist()))  # affine-like: exact


def deform_sample(sample: Sample, transform: sitk.Transform, image_id: str,
                  interpolator: int = sitk.sitkLinear) -> Sample:
    """Resample ``sample`` through ``transform`` onto its own grid and move its landmarks with the
    exact inverse. Landmarks that leave the grid become invalid (listed in
    ``meta["deform_warnings"]``). Outside the input image the output is the image minimum."""
    image = sample.to_sitk()
    out = sitk.Resample(image, image, transform, interpolator, float(sample.image.min()), sitk.sitkFloat32)
    array, geometry = image_from_sitk(out)
    moved = inverse_transform_points(transform, sample.landmarks_mm)
    valid = sample.valid.copy()
    idx = geometry.world_to_index(moved)
    outside = valid & np.any((idx < -0.5) | (idx > np.array(sample.size) - 0.5), axis=1)
    # a generated image: no file holds it, so it names none (its original's file is another grid, and its
    # pixel/voxel coordinates would not fit that file)
    meta: dict[str, Any] = {k: v for k, v in sample.meta.items() if k != "image_path"}
    meta["deformed_from"] = sample.image_id
    if outside.any():
        names = [n for n, o in zip(sample.landmark_names, outside) if o]
        meta["deform_warnings"] = [f"landmarks moved outside the image, marked invalid: {names}"]
        valid &= ~outside
    return Sample(image_id, array, geometry, moved, valid, sample.landmark_names, meta)


def deformed_copies(template: Sample, n: int, seed: int,
                    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
                    **deformation_kwargs: Any) -> list[Sample]:
    """``n`` random deformations of ``template`` (ids ``{template.image_id}_def000``...), with a
    deterministic ``meta["split"]``; ``deformation_kwargs`` go to :func:`random_deformation`."""
    splits = assign_splits(n, seed, split_fractions)
    copies = []
    for i in range(n):
        tseed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        transform = random_deformation(template.geometry, template.size, tseed, **deformation_kwargs)
        s = deform_sample(template, transform, f"{template.image_id}_def{i:03d}")
        s.meta.update(split=splits[i], deformation_seed=tseed)
        copies.append(s)
    return copies


#: posed copies' default ranges: a pose large enough that a landmark's world position alone does not find it
#: (rotation about a random axis through the image centre, degrees; translation per axis, mm; per-axis scale
#: 1 +- scale) composed with a smooth deformation (RMS mm, length scale mm)
POSE_DEFAULTS: dict[str, float] = {"rotation_deg": 25.0, "translation_mm": 20.0, "scale": 0.1, "elastic_mm": 3.0,
                                   "elastic_spacing_mm": 30.0}


def copy_seed(seed: int, image_id: str, k: int) -> int:
    """The seed of copy ``k`` of image ``image_id``: from the three alone (not from the other images or the
    order they are loaded in), so any subset of copies is generated identically, on any machine."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(image_id.encode("utf-8")), int(k)]).generate_state(1)[0])


def posed_copies(sample: Sample, n: int, seed: int = 0, rotation_deg: float = POSE_DEFAULTS["rotation_deg"],
                 translation_mm: float = POSE_DEFAULTS["translation_mm"], scale: float = POSE_DEFAULTS["scale"],
                 elastic_mm: float = POSE_DEFAULTS["elastic_mm"],
                 elastic_spacing_mm: float = POSE_DEFAULTS["elastic_spacing_mm"]) -> list[Sample]:
    """``n`` random posed copies of ``sample`` (ids ``{image_id}_pose00``...): each a random affine pose about
    the image centre (rotation ``+-rotation_deg`` about a random axis, scale ``1 +- scale`` per axis,
    translation ``+-translation_mm`` per axis) composed with a smooth elastic deformation (``elastic_mm``
    RMS), resampled onto the image's own grid, so the anatomy no longer sits where its template frame put
    it; landmarks move by the exact inverse (:func:`deform_sample`). ``meta``: the original's split,
    ``posed_from`` and ``pose_seed``. Deterministic per ``(seed, image_id, k)`` (:func:`copy_seed`)."""
    copies = []
    for k in range(int(n)):
        pseed = copy_seed(seed, sample.image_id, k)
        transform = random_deformation(sample.geometry, sample.size, pseed, max_rotation_deg=rotation_deg,
                                       max_scale=scale, max_translation_mm=translation_mm,
                                       elastic_magnitude_mm=elastic_mm, elastic_spacing_mm=elastic_spacing_mm)
        s = deform_sample(sample, transform, f"{sample.image_id}_pose{k:02d}")
        s.meta.update(posed_from=sample.image_id, pose_seed=pseed)
        copies.append(s)
    return copies
