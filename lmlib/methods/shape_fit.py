"""A shape prior after any finished run: the training landmarks' mean shape fitted robustly to each image's
predictions, and the landmarks that do not fit it replaced by the fitted shape's.

Nothing is trained here beyond the mean shape. A heatmap network places each landmark on its own: on an anatomy
it never saw it can put one on the wrong structure (a temporal horn on the other side, tens of mm away) while most
land near their place. The configuration of all landmarks together rules such a point out. Per image:

1. **Mean shape**: the training landmarks (world mm) aligned by generalised Procrustes analysis (similarity
   transforms, :func:`procrustes_mean`), kept at the training shapes' mean size in mm.
2. **Robust fit**: the similarity transform (rotation, isotropic scale in ``scale_bounds``, translation) taking the
   mean shape onto the predictions with the least median of squared residuals (LMedS; Rousseeuw and Leroy, *Robust
   regression and outlier detection*, 1987), over every minimal subset of landmarks (3 in 3D, 2 in 2D; a random
   ``max_subsets`` of them when there are more). LMedS needs no threshold in mm: it fits the better half.
3. **Outliers**: a landmark whose residual to that fit exceeds the 97.5 % point of its distribution under Gaussian
   noise (``sqrt(chi2_D(0.975))`` times the robust scale of LMedS) is an outlier. Each landmark's residual is
   measured in units of its own spread about the mean shape in the training sets (:func:`landmark_spread`,
   relative to the median landmark's): a landmark whose anatomy varies three times more than the others' is not an
   outlier for being three times further from the mean shape (with one scale for all, such landmarks made most of
   the "outliers" of well-placed predictions, and replacing them moved them further away). The shape is then
   fitted again by least squares to the other landmarks, by a similarity or an affine transform (``transform``).
4. **Output** (``output``): ``outliers`` keeps each prediction and puts the fitted shape's position in place of
   each outlier; ``shape`` gives the fitted shape for every landmark (the base run only places the shape). A
   landmark the base run did not place stays without a prediction (so every candidate is scored on the same
   landmarks).

Honest use: the variant (``none``, the base run as it is, or a transform and an output) is chosen on the val split
(the base run's val predictions, made from its checkpoints as a refinement's are, :mod:`lmlib.engine.base_run`);
the test split is predicted once with it. The val error of every candidate is kept (``table_val_choice.csv``).
Training time: the base run's plus the mean shape's and the choice on val; inference: the base run's plus the fit's
per image. With too few landmarks for a fit (a minimal subset plus two) only ``none`` is left, said in the output.

Why by hand: scikit-image and scikit-learn have RANSAC, which needs an inlier threshold in mm that would have to
be chosen; LMedS needs none, and neither library has it. Coordinates: world mm ``(x, y[, z])`` throughout.
"""
from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from math import comb
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import AfterValidator, Field
from scipy.stats import chi2

from lmlib.methods.base import DerivedPredictions, LandmarkMethod
from lmlib.methods.config import MethodParameters, base_run_field, base_run_folder, defaults
from lmlib.typed import Int, Number, field, one_of

TRANSFORMS = ("similarity", "affine")
OUTPUTS = ("outliers", "shape")
#: the candidates chosen among on val: the base run unchanged, then each transform and output
NONE = "none"
VARIANTS = (NONE, *(f"{t}/{o}" for t in TRANSFORMS for o in OUTPUTS))
#: the outlier cut: this quantile of the chi-square distribution of a squared residual (D degrees of freedom)
OUTLIER_QUANTILE = 0.975


def _different(values: list[str]) -> list[str]:
    if len(set(values)) != len(values):
        raise ValueError("each variant once")
    return values


def _ordered(bounds: list[float]) -> list[float]:
    if not bounds[0] < bounds[1]:
        raise ValueError("the smaller bound first")
    return bounds


class ShapeFitParameters(MethodParameters):
    """The shape prior's notebook parameters (beyond the shared ones)."""

    base_method: str = field("heatmap_unet", "the finished run fitted: the run folder of this name beside output_dir "
                                             "(its checkpoints kept, for its val predictions)", "a run folder name",
                             min_length=1)
    base_run: str = base_run_field()
    variants: Annotated[list[Annotated[str, one_of(VARIANTS)]], AfterValidator(_different)] = field(
        list(VARIANTS), "the candidates chosen among on val: none (the base run unchanged) or transform/output, "
                        "transform similarity or affine, output outliers (replaced) or shape (all landmarks)",
        "a list of different names among " + ", ".join(VARIANTS), min_length=1)
    max_subsets: Int = field(20000, "LMedS: every minimal subset of landmarks when there are at most this many, "
                                    "else this many drawn at random (seeded)", "an integer of at least 100", ge=100)
    scale_bounds: Annotated[list[Annotated[Number, Field(gt=0.0)]], AfterValidator(_ordered)] = field(
        [0.5, 2.0], "LMedS: the similarity scales allowed between the mean shape and an image (a subset giving "
                    "another scale is degenerate)", "two positive numbers, the smaller first", min_length=2,
        max_length=2)


_D = defaults(ShapeFitParameters)


@dataclass(frozen=True)
class ShapeFit:
    """One image's fit: ``fitted`` ``(K, D)`` world mm (the mean shape moved onto the predictions), ``outlier``
    ``(K,)`` (a predicted landmark whose residual is beyond the cut)."""

    fitted: np.ndarray
    outlier: np.ndarray


def _similarity(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares similarity transforms (Umeyama 1991) of batches ``src``, ``dst`` ``(B, M, D)``: matrices
    ``A`` ``(B, D, D)`` (scale times rotation), translations ``(B, D)`` and scales ``(B,)``, ``dst ~ src A^T + t``."""
    ms, md = src.mean(axis=1, keepdims=True), dst.mean(axis=1, keepdims=True)
    a, b = src - ms, dst - md
    u, sv, vt = np.linalg.svd(np.einsum("bmi,bmj->bij", b, a) / src.shape[1])
    sign = np.ones(sv.shape)
    sign[:, -1] = np.sign(np.linalg.det(u @ vt))  # a reflection is not a pose: the last axis turned instead
    rot = u @ (sign[:, :, None] * vt)
    var = (a ** 2).sum(axis=(1, 2)) / src.shape[1]
    scale = np.where(var > 0, (sv * sign).sum(axis=1) / np.where(var > 0, var, 1.0), np.nan)
    mat = scale[:, None, None] * rot
    t = md[:, 0] - np.einsum("bij,bj->bi", mat, ms[:, 0])
    return mat, t, scale


#: an affine refit needs landmarks spread in every direction: the smallest singular value of the centred inliers
#: at least this fraction of the largest (coplanar inliers in 3D would leave the out-of-plane axis free)
AFFINE_SPREAD = 0.05


def _affine(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Least-squares affine transform ``dst ~ src A^T + t`` of ``(M, D)`` point sets; None when ``src`` does not
    span every direction (:data:`AFFINE_SPREAD`)."""
    sv = np.linalg.svd(src - src.mean(axis=0), compute_uv=False)
    if len(src) <= src.shape[1] or sv[-1] < AFFINE_SPREAD * sv[0]:
        return None
    x = np.c_[src, np.ones(len(src))]
    sol, *_ = np.linalg.lstsq(x, dst, rcond=None)
    return sol[:-1].T, sol[-1]


def _spans(points: np.ndarray) -> bool:
    """Whether ``(M, D)`` points fix a similarity: at least D of them, not all on one line (3D)."""
    if len(points) < points.shape[1]:
        return False
    sv = np.linalg.svd(points - points.mean(axis=0), compute_uv=False)
    return bool(sv[0] > 0 and (points.shape[1] == 2 or sv[1] > 1e-3 * sv[0]))


def procrustes_mean(shapes: Sequence[np.ndarray], iterations: int = 20) -> np.ndarray:
    """Generalised Procrustes mean ``(K, D)`` world mm of landmark sets ``(K, D)`` (NaN: not annotated): each set
    aligned to the current mean by a similarity transform over the landmarks both have, the mean recomputed, until
    it stops moving; kept at the sets' mean centroid size, centred at the origin. A landmark no set has stays NaN."""
    sets = [np.asarray(s, dtype=np.float64) for s in shapes]
    if not sets:
        raise ValueError("a mean shape needs at least one training landmark set")
    ndim = sets[0].shape[1]
    counts = np.stack([np.isfinite(s).all(axis=1) for s in sets]).sum(axis=0)
    if (counts > 0).sum() <= ndim:
        raise ValueError(f"a mean shape in {ndim}D needs more than {ndim} annotated landmarks, the training sets "
                         f"have {(counts > 0).sum()}")
    complete = [s for s in sets if np.isfinite(s).all()] or sets  # the size of whole shapes, when there are any
    size = float(np.mean([np.sqrt(np.nansum((s - np.nanmean(s, axis=0)) ** 2)) for s in complete]))
    mean = sets[int(np.argmax([np.isfinite(s).all(axis=1).sum() for s in sets]))].copy()
    for _ in range(iterations):
        aligned = []
        for s in sets:
            both = np.isfinite(s).all(axis=1) & np.isfinite(mean).all(axis=1)
            if not _spans(s[both]):  # too few shared landmarks to pose this set: left out of this round
                continue
            mat, t, _ = _similarity(s[both][None], mean[both][None])
            aligned.append(s @ mat[0].T + t[0])
        with warnings.catch_warnings():  # a landmark no aligned set has: NaN, said by the caller's checks
            warnings.simplefilter("ignore", RuntimeWarning)
            new = np.nanmean(np.stack(aligned), axis=0) if len(aligned) > 1 else aligned[0]
        new = new - np.nanmean(new, axis=0)
        new *= size / np.sqrt(np.nansum(new ** 2))
        moved = float(np.nanmax(np.abs(new - mean))) if np.isfinite(mean).any() else np.inf
        mean = new
        if moved < 1e-9:
            break
    return mean


#: a landmark's relative spread is kept within these bounds (a landmark the training sets pin exactly, or one of two
#: annotated once, must not get a zero or an unbounded tolerance)
SPREAD_BOUNDS = (0.25, 4.0)


def landmark_spread(shapes: Sequence[np.ndarray], mean: np.ndarray) -> np.ndarray:
    """Each landmark's spread ``(K,)`` about the mean shape ``(K, D)`` in the training sets ``(K, D)`` world mm, relative
    to the median landmark's: the RMS distance after each set is aligned to the mean by a similarity, divided by
    the median of those (within :data:`SPREAD_BOUNDS`; 1 for a landmark no aligned set has)."""
    ndim = mean.shape[1]
    squares, counts = np.zeros(len(mean)), np.zeros(len(mean))
    for s in (np.asarray(x, dtype=np.float64) for x in shapes):
        both = np.isfinite(s).all(axis=1) & np.isfinite(mean).all(axis=1)
        if not _spans(s[both]):
            continue
        mat, t, _ = _similarity(s[both][None], mean[both][None])
        d2 = ((s @ mat[0].T + t[0] - mean) ** 2).sum(axis=1)
        squares[both] += d2[both]
        counts[both] += 1
    rms = np.where(counts > 0, np.sqrt(squares / np.maximum(counts, 1) / ndim), np.nan)
    typical = np.nanmedian(rms) if np.isfinite(rms).any() else np.nan
    if not typical > 0:
        return np.ones(len(mean))
    return np.clip(np.where(np.isfinite(rms), rms / typical, 1.0), *SPREAD_BOUNDS)


def fit_shape(mean: np.ndarray, pred: np.ndarray, transform: str = "similarity", max_subsets: int = _D["max_subsets"],
              scale_bounds: Sequence[float] = _D["scale_bounds"], seed: int = 0,
              spread: np.ndarray | None = None) -> ShapeFit | None:
    """The mean shape ``(K, D)`` fitted to one image's predictions ``(K, D)`` (world mm; NaN: none) as the module
    docstring says, residuals in units of each landmark's relative ``spread`` ``(K,)`` (:func:`landmark_spread`;
    None: one scale for all); None when fewer than a minimal subset plus two landmarks are known."""
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    ndim = mean.shape[1]
    minimal = ndim  # landmarks fixing a similarity: 3 in 3D, 2 in 2D
    known = np.flatnonzero(np.isfinite(mean).all(axis=1) & np.isfinite(pred).all(axis=1))
    if len(known) < minimal + 2:
        return None
    src, dst = mean[known], pred[known]
    unit = np.ones(len(known)) if spread is None else np.asarray(spread, dtype=np.float64)[known]
    n_all = comb(len(known), minimal)
    if n_all <= max_subsets:
        subsets = np.array(list(itertools.combinations(range(len(known)), minimal)))
    else:
        subsets = np.random.default_rng(seed).random((max_subsets, len(known))).argsort(axis=1)[:, :minimal]
    mat, t, scale = _similarity(src[subsets], dst[subsets])
    lo, hi = float(min(scale_bounds)), float(max(scale_bounds))
    ok = np.isfinite(scale) & (scale >= lo) & (scale <= hi)
    if not ok.any():
        return None
    moved = np.einsum("bij,kj->bki", mat[ok], src) + t[ok][:, None]
    med = np.median(((moved - dst) ** 2).sum(axis=2) / unit ** 2, axis=1)
    best = int(np.argmin(med))
    # the robust scale of a residual with D degrees of freedom; Rousseeuw and Leroy's small-sample factor with the
    # landmarks beyond a minimal subset as the observations left
    sigma = (1.0 + 5.0 / (len(known) - minimal)) * np.sqrt(med[best] / chi2.ppf(0.5, ndim))
    cut = np.sqrt(chi2.ppf(OUTLIER_QUANTILE, ndim)) * sigma
    residual = np.linalg.norm(moved[best] - dst, axis=1) / unit
    inlier = residual <= cut
    need = ndim + 1 if transform == "affine" else minimal
    if inlier.sum() < need + 1:
        inlier = residual <= np.sort(residual)[need]
    refit = _affine(src[inlier], dst[inlier]) if transform == "affine" else None  # None: not spread, similarity
    if refit is None:
        m2, t2, _ = _similarity(src[inlier][None], dst[inlier][None])
        refit = m2[0], t2[0]
    fitted = mean @ refit[0].T + refit[1]
    outlier = np.zeros(len(mean), dtype=bool)  # a landmark without a prediction is not one: it stays without
    outlier[known] = ~inlier
    return ShapeFit(fitted, outlier)


def apply_variant(mean: np.ndarray, pred: Sequence[np.ndarray], variant: str, max_subsets: int = _D["max_subsets"],
                  scale_bounds: Sequence[float] = _D["scale_bounds"], seed: int = 0,
                  spread: np.ndarray | None = None) -> tuple[list[np.ndarray], int]:
    """Each image's predictions ``(K, D)`` world mm after ``variant`` (one of :data:`VARIANTS`; ``spread``: see
    :func:`fit_shape`), and the number of landmarks replaced. An image with too few predictions to fit keeps its
    own."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == NONE:
        return [np.asarray(p, dtype=np.float64) for p in pred], 0
    transform, output = variant.split("/")
    out, replaced = [], 0
    for i, p in enumerate(pred):
        p = np.asarray(p, dtype=np.float64)
        fit = fit_shape(mean, p, transform, max_subsets, scale_bounds, seed + i, spread)
        if fit is None:
            out.append(p)
            continue
        placed = np.isfinite(p).all(axis=1) & np.isfinite(fit.fitted).all(axis=1)
        take = placed if output == "shape" else fit.outlier
        out.append(np.where(take[:, None], fit.fitted, p))
        replaced += int(take.sum())
    return out, replaced


class ShapePrior(LandmarkMethod):
    """The training mean shape fitted robustly to a finished run's predictions (see the module docstring).

    Args:
        spatial_dims / n_landmarks: as every method.
        base_method / base_run: the finished run (folder name beside this run's, or a path).
        variants: the candidates chosen among on val (:data:`VARIANTS`).
        max_subsets / scale_bounds: the LMedS search (see :func:`fit_shape`).
    """

    name = "shape_fit"
    trainable = False
    derived_from = "predictions"  # the run path reads the base run's val and test predictions (lmlib.engine.runner)
    Parameters = ShapeFitParameters

    def __init__(self, spatial_dims: int, n_landmarks: int, base_method: str = _D["base_method"],
                 base_run: str = _D["base_run"], variants: Sequence[str] = _D["variants"],
                 max_subsets: int = _D["max_subsets"], scale_bounds: Sequence[float] = _D["scale_bounds"],
                 **_: Any) -> None:
        super().__init__(spatial_dims, n_landmarks)
        unknown = [v for v in variants if v not in VARIANTS]
        if not variants or unknown or len(set(variants)) != len(variants):
            raise ValueError(f"variants must be different names among {VARIANTS}, got {list(variants)}")
        lo, hi = (float(b) for b in scale_bounds)
        if not 0 < lo < hi:
            raise ValueError(f"scale_bounds must be two positive numbers, the smaller first, got {list(scale_bounds)}")
        self.base_method, self.base_run = str(base_method), str(base_run)
        self.variants, self.max_subsets, self.scale_bounds = [str(v) for v in variants], int(max_subsets), [lo, hi]
        self.mean_shape: np.ndarray | None = None
        self.relative_spread: np.ndarray | None = None  # (K,) each landmark's relative spread in the training sets

    def config(self) -> dict[str, Any]:
        return {"spatial_dims": self.spatial_dims, "n_landmarks": self.n_landmarks, "base_method": self.base_method,
                "base_run": self.base_run, "variants": list(self.variants), "max_subsets": self.max_subsets,
                "scale_bounds": list(self.scale_bounds)}

    @classmethod
    def from_parameters(cls, spatial_dims: int, n_landmarks: int, params: Mapping[str, Any],
                        **shared: Any) -> ShapePrior:
        return cls(spatial_dims, n_landmarks, **cls.values(params))

    def build_network(self) -> Any:
        raise TypeError("the shape prior has no network: it moves a finished run's predictions")

    def base_folder(self, output_dir: str | Path) -> Path:
        """The finished run fitted: ``base_run``, else ``<output_dir>/../<base_method>``."""
        return base_run_folder(self.base_run, self.base_method, output_dir)

    def fit_mean(self, train_mm: Sequence[np.ndarray]) -> np.ndarray:
        """The training landmark sets' Procrustes mean and each landmark's relative spread about it (kept for
        :meth:`apply`)."""
        self.mean_shape = procrustes_mean(train_mm)
        self.relative_spread = landmark_spread(train_mm, self.mean_shape)
        return self.mean_shape

    def apply(self, pred: Sequence[np.ndarray], variant: str, seed: int = 0) -> tuple[list[np.ndarray], int]:
        """``pred`` after ``variant`` with the fitted mean shape (:func:`apply_variant`; ``none`` needs none)."""
        if variant == NONE:
            return [np.asarray(p, dtype=np.float64) for p in pred], 0
        if self.mean_shape is None:
            raise RuntimeError("fit_mean first: the mean shape comes from the training landmarks")
        return apply_variant(self.mean_shape, pred, variant, self.max_subsets, self.scale_bounds, seed, self.relative_spread)

    def derive(self, train_mm: Sequence[np.ndarray], val_mm: Sequence[np.ndarray],
               val_error: Callable[[Sequence[np.ndarray]], float], test_mm: Sequence[np.ndarray], seed: int = 0
               ) -> DerivedPredictions:
        """The mean shape of the training landmark sets ``train_mm``; each variant applied to the base run's val
        predictions ``val_mm`` and scored by ``val_error`` (the val MRE in mm, the engine's); the best (the first
        listed among equals) applied to the base run's test predictions ``test_mm``. All world mm ``(K, D)``. The
        training time returned is the mean shape's and the choice's."""
        t0 = time.perf_counter()
        variants = list(self.variants)
        try:
            self.fit_mean(train_mm)
        except ValueError as exc:  # too few landmarks for a shape: the base run as it is
            print(f"no shape prior: {exc}; the base run's predictions are kept")
            variants = [NONE]
        rows: list[dict[str, Any]] = []
        for variant in variants:
            moved, replaced = self.apply(val_mm, variant, seed)
            rows.append({"variant": variant, "val_mre_mm": float(val_error(moved)), "replaced": replaced})
            print(f"val: {variant:<20} MRE {rows[-1]['val_mre_mm']:.3f} mm, {replaced} landmarks replaced")
        chosen = min(rows, key=lambda r: r["val_mre_mm"])
        for row in rows:
            row["chosen"] = row is chosen
        choice_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        test, replaced = self.apply(test_mm, str(chosen["variant"]), seed)
        per_image = (time.perf_counter() - t0) / max(1, len(test))
        print(f"chosen on val: {chosen['variant']} ({chosen['val_mre_mm']:.3f} mm); test: {replaced} landmarks "
              f"replaced, {per_image:.3f} s per image")
        mean = self.mean_shape.tolist() if self.mean_shape is not None and variants != [NONE] else None
        return DerivedPredictions(test, choice_s, per_image,
                                  metrics={"chosen_variant": chosen["variant"], "val_mre_mm": chosen["val_mre_mm"],
                                           "replaced": replaced, "derive_seconds": choice_s},
                                  manifest={"chosen_variant": chosen["variant"], "mean_shape_mm": mean,
                                            "landmark_spread": self.relative_spread.tolist() if mean is not None and
                                            self.relative_spread is not None else None},
                                  tables={"table_val_choice": rows})

METHOD = ShapePrior
