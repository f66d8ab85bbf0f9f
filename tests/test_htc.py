"""Multiresolution HTC (lmlib.methods.htc): index mapping between resolutions, targets <-> decoding,
the double attention, network shapes 2D/3D, the loss, decoding variants, the run path and its figures.
(Its accuracy against the mean shape is in tests/test_method_accuracy.py.)"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmlib.methods import build_method
from lmlib.methods.decoding import decode_maps
from lmlib.methods.htc import HEAD_STRIDES, DoubleAttention, HTCNet, MultiresHTC, to_heatmap_index, to_input_index
from lmlib.methods.targets import gaussian_heatmaps

SMALL = {"widths": [4, 8, 8, 16], "ffn_ratios": [2, 2, 2, 2], "neck_channels": 8, "head_channels": 8}


# ------------------------------------------------------------------------------------ index mapping
@pytest.mark.parametrize("stride", [2, 4])
def test_index_mapping_round_trip_and_cell_centres(stride):
    x = torch.tensor([0.0, 3.3, 17.9, 63.5])
    assert torch.allclose(to_input_index(to_heatmap_index(x, stride), stride), x, atol=1e-6)
    # cell j covers input pixels j*s .. j*s + s - 1: its centre is their mean
    j = torch.arange(5.0)
    centres = torch.tensor([np.mean(np.arange(k * stride, (k + 1) * stride)) for k in range(5)], dtype=torch.float32)
    assert torch.allclose(to_input_index(j, stride), centres)


@pytest.mark.parametrize("stride", [2, 4])
def test_a_peak_downsampled_by_area_maps_back_to_the_input_position(stride):
    """A blob on the input grid, averaged over s x s cells (the coarser grid of the same extent): its
    decoded peak mapped back lands on the input position (0 px bias; MMPose's x / s would be off by
    (s - 1) / 2 px)."""
    size = (64, 48)
    points = torch.tensor([[[20.3, 17.6], [41.0, 30.2]]])
    fine = gaussian_heatmaps(points, size, sigma=3.0 * stride)
    coarse = F.avg_pool2d(fine, stride)
    coords, _ = decode_maps(coarse, 2, "quadratic")
    back = to_input_index(coords, stride)
    assert torch.allclose(back, points, atol=0.15 * stride), (back, points)
    naive = coords * stride
    assert (naive - points).abs().mean() > 0.3 * (stride - 1) / 2


def test_targets_decode_to_the_landmarks_at_both_resolutions():
    method = MultiresHTC(2, 3, network={**SMALL, "heads": "both"})
    landmarks = torch.tensor([[[10.2, 20.7], [33.3, 5.5], [50.0, 60.1]]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    targets = method.encode_targets(landmarks, valid, (64, 80), 0)
    assert targets["quarter"].shape == (1, 3, 16, 20) and targets["half"].shape == (1, 3, 32, 40)
    for head in ("quarter", "half"):
        c, peak = decode_maps(targets[head], 2, "quadratic")
        assert torch.allclose(to_input_index(c, HEAD_STRIDES[head]), landmarks, atol=1e-3)
    coords, conf = method.decode_batch(targets, {}, 0)
    assert torch.allclose(coords, landmarks, atol=1e-3) and conf.shape == (1, 3)


def test_decode_from_one_head_ignores_the_other():
    method = MultiresHTC(2, 1, network={**SMALL, "heads": "both"}, decode_from="half")
    lm = torch.tensor([[[20.0, 24.0]]])
    ok = torch.ones(1, 1, dtype=torch.bool)
    targets = method.encode_targets(lm, ok, (64, 64), 0)
    wrong = method.encode_targets(lm + 8.0, ok, (64, 64), 0)
    coords, _ = method.decode_batch({"half": targets["half"], "quarter": wrong["quarter"]}, {}, 0)
    assert torch.allclose(coords, lm, atol=1e-3)
    both = MultiresHTC(2, 1, network={**SMALL, "heads": "both"})
    mean, _ = both.decode_batch({"half": targets["half"], "quarter": wrong["quarter"]}, {}, 0)
    assert torch.allclose(mean, lm + 4.0, atol=1e-3)  # the mean of the two heads


# ------------------------------------------------------------------------------------ network
def test_double_attention_is_global_and_its_maps_are_distributions():
    torch.manual_seed(0)
    block = DoubleAttention(2, 8, reduction=2).eval()
    block.keep_attention = True
    x = torch.randn(1, 8, 16, 16)
    y = block(x)
    assert y.shape == x.shape
    att = block.attention
    assert att.shape == (1, 4, 16, 16)
    assert torch.allclose(att.flatten(2).sum(-1), torch.ones(1, 4), atol=1e-5)
    x2 = x.clone()
    x2[..., 15, 15] += 5.0  # one far corner pixel changes every output position (not a local operator)
    change = (block(x2) - y).abs().sum(1)[0]
    assert change[0, 0] > 1e-4 and (change > 1e-6).float().mean() == 1.0


@pytest.mark.parametrize("heads, expected", [("both", {"quarter", "half"}), ("quarter", {"quarter"}), ("half", {"half"})])
def test_network_outputs_at_quarter_and_half_resolution(heads, expected):
    net = HTCNet(2, 5, heads=heads, **SMALL)
    out = net(torch.randn(2, 1, 64, 48))
    assert set(out) == expected
    if "quarter" in out:
        assert out["quarter"].shape == (2, 5, 16, 12)
    if "half" in out:
        assert out["half"].shape == (2, 5, 32, 24)


def test_network_3d_shapes_and_paper_stage_layout():
    out = HTCNet(3, 2, **SMALL)(torch.randn(1, 1, 32, 32, 16))
    assert out["quarter"].shape == (1, 2, 8, 8, 4) and out["half"].shape == (1, 2, 16, 16, 8)
    net = HTCNet(2, 19)  # the paper's widths 64/128/320/512, FFN 8/8/4/4, reductions 8/4/2/1
    embeds = [s.embed[0] for s in net.stages]
    assert [e.out_channels for e in embeds] == [64, 128, 320, 512] and all(e.stride == (2, 2) for e in embeds)
    assert [s.ffn[0].out_channels for s in net.stages] == [512, 1024, 1280, 2048]
    assert [s.attention.a.out_channels for s in net.stages] == [8, 32, 160, 512]
    assert net.stages[2].conv.body[3].dilation == (2, 2)


# ------------------------------------------------------------------------------------ loss, config
def test_loss_is_zero_at_the_targets_weighted_per_head_and_ignores_invalid_landmarks():
    method = MultiresHTC(2, 2, network={**SMALL, "heads": "both"}, quarter_weight=1000.0, half_weight=3000.0,
                         foreground_weight=1.0)  # the paper's plain MSE
    lm = torch.tensor([[[10.0, 12.0], [30.0, 40.0]]])
    ok = torch.tensor([[True, False]])
    targets = method.encode_targets(lm, ok, (64, 64), 0)
    assert float(method.loss(targets, targets, ok, 0)) == 0.0
    off = {k: v.clone() for k, v in targets.items()}
    off["quarter"][:, 1] += 1.0  # the invalid landmark's channel: no effect
    assert float(method.loss(off, targets, ok, 0)) == 0.0
    off["quarter"][:, 0] += 0.1
    assert float(method.loss(off, targets, ok, 0)) == pytest.approx(1000 * 0.01, rel=1e-4)
    off = {k: v.clone() for k, v in targets.items()}
    off["half"][:, 0] += 0.1
    assert float(method.loss(off, targets, ok, 0)) == pytest.approx(3000 * 0.01, rel=1e-4)


def test_config_round_trip_parameters_and_variants():
    method = MultiresHTC.from_parameters(2, 4, {**SMALL, "heads": "both", "sigma": 1.5, "foreground_weight": 10.0,
                                                "decoder": "centroid"}, optimizer={"name": "adamw"})
    again = build_method("htc", **method.config())
    assert again.config() == method.config() and again.network["widths"] == [4, 8, 8, 16]
    assert set(method.decoding_variants()) == {"quarter_head", "half_head"}
    assert MultiresHTC(2, 4, network={"heads": "half"}).decoding_variants() == {}
    with pytest.raises(ValueError, match="heads"):
        MultiresHTC(2, 4, network={"heads": "eighth"})
    with pytest.raises(ValueError, match="decode_from"):
        MultiresHTC(2, 4, network={"heads": "quarter"}, decode_from="half")


# ------------------------------------------------------------------------------------ run path
@pytest.mark.slow
def test_run_method_writes_the_run_and_one_row_per_head(tmp_path):
    from lmlib.engine.runner import run_method
    from lmlib.outputs.contract import read_run
    from lmlib.reporting.htc_figures import fig_attention, fig_heatmaps

    out = tmp_path / "htc"
    params = {"dataset": "synthetic2d", "output_dir": str(out), "max_epochs": 1, "max_train_images": 4,
              "augment": False, "device": "cpu", "overlay_every": 1, "optimizer": "adamw", "warmup_epochs": 1,
              "flip_test": True, "flip_prob": 0.5, **SMALL}
    result = run_method("htc", params)
    assert set(result.variants) == {"quarter_head", "half_head"}
    rows = {}
    for folder in (out, out / "quarter_head", out / "half_head"):
        preds, metrics = read_run(folder)
        assert metrics["n_images"] == 12 and len(preds) == 12 * 8 and np.isfinite(metrics["mre_mm"])
        rows[folder.name] = preds.set_index(["image_id", "landmark"])[["x_mm", "y_mm"]]
    manifest = json.loads((out / "quarter_head" / "manifest.json").read_text())
    assert manifest["variant"] == "quarter_head" and manifest["method_config"]["decode_from"] == "quarter"
    # the run's points are the mean of the two heads' points (flip-test averaging is linear too; the CSV keeps 1e-4 mm)
    mean = (rows["quarter_head"] + rows["half_head"]) / 2
    np.testing.assert_allclose(rows["htc"].to_numpy(), mean.to_numpy(), atol=1.01e-4)
    assert len(result.summary()) == 3
    fig_heatmaps(result, 2, out / "fig_heatmaps.png")
    fig_attention(result, n_maps=2, path=out / "fig_attention.png")
    assert (out / "fig_heatmaps.png").stat().st_size > 5_000 and (out / "fig_attention.png").stat().st_size > 5_000
    with pytest.raises(ValueError, match="not used by htc"):
        run_method("htc", {**params, "alpha": 2.0})


@pytest.mark.slow
def test_split_errors_and_conformal_regions_rescore_the_runs_checkpoint(tmp_path):
    from lmlib.engine.runner import run_method
    from lmlib.evaluation.conformal import conformal_radii
    from lmlib.reporting.diagnostics import conformal_coverage, split_error_arrays, split_errors
    from lmlib.reporting.diagnostics import main as diagnostics_main

    out = tmp_path / "htc"
    params = {"dataset": "synthetic2d", "output_dir": str(out), "max_epochs": 1, "max_train_images": 4,
              "augment": False, "device": "cpu", **SMALL}
    result = run_method("htc", params)
    frame = split_errors(out)
    assert list(frame.index) == ["train", "val", "test"] and list(frame["n_images"]) == [36, 12, 12]
    assert frame.loc["test", "mre_mm"] == pytest.approx(result.metrics["mre_mm"], rel=1e-6)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        split_errors(tmp_path)
    # regions calibrated on val: each landmark's radius is one of its val errors, coverage counted on test
    cover = conformal_coverage(out, (0.8,))
    arrays, _ = split_error_arrays(out, splits=("val", "test"))
    radii = conformal_radii(arrays["val"], 0.2)
    assert all(np.isin(r, arrays["val"][:, k]) for k, r in enumerate(radii))
    inside = (arrays["test"] <= radii).mean() * 100
    assert cover.loc["80 %", "coverage_pct"] == pytest.approx(inside) and cover.loc["80 %", "n_test"] == arrays["test"].size
    assert diagnostics_main([str(tmp_path / "nothing")]) == 2
