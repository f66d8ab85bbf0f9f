"""World (mm) <-> continuous index conversions, following SimpleITK conventions.

``world = origin + direction @ (spacing * index)`` with index ``(x, y[, z])`` at pixel centres
(index 0 is the centre of the first pixel). ``direction`` is the D x D matrix whose columns are the
image axes in world space (``sitk.Image.GetDirection()`` reshaped row-major). All arrays are float64;
points are rows: shape ``(N, D)``. NaN rows (invalid landmarks) pass through as NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import SimpleITK as sitk


# Data generated from a seed (deformed and posed copies, phantoms) must have the same bits on every machine: its
# checksum is in each run's manifest. numpy hands `@` and the norm of a 1-D array to OpenBLAS, which picks its
# kernel per CPU, and the kernels round differently (a norm can differ in its last bit). These two helpers sum in
# a fixed order with numpy's own element-wise loops instead.
def apply_matrix(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``points @ matrix.T`` for points (..., D) and a small matrix (K, D), without BLAS (see above)."""
    m = np.asarray(matrix, dtype=np.float64)
    pts = np.asarray(points, dtype=np.float64)
    out = pts[..., 0, None] * m[:, 0]
    for k in range(1, m.shape[1]):
        out = out + pts[..., k, None] * m[:, k]
    return out


def vector_norm(vector: np.ndarray) -> float:
    """Euclidean length of one short vector, without BLAS (see above)."""
    v = np.asarray(vector, dtype=np.float64)
    return float(np.sqrt(np.sum(v * v)))


def libm_exp(values: np.ndarray) -> np.ndarray:
    """``exp`` of every element by libm (``math.exp``), float64: NumPy's vectorised ``exp`` gives other last bits
    on CPUs with AVX-512, so generated images (and their checksum) would depend on the machine."""
    v = np.asarray(values, dtype=np.float64)
    return np.fromiter(map(math.exp, v.ravel().tolist()), dtype=np.float64, count=v.size).reshape(v.shape)


@dataclass(frozen=True)
class Geometry:
    """Physical geometry of a D-dimensional image grid (SimpleITK conventions, mm)."""

    spacing: np.ndarray  # (D,) mm per pixel along x, y[, z]
    # origin and direction may be left out (None): __post_init__ sets the zero origin and the identity
    origin: np.ndarray = field(default=cast(np.ndarray, None))  # (D,) mm, centre of index 0
    direction: np.ndarray = field(default=cast(np.ndarray, None))  # (D, D), columns = axes

    def __post_init__(self) -> None:
        spacing = np.asarray(self.spacing, dtype=np.float64).reshape(-1)
        dim = spacing.size
        if dim not in (2, 3):
            raise ValueError(f"spacing must have 2 or 3 values, got {spacing.tolist()}")
        if np.any(spacing <= 0):
            raise ValueError(f"spacing must be positive, got {spacing.tolist()}")
        origin = np.zeros(dim) if self.origin is None else np.asarray(self.origin, dtype=np.float64).reshape(dim)
        direction = np.eye(dim) if self.direction is None else np.asarray(self.direction, dtype=np.float64).reshape(dim, dim)
        if abs(abs(np.linalg.det(direction)) - 1.0) > 1e-3:
            raise ValueError(f"direction must be orthonormal, got {direction.tolist()}")
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    @property
    def ndim(self) -> int:
        return int(self.spacing.size)

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Geometry:
        dim = image.GetDimension()
        return cls(np.array(image.GetSpacing()), np.array(image.GetOrigin()),
                   np.array(image.GetDirection()).reshape(dim, dim))

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Set this geometry on a SimpleITK image (in place) and return it."""
        image.SetSpacing(self.spacing.tolist())
        image.SetOrigin(self.origin.tolist())
        image.SetDirection(self.direction.reshape(-1).tolist())
        return image

    def index_to_world(self, index: np.ndarray) -> np.ndarray:
        """Continuous index (N, D) in (x, y[, z]) order -> world mm (N, D)."""
        idx = np.atleast_2d(np.asarray(index, dtype=np.float64))
        return self.origin + apply_matrix(self.direction, idx * self.spacing)

    def world_to_index(self, world: np.ndarray) -> np.ndarray:
        """World mm (N, D) -> continuous index (N, D) in (x, y[, z]) order."""
        pts = np.atleast_2d(np.asarray(world, dtype=np.float64))
        return np.linalg.solve(self.direction, (pts - self.origin).T).T / self.spacing

    def scaled(self, factor: np.ndarray | float) -> Geometry:
        """Geometry of the same field of view resampled by ``factor`` (new_size = size * factor).

        Keeps the physical extent aligned on pixel *edges*, as resizing an image does:
        new spacing = spacing / factor, and the origin moves by half a pixel difference.
        """
        f = np.broadcast_to(np.asarray(factor, dtype=np.float64), self.spacing.shape)
        new_spacing = self.spacing / f
        shift = 0.5 * (new_spacing - self.spacing)  # centre of new pixel 0, along each axis
        return Geometry(new_spacing, self.origin + apply_matrix(self.direction, shift), self.direction)
