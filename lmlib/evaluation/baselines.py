"""The mean-shape baseline: a reference that needs no training.

The mean-shape baseline places every landmark at its mean position over the training images, in
the normalised image frame ``u = (index + 0.5) / size`` (per axis, in ``[0, 1]``: 0 and 1 are the
outer pixel edges), and maps that position into each test image through the test image's own size
and geometry. The frame is that of the pixel array as the networks see it
(:func:`lmlib.data.grids.network_orientation`): one axis order and handedness for every image, so two files of
one anatomy stored mirrored (NIfTI's RAS and LAS) share a frame instead of averaging a landmark with its
mirror image. Any method worth training must beat it; it shows how much of the task the image frame
alone already solves (a dataset whose landmarks barely move is easy for everyone).

:mod:`lmlib.outputs.reference_runs` writes it (and the second annotator) as reference runs of the
output contract. Coordinates are world mm, ``(x, y[, z])``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lmlib.data.grids import network_orientation
from lmlib.data.sample import Sample


def normalised_positions(sample: Sample) -> np.ndarray:
    """Landmarks of ``sample`` in its normalised image frame: ``(index + 0.5) / size`` per axis of its array in
    network orientation (see the module).

    Returns ``(N, D)`` in ``(x, y[, z])`` order; 0 and 1 are the outer pixel edges; NaN where masked.
    """
    oriented = network_orientation(sample)
    index = oriented.geometry.world_to_index(oriented.landmarks_mm)
    return (index + 0.5) / np.asarray(oriented.size, dtype=np.float64)


def from_normalised(sample: Sample, positions: np.ndarray) -> np.ndarray:
    """Normalised frame positions ``(N, D)`` -> world mm ``(N, D)`` in ``sample``'s image (NaN kept)."""
    oriented = network_orientation(sample)
    index = np.asarray(positions, dtype=np.float64) * np.asarray(oriented.size, dtype=np.float64) - 0.5
    return oriented.geometry.index_to_world(index)


def mean_normalised_shape(train_samples: Sequence[Sample]) -> np.ndarray:
    """Mean normalised position ``(N, D)`` of each landmark over ``train_samples``.

    Masked landmarks are left out of the mean; a landmark masked in every training image is NaN.
    Raises if the samples are empty or disagree on landmark names or dimension.
    """
    if not train_samples:
        raise ValueError("mean shape: no training samples")
    names, ndim = train_samples[0].landmark_names, train_samples[0].ndim
    for s in train_samples:
        if s.landmark_names != names or s.ndim != ndim:
            raise ValueError(f"mean shape: {s.image_id} has landmarks {s.landmark_names} in {s.ndim}D, "
                             f"expected {names} in {ndim}D")
    stacked = np.stack([normalised_positions(s) for s in train_samples])  # (K, N, D)
    seen = np.isfinite(stacked).all(axis=2)  # (K, N)
    counts = seen.sum(axis=0)
    total = np.where(seen[..., None], stacked, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts[:, None] > 0, total / counts[:, None], np.nan)


def mean_shape_predictions(train_samples: Sequence[Sample], test_samples: Sequence[Sample]) -> list[np.ndarray]:
    """Mean-shape prediction for every test sample: list of ``(N, D)`` world mm, ``(x, y[, z])``.

    The mean is taken in the normalised frame of the training images (see
    :func:`mean_normalised_shape`) and mapped through each test image's own size and geometry, so
    images of different sizes, spacings, origins or directions are handled. A landmark never seen in
    training is NaN (unpredicted). Test samples must have the training landmark names in that order.
    """
    mean = mean_normalised_shape(train_samples)
    names = train_samples[0].landmark_names
    out = []
    for s in test_samples:
        if s.landmark_names != names:
            raise ValueError(f"mean shape: test image {s.image_id} has landmarks {s.landmark_names}, expected {names}")
        out.append(from_normalised(s, mean))
    return out


def image_centre_predictions(test_samples: Sequence[Sample]) -> list[np.ndarray]:
    """Every landmark at its image's centre (world mm, ``(N, D)`` per sample): the floor below the mean shape."""
    return [from_normalised(s, np.full((len(s.landmark_names), s.ndim), 0.5)) for s in test_samples]
