"""Per-item augmentation time: the former two-pass pipeline vs :func:`lmlib.data.transforms.build_augmentation`.

Before: affine (MONAI ``RandAffine``, one resampling) -> elastic (hand-written field, a second
resampling) -> intensity; the two geometric stages are kept here verbatim (``_TwoPass*``) so the
comparison stays runnable after the library moved to one resampling pass.
After: ``build_augmentation`` (flip, affine and elastic composed into one sampling grid) -> intensity.

Both at 256x320 (2D, 1 channel) and 96^3 (3D, 1 channel), affine + elastic (prob 1) + intensity on
(and, for reference, affine + intensity without elastic: one resampling before and after), torch
threads = 1, median of ``--items`` items after ``--warmup`` items. Prints a markdown table.

    .venv/bin/python scripts/bench_augmentation.py [--items 20] [--warmup 3]
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, RandAffine, Resample
from monai.utils import convert_to_numpy
from scipy.ndimage import gaussian_filter, map_coordinates

from lmlib.data.transforms import (
    _LandmarkTransform,
    _plain,
    build_augmentation,
    intensity_transforms,
    make_item,
    mark_outside,
)

Data = dict[str, Any]


# ------------------------------------------------------------------ the former two-pass stages (verbatim)
class _TwoPassAffine(_LandmarkTransform):
    """Former ``RandAffineLandmarksd``: MONAI ``RandAffine`` resamples the image; landmarks via ``A^-1``."""

    def __init__(self, ndim: int, prob: float = 1.0, rotation_deg: float = 10.0, scale: float = 0.1,
                 translation_frac: float = 0.05, shear: float = 0.0, padding_mode: str = "zeros") -> None:
        super().__init__(prob)
        rot = float(np.deg2rad(rotation_deg))
        self.translation_frac = translation_frac
        self.inner = RandAffine(prob=1.0, rotate_range=(rot,) if ndim == 2 else (rot,) * 3,
                                scale_range=(scale,) * ndim,
                                shear_range=(shear,) * (2 if ndim == 2 else 6) if shear else None,
                                padding_mode=padding_mode)
        self.inner.resampler.dtype = torch.float32
        self.set_random_state(state=self.R)

    def __call__(self, data: Data) -> Data:
        self.randomize(None)
        if not self._do_transform:
            return data
        size = np.asarray(data["image"].shape[1:], dtype=np.float64)
        self.inner.rand_affine_grid.translate_range = tuple(float(self.translation_frac * n) for n in size)
        image = self.inner(data["image"], randomize=True)
        matrix = np.asarray(convert_to_numpy(self.inner.rand_affine_grid.get_transformation_matrix()), np.float64)
        inv, c = np.linalg.inv(matrix), (size - 1) / 2
        lm = (np.asarray(data["landmarks"], dtype=np.float64) - c) @ inv[:-1, :-1].T + inv[:-1, -1] + c
        return mark_outside({**data, "image": _plain(image), "landmarks": lm})


class _TwoPassElastic(_LandmarkTransform):
    """Former ``RandElasticLandmarksd``: float64 field, second ``Resample``, 50 fixed-point iterations."""

    def __init__(self, prob: float = 1.0, sigma_frac: float = 0.1, magnitude_frac: float = 0.02,
                 padding_mode: str = "zeros", iterations: int = 50, tol: float = 1e-3) -> None:
        super().__init__(prob)
        self.sigma_frac, self.magnitude_frac = sigma_frac, magnitude_frac
        self.iterations, self.tol = iterations, tol
        self.resampler = Resample(mode="bilinear", padding_mode=padding_mode, norm_coords=True,
                                  dtype=torch.float32)

    def random_field(self, size: Sequence[int]) -> np.ndarray:
        size_a = np.asarray(size)
        sigma = self.sigma_frac * size_a.min()
        step = max(1.0, sigma / 4.0)
        coarse = np.maximum(2, np.ceil((size_a - 1) / step).astype(int) + 1)
        noise = self.R.standard_normal((len(size), *coarse))
        sig_c = sigma * (coarse - 1) / np.maximum(size_a - 1, 1)
        noise = np.stack([gaussian_filter(n, sig_c, mode="reflect") for n in noise])
        mode = "bilinear" if len(size) == 2 else "trilinear"
        field = torch.nn.functional.interpolate(torch.as_tensor(noise)[None], size=tuple(int(s) for s in size),
                                                mode=mode, align_corners=True)[0].numpy()
        rms = np.sqrt(np.mean(np.sum(field ** 2, axis=0))) + 1e-12
        return field * (self.R.uniform(0.0, self.magnitude_frac * size_a.min()) / rms)

    def __call__(self, data: Data) -> Data:
        self.randomize(None)
        if not self._do_transform:
            return data
        size = data["image"].shape[1:]
        field = self.random_field(size)
        ident = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in size], indexing="ij"))
        centre = ((np.asarray(size) - 1) / 2).reshape(-1, *([1] * len(size)))
        grid = torch.as_tensor(ident + field - centre, dtype=torch.float32)
        image = self.resampler(data["image"], grid)
        return mark_outside({**data, "image": _plain(image), "landmarks": self.invert(field, data["landmarks"])})

    def invert(self, field: np.ndarray, points: np.ndarray) -> np.ndarray:
        p = np.array(points, dtype=np.float64, ndmin=2)
        ok = ~np.isnan(p).any(axis=1)
        o = p[ok].copy()

        def disp(q: np.ndarray) -> np.ndarray:
            return np.stack([map_coordinates(f, q.T, order=1, mode="nearest") for f in field], axis=1)

        for _ in range(self.iterations):
            o = p[ok] - disp(o)
        res = np.linalg.norm(o + disp(o) - p[ok], axis=1)
        o[res > self.tol] = np.nan
        out = np.full_like(p, np.nan)
        out[ok] = o
        return out


def two_pass(ndim: int, elastic: bool = True, seed: int = 0) -> Compose:
    """The former ``build_augmentation(ndim, elastic=elastic, elastic_prob=1.0)``: affine -> elastic -> intensity."""
    stages = [_TwoPassAffine(ndim), *([_TwoPassElastic(1.0)] if elastic else []), *intensity_transforms(0.5)]
    return Compose(stages).set_random_state(seed)


def one_pass(ndim: int, elastic: bool = True, seed: int = 0) -> Compose:
    """Today's ``build_augmentation`` with the same settings."""
    return build_augmentation(ndim, elastic=elastic, elastic_prob=1.0, seed=seed)


# ------------------------------------------------------------------------------------------------ timing
def item(size: tuple[int, ...], n_landmarks: int, seed: int = 0) -> Data:
    """A random float32 image (1 channel) and ``n_landmarks`` points in the central 60 % (px, (x, y[, z]))."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0.2, 0.8, (n_landmarks, len(size))) * (np.asarray(size) - 1)
    return make_item(rng.standard_normal(size).astype(np.float32), pts, np.ones(n_landmarks, bool))


def median_ms(augs: Sequence[Callable[[Data], Data]], data: Data, items: int, warmup: int) -> list[float]:
    """Median wall time (ms) per item of each augmentation, ``items`` calls each after ``warmup``; the
    augmentations take turns item by item, so a load change on a shared machine hits both alike."""
    for aug in augs:
        for _ in range(warmup):
            aug(data)
    times: list[list[float]] = [[] for _ in augs]
    for _ in range(items):
        for aug, ts in zip(augs, times):
            t0 = time.perf_counter()
            aug(data)
            ts.append(time.perf_counter() - t0)
    return [1000 * float(np.median(ts)) for ts in times]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for elastic in (True, False):
        for name, size, n in [("2D 256x320", (256, 320), 19), ("3D 96^3", (96, 96, 96), 32)]:
            augs = [two_pass(len(size), elastic), one_pass(len(size), elastic)]
            before, after = median_ms(augs, item(size, n), args.items, args.warmup)
            what = "affine + elastic + intensity" if elastic else "affine + intensity (no elastic)"
            rows.append(f"| {name} | {what} | {before:.1f} | {after:.1f} | {before / after:.2f}x |")
    print(f"torch threads = {torch.get_num_threads()}, median of {args.items} items; affine and elastic with "
          "probability 1, each intensity transform 0.5\n")
    print("| grid | augmentation | before (ms/item) | after, one pass (ms/item) | speed-up |")
    print("|---|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
