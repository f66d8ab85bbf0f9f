"""Network builders: output shapes in 2D/3D, input-size checks, timing helper."""
from __future__ import annotations

import pytest
import torch

from lmlib.methods.networks import build_network, check_input_size, count_parameters, size_multiple, time_network


@pytest.mark.parametrize("spatial_dims,size", [(2, (32, 48)), (3, (16, 16, 32))])
def test_unet_shapes(spatial_dims, size):
    net = build_network(spatial_dims, out_channels=5, channels=(8, 16, 32), num_res_units=1)
    y = net(torch.zeros(2, 1, *size))
    assert y.shape == (2, 5, *size)


def test_basic_unet_shapes():
    net = build_network(2, 3, arch="basic_unet", channels=(8, 8, 16, 16, 32))
    assert net(torch.zeros(1, 1, 32, 32)).shape == (1, 3, 32, 32)


def test_size_multiple_and_check():
    assert size_multiple("unet", (16, 32, 64, 128, 256)) == 16
    assert size_multiple("unet", (8, 16, 32), strides=(2, 3)) == 6
    check_input_size((256, 320), 16)
    with pytest.raises(ValueError, match="divisible by 16"):
        check_input_size((250, 320), 16)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_network(2, 3, arch="vit")
    with pytest.raises(ValueError, match="spatial_dims"):
        build_network(4, 3)
    with pytest.raises(ValueError, match="strides"):
        build_network(2, 3, channels=(8, 16, 32), strides=(2,))


def test_default_unet_is_small_and_timed():
    net = build_network(2, 19)
    assert 1_000_000 < count_parameters(net) < 2_500_000
    seconds = time_network(build_network(2, 2, channels=(4, 8, 16)), (1, 1, 32, 32), n_iter=1)
    assert 0 < seconds < 10


def test_per_landmark_routes_each_item_to_its_own_net():
    from lmlib.methods.networks import PerLandmark

    nets = [torch.nn.Conv2d(1, 2, 1, bias=True) for _ in range(3)]
    for k, net in enumerate(nets):
        torch.nn.init.zeros_(net.weight)
        torch.nn.init.constant_(net.bias, float(k))
    module = PerLandmark(nets)
    out = module(torch.randn(5, 1, 4, 4), torch.tensor([2, 0, 1, 2, 0]))
    assert out.shape == (5, 2, 4, 4)
    assert out[:, 0, 0, 0].tolist() == [2.0, 0.0, 1.0, 2.0, 0.0]
    assert len(module.state_dict()) == 6  # one checkpoint holds every landmark's net


@pytest.mark.parametrize("spatial_dims,size", [(2, (32, 48)), (3, (16, 16, 32))])
def test_head_channels_set_the_top_levels_width_and_project_to_every_landmark(spatial_dims, size):
    """``head_channels``: MONAI's U-Net ends at that width and one 3x3 convolution gives the landmark channels,
    so each output map has its own weights over a neighbourhood (a 1x1 from fewer features could not give 19
    independent maps); 0 keeps MONAI's U-Net as it is (the state dict of earlier checkpoints)."""
    net = build_network(spatial_dims, out_channels=19, channels=(8, 16, 32), num_res_units=1, head_channels=16)
    assert net(torch.zeros(2, 1, *size)).shape == (2, 19, *size)
    unet, head = net
    assert unet.out_channels == 16 and head.in_channels == 16 and head.out_channels == 19
    assert head.kernel_size == (3,) * spatial_dims
    plain = build_network(spatial_dims, out_channels=19, channels=(8, 16, 32), num_res_units=1)
    assert plain.out_channels == 19 and next(iter(plain.state_dict())).startswith("model.")


def test_head_channels_refused_where_it_means_nothing():
    with pytest.raises(ValueError, match="head_channels"):
        build_network(2, 3, arch="basic_unet", head_channels=16)
    with pytest.raises(ValueError, match="head_channels"):
        build_network(2, 3, head_channels=-1)


def test_head_channels_reach_the_network_from_the_notebook_parameters_and_the_checkpoint_config():
    from lmlib.methods.base import build_method
    from lmlib.methods.heatmap_unet import HeatmapUNet

    method = HeatmapUNet.from_parameters(2, 19, {"channels": [8, 16, 32], "head_channels": 16})
    assert method.network["head_channels"] == 16
    again = build_method("heatmap_unet", **method.config())
    assert again.build_network()[1].out_channels == 19
    assert "head_channels" not in HeatmapUNet.from_parameters(2, 19, {}).network  # the default: as before
    with pytest.raises(ValueError, match="head_channels"):
        HeatmapUNet.from_parameters(2, 19, {"head_channels": -2})


@pytest.mark.parametrize("spatial_dims,arch,size", [(2, "unet", (32, 48)), (3, "unet", (16, 16, 24)),
                                                    (2, "basic_unet", (32, 32))])
def test_channels_last_networks_compute_what_the_contiguous_ones_do(spatial_dims, arch, size):
    """``build_network`` (channels-last, instance norms as one-group-per-channel group norms) against the same
    network built contiguous with MONAI's instance norms: the same outputs and gradients from the same weights,
    checkpoints load either way, and no layer falls back to the contiguous layout (the instance norm did)."""
    from torch import nn

    from lmlib.methods.networks import memory_format

    kw = {"channels": (8, 16, 32), "num_res_units": 1} if arch == "unet" else {"channels": (8, 8, 16, 16, 32)}
    torch.manual_seed(0)
    old = build_network(spatial_dims, 5, arch=arch, channels_last=False, **kw)
    new = build_network(spatial_dims, 5, arch=arch, **kw)
    new.load_state_dict(old.state_dict())  # an earlier checkpoint loads
    old.load_state_dict(new.state_dict())
    assert any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in old.modules())
    assert not any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in new.modules())
    fmt = memory_format(spatial_dims)
    assert all(p.is_contiguous(memory_format=fmt) for p in new.parameters() if p.dim() == spatial_dims + 2)
    x = torch.randn(2, 1, *size)
    a, b = old(x), new(x)
    assert b.is_contiguous()  # returned contiguous for the loss and the decoding
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    a.square().mean().backward()
    b.square().mean().backward()
    for (name, pa), pb in zip(old.named_parameters(), new.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-3, atol=1e-5, msg=name)
    seen: list[bool] = []  # every convolution's input in the channels-last layout (the norms kept it)
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=fmt)))
             for m in new.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    new(x)
    for h in hooks:
        h.remove()
    assert seen and all(seen)


def test_a_network_is_channels_last_on_the_cpu_only():
    """Channels-last is for the CPU: a module moved to another device (here PyTorch's ``meta`` device, which every
    machine has) gets contiguous weights and input again, and channels-last ones back on the CPU (weights whose two
    layouts differ: more than one input channel, a kernel wider than 1)."""
    from lmlib.data.loaders import ViewSpec
    from lmlib.engine.training import LandmarkModule
    from lmlib.methods import build_method

    method = build_method("heatmap_unet", spatial_dims=2, n_landmarks=3, network={"channels": (8, 16, 32)})
    module = LandmarkModule.from_method(method, ["a", "b", "c"], ViewSpec(kind="whole", size=(32, 32)))
    weights = [p for p in module.net.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    module.to("meta")
    weights = [p for p in module.net.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]
    assert all(p.is_contiguous() and not p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    out = module.net(torch.empty(2, 1, 32, 32, device="meta", memory_format=torch.channels_last))
    assert out.is_contiguous()
    module.to_empty(device="cpu")
    module.to("cpu")
    assert all(p.is_contiguous(memory_format=torch.channels_last)
               for p in module.net.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1)
