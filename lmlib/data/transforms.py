"""Augmentation (MONAI) that moves landmarks exactly like the pixels, 2D and 3D.

Conventions
- Preprocessing onto the network grid lives in :mod:`lmlib.data.grids`.
- Augmentations work on a dict ``{"image": Tensor (C, x, y[, z]) float32, "landmarks": ndarray (N, D)
  float64 continuous indices (x, y[, z]) in the *current* grid, "valid": ndarray (N,) bool,
  "keep_outside": bool}``; other keys pass through. Index 0 is the centre of the first pixel.
- A landmark that leaves the grid (index outside ``[-0.5, size - 0.5]`` on any axis, i.e. outside the
  pixel edges) becomes invalid: ``valid=False`` and its row NaN, unless ``keep_outside`` is true (then
  it stays valid with its coordinates, for methods that regress points outside the image). A landmark
  whose elastic inversion fails (no convergence, fold) is invalid in either case.
- Geometric augmentation resamples the image ONCE: flip, affine and elastic deformation are composed
  into one sampling grid (:class:`RandSpatialLandmarksd`), as MONAI's ``Rand2DElastic`` does.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from monai.transforms import (
    Compose,
    Flip,
    MapTransform,
    RandAdjustContrastd,
    RandAffineGrid,
    RandBiasFieldd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    Randomizable,
    RandomizableTransform,
    RandScaleIntensityd,
    Resample,
    Transform,
)
from monai.utils import convert_to_numpy
from scipy.ndimage import gaussian_filter, map_coordinates

Data = dict[str, Any]


# ----------------------------------------------------------------------------------------- helpers
def _plain(x: Any) -> torch.Tensor:
    """A plain float32 torch tensor (drops MONAI MetaTensor bookkeeping)."""
    t = torch.as_tensor(convert_to_numpy(x) if not isinstance(x, torch.Tensor) else x)
    return t.as_subclass(torch.Tensor).float()


def make_item(image: np.ndarray | torch.Tensor, landmarks_index: np.ndarray, valid: np.ndarray,
              keep_outside: bool = False, landmark_ids: Sequence[int] | None = None,
              per_channel: bool = False) -> Data:
    """Build the augmentation dict from an image ``(x, y[, z])`` (or ``(C, x, y[, z])``) and indices (N, D) px.

    ``keep_outside``: landmarks outside the grid stay valid (see :func:`mark_outside`). ``landmark_ids``: the
    data set's index of each row when the item serves a subset (a patch), so that a mirror swaps the right rows;
    ``per_channel``: each landmark has its own channel (stacked patches), which a mirror cannot swap.
    """
    img = _plain(image)
    lm = np.array(landmarks_index, dtype=np.float64, ndmin=2)
    if img.ndim == lm.shape[1]:
        img = img[None]
    data = {"image": img, "landmarks": lm, "valid": np.asarray(valid, dtype=bool).copy(), "keep_outside": bool(keep_outside)}
    if landmark_ids is not None:
        data["landmark_ids"] = [int(i) for i in landmark_ids]
    if per_channel:
        data["per_channel"] = True
    return mark_outside(data)


def mark_outside(data: Data) -> Data:
    """Invalidate (valid=False, NaN row) landmarks outside the pixel edges of ``data["image"]``.

    With ``data["keep_outside"]`` true only rows that are already NaN (e.g. a failed elastic
    inversion) become invalid; points outside the grid keep their coordinates and validity.
    """
    size = np.asarray(data["image"].shape[1:], dtype=np.float64)
    lm = np.array(data["landmarks"], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        inside = ~np.isnan(lm).any(axis=1)
        if not data.get("keep_outside", False):
            inside &= np.all((lm >= -0.5) & (lm <= size - 0.5), axis=1)
    valid = np.asarray(data["valid"], dtype=bool) & inside
    lm[~valid] = np.nan
    return {**data, "landmarks": lm, "valid": valid}


def left_right_index_pairs(landmark_names: Sequence[str],
                           name_pairs: Sequence[tuple[str, str]]) -> list[tuple[int, int]]:
    """Convert (left name, right name) pairs into index pairs for :class:`RandFlipLandmarksd`."""
    names = list(landmark_names)
    return [(names.index(a), names.index(b)) for a, b in name_pairs]


def _swap_pairs(lm: np.ndarray, valid: np.ndarray, pairs: Sequence[tuple[int, int]], data: Data) -> None:
    """Exchange rows (and validity) of left/right pairs in place (after a mirror). ``pairs`` are data set landmark
    indices; an item serving a subset (``data["landmark_ids"]``, a patch) has them at its own rows. A mirrored
    item that serves one side of a pair without the other (a patch per landmark), or one channel per landmark
    (stacked patches), cannot be relabelled: refused (its left landmark would be trained on a right one's look)."""
    ids = data.get("landmark_ids")
    rows = {int(i): r for r, i in enumerate(ids)} if ids is not None else {r: r for r in range(len(lm))}
    for a, b in pairs:
        if a in rows and b in rows and not data.get("per_channel"):
            ra, rb = rows[a], rows[b]
            lm[[ra, rb]], valid[[ra, rb]] = lm[[rb, ra]], valid[[rb, ra]]
        elif a in rows or b in rows:
            what = "one patch per landmark, as channels" if data.get("per_channel") else \
                f"landmark {a if a in rows else b} without its left/right partner {b if a in rows else a}"
            raise ValueError(f"a mirror (flip_prob > 0) of an item serving {what} cannot swap left and right: set "
                             "flip_prob: 0 for this method (its patch stages), or use a whole-image method")


# ------------------------------------------------------------------------------------- augmentation
class _LandmarkTransform(RandomizableTransform):
    """Base: a random geometric transform of a landmark dict; the MONAI inner transform shares ``self.R``."""

    inner: Randomizable | None = None

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        if self.inner is not None:
            self.inner.set_random_state(state=self.R)
        return self


@dataclass
class SpatialParams:
    """One draw of :class:`RandSpatialLandmarksd` for an image of ``size`` (px, (x, y[, z])).

    flip: mirror ``x_axis -> size - 1 - x_axis`` (applied first).
    affine: ``(D+1, D+1)`` MONAI matrix in centred px, output -> input (``in_c = A @ out_c``), or None.
    field: elastic displacement at control points ``(D, *coarse)`` px, or None; node ``k`` of axis ``a``
        lies at index ``k * (size[a] - 1) / (coarse[a] - 1)``; ``d(o)`` is its multilinear interpolation.
    """

    size: tuple[int, ...]
    flip: bool = False
    flip_axis: int = 0
    affine: np.ndarray | None = None
    field: np.ndarray | None = None

    @property
    def identity(self) -> bool:
        """True when nothing moves (no flip, affine or elastic drawn)."""
        return not self.flip and self.affine is None and self.field is None

    def matrix(self) -> np.ndarray:
        """``M = F @ A`` (D+1, D+1), centred px, output -> input: the flip (a sign in centred px) after ``A``."""
        d = len(self.size)
        m = np.eye(d + 1) if self.affine is None else np.asarray(self.affine, dtype=np.float64)
        if self.flip:
            m = m.copy()
            m[self.flip_axis] *= -1.0
        return m

    def control_points(self) -> np.ndarray:
        """Control-grid node positions ``(D, *coarse)`` in centred px (2 nodes per axis without elastic)."""
        size = np.asarray(self.size, dtype=np.float64)
        coarse = (2,) * len(self.size) if self.field is None else self.field.shape[1:]
        axes = [np.linspace(0.0, n - 1, k) - (n - 1) / 2 for n, k in zip(size, coarse)]
        return np.stack(np.meshgrid(*axes, indexing="ij"))

    def displacement(self, points: np.ndarray) -> np.ndarray:
        """``d(o)`` (N, D) px at output indices ``points`` (N, D), multilinear between control points
        (constant beyond the grid); zeros without elastic."""
        o = np.array(points, dtype=np.float64, ndmin=2)
        if self.field is None:
            return np.zeros_like(o)
        scale = (np.asarray(self.field.shape[1:]) - 1) / np.maximum(np.asarray(self.size) - 1, 1)
        q = (o * scale).T
        return np.stack([map_coordinates(f, q, order=1, mode="nearest") for f in self.field], axis=1)


class RandSpatialLandmarksd(_LandmarkTransform):
    """Random flip + affine + elastic deformation in ONE resampling pass (MONAI ``Resample``, bilinear).

    Composition (centred px, ``c = (size - 1) / 2``): output pixel ``o`` samples the input at
    ``T(o) = F A (o + d(o))``: first the elastic displacement ``d`` (px), then the MONAI affine ``A``
    (``RandAffineGrid``: rotation, shear, translation, scale), then the flip ``F`` (a sign on
    ``flip_axis``). This equals applying flip -> affine -> elastic one after the other, but interpolates
    once. Because ``d`` is multilinear between control points and ``F A`` is affine, ``T`` at the control
    points upsampled multilinearly (``align_corners=True``) is ``T`` at every pixel: the float32 sampling
    grid costs one small interpolation.

    Landmarks: a point ``p`` (px) moves to the ``o`` solving ``T(o) = p``: ``q = A^-1 F p`` exactly, then
    ``o + d(o) = q`` by fixed-point iteration ``o <- q - d(o)`` (a contraction while ``|grad d| < 1``).
    A point whose residual stays above ``tol`` px becomes invalid (NaN). That covers folds: the iteration
    only converges where the spectral radius of ``grad d`` is below 1, where ``det(I + grad d) > 0``, so a
    point on a fold (``det <= 0``) never converges. After a flip, ``left_right_pairs`` rows (and
    validity) are exchanged.

    Ranges (as MONAI ``RandAffine``): rotation ``+-rotation_deg`` degrees (one angle in 2D, one per axis in
    3D), scale ``1 +- scale``, translation ``+-translation_frac * size`` px per axis, shear ``+-shear``
    (MONAI shear factors). Elastic: Gaussian-smoothed white noise on a control grid of spacing
    ``max(1, sigma / 4)`` px (smoothing ``sigma = elastic_sigma_frac * min(size)`` px), scaled so that the
    RMS of the dense field is uniform in ``[0, elastic_magnitude_frac * min(size)]`` px. Each part is drawn
    with its own probability; ``ndim`` may be None when ``affine_prob == 0``.
    """

    def __init__(self, ndim: int | None, left_right_pairs: Sequence[tuple[int, int]] = (), *,
                 flip_prob: float = 0.0, flip_axis: int = 0,
                 affine_prob: float = 1.0, rotation_deg: float = 10.0, scale: float = 0.1,
                 translation_frac: float = 0.05, shear: float = 0.0,
                 elastic_prob: float = 0.0, elastic_sigma_frac: float = 0.1, elastic_magnitude_frac: float = 0.02,
                 padding_mode: str = "zeros", iterations: int = 50, tol: float = 1e-3) -> None:
        super().__init__(prob=1.0)
        ranges = {"flip_prob": (flip_prob, 0, 1), "affine_prob": (affine_prob, 0, 1), "elastic_prob": (elastic_prob, 0, 1),
                  "rotation_deg": (rotation_deg, 0, 180), "scale": (scale, 0, 0.999), "shear": (shear, 0, 1),
                  "translation_frac": (translation_frac, 0, 0.5), "elastic_sigma_frac": (elastic_sigma_frac, 1e-6, 1),
                  "elastic_magnitude_frac": (elastic_magnitude_frac, 0, 0.5)}
        bad = [f"{k}={v!r} (allowed [{lo:g}, {hi:g}])" for k, (v, lo, hi) in ranges.items()
               if not (isinstance(v, (int, float)) and lo <= v <= hi)]
        if bad:
            raise ValueError(f"augmentation ranges out of bounds: {', '.join(bad)}")
        self.pairs = cast("list[tuple[int, int]]", [tuple(p) for p in left_right_pairs])
        self.flip_prob, self.flip_axis = flip_prob, flip_axis
        self.affine_prob, self.translation_frac = affine_prob, translation_frac
        self.elastic_prob = elastic_prob
        self.sigma_frac, self.magnitude_frac = elastic_sigma_frac, elastic_magnitude_frac
        self.iterations, self.tol = iterations, tol
        self.affine_grid: RandAffineGrid | None = None  # draws from self.R (see _LandmarkTransform)
        if affine_prob > 0:
            if ndim not in (2, 3):
                raise ValueError(f"ndim must be 2 or 3 with an affine part, got {ndim}")
            rot = float(np.deg2rad(rotation_deg))
            self.affine_grid = RandAffineGrid(rotate_range=(rot,) if ndim == 2 else (rot,) * 3,
                                              scale_range=(scale,) * ndim,
                                              shear_range=(shear,) * (2 if ndim == 2 else 6) if shear else None,
                                              # MONAI's DtypeLike hint omits torch dtypes, which it takes
                                              dtype=torch.float64, lazy=True)  # type: ignore[arg-type]
        self.inner = self.affine_grid
        # MONAI defaults to float64: 2x slower, no gain here (its DtypeLike hint omits torch dtypes, which it takes)
        self.resampler = Resample(mode="bilinear", padding_mode=padding_mode, norm_coords=True,
                                  dtype=torch.float32)  # type: ignore[arg-type]
        self.params: SpatialParams | None = None  # the last draw
        self.set_random_state(state=self.R)

    # ------------------------------------------------------------------ random draws
    def randomize(self, data: Sequence[int]) -> None:
        """Draw flip, affine and elastic parameters for the spatial size ``data`` (px) -> ``self.params``."""
        size = tuple(int(n) for n in data)
        p = SpatialParams(size, flip_axis=self.flip_axis)
        if self.flip_prob > 0:
            p.flip = bool(self.R.rand() < self.flip_prob)
        if self.affine_grid is not None and self.R.rand() < self.affine_prob:
            self.affine_grid.translate_range = tuple(float(self.translation_frac * n) for n in size)
            self.affine_grid(spatial_size=size, randomize=True, lazy=True)  # lazy: the matrix only, no grid
            p.affine = np.asarray(convert_to_numpy(self.affine_grid.get_transformation_matrix()), dtype=np.float64)
        if self.elastic_prob > 0 and self.R.rand() < self.elastic_prob:
            p.field = self.random_field(size)
        self.params = p

    def random_field(self, size: Sequence[int]) -> np.ndarray:
        """A random displacement at control points ``(D, *coarse)`` px, float64 (see :class:`SpatialParams`)."""
        size_a = np.asarray(size)
        sigma = self.sigma_frac * size_a.min()
        step = max(1.0, sigma / 4.0)  # control-grid spacing (px): >= 4 nodes per sigma
        coarse = np.maximum(2, np.ceil((size_a - 1) / step).astype(int) + 1)
        noise = self.R.standard_normal((len(size), *coarse))
        sig_c = sigma * (coarse - 1) / np.maximum(size_a - 1, 1)
        noise = gaussian_filter(noise, (0, *sig_c), mode="reflect")
        rms = np.sqrt(dense_mean_square(noise, size)) + 1e-12
        return noise * (self.R.uniform(0.0, self.magnitude_frac * size_a.min()) / rms)

    # ------------------------------------------------------------------ deterministic application
    def __call__(self, data: Data) -> Data:
        self.randomize(data["image"].shape[1:])
        assert self.params is not None  # randomize() always sets it
        return self.apply(data, self.params)

    def apply(self, data: Data, params: SpatialParams) -> Data:
        """Apply a given draw: resample the image once, move the landmarks by the exact inverse."""
        if params.identity:
            return data
        if params.affine is None and params.field is None:  # a pure flip: exact, no interpolation
            image = torch.flip(data["image"], dims=(1 + params.flip_axis,))
        else:
            image = self.resampler(data["image"], self.sampling_grid(params))
        lm, ok = self.invert(params, data["landmarks"])
        valid = np.asarray(data["valid"], dtype=bool) & ok
        if params.flip:
            _swap_pairs(lm, valid, self.pairs, data)
        return mark_outside({**data, "image": _plain(image), "landmarks": lm, "valid": valid})

    @staticmethod
    def sampling_grid(params: SpatialParams) -> torch.Tensor:
        """``T(o)`` for every output pixel: ``(D, *size)`` float32, centred input px (MONAI ``Resample``)."""
        d = len(params.size)
        m = torch.as_tensor(params.matrix(), dtype=torch.float64)
        if params.field is None:  # affine: sum of D broadcast ramps
            axes = [torch.arange(n, dtype=torch.float32) - (n - 1) / 2 for n in params.size]
            grid = m[:d, d].float().reshape(d, *([1] * d)).expand(d, *params.size).clone()
            for a, ramp in enumerate(axes):
                shape = [1] * d
                shape[a] = -1
                grid += m[:d, a].float().reshape(d, *([1] * d)) * ramp.reshape(shape)
            return grid
        pts = torch.as_tensor(params.control_points() + params.field)  # float64, control grid
        ctrl = (m[:d, :d] @ pts.reshape(d, -1) + m[:d, d:]).reshape(pts.shape)  # torch, not numpy BLAS threads
        mode = "bilinear" if d == 2 else "trilinear"
        return torch.nn.functional.interpolate(ctrl.float()[None], size=params.size, mode=mode,
                                               align_corners=True)[0]

    def invert(self, params: SpatialParams, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Output positions ``o`` (N, D) px with ``T(o) = points`` and a mask of successful inversions
        (rows NaN and False where the elastic fixed point did not converge or the map folds)."""
        p = np.array(points, dtype=np.float64, ndmin=2)
        c = (np.asarray(params.size, dtype=np.float64) - 1) / 2
        inv = np.linalg.inv(params.matrix())
        q = (p - c) @ inv[:-1, :-1].T + inv[:-1, -1] + c
        ok = ~np.isnan(q).any(axis=1)
        if params.field is None or not ok.any():
            return q, ok
        qs = q[ok]
        o = qs.copy()
        for _ in range(self.iterations):
            o_new = qs - params.displacement(o)
            step = np.abs(o_new - o).max()
            o = o_new
            if step < 1e-3 * self.tol:
                break
        good = np.linalg.norm(o + params.displacement(o) - qs, axis=1) <= self.tol
        o[~good] = np.nan
        q[ok] = o
        ok[ok] = good
        return q, ok


def dense_mean_square(field: np.ndarray, size: Sequence[int]) -> float:
    """Mean over the dense grid ``size`` (px) of ``|d|^2`` for control-point displacements ``field``
    ``(D, *coarse)``, upsampled multilinearly (``align_corners=True``), without building the dense field:
    per axis the (tridiagonal) Gram matrix ``W^T W`` of the 1D linear-interpolation weights ``W``."""
    f = torch.as_tensor(field, dtype=torch.float64)  # torch: obeys torch's thread count (numpy BLAS may not)
    g = f
    for axis, (n, k) in enumerate(zip(size, field.shape[1:])):
        pos = np.arange(n) * (k - 1) / max(n - 1, 1)
        i0 = np.clip(np.floor(pos).astype(int), 0, k - 2)
        w = pos - i0
        diag = np.bincount(i0, (1 - w) ** 2, minlength=k) + np.bincount(i0 + 1, w ** 2, minlength=k)
        off = np.bincount(i0, (1 - w) * w, minlength=k - 1)[:k - 1]
        gram = torch.as_tensor(np.diag(diag) + np.diag(off, 1) + np.diag(off, -1))
        g = torch.movedim(torch.tensordot(gram, g, dims=([1], [axis + 1])), 0, axis + 1)
    return float(torch.sum(f * g)) / float(np.prod(size))


class RandAffineLandmarksd(RandSpatialLandmarksd):
    """Random rotation/scale/translation/shear only (one resampling); see :class:`RandSpatialLandmarksd`.

    MONAI's grid maps an OUTPUT pixel to the INPUT: ``in - c = A @ (out - c)`` with ``c = (size - 1) / 2``
    (pixels, about the image centre), so landmarks move by ``out = A^-1 @ (in - c) + c``.
    """

    def __init__(self, ndim: int, prob: float = 1.0, rotation_deg: float = 10.0, scale: float = 0.1,
                 translation_frac: float = 0.05, shear: float = 0.0, padding_mode: str = "zeros") -> None:
        super().__init__(ndim, affine_prob=prob, rotation_deg=rotation_deg, scale=scale,
                         translation_frac=translation_frac, shear=shear, padding_mode=padding_mode)


class RandElasticLandmarksd(RandSpatialLandmarksd):
    """Random smooth elastic deformation only (one resampling); see :class:`RandSpatialLandmarksd`.

    The output pixel ``o`` samples the input at ``o + d(o)`` (``d`` in px, smooth), so a landmark ``p``
    moves to the solution of ``o + d(o) = p`` (fixed-point iteration; invalid where it fails).
    """

    def __init__(self, prob: float = 1.0, sigma_frac: float = 0.1, magnitude_frac: float = 0.02,
                 padding_mode: str = "zeros", iterations: int = 50, tol: float = 1e-3) -> None:
        super().__init__(None, affine_prob=0.0, elastic_prob=prob, elastic_sigma_frac=sigma_frac,
                         elastic_magnitude_frac=magnitude_frac, padding_mode=padding_mode,
                         iterations=iterations, tol=tol)


class RandFlipLandmarksd(_LandmarkTransform):
    """Random flip along ``axis`` (MONAI ``Flip``): ``x -> size - 1 - x``, then left/right pairs swap.

    ``left_right_pairs`` are index pairs (see :func:`left_right_index_pairs`); after a mirror, the
    point annotated as "left" is anatomically the right one, so rows (and validity) are exchanged.
    """

    def __init__(self, prob: float = 0.5, axis: int = 0, left_right_pairs: Sequence[tuple[int, int]] = ()) -> None:
        super().__init__(prob)
        self.axis, self.pairs = axis, cast("list[tuple[int, int]]", [tuple(p) for p in left_right_pairs])
        self.flip = Flip(spatial_axis=axis)

    def __call__(self, data: Data) -> Data:
        self.randomize(None)
        if not self._do_transform:
            return data
        lm = np.array(data["landmarks"], dtype=np.float64)
        valid = np.array(data["valid"], dtype=bool)
        lm[:, self.axis] = data["image"].shape[1 + self.axis] - 1 - lm[:, self.axis]
        _swap_pairs(lm, valid, self.pairs, data)
        return {**data, "image": _plain(self.flip(data["image"])), "landmarks": lm, "valid": valid}


def intensity_transforms(prob: float = 0.5, gamma: tuple[float, float] = (0.7, 1.5), bias_coeff: float = 0.2,
                         noise_std: float = 0.05, scale: float = 0.1) -> list[MapTransform]:
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
                       intensity: bool = True, intensity_prob: float = 0.5, blur_sigma: float = 0.0,
                       padding_mode: str = "zeros", seed: int | None = 0) -> Compose:
    """Training augmentation for landmark dicts: (flip + affine + elastic in one resampling) -> blur -> intensity.

    ``blur_sigma`` > 0 blurs the image (landmarks untouched) with a Gaussian of sigma uniform in
    ``[min(0.5, blur_sigma), blur_sigma]`` px per axis, with probability ``intensity_prob``: an image blurrier than
    the training images (a template averaged over more subjects, a coarser scan).

    The geometric part is one :class:`RandSpatialLandmarksd` (output pixel ``o`` samples the input at
    ``F A (o + d(o))``; landmarks by the exact inverse, invalid when leaving the grid unless the item's
    ``keep_outside``). The returned MONAI Compose is ``Randomizable``: ``set_random_state(seed)`` reseeds
    every stage (the data loader does this per worker).
    """
    stages: list[Transform] = []
    if flip_prob > 0 or affine_prob > 0 or elastic:
        stages.append(RandSpatialLandmarksd(
            ndim, left_right_pairs, flip_prob=flip_prob, flip_axis=flip_axis, affine_prob=affine_prob,
            rotation_deg=rotation_deg, scale=scale, translation_frac=translation_frac, shear=shear,
            elastic_prob=elastic_prob if elastic else 0.0, elastic_sigma_frac=elastic_sigma_frac,
            elastic_magnitude_frac=elastic_magnitude_frac, padding_mode=padding_mode))
    if blur_sigma > 0:
        sigma = (min(0.5, float(blur_sigma)), float(blur_sigma))
        stages.append(RandGaussianSmoothd("image", sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=intensity_prob))
    if intensity:
        stages.extend(intensity_transforms(intensity_prob))
    compose = Compose(stages)
    if seed is not None:
        compose.set_random_state(seed)
    return compose
