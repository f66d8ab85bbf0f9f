"""Prior-guided coarse-to-fine method: stacked group patches, per-landmark affines, axis attention, the
three stages' targets and decoding, the jitter taken from the previous stage, and learning on phantoms."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lmlib.data.datasets import load_dataset
from lmlib.data.loaders import LandmarkDataset, ViewSpec, collate_landmarks
from lmlib.data.phantoms import make_phantom_dataset
from lmlib.engine.cascade import fit_cascade, predict_cascade
from lmlib.engine.training import errors_mm, to_world
from lmlib.evaluation.baselines import mean_shape_predictions
from lmlib.methods import build_method
from lmlib.methods.prior_guided import (
    RADIAL_MEAN_FACTOR,
    AxisAttention,
    CorrelatedNet,
    JitteredStage,
    PriorGuided,
    from_normalised,
    normalised,
)
from lmlib.methods.targets import gaussian_heatmaps


@pytest.fixture(scope="module")
def phantoms3d():
    return make_phantom_dataset(3, n_images=20, seed=5, size=(64, 64, 64), n_landmarks=6)


def _mre(world, samples) -> float:
    return float(np.nanmean(np.concatenate([np.linalg.norm(w - s.landmarks_mm, axis=1) for w, s in zip(world, samples)])))


# ------------------------------------------------------------------------------------------ stacked views
def test_stacked_patches_put_each_landmark_in_its_own_channel(phantoms3d):
    s = phantoms3d[0]
    group = (2, 3, 4, 5)
    ds = LandmarkDataset([s], view=ViewSpec("patch", size=(9, 9, 9), spacing=1.0, landmarks=group, stacked=True))
    item = ds[0]
    assert item["image"].shape == (4, 9, 9, 9) and item["index_to_world"].shape == (4, 3, 4)
    # no jitter, no centres: every landmark sits at its own patch's centre voxel
    np.testing.assert_allclose(item["landmarks"].numpy(), np.full((4, 3), 4.0), atol=1e-4)
    # and its own patch's affine maps it back to the world point (per-landmark affines in to_world)
    world = to_world(item["landmarks"][None], item["index_to_world"][None])[0].numpy()
    np.testing.assert_allclose(world, s.landmarks_mm[list(group)], atol=1e-4)
    batch = collate_landmarks([item])
    assert float(errors_mm(batch["landmarks"], batch).max()) < 1e-4
    # each channel is the image resampled around its landmark: channel k equals a single-landmark patch
    single = LandmarkDataset([s], view=ViewSpec("patch", size=(9, 9, 9), spacing=1.0, per_landmark=True,
                                                landmarks=(group[1],)))
    np.testing.assert_allclose(item["image"][1].numpy(), single[0]["image"][0].numpy(), atol=1e-5)


def test_shared_axis_centres_every_patch_on_the_group_mean_along_that_axis(phantoms3d):
    s = phantoms3d[1]
    group = (2, 3, 4, 5)
    ds = LandmarkDataset([s], view=ViewSpec("patch", size=(15, 15, 15), spacing=1.0, landmarks=group, stacked=True,
                                            shared_axis=0))
    grids = ds.grids(0)
    centres = np.array([g.index_to_world(np.full((1, 3), 7.0))[0] for g in grids])
    gt = s.landmarks_mm[list(group)]
    u = np.asarray(s.geometry.direction).reshape(3, 3)[:, 0]
    np.testing.assert_allclose(centres @ u, np.full(4, (gt @ u).mean()), atol=1e-6)  # one common x
    np.testing.assert_allclose(centres - np.outer(centres @ u, u), gt - np.outer(gt @ u, u), atol=1e-6)  # own y, z
    item = ds[0]  # landmarks then share the centre index along axis 0 only where they share x
    np.testing.assert_allclose(item["landmarks"][:, 0].numpy(), 7.0 + (gt - centres) @ u, atol=1e-4)


def test_stacked_view_is_checked():
    with pytest.raises(ValueError, match="stacked"):
        ViewSpec("patch", size=(8, 8), per_landmark=True, stacked=True)
    with pytest.raises(ValueError, match="shared_axis"):
        ViewSpec("patch", size=(8, 8), shared_axis=0)
    v = ViewSpec("patch", size=(8, 8, 8), landmarks=(0, 1), stacked=True, shared_axis=2)
    assert ViewSpec.from_dict(v.to_dict()) == v


# ------------------------------------------------------------------------------------------ networks
def test_axis_attention_maps_are_weights_and_see_the_whole_volume():
    torch.manual_seed(0)
    att = AxisAttention(3, 8).eval()
    x = torch.randn(2, 8, 6, 6, 6)
    y, m_c, m_s = att(x)
    assert m_c.shape == (2, 8, 1, 1, 1) and m_s.shape == (2, 1, 6, 6, 6)
    assert float(m_c.min()) > 0 and float(m_c.max()) < 1 and float(m_s.min()) > 0 and float(m_s.max()) < 1
    torch.testing.assert_close(y, x * m_c * m_s)
    x2 = x.clone()
    x2[:, :, 0, 0, 0] += 10.0  # one far corner voxel changes the channel weights, hence every output voxel
    y2, _, _ = att(x2)
    assert bool(((y2 - y).abs()[:, :, 5, 5, 5] > 1e-6).any())


@pytest.mark.parametrize("plane", ["shared", "per_landmark"])
def test_correlated_net_shapes_and_group_fusion(plane):
    torch.manual_seed(0)
    net = CorrelatedNet(3, 4, (4, 8, 8), plane_axis=0, plane=plane).eval()
    x = torch.randn(2, 4, 16, 12, 8)
    out = net(x)
    assert out["inplane"].shape == (2, 4, 12, 8)
    assert out["plane"].shape == (2, 1 if plane == "shared" else 4, 16)
    x2 = x.clone()
    x2[:, 3] = torch.randn_like(x2[:, 3])  # another landmark's patch changes landmark 0's map (fusion)
    assert float((net(x2)["inplane"][:, 0] - out["inplane"][:, 0]).abs().max()) > 1e-6


def test_coarse_regressor_starts_at_the_grid_centre_and_normalises_exactly():
    m = build_method("prior_guided", spatial_dims=3, n_landmarks=5, stage="coarse",
                     network={"size": [16, 20, 12], "channels": [4, 8, 8]})
    out = m.build_network()(torch.randn(2, 1, 16, 20, 12))
    coords, _ = m.decode_batch(out, {"image": torch.zeros(2, 1, 16, 20, 12)}, 0)
    torch.testing.assert_close(coords, torch.tensor([7.5, 9.5, 5.5]).expand(2, 5, 3))
    with pytest.raises(ValueError, match="built for a \\[16, 20, 12\\]-px grid"):
        m.build_network()(torch.randn(1, 1, 16, 20, 16))
    idx = torch.rand(3, 5, 3) * 10
    torch.testing.assert_close(from_normalised(normalised(idx, (16, 20, 12)), (16, 20, 12)), idx)


def test_correlated_targets_decode_to_the_landmarks():
    """Ideal outputs (log-Gaussian logits: their softmax is the normalised target) decode to the landmarks
    to a hundredth of a voxel and are the loss's minimum."""
    m = build_method("prior_guided", spatial_dims=3, n_landmarks=8, stage="correlated", group=[1, 4, 6],
                     plane="per_landmark", plane_axis=0)
    lm = torch.tensor([[[7.3, 5.6, 9.2], [8.1, 10.4, 3.7], [6.6, 2.2, 12.9]]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    image = torch.zeros(1, 3, 16, 16, 16)

    def logits(points: torch.Tensor, size: tuple[int, ...], ok: torch.Tensor) -> torch.Tensor:
        return torch.log(gaussian_heatmaps(points, size, 2.0, ok).clamp_min(1e-30))

    outputs = {"inplane": logits(lm[..., 1:], (16, 16), valid), "plane": logits(lm[..., :1], (16,), valid)}
    coords, _ = m.decode_batch(outputs, {"image": image}, 0)
    torch.testing.assert_close(coords, lm, atol=0.01, rtol=0)
    batch = {"image": image, "landmarks": lm, "valid": valid}
    best, _ = m.training_loss(outputs, batch, 0)
    moved = {"inplane": logits(lm[..., 1:] + 1.0, (16, 16), valid), "plane": logits(lm[..., :1] - 1.0, (16,), valid)}
    worse, _ = m.training_loss(moved, batch, 0)
    assert float(best) < float(worse) - 0.1
    shared = build_method("prior_guided", spatial_dims=3, n_landmarks=8, stage="correlated", group=[1, 4, 6],
                          plane="shared")
    plane = logits(torch.full((1, 1, 1), 7.0), (16,), valid[:, :1])
    coords, _ = shared.decode_batch({**outputs, "plane": plane}, {"image": image}, 0)
    torch.testing.assert_close(coords[..., 0], torch.full((1, 3), 7.0), atol=0.01, rtol=0)  # one plane for all


def test_jitter_follows_the_previous_stage_errors_of_the_served_landmarks():
    names = ["a", "b", "c"]
    method = build_method("prior_guided", spatial_dims=3, n_landmarks=3, stage="correlated", group=[0, 2])
    stage = JitteredStage("correlated", method, None, None, previous=None, errors={"a": 1.0, "b": 9.0, "c": 3.0},
                          patch=ViewSpec("patch", size=(16,) * 3, spacing=1.0, landmarks=(0, 2), stacked=True),
                          landmark_names=names)
    assert "after the previous stage" in repr(stage)
    train, evaluation = stage.view, stage.eval_view
    assert train.jitter == ("normal", pytest.approx(2.0 / RADIAL_MEAN_FACTOR[3]))  # mean of a and c only
    assert evaluation.jitter == ("none", 0.0) and train.stacked
    rng = np.random.default_rng(0)  # the factor: sigma of an isotropic normal with that mean radial error
    assert np.linalg.norm(rng.normal(0, 1, (200000, 3)), axis=1).mean() == pytest.approx(RADIAL_MEAN_FACTOR[3], 1e-2)
    with pytest.raises(ValueError, match="train that stage first"):
        _ = JitteredStage("independent", method, None, None, previous=None,
                          patch=ViewSpec("patch", size=(16,) * 3, per_landmark=True)).view


def test_stages_follow_the_dataset_groups(tmp_path, capsys):
    params = {"output_dir": str(tmp_path)}
    shared = {"landmark_names": list("abcdef"), "landmark_groups": {}, "max_epochs": 2, "batch_size": 2}
    stages = PriorGuided.build_stages(3, 6, params, [16, 16, 16], shared)
    assert [s.name for s in stages] == ["coarse", "independent"] and "correlated stage skipped" in capsys.readouterr().out
    stages = PriorGuided.build_stages(3, 6, params, [16, 16, 16], {**shared, "landmark_groups": {"p": [1, 2, 4]}})
    assert [s.name for s in stages] == ["coarse", "independent", "correlated"] and stages[2].method.group == [1, 2, 4]
    with pytest.raises(ValueError, match="start with 'coarse'"):
        PriorGuided.build_stages(3, 6, {**params, "stages": ["independent"]}, [16] * 3, shared)


def test_synthetic3d_declares_a_plane_group_that_is_planar():
    ds = load_dataset("synthetic3d", n_images=4)
    group = ds.spec.group_indices()["shape_plane"]
    for s in ds.samples:  # on one plane up to the phantoms' per-landmark jitter; the others far off it
        p = s.landmarks_mm[group]
        centre = p.mean(axis=0)
        normal = np.linalg.svd(p - centre)[2][-1]
        assert np.abs((p - centre) @ normal).max() < 1.5
        others = np.delete(s.landmarks_mm, group, axis=0)
        assert np.abs((others - centre) @ normal).min() > 8.0


# ------------------------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_cascade_beats_the_mean_shape_and_each_stage_its_predecessor(phantoms3d, tmp_path):
    """On 3D phantoms (12 train images, 64^3 px at 1 mm; the coarse stage at 2 mm): the coarse stage beats
    the mean shape, the independent fine stage halves the coarse error, the correlated model (landmarks
    2-5, on one plane) keeps the group's error below a third of the mean shape's, and the checkpoints
    alone give the same predictions."""
    samples = phantoms3d
    train = [s for s in samples if s.meta["split"] == "train"]
    test = [s for s in samples if s.meta["split"] == "test"]
    baseline = _mre(mean_shape_predictions(train, test), test)
    group = [2, 3, 4, 5]
    params = {"output_dir": str(tmp_path), "coarse_spacing_mm": 2.0, "fine_epochs": 12, "fine_patch_px": 16,
              "fine_batch_size": 8, "fine_channels": [8, 16, 32],
              "coarse_channels": [8, 16, 32, 32], "correlated_epochs": 12, "correlated_channels": [8, 16, 16]}
    shared = {"landmark_names": list(samples[0].landmark_names), "optimizer": {"lr": 3e-3},
              "landmark_groups": {"plane": group}, "max_epochs": 60, "batch_size": 4}
    stages = PriorGuided.build_stages(3, 6, params, [32, 32, 32], shared)
    results = fit_cascade(stages, samples, tmp_path, device="cpu", seed=0)
    coarse, fine, joint = (_mre(r.test.world_mm, test) for r in results)

    def on_group(world) -> float:
        return float(np.nanmean([np.linalg.norm(w[group] - s.landmarks_mm[group], axis=1) for w, s in zip(world, test)]))

    base_group = on_group(mean_shape_predictions(train, test))
    print(f"mean shape {baseline:.2f} mm, coarse {coarse:.2f} mm, independent {fine:.2f} mm, correlated {joint:.2f} mm; "
          f"group: mean shape {base_group:.2f}, independent {on_group(results[1].test.world_mm):.2f}, "
          f"correlated {on_group(results[2].test.world_mm):.2f}")
    assert coarse < baseline / 1.5, (coarse, baseline)
    assert fine < coarse / 2 and fine < baseline / 3, (fine, coarse, baseline)
    assert on_group(results[2].test.world_mm) < base_group / 3
    others = [k for k in range(6) if k not in group]  # untouched by the correlated stage
    np.testing.assert_array_equal(np.stack(results[2].test.world_mm)[:, others], np.stack(results[1].test.world_mm)[:, others])
    again = predict_cascade([tmp_path / name / "checkpoints" / "best.ckpt" for name in ("coarse", "independent", "correlated")],
                            test)
    np.testing.assert_allclose(np.stack(again.world_mm), np.stack(results[-1].test.world_mm), atol=1e-4)


def test_stage_figures_keep_numeric_image_ids(tmp_path):
    """Image ids such as "001" (hamedan-ceph style): the stage predictions are read with string ids, so the
    slices show every stage's points. Before, ``pd.read_csv`` made them 1 and the figure drew no prediction."""
    from dataclasses import replace
    from types import SimpleNamespace

    from lmlib.outputs.contract import predictions_frame, write_outputs
    from lmlib.reporting.prior_guided_figures import fig_stage_slices, stage_errors

    s = replace(make_phantom_dataset(3, n_images=1, seed=0, size=(24, 24, 24), n_landmarks=4)[0], image_id="001")
    timings = {"train_seconds": 1.0, "infer_seconds_per_image": 0.1, "peak_rss_mb": 1.0}
    for k, stage in enumerate(("coarse", "independent")):
        write_outputs(tmp_path / stage, predictions_frame([s], [s.landmarks_mm + 0.5 / (k + 1)]), timings)
    assert set(stage_errors(tmp_path)["image_id"]) == {"001"}
    fig = fig_stage_slices(SimpleNamespace(output_dir=tmp_path, test_samples=[s]), n_images=1)[0]
    title = fig._suptitle.get_text()
    assert "coarse 0.87 mm" in title and "independent 0.43 mm" in title and "nan" not in title


def test_each_stage_is_its_own_class_and_a_configuration_rebuilds_it():
    """``PriorGuided(stage=...)`` is the stage's class (its network, loss and decoding, no switch on a string);
    a checkpoint's configuration rebuilds the same class; a copy stays that class."""
    import copy

    from lmlib.methods.prior_guided import STAGE_CLASSES, CoarseStage, CorrelatedStage, IndependentStage

    made = {"coarse": PriorGuided(3, 6, stage="coarse", network={"size": [16, 16, 16]}),
            "independent": PriorGuided(3, 6, stage="independent"),
            "correlated": PriorGuided(3, 6, stage="correlated", group=[1, 2, 4])}
    assert {k: type(v) for k, v in made.items()} == {"coarse": CoarseStage, "independent": IndependentStage,
                                                     "correlated": CorrelatedStage} == STAGE_CLASSES
    for stage, method in made.items():
        again = build_method("prior_guided", **method.config())
        assert type(again) is type(method) and again.config() == method.config() and again.stage == stage
        assert type(copy.deepcopy(method)) is type(method)
    with pytest.raises(ValueError, match="stage must be one of"):
        PriorGuided(3, 6, stage="fine")
    with pytest.raises(ValueError, match="needs a group of >= 2 landmarks"):
        PriorGuided(3, 6, stage="correlated", group=[1])
