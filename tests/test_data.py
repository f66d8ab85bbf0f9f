"""LandmarkDataset / LandmarkDataModule: splits, determinism, per-worker streams, caching, collation;
views (whole / crop / patch, 2D and 3D): items map back to world mm, patch centres and jitter, subsets,
per-landmark items, keep_outside, seeded random streams (from (seed, epoch): a resumed loader continues),
ViewSpec JSON."""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

import lmlib.data.loaders as data_mod
from lmlib.data.geometry import Geometry
from lmlib.data.grids import Grid
from lmlib.data.loaders import LandmarkDataModule, LandmarkDataset, ViewSpec, collate_landmarks, epoch_seed
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


def _at_epoch(dm: LandmarkDataModule, epoch: int) -> LandmarkDataModule:
    """``dm`` as attached to a trainer about to run ``epoch`` (e.g. resumed from a checkpoint)."""
    current = SimpleNamespace(processed=epoch)
    dm.trainer = SimpleNamespace(current_epoch=epoch, fit_loop=SimpleNamespace(
        epoch_progress=SimpleNamespace(current=current)))
    return dm


def _same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x["image_id"] == y["image_id"] and torch.equal(x["image"], y["image"])
                                    and torch.equal(x["landmarks"], y["landmarks"]) for x, y in zip(a, b))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_epoch_streams_depend_on_seed_and_epoch_only(num_workers: int) -> None:
    """A loader started at epoch 2 (a resumed run) serves what an uninterrupted loader serves in its
    third pass: order, augmentation and worker streams derive from (seed, epoch)."""
    full = epochs(make_dm(num_workers), 3)
    n = len(full) // 3
    resumed = _at_epoch(make_dm(num_workers), 2)
    loader = resumed.train_dataloader()
    it = iter(loader)  # Lightning's order in the first epoch of a fit: iterator, then set_epoch
    loader.sampler.set_epoch(2)
    assert _same_batches(list(it), full[2 * n:])
    loader.sampler.set_epoch(1)  # any epoch, any time
    assert _same_batches(list(loader), full[n:2 * n])
    assert not _same_batches(full[:n], full[n:2 * n])


def _as_rank(dm: LandmarkDataModule, rank: int) -> LandmarkDataModule:
    dm.trainer = SimpleNamespace(global_rank=rank, current_epoch=0)
    return dm


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ddp_ranks_share_the_order_and_draw_their_own_augmentations(num_workers: int) -> None:
    """Every DDP rank reseeded its data stream from (seed, epoch) alone, so the k-th item of each rank got the same
    rotation, scale, crop and jitter: the order must be the same on every rank (the distributed wrapper splits
    it), the augmentations not; rank 0 draws those of a single process."""
    single = epochs(make_dm(num_workers), 1)
    ranks = [epochs(_as_rank(make_dm(num_workers, same=True), r), 1) for r in (0, 1)]
    assert [b["image_id"] for b in ranks[0]] == [b["image_id"] for b in ranks[1]]  # one order
    assert not any(torch.equal(a["image"], b["image"]) for a, b in zip(ranks[0], ranks[1]))  # same pixels, new draws
    assert _same_batches(epochs(_as_rank(make_dm(num_workers), 0), 1), single)


def test_epoch_seed_streams_are_distinct() -> None:
    seeds = {epoch_seed(s, e, k) for s in (0, 1) for e in range(50) for k in range(4)}
    assert len(seeds) == 2 * 50 * 4 and all(0 <= x < 2**32 for x in seeds)
    assert epoch_seed(3, 7, 1) == epoch_seed(3, 7, 1)


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


# ---------------------------------------------------------------------------------------------- views
VIEW_SIZES = {2: (48, 40), 3: (22, 20, 18)}


def view_samples(ndim: int, n: int = 4, split: str = "train") -> list[Sample]:
    """Oblique, anisotropic samples with N=4 landmarks (landmark 3 invalid in odd samples)."""
    size = VIEW_SIZES[ndim]
    direction = (Rotation.from_euler("z", 20, degrees=True).as_matrix()[:2, :2] if ndim == 2
                 else Rotation.from_euler("xyz", [10, -15, 25], degrees=True).as_matrix())
    geom = Geometry(np.array([0.6, 0.9, 1.3][:ndim]), np.array([5.0, -3.0, 2.0][:ndim]), direction)
    out = []
    for i in range(n):
        rng = np.random.default_rng(100 + i)
        idx = rng.uniform(4, np.array(size) - 5, (N, ndim))
        out.append(Sample.from_index(f"{split}{i}", rng.random(size).astype(np.float32) * 50 + 10, geom, idx,
                                     [f"L{k}" for k in range(N)], valid=[True, True, True, i % 2 == 0],
                                     meta={"split": split}))
    return out


def view_spec(kind: str, ndim: int, **kw) -> ViewSpec:
    base = {"whole": dict(size=(16, 12, 10)[:ndim], pad_multiple=8),
            "crop": dict(size=(20, 14, 10)[:ndim], spacing=0.9),
            "patch": dict(size=(9, 10, 7)[:ndim], spacing=(0.7, 0.8, 1.1)[:ndim])}[kind]
    return ViewSpec(kind, **{**base, **kw})


def item_world(item: dict) -> np.ndarray:
    a = item["index_to_world"].numpy()
    d = a.shape[0]
    return item["landmarks"].double().numpy() @ a[:, :d].T + a[:, d]


def check_maps_back(item: dict) -> int:
    """index_to_world(landmarks) == reference_mm on valid rows (float32 indices: tolerance of their rounding)."""
    v = item["valid"].numpy()
    ref = item["reference_mm"].numpy()
    assert np.isnan(ref[~item_valid_reference(item)]).all()
    idx = np.abs(item["landmarks"].numpy()).max() if v.any() else 0.0
    a = item["index_to_world"].numpy()
    tol = 1e-6 + 2.0 ** -23 * idx * np.abs(a[:, :-1]).sum(axis=1).max()
    np.testing.assert_allclose(item_world(item)[v], ref[v], rtol=0, atol=tol)
    return int(v.sum())


def item_valid_reference(item: dict) -> np.ndarray:
    return ~np.isnan(item["reference_mm"].numpy()).any(axis=1)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("kind", ["whole", "crop", "patch"])
@pytest.mark.parametrize("train", [False, True])
def test_view_items_map_back_to_reference(ndim: int, kind: str, train: bool) -> None:
    view = view_spec(kind, ndim, jitter=("uniform", 1.0) if kind == "patch" else ("none", 0.0))
    ds = LandmarkDataset(view_samples(ndim), view=view, train=train, seed=1)
    expected_size = {"whole": (16,) * ndim, "crop": view.size, "patch": view.size}[kind]
    n_valid = 0
    for _ in range(2):  # random crops / jitter: two draws
        for k in range(len(ds)):
            item = ds[k]
            assert item["image"].shape == (1, *expected_size) and item["image"].dtype == torch.float32
            assert item["landmarks"].shape == (N, ndim) and item["landmarks"].dtype == torch.float32
            assert item["index_to_world"].shape == (ndim, ndim + 1) and item["index_to_world"].dtype == torch.float64
            assert item["reference_mm"].dtype == torch.float64 and item["landmark_ids"].dtype == torch.int64
            np.testing.assert_array_equal(item["landmark_ids"].numpy(), np.arange(N))
            assert item["centre_mm"].shape == (ndim,)
            src = ds.samples[item["index"]]
            np.testing.assert_array_equal(item["reference_mm"].numpy(), src.landmarks_mm)
            assert not (item["valid"].numpy() & ~src.valid).any()
            n_valid += check_maps_back(item)
            if not train:  # deterministic grid == the item's grid
                np.testing.assert_allclose(ds.grid(k).affine(), item["index_to_world"].numpy(), atol=1e-12)
    assert n_valid >= 4


@pytest.mark.parametrize("ndim", [2, 3])
def test_whole_view_is_preprocess_and_keeps_engine_api(ndim: int) -> None:
    samples = view_samples(ndim)
    view = view_spec("whole", ndim)
    ds = LandmarkDataset(samples, view=view)
    item = ds[1]
    s = ds.preprocessed(1)
    assert s.size == (16,) * ndim and ds.grid(1) == Grid.of_image(s)
    # padding at the high end: zeros beyond the resized image, origin unchanged
    unpadded = LandmarkDataset(samples, target_size=view.size)
    np.testing.assert_array_equal(item["image"][0][tuple(slice(0, n) for n in view.size)].numpy(),
                                  unpadded.preprocessed(1).image)
    assert float(item["image"][0].abs()[:, view.size[1]:].max()) == 0.0  # y: 12 -> 16 px
    np.testing.assert_allclose(ds.geometry(1).origin, unpadded.geometry(1).origin)
    world = ds.to_world(1, item["landmarks"].double())
    v = item["valid"].numpy()
    np.testing.assert_allclose(world[v], samples[1].landmarks_mm[v], atol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_patch_centre_and_jitter(ndim: int) -> None:
    samples = view_samples(ndim)
    centre_idx = (np.asarray(view_spec("patch", ndim).size) - 1) / 2
    still = LandmarkDataset(samples, view=view_spec("patch", ndim, per_landmark=True), train=True)
    for k in range(len(still)):
        item = still[k]
        assert item["valid"].all()  # training items skip invalid ground truths
        np.testing.assert_allclose(item["landmarks"][0].numpy(), centre_idx, atol=1e-5)
        np.testing.assert_allclose(item["centre_mm"].numpy(), item["reference_mm"][0].numpy(), atol=1e-9)
    h = 1.5
    ds = LandmarkDataset(samples, view=view_spec("patch", ndim, per_landmark=True, jitter=("uniform", h)), train=True)
    offsets = np.array([(ds[0]["reference_mm"][0] - ds[0]["centre_mm"]).numpy() for _ in range(200)])
    assert np.abs(offsets).max() <= h + 1e-9
    assert np.abs(offsets).max() > 0.8 * h and len(np.unique(offsets[:, 0])) == 200  # varies across draws
    sigma = 2.0
    ds = LandmarkDataset(samples, view=view_spec("patch", ndim, per_landmark=True, jitter=("normal", sigma)),
                         train=True)
    offsets = np.array([(ds[1]["reference_mm"][0] - ds[1]["centre_mm"]).numpy() for _ in range(300)])
    assert abs(offsets.std() / sigma - 1) < 0.15
    # group patch: centred on the mean of the served valid landmarks
    group = LandmarkDataset(samples, view=view_spec("patch", ndim, landmarks=(0, 2)), train=True)
    np.testing.assert_allclose(group[0]["centre_mm"].numpy(), samples[0].landmarks_mm[[0, 2]].mean(0), atol=1e-9)


def test_per_landmark_lengths_ids_and_subsets() -> None:
    samples = view_samples(2, n=4)  # landmark 3 invalid in samples 1 and 3
    ev = LandmarkDataset(samples, view=view_spec("patch", 2, per_landmark=True))
    assert len(ev) == 4 * N
    assert [int(ev[k]["landmark_ids"][0]) for k in range(N)] == list(range(N))
    assert [ev[k]["index"] for k in range(len(ev))] == [i for i in range(4) for _ in range(N)]
    assert not bool(ev[N + 3]["valid"][0]) and np.isnan(ev[N + 3]["reference_mm"].numpy()).all()
    tr = LandmarkDataset(samples, view=view_spec("patch", 2, per_landmark=True), train=True)
    assert len(tr) == 4 * N - 2
    sub = LandmarkDataset(samples, view=view_spec("patch", 2, per_landmark=True, landmarks=(2, 0)))
    assert len(sub) == 8 and [int(sub[k]["landmark_ids"][0]) for k in range(4)] == [2, 0, 2, 0]
    assert sub.item_landmarks(3) == (1, (0,))
    for kind in ("whole", "crop", "patch"):
        ds = LandmarkDataset(samples, view=view_spec(kind, 2, landmarks=(3, 1)))
        assert len(ds) == 4
        item = ds[1]
        assert item["landmarks"].shape == (2, 2)
        np.testing.assert_array_equal(item["landmark_ids"].numpy(), [3, 1])
        np.testing.assert_array_equal(item["reference_mm"].numpy(), samples[1].landmarks_mm[[3, 1]])
        assert not bool(item["valid"][0])
        check_maps_back(item)
    batch = collate_landmarks([sub[k] for k in range(4)])
    assert batch["landmarks"].shape == (4, 1, 2) and batch["index_to_world"].shape == (4, 2, 3)
    assert batch["landmark_ids"].dtype == torch.int64 and batch["centre_mm"].shape == (4, 2)


@pytest.mark.parametrize("ndim", [2, 3])
def test_keep_outside_crop(ndim: int) -> None:
    samples = view_samples(ndim, n=2)
    far = samples[0].geometry.index_to_world(np.array([[1.0, 1.0, 1.0][:ndim]]))[0]  # a corner: outside the crop
    samples[0].landmarks_mm[0] = far
    size = (8, 8, 6)[:ndim]
    dropped = LandmarkDataset(samples, view=ViewSpec("crop", size=size))[0]
    kept = LandmarkDataset(samples, view=ViewSpec("crop", size=size, keep_outside=True))[0]
    assert not bool(dropped["valid"][0]) and float(dropped["landmarks"][0].abs().sum()) == 0.0
    assert bool(kept["valid"][0])
    idx = kept["landmarks"][0].numpy()
    assert np.any((idx < -0.5) | (idx > np.asarray(size) - 0.5))
    check_maps_back(kept)
    np.testing.assert_array_equal(kept["valid"].numpy(), samples[0].valid)


def test_eval_patch_centres_from_previous_stage() -> None:
    samples = view_samples(2, n=2, split="val")
    pred = {s.image_id: s.landmarks_mm + np.array([0.7, -0.4]) for s in samples}
    pred["val1"] = np.where(np.arange(N)[:, None] == 2, np.nan, pred["val1"])  # a failed prediction
    view = view_spec("patch", 2, per_landmark=True, jitter=("uniform", 5.0))
    ds = LandmarkDataset(samples, view=view, centres=pred)
    for k in range(len(ds)):
        item = ds[k]
        i, (lm,) = ds.item_landmarks(k)
        expected = pred[samples[i].image_id][lm]
        if np.isnan(expected).any():  # no prediction: the image centre, never the ground truth
            expected = samples[i].geometry.index_to_world((np.array(samples[i].size) - 1) / 2)[0]
        np.testing.assert_allclose(item["centre_mm"].numpy(), expected, atol=1e-9)  # no jitter at eval
        np.testing.assert_allclose(ds.grid(k).affine(), item["index_to_world"].numpy(), atol=1e-12)
        check_maps_back(item)
    gt = LandmarkDataset(samples, view=view)  # no centres: ground truth
    np.testing.assert_allclose(gt[1]["centre_mm"].numpy(), samples[0].landmarks_mm[1], atol=1e-9)
    dm = LandmarkDataModule(samples + view_samples(2, n=2, split="train"), view=view,
                            centres={"val": pred}, batch_size=2)
    dm.setup()
    np.testing.assert_allclose(dm.datasets["val"][0]["centre_mm"].numpy(), pred["val0"][0], atol=1e-9)
    assert dm.datasets["train"].train and not dm.datasets["val"].train


def test_eval_patches_of_an_image_are_resampled_together_with_the_same_values() -> None:
    """Eval per-landmark patch items (each image's patches resampled together on the first access) hold what
    resampling each item's grid alone gives, in any order of access, and nothing is kept once every item was read
    (an item read again is resampled again)."""
    from lmlib.data.grids import resample

    samples = view_samples(2, n=3, split="test")
    pred = {s.image_id: s.landmarks_mm + 0.4 for s in samples}
    ds = LandmarkDataset(samples, view=view_spec("patch", 2, per_landmark=True), centres=pred)
    order = [5, 0, *[k for k in range(len(ds)) if k not in (5, 0)], 5]  # out of order, and one item again
    for n, k in enumerate(order):
        si, _ = ds.item_landmarks(k)
        expected = resample(ds._prepared(si), ds.grid(k))
        np.testing.assert_array_equal(ds[k]["image"].numpy()[0], expected)
        if n == len(order) - 2:
            assert not ds._patches  # every item read once: none kept


def test_patch_sources_prepare_each_image_once_across_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two patch datasets of the same samples (two stages of a cascade at inference) sharing a PatchSources
    normalise each image once and serve the same items as without it; another sample object, another
    normalisation or a whole view prepare their own."""
    calls: list[str] = []
    original = data_mod.normalize_intensity

    def counting(image, method="zscore", *args, **kwargs):
        calls.append(str(method))
        return original(image, method, *args, **kwargs)

    monkeypatch.setattr(data_mod, "normalize_intensity", counting)
    samples = view_samples(2, n=3, split="test")
    sources = data_mod.PatchSources()
    first = LandmarkDataset(samples, view=view_spec("patch", 2, per_landmark=True), sources=sources)
    second = LandmarkDataset(samples, view=view_spec("patch", 2, size=(7, 6), per_landmark=True), sources=sources)
    assert len(calls) == 3 and len(sources) == 3
    alone = LandmarkDataset(samples, view=view_spec("patch", 2, size=(7, 6), per_landmark=True))
    for k in range(len(second)):
        torch.testing.assert_close(second[k]["image"], alone[k]["image"], rtol=0, atol=0)
    assert first[0]["image"].shape[-2:] == (9, 10)
    LandmarkDataset([replace(samples[0])], view=view_spec("patch", 2), sources=sources)  # an equal copy: own entry
    LandmarkDataset(samples[:1], view=view_spec("patch", 2, normalize="percentile"), sources=sources)
    assert len(sources) == 5
    LandmarkDataset(samples, view=view_spec("whole", 2), sources=sources)
    assert len(sources) == 5 and len(calls) == 8  # 3 + 3 alone + 2; a whole view takes nothing from it


@pytest.mark.parametrize("kind", ["crop", "patch"])
def test_seeded_random_views(kind: str) -> None:
    samples = view_samples(2)
    view = view_spec(kind, 2, jitter=("normal", 2.0) if kind == "patch" else ("none", 0.0))

    def draws(seed: int) -> list[dict]:
        ds = LandmarkDataset(samples, view=view, train=True, seed=seed)
        return [ds[k] for _ in range(3) for k in range(len(ds))]

    a, b, c = draws(5), draws(5), draws(6)
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["landmarks"], y["landmarks"])
        assert torch.equal(x["index_to_world"], y["index_to_world"])
    assert any(not torch.equal(x["index_to_world"], y["index_to_world"]) for x, y in zip(a, c))
    assert len({tuple(x["index_to_world"].numpy().ravel()) for x in a}) > len(samples)  # varies across epochs


def test_view_spec_json_and_validation() -> None:
    import json

    v = ViewSpec("patch", size=[9, 9], spacing=0.5, landmarks=[0, 2], per_landmark=True, jitter=["uniform", 2])
    assert v.size == (9, 9) and v.spacing == (0.5,) and v.jitter == ("uniform", 2.0)
    back = ViewSpec.from_dict(json.loads(json.dumps(v.to_dict())))
    assert back == v
    assert ViewSpec.from_dict(ViewSpec().to_dict()) == ViewSpec()
    for bad in [dict(kind="tile"), dict(kind="crop"), dict(kind="whole", per_landmark=True),
                dict(kind="patch", size=(4, 4), jitter=("laplace", 1.0)), dict(pad_multiple=0)]:
        with pytest.raises(ValueError):
            ViewSpec(**bad)
    with pytest.raises(ValueError):
        LandmarkDataset(view_samples(2), target_size=(8, 8), view=ViewSpec())


def test_datamodule_train_crop_eval_whole() -> None:
    samples = view_samples(2, 4, "train") + view_samples(2, 2, "val") + view_samples(2, 2, "test")
    dm = LandmarkDataModule(samples, view=view_spec("crop", 2),
                            eval_view=ViewSpec("whole", spacing=0.9, pad_multiple=8), batch_size=2, seed=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 20, 14)
    val = next(iter(dm.val_dataloader()))
    assert all(n % 8 == 0 for n in val["image"].shape[2:])
    assert dm.datasets["val"].view.kind == "whole"
