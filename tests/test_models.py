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


def _local_nets(spatial_dims: int, n: int, seed: int = 0) -> list[torch.nn.Module]:
    """``n`` one-landmark local nets with batch-norm statistics and affine parameters away from their defaults."""
    from lmlib.methods.global_local import LocalFCNN

    torch.manual_seed(seed)
    nets = [LocalFCNN(spatial_dims, 1, channels=(8, 16), convs=(2, 1)) for _ in range(n)]
    for net in nets:
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                torch.nn.init.uniform_(m.weight, 0.5, 2)
                torch.nn.init.uniform_(m.bias, -1, 1)
    return nets


@pytest.mark.parametrize("spatial_dims,ids,one_call", [(2, [0, 1, 2, 3, 4, 0, 1, 2, 3, 4], True),
                                                       (2, [3, 0, 3, 1, 4, 2], True), (3, [4, 2, 0, 1, 3], True),
                                                       (2, [3, 0, 3, 3], False)])
def test_per_landmark_nets_grouped_for_inference_compute_what_each_net_does(spatial_dims, ids, one_call, monkeypatch):
    """In eval mode without gradients the local nets run as one grouped net (one call for every landmark's
    patches, items in rounds; one by one when the rounds would be less than half full); each item's outputs are
    its own net's, in batch order, uneven rounds included."""
    from lmlib.methods.global_local import LocalFCNN
    from lmlib.methods.networks import PerLandmark

    nets = _local_nets(spatial_dims, 5)
    grouped, plain = PerLandmark(nets, group=LocalFCNN.grouped).eval(), PerLandmark(nets).eval()
    x, ids_t = torch.randn(len(ids), 1, *(8,) * spatial_dims), torch.tensor(ids)
    calls: list[int] = []  # the landmarks of each LocalFCNN call: 1 one by one, 5 grouped
    forward = LocalFCNN.forward
    monkeypatch.setattr(LocalFCNN, "forward", lambda self, v: calls.append(self.n_landmarks) or forward(self, v))
    with torch.no_grad():
        out = grouped(x, ids_t)
    assert calls == ([5] if one_call else [1] * len(set(ids)))
    monkeypatch.undo()
    with torch.no_grad():
        want = plain(x, ids_t)
        each = [nets[k](x[b:b + 1]) for b, k in enumerate(ids)]
    for key in want:
        assert out[key].shape == want[key].shape
        torch.testing.assert_close(out[key], want[key], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[key], torch.cat([e[key] for e in each]), rtol=1e-5, atol=1e-5)


def test_grouped_local_nets_follow_every_weight_change():
    """The grouped copy is remade after an optimiser step, an in-place change, a loaded state dict, a replaced
    parameter or a cast (a stale copy would predict with old weights: a silent wrong number); training runs the nets
    one by one."""
    from lmlib.methods.global_local import LocalFCNN
    from lmlib.methods.networks import PerLandmark

    module = PerLandmark(_local_nets(2, 3), group=LocalFCNN.grouped)
    x, ids = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])

    def check() -> None:
        module.eval()
        with torch.no_grad():
            got = module(x, ids)["presence"]
            want = torch.cat([module.nets[k](x[k:k + 1])["presence"] for k in range(3)])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    check()
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    module(x, ids)["presence"].sum().backward()  # training mode: the nets one by one, with gradients
    opt.step()
    check()
    with torch.no_grad():  # an in-place change while in eval mode (its tensors' versions move)
        module.nets[1].heads["presence"][0].conv.bias.add_(3.0)
    check()
    module.load_state_dict(PerLandmark(_local_nets(2, 3, seed=1)).state_dict())
    check()
    module.nets[2].heads["presence"][0].conv.bias = torch.nn.Parameter(torch.full_like(  # a parameter replaced
        module.nets[2].heads["presence"][0].conv.bias, 0.5))
    check()
    module.double()  # cast: the copy is of other tensors
    x = x.double()
    check()


def test_the_grouped_copy_is_kept_while_nothing_changes(monkeypatch):
    """A prediction's module.to(its device).eval() and a train()/eval() round without a step keep the grouped copy
    (it was remade on every predict call, in its timing); a move of the weights' layout remakes it."""
    from lmlib.methods.global_local import LocalFCNN
    from lmlib.methods.networks import PerLandmark

    made: list[int] = []

    def counted(nets):
        made.append(len(nets))
        return LocalFCNN.grouped(nets)

    module = PerLandmark(_local_nets(2, 3), group=counted).eval()
    x, ids = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    with torch.no_grad():
        module(x, ids)
        module.to("cpu").eval()
        module.train()
        module.eval()
        module(x, ids)
    assert made == [3]
    module.to(memory_format=torch.channels_last)
    with torch.no_grad():
        module(x, ids)
    assert len(made) == 2


def test_nets_that_cannot_be_grouped_run_one_by_one():
    from lmlib.methods.global_local import LocalFCNN
    from lmlib.methods.networks import PerLandmark, grouped_copy

    class Own(torch.nn.Sequential):  # a container with its own forward: not taken for a plain sequence
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    assert grouped_copy([Own(torch.nn.Conv2d(1, 2, 1)), Own(torch.nn.Conv2d(1, 2, 1))]) is None
    assert grouped_copy([torch.nn.Conv2d(1, 2, 1), torch.nn.Conv2d(1, 3, 1)]) is None  # different shapes
    assert grouped_copy([torch.nn.InstanceNorm2d(2), torch.nn.InstanceNorm2d(2)]) is None
    assert grouped_copy([torch.nn.BatchNorm2d(2), torch.nn.BatchNorm2d(3)]) is None
    assert grouped_copy([torch.nn.LeakyReLU(0.1), torch.nn.LeakyReLU(0.2)]) is None  # differ in a setting
    hooked = torch.nn.Conv2d(1, 2, 1)
    hooked.register_forward_pre_hook(lambda module, args: None)  # the copy would not run it
    assert grouped_copy([hooked, torch.nn.Conv2d(1, 2, 1)]) is None
    assert LocalFCNN.grouped([torch.nn.Conv2d(1, 2, 1)]) is None
    nets = [torch.nn.Conv2d(1, 2, 1) for _ in range(2)]
    module = PerLandmark(nets, group=LocalFCNN.grouped).eval()
    with torch.no_grad():
        out = module(torch.ones(2, 1, 3, 3), torch.tensor([1, 0]))
        torch.testing.assert_close(out[0], nets[1](torch.ones(1, 1, 3, 3))[0])


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
