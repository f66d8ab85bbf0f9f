"""Reference rows that need no training: the mean shape and a second annotator.

The mean-shape baseline places every landmark at its mean position over the training images, in
the normalised image frame ``u = (index + 0.5) / size`` (per axis, in ``[0, 1]``: 0 and 1 are the
outer pixel edges), and maps that position into each test image through the test image's own size
and geometry. Any method worth training must beat it; it shows how much of the task the image frame
alone already solves (a dataset whose landmarks barely move is easy for everyone).

Both reference rows are written as runs of the output contract (:mod:`lmlib.outputs.contract`) with
``"kind": "reference"`` in ``metrics.json`` and a ``manifest.json``, so the comparison shows them as
reference rows and dashed curves. Coordinates are world mm, ``(x, y[, z])``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lmlib.data.sample import Sample
from lmlib.outputs.contract import (REFERENCE_KIND, REFERENCE_TIMINGS, predictions_frame,
                                    write_outputs)
from lmlib.outputs.manifest import write_manifest

MEAN_SHAPE = "mean_shape"  # run folder / method name of the mean-shape reference row
INTER_OBSERVER = "inter-observer"  # run folder / method name of the second-annotator reference row


def normalised_positions(sample: Sample) -> np.ndarray:
    """Landmarks of ``sample`` in its normalised image frame: ``(index + 0.5) / size`` per axis.

    Returns ``(N, D)`` in ``(x, y[, z])`` order; 0 and 1 are the outer pixel edges; NaN where masked.
    """
    index = sample.geometry.world_to_index(sample.landmarks_mm)
    return (index + 0.5) / np.asarray(sample.size, dtype=np.float64)


def from_normalised(sample: Sample, positions: np.ndarray) -> np.ndarray:
    """Normalised frame positions ``(N, D)`` -> world mm ``(N, D)`` in ``sample``'s image (NaN kept)."""
    index = np.asarray(positions, dtype=np.float64) * np.asarray(sample.size, dtype=np.float64) - 0.5
    return sample.geometry.index_to_world(index)


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


def write_reference_predictions(output_dir: Path | str, test_samples: Sequence[Sample],
                                predictions_mm: Sequence[np.ndarray], method: str, parameters: dict[str, Any],
                                manifest_samples: Sequence[Sample] | None = None, started: str | None = None,
                                extra_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a reference run: ``predictions.csv``, ``metrics.json`` (``"kind": "reference"``, zero
    timings) and ``manifest.json`` into ``output_dir``; return the metrics.

    ``predictions_mm[i]``: ``(N, D)`` world mm for ``test_samples[i]``. The manifest's data checksum
    covers ``manifest_samples`` (default: the test samples); its device is ``cpu`` (nothing to run).
    """
    frame = predictions_frame(list(test_samples), list(predictions_mm))
    extra = {"kind": REFERENCE_KIND, "method": method, **(extra_metrics or {})}
    metrics = write_outputs(output_dir, frame, dict(REFERENCE_TIMINGS), extra)
    write_manifest(output_dir, {**parameters, "output_dir": str(output_dir)},
                   samples=list(manifest_samples if manifest_samples is not None else test_samples),
                   seed=parameters.get("seed"), device="cpu", started=started,
                   extra={"reference": method})
    return metrics


def write_mean_shape_run(train_samples: Sequence[Sample], test_samples: Sequence[Sample], output_dir: Path | str,
                         parameters: dict[str, Any], started: str | None = None) -> dict[str, Any]:
    """Score the mean shape of ``train_samples`` on ``test_samples`` and write it as a reference run
    (contract files + manifest, see :func:`write_reference_predictions`); return the metrics (mm, %)."""
    preds = mean_shape_predictions(train_samples, test_samples)
    return write_reference_predictions(output_dir, test_samples, preds, MEAN_SHAPE, parameters,
                                       manifest_samples=[*train_samples, *test_samples], started=started,
                                       extra_metrics={"n_train_images": len(train_samples)})


def match_annotator(reference_samples: Sequence[Sample], other_samples: Sequence[Sample]
                    ) -> tuple[list[Sample], list[np.ndarray]]:
    """Pair a second annotator with the reference: (reference samples both have, the other's points).

    Samples are matched by ``image_id`` and landmarks by name; a landmark the other annotator lacks
    or masked is NaN (unpredicted). Points are ``(N, D)`` world mm in the reference's landmark order.
    """
    other = {s.image_id: s for s in other_samples}
    refs = [s for s in reference_samples if s.image_id in other]
    if not refs:
        raise ValueError("no image_id is shared by the reference and the other annotator's samples")
    points = []
    for ref in refs:
        o = other[ref.image_id]
        pos = {name: k for k, name in enumerate(o.landmark_names)}
        rows = [o.landmarks_mm[pos[n]] if n in pos else np.full(ref.ndim, np.nan) for n in ref.landmark_names]
        points.append(np.array(rows, dtype=np.float64).reshape(len(ref.landmark_names), ref.ndim))
    return refs, points


def write_inter_observer_run(reference_samples: Sequence[Sample], other_samples: Sequence[Sample],
                             output_dir: Path | str, parameters: dict[str, Any], started: str | None = None
                             ) -> dict[str, Any]:
    """Score a second annotator against the reference one and write it as a reference run
    (contract files + manifest); return the metrics (mm, %). See :func:`match_annotator`."""
    refs, points = match_annotator(reference_samples, other_samples)
    unmatched = len(reference_samples) + len(other_samples) - 2 * len(refs)
    return write_reference_predictions(output_dir, refs, points, INTER_OBSERVER, parameters,
                                       manifest_samples=list(other_samples), started=started,
                                       extra_metrics={"n_unmatched_images": unmatched})
