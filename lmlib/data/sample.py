"""The sample model every reader produces and every method consumes.

A :class:`Sample` is one image with its physical geometry and its named landmarks in world mm.
Image arrays are ``(x, y[, z])``-indexed (a SimpleITK array transposed, as MONAI loads them).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import SimpleITK as sitk

from lmlib.data.geometry import Geometry


@dataclass
class Sample:
    """One image and its landmarks.

    Attributes:
        image_id: unique id within its dataset (e.g. ``"001"``).
        image: float32 array indexed ``(x, y[, z])``; intensities as read (no normalisation).
        geometry: spacing/origin/direction of the grid (mm).
        landmarks_mm: ``(N, D)`` world coordinates in mm, ``(x, y[, z])``; NaN rows where invalid.
        valid: ``(N,)`` bool; False for a landmark that is missing or ambiguous in this image.
        landmark_names: the N names, in the dataset's fixed order.
        meta: free-form provenance (source files, annotator, reader warnings).
    """

    image_id: str
    image: np.ndarray
    geometry: Geometry
    landmarks_mm: np.ndarray
    valid: np.ndarray
    landmark_names: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image = np.asarray(self.image, dtype=np.float32)
        self.landmarks_mm = np.array(self.landmarks_mm, dtype=np.float64, ndmin=2)
        self.valid = np.asarray(self.valid, dtype=bool).reshape(-1)
        self.landmark_names = tuple(self.landmark_names)
        dim = self.geometry.ndim
        if self.image.ndim != dim:
            raise ValueError(f"{self.image_id}: image has {self.image.ndim} axes, geometry {dim}")
        n = len(self.landmark_names)
        if self.landmarks_mm.shape != (n, dim) or self.valid.shape != (n,):
            raise ValueError(f"{self.image_id}: landmarks {self.landmarks_mm.shape} / valid {self.valid.shape} "
                             f"do not match {n} names in {dim}D")
        bad = self.valid & ~np.isfinite(self.landmarks_mm).all(axis=1)
        if bad.any():  # a valid landmark must be a usable point: mask (and report) it upstream instead
            raise ValueError(f"{self.image_id}: landmarks {[self.landmark_names[k] for k in np.flatnonzero(bad)]} "
                             "are marked valid but are not finite")
        self.landmarks_mm[~self.valid] = np.nan

    @property
    def ndim(self) -> int:
        return self.geometry.ndim

    @property
    def size(self) -> tuple[int, ...]:
        """Grid size in pixels, ``(x, y[, z])``."""
        return tuple(int(s) for s in self.image.shape)

    @property
    def landmarks_index(self) -> np.ndarray:
        """Landmarks as continuous indices ``(N, D)``, ``(x, y[, z])``; NaN where invalid."""
        return self.geometry.world_to_index(self.landmarks_mm)

    def to_sitk(self) -> sitk.Image:
        """The image as a SimpleITK image with this sample's geometry."""
        return self.geometry.apply_to(sitk.GetImageFromArray(self.image.T))

    @classmethod
    def from_index(cls, image_id: str, image: np.ndarray, geometry: Geometry,
                   landmarks_index: np.ndarray, landmark_names: Sequence[str],
                   valid: np.ndarray | None = None, meta: dict[str, Any] | None = None) -> Sample:
        """Build a sample from pixel/voxel landmark indices (converted to world mm here); without
        ``valid``, non-finite rows are invalid."""
        idx = np.array(landmarks_index, dtype=np.float64, ndmin=2)
        ok = cast(np.ndarray, np.isfinite(idx).all(axis=1)) if valid is None else np.asarray(valid, dtype=bool)
        world = geometry.index_to_world(np.where(np.isfinite(idx), idx, np.nan))  # inf -> NaN, no inf * 0
        return cls(image_id, image, geometry, world, ok,
                   tuple(landmark_names), dict(meta or {}))

    def with_landmarks_mm(self, landmarks_mm: np.ndarray) -> Sample:
        """A copy with other landmark positions (same validity mask)."""
        return replace(self, landmarks_mm=np.array(landmarks_mm, dtype=np.float64), meta=dict(self.meta))


def image_from_sitk(image: sitk.Image) -> tuple[np.ndarray, Geometry]:
    """SimpleITK image -> (float32 array indexed (x, y[, z]), geometry). Multi-component -> mean."""
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    if image.GetNumberOfComponentsPerPixel() > 1:
        arr = arr.mean(axis=-1)
    return arr.T.copy(), Geometry.from_sitk(image)
