"""The U-Nets' instance norm and PReLU with their own CPU backward (lmlib.methods.cpu_layers): PyTorch's functions."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lmlib.methods.cpu_layers import ChannelGroupNorm, SlopePReLU, with_cpu_backward_layers
from lmlib.methods.networks import build_network, memory_format

OWN = "_InstanceNormBackward"
OWN_PRELU = "_SlopePReLUBackward"


def _pair(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A channels-last input needing a gradient and its contiguous copy (the reference)."""
    fmt = memory_format(len(shape) - 2)
    base = (torch.randn(shape, dtype=torch.float64) * 3 + torch.linspace(-2, 5, shape[1], dtype=torch.float64)
            .reshape(1, -1, *(1,) * (len(shape) - 2))).to(dtype)
    return (base.to(memory_format=fmt).requires_grad_(), base.clone().contiguous().requires_grad_())


@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 19, 16, 20), (1, 4, 3, 5, 6)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_channel_group_norm_computes_what_group_norm_does(shape, dtype):
    """Outputs and input gradients equal PyTorch's group norm of one group per channel (on contiguous tensors,
    its other kernel), also for a gradient that is a slice of a wider tensor (a U-Net's skip concatenation), and
    the own backward ran."""
    x, ref = _pair(shape, dtype)
    norm = ChannelGroupNorm(shape[1])
    y = norm(x)
    expected = nn.functional.group_norm(ref, shape[1], eps=norm.eps)
    assert type(y.grad_fn).__name__ == OWN
    assert y.is_contiguous(memory_format=memory_format(len(shape) - 2))
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(y, expected, **tol)
    wide = torch.randn(shape[0], 2 * shape[1], *shape[2:], dtype=dtype).to(memory_format=memory_format(len(shape) - 2))
    grad = wide[:, 1:1 + shape[1]]  # a non-dense view, as the backward of torch.cat hands out
    y.backward(grad)
    expected.backward(grad.contiguous())
    torch.testing.assert_close(x.grad, ref.grad, **tol)


@pytest.mark.parametrize("shape,channels_last", [((3, 5, 7, 9), True), ((2, 4, 5, 6, 3), True), ((3, 5, 7, 9), False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_slope_prelu_computes_what_prelu_does(shape, channels_last, dtype):
    """Output, input gradient and slope gradient equal PyTorch's ``prelu`` in either layout, also for a gradient that
    is a slice of a wider tensor, with values on both sides of zero; the own backward ran."""
    fmt = memory_format(len(shape) - 2) if channels_last else torch.contiguous_format
    base = torch.randn(shape, dtype=dtype)
    x = base.clone().to(memory_format=fmt).requires_grad_()
    ref = base.clone().requires_grad_()
    prelu = SlopePReLU(1).to(dtype)
    with torch.no_grad():
        prelu.weight.fill_(0.3)
    weight = prelu.weight.detach().clone().requires_grad_()
    y = prelu(x)
    expected = nn.functional.prelu(ref, weight)
    assert type(y.grad_fn).__name__ == OWN_PRELU
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(y, expected, **tol)
    wide = torch.randn(shape[0], 2 * shape[1], *shape[2:], dtype=dtype).to(memory_format=fmt)
    grad = wide[:, 1:1 + shape[1]]
    y.backward(grad)
    expected.backward(grad.contiguous())
    torch.testing.assert_close(x.grad, ref.grad, **tol)
    torch.testing.assert_close(prelu.weight.grad, weight.grad, **tol)
    frozen = SlopePReLU(1).to(dtype).requires_grad_(False)  # a frozen slope: the input's gradient alone
    x.grad, ref.grad = None, None
    frozen(x).backward(grad)
    nn.functional.prelu(ref, frozen.weight).backward(grad.contiguous())
    assert frozen.weight.grad is None
    torch.testing.assert_close(x.grad, ref.grad, **tol)
    fixed = base.clone().to(memory_format=fmt)  # an input without gradient: the slope's alone
    prelu.weight.grad, weight.grad = None, None
    prelu(fixed).backward(grad)
    nn.functional.prelu(base, weight).backward(grad.contiguous())
    torch.testing.assert_close(prelu.weight.grad, weight.grad, **tol)


def test_channel_group_norm_leaves_other_cases_to_pytorch():
    """Contiguous input, no gradient needed, autocast, and a compiled graph: PyTorch's own group norm (the same
    values); the same for the PReLU (no gradient, autocast, compiled, several slopes)."""
    norm = ChannelGroupNorm(4)
    x, ref = _pair((2, 4, 6, 8), torch.float32)
    assert type(norm(ref).grad_fn).__name__ != OWN
    with torch.no_grad():
        torch.testing.assert_close(norm(x), nn.functional.group_norm(ref, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(norm(x).grad_fn).__name__ != OWN
    explained = torch._dynamo.explain(norm)(x)  # an autograd.Function would be traced as autograd_function_apply
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    assert "autograd_function_apply" not in str(explained.graphs[0].code)
    prelu = SlopePReLU(1)
    with torch.no_grad():
        assert prelu(x).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(prelu(x).grad_fn).__name__ != OWN_PRELU
    assert type(SlopePReLU(4)(x).grad_fn).__name__ != OWN_PRELU
    explained = torch._dynamo.explain(prelu)(x)
    assert explained.graph_break_count == 0 and "autograd_function_apply" not in str(explained.graphs[0].code)


def test_networks_get_the_norm_and_keep_their_checkpoints():
    """``build_network`` swaps every one-group-per-channel group norm (the instance norms) and one-slope PReLU and
    nothing else; the state dict is the same as with PyTorch's modules (``cpu_layers=False``), in both directions,
    and so are outputs and gradients; affine or grouped norms and many-slope PReLUs are not swapped."""
    torch.manual_seed(0)
    kw = {"channels": (8, 16, 32), "num_res_units": 1}
    plain = build_network(2, 5, cpu_layers=False, **kw)
    own = build_network(2, 5, **kw)
    assert not any(isinstance(m, ChannelGroupNorm) for m in plain.modules())
    swapped = [m for m in own.modules() if isinstance(m, ChannelGroupNorm)]
    assert swapped and len(swapped) == sum(type(m) is nn.GroupNorm for m in plain.modules())
    prelus = [m for m in own.modules() if isinstance(m, SlopePReLU)]
    assert prelus and len(prelus) == sum(type(m) is nn.PReLU for m in plain.modules())
    assert list(own.state_dict()) == list(plain.state_dict())
    own.load_state_dict(plain.state_dict())
    plain.load_state_dict(own.state_dict())
    x = torch.randn(2, 1, 32, 48)
    ran: list[str] = []  # the own backward ran in the network (its layers' inputs as the conditions need them)
    hooks = [m.register_forward_hook(lambda m, args, out: ran.append(type(out.grad_fn).__name__))
             for m in own.modules() if isinstance(m, (ChannelGroupNorm, SlopePReLU))]
    a, b = plain(x), own(x)
    for h in hooks:
        h.remove()
    assert len(ran) == len(swapped) + len(prelus) and set(ran) == {OWN, OWN_PRELU}
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    for (name, pa), pb in zip(plain.named_parameters(), own.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6, msg=name)
    kept = with_cpu_backward_layers(nn.Sequential(nn.GroupNorm(4, 4, affine=True), nn.GroupNorm(2, 4), nn.PReLU(4)))
    assert not any(isinstance(m, (ChannelGroupNorm, SlopePReLU)) for m in kept)
