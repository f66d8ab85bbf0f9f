"""Reference rows written as runs of the output contract: the mean-shape baseline and a second annotator.

Each is a run folder with ``"kind": "reference"`` in ``metrics.json`` and a ``manifest.json``, so the
comparison shows it as a reference row (dashed curves). Coordinates are world mm, ``(x, y[, z])``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from lmlib.data.sample import Sample
from lmlib.evaluation.baselines import mean_shape_predictions
from lmlib.outputs.contract import REFERENCE_KIND, REFERENCE_TIMINGS, predictions_frame, write_outputs
from lmlib.outputs.manifest import write_manifest

MEAN_SHAPE = "mean_shape"  # run folder / method name of the mean-shape reference row
INTER_OBSERVER = "inter-observer"  # run folder / method name of the second-annotator reference row
INTRA_OBSERVER = "intra-observer"  # run folder / method name of the annotator-against-itself reference row
#: ``metrics.json`` ``scored_on`` of a reference row scored on other images than the test split (the comparison
#: shows it beside the others, with its own images, and never aligns the methods on it)
OWN_IMAGES = "own_images"


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

    Samples are matched by ``image_id`` and landmarks by name. A landmark the other annotator lacks or masked is
    masked in the returned reference sample too: a comparison that cannot be made (``n_masked``), not a miss of the
    second annotator's (an unpredicted landmark counts against the SDR). Points are ``(N, D)`` world mm in the
    reference's landmark order (NaN where masked).
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
    return [_masked_where_missing(r, p) for r, p in zip(refs, points)], points


def _masked_where_missing(reference: Sample, other_mm: np.ndarray) -> Sample:
    """``reference`` with every landmark masked where the other annotation has no point (NaN)."""
    present = np.isfinite(other_mm).all(axis=1)
    if present.all():
        return reference
    return replace(reference, landmarks_mm=reference.landmarks_mm.copy(), valid=reference.valid & present,
                   meta=dict(reference.meta))


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


def intra_observer_pairs(samples: Sequence[Sample], duplicates: Sequence[Sequence[str]]
                         ) -> tuple[list[Sample], list[np.ndarray]]:
    """One annotator against itself on copies of one image (``duplicates``: groups of ids holding the same
    pixels, each annotated independently): per group, its first image as the reference and each other copy's
    points as the "prediction" (world mm; the copies share one pixel grid, checked). Groups with an image absent
    from ``samples`` are skipped."""
    by_id = {s.image_id: s for s in samples}
    refs, points = [], []
    for group in duplicates:
        if not all(i in by_id for i in group):
            continue
        first = by_id[group[0]]
        for other in (by_id[i] for i in group[1:]):
            same_grid = (first.size == other.size and np.allclose(first.geometry.spacing, other.geometry.spacing)
                         and np.allclose(first.geometry.origin, other.geometry.origin))
            if not same_grid:
                raise ValueError(f"identical images {first.image_id} and {other.image_id} have different grids: "
                                 "their annotations cannot be compared in mm")
            points.append(np.where(other.valid[:, None], other.landmarks_mm, np.nan))
            refs.append(_masked_where_missing(first, points[-1]))
    return refs, points


def write_intra_observer_run(samples: Sequence[Sample], duplicates: Sequence[Sequence[str]], output_dir: Path | str,
                             parameters: dict[str, Any], started: str | None = None) -> dict[str, Any] | None:
    """Score the annotator against itself on identical images (:func:`intra_observer_pairs`) and write it as a
    reference run scored on its own images (``scored_on``: :data:`OWN_IMAGES`); None when no pair is annotated."""
    refs, points = intra_observer_pairs(samples, duplicates)
    if not refs:
        return None
    splits = sorted({str(s.meta.get("split")) for s in refs})
    return write_reference_predictions(output_dir, refs, points, INTRA_OBSERVER, parameters,
                                       manifest_samples=refs, started=started,
                                       extra_metrics={"scored_on": OWN_IMAGES, "n_pairs": len(refs),
                                                      "pair_splits": splits})
