"""Annotation checks: a report of every defect, and landmarks resolved without guessing.

Every check adds rows to one report (a pandas DataFrame with :data:`REPORT_COLUMNS`). A landmark
that cannot be trusted is MASKED (``valid=False``, NaN) for that image, with a ``warnings.warn``
naming the file and the label, and **every masked landmark has exactly one report row** whose
issue is in :data:`MASKING_ISSUES` (image-level causes give one row per landmark). Issue names:

masking (one row per masked landmark):

- ``duplicate``: a label given several times with different points;
- ``missing``: an expected label not given (empty / ``nan`` CSV cells included);
- ``non_finite``: a coordinate that is NaN, ``null`` or infinite;
- ``not_a_point``: a label given only as another shape (labelme polygon, line, rectangle, ...);
- ``outside``: a point more than :data:`OUTSIDE_TOLERANCE_PX` (0.5 px) beyond the image's pixel
  edges, i.e. a continuous index below ``-1`` or above ``size`` on some axis (``detail`` has it);
- ``no_annotation``: an image without annotation file or without a row in a one-file annotation;
- ``duplicate_image``: an image given by several records (rows) of a one-file annotation;
- ``excluded``: an (annotator, image) excluded by the dataset description;

not masking (reported, the landmark is kept):

- ``repeated``: a label given several times at the same point (kept once);
- ``unknown``: a label that is not one of the dataset's labels (ignored);
- ``shape_ignored``: a non-point shape beside a point of the same label, or with a label that is
  not the dataset's (ignored);
- ``size_mismatch``: the size stated by the annotation differs from the image's;
- ``no_spacing``: the image stores no spacing (its format, or a DICOM without a pixel-spacing attribute) and none
  was given (mm = pixels);
- ``no_image``: an annotation without image;
- ``split_without_image``: the split file names an id that no image has (the row is not used);
- ``not_in_split``: an image that the split file (or the declared subject splits) leaves out: it is in no split;
- ``identical_image``: the image holds the same pixels as another one (``detail`` names it and its split;
  a split file that puts copies on two sides is refused, a seeded split keeps them together).
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lmlib.data.readers import RawAnnotation, no_spacing_kind, stores_no_spacing

REPORT_COLUMNS: tuple[str, ...] = ("image_id", "annotator", "landmark", "issue", "detail", "file")
#: Issues whose row masks the landmark it names (exactly one such row per masked landmark).
MASKING_ISSUES: frozenset[str] = frozenset({"duplicate", "missing", "non_finite", "not_a_point", "outside",
                                            "no_annotation", "duplicate_image", "excluded"})
#: Issues about a whole image: one row per landmark of the image, all masked.
IMAGE_MASKING_ISSUES: frozenset[str] = frozenset({"no_annotation", "duplicate_image", "excluded"})
#: How far (pixels) a point may lie beyond the image's pixel edges before it is ``outside`` (masked):
#: clicks on the border are kept, a point clearly off the image is not.
OUTSIDE_TOLERANCE_PX: float = 0.5


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

    Returns ``(points (N, D), valid (N,), issues)``: non-finite points, duplicates with different
    points, labels given only as non-point shapes and missing labels are NaN/invalid with one
    masking row each (and warned about); identical repeats are kept once; unknown labels and other
    shapes are reported and ignored. ``D`` is ``ndim`` or the points' dimension.
    """
    labels = list(labels)
    dims = {p.size for pts in ann.points.values() for p in pts}
    d = ndim or (dims.pop() if len(dims) == 1 else 2)
    if any(k != d for k in dims):
        bad = sorted(lab for lab, pts in ann.points.items() if any(p.size != d for p in pts))
        raise ValueError(f"{ann.source}: points of {sorted(dims)} coordinates, expected {d} (labels {bad})")
    pts = np.full((len(labels), d), np.nan)
    issues: list[Issue] = []
    src = str(ann.source)
    for k, label in enumerate(labels):
        given = ann.points.get(label, [])
        shapes = ann.other_shapes.get(label, [])
        if not given and shapes:
            issues.append(Issue(ann.image_id, annotator, label, "not_a_point",
                                f"given only as {', '.join(shapes)}, not as a point", src))
        elif not given:
            issues.append(Issue(ann.image_id, annotator, label, "missing", "label not given", src))
        elif not all(np.isfinite(g).all() for g in given):
            issues.append(Issue(ann.image_id, annotator, label, "non_finite",
                                f"coordinates {_fmt(given)} ({ann.units}) are not finite", src))
        elif len(given) > 1 and not all(np.allclose(g, given[0], atol=atol) for g in given[1:]):
            issues.append(Issue(ann.image_id, annotator, label, "duplicate",
                                f"given {len(given)} times at {_fmt(given)} ({ann.units})", src))
        else:
            if len(given) > 1:
                issues.append(Issue(ann.image_id, annotator, label, "repeated",
                                    f"given {len(given)} times at the same point (kept once)", src))
            pts[k] = given[0]
        if given and shapes:
            issues.append(Issue(ann.image_id, annotator, label, "shape_ignored",
                                f"{', '.join(shapes)} ignored (the label's point is used)", src))
    for label in ann.points:
        if label not in labels:
            issues.append(Issue(ann.image_id, annotator, label, "unknown",
                                f"label not in the dataset's {len(labels)} labels (ignored)", src))
    for label, shapes in ann.other_shapes.items():
        if label not in labels:
            issues.append(Issue(ann.image_id, annotator, label, "shape_ignored",
                                f"{', '.join(shapes)} ignored (label not in the dataset's {len(labels)} labels)", src))
    valid = np.isfinite(pts).all(axis=1)
    if warn:
        warn_masked(issues)
    return pts, valid, issues


def check_inside(image_id: str, index_points: np.ndarray, size: Sequence[int], labels: Sequence[str],
                 annotator: str = "", file: str = "", tolerance: float = OUTSIDE_TOLERANCE_PX) -> list[Issue]:
    """``outside`` rows (masking) for points (continuous index; non-finite skipped: reported elsewhere)
    more than ``tolerance`` pixels beyond the image's pixel edges ``[-0.5, size - 0.5]`` on some axis."""
    idx = np.atleast_2d(np.asarray(index_points, dtype=np.float64))
    lo = -0.5 - tolerance
    hi = np.asarray(size, dtype=np.float64) - 0.5 + tolerance
    out = []
    for label, p in zip(labels, idx):
        if np.isfinite(p).all() and (np.any(p < lo) or np.any(p > hi)):
            out.append(Issue(image_id, annotator, label, "outside",
                             f"index {_fmt([p])} more than {tolerance:g} px outside image of size "
                             f"{tuple(int(s) for s in size)}", file))
    return out


def mask_image(image_id: str, labels: Sequence[str], issue: str, detail: str, file: str,
               annotator: str = "") -> list[Issue]:
    """One masking row per landmark for an image-level cause (``no_annotation``, ``duplicate_image``,
    ``excluded``)."""
    if issue not in IMAGE_MASKING_ISSUES:
        raise ValueError(f"{issue!r} is not an image-level masking issue ({sorted(IMAGE_MASKING_ISSUES)})")
    return [Issue(image_id, annotator, label, issue, detail, file) for label in labels]


def masked_by(issues: Sequence[Issue], labels: Sequence[str]) -> np.ndarray:
    """``(N,)`` bool: True where a masking issue names the label."""
    named = {i.landmark for i in issues if i.issue in MASKING_ISSUES}
    return np.array([label in named for label in labels], dtype=bool)


def warn_masked(issues: Sequence[Issue]) -> None:
    """One ``warnings.warn`` per masked landmark (per image for image-level causes), naming the file."""
    whole: dict[tuple[str, str, str, str], int] = defaultdict(int)
    for i in issues:
        if i.issue in IMAGE_MASKING_ISSUES:
            whole[(i.file, i.image_id, i.issue, i.detail)] += 1
        elif i.issue in MASKING_ISSUES:
            warnings.warn(f"{i.file}: landmark {i.landmark!r} {i.issue} ({i.detail}); masked for image "
                          f"{i.image_id}", stacklevel=3)
    for (file, image_id, issue, detail), n in whole.items():
        warnings.warn(f"{file}: all landmarks of image {image_id} masked ({n}, {issue}): {detail}", stacklevel=3)


def check_size(ann: RawAnnotation, size: Sequence[int], annotator: str = "") -> list[Issue]:
    """The image size stated by the annotation (if any) against the actual size ``(x, y[, z])``."""
    if ann.image_size is None or tuple(ann.image_size) == tuple(int(s) for s in size):
        return []
    return [Issue(ann.image_id, annotator, "", "size_mismatch",
                  f"annotation says {tuple(ann.image_size)}, image is {tuple(int(s) for s in size)}", str(ann.source))]


def check_spacing(image_id: str, image_path: str | Path, spacing_given: bool, annotator: str = "") -> list[Issue]:
    """``no_spacing`` when the image stores no spacing (PNG, BMP, JPEG, TIFF; a DICOM without a pixel-spacing
    attribute) and none was given."""
    p = Path(image_path)
    if spacing_given or not stores_no_spacing(p):
        return []
    return [Issue(image_id, annotator, "", "no_spacing", f"{no_spacing_kind(p)} carries no spacing and none was "
                  "given: 'mm' are pixels", str(p))]


def make_report(issues: Sequence[Issue]) -> pd.DataFrame:
    """Issues -> DataFrame with :data:`REPORT_COLUMNS` (sorted by annotator, image, landmark)."""
    df = pd.DataFrame([astuple(i) for i in issues], columns=list(REPORT_COLUMNS), dtype=object)
    return df.sort_values(["annotator", "image_id", "landmark", "issue"], kind="stable").reset_index(drop=True)


def masked_counts(report: pd.DataFrame) -> dict[str, int]:
    """Masked landmarks per annotator (= the number of its masking rows)."""
    rows = report[report["issue"].isin(MASKING_ISSUES)]
    return {str(k): int(v) for k, v in rows.groupby("annotator").size().items()}


def summarize_report(report: pd.DataFrame, max_rows: int = 50, print_it: bool = True) -> str:
    """A readable summary: masked landmarks per annotator, counts per (annotator, issue), then the rows
    (at most ``max_rows``)."""
    if report.empty:
        text = "annotation checks: no issues"
    else:
        counts = report.groupby(["annotator", "issue"]).size().rename("n").reset_index()
        masked = masked_counts(report)
        orphans = report[report["issue"] == "no_image"]
        own = report[report["issue"] != "no_image"]
        # the headline counts the data set's images; annotation records without an image are one line (a CSV
        # of 901 rows for a 9-image sample read "901 issues in 901 images" before)
        lines = [f"annotation checks: {len(own)} issues in {own['image_id'].nunique()} images"
                 + (f"; {len(orphans)} annotation record(s) without an image (e.g. "
                    f"{', '.join(map(str, orphans['image_id'].head(3)))})" if len(orphans) else "")]
        lines.append("masked landmarks: " + (", ".join(f"{k or '-'}: {v}" for k, v in masked.items()) or "none")
                     + (" (one report row each)" if masked else ""))
        lines += [f"  {r.annotator or '-'}: {r.issue}: {r.n}{' (masked)' if r.issue in MASKING_ISSUES else ''}"
                  for r in counts.itertuples()]
        # an image-level cause (no annotation file, excluded, ...) masks every landmark: one line, not one each
        keys = ["annotator", "image_id", "issue", "detail"]
        whole = own["issue"].isin(IMAGE_MASKING_ISSUES)
        grouped = own[whole].groupby(keys, sort=False).size().rename("n").reset_index()
        items = [f"  [{r.annotator or '-'}] {r.image_id} (all {r.n} landmarks): {r.issue}: {r.detail}"
                 for r in grouped.itertuples()]
        items += [f"  [{r.annotator or '-'}] {r.image_id} {r.landmark or '(image)'}: {r.issue}: {r.detail}"
                  for r in own[~whole].itertuples()]
        lines += items[:max_rows]
        if len(items) > max_rows:
            lines.append(f"  ... {len(items) - max_rows} more rows")
        text = "\n".join(lines)
    if print_it:
        print(text)
    return text
