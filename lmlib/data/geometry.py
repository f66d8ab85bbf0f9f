"""World (mm) <-> continuous index conversions, following SimpleITK conventions.

``world = origin + direction @ (spacing * index)`` with index ``(x, y[, z])`` at pixel centres
(index 0 is the centre of the first pixel). ``direction`` is the D x D matrix whose columns are the
image axes in world space (``sitk.Image.GetDirection()`` reshaped row-major). All arrays are float64;
points are rows: shape ``(N, D)``. NaN rows (invalid landmarks) pass through as NaN.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Geometry:
    """Physical geometry of a D-dimensional image grid (SimpleITK conventions, mm)."""

    spacing: np.ndarray  # (D,) mm per pixel along x, y[, z]
    origin: np.ndarray = field(default=None)  # type: ignore[assignment]  # (D,) mm, centre of index 0
    direction: np.ndarray = field(default=None)  # type: ignore[assignment]  # (D, D), columns = axes

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
        return self.origin + (idx * self.spacing) @ self.direction.T

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
        return Geometry(new_spacing, self.origin + self.direction @ shift, self.direction)
