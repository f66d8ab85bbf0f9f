"""The U-Nets' instance norm with a faster backward pass on channels-last CPU tensors: the same function.

Profiling a U-Net's eager training step on the CPU (the benchmark notebook's ``table_layers.csv``, its "rest of the
step") showed PyTorch's CPU backward of ``group_norm`` taking a large share of the step on channels-last tensors
(the layout :func:`~lmlib.methods.networks.to_channels_last` gives the networks), several times its time on
contiguous ones. :class:`ChannelGroupNorm` (a ``GroupNorm`` with one group per channel and no affine parameters,
i.e. an instance norm, as :func:`~lmlib.methods.networks.instance_norms_as_group_norms` builds it) keeps PyTorch's
forward and computes the backward from the saved means and inverse deviations in four tensor operations (two sums
over the spatial axes, two fused multiply-adds), each vectorised over the channels-last layout.

Its own backward applies only where it is faster and exact to rounding: eager (not under ``torch.compile``, whose
generated kernels fuse the norm anyway), on the CPU, float32/float64, without autocast, channels-last input needing
a gradient; everywhere else, and always for the forward's result, PyTorch's own operation. The module is a subclass
without parameters or buffers of its own: checkpoints are the same either way. The benchmark notebook times the
step with PyTorch's kernel (:data:`lmlib.reporting.benchmark.PYTORCH_NORM_VARIANT`, ``table_variants.csv``).
(PyTorch's one-slope ``prelu`` backward is slow as well, but computed as ``leaky_relu_backward`` plus the slope's
sum it read memory more often and ran slower inside the network than in isolation: left as it is.)
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable


def _own_backward(x: torch.Tensor) -> bool:
    """Whether :class:`ChannelGroupNorm`'s own backward applies to its input ``x`` (B, C, *spatial): eager CPU
    training in float32/float64 without autocast, ``x`` needing a gradient and in the channels-last layout (not
    also the contiguous one)."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return (fmt is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and x.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu") and not x.is_contiguous() and x.is_contiguous(memory_format=fmt))


class _InstanceNorm(torch.autograd.Function):
    """Normalisation per item and channel over the spatial axes (``group_norm`` with a group per channel)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, eps: float) -> torch.Tensor:
        b, c = x.shape[:2]
        y, mean, rstd = torch.ops.aten.native_group_norm(x, None, None, b, c, x[0, 0].numel(), c, eps)
        ctx.save_for_backward(x, mean, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # y = (x - m) r with m, r the mean and inverse deviation over the M spatial positions of one (item, channel):
        # dx = r g - r sum(g) / M + r^3 (sum(g) m - sum(g x)) (x - m) / M = r g + a x + b per (item, channel)
        x, mean, rstd = ctx.saved_tensors
        axes = tuple(range(2, x.dim()))
        shape = (*x.shape[:2], *(1,) * len(axes))
        m, r, n = mean.view(shape), rstd.view(shape), float(x[0, 0].numel())
        sum_g = grad.sum(dim=axes, keepdim=True)
        sum_gx = (grad * x).sum(dim=axes, keepdim=True)
        a = r.pow(3) * (sum_g * m - sum_gx) / n
        out = torch.addcmul(-r * sum_g / n - a * m, grad, r)
        return out.addcmul_(x, a), None


class ChannelGroupNorm(nn.GroupNorm):
    """``GroupNorm`` with one group per channel and no affine parameters (an instance norm), whose backward on
    channels-last CPU tensors this module computes (see the module docstring); otherwise ``GroupNorm``."""

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(num_channels, num_channels, eps, affine=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if _own_backward(input):
            return _InstanceNorm.apply(input, self.eps)
        return super().forward(input)


def with_cpu_backward_layers(net: nn.Module) -> nn.Module:
    """``net`` with, in place, every ``GroupNorm`` of one group per channel without affine parameters a
    :class:`ChannelGroupNorm`: the same function and state dict. Other layers are left as they are."""
    for name, child in net.named_children():
        if type(child) is nn.GroupNorm and child.num_groups == child.num_channels and not child.affine:
            setattr(net, name, ChannelGroupNorm(child.num_channels, child.eps))
        else:
            with_cpu_backward_layers(child)
    return net
