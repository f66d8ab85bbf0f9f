"""Torch Dataset and Lightning DataModule for landmark training (2D and 3D).

Each item is a dict:
- ``"image"``: float32 Tensor ``(C, x, y[, z])`` on the network grid (after :func:`preprocess`);
- ``"landmarks"``: float32 Tensor ``(N, D)`` continuous indices ``(x, y[, z])`` in pixels of that grid,
  after augmentation; rows of invalid landmarks are **0** (not NaN) so masked losses stay finite —
  always use ``"valid"``;
- ``"valid"``: bool Tensor ``(N,)``; False for missing/ambiguous landmarks and those pushed out of the
  grid by augmentation;
- ``"image_id"``: str, ``"index"``: int (position in the dataset);
- whatever the target encoder returns (it may also replace the keys above).
Batches stack these: image ``(B, C, ...)``, landmarks ``(B, N, D)``, valid ``(B, N)``.
Predicted indices map back to world mm with :meth:`LandmarkDataset.to_world` (the grid's Geometry).
"""
from __future__ import annotations

import random
from typing import Any, Callable, Mapping, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from lmlib.data.geometry import Geometry
from lmlib.data.sample import Sample
from lmlib.data.grids import preprocess
from lmlib.data.transforms import make_item

TargetEncoder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Mapping[str, Any]]
SPLITS = ("train", "val", "test")


def identity_encoder(image: torch.Tensor, landmarks: torch.Tensor, valid: torch.Tensor) -> dict[str, Any]:
    """Default target encoder: no extra targets (image (C, ...), landmarks (N, D) px, valid (N,))."""
    return {}


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: give each worker its own augmentation stream.

    PyTorch seeds worker ``k`` with ``base_seed + k`` (``torch.initial_seed()`` inside the worker),
    where ``base_seed`` is drawn from the loader's generator at each epoch; without this every worker
    would hold a copy of the same numpy RandomState and repeat the same augmentations.
    """
    info = get_worker_info()
    seed = (info.seed if info is not None else torch.initial_seed()) % 2**32
    np.random.seed(seed)
    random.seed(seed)
    dataset = info.dataset if info is not None else None
    if hasattr(dataset, "set_random_state"):
        dataset.set_random_state(seed)


def collate_landmarks(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack items into a batch; clear error when image grids differ (use a ``target_size``)."""
    shapes = {tuple(it["image"].shape) for it in items}
    if len(shapes) > 1:
        raise ValueError(f"images of different shapes {sorted(shapes)} cannot be batched; set target_size")
    return default_collate(items)


class LandmarkDataset(Dataset):
    """Samples preprocessed onto the network grid (cached once), then augmented and target-encoded.

    Args:
        samples: the samples of one split.
        target_size / target_spacing / normalize: see :func:`lmlib.data.grids.preprocess`
            (size in pixels (x, y[, z]), spacing in mm).
        transform: optional augmentation on the landmark dict (e.g. :func:`build_augmentation`);
            reseeded with ``seed`` here and per worker by :func:`seed_worker`.
        target_encoder: maps (image, landmarks px, valid) -> dict of targets merged into the item.
        cache: keep the preprocessed samples in memory (computed in the constructor, i.e. in the main
            process, so workers inherit them); otherwise preprocess on every access.
    """

    def __init__(self, samples: Sequence[Sample], target_size: Sequence[int] | None = None,
                 target_spacing: Sequence[float] | None = None, normalize: str | None = "zscore",
                 transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 target_encoder: TargetEncoder | None = None, cache: bool = True, seed: int = 0) -> None:
        self.samples = list(samples)
        self.target_size, self.target_spacing, self.normalize = target_size, target_spacing, normalize
        self.transform = transform
        self.target_encoder = target_encoder or identity_encoder
        self.cache = cache
        self._cache: list[Sample] | None = [self._preprocess(s) for s in self.samples] if cache else None
        self.set_random_state(seed)

    def _preprocess(self, sample: Sample) -> Sample:
        return preprocess(sample, self.target_size, self.target_spacing, self.normalize)

    def set_random_state(self, seed: int) -> None:
        """Reseed the augmentation (if it is MONAI-Randomizable)."""
        if hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=int(seed) % 2**32)

    def __len__(self) -> int:
        return len(self.samples)

    def preprocessed(self, index: int) -> Sample:
        """The sample on the network grid (image, geometry; landmarks still in world mm)."""
        return self._cache[index] if self._cache is not None else self._preprocess(self.samples[index])

    def geometry(self, index: int) -> Geometry:
        """Geometry of the network grid of item ``index`` (before augmentation)."""
        return self.preprocessed(index).geometry

    def to_world(self, index: int, landmarks_index: np.ndarray | torch.Tensor) -> np.ndarray:
        """Network-grid indices (N, D) (x, y[, z]) of item ``index`` -> world mm (N, D)."""
        pts = landmarks_index.detach().cpu().numpy() if isinstance(landmarks_index, torch.Tensor) else landmarks_index
        return self.geometry(index).index_to_world(np.asarray(pts, dtype=np.float64))

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.preprocessed(index)
        data = make_item(s.image, s.landmarks_index, s.valid)
        if self.transform is not None:
            data = self.transform(data)
        image = torch.as_tensor(data["image"]).as_subclass(torch.Tensor).float()
        valid = torch.as_tensor(np.asarray(data["valid"], dtype=bool))
        landmarks = torch.as_tensor(np.nan_to_num(np.asarray(data["landmarks"], dtype=np.float64)),
                                    dtype=torch.float32)
        landmarks[~valid] = 0.0
        item: dict[str, Any] = {"image": image, "landmarks": landmarks, "valid": valid,
                                "image_id": s.image_id, "index": index}
        item.update(self.target_encoder(image, landmarks, valid))
        return item


class LandmarkDataModule(pl.LightningDataModule):
    """Splits samples by ``meta["split"]`` (train/val/test); augmentation on train only.

    Determinism: the train loader shuffles with a ``torch.Generator`` seeded by ``seed``, which also
    draws the per-epoch worker base seed; with ``num_workers=0`` the augmentation is seeded once with
    ``seed``. Two runs with the same seed and ``num_workers`` give identical batches.
    """

    def __init__(self, samples: Sequence[Sample], target_size: Sequence[int] | None = None,
                 target_spacing: Sequence[float] | None = None, normalize: str | None = "zscore",
                 augmentation: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 target_encoder: TargetEncoder | None = None, batch_size: int = 8,
                 eval_batch_size: int | None = None, num_workers: int = 0, cache: bool = True,
                 seed: int = 0, shuffle: bool = True, persistent_workers: bool = False) -> None:
        super().__init__()
        self.samples = list(samples)
        missing = sorted({str(s.meta.get("split")) for s in self.samples} - set(SPLITS))
        if missing:
            raise ValueError(f"meta['split'] must be one of {SPLITS}; found {missing}")
        self.target_size, self.target_spacing, self.normalize = target_size, target_spacing, normalize
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
                self.datasets[split] = LandmarkDataset(
                    self.split_samples(split), self.target_size, self.target_spacing, self.normalize,
                    transform=self.augmentation if split == "train" else None,
                    target_encoder=self.target_encoder, cache=self.cache, seed=self.seed)

    def _loader(self, split: str, train: bool) -> DataLoader:
        self.setup()
        return DataLoader(self.datasets[split], batch_size=self.batch_size if train else self.eval_batch_size,
                          shuffle=train and self.shuffle, num_workers=self.num_workers,
                          collate_fn=collate_landmarks, worker_init_fn=seed_worker,
                          generator=self._generator if train else torch.Generator().manual_seed(self.seed),
                          persistent_workers=self.persistent_workers, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False)
