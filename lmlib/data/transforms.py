"""Augmentation (MONAI) that moves landmarks exactly like the pixels, 2D and 3D.

Conventions
- Preprocessing onto the network grid lives in :mod:`lmlib.data.grids`.
- Augmentations work on a dict ``{"image": Tensor (C, x, y[, z]) float32, "landmarks": ndarray (N, D)
  float64 continuous indices (x, y[, z]) in the *current* grid, "valid": ndarray (N,) bool}``; other
  keys pass through. Index 0 is the centre of the first pixel.
- A landmark that leaves the grid (index outside ``[-0.5, size - 0.5]`` on any axis, i.e. outside the
  pixel edges) becomes invalid: ``valid=False`` and its row NaN.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.transforms import (Compose, Flip, RandAdjustContrastd, RandAffine,
                              RandBiasFieldd, RandGaussianNoised, RandomizableTransform, RandScaleIntensityd,
                              Resample)
from monai.utils import convert_to_numpy
from scipy.ndimage import gaussian_filter, map_coordinates


Data = dict[str, Any]


# ----------------------------------------------------------------------------------------- helpers
def _plain(x: Any) -> torch.Tensor:
    """A plain float32 torch tensor (drops MONAI MetaTensor bookkeeping)."""
    t = torch.as_tensor(convert_to_numpy(x) if not isinstance(x, torch.Tensor) else x)
    return t.as_subclass(torch.Tensor).float()


def make_item(image: np.ndarray | torch.Tensor, landmarks_index: np.ndarray, valid: np.ndarray) -> Data:
    """Build the augmentation dict from an image ``(x, y[, z])`` (or ``(C, x, y[, z])``) and indices (N, D)."""
    img = _plain(image)
    lm = np.array(landmarks_index, dtype=np.float64, ndmin=2)
    if img.ndim == lm.shape[1]:
        img = img[None]
    return mark_outside({"image": img, "landmarks": lm, "valid": np.asarray(valid, dtype=bool).copy()})


def mark_outside(data: Data) -> Data:
    """Invalidate (valid=False, NaN row) landmarks outside the pixel edges of ``data["image"]``."""
    size = np.asarray(data["image"].shape[1:], dtype=np.float64)
    lm = np.array(data["landmarks"], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        inside = np.all((lm >= -0.5) & (lm <= size - 0.5), axis=1)
    valid = np.asarray(data["valid"], dtype=bool) & inside
    lm[~valid] = np.nan
    return {**data, "landmarks": lm, "valid": valid}


def left_right_index_pairs(landmark_names: Sequence[str],
                           name_pairs: Sequence[tuple[str, str]]) -> list[tuple[int, int]]:
    """Convert (left name, right name) pairs into index pairs for :class:`RandFlipLandmarksd`."""
    names = list(landmark_names)
    return [(names.index(a), names.index(b)) for a, b in name_pairs]


# ------------------------------------------------------------------------------------- augmentation
class _LandmarkTransform(RandomizableTransform):
    """Base: a random geometric transform of a landmark dict; the MONAI inner transform shares ``self.R``."""

    inner: RandomizableTransform | None = None

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        if self.inner is not None:
            self.inner.set_random_state(state=self.R)
        return self


class RandAffineLandmarksd(_LandmarkTransform):
    """Random rotation/scale/translation/shear with MONAI ``RandAffine``; landmarks via its matrix.

    MONAI's grid maps an OUTPUT pixel to the INPUT: ``in - c = A @ (out - c)`` with ``c = (size - 1) / 2``
    (pixels, about the image centre), so landmarks move by ``out = A^-1 @ (in - c) + c``.
    Ranges: rotation in degrees (one angle in 2D, one per axis in 3D), scale as ``1 +- scale``,
    translation as a fraction of the image size per axis, shear as the MONAI shear factors.
    """

    def __init__(self, ndim: int, prob: float = 1.0, rotation_deg: float = 10.0, scale: float = 0.1,
                 translation_frac: float = 0.05, shear: float = 0.0, padding_mode: str = "zeros") -> None:
        super().__init__(prob)
        rot = float(np.deg2rad(rotation_deg))
        self.translation_frac = translation_frac
        self.inner = RandAffine(prob=1.0, rotate_range=(rot,) if ndim == 2 else (rot,) * 3,
                                scale_range=(scale,) * ndim,
                                shear_range=(shear,) * (2 if ndim == 2 else 6) if shear else None,
                                padding_mode=padding_mode)
        self.inner.resampler.dtype = torch.float32  # MONAI defaults to float64: 2x slower, no gain here
        self.set_random_state(state=self.R)

    def __call__(self, data: Data) -> Data:
        self.randomize(None)
        if not self._do_transform:
            return data
        size = np.asarray(data["image"].shape[1:], dtype=np.float64)
        self.inner.rand_affine_grid.translate_range = tuple(float(self.translation_frac * n) for n in size)
        image = self.inner(data["image"], randomize=True)
        matrix = np.asarray(convert_to_numpy(self.inner.rand_affine_grid.get_transformation_matrix()), np.float64)
        inv, c = np.linalg.inv(matrix), (size - 1) / 2
        lm = (np.asarray(data["landmarks"], dtype=np.float64) - c) @ inv[:-1, :-1].T + inv[:-1, -1] + c
        return mark_outside({**data, "image": _plain(image), "landmarks": lm})


class RandElasticLandmarksd(_LandmarkTransform):
    """Random smooth elastic deformation; the image is sampled with MONAI ``Resample``.

    Written by hand because MONAI's ``Rand2DElastic``/``Rand3DElastic`` build and consume their
    sampling grid inside ``__call__`` without exposing it, so landmarks could not follow them. Here the
    displacement ``d`` (pixels, per output pixel) is explicit: Gaussian-smoothed white noise on a
    coarse grid (smoothing ``sigma_frac * min(size)`` px), upsampled linearly, scaled to a random RMS
    in ``[0, magnitude_frac * min(size)]`` px. The output pixel ``o`` samples the input at ``o + d(o)``,
    so a landmark ``p`` moves to the solution of ``o + d(o) = p``, found by fixed-point iteration
    ``o <- p - d(o)`` with ``d`` linearly interpolated at sub-pixel ``o`` (a contraction as long as
    ``|grad d| < 1``, true for the default smoothness). A landmark whose residual stays above
    ``tol`` px (a fold) is made invalid.
    """

    def __init__(self, prob: float = 1.0, sigma_frac: float = 0.1, magnitude_frac: float = 0.02,
                 padding_mode: str = "zeros", iterations: int = 50, tol: float = 1e-3) -> None:
        super().__init__(prob)
        self.sigma_frac, self.magnitude_frac = sigma_frac, magnitude_frac
        self.iterations, self.tol = iterations, tol
        self.resampler = Resample(mode="bilinear", padding_mode=padding_mode, norm_coords=True,
                                  dtype=torch.float32)

    def random_field(self, size: Sequence[int]) -> np.ndarray:
        """A random displacement field ``(D, *size)`` in pixels, float64."""
        size_a = np.asarray(size)
        sigma = self.sigma_frac * size_a.min()
        step = max(1.0, sigma / 4.0)  # coarse grid spacing (px): >= 4 coarse pixels per sigma
        coarse = np.maximum(2, np.ceil((size_a - 1) / step).astype(int) + 1)
        noise = self.R.standard_normal((len(size), *coarse))
        sig_c = sigma * (coarse - 1) / np.maximum(size_a - 1, 1)
        noise = np.stack([gaussian_filter(n, sig_c, mode="reflect") for n in noise])
        mode = "bilinear" if len(size) == 2 else "trilinear"
        field = torch.nn.functional.interpolate(torch.as_tensor(noise)[None], size=tuple(int(s) for s in size),
                                                mode=mode, align_corners=True)[0].numpy()
        rms = np.sqrt(np.mean(np.sum(field ** 2, axis=0))) + 1e-12
        return field * (self.R.uniform(0.0, self.magnitude_frac * size_a.min()) / rms)

    def __call__(self, data: Data) -> Data:
        self.randomize(None)
        if not self._do_transform:
            return data
        size = data["image"].shape[1:]
        field = self.random_field(size)
        ident = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in size], indexing="ij"))
        centre = ((np.asarray(size) - 1) / 2).reshape(-1, *([1] * len(size)))
        grid = torch.as_tensor(ident + field - centre, dtype=torch.float32)  # MONAI: centred input coords
        image = self.resampler(data["image"], grid)
        return mark_outside({**data, "image": _plain(image), "landmarks": self.invert(field, data["landmarks"])})

    def invert(self, field: np.ndarray, points: np.ndarray) -> np.ndarray:
        """Output-grid positions ``o`` (N, D) with ``o + field(o) = points``; NaN where not converged."""
        p = np.array(points, dtype=np.float64, ndmin=2)
        ok = ~np.isnan(p).any(axis=1)
        o = p[ok].copy()

        def disp(q: np.ndarray) -> np.ndarray:
            return np.stack([map_coordinates(f, q.T, order=1, mode="nearest") for f in field], axis=1)

        for _ in range(self.iterations):
            o = p[ok] - disp(o)
        res = np.linalg.norm(o + disp(o) - p[ok], axis=1)
        o[res > self.tol] = np.nan
        out = np.full_like(p, np.nan)
        out[ok] = o
        return out


class RandFlipLandmarksd(_LandmarkTransform):
    """Random flip along ``axis`` (MONAI ``Flip``): ``x -> size - 1 - x``, then left/right pairs swap.

    ``left_right_pairs`` are index pairs (see :func:`left_right_index_pairs`); after a mirror, the
    point annotated as "left" is anatomically the right one, so rows (and validity) are exchanged.
    """

    def __init__(self, prob: float = 0.5, axis: int = 0, left_right_pairs: Sequence[tuple[int, int]] = ()) -> None:
        super().__init__(prob)
        self.axis, self.pairs = axis, [tuple(p) for p in left_right_pairs]
        self.flip = Flip(spatial_axis=axis)

    def __call__(self, data: Data) -> Data:
        self.randomize(None)
        if not self._do_transform:
            return data
        lm = np.array(data["landmarks"], dtype=np.float64)
        valid = np.array(data["valid"], dtype=bool)
        lm[:, self.axis] = data["image"].shape[1 + self.axis] - 1 - lm[:, self.axis]
        for a, b in self.pairs:
            lm[[a, b]], valid[[a, b]] = lm[[b, a]], valid[[b, a]]
        return {**data, "image": _plain(self.flip(data["image"])), "landmarks": lm, "valid": valid}


def intensity_transforms(prob: float = 0.5, gamma: tuple[float, float] = (0.7, 1.5), bias_coeff: float = 0.2,
                         noise_std: float = 0.05, scale: float = 0.1) -> list[Callable[[Data], Data]]:
    """MONAI intensity augmentations on ``"image"`` only (landmarks untouched): gamma/contrast,
    multiplicative bias field, global intensity scale, Gaussian noise (std in normalised units)."""
    return [RandAdjustContrastd("image", prob=prob, gamma=gamma),
            RandBiasFieldd("image", prob=prob, coeff_range=(0.0, bias_coeff)),
            RandScaleIntensityd("image", factors=scale, prob=prob),
            RandGaussianNoised("image", prob=prob, std=noise_std)]


def build_augmentation(ndim: int, left_right_pairs: Sequence[tuple[int, int]] = (), *,
                       flip_prob: float = 0.0, flip_axis: int = 0,
                       affine_prob: float = 1.0, rotation_deg: float = 10.0, scale: float = 0.1,
                       translation_frac: float = 0.05, shear: float = 0.0,
                       elastic: bool = False, elastic_prob: float = 0.5, elastic_sigma_frac: float = 0.1,
                       elastic_magnitude_frac: float = 0.02,
                       intensity: bool = True, intensity_prob: float = 0.5,
                       padding_mode: str = "zeros", seed: int | None = 0) -> Compose:
    """Training augmentation for landmark dicts: flip -> affine -> elastic -> intensity (MONAI Compose).

    The returned Compose is ``Randomizable``: ``set_random_state(seed)`` reseeds every stage (the data
    loader does this per worker). Geometric stages keep landmarks exact and invalidate those leaving
    the grid; see the classes above for each inversion.
    """
    stages: list[Callable[[Data], Data]] = []
    if flip_prob > 0:
        stages.append(RandFlipLandmarksd(flip_prob, flip_axis, left_right_pairs))
    if affine_prob > 0:
        stages.append(RandAffineLandmarksd(ndim, affine_prob, rotation_deg, scale, translation_frac, shear,
                                           padding_mode))
    if elastic:
        stages.append(RandElasticLandmarksd(elastic_prob, elastic_sigma_frac, elastic_magnitude_frac, padding_mode))
    if intensity:
        stages.extend(intensity_transforms(intensity_prob))
    compose = Compose(stages)
    if seed is not None:
        compose.set_random_state(seed)
    return compose
