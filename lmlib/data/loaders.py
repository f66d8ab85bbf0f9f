"""Torch Dataset and Lightning DataModule for landmark training (2D and 3D): views of the samples.

A :class:`ViewSpec` says which grid a network sees (see :mod:`lmlib.data.grids`):
- ``"whole"``: the whole field of view resized to ``size`` px or resampled at ``spacing`` mm (both:
  spacing, then centre crop/pad to size), padded at the high end to a multiple of ``pad_multiple``;
- ``"crop"``: an integer crop of ``size`` px of the whole image at ``spacing`` (train: random position;
  val/test: the centre crop);
- ``"patch"``: ``size`` px at ``spacing`` mm centred on a point in world mm (train: the ground truth
  + jitter; val/test: the previous stage's predictions ``centres``, else the ground truth); with
  ``per_landmark``, ``landmark_spacing`` may give each landmark's patch its own (isotropic) spacing;
  with ``stacked``, one item holds one patch per served landmark as its channels (a group of landmarks
  refined jointly), each centred on its own landmark except along ``shared_axis``, where all share the
  group's mean (landmarks on one plane then share the plane's index in every patch).

Each item is a dict (default-collatable):
- ``"image"``: float32 ``(C, *size)`` on the view grid, after augmentation (train only);
- ``"landmarks"``: float32 ``(K, D)`` continuous indices ``(x, y[, z])`` in px of that grid, after
  augmentation; rows of invalid landmarks are **0** (not NaN) so masked losses stay finite — always
  use ``"valid"``;
- ``"valid"``: bool ``(K,)``; False for missing/ambiguous landmarks and (unless ``keep_outside``) those
  outside the grid (before or after augmentation);
- ``"landmark_ids"``: int64 ``(K,)`` dataset landmark index of each row;
- ``"index_to_world"``: float64 ``(D, D+1)`` affine of the view grid (before augmentation):
  ``world = A[:, :D] @ idx + A[:, D]`` (idx px, world mm); stacked patches: ``(K, D, D+1)``, one per
  landmark's patch (channel);
- ``"reference_mm"``: float64 ``(K, D)`` the sample's original landmarks in world mm, NaN where masked;
- ``"image_id"``: str, ``"index"``: int (position of the sample), ``"item_index"``: int (position of
  the item), ``"centre_mm"``: float64 ``(D,)`` (patch views; zeros otherwise);
- whatever the target encoder returns (it may also replace the keys above).
K = the served landmarks (all N, a subset, or 1 per item with ``per_landmark``).
Batches stack these: image ``(B, C, ...)``, landmarks ``(B, K, D)``, valid ``(B, K)``.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from lmlib.data.geometry import Geometry
from lmlib.data.grids import (
    KEEP_ASPECT,
    FloatVector,
    Grid,
    IntVector,
    SourceImage,
    crop_array,
    network_orientation,
    normalize_intensity,
    on_sub_grid,
    preprocess,
    preprocessing_grids,
    resample,
    resample_patches,
)
from lmlib.data.sample import Sample
from lmlib.data.transforms import make_item

TargetEncoder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Mapping[str, Any]]
SPLITS = ("train", "val", "test")
VIEW_KINDS = ("whole", "crop", "patch")
JITTER_KINDS = ("none", "normal", "uniform", "inside")
# independent random streams derived from (seed, epoch): see epoch_seed / EpochSampler
STREAM_ORDER, STREAM_DATA, STREAM_WORKERS, STREAM_GLOBAL = 0, 1, 2, 3


def identity_encoder(image: torch.Tensor, landmarks: torch.Tensor, valid: torch.Tensor) -> dict[str, Any]:
    """Default target encoder: no extra targets (image (C, ...), landmarks (K, D) px, valid (K,))."""
    return {}


def epoch_seed(seed: int, epoch: int, *stream: int) -> int:
    """A 32-bit seed derived from ``(seed, epoch, *stream)`` (NumPy ``SeedSequence``): well separated
    streams for every epoch, which a resumed run re-derives from the epoch alone."""
    entropy = [int(seed) % 2**32, int(epoch), *(int(k) for k in stream)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: give each worker its own augmentation / crop / jitter stream.

    PyTorch seeds worker ``k`` with ``base_seed + k`` (``torch.initial_seed()`` inside the worker),
    where ``base_seed`` is drawn from the loader's generator when the epoch's iterator starts; the
    :class:`EpochSampler` reseeds that generator from ``(seed, epoch)``, so worker ``k`` of epoch ``e``
    is seeded from ``(seed, e, k)``. Without this every worker would hold a copy of the same random
    state and repeat the same augmentations.
    """
    info = get_worker_info()
    seed = (info.seed if info is not None else torch.initial_seed()) % 2**32
    np.random.seed(seed)
    random.seed(seed)
    dataset = info.dataset if info is not None else None
    if dataset is not None and hasattr(dataset, "set_random_state"):
        dataset.set_random_state(seed)


def collate_landmarks(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack items into a batch; clear error when image grids differ (use a ``target_size``)."""
    shapes = {tuple(it["image"].shape) for it in items}
    if len(shapes) > 1:
        raise ValueError(f"images of different shapes {sorted(shapes)} cannot be batched; set target_size")
    return default_collate(items)


class EpochSampler(Sampler[int]):
    """Training order and random streams of an epoch, all derived from ``(seed, epoch)``.

    A pass (``iter``) over epoch ``e`` shuffles (if ``shuffle``) with a generator seeded from
    ``(seed, e)``, reseeds ``dataset`` (augmentation, crop positions, jitter; ``set_random_state``)
    from ``(seed, e)`` before its first item is loaded (``num_workers=0``), and then selects epoch
    ``e + 1`` for the next pass. :meth:`set_epoch` selects an epoch (Lightning calls it before every
    training epoch) and reseeds the loader's ``generator``, from which the worker base seed of the
    next iterator is drawn (workers: :func:`seed_worker`). A run resumed at epoch ``e`` therefore sees
    the same batches as an uninterrupted one. Persistent workers keep their streams across epochs
    (not reseeded per epoch): a resume is exact with ``num_workers=0`` or non-persistent workers.
    ``rank`` (a DDP process's global rank) enters the augmentation and worker streams, not the order:
    every rank shuffles alike (Lightning's distributed wrapper then gives each its share) and draws its
    own augmentations; rank 0 draws those of a single process.
    """

    def __init__(self, dataset: LandmarkDataset, seed: int = 0, shuffle: bool = True,
                 generator: torch.Generator | None = None, epoch: int = 0, rank: int = 0) -> None:
        self.dataset, self.seed, self.shuffle = dataset, int(seed), bool(shuffle)
        self.generator = generator if generator is not None else torch.Generator()
        self.rank = int(rank)
        self.epoch = 0
        self.set_epoch(epoch)

    def _stream(self, stream: int) -> tuple[int, ...]:
        return (stream, self.rank) if self.rank else (stream,)

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch`` for the next pass and reseed the worker base-seed generator."""
        self.epoch = int(epoch)
        self.generator.manual_seed(epoch_seed(self.seed, self.epoch, *self._stream(STREAM_WORKERS)))

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        epoch, n = self.epoch, len(self.dataset)
        if hasattr(self.dataset, "set_random_state"):
            self.dataset.set_random_state(epoch_seed(self.seed, epoch, *self._stream(STREAM_DATA)))
        if self.shuffle:
            order = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, STREAM_ORDER))
            indices = torch.randperm(n, generator=order).tolist()
        else:
            indices = list(range(n))
        self.set_epoch(epoch + 1)  # a plain second pass is the next epoch
        yield from indices


# ------------------------------------------------------------------------------------------ ViewSpec
def _opt_tuple(x: Any, cast: type) -> tuple | None:
    if x is None:
        return None
    return tuple(cast(v) for v in np.asarray(x).reshape(-1).tolist())


@dataclass(frozen=True)
class ViewSpec:
    """Which grid a network sees; JSON-serialisable (stored in checkpoints). See the module docstring.

    Attributes:
        kind: ``"whole"`` | ``"crop"`` | ``"patch"``.
        size: grid size in px ``(x, y[, z])``; whole: None allowed (with spacing, or for the image's own grid).
        spacing: mm/px (one value or one per axis); whole with size only: the FOV resized to size;
            crop: None = the source's own spacing; patch: None = the source's own spacing.
        pad_multiple: whole: pad the grid (zeros, high end) up to a multiple of this (fully convolutional nets).
        normalize: ``"zscore"`` | ``"percentile"`` | None, statistics of the WHOLE image (never of a crop/patch).
        landmarks: subset of landmark indices served (None = all).
        per_landmark: patch only: one item per (sample, served landmark), centred on that landmark.
        jitter: training patch centres = ground truth + jitter, in world mm along each world axis:
            ``("normal", sigma_mm)`` | ``("uniform", half_width_mm)`` | ``("inside", 0)`` (uniform over the
            patch's own half extent ``(size - 1) / 2 * spacing``: the landmark anywhere in it) | ``("none", 0)``.
        landmark_spacing: per_landmark patch views: the isotropic spacing (mm/px) of each dataset
            landmark's patch (one value per landmark; overrides ``spacing``).
        keep_outside: landmarks outside the grid stay valid (methods regressing landmarks outside a
            crop); default: outside -> invalid.
        stacked: patch only (not per_landmark): one item per sample holding one patch per served landmark,
            stacked as channels ``(K, *size)``; landmark k is in channel k's grid.
        shared_axis: stacked only: the patch-grid axis along which every patch of the item is centred on
            the mean of the served landmarks' centres (None: each patch on its own landmark).
        keep_aspect: whole with size only: keep the physical aspect ratio (isotropic spacing, zero padding)
            instead of squashing the field of view (see :func:`lmlib.data.grids.preprocess`). Views stored
            before this field existed were squashed: :meth:`from_dict` reads a missing value as False.
    """

    kind: str = "whole"
    size: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    pad_multiple: int = 1
    normalize: str | None = "zscore"
    landmarks: tuple[int, ...] | None = None
    per_landmark: bool = False
    jitter: tuple[str, float] = ("none", 0.0)
    keep_outside: bool = False
    landmark_spacing: tuple[float, ...] | None = None
    stacked: bool = False
    shared_axis: int | None = None
    keep_aspect: bool = KEEP_ASPECT

    if TYPE_CHECKING:  # what the dataclass's __init__ accepts: __post_init__ makes the tuples above
        def __init__(self, kind: str = "whole", size: IntVector | None = None,
                     spacing: FloatVector | float | None = None, pad_multiple: int = 1,
                     normalize: str | None = "zscore", landmarks: IntVector | None = None,
                     per_landmark: bool = False, jitter: tuple[str, float] = ("none", 0.0), keep_outside: bool = False,
                     landmark_spacing: FloatVector | None = None, stacked: bool = False,
                     shared_axis: int | None = None, keep_aspect: bool = KEEP_ASPECT) -> None: ...

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", _opt_tuple(self.size, int))
        object.__setattr__(self, "spacing", _opt_tuple(self.spacing, float))
        object.__setattr__(self, "landmarks", _opt_tuple(self.landmarks, int))
        object.__setattr__(self, "landmark_spacing", _opt_tuple(self.landmark_spacing, float))
        object.__setattr__(self, "pad_multiple", int(self.pad_multiple))
        object.__setattr__(self, "per_landmark", bool(self.per_landmark))
        object.__setattr__(self, "keep_outside", bool(self.keep_outside))
        jitter = ("none", 0.0) if self.jitter is None else (str(self.jitter[0]), float(self.jitter[1]))
        object.__setattr__(self, "jitter", jitter)
        if self.kind not in VIEW_KINDS:
            raise ValueError(f"view kind must be one of {VIEW_KINDS}, got {self.kind!r}")
        if self.kind in ("crop", "patch") and self.size is None:
            raise ValueError(f"a {self.kind!r} view needs a size (px)")
        if self.per_landmark and self.kind != "patch":
            raise ValueError("per_landmark applies to patch views only")
        if jitter[0] not in JITTER_KINDS or jitter[1] < 0:
            raise ValueError(f"jitter must be (one of {JITTER_KINDS}, value >= 0), got {self.jitter!r}")
        if self.pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {self.pad_multiple}")
        if self.spacing is not None and min(self.spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {self.spacing}")
        object.__setattr__(self, "stacked", bool(self.stacked))
        if self.stacked and (self.kind != "patch" or self.per_landmark):
            raise ValueError("stacked applies to patch views that are not per_landmark")
        if self.shared_axis is not None:
            object.__setattr__(self, "shared_axis", int(self.shared_axis))
            if not self.stacked or not 0 <= self.shared_axis < len(self.size or ()):
                raise ValueError(f"shared_axis applies to stacked patch views and must be a grid axis, "
                                 f"got {self.shared_axis}")
        if self.landmark_spacing is not None:
            if not self.per_landmark:
                raise ValueError("landmark_spacing applies to per_landmark patch views only")
            if min(self.landmark_spacing) <= 0:
                raise ValueError(f"landmark_spacing must be positive, got {self.landmark_spacing}")

    def spacing_for(self, ndim: int) -> np.ndarray | None:
        """(D,) spacing in mm, or None."""
        return None if self.spacing is None else np.broadcast_to(np.asarray(self.spacing, float), (ndim,)).copy()

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (lists instead of tuples)."""
        return {"kind": self.kind, "size": None if self.size is None else list(self.size),
                "spacing": None if self.spacing is None else list(self.spacing), "pad_multiple": self.pad_multiple,
                "normalize": self.normalize, "landmarks": None if self.landmarks is None else list(self.landmarks),
                "per_landmark": self.per_landmark, "jitter": [self.jitter[0], self.jitter[1]],
                "keep_outside": self.keep_outside,
                "landmark_spacing": None if self.landmark_spacing is None else list(self.landmark_spacing),
                "stacked": self.stacked, "shared_axis": self.shared_axis, "keep_aspect": self.keep_aspect}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ViewSpec:
        kw = {"keep_aspect": False, **d}  # checkpoints written before keep_aspect existed were squashed
        if kw.get("jitter") is not None:
            kw["jitter"] = tuple(kw["jitter"])
        return cls(**kw)


# ------------------------------------------------------------------------------------------- Dataset
class PatchSources:
    """The prepared (normalised) sources of patch views, shared by the datasets of one cascade's patch stages at
    inference, so that each image is normalised and made a :class:`~lmlib.data.grids.SourceImage` once, not once
    per stage (on a large radiograph a large share of a stage's time: the benchmark's ``prepare_s``). One entry per
    sample object and normalisation; it holds the sample, so an entry is found for that same object only. Memory:
    one float32 copy of each image for as long as the object lives."""

    def __init__(self) -> None:
        self._entries: dict[tuple[int, str | None], tuple[Sample, SourceImage]] = {}

    def get(self, sample: Sample, normalize: str | None, make: Callable[[], SourceImage]) -> SourceImage:
        """The source of ``sample`` under ``normalize``: the one made before, or ``make()`` (then kept)."""
        key = (id(sample), normalize)  # the entry holds the sample: its id is not reused while the entry lives
        if key not in self._entries:
            self._entries[key] = (sample, make())
        return self._entries[key][1]

    def __len__(self) -> int:
        return len(self._entries)


class LandmarkDataset(Dataset):
    """Views of samples (see the module docstring), augmented (train) and target-encoded.

    Args:
        samples: the samples of one split (all with the same landmark names).
        target_size / target_spacing / normalize: shorthand for ``view=ViewSpec("whole", target_size,
            target_spacing, normalize=normalize)`` (see :func:`lmlib.data.grids.preprocess`; size in px
            (x, y[, z]), spacing in mm); not together with ``view``.
        transform: optional augmentation on the landmark dict (e.g. :func:`build_augmentation`);
            reseeded with ``seed`` here and per worker by :func:`seed_worker`.
        target_encoder: maps (image, landmarks px, valid) -> dict of targets merged into the item.
        cache: keep the prepared images in memory (computed in the constructor, i.e. in the main
            process, so workers inherit them): whole: the image on the view grid; crop: the whole
            image at the crop spacing; patch: the normalised source (small patches anti-alias their
            own region, see :class:`~lmlib.data.grids.SourceImage`). Otherwise they are recomputed on
            every access.
        seed: seed of the dataset's random stream (crop positions, jitter) and of ``transform``.
        view: the :class:`ViewSpec` (default: a whole view from the shorthand arguments).
        centres: val/test patch centres ``{image_id: (N, D) world mm}`` for all N dataset landmarks
            (the previous stage's predictions). Without them (or for an image not in them) patch
            centres fall back to the ground truth. A NaN centre row is ignored (group patch: mean of
            the others; per-landmark patch: the image centre).
        train: training views: random crop positions and jittered patch centres (ground truth);
            per-landmark patch items skip (sample, landmark) pairs without a valid ground truth.
            Otherwise (val/test): centre crops, patch centres from ``centres``, all pairs served.
        sources: patch views with ``cache``: take each sample's prepared source from there, and leave the ones
            made here in it (:class:`PatchSources`; a cascade's patch stages share one at inference).
    """

    def __init__(self, samples: Sequence[Sample], target_size: Sequence[int] | None = None,
                 target_spacing: Sequence[float] | None = None, normalize: str | None = "zscore",
                 transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 target_encoder: TargetEncoder | None = None, cache: bool = True, seed: int = 0, *,
                 view: ViewSpec | None = None, centres: Mapping[str, np.ndarray] | None = None,
                 train: bool = False, sources: PatchSources | None = None) -> None:
        if view is not None and (target_size is not None or target_spacing is not None):
            raise ValueError("give either a view or target_size/target_spacing, not both")
        samples = list(samples)  # read twice below (an iterator would be empty the second time)
        self.view = view if view is not None else ViewSpec("whole", target_size, target_spacing,
                                                           normalize=normalize)
        self.samples = [network_orientation(s) for s in samples]  # one axis order and handedness for the network
        self.target_size, self.target_spacing, self.normalize = self.view.size, self.view.spacing, self.view.normalize
        self.transform = transform
        self.target_encoder = target_encoder or identity_encoder
        self.cache, self.train = cache, bool(train)
        self.centres = None if centres is None else {k: np.asarray(v, dtype=np.float64) for k, v in centres.items()}
        n = len(self.samples[0].landmark_names) if self.samples else 0
        self.served: tuple[int, ...] = tuple(range(n)) if self.view.landmarks is None else self.view.landmarks
        if any(not 0 <= k < n for k in self.served) and self.samples:
            raise ValueError(f"served landmarks {self.served} out of range for {n} landmarks")
        if self.view.landmark_spacing is not None and self.samples and len(self.view.landmark_spacing) != n:
            raise ValueError(f"landmark_spacing has {len(self.view.landmark_spacing)} values for {n} landmarks")
        self._items: list[tuple[int, tuple[int, ...]]] = []
        for i, s in enumerate(self.samples):
            if self.view.per_landmark:
                self._items += [(i, (k,)) for k in self.served if not self.train or s.valid[k]]
            else:
                self._items.append((i, self.served))
        # eval per-landmark patches: each image's patches are resampled together on the first access to one of them
        # and kept until asked for (resample_patches; the same values as one by one)
        self._patches: dict[tuple[int, tuple[int, ...]], tuple[np.ndarray, Grid]] = {}
        shared = sources if self.view.kind == "patch" else None
        self._cache: list[Any] | None = None if not cache else [
            self._prepare(s) if shared is None else shared.get(given, self.view.normalize, partial(self._source, s))
            for given, s in zip(samples, self.samples)]
        self.set_random_state(seed)

    # ------------------------------------------------------------------------------ preparation
    def _prepare(self, sample: Sample) -> Sample | SourceImage:
        """Cached per sample: whole -> Sample on the (padded) view grid; crop -> Sample of the whole
        image at the crop spacing; patch -> normalised :class:`SourceImage`."""
        v = self.view
        if v.kind == "whole":
            s = preprocess(sample, v.size, v.spacing, v.normalize, v.keep_aspect)
            if v.pad_multiple > 1:
                grid = Grid.of_image(s).padded_to_multiple(v.pad_multiple)
                if grid.size != s.size:
                    s = replace(s, image=crop_array(s.image, (0,) * s.ndim, grid.size))
            return s
        if v.kind == "crop":
            return preprocess(sample, None, v.spacing, v.normalize)
        return self._source(sample)

    def _source(self, sample: Sample) -> SourceImage:
        """A patch view's prepared sample: the normalised source."""
        return SourceImage(normalize_intensity(sample.image, self.view.normalize), sample.geometry)

    def _prepared(self, sample_index: int) -> Any:
        return self._cache[sample_index] if self._cache is not None else self._prepare(self.samples[sample_index])

    def set_random_state(self, seed: int) -> None:
        """Reseed the dataset's stream (crop positions, jitter) and the augmentation (if MONAI-Randomizable)."""
        self._rng = np.random.default_rng(int(seed) % 2**32)
        if self.transform is not None and hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=int(seed) % 2**32)

    def __len__(self) -> int:
        return len(self._items)

    def item_landmarks(self, item_index: int) -> tuple[int, tuple[int, ...]]:
        """(sample position, dataset landmark indices served) of item ``item_index``."""
        return self._items[item_index]

    # ---------------------------------------------------------------------------------- grids
    def _centre_points(self, sample_index: int, ids: tuple[int, ...]) -> np.ndarray:
        """The points (K, D) world mm that patches of landmarks ``ids`` are centred on (NaN rows possible):
        the ground truth, or at val/test the ``centres`` rows of the image when given."""
        s = self.samples[sample_index]
        if not self.train and self.centres is not None and s.image_id in self.centres:
            return self.centres[s.image_id][list(ids)]
        return s.landmarks_mm[list(ids)]

    def _centre(self, sample_index: int, ids: tuple[int, ...]) -> np.ndarray:
        """Patch centre in world mm (D,) before jitter (see the class docstring)."""
        s = self.samples[sample_index]
        pts = self._centre_points(sample_index, ids)
        ok = ~np.isnan(pts).any(axis=1)
        if ok.any():
            return pts[ok].mean(axis=0)
        return s.geometry.index_to_world((np.asarray(s.size, dtype=np.float64) - 1) / 2)[0]

    def _jitter(self, ndim: int, spacing: np.ndarray, direction: np.ndarray) -> np.ndarray:
        """Offset (D,) mm of a training patch centre; ``spacing`` (D,) and ``direction`` (D, D) are the patch
        grid's (for ``"inside"``: drawn along the patch's own axes, so that an oblique patch keeps the landmark)."""
        kind, value = self.view.jitter
        if kind == "inside":
            along = self._rng.uniform(-1.0, 1.0, ndim) * (np.asarray(self.view.size) - 1) / 2.0 * spacing
            return np.asarray(direction, dtype=np.float64).reshape(ndim, ndim) @ along
        if kind == "normal" and value > 0:
            return self._rng.normal(0.0, value, ndim)
        if kind == "uniform" and value > 0:
            return self._rng.uniform(-value, value, ndim)
        return np.zeros(ndim)

    def _patch_spacing(self, sample_index: int, ids: tuple[int, ...]) -> np.ndarray:
        """(D,) mm/px of the patch serving landmarks ``ids``: the landmark's own, the view's, or the source's."""
        s, v = self.samples[sample_index], self.view
        if v.landmark_spacing is not None:
            return np.full(s.ndim, v.landmark_spacing[ids[0]])
        spacing = v.spacing_for(s.ndim)
        return np.asarray(s.geometry.spacing, dtype=np.float64) if spacing is None else spacing

    def _patch_grid(self, sample_index: int, centre: np.ndarray, ids: tuple[int, ...]) -> Grid:
        s = self.samples[sample_index]
        assert self.view.size is not None  # a patch view has a size (ViewSpec checks)
        return Grid.centred(centre, self.view.size, self._patch_spacing(sample_index, ids), s.geometry.direction)

    def grid(self, item_index: int) -> Grid:
        """The view grid of item ``item_index`` (px (x, y[, z]) <-> world mm).

        Deterministic: for training crops and jittered patches the realised grid is the item's
        ``"index_to_world"``; this returns the centre crop / the patch without jitter.
        """
        si, ids = self._items[item_index]
        s, v = self.samples[si], self.view
        if v.stacked:
            raise NotImplementedError("stacked patch items have one grid per landmark: use grids(item)")
        if v.kind == "whole":
            return preprocessing_grids(s, v.size, v.spacing, v.keep_aspect)[1].padded_to_multiple(v.pad_multiple)
        if v.kind == "crop":
            assert v.size is not None  # a crop view has a size (ViewSpec checks)
            return Grid.whole(s, spacing=v.spacing_for(s.ndim)).centre_crop_or_pad(v.size)
        return self._patch_grid(si, self._centre(si, ids), ids)

    def grids(self, item_index: int, jitter: bool = False) -> list[Grid]:
        """Stacked patch views: the grid of each served landmark's patch (channel), in served order.

        Centres: each landmark's ground truth (train) or ``centres`` row (val/test); a NaN row takes the
        mean of the others. ``jitter`` (training): each centre moves independently by the view's jitter.
        With ``shared_axis`` every centre then moves along that patch-grid axis (its world direction
        ``u``) onto the mean centre's position: ``c_k + u (u . (mean - c_k))``."""
        si, ids = self._items[item_index]
        s, v = self.samples[si], self.view
        if not v.stacked:
            return [self.grid(item_index)]
        pts = np.array(self._centre_points(si, ids), dtype=np.float64)
        pts[np.isnan(pts).any(axis=1)] = self._centre(si, ids)
        spacing = self._patch_spacing(si, ids)
        direction = np.asarray(s.geometry.direction, dtype=np.float64).reshape(s.ndim, s.ndim)
        if jitter:
            pts = pts + np.stack([self._jitter(s.ndim, spacing, direction) for _ in ids])
        if v.shared_axis is not None:
            u = direction[:, v.shared_axis]
            pts = pts + np.outer((pts.mean(axis=0) - pts) @ u, u)
        assert v.size is not None  # a stacked (patch) view has a size (ViewSpec checks)
        return [Grid.centred(c, v.size, spacing, direction) for c in pts]

    def preprocessed(self, index: int) -> Sample:
        """Whole views: the sample on the view grid (image, geometry; landmarks still in world mm).
        Crop views: the whole image at the crop spacing. Patch views: not available (use :meth:`grid`)."""
        if self.view.kind == "patch":
            raise NotImplementedError("patch views have no preprocessed sample; use grid(item) / item['reference_mm']")
        return self._prepared(self._items[index][0])

    def geometry(self, index: int) -> Geometry:
        """Geometry of the view grid of item ``index`` (before augmentation; see :meth:`grid`)."""
        return self.grid(index).geometry

    def to_world(self, index: int, landmarks_index: np.ndarray | torch.Tensor) -> np.ndarray:
        """View-grid indices (K, D) (x, y[, z]) px of item ``index`` -> world mm (K, D) (see :meth:`grid`)."""
        pts = landmarks_index.detach().cpu().numpy() if isinstance(landmarks_index, torch.Tensor) else landmarks_index
        return self.geometry(index).index_to_world(np.asarray(pts, dtype=np.float64))

    # ---------------------------------------------------------------------------------- items
    def _view_image(self, si: int, ids: tuple[int, ...]) -> tuple[np.ndarray, Grid, np.ndarray]:
        """(image (x, y[, z]) float32 on the view grid, the grid, centre mm (D,))."""
        v, s = self.view, self.samples[si]
        centre = np.zeros(s.ndim)
        if v.kind in ("whole", "crop"):
            base = self._prepared(si)
            grid = Grid.of_image(base)
            if v.kind == "whole":
                return base.image, grid, centre
            assert v.size is not None  # a crop view has a size (ViewSpec checks)
            sub = grid.random_crop(v.size, self._rng) if self.train else grid.centre_crop_or_pad(v.size)
            return on_sub_grid(base.image, grid, sub), sub, centre
        centre = self._centre(si, ids)
        if self.train:
            centre = centre + self._jitter(s.ndim, self._patch_spacing(si, ids), s.geometry.direction)
        if self.train or not self.view.per_landmark:
            grid = self._patch_grid(si, centre, ids)
            return resample(self._prepared(si), grid), grid, centre
        patch, grid = self._eval_patch(si, ids)
        return patch, grid, centre

    def _eval_patch(self, si: int, ids: tuple[int, ...]) -> tuple[np.ndarray, Grid]:
        """(patch, grid) of the eval per-landmark item of sample ``si`` serving ``ids``: all of the sample's patches
        are resampled at once (:func:`~lmlib.data.grids.resample_patches`), the others kept until asked for."""
        found = self._patches.pop((si, ids), None)
        if found is None:
            served = [item_ids for item_si, item_ids in self._items if item_si == si]
            grids = [self._patch_grid(si, self._centre(si, item_ids), item_ids) for item_ids in served]
            patches = resample_patches(self._prepared(si), grids)
            self._patches.update({(si, item_ids): (patch, grid) for item_ids, patch, grid in zip(served, patches, grids)})
            found = self._patches.pop((si, ids))
        return found

    def _make_item(self, image: np.ndarray, idx: np.ndarray, valid: np.ndarray, ids: Sequence[int]) -> dict[str, Any]:
        return make_item(image, idx, valid, keep_outside=self.view.keep_outside, landmark_ids=ids,
                         per_channel=bool(self.view.stacked))

    def __getitem__(self, index: int) -> dict[str, Any]:
        si, ids = self._items[index]
        s = self.samples[si]
        ids_a = np.asarray(ids, dtype=np.int64)
        reference = s.landmarks_mm[ids_a]
        if self.view.stacked:  # one patch per landmark as channels, each landmark in its own patch's grid
            grids = self.grids(index, jitter=self.train)
            image = np.stack(resample_patches(self._prepared(si), grids))
            idx = np.concatenate([g.world_to_index(reference[k:k + 1]) for k, g in enumerate(grids)])
            affine = np.stack([g.affine() for g in grids])
            centre = np.mean([g.index_to_world((np.asarray(g.size, float)[None] - 1) / 2)[0] for g in grids], axis=0)
        else:
            image, grid, centre = self._view_image(si, ids)
            idx, affine = grid.world_to_index(reference), grid.affine()
        data = self._make_item(image, idx, s.valid[ids_a], ids)
        if self.transform is not None:
            data = self.transform(data)
        image_t = torch.as_tensor(data["image"]).as_subclass(torch.Tensor).float()
        valid = torch.as_tensor(np.asarray(data["valid"], dtype=bool))
        landmarks = torch.as_tensor(np.nan_to_num(np.asarray(data["landmarks"], dtype=np.float64)),
                                    dtype=torch.float32)
        landmarks[~valid] = 0.0
        item: dict[str, Any] = {"image": image_t, "landmarks": landmarks, "valid": valid,
                                "landmark_ids": torch.as_tensor(ids_a),
                                "index_to_world": torch.as_tensor(affine, dtype=torch.float64),
                                "reference_mm": torch.as_tensor(reference, dtype=torch.float64),
                                "image_id": s.image_id, "index": si, "item_index": index,
                                "centre_mm": torch.as_tensor(centre, dtype=torch.float64)}
        item.update(self.target_encoder(image_t, landmarks, valid))
        return item


# ---------------------------------------------------------------------------------------- DataModule
class LandmarkDataModule(pl.LightningDataModule):
    """Splits samples by ``meta["split"]`` (train/val/test); augmentation on train only.

    ``view`` is the training view (default: a whole view from ``target_size`` / ``target_spacing`` /
    ``normalize``), ``eval_view`` that of val/test (default: ``view``; a crop view then evaluates on
    the centre crop, so pass e.g. a whole view with ``pad_multiple`` to evaluate on the whole image).
    ``centres`` = ``{split: {image_id: (N, D) world mm}}`` for eval patch views (see
    :class:`LandmarkDataset`).

    Determinism and resume: the train loader's :class:`EpochSampler` derives the epoch's order, the
    augmentation / crop / jitter stream and the worker seeds from ``(seed, epoch)``; attached to a
    trainer, :meth:`train_dataloader` starts at the trainer's epoch (a resumed run continues the
    streams of the interrupted one). Two runs with the same seed and ``num_workers`` give identical
    batches, and a run resumed at epoch ``e`` the same batches as an uninterrupted one.
    """

    def __init__(self, samples: Sequence[Sample], target_size: Sequence[int] | None = None,
                 target_spacing: Sequence[float] | None = None, normalize: str | None = "zscore",
                 augmentation: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 target_encoder: TargetEncoder | None = None, batch_size: int = 8,
                 eval_batch_size: int | None = None, num_workers: int = 0, cache: bool = True,
                 seed: int = 0, shuffle: bool = True, persistent_workers: bool = False, *,
                 view: ViewSpec | None = None, eval_view: ViewSpec | None = None,
                 centres: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> None:
        super().__init__()
        self.samples = list(samples)
        missing = sorted({str(s.meta.get("split")) for s in self.samples} - set(SPLITS))
        if missing:
            raise ValueError(f"meta['split'] must be one of {SPLITS}; found {missing}")
        if view is not None and (target_size is not None or target_spacing is not None):
            raise ValueError("give either a view or target_size/target_spacing, not both")
        self.view = view if view is not None else ViewSpec("whole", target_size, target_spacing, normalize=normalize)
        self.eval_view = eval_view if eval_view is not None else self.view
        self.centres = {k: dict(v) for k, v in (centres or {}).items()}
        self.target_size, self.target_spacing, self.normalize = self.view.size, self.view.spacing, self.view.normalize
        self.augmentation, self.target_encoder = augmentation, target_encoder
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.cache, self.seed, self.shuffle = num_workers, cache, seed, shuffle
        self.persistent_workers = persistent_workers and num_workers > 0
        self.datasets: dict[str, LandmarkDataset] = {}
        self._generator = torch.Generator().manual_seed(seed)

    def split_samples(self, split: str) -> list[Sample]:
        return [s for s in self.samples if s.meta.get("split") == split]

    def setup(self, stage: str | None = None) -> None:
        """Build (once) the datasets of all splits; preprocessing is cached here."""
        for split in SPLITS:
            if split not in self.datasets:
                train = split == "train"
                self.datasets[split] = LandmarkDataset(
                    self.split_samples(split), transform=self.augmentation if train else None,
                    target_encoder=self.target_encoder, cache=self.cache, seed=self.seed,
                    view=self.view if train else self.eval_view, centres=None if train else self.centres.get(split),
                    train=train)

    def _loader(self, split: str, train: bool, epoch: int = 0) -> DataLoader:
        self.setup()
        dataset = self.datasets[split]
        generator = self._generator if train else torch.Generator().manual_seed(self.seed)
        # train: order and streams of each epoch from (seed, epoch); val/test: in order, no randomness
        trainer = getattr(self, "trainer", None)
        rank = int(getattr(trainer, "global_rank", 0) or 0)
        sampler = EpochSampler(dataset, self.seed, self.shuffle, generator, epoch, rank) if train else None
        return DataLoader(dataset, batch_size=self.batch_size if train else self.eval_batch_size,
                          sampler=sampler, shuffle=False if sampler is None else None,
                          num_workers=self.num_workers, collate_fn=collate_landmarks, worker_init_fn=seed_worker,
                          generator=generator, persistent_workers=self.persistent_workers, drop_last=False)

    def _trainer_epoch(self) -> int:
        """The epoch the attached trainer starts next (restored on resume; 0 without a trainer)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        loop = getattr(trainer, "fit_loop", None)
        if loop is not None:  # what Lightning passes to the sampler's set_epoch (current_epoch lags on resume)
            return int(loop.epoch_progress.current.processed)
        return int(trainer.current_epoch)

    def train_dataloader(self) -> DataLoader:
        """Training loader starting at the trainer's epoch (see the class docstring)."""
        return self._loader("train", True, self._trainer_epoch())

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False)
