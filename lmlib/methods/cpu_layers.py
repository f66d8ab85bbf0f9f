"""Two layers of the U-Nets with a faster backward pass on the CPU: the same functions, other kernels.

Profiling a U-Net's eager training step on the CPU by operator (the benchmark notebook's ``table_layers.csv`` puts
them in its "rest of the step") showed two of PyTorch's backward kernels among the largest costs:

- ``group_norm`` on channels-last tensors (the layout :func:`~lmlib.methods.networks.to_channels_last` gives the
  networks) ran slower than on contiguous ones. :class:`ChannelGroupNorm` (a ``GroupNorm`` with one
  group per channel and no affine parameters, i.e. an instance norm, as
  :func:`~lmlib.methods.networks.instance_norms_as_group_norms` builds it) keeps PyTorch's forward and computes the
  backward from the saved means and inverse deviations in two sums over the spatial axes and two fused
  multiply-adds, each vectorised over the channels-last layout.
- ``prelu`` with one slope (MONAI's default activation): its backward computes the input's gradient and the slope's
  sum in a slow kernel. :class:`SlopePReLU` takes the input's from PyTorch's leaky-ReLU backward at the slope's value
  (one pass) and the slope's as one dot product.

Each takes its own path only in eager CPU training (not under ``torch.compile``, whose generated kernels fuse these
layers anyway), float32/float64, without autocast, with a gradient needed (the norm: on channels-last input), where
it was timed faster (the fp32 channels-last U-Nets' steps) and is exact to rounding; everywhere else, and always for
the forward's result, PyTorch's own operation. The modules are subclasses with the same parameters: checkpoints are
the same either way. The benchmark notebook times the step with PyTorch's kernels
(:data:`lmlib.reporting.benchmark.PYTORCH_LAYERS_VARIANT`, ``table_variants.csv``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable


def _channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` (B, C, *spatial) is in the channels-last layout (not also the contiguous one)."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)


def _own_backward(*tensors: torch.Tensor) -> bool:
    """Whether a layer's own backward applies to its ``tensors``: eager CPU training in float32/float64 without
    autocast, one of them needing a gradient."""
    return (all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors)
            and any(t.requires_grad for t in tensors) and torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu"))


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


class _SlopePReLU(torch.autograd.Function):
    """``prelu`` with one slope ``weight`` (shape (1,))."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.prelu(x, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # d/dx: g where x > 0, else slope * g (PyTorch's leaky-ReLU backward at the slope's value, one pass);
        # d/dslope: sum of g * min(x, 0), one dot product (no product tensor written; min(x, 0) is, and grad is copied
        # when its layout differs from x's), both flattened in the same order, x's memory order where it is dense
        x, weight = ctx.saved_tensors
        grad_x = torch.ops.aten.leaky_relu_backward(grad, x, float(weight), False) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            negative = x.clamp(max=0)
            order = negative.movedim(1, -1) if _channels_last(x) else negative
            along = grad.movedim(1, -1) if _channels_last(x) else grad
            grad_w = torch.dot(along.reshape(-1), order.reshape(-1)).reshape(weight.shape)
        return grad_x, grad_w


class ChannelGroupNorm(nn.GroupNorm):
    """``GroupNorm`` with one group per channel and no affine parameters (an instance norm), whose backward on
    channels-last CPU tensors this module computes (see the module docstring); otherwise ``GroupNorm``."""

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(num_channels, num_channels, eps, affine=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if _own_backward(input) and _channels_last(input):
            return _InstanceNorm.apply(input, self.eps)
        return super().forward(input)


class SlopePReLU(nn.PReLU):
    """``PReLU`` with one slope whose CPU backward this module computes (see the module docstring); otherwise
    ``PReLU``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.num_parameters == 1 and _own_backward(input, self.weight):
            return _SlopePReLU.apply(input, self.weight)
        return super().forward(input)


def with_cpu_backward_layers(net: nn.Module) -> nn.Module:
    """``net`` with, in place, every ``GroupNorm`` of one group per channel without affine parameters a
    :class:`ChannelGroupNorm` and every ``PReLU`` of one slope a :class:`SlopePReLU` (its slope kept): the same
    function and state dict. Other layers are left as they are."""
    for name, child in net.named_children():
        if type(child) is nn.GroupNorm and child.num_groups == child.num_channels and not child.affine:
            setattr(net, name, ChannelGroupNorm(child.num_channels, child.eps))
        elif type(child) is nn.PReLU and child.num_parameters == 1:
            prelu = SlopePReLU(1, child.init)
            prelu.weight = child.weight  # the same parameter (its value, device and layout)
            setattr(net, name, prelu)
        else:
            with_cpu_backward_layers(child)
    return net
