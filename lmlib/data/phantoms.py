"""Deterministic synthetic 2D / 3D phantoms: the project's embedded default data.

Every landmark is defined by an image structure drawn around it (kinds cycle through
:data:`KINDS`): ``disc`` / ``ring`` / ``hole`` (dark disc) / ``cross`` centres, ``apex`` (tip of a
triangle / cone), ``corner`` (outer corner of a square / cube), ``bar_end`` (centre of a bar's flat
end) and ``tee`` (junction of a T). Landmarks follow a mean shape (an egg-shaped layout inside a
bright "body") with per-image shape jitter, a random pose (rotation, scale, translation), random
structure sizes/orientations/contrasts, a smooth multiplicative bias field and Gaussian noise.
Structures are anti-aliased by supersampling, so sub-pixel landmark positions are meaningful.
Shapes are built in world mm, so anisotropic spacing gives physically correct shapes.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from lmlib.data.geometry import Geometry, apply_matrix, libm_exp
from lmlib.data.sample import Sample

KINDS: tuple[str, ...] = ("disc", "apex", "cross", "corner", "ring", "bar_end", "hole", "tee")
DEFAULT_SIZE = {2: (128, 128), 3: (64, 64, 64)}
DEFAULT_N_LANDMARKS = {2: 8, 3: 6}
DEFAULT_N_IMAGES = {2: 60, 3: 30}
_SUPERSAMPLE = {2: 4, 3: 3}
# 3D layout candidates (units of the shape frame): octahedron, cube corners, two inner points.
_LAYOUT_3D = np.array(
    [[0.7, 0, 0], [-0.7, 0, 0], [0, 0.7, 0], [0, -0.7, 0], [0, 0, 0.7], [0, 0, -0.7]]
    + [[sx * 0.4, sy * 0.4, sz * 0.4] for sx in (1, -1) for sy in (1, -1) for sz in (1, -1)]
    + [[0.22, 0.05, -0.05], [-0.22, -0.05, 0.05]])


def template_shape(ndim: int, n_landmarks: int) -> np.ndarray:
    """Mean landmark layout ``(N, D)`` in shape units (1 unit ~ 1/3 of the smallest field of view)."""
    if not 3 <= n_landmarks <= 16:
        raise ValueError(f"n_landmarks must be in 3..16, got {n_landmarks}")
    if ndim == 3:
        return _LAYOUT_3D[:n_landmarks] * np.array([0.9, 0.85, 0.8])
    if ndim != 2:
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    n_out = min(n_landmarks, 10)
    a = 2 * np.pi * np.arange(n_out) / n_out + 0.3
    r = 0.74 * (1 + 0.1 * np.cos(2 * a + 0.5) + 0.06 * np.sin(a))  # egg-shaped, no symmetry
    pts = [np.stack([r * np.cos(a), 0.9 * r * np.sin(a)], axis=1)]
    n_in = n_landmarks - n_out
    if n_in:
        b = 2 * np.pi * np.arange(n_in) / n_in + 0.9
        pts.append(np.stack([0.34 * np.cos(b), 0.3 * np.sin(b)], axis=1))
    return np.concatenate(pts)


def _min_distance(points: np.ndarray) -> float:
    d = np.linalg.norm(points[:, None] - points[None], axis=-1)
    return float(d[~np.eye(len(points), dtype=bool)].min())


def _frame(ndim: int, d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Orthonormal frame (columns) whose first column is the unit vector ``d``."""
    if ndim == 2:
        return np.array([[d[0], -d[1]], [d[1], d[0]]])
    q, _ = np.linalg.qr(np.column_stack([d, rng.normal(size=(3, 2))]))
    q *= np.sign(q[:, 0] @ d)  # keep d itself (QR may flip signs), det sign irrelevant
    return q


def _structure(kind: str, frame: np.ndarray, r: float) -> tuple[Callable[[np.ndarray], np.ndarray], float, np.ndarray]:
    """Inside-test for points ``q`` (M, D) in mm, relative to the landmark and expressed in ``frame``
    (columns: outward direction d, then perpendicular axes); the structure's extent (mm) and the
    offset (mm, world) from the landmark to its area/volume centroid."""
    dim = frame.shape[0]
    d, zero = frame[:, 0], np.zeros(dim)
    radial = lambda q: np.sqrt((q[:, 1:] ** 2).sum(axis=1))  # noqa: E731  distance from the d axis
    if kind in ("disc", "hole"):
        return (lambda q: (q ** 2).sum(axis=1) <= (0.6 * r) ** 2), 0.6 * r, zero
    if kind == "ring":
        return (lambda q: np.abs(np.sqrt((q ** 2).sum(axis=1)) - 0.65 * r) <= 0.22 * r), 0.87 * r, zero
    if kind == "apex":  # triangle / cone pointing along d, apex at the landmark
        length, tan = 1.2 * r, np.tan(np.radians(22))
        inside = lambda q: (q[:, 0] <= 0) & (q[:, 0] >= -length) & (radial(q) <= -q[:, 0] * tan)  # noqa: E731
        return inside, length * np.hypot(1, tan), -d * length * (2 / 3 if dim == 2 else 3 / 4)
    if kind == "bar_end":  # bar / cylinder along -d, flat end centred on the landmark
        length, w = 1.2 * r, 0.3 * r
        inside = lambda q: (q[:, 0] <= 0) & (q[:, 0] >= -length) & (radial(q) <= w)  # noqa: E731
        return inside, np.hypot(length, w), -d * length / 2
    if kind == "corner":  # square / cube with its outer corner at the landmark, diagonal along d
        side = 0.7 * r
        v = np.ones(dim) / np.sqrt(dim) - np.eye(dim)[0]
        house = np.eye(dim) - 2 * np.outer(v, v) / (v @ v)  # maps (1,..,1)/sqrt(D) to the d axis
        inside = lambda q: np.all(np.abs(apply_matrix(house.T, q) + side / 2) <= side / 2, axis=1)  # noqa: E731
        return inside, side * np.sqrt(dim), -side / 2 * (frame @ house).sum(axis=1)
    if kind == "cross":  # one bar along each frame axis, centred on the landmark
        h, w = 0.8 * r, 0.25 * r
        def inside(q: np.ndarray) -> np.ndarray:
            a = np.abs(q)
            return np.any([(a[:, k] <= h) & np.all(np.delete(a, k, axis=1) <= w, axis=1)
                           for k in range(dim)], axis=0)
        return inside, np.hypot(h, w * np.sqrt(dim - 1)), zero
    if kind == "tee":  # crossbar along the 2nd frame axis, stem along -d; landmark at the junction
        h, w, stem = 0.8 * r, 0.25 * r, 1.0 * r
        def inside(q: np.ndarray) -> np.ndarray:
            thin = np.all(np.abs(np.delete(q, 1, axis=1)) <= w, axis=1)
            across = thin & (np.abs(q[:, 1]) <= h)
            along = (q[:, 0] <= 0) & (q[:, 0] >= -stem) & np.all(np.abs(q[:, 1:]) <= w, axis=1)
            return across | along
        offset = -(stem - w) * (stem + w) / 2 / (2 * h + stem - w)
        return inside, np.hypot(max(stem, h), w * np.sqrt(dim - 1)), d * offset
    raise ValueError(f"unknown structure kind {kind!r}")


def _coverage(inside: Callable[[np.ndarray], np.ndarray], frame: np.ndarray, centre_mm: np.ndarray,
              extent_mm: float, geometry: Geometry, size: tuple[int, ...]) -> tuple[tuple[slice, ...], np.ndarray]:
    """Supersampled fraction of each pixel inside a structure, in its bounding box (index slices)."""
    dim, ss = geometry.ndim, _SUPERSAMPLE[geometry.ndim]
    c = geometry.world_to_index(centre_mm)[0]
    half = extent_mm / geometry.spacing + 1.5
    lo = np.clip(np.floor(c - half).astype(int), 0, size)
    hi = np.clip(np.ceil(c + half).astype(int) + 1, 0, size)
    n = hi - lo
    offsets = (np.arange(ss) + 0.5) / ss - 0.5
    axes = [(np.arange(lo[k], hi[k])[:, None] + offsets[None]).ravel() for k in range(dim)]
    # frame coordinates q = (world - centre) @ frame, world = origin + direction @ (spacing * index)
    to_q = (geometry.direction * geometry.spacing) @ frame  # rows: per index axis
    q0 = (geometry.origin - centre_mm) @ frame
    q = sum(np.reshape(ax[:, None] * to_q[k], (1,) * k + (-1,) + (1,) * (dim - 1 - k) + (dim,))
            for k, ax in enumerate(axes)) + q0
    ins = inside(q.reshape(-1, dim)).astype(np.float32)
    shape = [v for k in range(dim) for v in (n[k], ss)]
    cov = ins.reshape(shape).mean(axis=tuple(range(1, 2 * dim, 2)))
    return tuple(slice(lo[k], hi[k]) for k in range(dim)), cov


def make_phantom(ndim: int, seed: int, size: tuple[int, ...] | None = None,
                 spacing: tuple[float, ...] | None = None, n_landmarks: int | None = None,
                 noise: float = 0.04, image_id: str = "phantom", bias: float = 0.25) -> Sample:
    """One phantom image ``(x, y[, z])`` with landmarks in world mm.

    Args:
        ndim: 2 or 3.  seed: numpy Generator seed (same seed -> identical sample).
        size: grid size in pixels ``(x, y[, z])`` (default 128^2 / 64^3).
        spacing: mm per pixel (default 1.0, anisotropic allowed).
        n_landmarks: 3..16 (default 8 in 2D, 6 in 3D).
        noise: Gaussian noise sd (structure contrasts are 0.3-0.6, body ~0.3).
        bias: amplitude of the smooth multiplicative bias field (log scale; 0 = none).

    ``meta``: ``left_right_pairs`` (``[]``), ``body_level``, ``background_level`` and
    ``structures``: per landmark ``kind``, outward unit ``direction`` (world), ``extent_mm`` (radius
    of the structure around the landmark), ``centroid_offset_mm`` (landmark -> structure centroid,
    world mm) and ``contrast`` (negative for ``hole``). Direction is the identity; origin is not zero.
    """
    size = tuple(int(s) for s in (size or DEFAULT_SIZE[ndim]))
    n = int(n_landmarks or DEFAULT_N_LANDMARKS[ndim])
    spacing_arr = np.broadcast_to(np.asarray(spacing or 1.0, dtype=np.float64), (ndim,)).copy()
    if len(size) != ndim:
        raise ValueError(f"size {size} does not match ndim={ndim}")
    rng = np.random.default_rng(seed)
    fov = np.array(size) * spacing_arr
    origin = -fov / 2 + rng.uniform(-20.0, 20.0, ndim)  # non-trivial, deterministic per seed
    geometry = Geometry(spacing_arr, origin)
    centre_fov = geometry.index_to_world((np.array(size) - 1) / 2)[0]
    unit = (0.36 if ndim == 2 else 0.33) * fov.min()  # mm per shape unit

    # Shape: mean layout + shape-mode (aspect) + per-landmark jitter; then pose.
    base = template_shape(ndim, n)
    r_struct = min(0.22, 0.3 * _min_distance(base))  # structure size, shape units
    shape = base * rng.uniform(0.93, 1.07, ndim) + rng.normal(0.0, 0.03, base.shape)
    if ndim == 2:
        t = np.radians(rng.uniform(-15, 15))
        rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    else:
        axis = rng.normal(size=3)
        rot = Rotation.from_rotvec(axis / np.linalg.norm(axis) * np.radians(rng.uniform(-12, 12))).as_matrix()
    scale = unit * rng.uniform(0.9, 1.1)
    centre = centre_fov + rng.uniform(-0.05, 0.05, ndim) * fov
    landmarks = centre + scale * shape @ rot.T

    # Body: bright ellipse / ellipsoid, smooth edge; background outside.
    world = sum(np.reshape(np.arange(n_k) * spacing_arr[k], (1,) * k + (-1,) + (1,) * (ndim - 1 - k) + (1,))
                * geometry.direction[:, k] for k, n_k in enumerate(size))
    world = (world + geometry.origin).reshape(-1, ndim)  # pixel centres, world mm (M, D)
    semi = scale * (np.array([1.15, 1.0]) if ndim == 2 else np.array([1.2, 1.1, 1.05]))
    rho = np.linalg.norm(apply_matrix(rot.T, world - centre) / semi, axis=1)
    body = np.clip(0.5 + (1 - rho) * semi.min() / spacing_arr.mean(), 0, 1)
    bg_level, body_level = rng.uniform(0.0, 0.1), rng.uniform(0.2, 0.4)
    image = (bg_level + (body_level - bg_level) * body).reshape(size)

    names, structures = [], []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        names.append(f"L{i + 1:02d}_{kind}")
        d = rot @ base[i] / np.linalg.norm(base[i])  # outward direction of this landmark
        if ndim == 2:
            t = np.arctan2(d[1], d[0]) + np.radians(rng.uniform(-15, 15))
            frame = _frame(2, np.array([np.cos(t), np.sin(t)]), rng)
        else:
            frame = Rotation.from_rotvec(rng.normal(0.0, 0.15, 3)).as_matrix() @ _frame(3, d, rng)
        inside, extent, offset = _structure(kind, frame, scale * r_struct * rng.uniform(0.85, 1.15))
        contrast = rng.uniform(0.3, 0.6) * (-1.0 if kind == "hole" else 1.0)
        box, cov = _coverage(inside, frame, landmarks[i], extent, geometry, size)
        image[box] += contrast * cov
        structures.append({"name": names[-1], "kind": kind, "direction": frame[:, 0].tolist(),
                           "extent_mm": float(extent), "centroid_offset_mm": offset.tolist(),
                           "contrast": float(contrast)})

    # Smooth multiplicative bias field (random low-order polynomial) and noise.
    u = (world - centre_fov) / (fov / 2)
    terms = [u[:, k] for k in range(ndim)] + [u[:, j] * u[:, k] for j in range(ndim) for k in range(j, ndim)]
    field = sum(c * t for c, t in zip(rng.normal(size=len(terms)), terms))
    field /= max(np.abs(field).max(), 1e-9)
    image = image * libm_exp(bias * field).reshape(size)  # libm: the same bits on every CPU
    image = image + rng.normal(0.0, noise, size) if noise > 0 else image
    meta: dict[str, Any] = {"source": "phantom", "seed": int(seed), "left_right_pairs": [],
                            "body_level": float(body_level), "background_level": float(bg_level),
                            "structures": structures}
    return Sample(image_id, image.astype(np.float32), geometry, landmarks,
                  np.ones(n, dtype=bool), tuple(names), meta)


def assign_splits(n: int, seed: int, split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> list[str]:
    """Deterministic shuffled ``"train"/"val"/"test"`` labels for ``n`` items (each split with a
    positive fraction gets at least one item when ``n >= 3``)."""
    f = np.asarray(split_fractions, dtype=np.float64)
    if f.shape != (3,) or np.any(f < 0) or f.sum() <= 0:
        raise ValueError(f"split_fractions must be 3 non-negative numbers, got {split_fractions}")
    f = f / f.sum()
    n_val, n_test = (int(round(x * n)) for x in f[1:])
    if n >= 3:
        n_val, n_test = (max(k, 1) if x > 0 else k for k, x in zip((n_val, n_test), f[1:]))
    n_test = min(n_test, n - n_val)
    labels = np.array(["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test)
    return np.random.default_rng([seed, 7919]).permutation(labels).tolist()


def _image_seed(seed: int, i: int) -> int:
    return int(np.random.SeedSequence([seed, i]).generate_state(1)[0])


def make_phantom_dataset(ndim: int, n_images: int | None = None, seed: int = 0,
                         split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
                         **phantom_kwargs: Any) -> list[Sample]:
    """``n_images`` phantoms (default 60 in 2D, 30 in 3D) with ids ``syn{ndim}d_000``... and a
    deterministic ``meta["split"]``; ``phantom_kwargs`` go to :func:`make_phantom`."""
    n = int(n_images or DEFAULT_N_IMAGES[ndim])
    splits = assign_splits(n, seed, split_fractions)
    samples = []
    for i in range(n):
        s = make_phantom(ndim, _image_seed(seed, i), image_id=f"syn{ndim}d_{i:03d}", **phantom_kwargs)
        s.meta["split"] = splits[i]
        samples.append(s)
    return samples
