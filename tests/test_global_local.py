"""Global-to-local FCNN (lmlib.methods.global_local): displacement code, patch geometry, targets, voting,
networks 2D/3D, the patch rule, a tiny end-to-end cascade through run_method, and a brief training that
beats the mean-shape baseline 3x.

Trainings run with one torch thread: on this project's shared 2-core machines two threads competing with
other processes made them up to 15x slower (18 s vs 270 s for the accuracy test)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmlib.methods import build_method
from lmlib.methods.global_local import (
    GlobalFCNN,
    GlobalLocalFCNN,
    LocalFCNN,
    LocalStage,
    PatchRule,
    decode_displacement,
    displacement_targets,
    encode_displacement,
    fcnn_loss,
    patch_centres,
    patch_of,
    presence_targets,
    vote,
)
from lmlib.methods.stages import stage_validation_errors


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ encoding
@pytest.mark.parametrize("code", ["log", "linear"])
def test_displacement_encode_decode_round_trip(code):
    d = torch.tensor([-250.0, -17.3, -1.0, -0.2, 0.0, 0.4, 3.0, 31.5, 999.0])
    y = encode_displacement(d, code)
    torch.testing.assert_close(decode_displacement(y, code), d, rtol=1e-5, atol=1e-4)
    if code == "log":
        torch.testing.assert_close(y, torch.sign(d) * torch.log10(d.abs() + 1))
        assert y.abs().max() < 3.01  # 999 px -> 3


def test_unknown_displacement_code():
    with pytest.raises(ValueError, match="displacement"):
        encode_displacement(torch.zeros(2), "sqrt")


# ------------------------------------------------------------------------------------ patch geometry
@pytest.mark.parametrize("stride", [1, 2, 8, 32])
def test_patch_centre_of_output_cell(stride):
    c = patch_centres((3, 4), stride)
    assert c.shape == (2, 3, 4)
    for j in range(3):
        for k in range(4):
            expected = [j * stride + (stride - 1) / 2, k * stride + (stride - 1) / 2]
            assert c[:, j, k].tolist() == expected
            # the centre is the middle of the cell's input pixels j*s .. j*s+s-1, and lies in that cell
            assert np.mean(np.arange(j * stride, (j + 1) * stride)) == expected[0]
            assert patch_of(c[:, j, k], stride).tolist() == [j, k]


def test_patch_of_uses_pixel_edges():
    # pixel i covers [i - 0.5, i + 0.5): with stride 4, cell 0 = [-0.5, 3.5), cell 1 = [3.5, 7.5)
    x = torch.tensor([[-0.5], [3.49], [3.5], [7.49], [7.5]])
    assert patch_of(x, 4).reshape(-1).tolist() == [0, 0, 1, 1, 2]


def test_patch_centres_3d():
    c = patch_centres((2, 3, 4), 8)
    assert c.shape == (3, 2, 3, 4)
    assert c[:, 1, 2, 3].tolist() == [11.5, 19.5, 27.5]


def test_centre_mapping_matches_the_network_grid():
    """The global net's output cell j covers input pixels j*stride ... (stride-divisible input)."""
    net = GlobalFCNN(2, 1, channels=(4, 4, 4, 4, 4), blocks=(1, 1, 1, 1), output_stride=8).eval()
    out = net(torch.zeros(1, 1, 64, 40))
    assert out["presence"].shape[2:] == (8, 5)
    assert patch_centres((8, 5), 8)[:, -1, -1].tolist() == [63 - 3.5, 39 - 3.5]


# ----------------------------------------------------------------------------------------- targets
def test_presence_target_is_one_hot_per_landmark():
    lm = torch.tensor([[[5.0, 70.0], [40.2, 3.0], [200.0, 10.0], [31.6, 31.4]]])  # 3rd outside the 4x4 cells
    valid = torch.tensor([[True, True, True, False]])
    t = presence_targets(lm, valid, (4, 4), 32)
    assert t.shape == (1, 4, 4, 4)
    sums = t.sum(dim=(2, 3))[0].tolist()
    assert sums == [1.0, 1.0, 0.0, 0.0]  # one-hot; none outside the grid; none for an invalid landmark
    assert t[0, 0, 0, 2] == 1 and t[0, 1, 1, 0] == 1
    t3 = presence_targets(torch.tensor([[[9.0, 1.0, 17.0]]]), torch.tensor([[True]]), (2, 2, 3), 8)
    assert t3.sum() == 1 and t3[0, 0, 1, 0, 2] == 1


def test_displacement_targets_point_from_every_centre_to_the_landmark():
    lm = torch.tensor([[[10.0, 50.0]]])
    t = displacement_targets(lm, (2, 3), 16, "linear")
    assert t.shape == (1, 1, 2, 2, 3)
    centres = patch_centres((2, 3), 16)
    torch.testing.assert_close(t[0, 0] + centres, lm[0, 0][:, None, None].expand(2, 2, 3))


# ------------------------------------------------------------------------------------------ voting
def _ideal_outputs(lm: torch.Tensor, shape: tuple[int, ...], stride: int, code: str, seed: int = 0):
    """Exact displacements from every cell and arbitrary presence logits."""
    g = torch.Generator().manual_seed(seed)
    presence = torch.randn(*lm.shape[:2], *shape, generator=g) * 3
    return {"presence": presence, "displacement": displacement_targets(lm, shape, stride, code)}


@pytest.mark.parametrize("dims,shape,stride", [(2, (4, 5), 32), (3, (3, 4, 2), 8)])
@pytest.mark.parametrize("code", ["log", "linear"])
def test_voting_recovers_landmarks_from_ideal_outputs(dims, shape, stride, code):
    g = torch.Generator().manual_seed(1)
    extent = torch.tensor(shape, dtype=torch.float32) * stride
    lm = torch.rand(2, 3, dims, generator=g) * extent * 1.2 - 0.1 * extent  # some outside the grid
    out = _ideal_outputs(lm, shape, stride, code)
    coords, conf = vote(out["presence"], out["displacement"], stride, code)
    torch.testing.assert_close(coords, lm, atol=2e-3, rtol=0)
    torch.testing.assert_close(conf, torch.sigmoid(out["presence"]).flatten(2).amax(-1))


def test_votes_stay_within_the_grid_extent():
    disp = torch.full((1, 1, 2, 4, 4), 6.0)  # log code: 10^6 px, an untrained net's output
    disp[:, :, 1] = -6.0
    coords, _ = vote(torch.zeros(1, 1, 4, 4), disp, 8, "log")
    assert coords[0, 0, 0] <= 2 * 32 and coords[0, 0, 1] >= -32


def test_vote_is_presence_weighted():
    # two cells, one votes for x=10 with p=0.75, the other for x=30 with p=0.25 -> 15
    disp = torch.tensor([10.0 - 15.5, 30.0 - 47.5]).reshape(1, 1, 1, 2)  # stride 32: centres 15.5 and 47.5
    logits = torch.logit(torch.tensor([0.75, 0.25])).reshape(1, 1, 2)
    coords, conf = vote(logits, disp, 32, "linear")
    assert coords.item() == pytest.approx(15.0, abs=1e-5) and conf.item() == pytest.approx(0.75)


def test_loss_is_zero_for_ideal_displacements_and_ignores_invalid_landmarks():
    lm = torch.tensor([[[10.0, 50.0], [90.0, 20.0]]])
    valid = torch.tensor([[True, False]])
    out = _ideal_outputs(lm, (4, 4), 32, "log")
    out["presence"] = presence_targets(lm, torch.ones_like(valid), (4, 4), 32) * 60 - 30  # confident, correct
    loss, parts = fcnn_loss(out, lm, valid, 32, "log", alpha=20)
    assert loss.item() < 1e-6 and parts["bce_presence"].item() < 1e-6
    bad = {k: v.clone() for k, v in out.items()}
    bad["displacement"][:, 1] += 5  # the invalid landmark's outputs do not count
    bad["presence"][:, 1] *= -1
    assert fcnn_loss(bad, lm, valid, 32, "log", alpha=20)[0].item() < 1e-6
    bad["displacement"][:, 0] += 0.1
    l1 = fcnn_loss(bad, lm, valid, 32, "log", alpha=20)[1]["l1_displacement"].item()
    assert l1 == pytest.approx(0.1, rel=1e-4)


# ---------------------------------------------------------------------------------------- networks
@pytest.mark.parametrize("dims,size,stride", [(2, (64, 96), 32), (2, (64, 96), 16), (3, (32, 16, 24), 8)])
def test_global_network_shapes_and_stride(dims, size, stride):
    net = GlobalFCNN(dims, 5, channels=(4, 8, 8, 16, 16), output_stride=stride).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, *size))
    cells = tuple(s // stride for s in size)
    assert out["presence"].shape == (2, 5, *cells)
    assert out["displacement"].shape == (2, 5, dims, *cells)
    n_blocks = sum(1 for m in net.features if type(m).__name__ == "ResidualBlock")
    assert n_blocks == 16  # [3, 4, 6, 3]


def test_global_network_default_strides_and_bad_stride():
    assert GlobalLocalFCNN(2, 3).stride == 32 and GlobalLocalFCNN(3, 3).stride == 8
    assert GlobalLocalFCNN(2, 3).size_multiple() == 32
    with pytest.raises(ValueError, match="output_stride"):
        GlobalFCNN(2, 1, output_stride=12)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("kind", ["per_landmark", "shared"])
def test_local_networks_route_items_by_landmark(dims, kind):
    m = GlobalLocalFCNN(dims, 3, stage="local", network={"channels": [4, 8], "kind": kind})
    assert m.stride == 2 and m.size_multiple() == 2 and not m.test_time_flip
    net = m.build_network().eval()
    size = (16,) * dims
    image = torch.randn(4, 1, *size)
    ids = torch.tensor([[2], [0], [2], [1]])
    with torch.no_grad():
        out = m.forward(net, {"image": image, "landmark_ids": ids})
        alone = m.forward(net, {"image": image[1:2], "landmark_ids": ids[1:2]})
    assert out["presence"].shape == (4, 1, *(s // 2 for s in size))
    assert out["displacement"].shape == (4, 1, dims, *(s // 2 for s in size))
    torch.testing.assert_close(out["presence"][1:2], alone["presence"])  # item 1 went through landmark 0's net


def test_official_local_net_layout():
    net = LocalFCNN(2, 1)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs[:6]] == [32, 32, 32, 32, 64, 64]
    assert [c.kernel_size for c in convs[6:]] == [(1, 1), (1, 1)]  # two 1x1 heads


@pytest.mark.parametrize("stage", ["global", "local"])
def test_config_round_trip(stage):
    m = build_method("global_local", spatial_dims=2, n_landmarks=4, stage=stage, alpha=8.0, displacement="linear")
    again = build_method("global_local", **json.loads(json.dumps(m.config())))
    assert again.config() == m.config() and again.stage == stage and again.alpha == 8.0


def test_amsgrad_optimizer():
    m = GlobalLocalFCNN(2, 2, network={"channels": [4, 4, 4, 4, 4]})
    opt = m.configure_optimizers(m.build_network().parameters(), 10)["optimizer"]
    assert all(g["amsgrad"] for g in opt.param_groups)


# ------------------------------------------------------------------------------------- patch rule
def test_patch_rule_covers_the_global_errors():
    rule = PatchRule(2, spacing_mm=1.0, factor=2.5, max_px=20)
    small = rule.choose({"a": 1.0, "b": 2.0})  # half-width 5 mm -> 11 px -> at least 16
    assert small["size_px"] == 16 and small["spacing_mm"] == 1.0 and not small["coarsened"]
    assert small["jitter_mm"] == pytest.approx(7.5)
    mid = rule.choose({"a": 3.0})  # 7.5 mm each side -> 16 px -> 16
    assert mid["size_px"] == 16
    big = rule.choose({"a": 3.4})  # 8.5 mm each side -> 18 px
    assert big["size_px"] == 18 and big["spacing_mm"] == 1.0
    coarse = rule.choose({"a": 8.0})  # 20 mm each side -> 20 px at 40/19 mm
    assert coarse["size_px"] == 20 and coarse["coarsened"]
    assert coarse["spacing_mm"] * (coarse["size_px"] - 1) == pytest.approx(40.0)
    assert coarse["covers_wanted"] and small["covers_wanted"]
    limited = PatchRule(2, 0.25, max_px=20, max_spacing_mm=0.8).choose({"a": 30.0})  # an untrained global stage
    assert limited["spacing_mm"] == 0.8 and limited["size_px"] == 20 and not limited["covers_wanted"]
    fixed = PatchRule(3, 0.5, patch_mm=6.0).choose(None)
    assert fixed["size_px"] == 16 and "fixed" in fixed["reason"]
    with pytest.raises(ValueError, match="train the global stage first"):
        rule.choose(None)
    train, evaluate = rule.views(coarse)
    assert train.per_landmark and train.jitter == ("uniform", pytest.approx(coarse["jitter_mm"]))
    assert evaluate.jitter == ("none", 0.0) and evaluate.size == (20, 20)


def test_per_landmark_patches_follow_each_landmarks_error():
    """Each landmark's patch covers factor x its own error; the px are those the worst landmark needs."""
    rule = PatchRule(2, spacing_mm=0.25, factor=2.5, max_px=20, max_spacing_mm=0.8)
    errors = {"sella": 1.0, "gonion": 3.5, "menton": 0.2}
    choice = rule.choose(errors, ["menton", "sella", "gonion"])
    per = choice["landmark_spacing_mm"]
    assert list(per) == ["menton", "sella", "gonion"] and choice["size_px"] == 20
    assert per["sella"] == pytest.approx(2 * 2.5 * 1.0 / 19)  # 5 mm across 19 px steps
    assert per["menton"] == 0.25  # never finer than local_spacing_mm
    assert per["gonion"] == 0.8 and not choice["covers_wanted"]  # never coarser than the global stage
    train, evaluate = rule.views(choice)
    assert train.jitter == ("inside", 0.0) and train.landmark_spacing == (0.25, pytest.approx(5 / 19), 0.8)
    assert evaluate.landmark_spacing == train.landmark_spacing and evaluate.jitter == ("none", 0.0)
    worst_only = PatchRule(2, 0.25, factor=2.5, max_px=20, max_spacing_mm=0.8, per_landmark=False)
    assert "landmark_spacing_mm" not in worst_only.choose(errors, ["menton", "sella", "gonion"])


def test_per_landmark_patch_grids_and_inside_jitter():
    """Patch items of a per-landmark view have their landmark's spacing, and with "inside" jitter the
    landmark lies anywhere inside its patch (never outside)."""
    from lmlib.data.loaders import LandmarkDataset, ViewSpec
    from lmlib.data.phantoms import make_phantom_dataset

    samples = make_phantom_dataset(2, n_images=3, seed=0)
    n = len(samples[0].landmark_names)
    own = tuple(0.2 + 0.1 * k for k in range(n))
    ds = LandmarkDataset(samples, view=ViewSpec("patch", size=(16, 16), per_landmark=True, jitter=("inside", 0.0),
                                                landmark_spacing=own), train=True, seed=1)
    seen = []
    for i in range(len(ds)):
        item = ds[i]
        k = int(item["landmark_ids"][0])
        steps = np.linalg.norm(item["index_to_world"][:, :2].numpy(), axis=0)
        assert steps == pytest.approx([own[k], own[k]])
        xy = item["landmarks"][0].numpy()
        assert ((xy >= -0.5) & (xy <= 15.5)).all() and bool(item["valid"][0])
        seen.append(np.abs(xy - 7.5).max())
    assert max(seen) > 5.0  # spread over the patch, not only near its centre
    with pytest.raises(ValueError, match="landmark_spacing has 2 values"):
        LandmarkDataset(samples, view=ViewSpec("patch", size=(16, 16), per_landmark=True, landmark_spacing=(1, 1)))
    with pytest.raises(ValueError, match="per_landmark patch views only"):
        ViewSpec("patch", size=(16, 16), landmark_spacing=(1.0,))


def test_inside_jitter_keeps_the_landmark_in_an_oblique_patch():
    """The "inside" offset was drawn along the world axes while the patch follows the image's direction: on an
    image turned by 40 degrees the landmark left its patch (and became invalid) in about one item of seven."""
    from lmlib.data.geometry import Geometry
    from lmlib.data.loaders import LandmarkDataset, ViewSpec
    from lmlib.data.sample import Sample

    c, s_ = np.cos(np.deg2rad(40)), np.sin(np.deg2rad(40))
    geo = Geometry((1.0, 1.0), direction=np.array([[c, -s_], [s_, c]]))
    sample = Sample.from_index("oblique", np.zeros((200, 200), np.float32), geo, np.array([[100.0, 100.0]]), ("P",),
                               meta={"split": "train"})
    ds = LandmarkDataset([sample] * 100, view=ViewSpec("patch", size=(33, 33), per_landmark=True,
                                                       jitter=("inside", 0.0)), train=True, seed=0)
    corners = []
    for i in range(len(ds)):
        item = ds[i]
        xy = item["landmarks"][0].numpy()
        assert bool(item["valid"][0]) and ((xy >= -0.5) & (xy <= 32.5)).all()
        corners.append(np.abs(xy - 16.0).max())
    assert max(corners) > 12.0  # spread over the patch, not only near its centre


def test_stage_validation_errors_of_the_selected_epoch(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,step,val/mre_mm,val/err_mm/a,val/err_mm/b,train/loss\n"
                   "0,1,5.0,4.0,6.0,\n0,1,,,,2.0\n1,3,3.0,2.5,3.5,\n2,5,4.0,1.0,7.0,\n")
    assert stage_validation_errors(csv) == {"a": 2.5, "b": 3.5}


def test_local_stage_settles_its_views_from_the_errors():
    method = GlobalLocalFCNN(2, 3, stage="local")
    calls = []

    def errors():
        calls.append(1)
        return {"a": 3.4}

    stage = LocalStage("local", method, None, None, max_epochs=3, rule=PatchRule(2, 1.0), errors=errors)
    assert "after the previous stage" in repr(stage) and not calls  # nothing chosen yet
    assert stage.view.size == (18, 18) and stage.eval_view.size == (18, 18) and len(calls) == 1
    assert method.config()["patch_choice"]["size_px"] == 18
    assert stage.max_epochs == 3 and stage.name == "local"


# ------------------------------------------------------------------------------------- end to end
TINY = {"max_epochs": 2, "local_epochs": 1, "max_train_images": 6, "global_channels": [4, 4, 8, 8, 8],
        "local_channels": [4, 8], "batch_size": 4, "local_batch_size": 16, "augment": False, "device": "cpu",
        "overlay_every": 1}


@pytest.mark.slow
def test_run_method_writes_both_stages(tmp_path, one_thread):
    from lmlib.engine.runner import run_method
    from lmlib.outputs.contract import read_run

    out = tmp_path / "global_local"
    result = run_method("global_local", {"dataset": "synthetic2d", "output_dir": str(out), **TINY})
    assert list(result.stages) == ["global", "local"]
    for stage in ("global", "local"):
        preds, metrics = read_run(out / stage)
        assert metrics["n_images"] == 12 and len(preds) == 12 * 8 and np.isfinite(metrics["mre_mm"])
        manifest = json.loads((out / stage / "manifest.json").read_text())
        assert manifest["stage"] == stage and manifest["method"] == "global_local"
        assert (out / stage / "checkpoints" / "best.ckpt").is_file()
    local = json.loads((out / "local" / "manifest.json").read_text())
    choice = local["method_config"]["patch_choice"]
    assert local["view"]["size"] == [choice["size_px"]] * 2 and "global validation error" in choice["reason"]
    assert result.stages["local"]["train_seconds"] > result.stages["global"]["train_seconds"]
    with pytest.raises(ValueError, match="not used by global_local"):
        run_method("global_local", {"dataset": "synthetic2d", "output_dir": str(out), "sigma": 2.0})


@pytest.mark.slow
def test_figures_from_a_run(tmp_path, one_thread):
    from lmlib.engine.runner import run_method
    from lmlib.reporting.global_local_figures import fig_global_to_local, fig_votes, global_to_local

    out = tmp_path / "gl3d"
    params = {**TINY, "max_epochs": 1, "max_train_images": 3, "global_channels": [2, 2, 4, 4, 4],
              "local_channels": [2, 4], "image_size": [32, 32, 32], "global_spacing_mm": 2.0}
    result = run_method("global_local", {"dataset": "synthetic3d", "output_dir": str(out), **params})
    fig_votes(result, 2, out / "fig_votes.png")
    fig_global_to_local(result, out / "fig_global_to_local.png")
    assert (out / "fig_votes.png").stat().st_size > 5_000 and (out / "fig_global_to_local.png").stat().st_size > 5_000
    table = global_to_local(out)
    assert len(table) == 6 * 6 and (table["moved_mm"] >= 0).all()


@pytest.mark.slow
def test_brief_training_beats_the_mean_shape_threefold(tmp_path, one_thread, phantoms2d):
    """The phantoms of tests/test_method_accuracy.py (64 px at 1 mm, 3 landmarks): the global stage at output
    stride 8 (8 x 8 cells), then 16-px local patches; the local stage beats the mean shape 3x."""
    from lmlib.data.transforms import build_augmentation
    from lmlib.engine.cascade import fit_cascade
    from lmlib.evaluation.baselines import mean_shape_predictions
    from lmlib.evaluation.metrics import mean_radial_error

    samples, train, test = phantoms2d["all"], phantoms2d["train"], phantoms2d["test"]

    def mre(pred):
        return mean_radial_error(pred, test)

    baseline = mre(mean_shape_predictions(train, test))
    assert 3.0 < baseline < 5.0
    params = {"output_dir": str(tmp_path), "local_epochs": 15, "output_stride": 8,
              "global_channels": [8, 16, 32, 64, 64], "local_channels": [16, 32], "global_spacing_mm": 1.0,
              "local_spacing_mm": 1.0, "local_batch_size": 16}
    stages = GlobalLocalFCNN.build_stages(2, 3, params, [64, 64],
                                          {"optimizer": {"lr": 3e-3}, "max_epochs": 40, "batch_size": 4})
    for stage in stages:
        stage.augmentation = build_augmentation(2, rotation_deg=5, scale=0.05, seed=0)
    results = fit_cascade(stages, samples, tmp_path, device="cpu", seed=0)
    glob, local = (mre(r.test.world_mm) for r in results)
    assert glob < baseline / 1.5, f"global {glob:.2f} mm vs mean shape {baseline:.2f} mm"
    assert local < baseline / 3, f"local {local:.2f} mm (global {glob:.2f}) vs mean shape {baseline:.2f} mm"
    assert local < glob


def test_mirror_augmentation_of_a_cascade_is_refused_before_any_stage_trains(tmp_path):
    """The patch items refuse a mirror when one is drawn, which came after the global stage had trained."""
    from lmlib.engine.runner import _run_cascade
    from lmlib.methods.global_local import GlobalLocalFCNN

    with pytest.raises(ValueError, match=r"flip_prob=0.5: global_local's patch stages .* set flip_prob: 0"):
        _run_cascade(GlobalLocalFCNN, {"flip_prob": 0.5, "output_dir": str(tmp_path)}, {}, None, [], [], [], [],
                     {"flip_pairs": [(0, 1)]}, None, "", 0)
