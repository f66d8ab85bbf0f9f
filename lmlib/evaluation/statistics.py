"""Statistics for comparing landmark detection methods on the same images.

- Paired tests: two-sided Wilcoxon signed-rank (``scipy.stats.wilcoxon``, default
  ``zero_method="wilcox"``: zero differences are dropped), paired BY IMAGE: each image's mean error over
  the landmarks both methods have (the landmarks of one image are correlated, so testing them as
  independent points overstated significance: 74 points of 2 images gave small p-values); p-values are
  Holm-corrected over all method pairs. Below :data:`MIN_TEST_IMAGES` images, intervals and tests are
  flagged as indicative by the comparison. Holm is written
  here (:func:`holm`): SciPy has no Holm correction (only ``false_discovery_control``, BH/BY).
- Bootstrap confidence intervals resample IMAGES (with all their landmarks), not points, since
  landmarks of one image are correlated. Percentile intervals; seeded; vectorised over resamples.

Errors are in mm; an error matrix is images x landmarks with NaN for masked / missing pairs.
"""
from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from lmlib.evaluation.metrics import DEFAULT_THRESHOLDS_MM, sdr_key

#: fewer test images than this: a bootstrap interval over images and a paired test by image say little
#: (with 2 images the 95 % interval is the min and max of two values); the comparison says so beside them
MIN_TEST_IMAGES = 10


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values (same order as given; NaN passes through, not counted).

    Sorted ascending p_(1) <= ... <= p_(m): adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).
    """
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out


def wilcoxon_paired(errors_a: np.ndarray, errors_b: np.ndarray) -> dict[str, float]:
    """Two-sided Wilcoxon signed-rank test of paired errors (mm) of methods A and B.

    Only pairs where both errors are valid are used. Returns n_pairs, n_nonzero (pairs with a
    non-zero difference), mean_diff_mm and median_diff_mm (A - B; negative = A better),
    statistic and p_value. Identical methods (no non-zero difference) give p_value 1.0 and no test;
    fewer than one pair gives NaN.
    """
    a = np.asarray(errors_a, dtype=np.float64).reshape(-1)
    b = np.asarray(errors_b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired errors differ in size: {a.shape} vs {b.shape}")
    both = ~np.isnan(a) & ~np.isnan(b)
    d = a[both] - b[both]
    out = {"n_pairs": int(d.size), "n_nonzero": int(np.count_nonzero(d)),
           "mean_diff_mm": float(d.mean()) if d.size else float("nan"),
           "median_diff_mm": float(np.median(d)) if d.size else float("nan"),
           "statistic": float("nan"), "p_value": float("nan")}
    if d.size == 0:
        return out
    if out["n_nonzero"] == 0:
        out["p_value"] = 1.0
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # small-sample / ties notes from SciPy
        res = sps.wilcoxon(a[both], b[both], zero_method="wilcox", alternative="two-sided")
    out["statistic"], out["p_value"] = float(res.statistic), float(res.pvalue)
    return out


def pairwise_wilcoxon(errors: pd.DataFrame, methods: Sequence[str] | None = None,
                      by: str | None = None, groups: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Wilcoxon tests for every pair of methods, Holm-corrected over all pairs.

    ``errors`` has one column per method and one row per aligned (image, landmark) pair (mm). ``by``:
    ``"image"`` (the default when the index has an ``image_id`` level) pairs the methods' per-image mean
    errors over the landmarks both have; ``"point"`` pairs every (image, landmark). ``groups`` (image id ->
    subject, with ``by="image"``): the images of one subject (posed copies of one anatomy) are one unit, paired
    by the mean of its images' means (``unit`` "subject"). Returns one row per pair: method_a, method_b, the
    fields of :func:`wilcoxon_paired` (``n_pairs``: subjects, images or points), ``unit``, p_holm and ``better``
    (the method with the lower mean error over the pairs, '' if tied).
    """
    methods = list(methods if methods is not None else errors.columns)
    has_images = "image_id" in (errors.index.names or [])
    by = by or ("image" if has_images else "point")
    if by not in ("image", "point") or (by == "image" and not has_images):
        raise ValueError(f"by={by!r}: 'point', or 'image' for errors indexed by image_id")
    rows = []
    for a, b in itertools.combinations(methods, 2):
        if by == "image":
            both = errors[[a, b]].dropna().groupby(level="image_id").mean()
            if groups:
                both = both.groupby(both.index.map(lambda i: groups[str(i)])).mean()
            res = wilcoxon_paired(both[a].to_numpy(), both[b].to_numpy())
        else:
            res = wilcoxon_paired(errors[a].to_numpy(), errors[b].to_numpy())
        diff = res["mean_diff_mm"]
        better = "" if not diff or np.isnan(diff) else (a if diff < 0 else b)
        rows.append({"method_a": a, "method_b": b, **res, "unit": "subject" if by == "image" and groups else by,
                     "better": better})
    cols = ["method_a", "method_b", "n_pairs", "n_nonzero", "mean_diff_mm", "median_diff_mm",
            "statistic", "p_value", "unit", "better"]
    table = pd.DataFrame(rows, columns=cols)
    table.insert(9, "p_holm", holm(table["p_value"].to_numpy()) if len(table) else [])
    return table


def holm_within(pairwise: pd.DataFrame, pairs: Iterable[tuple[str, str]]) -> pd.DataFrame:
    """The rows of :func:`pairwise_wilcoxon`'s table for ``pairs`` (either order), with ``p_holm`` recomputed over
    those rows only. The family is the comparisons a figure or a sentence states, not every pair the table holds:
    adding ablation rows to a comparison must not change a claim about its main rows."""
    wanted = {frozenset(p) for p in pairs}
    sub = pairwise[[frozenset((a, b)) in wanted for a, b in zip(pairwise["method_a"], pairwise["method_b"])]].copy()
    sub["p_holm"] = holm(sub["p_value"].to_numpy(dtype=np.float64))
    return sub


def significance_matrix(pairwise: pd.DataFrame, methods: Sequence[str] | None = None,
                        column: str = "p_holm") -> pd.DataFrame:
    """Square method x method table of ``column`` (symmetric; diagonal NaN) from :func:`pairwise_wilcoxon`."""
    if methods is None:
        methods = list(pd.unique(pd.concat([pairwise["method_a"], pairwise["method_b"]])))
    mat = pd.DataFrame(np.nan, index=list(methods), columns=list(methods))
    for row in pairwise.itertuples(index=False):
        a, b, v = row.method_a, row.method_b, getattr(row, column)
        if a in mat.index and b in mat.index:
            mat.loc[a, b] = mat.loc[b, a] = v
    return mat


def resample_indices(n_images: int, n_bootstrap: int = 2000, seed: int = 0) -> np.ndarray:
    """(n_bootstrap, n_images) image indices drawn with replacement (seeded ``default_rng``)."""
    return np.random.default_rng(seed).integers(0, n_images, size=(n_bootstrap, n_images))


def bootstrap_ci(errors: np.ndarray | pd.DataFrame, n_bootstrap: int = 2000, seed: int = 0,
                 thresholds_mm: Sequence[float] = DEFAULT_THRESHOLDS_MM, confidence: float = 0.95,
                 indices: np.ndarray | None = None, groups: Sequence[str] | None = None,
                 unpredicted: np.ndarray | pd.DataFrame | None = None) -> pd.DataFrame:
    """Point estimates and percentile bootstrap CIs of MRE (mm) and SDR (%), resampling images.

    ``errors`` is an images x landmarks matrix (mm; NaN = masked, left out). Each resample draws
    whole images with replacement and pools their valid errors, exactly as the point estimate
    pools all images. ``unpredicted`` (boolean, the shape of ``errors``): NaN errors of landmarks with a reference
    and no prediction, misses in the SDR (out of the MRE, as in :func:`~lmlib.evaluation.metrics.summarize`).
    ``groups`` (one subject per row of ``errors``): whole subjects are drawn instead (the
    posed copies of one anatomy are not independent images). Pass ``indices`` (from :func:`resample_indices`,
    over images, or over subjects in their order of first appearance) to use the same resamples for several
    methods. Returns a DataFrame indexed by metric (mre_mm, sdr_<t>mm) with columns estimate, ci_low, ci_high.
    """
    err = np.asarray(errors, dtype=np.float64)
    if err.ndim != 2:
        raise ValueError(f"errors must be images x landmarks, got shape {err.shape}")
    valid = ~np.isnan(err)
    missing = np.zeros(err.shape, dtype=bool) if unpredicted is None else np.asarray(unpredicted, dtype=bool)
    if missing.shape != err.shape:
        raise ValueError(f"unpredicted has shape {missing.shape}, errors {err.shape}")
    filled = np.where(valid, err, 0.0)
    counts = {"mre_mm": valid.sum(axis=1).astype(np.float64)}  # per image: the points each metric is over
    per_image = {"mre_mm": filled.sum(axis=1)}
    for t in thresholds_mm:
        per_image[sdr_key(t)] = 100.0 * (valid & (filled < t)).sum(axis=1)
        counts[sdr_key(t)] = (valid | missing).sum(axis=1).astype(np.float64)
    if groups is not None:  # a subject's sums and counts: the unit drawn
        codes = pd.factorize(np.asarray(groups, dtype=object))[0]
        if codes.size != err.shape[0]:
            raise ValueError(f"{codes.size} groups for {err.shape[0]} images")
        counts = {k: np.bincount(codes, weights=v) for k, v in counts.items()}
        per_image = {k: np.bincount(codes, weights=v) for k, v in per_image.items()}
    idx = resample_indices(counts["mre_mm"].size, n_bootstrap, seed) if indices is None else np.asarray(indices)
    alpha = (1.0 - confidence) / 2.0
    rows = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for key, values in per_image.items():
            n = counts[key]
            estimate = values.sum() / n.sum() if n.sum() else np.nan
            boot = values[idx].sum(axis=1) / n[idx].sum(axis=1)
            boot = boot[~np.isnan(boot)]
            lo, hi = np.quantile(boot, [alpha, 1.0 - alpha]) if boot.size else (np.nan, np.nan)
            rows[key] = {"estimate": float(estimate), "ci_low": float(lo), "ci_high": float(hi)}
    return pd.DataFrame.from_dict(rows, orient="index")
