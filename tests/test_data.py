"""LandmarkDataset / LandmarkDataModule: splits, determinism, per-worker streams, caching, collation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lmlib.data.loaders as data_mod
from lmlib.data.loaders import LandmarkDataModule, LandmarkDataset
from lmlib.data.geometry import Geometry
from lmlib.data.sample import Sample
from lmlib.data.transforms import build_augmentation

SIZE, TARGET, N = (60, 50), (32, 24), 4


def blob_sample(i: int, split: str, same: bool = False) -> Sample:
    """A 2D sample with Gaussian blobs at N landmarks (landmark 3 invalid in odd samples)."""
    rng = np.random.default_rng(0 if same else i)
    idx = rng.uniform(10, np.array(SIZE) - 10, (N, 2))
    g = np.meshgrid(*[np.arange(n) for n in SIZE], indexing="ij")
    img = sum(np.exp(-((g[0] - p[0]) ** 2 + (g[1] - p[1]) ** 2) / 18.0) for p in idx)
    valid = np.array([True, True, True, same or i % 2 == 0])
    return Sample.from_index(f"{split}{i}", img, Geometry(np.array([0.5, 0.7]), np.array([3.0, -2.0])), idx,
                             [f"L{k}" for k in range(N)], valid=valid, meta={"split": split})


def samples(same: bool = False) -> list[Sample]:
    return [blob_sample(i, s, same) for i, s in enumerate(["train"] * 6 + ["val"] * 2 + ["test"] * 2)]


def make_dm(num_workers: int = 0, same: bool = False, **kw) -> LandmarkDataModule:
    aug = build_augmentation(2, elastic=True, flip_prob=0.5, left_right_pairs=[(0, 1)], seed=None)
    return LandmarkDataModule(samples(same), target_size=TARGET, augmentation=aug, batch_size=2,
                              num_workers=num_workers, seed=3, **kw)


def epochs(dm: LandmarkDataModule, n: int = 2) -> list[dict]:
    loader = dm.train_dataloader()
    return [b for _ in range(n) for b in loader]


def test_splits_and_batches() -> None:
    dm = make_dm(target_encoder=lambda im, lm, v: {"n_valid": v.sum()})
    dm.setup("fit")
    for split, n in [("train", 6), ("val", 2), ("test", 2)]:
        ids = [dm.datasets[split][i]["image_id"] for i in range(n)]
        assert len(dm.datasets[split]) == n and all(x.startswith(split) for x in ids)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, *TARGET) and batch["image"].dtype == torch.float32
    assert batch["landmarks"].shape == (2, N, 2) and batch["valid"].shape == (2, N)
    assert torch.isfinite(batch["landmarks"]).all() and (batch["landmarks"][~batch["valid"]] == 0).all()
    assert torch.equal(batch["n_valid"], batch["valid"].sum(1))
    # val: no augmentation; indices on the network grid map back to the original world mm
    ds = dm.datasets["val"]
    item = ds[1]
    src = dm.split_samples("val")[1]
    np.testing.assert_array_equal(item["valid"].numpy(), src.valid)
    world = ds.to_world(1, item["landmarks"].double())
    np.testing.assert_allclose(world[src.valid], src.landmarks_mm[src.valid], atol=1e-4)
    assert torch.equal(ds[1]["image"], item["image"])  # deterministic without augmentation


def test_missing_split_rejected() -> None:
    s = blob_sample(0, "train")
    s.meta["split"] = "holdout"
    with pytest.raises(ValueError):
        LandmarkDataModule([s])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_deterministic_for_fixed_seed(num_workers: int) -> None:
    runs = [epochs(make_dm(num_workers)) for _ in range(2)]
    for a, b in zip(*runs):
        assert a["image_id"] == b["image_id"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["landmarks"], b["landmarks"])
    first, second = runs[0][:3], runs[0][3:]  # two epochs differ (new shuffle and augmentation)
    assert any(not torch.equal(x["image"], y["image"]) for x, y in zip(first, second))


def test_workers_get_different_streams() -> None:
    dm = make_dm(num_workers=2, same=True, shuffle=False)
    dm.batch_size = 1
    batches = list(dm.train_dataloader())  # worker 0 loads batches 0, 2, 4; worker 1 loads 1, 3, 5
    assert not torch.equal(batches[0]["image"], batches[1]["image"])
    assert not torch.equal(batches[0]["landmarks"], batches[1]["landmarks"])


def test_preprocess_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    original = data_mod.preprocess

    def counting(sample, *args, **kwargs):
        calls.append(sample.image_id)
        return original(sample, *args, **kwargs)

    monkeypatch.setattr(data_mod, "preprocess", counting)
    dm = make_dm()
    dm.setup("fit")
    epochs(dm, 3)
    list(dm.val_dataloader())
    assert sorted(calls) == sorted(s.image_id for s in dm.samples)
    uncached = LandmarkDataset(dm.split_samples("val"), TARGET, cache=False)
    uncached[0], uncached[0]
    assert len(calls) == len(dm.samples) + 2
