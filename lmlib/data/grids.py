"""Grids in world space and resampling onto them: where a method looks at an image.

Preprocessing onto the network grid (resize / resample / crop-pad) and intensity normalisation.
Landmarks stay in world mm; ``sample.geometry`` of a preprocessed sample is the grid's geometry, so
``geometry.index_to_world`` maps a network-grid index back to world mm (the one inverse path).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
import torch
from monai.transforms import NormalizeIntensity, Resize, ScaleIntensityRangePercentiles
from monai.utils import convert_to_numpy

from lmlib.data.geometry import Geometry
from lmlib.data.sample import Sample


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


def preprocess(sample: Sample, target_size: Sequence[int] | None = None,
               target_spacing: Sequence[float] | None = None, normalize: str | None = "zscore") -> Sample:
    """Resample ``sample`` onto the network grid; landmarks keep their world mm coordinates.

    - ``target_size`` only: resize the whole field of view to ``target_size`` pixels (x, y[, z]);
      spacing becomes ``spacing * size / target_size`` (anisotropic if aspect ratios differ).
    - ``target_spacing`` only (mm): resize to ``round(size * spacing / target_spacing)`` pixels; the
      field of view is kept exactly, so the realised spacing may differ from the target by < 1/2 pixel
      over the whole extent (it is stored exactly in the returned geometry).
    - both: resample to ``target_spacing``, then centre-crop/pad (zeros, after normalisation) to
      ``target_size``.
    Resizing uses MONAI ``Resize`` (linear, ``align_corners=False``: pixel edges stay aligned, exactly
    as :meth:`Geometry.scaled` assumes, Gaussian anti-aliasing when downsampling). The direction is
    kept (no reorientation). Landmarks now outside the grid keep their world position; data loaders
    mark them invalid (see :func:`mark_outside`).
    """
    image, geom, ndim = sample.image, sample.geometry, sample.ndim
    size = np.asarray(sample.size, dtype=np.float64)
    new_size = None
    if target_spacing is not None:
        tsp = np.broadcast_to(np.asarray(target_spacing, dtype=np.float64), (ndim,))
        new_size = np.maximum(1, np.round(size * geom.spacing / tsp)).astype(int)
    elif target_size is not None:
        new_size = np.asarray(target_size, dtype=int).reshape(ndim)
    if new_size is not None and tuple(new_size) != sample.size:
        mode = "bilinear" if ndim == 2 else "trilinear"
        resize = Resize(tuple(int(s) for s in new_size), mode=mode, align_corners=False, anti_aliasing=True)
        image = convert_to_numpy(resize(torch.as_tensor(image)[None]))[0]
        geom = geom.scaled(new_size / size)
    image = normalize_intensity(image, normalize)
    if target_spacing is not None and target_size is not None:
        image, geom = _center_crop_or_pad(image, geom, tuple(int(s) for s in target_size))
    meta = {**sample.meta, "preprocess": {"target_size": target_size, "target_spacing": target_spacing,
                                          "normalize": normalize, "source_size": sample.size}}
    return replace(sample, image=image, geometry=geom, landmarks_mm=sample.landmarks_mm.copy(),
                   valid=sample.valid.copy(), meta=meta)


def _center_crop_or_pad(image: np.ndarray, geom: Geometry, size: tuple[int, ...]) -> tuple[np.ndarray, Geometry]:
    """Centre crop/zero-pad ``image`` to ``size``; the new index 0 is old index ``start``."""
    start = (np.asarray(image.shape) - np.asarray(size)) // 2  # negative where padding
    out = np.zeros(size, dtype=np.float32)
    src = tuple(slice(max(s, 0), max(s, 0) + min(n, m - max(s, 0))) for s, n, m in zip(start, size, image.shape))
    dst = tuple(slice(max(-s, 0), max(-s, 0) + (sl.stop - sl.start)) for s, sl in zip(start, src))
    out[dst] = image[src]
    return out, Geometry(geom.spacing, geom.index_to_world(start[None].astype(np.float64))[0], geom.direction)


