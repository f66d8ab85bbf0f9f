"""Network builders (MONAI), 2D and 3D by ``spatial_dims``, and a CPU timing helper.

Architectures (``build_network(arch=...)``), all with one output channel per landmark and no final
activation (logits / raw heatmaps):
- ``"unet"`` (default): :class:`monai.networks.nets.UNet`, strided-convolution encoder, residual units.
- ``"basic_unet"``: :class:`monai.networks.nets.BasicUNet` (max-pool encoder, two convs per level).
- ``"flexible_unet"``: :class:`monai.networks.nets.FlexibleUNet` with a ResNet/EfficientNet encoder
  (randomly initialised: no downloads).

Measured on this project's 2-core CPU (torch 2.x, batch 4 at 256 x 320, forward + backward + Adam
step, 19 output channels): ``unet`` channels 16-256 with 2 residual units 0.9 s/iter (1.6 M
parameters); ``unet`` 32-512 3.6 s (6.5 M); ``basic_unet`` 16..128 3.8 s (0.5 M); ``flexible_unet``
resnet18 7.3 s (13.5 M), efficientnet-b0 16 s (7.1 M). Hence the default: MONAI ``UNet`` 16-256, the
fastest per image by 4x at a useful size (the seed's ResNet-101 U-Net would be far slower still).
Re-measure with :func:`time_network`.

``head_channels`` (``unet`` only): the top level's width at the input's full resolution, then one 3 x 3
convolution to the landmark channels (0: MONAI's top level outputs the landmarks itself). oneDNN vectorises
channels in blocks of 16 on AVX-512 CPUs; with 19 landmarks (hamedan-ceph) the full-resolution layers ran at
the cost of 32 channels, and 16 there plus the one projection may make the step faster, by how much depending on
the CPU model and on compiling (the benchmark notebook's ``table_variants.csv``). At full size it validated worse
and trained no faster in total (``heatmap_unet_cpu_compile_tuned_head16``): an ablation, not a default. A 3 x 3,
not a 1 x 1, projection: a 1 x 1 from 16 features could not give 19 independent maps at a pixel. MONAI's top level
ends in a linear convolution, so the projection adds no nonlinearity, only a wider linear neighbourhood.

Memory format (``channels_last``, on by default): the network's weights and its input in PyTorch's
channels-last layout (``torch.channels_last`` / ``channels_last_3d``), which oneDNN convolves without reordering
between layers; the few-channel full-resolution convolutions of a U-Net gain most (the benchmark notebook times
the U-Nets' steps before and after). PyTorch's ``InstanceNorm`` computes through a batch
norm over a ``(1, B * C, ...)`` reshape, which needs the contiguous layout: every norm layer copied its input back
and the next convolution reordered it again. Instance norms are therefore built as ``GroupNorm`` with one group per
channel: the same normalisation (per item and channel over the spatial axes, the same ``eps``, no parameters
unless affine, so checkpoints load either way), with a channels-last kernel. The outputs are returned contiguous.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lmlib.methods.cpu_layers import with_cpu_backward_layers

ARCHITECTURES: tuple[str, ...] = ("unet", "basic_unet", "flexible_unet")


def build_network(spatial_dims: int, out_channels: int, in_channels: int = 1, arch: str = "unet",
                  channels: Sequence[int] = (16, 32, 64, 128, 256), strides: Sequence[int] | None = None,
                  num_res_units: int = 2, norm: str = "instance", dropout: float = 0.0,
                  backbone: str = "resnet18", head_channels: int = 0, channels_last: bool = True,
                  cpu_layers: bool = True) -> nn.Module:
    """A segmentation-style network mapping ``(B, in, *size)`` to ``(B, out, *size)``.

    ``channels``: feature counts per level (``unet``: len(channels) - 1 downsamplings by ``strides``,
    default 2 each; ``basic_unet``: the 6 ``features``, padded/trimmed). ``backbone`` only for
    ``flexible_unet``. ``head_channels`` > 0 (``unet`` only): the top level's width, then a 3 x 3 convolution
    to ``out_channels`` (see the module docstring). ``channels_last``: weights and input in the
    channels-last memory format on the CPU, output contiguous (:func:`to_channels_last`; the same function either
    way). ``cpu_layers``: its instance norms (group norms of a group per channel) and one-slope PReLUs with a faster
    CPU backward (:func:`~lmlib.methods.cpu_layers.with_cpu_backward_layers`; the same function either way). Input
    sizes must be divisible by :func:`size_multiple`.
    """
    net = _build(spatial_dims, out_channels, in_channels, arch, channels, strides, num_res_units, norm, dropout,
                 backbone, head_channels)
    net = to_channels_last(net, spatial_dims) if channels_last else net
    return with_cpu_backward_layers(net) if cpu_layers else net


def _build(spatial_dims: int, out_channels: int, in_channels: int, arch: str, channels: Sequence[int],
           strides: Sequence[int] | None, num_res_units: int, norm: str, dropout: float, backbone: str,
           head_channels: int) -> nn.Module:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if head_channels < 0 or (head_channels and arch != "unet"):
        raise ValueError(f"head_channels must be >= 0 and is for arch 'unet' only, got {head_channels} for {arch!r}")
    if arch == "unet":
        from monai.networks.nets import UNet

        chans = tuple(int(c) for c in channels)
        st = tuple(int(s) for s in strides) if strides is not None else (2,) * (len(chans) - 1)
        if len(st) != len(chans) - 1:
            raise ValueError(f"unet needs len(strides) == len(channels) - 1, got {st} for {chans}")
        net = UNet(spatial_dims, in_channels, head_channels or out_channels, channels=chans, strides=st,
                   num_res_units=num_res_units, norm=norm, dropout=dropout)
        if not head_channels:
            return net
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        return nn.Sequential(net, conv(head_channels, out_channels, kernel_size=3, padding=1))
    if arch == "basic_unet":
        from monai.networks.nets import BasicUNet

        feats = list(int(c) for c in channels)[:5]
        feats += [feats[-1] * 2] * (5 - len(feats))
        return BasicUNet(spatial_dims, in_channels, out_channels, features=tuple(feats + [feats[0]]),
                         norm=norm, dropout=dropout)
    if arch == "flexible_unet":
        from monai.networks.nets import FlexibleUNet

        return FlexibleUNet(in_channels, out_channels, backbone, pretrained=False, spatial_dims=spatial_dims,
                            norm=norm, dropout=dropout)
    raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")


def memory_format(spatial_dims: int) -> torch.memory_format:
    """PyTorch's channels-last memory format for 2D or 3D images."""
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


def instance_norms_as_group_norms(net: nn.Module) -> nn.Module:
    """Replace, in place, every ``InstanceNorm`` without running statistics by the equivalent ``GroupNorm`` (one
    group per channel, same ``eps`` and ``affine``): the same function with a channels-last kernel (module
    docstring). Instance norms that track running statistics are left as they are (GroupNorm has none)."""
    for name, child in net.named_children():
        if isinstance(child, nn.modules.instancenorm._InstanceNorm) and not child.track_running_stats:
            norm = nn.GroupNorm(child.num_features, child.num_features, child.eps, child.affine)
            if child.affine:
                norm.load_state_dict(child.state_dict())
            setattr(net, name, norm)
        else:
            instance_norms_as_group_norms(child)
    return net


#: the attribute of a network built by to_channels_last: (spatial dims, its current memory format)
LAYOUT = "_lmlib_layout"


def _input_to(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook: an image batch ``(B, C, *size)`` in the network's current layout (attribute :data:`LAYOUT`)."""
    spatial_dims, fmt = getattr(module, LAYOUT)
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dim() != spatial_dims + 2:
        return None
    return (x.contiguous(memory_format=fmt), *args[1:])


def _output_contiguous(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    """Forward hook: a tensor output in the contiguous layout (the loss and decoding run per landmark channel)."""
    return output.contiguous() if isinstance(output, torch.Tensor) else None


def to_channels_last(net: nn.Module, spatial_dims: int) -> nn.Module:
    """``net`` (in place) with channels-last weights, a forward pre-hook that puts its image input in the same
    format (a no-op when it already is) and a forward hook that returns its output contiguous (a compiled
    dilation-erosion loss ran slower on a channels-last output); instance norms become group norms
    (:func:`instance_norms_as_group_norms`).
    The hooks are not in the state dict: checkpoints are the same as without. Channels-last is for the CPU: after
    moving a network to another device, :func:`match_device_layout` makes it contiguous again (there, group norm
    computes contiguous, and channels-last weights would make every convolution reorder)."""
    instance_norms_as_group_norms(net)
    setattr(net, LAYOUT, (spatial_dims, memory_format(spatial_dims)))
    net.to(memory_format=memory_format(spatial_dims))  # type: ignore[call-overload]  # documented, untyped
    net.register_forward_pre_hook(_input_to)
    net.register_forward_hook(_output_contiguous)
    return net


def match_device_layout(module: nn.Module) -> nn.Module:
    """Every network of ``module`` built by :func:`to_channels_last`: channels-last on the CPU, contiguous on any
    other device (where its parameters are now). Call it after moving a module to its device."""
    for net in module.modules():
        layout, param = getattr(net, LAYOUT, None), next(net.parameters(), None)
        if layout is None or param is None:
            continue
        want = memory_format(layout[0]) if param.device.type == "cpu" else torch.contiguous_format
        if want != layout[1]:
            setattr(net, LAYOUT, (layout[0], want))
            net.to(memory_format=want)  # type: ignore[call-overload]  # documented, untyped
    return module


def size_multiple(arch: str = "unet", channels: Sequence[int] = (16, 32, 64, 128, 256),
                  strides: Sequence[int] | None = None) -> int:
    """Input sizes must be divisible by this (the product of the downsampling factors)."""
    if arch == "unet":
        st = strides if strides is not None else (2,) * (len(channels) - 1)
        out = 1
        for s in st:
            out *= int(s)
        return out
    return 16 if arch == "basic_unet" else 32


def check_input_size(size: Sequence[int], multiple: int) -> None:
    """Raise a clear error when a grid size does not fit the network's downsampling."""
    bad = [int(s) for s in size if int(s) % multiple]
    if bad:
        raise ValueError(f"image_size {list(size)} must be divisible by {multiple} on every axis "
                         f"(the network downsamples by that factor)")


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return int(sum(p.numel() for p in net.parameters() if p.requires_grad))


def time_network(net: nn.Module, input_shape: Sequence[int], n_iter: int = 3, train: bool = True,
                 device: str | torch.device = "cpu") -> float:
    """Seconds per iteration (after one warm-up) of forward (+ backward + Adam step when ``train``)
    on random input of ``input_shape`` ``(B, C, *size)``."""
    dev = torch.device(device)
    net = match_device_layout(net.to(dev))
    x = torch.randn(*[int(s) for s in input_shape], device=dev)
    opt = torch.optim.Adam(net.parameters(), 1e-4) if train else None
    net.train(train)

    def step() -> None:
        if opt is not None:
            opt.zero_grad()
            out = net(x)
            parts = out.values() if isinstance(out, dict) else [out]
            sum(v.float().pow(2).mean() for v in parts).backward()
            opt.step()
        else:
            with torch.no_grad():
                net(x)

    step()
    start = time.perf_counter()
    for _ in range(n_iter):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return (time.perf_counter() - start) / n_iter


#: modules a grouped copy takes over unchanged: they act on each channel (or element) on its own
_CHANNELWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout,
                nn.Dropout2d, nn.Dropout3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d,
                nn.MaxPool3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def grouped_copy(modules: Sequence[nn.Module]) -> nn.Module | None:
    """One module computing ``len(modules)`` structurally equal modules side by side, for inference: module ``k``
    reads and writes channel block ``k`` (its own channels, in order) of a batch ``(B, K * C, *size)``.

    Convolutions become one grouped convolution (their weights and biases concatenated), batch norms one batch
    norm over every block (their running statistics concatenated; it holds for eval mode only), channel-wise
    layers (activations, pooling, dropout) are taken over as they are, and ``Sequential`` / ``ModuleDict``
    containers are copied with their children grouped. Anything else (a subclass with its own ``forward``, a
    grouped convolution, a norm over several channels at once, modules that differ in a setting, a module with
    forward hooks, which the copy would not run) gives None: the caller runs the modules one by one. A copy, not a
    view: it holds the weights of the moment it was made."""
    first = modules[0]
    if any(type(m) is not type(first) for m in modules) or any(has_forward_hooks(m) for m in modules):
        return None
    k = len(modules)
    if type(first) in _CONVS:
        convs = [m for m in modules if isinstance(m, nn.modules.conv._ConvNd)]
        shapes = {(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                   c.padding_mode, c.bias is not None) for c in convs}
        if len(shapes) > 1 or convs[0].groups != 1 or convs[0].padding_mode != "zeros":
            return None
        c0 = convs[0]
        conv = type(c0)(k * c0.in_channels, k * c0.out_channels, c0.kernel_size,  # type: ignore[call-arg]
                        stride=c0.stride, padding=c0.padding, dilation=c0.dilation, groups=k,
                        bias=c0.bias is not None).to(c0.weight)
        with torch.no_grad():
            conv.weight.copy_(torch.cat([c.weight for c in convs]))
            if conv.bias is not None:
                conv.bias.copy_(torch.cat([c.bias for c in convs if c.bias is not None]))
        return conv
    if type(first) in _BATCH_NORMS:
        norms = [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        n0 = norms[0]
        if not all(n.track_running_stats and (n.num_features, n.affine, n.eps) == (n0.num_features, n0.affine, n0.eps)
                   for n in norms):
            return None
        norm = type(n0)(k * n0.num_features, eps=n0.eps, affine=n0.affine)
        norm.to(n0.running_mean).eval()
        with torch.no_grad():
            for name in ("running_mean", "running_var") + (("weight", "bias") if n0.affine else ()):
                getattr(norm, name).copy_(torch.cat([getattr(n, name) for n in norms]))
        return norm
    if type(first) in _CHANNELWISE:
        return copy.deepcopy(first) if len({repr(m) for m in modules}) == 1 else None
    if isinstance(first, (nn.Sequential, nn.ModuleDict)) and not _own_forward(first, (nn.Sequential, nn.ModuleDict)):
        names = [name for name, _ in first.named_children()]
        if any([n for n, _ in m.named_children()] != names for m in modules):
            return None
        children = [grouped_copy([m.get_submodule(name) for m in modules]) for name in names]
        if any(child is None for child in children):
            return None
        return shell_of(first, dict(zip(names, children)))
    return None


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether ``module`` itself has forward hooks or forward pre-hooks (a copy of it would not run them)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def shell_of(module: nn.Module, children: dict[str, nn.Module | None]) -> nn.Module | None:
    """A new module of ``module``'s class with its settings (plain attributes, e.g. MONAI's ``Convolution``'s),
    ``children`` as its submodules, and none of its hooks; None where ``module`` holds weights of its own."""
    if next(module.parameters(recurse=False), None) is not None or next(module.buffers(recurse=False), None) is not None:
        return None
    out = type(module).__new__(type(module))
    nn.Module.__init__(out)
    for key, value in vars(module).items():
        if key not in vars(out) and key != "_compiled_call_impl":  # not the original's compiled forward
            out.__dict__[key] = value
    out.training = module.training
    for name, child in children.items():
        out.add_module(name, child)
    return out


def _own_forward(module: nn.Module, bases: tuple[type[nn.Module], ...]) -> bool:
    """Whether ``module``'s class overrides the ``forward`` of the container it derives from."""
    return not any(type(module).forward is base.forward for base in bases)


class PerLandmark(nn.Module):
    """One small network per landmark held in one module (so one checkpoint holds them all).

    ``forward(image, landmark_ids)``: item ``b`` of the batch ``(B, C, *size)`` goes through the net of
    landmark ``landmark_ids[b]``; outputs (a tensor, or a dict of tensors) are reassembled in batch
    order. Each net is called once per batch on the items of its landmark.

    ``group`` (optional): builds from the nets one module that computes them all at once on a batch
    ``(M, N * C, *size)`` (net ``k`` on channel block ``k``), returning outputs whose axis 1 is the landmark
    (landmark ``k``'s slice ``k:k+1`` equal to net ``k``'s output), or None where it cannot. Used in eval mode
    without gradients (prediction, validation), not while compiling, and only when the batch fills at least half
    of its rounds: items are placed in rounds of one patch per landmark (missing ones zero, their outputs dropped),
    and the N calls of small nets on a patch or two each become one call (the benchmark notebook's
    ``table_local_inference.csv`` times both). Training runs the nets one by one (a batch norm in training mode must
    see each net's own items only).
    """

    def __init__(self, nets: Sequence[nn.Module],
                 group: Callable[[Sequence[nn.Module]], nn.Module | None] | None = None) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.group = group
        self._forget_grouped()

    def forward(self, image: torch.Tensor, landmark_ids: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        ids = landmark_ids.reshape(-1).to(image.device)
        if ids.numel() != image.shape[0]:
            raise ValueError(f"{ids.numel()} landmark ids for a batch of {image.shape[0]}")
        if int(ids.min()) < 0 or int(ids.max()) >= len(self.nets):
            raise ValueError(f"landmark ids {ids.tolist()} outside 0..{len(self.nets) - 1}")
        if self.group is not None and not self.training and not torch.is_grad_enabled():
            counts = torch.bincount(ids, minlength=len(self.nets))
            rounds = int(counts.max())
            grouped = self._grouped_nets() if rounds * len(self.nets) <= 2 * len(ids) else None
            if grouped is not None:
                return self._forward_grouped(grouped, image, ids, counts, rounds)
        parts: dict[int, tuple[torch.Tensor, torch.Tensor | dict[str, torch.Tensor]]] = {}
        for k in torch.unique(ids).tolist():
            where = torch.nonzero(ids == k).reshape(-1)
            parts[k] = (where, self.nets[k](image[where]))
        first = next(iter(parts.values()))[1]

        def assemble(get: Any) -> torch.Tensor:
            sample = get(first)
            out = sample.new_empty((image.shape[0], *sample.shape[1:]))
            for where, value in parts.values():
                out[where] = get(value)
            return out

        if isinstance(first, dict):
            return {key: assemble(lambda v, key=key: v[key]) for key in first}
        return assemble(lambda v: v)

    # the grouped copy: made on the first call in eval mode, dropped by a move to another device, dtype or layout
    # and a loaded state dict (on this module or a parent), and made again when a weight changed in place since (an
    # optimiser step, a batch norm's running statistics: each tensor's version) or a tensor was replaced (identity).
    # Not seen: writes through a tensor's .data; call _forget_grouped() after such a change. Kept through
    # train()/eval() and a .to() that moves nothing (a prediction's module.to(device).eval() remade it on every call)
    def _forget_grouped(self) -> None:
        self._grouped: tuple[list[torch.Tensor], tuple[int, ...], nn.Module | None] | None = None

    def _tensors(self) -> list[torch.Tensor]:
        return [*self.nets.parameters(), *self.nets.buffers()]

    def _apply(self, fn: Any, recurse: bool = True) -> PerLandmark:
        def where(tensors: list[torch.Tensor]) -> list[tuple[Any, ...]]:
            return [(t.data_ptr(), t.dtype, t.device) for t in tensors]

        before = where(self._tensors())
        out = super()._apply(fn, recurse)
        if where(self._tensors()) != before:  # moved, cast or re-laid out: the copy is of other tensors
            self._forget_grouped()
        return out

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._forget_grouped()
        super()._load_from_state_dict(*args, **kwargs)

    def _grouped_nets(self) -> nn.Module | None:
        """The grouped copy of the nets (``group``; None without one, where it cannot be made, while compiling, or
        while a net is in training mode)."""
        if self.group is None or torch.compiler.is_compiling() or any(net.training for net in self.nets):
            return None
        tensors = self._tensors()
        if (self._grouped is not None and len(tensors) == len(self._grouped[0])
                and all(a is b for a, b in zip(tensors, self._grouped[0]))
                and tuple(t._version for t in tensors) == self._grouped[1]):
            return self._grouped[2]
        with torch.no_grad():
            grouped = self.group(list(self.nets))
        self._grouped = (tensors, tuple(t._version for t in tensors), grouped.eval() if grouped is not None else None)
        return self._grouped[2]

    def _forward_grouped(self, grouped: nn.Module, image: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor,
                         n_rounds: int) -> torch.Tensor | dict[str, torch.Tensor]:
        """Item ``b`` in round ``r`` (its rank among the items of its landmark) and block ``ids[b]``: one call."""
        n, b = len(self.nets), image.shape[0]
        order = torch.argsort(ids, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rounds = torch.empty_like(ids)
        rounds[order] = torch.arange(b, device=ids.device) - starts[ids[order]]
        x = image.new_zeros((n_rounds, n, *image.shape[1:]))
        x[rounds, ids] = image
        out = grouped(x.reshape(n_rounds, n * image.shape[1], *image.shape[2:]))

        def items(value: torch.Tensor) -> torch.Tensor:
            return value[rounds, ids].unsqueeze(1).contiguous()  # (B, 1, ...): net ids[b]'s output for item b

        if isinstance(out, dict):
            return {key: items(value) for key, value in out.items()}
        return items(out)


class SharedByLandmark(nn.Module):
    """One network for all landmarks, its outputs holding a channel per landmark (a tensor ``(B, N, ...)``
    or a dict of them); ``forward(image, landmark_ids)`` returns, for item ``b``, the channel(s) of its
    landmark(s) ``landmark_ids[b]`` (``(B, K, ...)``; the alternative to :class:`PerLandmark`)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor, landmark_ids: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        out = self.net(image)
        ids = landmark_ids.reshape(image.shape[0], -1).to(image.device)
        rows = torch.arange(image.shape[0], device=image.device)[:, None]
        if isinstance(out, dict):
            return {key: value[rows, ids] for key, value in out.items()}
        return out[rows, ids]
