"""Grids in world space and resampling onto them: where a method looks at an image.

A :class:`Grid` is a pixel grid placed in world space: ``size`` in pixels ``(x, y[, z])`` and a
:class:`~lmlib.data.geometry.Geometry` (origin = world mm of index 0, spacing in mm/px, direction).
Every view a method uses (the whole image resized, a crop, a patch around a landmark) is a Grid, and
:func:`resample` puts any image onto any Grid with SimpleITK (Gaussian anti-aliasing when the grid is
coarser than the source; a small grid, a patch, in NumPy/SciPy with SimpleITK's values). Landmarks stay in
world mm; ``grid.world_to_index`` / ``grid.index_to_world`` (or ``grid.affine()``) are the one path between a
network's pixel indices and world mm.

:func:`preprocess` (the whole image onto the network grid + intensity normalisation) is one case of
Grid + resample.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeAlias

import numpy as np
import SimpleITK as sitk
from monai.transforms import NormalizeIntensity, ScaleIntensityRangePercentiles
from monai.utils import convert_to_numpy
from scipy import ndimage, special

from lmlib.data.geometry import Geometry
from lmlib.data.sample import Sample

IntVector: TypeAlias = Sequence[int] | np.ndarray  # sizes and indices, one per axis: a sequence or a 1-D array
FloatVector: TypeAlias = Sequence[float] | np.ndarray  # positions and spacings (mm), one per axis


# ---------------------------------------------------------------------------------------------- Grid
@dataclass(frozen=True, eq=False)
class Grid:
    """A pixel grid in world space: ``size`` (px, ``(x, y[, z])``) + geometry (origin, spacing, direction, mm).

    ``world = origin + direction @ (spacing * index)``; index 0 is the centre of the first pixel, so the
    grid covers indices ``[-0.5, size - 0.5]`` on each axis (pixel edges).
    """

    size: tuple[int, ...]
    geometry: Geometry

    def __post_init__(self) -> None:
        size = tuple(int(s) for s in np.asarray(self.size).reshape(-1))
        if len(size) != self.geometry.ndim:
            raise ValueError(f"size {size} does not match a {self.geometry.ndim}D geometry")
        if min(size) < 1:
            raise ValueError(f"grid size must be >= 1 px on every axis, got {size}")
        object.__setattr__(self, "size", size)

    # ----------------------------------------------------------------------------- basic properties
    @property
    def ndim(self) -> int:
        return self.geometry.ndim

    @property
    def spacing(self) -> np.ndarray:
        """(D,) mm per pixel."""
        return self.geometry.spacing

    @property
    def origin(self) -> np.ndarray:
        """(D,) world mm of index 0."""
        return self.geometry.origin

    @property
    def direction(self) -> np.ndarray:
        """(D, D) direction cosines, columns = grid axes in world space."""
        return self.geometry.direction

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Grid):
            return NotImplemented
        return (self.size == other.size and np.array_equal(self.spacing, other.spacing)
                and np.array_equal(self.origin, other.origin) and np.array_equal(self.direction, other.direction))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"Grid(size={self.size}, spacing={np.round(self.spacing, 6).tolist()}, "
                f"origin={np.round(self.origin, 6).tolist()}, direction={np.round(self.direction, 6).tolist()})")

    def index_to_world(self, index: np.ndarray) -> np.ndarray:
        """Continuous index (N, D) ``(x, y[, z])`` px -> world mm (N, D)."""
        return self.geometry.index_to_world(index)

    def world_to_index(self, world: np.ndarray) -> np.ndarray:
        """World mm (N, D) -> continuous index (N, D) ``(x, y[, z])`` px."""
        return self.geometry.world_to_index(world)

    def affine(self) -> np.ndarray:
        """(D, D+1) float64 ``A`` with ``world = A[:, :D] @ idx + A[:, D]`` (idx in px, world in mm)."""
        g = self.geometry
        return np.concatenate([g.direction * g.spacing[None, :], g.origin[:, None]], axis=1)

    def contains(self, index: np.ndarray) -> np.ndarray:
        """(N,) bool: indices (N, D) inside the pixel edges ``[-0.5, size - 0.5]``; False for NaN rows."""
        idx = np.atleast_2d(np.asarray(index, dtype=np.float64))
        with np.errstate(invalid="ignore"):
            return np.all((idx >= -0.5) & (idx <= np.asarray(self.size) - 0.5), axis=1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (lists of floats/ints)."""
        return {"size": list(self.size), "spacing": self.spacing.tolist(), "origin": self.origin.tolist(),
                "direction": self.direction.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Grid:
        return cls(tuple(d["size"]), Geometry(np.asarray(d["spacing"], dtype=np.float64),
                                              np.asarray(d["origin"], dtype=np.float64),
                                              np.asarray(d["direction"], dtype=np.float64)))

    # --------------------------------------------------------------------------------- constructors
    @classmethod
    def of_image(cls, image: Sample | sitk.Image | Grid | SourceImage) -> Grid:
        """The image's own grid (a Sample, a SimpleITK image, a :class:`SourceImage` or a Grid)."""
        if isinstance(image, Grid):
            return image
        if isinstance(image, Sample):
            return cls(image.size, image.geometry)
        if isinstance(image, SourceImage):
            return image.grid
        if isinstance(image, sitk.Image):
            return cls(tuple(image.GetSize()), Geometry.from_sitk(image))
        raise TypeError(f"cannot take a grid of {type(image).__name__}")

    @classmethod
    def whole(cls, image: Sample | sitk.Image | Grid | SourceImage, size: IntVector | None = None,
              spacing: FloatVector | float | None = None) -> Grid:
        """The whole field of view of ``image`` at ``size`` px or at ``spacing`` mm (one of them).

        - ``size``: spacing becomes ``spacing * old_size / size`` (anisotropic if aspect ratios differ).
        - ``spacing``: size becomes ``max(1, round(old_size * old_spacing / spacing))``; the field of view
          is kept exactly, so the realised spacing may differ from ``spacing`` (stored exactly here).
        Pixel *edges* stay aligned (as :meth:`Geometry.scaled`): the outer edges of both grids coincide.
        Neither: the image's own grid.
        """
        src = cls.of_image(image)
        if size is not None and spacing is not None:
            raise ValueError("Grid.whole takes size or spacing, not both (then use centre_crop_or_pad)")
        old = np.asarray(src.size, dtype=np.float64)
        if spacing is not None:
            sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (src.ndim,))
            new = np.maximum(1, np.round(old * src.spacing / sp)).astype(int)
        elif size is not None:
            new = np.asarray(size, dtype=int).reshape(src.ndim)
        else:
            return src
        if tuple(new) == src.size:
            return src
        return cls(tuple(int(n) for n in new), src.geometry.scaled(new / old))

    def padded_to_multiple(self, multiple: int) -> Grid:
        """Size rounded up to a multiple of ``multiple`` px on every axis (padding at the high end; origin kept)."""
        m = int(multiple)
        if m <= 1:
            return self
        size = tuple(int(-(-n // m) * m) for n in self.size)
        return Grid(size, self.geometry)

    def crop(self, start_index: IntVector, size: IntVector) -> Grid:
        """Integer sub-grid: new index 0 = old index ``start_index`` (may be negative / extend past the end)."""
        start = np.asarray(start_index, dtype=np.int64).reshape(self.ndim)
        origin = self.index_to_world(start[None].astype(np.float64))[0]
        return Grid(tuple(int(s) for s in size), Geometry(self.spacing, origin, self.direction))

    def centre_crop_or_pad(self, size: IntVector) -> Grid:
        """Centred sub-/super-grid of ``size`` px: new index 0 = old index ``(old_size - size) // 2``."""
        size_a = np.asarray(size, dtype=np.int64).reshape(self.ndim)
        return self.crop((np.asarray(self.size) - size_a) // 2, size_a)

    def random_crop(self, size: IntVector, rng: np.random.Generator) -> Grid:
        """Integer crop of ``size`` px placed uniformly at random inside the grid (start drawn from ``rng``).

        On an axis where ``size`` exceeds the grid, the crop is centred (extends beyond both sides
        equally, as :meth:`centre_crop_or_pad`).
        """
        size_a = np.asarray(size, dtype=np.int64).reshape(self.ndim)
        old = np.asarray(self.size, dtype=np.int64)
        start = np.array([rng.integers(0, n - s + 1) if s <= n else (n - s) // 2 for n, s in zip(old, size_a)])
        return self.crop(start, size_a)

    @classmethod
    def centred(cls, centre_mm: FloatVector, size: IntVector, spacing: FloatVector | float,
                direction: np.ndarray | None = None) -> Grid:
        """A grid of ``size`` px at ``spacing`` mm whose centre (index ``(size - 1) / 2``) is at ``centre_mm``."""
        centre = np.asarray(centre_mm, dtype=np.float64).reshape(-1)
        dim = centre.size
        size_a = np.asarray(size, dtype=np.int64).reshape(dim)
        sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (dim,)).copy()
        d = np.eye(dim) if direction is None else np.asarray(direction, dtype=np.float64).reshape(dim, dim)
        origin = centre - d @ (sp * (size_a - 1) / 2.0)
        return cls(tuple(int(s) for s in size_a), Geometry(sp, origin, d))


# ------------------------------------------------------------------------------------- resampling
INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline,
                 "lanczos": sitk.sitkLanczosWindowedSinc}

DISCRETE_GAUSSIAN_MAX_PX = 8.0  # wider Gaussians use SimpleITK's recursive filter


def antialias_sigma_mm(source: Grid, grid: Grid) -> np.ndarray:
    """Gaussian sigma (mm, along each source axis) that anti-aliases sampling ``source`` onto ``grid``.

    As MONAI/skimage: ``sigma = max(0, (s_new / s_old - 1) / 2)`` source pixels, where ``s_new`` is the
    grid's step along the source axis (the norm of that row of the grid steps expressed in source
    axes: equal to the grid spacing when the axes are aligned, also for oblique grids a fair measure).
    """
    steps = source.direction.T @ grid.direction @ np.diag(grid.spacing)  # grid steps in source axes (mm)
    s_new = np.linalg.norm(steps, axis=1)
    sigma_px = np.maximum(0.0, (s_new / source.spacing - 1.0) / 2.0)
    return sigma_px * source.spacing


REGION_FRACTION = 0.25  # grids needing less than this fraction of the source smooth only their region


def shrink_factors(source: Grid, grid: Grid) -> tuple[int, ...]:
    """Integer factors (per source axis) by which ``source`` can be block-averaged before it is sampled on
    ``grid``: half the grid's step in source pixels, rounded down (1 = no shrinking). The shrunk copy stays
    at least twice as fine as the grid, so linear interpolation on it stays close to sampling the full
    resolution; a hand radiograph of 1350 x 1950 px onto a 240 x 272 grid shrinks by 3."""
    steps = source.direction.T @ grid.direction @ np.diag(grid.spacing)
    step_px = np.linalg.norm(steps, axis=1) / source.spacing
    return tuple(int(max(1, np.floor(v / 2.0 + 1e-9))) for v in step_px)


def _block_bounds(region: tuple[np.ndarray, np.ndarray], k: np.ndarray, size: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """(start, end) in source px of ``region`` (start, size) widened to whole blocks of ``k`` px, the same blocks as
    the whole image's shrunk copy (its partial last block left out); None when no whole block remains."""
    lo, hi, ok = _blocks(region[0], region[0] + region[1], k, size)
    return (lo, hi) if ok else None


def _blocks(start: np.ndarray, end: np.ndarray, k: np.ndarray, size: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_block_bounds` of regions ``start:end`` (px, (..., D)): (start, end, whether a whole block remains)."""
    lo, hi = start // k * k, np.minimum(-(-end // k) * k, size // k * k)
    return lo, hi, np.all(hi - lo >= k, axis=-1)


def _rest_sigma(sigma_mm: np.ndarray, k: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """What of the anti-aliasing Gaussian ``sigma_mm`` (mm) is left to apply after block averages of ``k`` px (see
    :meth:`SourceImage.for_grid`)."""
    k2 = np.square(np.asarray(k, dtype=np.float64))
    done = ((k2 - 1.0) / 12.0 + k2 / 12.0) * np.square(spacing)  # mm^2 per source axis
    return np.sqrt(np.maximum(0.0, np.square(sigma_mm) - done))


class SourceImage:
    """A SimpleITK image (float32) plus its Gaussian-smoothed copies, so that many grids at the same
    spacing (e.g. whole-image crops) smooth the source only once. A grid that needs only a small region
    of the source (a patch) smooths that region alone, uncached: patches at many spacings (one per
    landmark) then cost neither a full-volume filter each nor a cached full-volume copy each (3D: 34 MB
    per copy, per image and spacing). Built from a Sample, an sitk image, or an array ``(x, y[, z])`` +
    Geometry."""

    def __init__(self, image: Sample | sitk.Image | np.ndarray, geometry: Geometry | None = None,
                 cache: bool = True) -> None:
        if isinstance(image, Sample):
            img = image.to_sitk()
        elif isinstance(image, sitk.Image):
            img = image
        else:
            if geometry is None:
                raise ValueError("an array needs its geometry")
            img = geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(image, np.float32).T)))
        if img.GetPixelID() != sitk.sitkFloat32:
            img = sitk.Cast(img, sitk.sitkFloat32)
        self.image = img
        self.grid = Grid.of_image(img)
        self.cache = cache
        self._smoothed: dict[tuple[float, ...], sitk.Image] = {}
        self._levels: dict[tuple[int, ...], SourceImage] = {}
        self._array: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        """The source's pixels ``(x, y[, z])`` (a read-only view of the SimpleITK buffer, no copy)."""
        if self._array is None:
            self._array = sitk.GetArrayViewFromImage(self.image).T
        return self._array

    def for_grid(self, grid: Grid) -> tuple[SourceImage, np.ndarray]:
        """(source to sample ``grid`` from, the anti-aliasing sigma in mm still to apply to it).

        For a large grid much coarser than the source, a block-averaged copy (SimpleITK ``BinShrink`` by
        :func:`shrink_factors`, cached like the smoothed copies) replaces the full resolution, and only the
        rest of the Gaussian's variance is applied to it: a box of ``k`` pixels has variance
        ``(k^2 - 1) / 12`` source px^2, and linear interpolation on the shrunk copy adds up to ``k^2 / 6``
        on average, of which half is counted (the closest to the full-resolution result on white noise and
        on radiographs; ``tests/test_grids.py`` holds it to 1 % of the image's spread). A large radiograph is
        then never smoothed at full resolution for a whole-image grid. A small grid (a patch, see
        :meth:`smoothed`) block-averages only its own region, uncached, on the same blocks as the whole copy
        (aligned to ``k``): a hand radiograph's 37 per-landmark patches at their own spacings cost neither a
        full-resolution filter each nor a cached copy per spacing."""
        sigma = antialias_sigma_mm(self.grid, grid)
        k = shrink_factors(self.grid, grid)
        if max(k) == 1:
            return self, sigma
        rest = _rest_sigma(sigma, np.asarray(k), self.grid.spacing)
        region = self._region(grid, sigma)
        blocks = None if region is None else _block_bounds(region, np.asarray(k), np.asarray(self.grid.size))
        if blocks is not None:
            lo, hi = blocks
            part = sitk.RegionOfInterest(self.image, (hi - lo).tolist(), lo.tolist())
            return SourceImage(sitk.BinShrink(part, list(k)), cache=False), rest
        level = self._levels.get(k)
        if level is None:
            level = SourceImage(sitk.BinShrink(self.image, list(k)), cache=self.cache)
            if self.cache:
                self._levels[k] = level
        return level, rest

    def smoothed(self, sigma_mm: np.ndarray, grid: Grid | None = None) -> sitk.Image:
        """The source smoothed with a Gaussian of ``sigma_mm`` (mm, per source axis); cached per sigma.
        With ``grid``: when that grid needs less than :data:`REGION_FRACTION` of the source, only its
        region plus a 4-sigma margin is smoothed (not cached; equal to the full smoothing inside the
        grid up to the kernel's truncation)."""
        sig = np.asarray(sigma_mm, dtype=np.float64)
        if not np.any(sig / self.grid.spacing > 1e-3):  # below 1/1000 px: nothing to do
            return self.image
        key = tuple(np.round(sig, 9).tolist())
        if key in self._smoothed:
            return self._smoothed[key]
        region = None if grid is None else self._region(grid, sig)
        if region is not None:
            return _gaussian(sitk.RegionOfInterest(self.image, region[1].tolist(), region[0].tolist()), sig,
                             self.grid.spacing)
        out = _gaussian(self.image, sig, self.grid.spacing)
        if self.cache:
            self._smoothed[key] = out
        return out

    def _region(self, grid: Grid, sigma_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(start, size) in source px of ``grid``'s bounding box plus a 4-sigma (+ 2 px) margin, clipped to
        the source; None when that is not small (>= REGION_FRACTION of the source) or empty."""
        lo, hi, ok = _regions(self, [grid], sigma_mm)
        return (lo[0], hi[0] - lo[0]) if ok[0] else None


@functools.lru_cache(maxsize=256)
def discrete_gaussian_kernel(variance_px: float, max_error: float = 1e-3, max_width: int = 4096) -> np.ndarray:
    """The 1-D kernel of SimpleITK's ``DiscreteGaussianImageFilter`` (ITK's ``GaussianOperator``: Lindeberg's
    discrete Gaussian ``exp(-t) I_n(t)``, ``t`` the variance in px^2), taps added until they hold
    ``1 - max_error`` of the mass, then normalised; symmetric, odd length. Cached (the patches of a stage share a
    few variances); read-only."""
    taps = [float(special.ive(0, variance_px)), float(special.ive(1, variance_px))]
    total = taps[0] + 2.0 * taps[1]
    while total < 1.0 - max_error:
        tap = float(special.ive(len(taps), variance_px))
        taps.append(tap)
        total += 2.0 * tap
        if tap <= 0.0 or len(taps) > max_width:
            break
    half = np.asarray(taps) / total
    kernel = np.concatenate([half[:0:-1], half])
    kernel.flags.writeable = False
    return kernel


@dataclass(frozen=True)
class _PatchPlan:
    """How one small grid is sampled (:func:`_resample_patch`): the source block ``lo:hi`` (px, block-averaged by
    ``k`` when any is > 1), the Gaussian still to apply (``sigma_px`` of the block, when ``smooth``), and the map from
    source px to block px (``(px - offset) / scale``)."""

    lo: np.ndarray
    hi: np.ndarray
    k: np.ndarray
    sigma_px: np.ndarray
    smooth: bool
    offset: np.ndarray
    scale: np.ndarray

    def part(self, src: SourceImage) -> np.ndarray:
        """The source block (float64), block-averaged, not yet smoothed."""
        block = src.array[tuple(slice(a, b) for a, b in zip(self.lo, self.hi))].astype(np.float64)
        if self.k.max() == 1:
            return block
        shape = [v for n, f in zip(block.shape, self.k) for v in (n // f, f)]
        return block.reshape(shape).mean(axis=tuple(range(1, 2 * len(self.k), 2)))

    def smoothed(self, part: np.ndarray, first_axis: int = 0) -> np.ndarray:
        """``part`` (its spatial axes from ``first_axis`` on) with the plan's Gaussian applied."""
        if self.smooth:
            for axis, s in enumerate(self.sigma_px):
                part = ndimage.correlate1d(part, discrete_gaussian_kernel(float(s) ** 2), axis=first_axis + axis,
                                           mode="nearest")
        return part


def _source_px(src: SourceImage, grids: Sequence[Grid], index: np.ndarray) -> np.ndarray:
    """Source px (N, P, D) of the points ``index`` (P, D) px of each of ``grids`` (one size, spacing and direction:
    they differ by their origins only, so the first grid's points are mapped once and shifted)."""
    first = src.grid.world_to_index(grids[0].index_to_world(index))
    if len(grids) == 1:
        return first[None]
    origins = src.grid.world_to_index(np.array([g.geometry.origin for g in grids], dtype=np.float64))
    return first[None] + (origins - origins[:1])[:, None]


def _regions(src: SourceImage, grids: Sequence[Grid], sigma_mm: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start (N, D), end (N, D), small (N,)) in source px of each grid's bounding box plus a 4-sigma (+ 2 px) margin,
    clipped to the source, for ``grids`` of one size, spacing and direction; ``small``: not empty and under
    :data:`REGION_FRACTION` of the source (:meth:`SourceImage._region`)."""
    first = grids[0]
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in first.size], indexing="ij")).reshape(first.ndim, -1).T
    idx = _source_px(src, grids, corners)  # (N, corners, D)
    margin = np.ceil(4.0 * sigma_mm / src.grid.spacing) + 2
    size = np.asarray(src.grid.size)
    lo = np.clip(np.floor(idx.min(axis=1) - margin), 0, size).astype(int)
    hi = np.clip(np.ceil(idx.max(axis=1) + margin) + 1, 0, size).astype(int)
    extent = hi - lo
    return lo, hi, np.all(extent >= 1, axis=1) & (np.prod(extent, axis=1) < REGION_FRACTION * np.prod(size))


def _patch_plans(src: SourceImage, grids: Sequence[Grid]) -> list[_PatchPlan | None]:
    """The plans of :func:`_resample_patch` for ``grids`` of one size, spacing and direction, or None for a grid
    where it does not apply (its region of the source is not small, or its Gaussian too wide). A grid's region: its
    bounding box plus a 4-sigma (+ 2 px) margin (:meth:`SourceImage._region`), widened to whole blocks of ``k`` px
    on the same blocks as the whole shrunk copy when the source is block-averaged (:meth:`SourceImage.for_grid`)."""
    first = grids[0]
    sigma = antialias_sigma_mm(src.grid, first)
    k = np.asarray(shrink_factors(src.grid, first))
    size, spacing = np.asarray(src.grid.size), src.grid.spacing
    lo, hi, ok = _regions(src, grids, sigma)
    if k.max() > 1:  # block averages on the same blocks as the whole shrunk copy
        lo, hi, whole = _blocks(lo, hi, k, size)
        ok &= whole
        sigma = _rest_sigma(sigma, k, spacing)
        offset, scale, smooth = lo + (k - 1) / 2.0, k.astype(np.float64), True
    else:
        offset, scale = lo.astype(np.float64), np.ones(len(k))
        smooth = bool(np.any(sigma / spacing > 1e-3))  # as SourceImage.smoothed: else the whole source
    sigma_px = sigma / (spacing * scale)
    if np.max(sigma_px) > DISCRETE_GAUSSIAN_MAX_PX:
        return [None] * len(grids)
    return [_PatchPlan(lo[i], hi[i], k, sigma_px, smooth, offset[i], scale) if ok[i] else None
            for i in range(len(grids))]


def _sample_parts(src: SourceImage, grids: Sequence[Grid], plans: Sequence[_PatchPlan], parts: np.ndarray,
                  default_value: float) -> list[np.ndarray]:
    """Linear interpolation of each grid's points in its smoothed block ``parts[i]`` (all of one shape), with
    SimpleITK's buffer test (points outside ``[-0.5, n - 0.5)`` of the source get ``default_value``): one call for
    all (the block's index a first, integer coordinate, which linear interpolation reproduces exactly)."""
    first = grids[0]
    index = np.indices(first.size).reshape(first.ndim, -1).T
    offset = np.array([p.offset for p in plans])[:, None]
    at = (_source_px(src, grids, index) - offset) / plans[0].scale  # (N, P, D) px of each block
    if plans[0].smooth:
        inside = np.all((at >= -0.5) & (at < np.asarray(parts.shape[1:]) - 0.5), axis=2)
    else:  # the block is the source itself there: the source's own buffer
        inside = np.all((at >= -0.5 - offset) & (at < np.asarray(src.grid.size) - offset - 0.5), axis=2)
    n, points = at.shape[:2]
    coords = np.concatenate([np.repeat(np.arange(n, dtype=np.float64), points)[:, None], at.reshape(-1, first.ndim)],
                            axis=1)
    values = ndimage.map_coordinates(parts.astype(np.float32), coords.T, order=1, mode="nearest", prefilter=False)
    values = values.reshape(n, points)
    values[~inside] = default_value
    return [v.reshape(first.size).astype(np.float32) for v in values]


def _resample_patch(src: SourceImage, grid: Grid, default_value: float) -> np.ndarray | None:
    """:func:`resample` (linear, anti-aliased) for a grid that needs only a small region of ``src`` (a patch), in
    NumPy/SciPy on that region, with SimpleITK's values (its discrete Gaussian kernel, block averages, linear
    interpolation and buffer test; ``tests/test_grids.py`` holds them to 1e-5). Why not SimpleITK here: a patch
    is a few hundred pixels, and the three filter calls it took (region, Gaussian, resample) cost far more in
    per-call overhead than in arithmetic: most of a per-landmark local stage's inference time (one patch per
    landmark). None when the grid is not small or its Gaussian is wider than :data:`DISCRETE_GAUSSIAN_MAX_PX`
    (the SimpleITK route then applies)."""
    plan = _patch_plans(src, [grid])[0]
    if plan is None:
        return None
    return _sample_parts(src, [grid], [plan], plan.smoothed(plan.part(src))[None], default_value)[0]


def resample_patches(source: Sample | sitk.Image | SourceImage, grids: Sequence[Grid],
                     default_value: float = 0.0) -> list[np.ndarray]:
    """:func:`resample` (linear, anti-aliased) of ``source`` on each of ``grids`` (e.g. one image's patches, one per
    landmark): float32 arrays ``(x, y[, z])``, the values of :func:`resample` on each. Grids of one size, spacing and
    direction are planned together, and those whose source blocks have one shape (away from the image's border)
    smoothed and interpolated together: one filter call per axis and one interpolation for all. Why: per patch, the
    calls' overhead, not their arithmetic, was most of a per-landmark stage's patch time."""
    src = source if isinstance(source, SourceImage) else SourceImage(source, cache=False)
    out: dict[int, np.ndarray] = {}
    kinds: dict[tuple[Any, ...], list[int]] = {}
    for i, grid in enumerate(grids):
        kinds.setdefault((tuple(grid.size), tuple(grid.spacing), tuple(np.ravel(grid.direction))), []).append(i)
    for members in kinds.values():
        blocks: dict[tuple[int, ...], list[tuple[int, _PatchPlan]]] = {}
        for i, plan in zip(members, _patch_plans(src, [grids[i] for i in members])):
            if plan is None:
                out[i] = resample(src, grids[i], default_value=default_value)
            else:
                blocks.setdefault(tuple(plan.hi - plan.lo), []).append((i, plan))
        for same in blocks.values():
            plans = [plan for _, plan in same]
            # the blocks stacked on a new first axis: each is smoothed along its own axes only, as alone
            parts = plans[0].smoothed(np.stack([plan.part(src) for plan in plans]), first_axis=1)
            for (i, _), patch in zip(same, _sample_parts(src, [grids[i] for i, _ in same], plans, parts,
                                                         default_value)):
                out[i] = patch
    return [out[i] for i in range(len(grids))]


def _gaussian(image: sitk.Image, sigma_mm: np.ndarray, spacing: np.ndarray) -> sitk.Image:
    """``image`` smoothed with a Gaussian of ``sigma_mm`` (mm per axis)."""
    if np.max(sigma_mm / spacing) <= DISCRETE_GAUSSIAN_MAX_PX:
        f = sitk.DiscreteGaussianImageFilter()
        f.SetVariance((sigma_mm ** 2).tolist())
        f.SetUseImageSpacing(True)
        f.SetMaximumError(1e-3)
        f.SetMaximumKernelWidth(4096)
        return f.Execute(image)
    # a wide discrete kernel overflows to NaN (seen at ~28 px): the recursive filter is exact there
    return sitk.SmoothingRecursiveGaussian(image, sigma_mm.tolist())


def resample(source: Sample | sitk.Image | SourceImage, grid: Grid, interpolation: str = "linear",
             default_value: float = 0.0, antialias: bool = True) -> np.ndarray:
    """Sample ``source`` on ``grid``: float32 array ``(x, y[, z])`` of ``grid.size``.

    SimpleITK ``Resample`` (identity transform, world mm). Points outside the source get
    ``default_value``. With ``antialias`` the source is first smoothed along each axis on which the grid
    is coarser (see :func:`antialias_sigma_mm`; block-averaged first when the grid is at least 4x coarser,
    see :meth:`SourceImage.for_grid`); pass a :class:`SourceImage` to reuse that smoothing. A small grid (a
    patch; linear, anti-aliased) is sampled in NumPy/SciPy with the same values (:func:`_resample_patch`).
    """
    src = source if isinstance(source, SourceImage) else SourceImage(source, cache=False)
    if antialias and interpolation == "linear":
        patch = _resample_patch(src, grid, default_value)
        if patch is not None:
            return patch
    if antialias:
        level, sigma = src.for_grid(grid)
        image = level.smoothed(sigma, grid)
    else:
        image = src.image
    g = grid.geometry
    out = sitk.Resample(image, list(grid.size), sitk.Transform(), INTERPOLATORS[interpolation], g.origin.tolist(),
                        g.spacing.tolist(), g.direction.reshape(-1).tolist(), float(default_value), sitk.sitkFloat32)
    return np.ascontiguousarray(sitk.GetArrayFromImage(out).T)


def crop_array(image: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float = 0.0) -> np.ndarray:
    """Integer crop of an array ``(x, y[, z])``: out index 0 = ``start`` (may be negative); ``fill`` outside."""
    start_a = np.asarray(start, dtype=np.int64)
    size_t = tuple(int(s) for s in size)
    out = np.full(size_t, fill, dtype=np.float32)
    src, dst = [], []
    for s, n, m in zip(start_a, size_t, image.shape):
        lo, hi = max(int(s), 0), min(int(s) + n, m)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(s), hi - int(s)))
    out[tuple(dst)] = image[tuple(src)]
    return out


def on_sub_grid(image: np.ndarray, grid: Grid, sub: Grid, fill: float = 0.0) -> np.ndarray:
    """The pixels of ``image`` (on ``grid``) on ``sub``, an integer sub-grid of it (crop/pad, exact)."""
    start = grid.world_to_index(sub.origin[None])[0]
    start_i = np.round(start)
    if (np.abs(start - start_i).max() > 1e-6 or not np.allclose(sub.spacing, grid.spacing)
            or not np.allclose(sub.direction, grid.direction)):
        raise ValueError("not an integer sub-grid; use resample")
    return crop_array(image, start_i.astype(np.int64), sub.size, fill)


# ------------------------------------------------------------------------------------ preprocessing
def normalize_intensity(image: np.ndarray, method: str | None = "zscore",
                        percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """``"zscore"`` (mean 0, std 1), ``"percentile"`` (percentiles -> [0, 1], clipped) or None."""
    if method is None:
        return np.asarray(image, dtype=np.float32)
    if method == "zscore":
        out = NormalizeIntensity()(image[None])
    elif method == "percentile":
        out = ScaleIntensityRangePercentiles(percentiles[0], percentiles[1], 0.0, 1.0, clip=True)(image[None])
    else:
        raise ValueError(f"unknown normalisation {method!r}")
    return convert_to_numpy(out)[0].astype(np.float32)


#: ``target_size`` alone keeps the image's physical aspect ratio (isotropic spacing, zero padding) rather than
#: squashing the field of view onto the grid; the default of :func:`preprocess` and of every method's view.
KEEP_ASPECT: bool = True


def network_orientation(sample: Sample) -> Sample:
    """``sample`` with its pixel array stored in one axis order and one handedness, the same image in world mm.

    A network sees the pixel array, not the world: two files of one anatomy, one stored with its first axis
    running to the right and one to the left (a mirror image: NIfTI's RAS and LAS), look like mirror images to
    it, and a left landmark is then found on the right. Here the array is transposed so that its axis ``k`` is
    the one most aligned with world axis ``k``, and, when the direction is then a mirror (determinant < 0),
    flipped along its first axis. Both are exact (no resampling); the geometry follows, so every world position,
    the landmarks (world mm) and what every grid built from it samples stay the same. An image already in that
    order with a proper direction (the identity, RAS) is returned as it is. A storage order turned by 180 degrees
    (LPS against RAS) stays a rotation: not flipped, to keep images that are rotations of each other rotations
    (MONAI's ``Orientation`` would make them identical; it also turns proper rotations, which changed the committed
    runs of proper-oriented data sets).
    """
    d = np.asarray(sample.geometry.direction, dtype=np.float64)
    weights = np.abs(d)
    perm: list[int] = []
    for k in range(d.shape[0]):  # world axis k takes the free index axis most aligned with it
        order = [int(j) for j in np.argsort(-weights[k], kind="stable") if int(j) not in perm]
        perm.append(order[0])
    flip = bool(np.linalg.det(d[:, perm]) < 0)
    if perm == list(range(d.shape[0])) and not flip:
        return sample
    image = np.transpose(sample.image, perm + list(range(len(perm), sample.image.ndim)))  # trailing axes kept
    size = np.asarray(image.shape[: d.shape[0]])
    direction = d[:, perm].copy()
    start = np.zeros(d.shape[0])  # the old index of the new index 0
    if flip:
        image = image[::-1]
        direction[:, 0] *= -1.0
        start[perm[0]] = size[0] - 1
    origin = sample.geometry.index_to_world(start[None])[0]
    geometry = Geometry(np.asarray(sample.geometry.spacing, dtype=np.float64)[perm], origin, direction)
    return replace(sample, image=np.ascontiguousarray(image), geometry=geometry)


def fit_spacing(grid: Grid, target_size: Sequence[int]) -> np.ndarray:
    """(D,) isotropic spacing (mm/px) at which ``grid``'s whole field of view fits into ``target_size`` px."""
    extent = np.asarray(grid.size, dtype=np.float64) * grid.spacing
    s = float(np.max(extent / np.asarray(target_size, dtype=np.float64).reshape(grid.ndim)))
    return np.full(grid.ndim, s)


def preprocessing_grids(sample: Sample | Grid, target_size: Sequence[int] | None = None,
                        target_spacing: Sequence[float] | float | None = None,
                        keep_aspect: bool = KEEP_ASPECT) -> tuple[Grid, Grid]:
    """(resampling grid, final grid) of :func:`preprocess`: the whole FOV at size or spacing, then (both
    given) the centre crop/pad of ``target_size`` px of it; otherwise the two are the same. ``target_size``
    alone with ``keep_aspect``: the FOV at the isotropic spacing that fits it (:func:`fit_spacing`), centred
    and zero-padded to ``target_size``."""
    if target_spacing is None and target_size is not None and keep_aspect:
        src = Grid.of_image(sample)
        sp = fit_spacing(src, target_size)
        extent = np.asarray(src.size, dtype=np.float64) * src.spacing
        size = np.minimum(np.ceil(extent / sp - 1e-6), np.asarray(target_size)).astype(int)
        centre = src.index_to_world(((np.asarray(src.size, dtype=np.float64) - 1) / 2)[None])[0]
        whole = Grid.centred(centre, size, sp, src.direction)  # exactly isotropic, the FOV's centre kept
        return whole, whole.centre_crop_or_pad(target_size)
    whole = Grid.whole(sample, spacing=target_spacing) if target_spacing is not None else \
        Grid.whole(sample, size=target_size)
    final = whole.centre_crop_or_pad(target_size) if (target_spacing is not None and target_size is not None) \
        else whole
    return whole, final


def preprocess(sample: Sample, target_size: Sequence[int] | None = None,
               target_spacing: Sequence[float] | None = None, normalize: str | None = "zscore",
               keep_aspect: bool = KEEP_ASPECT) -> Sample:
    """Resample ``sample`` onto the network grid; landmarks keep their world mm coordinates.

    - ``target_size`` only, ``keep_aspect`` (default): the whole field of view at the isotropic spacing that
      fits it into ``target_size`` pixels (x, y[, z]), centred, zero-padded (after normalisation) on the
      short axes: the anatomy keeps its shape (pad, never squash).
    - ``target_size`` only, ``keep_aspect=False``: resize the whole field of view to ``target_size`` pixels;
      spacing becomes ``spacing * size / target_size`` (anisotropic if aspect ratios differ).
    - ``target_spacing`` only (mm): resize to ``round(size * spacing / target_spacing)`` pixels; the
      field of view is kept exactly, so the realised spacing may differ from the target by < 1/2 pixel
      over the whole extent (it is stored exactly in the returned geometry).
    - both: resample to ``target_spacing``, then centre-crop/pad (zeros, after normalisation) to
      ``target_size``.
    This is :meth:`Grid.whole` + :func:`resample` (linear, pixel edges aligned, Gaussian anti-aliasing
    when downsampling), then :func:`normalize_intensity` over the whole resampled image, then the
    integer crop/pad. The direction is kept (no reorientation here; a ``LandmarkDataset`` first puts each
    sample in :func:`network_orientation`). Landmarks now outside the grid keep their
    world position; data loaders mark them invalid (see :func:`mark_outside`).
    """
    whole, final = preprocessing_grids(sample, target_size, target_spacing, keep_aspect)
    image = sample.image if whole == Grid.of_image(sample) else resample(sample, whole)
    image = normalize_intensity(image, normalize)
    if final is not whole:
        image = on_sub_grid(image, whole, final)
    meta = {**sample.meta, "preprocess": {"target_size": target_size, "target_spacing": target_spacing,
                                          "normalize": normalize, "source_size": sample.size,
                                          "keep_aspect": keep_aspect}}
    return replace(sample, image=image, geometry=final.geometry, landmarks_mm=sample.landmarks_mm.copy(),
                   valid=sample.valid.copy(), meta=meta)
