"""Multi-atlas registration: the classical baseline, with no training (2D and 3D).

Each test image is registered with SimpleITK to ``n_atlases`` annotated training images: an affine transform
(Mattes mutual information, three resolution levels, centres of mass aligned first), then optionally a
deformable one (diffeomorphic demons on the affinely aligned, histogram-matched images, coarse to fine). Each
atlas's landmarks are mapped through its transform and the atlases are fused by the median of each coordinate.

Atlas selection (``n_selected``; Aljabar et al., NeuroImage 2009): after the affine stage, only the atlases whose
images correlate best with the test image (ITK's normalised correlation over their overlap) go on to the
deformable stage and the fusion. An atlas of another appearance (a skull-stripped template registered onto a
head with its skull, or the reverse) is then left out instead of pulling the fused points. The atlases
themselves are drawn in turn from each original image (posed copies of one image are one group), so that every
training anatomy can be chosen.

Registration runs on a working copy of each image: its whole field of view resampled (anti-aliased) onto an
isotropic grid whose longest side is ``image_size`` px, z-scored (the same grid rule as every method's view:
:func:`lmlib.data.grids.preprocessing_grids` with the aspect ratio kept). The fixed image is the atlas, the
moving one the test image, so a transform maps atlas points (world mm) straight to test-image points (world mm);
no inverse is needed. Coordinates are world mm ``(x, y[, z])`` throughout.

Its time per test image (all atlases) is its inference time; its training time is 0. The parameters are fixed
in advance (nothing is tuned on ``test``); ``val`` is not needed.

Why by hand: SimpleITK is the registration library; the multi-atlas loop (atlas choice, point mapping, median
fusion) is a few lines that no library offers in this form for landmarks.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Annotated, Any

import numpy as np
import SimpleITK as sitk

from lmlib.data.grids import normalize_intensity, preprocessing_grids, resample
from lmlib.data.sample import Sample
from lmlib.methods.base import LandmarkMethod
from lmlib.methods.config import MethodParameters, defaults
from lmlib.typed import Int, Number, field, one_of

DEFORMABLE = ("demons", "none")


class RegistrationParameters(MethodParameters):
    """The multi-atlas registration's notebook parameters (beyond the shared ones)."""

    n_atlases: Int = field(5, "training images registered onto each test image (their landmarks fused by the "
                              "median)", "an integer >= 1", ge=1)
    deformable: Annotated[str, one_of(DEFORMABLE)] = field(
        "demons", "demons (affine, then diffeomorphic demons) | none (affine only)", "demons or none")
    levels: Int = field(3, "resolution levels of each registration stage (shrink 2^(levels-1) ... 1)",
                        "an integer >= 1", ge=1)
    affine_iterations: Int = field(100, "optimiser iterations per level (affine stage)", "an integer >= 1", ge=1)
    demons_iterations: Int = field(50, "demons iterations per level", "an integer >= 1", ge=1)
    demons_sigma_mm: Number = field(2.0, "smoothing of the demons displacement field in mm (larger is stiffer)",
                                    "a number > 0 (mm)", gt=0)
    n_selected: Int = field(0, "atlases kept per test image: those correlating best with it after the affine "
                               "stage (0 keeps every atlas)", "an integer >= 0 (0 = every atlas)", ge=0)


_D = defaults(RegistrationParameters)


class MultiAtlasRegistration(LandmarkMethod):
    """Affine (+ demons) registration of ``n_atlases`` training images onto each test image; median fusion.

    Args:
        spatial_dims / n_landmarks: as every method.
        n_atlases: training images used as atlases (a seeded choice among those with every landmark valid).
        deformable: ``"demons"`` (diffeomorphic demons after the affine) or ``"none"`` (affine only).
        levels: resolution levels of each stage (shrink factors 2^(levels-1) ... 1).
        affine_iterations: optimiser iterations per level of the affine stage.
        demons_iterations: demons iterations per level.
        demons_sigma_mm: Gaussian smoothing of the demons displacement field (mm, regularisation).
        n_selected: atlases kept per test image, by their correlation with it after the affine stage (0: all).
        seed: atlas choice and the metric's sampling.
    """

    name = "registration"
    trainable = False
    Parameters = RegistrationParameters

    def __init__(self, spatial_dims: int, n_landmarks: int, n_atlases: int = _D["n_atlases"],
                 deformable: str = _D["deformable"], levels: int = _D["levels"],
                 affine_iterations: int = _D["affine_iterations"], demons_iterations: int = _D["demons_iterations"],
                 demons_sigma_mm: float = _D["demons_sigma_mm"], n_selected: int = _D["n_selected"], seed: int = 0,
                 **_: Any) -> None:
        super().__init__(spatial_dims, n_landmarks)
        if deformable not in DEFORMABLE:
            raise ValueError(f"deformable must be one of {DEFORMABLE}, got {deformable!r}")
        for key, value in (("n_atlases", n_atlases), ("levels", levels), ("affine_iterations", affine_iterations),
                           ("demons_iterations", demons_iterations)):
            if int(value) < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        if not float(demons_sigma_mm) > 0:
            raise ValueError(f"demons_sigma_mm must be > 0 mm, got {demons_sigma_mm!r}")
        if not 0 <= int(n_selected) <= int(n_atlases):
            raise ValueError(f"n_selected must be an integer in [0, n_atlases={n_atlases}], got {n_selected!r}")
        self.n_atlases, self.deformable, self.levels = int(n_atlases), deformable, int(levels)
        self.n_selected = int(n_selected)
        self.affine_iterations, self.demons_iterations = int(affine_iterations), int(demons_iterations)
        self.demons_sigma_mm, self.seed = float(demons_sigma_mm), int(seed)

    def config(self) -> dict[str, Any]:
        return {"spatial_dims": self.spatial_dims, "n_landmarks": self.n_landmarks, "n_atlases": self.n_atlases,
                "deformable": self.deformable, "levels": self.levels, "affine_iterations": self.affine_iterations,
                "demons_iterations": self.demons_iterations, "demons_sigma_mm": self.demons_sigma_mm,
                "n_selected": self.n_selected, "seed": self.seed}

    @classmethod
    def from_parameters(cls, spatial_dims: int, n_landmarks: int, params: Mapping[str, Any],
                        **shared: Any) -> MultiAtlasRegistration:
        return cls(spatial_dims, n_landmarks, seed=int(params.get("seed", 0)), **cls.values(params))

    def build_network(self) -> Any:
        raise TypeError("registration has no network: it is run by predict_samples(atlases, samples, size)")

    # ------------------------------------------------------------------------------------------------ atlases
    def choose_atlases(self, train: Sequence[Sample]) -> list[Sample]:
        """``n_atlases`` training samples (seeded), preferring those with every landmark valid, drawn in turn from
        each original image (posed copies of one image, ``meta["posed_from"]``, are one group; with no copies
        this is a seeded random choice)."""
        complete = [s for s in train if s.valid.all()]
        pool = complete if len(complete) >= self.n_atlases else list(train)
        if not pool:
            raise ValueError("registration needs at least one annotated training image as an atlas")
        groups: dict[str, list[int]] = {}  # original image -> pool indices, in the seeded order
        for i in np.random.default_rng(self.seed).permutation(len(pool)):
            groups.setdefault(str(pool[i].meta.get("posed_from", pool[i].image_id)), []).append(int(i))
        order: list[int] = []
        for turn in range(max(len(g) for g in groups.values())):
            order += [g[turn] for g in groups.values() if turn < len(g)]
        return [pool[i] for i in sorted(order[: self.n_atlases])]

    # ------------------------------------------------------------------------------------------------ predict
    def predict_samples(self, atlases: Sequence[Sample], samples: Sequence[Sample], size: Sequence[int],
                        progress: bool | str = True, choices: list[dict[str, Any]] | None = None
                        ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """World-mm predictions ``(N, D)`` for each of ``samples`` and the kept atlases' spread around them
        (``(N,)`` mm: the median distance of the mapped atlas points to the fused point; NaN with one atlas).
        ``progress``: a live bar (True or ``"bar"``), a line per image with its time and kept atlases (``"lines"``:
        the driver's choice) or nothing (False). ``choices``, when given and ``n_selected`` leaves atlases out,
        receives one row per sample and atlas: ``image_id``, ``atlas``, ``correlation`` (after the affine stage)
        and ``kept``."""
        from tqdm.auto import tqdm

        from lmlib.runtime import bars_disabled

        fixed = [(working_image(a, size), a.landmarks_mm) for a in atlases]
        preds, spreads = [], []
        workers = max(1, min(len(fixed), os.cpu_count() or 1))
        bar = progress is True or progress == "bar"
        with single_threaded_itk(), ThreadPoolExecutor(workers) as pool:
            for i, s in enumerate(tqdm(samples, desc=f"registration ({len(atlases)} atlases)", unit="image",
                                       disable=not bar or bars_disabled())):
                t0 = time.perf_counter()
                moving = working_image(s, size)
                # one atlas per Python thread, each registration single-threaded inside ITK: ITK's threaded sums
                # differ in the last bits between runs, so this keeps reruns exact and still uses every core
                affines = list(pool.map(lambda f, m=moving: affine_registration(
                    f[0], m, self.levels, self.affine_iterations, self.seed), fixed))
                scores = np.full(len(fixed), np.nan)
                keep = list(range(len(fixed)))
                if 0 < self.n_selected < len(fixed):
                    scores = np.array(list(pool.map(lambda f, t, m=moving: correlation(f[0], m, t), fixed, affines)))
                    keep = sorted(np.argsort(-scores, kind="stable")[: self.n_selected].tolist())
                transforms = list(pool.map(lambda k, m=moving, a=affines: self.deform(fixed[k][0], m, a[k]), keep))
                mapped = np.stack([map_points(t, fixed[k][1]) for k, t in zip(keep, transforms)])
                fused = np.nanmedian(mapped, axis=0)  # (A, N, D) -> (N, D)
                preds.append(fused)
                dist = np.linalg.norm(mapped - fused[None], axis=2)
                spreads.append(np.nanmedian(dist, axis=0) if len(keep) > 1 else np.full(len(fused), np.nan))
                if choices is not None and len(keep) < len(fixed):
                    choices += [{"image_id": s.image_id, "atlas": a.image_id, "correlation": float(scores[k]),
                                 "kept": k in keep} for k, a in enumerate(atlases)]
                if progress == "lines":
                    kept = "" if len(keep) == len(fixed) else f"; kept {', '.join(atlases[k].image_id for k in keep)}"
                    print(f"registration {i + 1}/{len(samples)} {s.image_id}: {time.perf_counter() - t0:.0f} s{kept}",
                          flush=True)
        return preds, spreads

    def deform(self, fixed: sitk.Image, moving: sitk.Image, affine: sitk.Transform) -> sitk.Transform:
        """The transform mapping ``fixed`` (atlas) points in world mm to ``moving`` (test image) points: ``affine``
        (:func:`affine_registration`) followed by the deformable stage (``deformable="none"``: ``affine`` itself)."""
        if self.deformable == "none":
            return affine
        field = demons_registration(fixed, sitk.Resample(moving, fixed, affine, sitk.sitkLinear, 0.0),
                                    self.levels, self.demons_iterations, self.demons_sigma_mm)
        return sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(field)])  # field first, then affine


@contextmanager
def single_threaded_itk() -> Iterator[None]:
    """ITK filters on one thread each inside the block (the previous default restored after)."""
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def working_image(sample: Sample, size: Sequence[int]) -> sitk.Image:
    """The sample's whole field of view on an isotropic grid of at most ``size`` px, z-scored, as SimpleITK."""
    grid = preprocessing_grids(sample, tuple(int(v) for v in size), keep_aspect=True)[0]
    pixels = normalize_intensity(resample(sample, grid), "zscore")
    return grid.geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(pixels.T)))


def map_points(transform: sitk.Transform, points_mm: np.ndarray) -> np.ndarray:
    """``(N, D)`` world mm through ``transform``; NaN rows stay NaN."""
    out = np.full_like(points_mm, np.nan, dtype=np.float64)
    for k, p in enumerate(points_mm):
        if np.isfinite(p).all():
            out[k] = transform.TransformPoint([float(v) for v in p])
    return out


def correlation(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
    """How alike ``fixed`` and ``moving`` are through ``transform`` (fixed -> moving points): the squared normalised
    correlation over their overlap, in [0, 1] (ITK's correlation metric, which is its negative)."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetInitialTransform(transform)
    return -float(reg.MetricEvaluate(sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32)))


def _pyramid(levels: int) -> tuple[list[int], list[float]]:
    shrink = [2 ** k for k in range(levels - 1, -1, -1)]
    return shrink, [float(max(0, f - 1)) for f in shrink]  # smoothing sigmas in px of each level


def affine_registration(fixed: sitk.Image, moving: sitk.Image, levels: int = 3, iterations: int = 100,
                        seed: int = 0) -> sitk.Transform:
    """Affine transform (fixed -> moving points, world mm): centres of mass aligned, then Mattes mutual information
    with regular-step gradient descent, scales from physical shifts, ``levels`` resolution levels."""
    d = fixed.GetDimension()
    positive = [sitk.RescaleIntensity(sitk.Cast(im, sitk.sitkFloat32), 0.0, 1.0) for im in (fixed, moving)]
    initial = sitk.CenteredTransformInitializer(*positive, sitk.AffineTransform(d),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.REGULAR)
    reg.SetMetricSamplingPercentage(0.5, int(seed) + 1)  # SimpleITK reads seed 0 as "from the wall clock"
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=int(iterations),
                                                 relaxationFactor=0.7, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    shrink, sigmas = _pyramid(levels)
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(sigmas)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(initial, inPlace=False)
    return reg.Execute(sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32))


def demons_registration(fixed: sitk.Image, moved: sitk.Image, levels: int = 3, iterations: int = 50,
                        sigma_mm: float = 2.0) -> sitk.Image:
    """Displacement field (vector image on ``fixed``'s grid, mm) of diffeomorphic demons from ``fixed`` to ``moved``
    (already affinely aligned onto fixed's grid), coarse to fine; ``moved``'s histogram is matched to fixed's."""
    moved = sitk.HistogramMatching(sitk.Cast(moved, sitk.sitkFloat32), sitk.Cast(fixed, sitk.sitkFloat32),
                                   numberOfHistogramLevels=256, numberOfMatchPoints=15, thresholdAtMeanIntensity=True)
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    demons = sitk.DiffeomorphicDemonsRegistrationFilter()
    demons.SetNumberOfIterations(int(iterations))
    demons.SetSmoothDisplacementField(True)
    field: sitk.Image | None = None
    for shrink in _pyramid(levels)[0]:
        f = sitk.Shrink(sitk.SmoothingRecursiveGaussian(fixed, 0.5 * shrink * fixed.GetSpacing()[0]) if shrink > 1
                        else fixed, [shrink] * fixed.GetDimension())
        m = sitk.Resample(moved if shrink == 1 else sitk.SmoothingRecursiveGaussian(moved, 0.5 * shrink *
                                                                                   fixed.GetSpacing()[0]), f)
        demons.SetStandardDeviations(max(0.5, sigma_mm / f.GetSpacing()[0]))  # in px of this level
        if field is None:
            field = demons.Execute(f, m)
        else:
            start = sitk.Resample(field, f, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
            field = demons.Execute(f, m, start)
    assert field is not None
    return sitk.Cast(sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID()),
                     sitk.sitkVectorFloat64)


METHOD = MultiAtlasRegistration
