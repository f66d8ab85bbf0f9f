"""Annotation checks: a report of every defect, and landmarks resolved without guessing.

A landmark given more than once with different points (ambiguous) or not given at all is MASKED
(``valid=False``) for that image, with a ``warnings.warn`` naming the file and the label. Every
check adds rows to one report (a pandas DataFrame with :data:`REPORT_COLUMNS`); issue names:

- ``duplicate``: a label given several times with different points (masked);
- ``repeated``: a label given several times at the same point (kept, once);
- ``missing``: an expected label not given (masked);
- ``unknown``: a label that is not one of the dataset's labels (ignored);
- ``outside``: a point outside the image (kept; ``detail`` has the index);
- ``size_mismatch``: the size stated by the annotation differs from the image's;
- ``no_spacing``: the image format carries no spacing and none was given (mm = pixels);
- ``no_annotation`` / ``no_image``: an image without annotation file, an annotation without image;
- ``excluded``: an (annotator, image) excluded by the dataset description (all masked).
"""
from __future__ import annotations

import warnings
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from lmlib.data.readers import FORMATS_WITHOUT_SPACING, RawAnnotation

REPORT_COLUMNS: tuple[str, ...] = ("image_id", "annotator", "landmark", "issue", "detail", "file")
MASKING_ISSUES: frozenset[str] = frozenset({"duplicate", "missing", "no_annotation", "excluded"})


@dataclass(frozen=True)
class Issue:
    """One report row. ``landmark`` is the file label ("" when the issue concerns the image)."""

    image_id: str
    annotator: str
    landmark: str
    issue: str
    detail: str
    file: str


def _fmt(points: Sequence[np.ndarray]) -> str:
    return "; ".join("(" + ", ".join(f"{v:.2f}" for v in p) + ")" for p in points)


def resolve_landmarks(ann: RawAnnotation, labels: Sequence[str], annotator: str = "", ndim: int | None = None,
                      warn: bool = True, atol: float = 1e-6) -> tuple[np.ndarray, np.ndarray, list[Issue]]:
    """Points of ``labels`` (in this order) from one annotation, in the annotation's units.

    Returns ``(points (N, D), valid (N,), issues)``: duplicates with different points and missing
    labels are NaN/invalid (and warned about), identical repeats are kept once, unknown labels are
    reported and ignored. ``D`` is ``ndim`` or the points' dimension.
    """
    labels = list(labels)
    dims = {p.size for pts in ann.points.values() for p in pts}
    d = ndim or (dims.pop() if len(dims) == 1 else 2)
    if any(k != d for k in dims):
        raise ValueError(f"{ann.source}: points of {sorted(dims)} coordinates, expected {d}")
    pts = np.full((len(labels), d), np.nan)
    issues: list[Issue] = []
    src = str(ann.source)
    for k, label in enumerate(labels):
        given = ann.points.get(label, [])
        if not given:
            issues.append(Issue(ann.image_id, annotator, label, "missing", "label not given", src))
        elif len(given) > 1 and not all(np.allclose(g, given[0], atol=atol) for g in given[1:]):
            issues.append(Issue(ann.image_id, annotator, label, "duplicate",
                                f"given {len(given)} times at {_fmt(given)} ({ann.units})", src))
        else:
            if len(given) > 1:
                issues.append(Issue(ann.image_id, annotator, label, "repeated",
                                    f"given {len(given)} times at the same point (kept once)", src))
            pts[k] = given[0]
    for label in ann.points:
        if label not in labels:
            issues.append(Issue(ann.image_id, annotator, label, "unknown",
                                f"label not in the dataset's {len(labels)} labels (ignored)", src))
    valid = ~np.isnan(pts).any(axis=1)
    if warn:
        for i in issues:
            if i.issue in MASKING_ISSUES:
                warnings.warn(f"{i.file}: landmark {i.landmark!r} {i.issue} ({i.detail}); masked for image "
                              f"{i.image_id}", stacklevel=2)
    return pts, valid, issues


def check_inside(image_id: str, index_points: np.ndarray, size: Sequence[int], labels: Sequence[str],
                 annotator: str = "", file: str = "") -> list[Issue]:
    """Points (continuous index, NaN skipped) outside the image ``[-0.5, size - 0.5]`` per axis."""
    idx = np.atleast_2d(np.asarray(index_points, dtype=np.float64))
    hi = np.asarray(size, dtype=np.float64) - 0.5
    out = []
    for label, p in zip(labels, idx):
        if not np.isnan(p).any() and (np.any(p < -0.5) or np.any(p > hi)):
            out.append(Issue(image_id, annotator, label, "outside",
                             f"index {_fmt([p])} outside image of size {tuple(int(s) for s in size)}", file))
    return out


def check_size(ann: RawAnnotation, size: Sequence[int], annotator: str = "") -> list[Issue]:
    """The image size stated by the annotation (if any) against the actual size ``(x, y[, z])``."""
    if ann.image_size is None or tuple(ann.image_size) == tuple(int(s) for s in size):
        return []
    return [Issue(ann.image_id, annotator, "", "size_mismatch",
                  f"annotation says {tuple(ann.image_size)}, image is {tuple(int(s) for s in size)}", str(ann.source))]


def check_spacing(image_id: str, image_path: str | Path, spacing_given: bool, annotator: str = "") -> list[Issue]:
    """``no_spacing`` when the format carries no spacing (PNG, BMP, JPEG, TIFF) and none was given."""
    p = Path(image_path)
    if spacing_given or p.suffix.lower() not in FORMATS_WITHOUT_SPACING:
        return []
    return [Issue(image_id, annotator, "", "no_spacing",
                  f"{p.suffix} carries no spacing and none was given: 'mm' are pixels", str(p))]


def make_report(issues: Sequence[Issue]) -> pd.DataFrame:
    """Issues -> DataFrame with :data:`REPORT_COLUMNS` (sorted by annotator, image, landmark)."""
    df = pd.DataFrame([astuple(i) for i in issues], columns=list(REPORT_COLUMNS), dtype=object)
    return df.sort_values(["annotator", "image_id", "landmark", "issue"], kind="stable").reset_index(drop=True)


def summarize_report(report: pd.DataFrame, max_rows: int = 50, print_it: bool = True) -> str:
    """A readable summary: counts per (annotator, issue), then the rows (at most ``max_rows``)."""
    if report.empty:
        text = "annotation checks: no issues"
    else:
        counts = report.groupby(["annotator", "issue"]).size().rename("n").reset_index()
        lines = [f"annotation checks: {len(report)} issues in {report['image_id'].nunique()} images"]
        lines += [f"  {r.annotator or '-'}: {r.issue}: {r.n}" for r in counts.itertuples()]
        shown = report.head(max_rows)
        lines += [f"  [{r.annotator or '-'}] {r.image_id} {r.landmark or '(image)'}: {r.issue}: {r.detail}"
                  for r in shown.itertuples()]
        if len(report) > max_rows:
            lines.append(f"  ... {len(report) - max_rows} more rows")
        text = "\n".join(lines)
    if print_it:
        print(text)
    return text
