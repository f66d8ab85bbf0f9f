"""Multiresolution heatmap learning with a hybrid transformer-CNN (HTC; MICCAI 2023), 2D (and 3D).

Network (:class:`HTCNet`, ``spatial_dims`` 2 or 3, MONAI / torch building blocks):

- **Backbone**, four stages (:class:`HTCStage`), each: a stride-2 3x3 patch-embedding convolution + BN
  to ``widths[i]`` channels (paper 64/128/320/512); an encoder layer: BN -> double attention
  (:class:`DoubleAttention`) -> residual, BN -> mix-FFN (1x1, GELU, 1x1; expansion ``ffn_ratios``,
  paper 8/8/4/4) -> residual, both with drop-path (MONAI ``DropPath``, rising linearly to
  ``drop_path`` = 0.1 over the four stages); then a convolution module (:class:`ConvModule`:
  conv3x3-BN-ReLU, 3x3 dilation-2 conv-BN, plus a conv3x3-BN shortcut, ReLU).
- **Neck**: MONAI ``FeaturePyramidNetwork`` on stages 2-4 (strides 4, 8, 16) to ``neck_channels``;
  only its stride-4 map is used.
- **Heads** (``heads``: ``"both"``, ``"quarter"`` or ``"half"``): at 1/4 resolution conv3x3-ReLU-1x1;
  at 1/2 a stride-2 4x4 transposed conv-BN-ReLU, conv3x3-BN-ReLU, 1x1. One channel per landmark.

Targets and loss: one Gaussian per landmark and resolution, ``sigma`` px *of that heatmap's grid* (2),
peak 1 at the sub-pixel landmark; mean squared error over valid landmarks' channels weighted
``quarter_weight`` (1000) and ``half_weight`` (3000) as in the paper, optionally multiplied per pixel by
``1 + (foreground_weight - 1) * target`` (1 = the paper's plain MSE).

Index mapping (:func:`to_heatmap_index` / :func:`to_input_index`): a heatmap at stride ``s`` is the
input grid's extent at ``s`` times the spacing, so its cell ``j`` is centred on input index
``j * s + (s - 1) / 2`` (input pixels ``j*s .. j*s + s - 1``). Decoding: per resolution the argmax refined
by a log-parabola (:func:`lmlib.methods.decoding.decode_maps`), mapped to the input grid; the landmark is
the mean of the two (``decode_from`` picks one head instead, used for the ablation rows), then world mm
by the engine. Test-time flip averaging is the shared ``flip_test`` of
:meth:`lmlib.methods.base.LandmarkMethod.predict_coords`.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from lmlib.methods.base import LandmarkMethod, Targets, foreground_weighted, masked_mean
from lmlib.methods.config import MethodParameters, defaults
from lmlib.methods.decoding import DECODERS, decode_maps, gaussian_decoder_kwargs, map_spread
from lmlib.methods.targets import dice_scores, gaussian_heatmaps
from lmlib.typed import Int, Number, Widths, field, one_of

HEADS: tuple[str, ...] = ("both", "quarter", "half")
HEAD_STRIDES: dict[str, int] = {"quarter": 4, "half": 2}
PAPER_WIDTHS: tuple[int, ...] = (64, 128, 320, 512)
PAPER_FFN_RATIOS: tuple[int, ...] = (8, 8, 4, 4)
PAPER_REDUCTIONS: tuple[int, ...] = (8, 4, 2, 1)  # A, B, V project to C / r channels


class HTCParameters(MethodParameters):
    """The multiresolution HTC's notebook parameters (beyond the shared ones); the defaults are a small network
    for the phantoms, the paper's sizes are ``PAPER_WIDTHS``, ``PAPER_FFN_RATIOS`` and 256-channel neck and
    heads (the driver's ``htc_gpu`` job)."""

    widths: Widths = field([16, 32, 64, 128], "stage widths (4 stages)", "a list of integers >= 1")
    ffn_ratios: Widths = field([4, 4, 4, 4], "mix-FFN expansion per stage", "a list of integers >= 1")
    neck_channels: Int = field(64, "FPN width", "an integer >= 1", ge=1)
    head_channels: Int = field(32, "head width", "an integer >= 1", ge=1)
    heads: Annotated[str, one_of(HEADS)] = field(
        "both", "the supervised (and decoded) resolutions: both | quarter | half", "both, quarter or half")
    drop_path: Number = field(0.1, "stochastic depth, rising linearly to this over the stages", "a number in [0, 1)",
                              ge=0, lt=1)
    sigma: Number = field(2.0, "Gaussian sigma in px of each heatmap's own grid", "a number > 0 (px)", gt=0)
    quarter_weight: Number = field(1000.0, "MSE weight of the 1/4 heatmaps (paper)", "a number > 0", gt=0)
    half_weight: Number = field(3000.0, "MSE weight of the 1/2 heatmaps (paper)", "a number > 0", gt=0)
    foreground_weight: Number = field(30.0, "per-pixel MSE weight at the peak (1: the paper's plain MSE, slow to "
                                            "learn)", "a number >= 1", ge=1)
    decode_from: Annotated[str, one_of(("", *HEADS))] = field(
        "", "the heads decoded: empty (the trained ones) | both | quarter | half", "empty, both, quarter or half")
    decoder: Annotated[str, one_of(DECODERS)] = field(
        "quadratic", f"sub-pixel peak: {' | '.join(DECODERS)}", f"one of {', '.join(DECODERS)}")


_D = defaults(HTCParameters)


# ------------------------------------------------------------------------------------ index mapping
def to_heatmap_index(coords: torch.Tensor, stride: int) -> torch.Tensor:
    """Input-grid continuous indices -> indices on the grid ``stride`` times coarser (same extent)."""
    return (coords + 0.5) / stride - 0.5


def to_input_index(coords: torch.Tensor, stride: int) -> torch.Tensor:
    """Inverse of :func:`to_heatmap_index`: heatmap cell ``j`` is centred on input index ``j*s + (s-1)/2``."""
    return (coords + 0.5) * stride - 0.5


# ------------------------------------------------------------------------------------ network parts
def _conv(dims: int, cin: int, cout: int, kernel: int = 1, stride: int = 1, dilation: int = 1,
          bias: bool = True) -> nn.Module:
    from monai.networks.layers.factories import Conv

    return Conv[Conv.CONV, dims](cin, cout, kernel, stride=stride, padding=dilation * (kernel // 2),
                                 dilation=dilation, bias=bias)


def _bn(dims: int, c: int) -> nn.Module:
    from monai.networks.layers.factories import Norm

    return Norm[Norm.BATCH, dims](c)


class DoubleAttention(nn.Module):
    """Global "double attention" (A2-Net, Chen et al. 2018), written here because no library we use ships it.

    ``A, B, V = 1x1 convs`` to ``channels // reduction``; ``G = A softmax_N(B)^T`` pools the ``N`` positions
    into global descriptors (each channel of B is a spatial attention map), ``Z = G softmax_C(V)``
    redistributes them to every position; a 1x1 conv maps back to ``channels``. Cost O(N C^2): linear in
    the number of positions. With ``keep_attention`` the last spatial attention maps ``(B, m, *size)`` are
    kept in :attr:`attention` (for figures).
    """

    def __init__(self, spatial_dims: int, channels: int, reduction: int = 1) -> None:
        super().__init__()
        m = max(1, int(channels) // max(1, int(reduction)))
        self.a, self.b, self.v = (_conv(spatial_dims, channels, m) for _ in range(3))
        self.proj = _conv(spatial_dims, m, channels)
        self.keep_attention = False
        self.attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        a = self.a(x).flatten(2)  # (B, m, N)
        attn = torch.softmax(self.b(x).flatten(2).float(), dim=-1).to(a.dtype)  # spatial softmax
        if self.keep_attention:
            self.attention = attn.detach().reshape(*attn.shape[:2], *size)
        descriptors = a @ attn.transpose(1, 2)  # (B, m, m): one global descriptor per attention map
        spread = torch.softmax(self.v(x).flatten(2).float(), dim=1).to(a.dtype)  # channel softmax
        z = (descriptors @ spread).reshape(*a.shape[:2], *size)
        return self.proj(z)


class ConvModule(nn.Module):
    """conv3x3-BN-ReLU, 3x3 dilation-2 conv-BN, added to a conv3x3-BN shortcut, ReLU."""

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        d, c = spatial_dims, channels
        self.body = nn.Sequential(_conv(d, c, c, 3, bias=False), _bn(d, c), nn.ReLU(inplace=True),
                                  _conv(d, c, c, 3, dilation=2, bias=False), _bn(d, c))
        self.shortcut = nn.Sequential(_conv(d, c, c, 3, bias=False), _bn(d, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class HTCStage(nn.Module):
    """Patch embedding (stride 2), attention + mix-FFN encoder layer (pre-BN, residual, drop-path), conv module."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, ffn_ratio: int, reduction: int,
                 drop_path: float) -> None:
        super().__init__()
        from monai.networks.layers import DropPath

        d = spatial_dims
        self.embed = nn.Sequential(_conv(d, cin, cout, 3, stride=2, bias=False), _bn(d, cout))
        self.norm1, self.attention = _bn(d, cout), DoubleAttention(d, cout, reduction)
        hidden = int(cout) * int(ffn_ratio)
        self.norm2 = _bn(d, cout)
        self.ffn = nn.Sequential(_conv(d, cout, hidden), nn.GELU(), _conv(d, hidden, cout))
        self.drop = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.conv = ConvModule(d, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.drop(self.attention(self.norm1(x)))
        x = x + self.drop(self.ffn(self.norm2(x)))
        return self.conv(x)


class HTCNet(nn.Module):
    """Backbone (4 stages, strides 2-16) + FPN neck (stride 4) + heatmap heads at 1/4 and/or 1/2.

    ``forward(x)`` -> ``{"quarter": (B, N, *size/4), "half": (B, N, *size/2)}`` (the heads built).
    Input sizes must be multiples of 16.
    """

    def __init__(self, spatial_dims: int, n_landmarks: int, widths: Sequence[int] = PAPER_WIDTHS,
                 ffn_ratios: Sequence[int] = PAPER_FFN_RATIOS, reductions: Sequence[int] = PAPER_REDUCTIONS,
                 neck_channels: int = 256, head_channels: int = 256, heads: str = "both", drop_path: float = 0.1,
                 in_channels: int = 1) -> None:
        super().__init__()
        from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork
        from monai.networks.layers.factories import Conv

        widths = [int(w) for w in widths]
        if not (len(widths) == len(ffn_ratios) == len(reductions) == 4):
            raise ValueError(f"need 4 widths, ffn_ratios and reductions, got {widths}, {list(ffn_ratios)}, "
                             f"{list(reductions)}")
        if heads not in HEADS:
            raise ValueError(f"heads must be one of {HEADS}, got {heads!r}")
        d, self.heads = spatial_dims, heads
        rates = [drop_path * i / 3 for i in range(4)]  # linear drop-path rule over the stages
        cins = [in_channels, *widths[:-1]]
        self.stages = nn.ModuleList(HTCStage(d, cin, w, int(r), int(red), p)
                                    for cin, w, r, red, p in zip(cins, widths, ffn_ratios, reductions, rates))
        self.neck = FeaturePyramidNetwork(d, widths[1:], int(neck_channels))
        k, h = int(n_landmarks), int(head_channels)
        self.head_quarter: nn.Module | None = None
        self.head_half: nn.Module | None = None
        if heads in ("both", "quarter"):
            self.head_quarter = nn.Sequential(_conv(d, neck_channels, h, 3), nn.ReLU(inplace=True), _conv(d, h, k))
        if heads in ("both", "half"):
            self.head_half = nn.Sequential(
                Conv[Conv.CONVTRANS, d](neck_channels, h, 4, stride=2, padding=1, bias=False), _bn(d, h),
                nn.ReLU(inplace=True), _conv(d, h, h, 3, bias=False), _bn(d, h), nn.ReLU(inplace=True),
                _conv(d, h, k))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The neck's stride-4 map ``(B, neck_channels, *size/4)``."""
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return next(iter(self.neck(OrderedDict((f"s{i}", f) for i, f in enumerate(feats[1:], 2))).values()))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        out: dict[str, torch.Tensor] = {}
        if self.head_quarter is not None:
            out["quarter"] = self.head_quarter(f)
        if self.head_half is not None:
            out["half"] = self.head_half(f)
        return out

    def keep_attention(self, keep: bool = True) -> None:
        """Keep each stage's last spatial attention maps (``stage.attention.attention``) for figures."""
        for stage in cast("Iterable[HTCStage]", self.stages):  # the ModuleList of HTCStage built in __init__
            stage.attention.keep_attention = keep
            stage.attention.attention = None


# ------------------------------------------------------------------------------------ the method
class MultiresHTC(LandmarkMethod[dict[str, torch.Tensor]]):
    """Heatmaps supervised at 1/4 and 1/2 resolution from :class:`HTCNet` (see the module docstring)."""

    name = "htc"
    Parameters = HTCParameters

    def __init__(self, spatial_dims: int, n_landmarks: int, network: dict[str, Any] | None = None,
                 sigma: float = _D["sigma"], quarter_weight: float = _D["quarter_weight"],
                 half_weight: float = _D["half_weight"], foreground_weight: float = _D["foreground_weight"],
                 decode_from: str = _D["decode_from"], decoder: str = _D["decoder"],
                 decoder_kwargs: dict[str, Any] | None = None, **base: Any) -> None:
        super().__init__(spatial_dims, n_landmarks, network, decoder, decoder_kwargs, **base)
        heads = self.network.setdefault("heads", "both")
        if heads not in HEADS:
            raise ValueError(f"heads must be one of {HEADS}, got {heads!r}")
        if sigma <= 0 or quarter_weight <= 0 or half_weight <= 0 or foreground_weight < 1:
            raise ValueError("need sigma > 0, quarter_weight > 0, half_weight > 0, foreground_weight >= 1")
        self.sigma, self.foreground_weight = float(sigma), float(foreground_weight)
        self.decoder_kwargs = gaussian_decoder_kwargs(self.decoder, self.sigma, self.decoder_kwargs)
        self.weights = {"quarter": float(quarter_weight), "half": float(half_weight)}
        self.decode_from = decode_from or heads
        if self.decode_from not in self.trained_heads() and self.decode_from != heads:
            raise ValueError(f"decode_from={decode_from!r}: the network has heads {self.trained_heads()}")

    def trained_heads(self) -> list[str]:
        """The heads the network has: ``["quarter", "half"]`` or one of them."""
        heads = self.network["heads"]
        return ["quarter", "half"] if heads == "both" else [heads]

    def decoded_heads(self) -> list[str]:
        return self.trained_heads() if self.decode_from == "both" else [self.decode_from]

    def decoding_variants(self) -> dict[str, dict[str, Any]]:
        """A two-head net is also scored from each head alone (rows ``htc/quarter_head``, ``htc/half_head``)."""
        if self.network["heads"] != "both" or self.decode_from != "both":
            return {}
        return {"quarter_head": {"decode_from": "quarter"}, "half_head": {"decode_from": "half"}}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "sigma": self.sigma, "quarter_weight": self.weights["quarter"],
                "half_weight": self.weights["half"], "foreground_weight": self.foreground_weight,
                "decode_from": self.decode_from}

    @classmethod
    def parameter_config(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """Notebook parameters -> constructor keywords (network sizes, heads, target and loss weights)."""
        network = {k: (list(params[k]) if isinstance(params[k], (list, tuple)) else params[k])
                   for k in ("widths", "ffn_ratios", "neck_channels", "head_channels", "heads", "drop_path")
                   if k in params}
        out: dict[str, Any] = {"network": network}
        out.update({k: float(params[k]) for k in ("sigma", "quarter_weight", "half_weight", "foreground_weight")
                    if k in params})
        if params.get("decode_from"):
            out["decode_from"] = params["decode_from"]
        if "decoder" in params:
            out["decoder"] = params["decoder"]
        return out

    def build_network(self) -> nn.Module:
        return HTCNet(self.spatial_dims, self.n_landmarks, **self.network)

    def size_multiple(self) -> int:
        return 16

    def encode_targets(self, landmarks: torch.Tensor, valid: torch.Tensor, size: Sequence[int], epoch: int) -> Targets:
        """Gaussians (peak 1, ``sigma`` px of each heatmap grid) at every trained head's resolution."""
        out = {}
        for head in self.trained_heads():
            s = HEAD_STRIDES[head]
            grid = [int(n) // s for n in size]
            out[head] = gaussian_heatmaps(to_heatmap_index(landmarks, s), grid, self.sigma, valid)
        return out

    def loss_epoch(self, epoch: int) -> int:
        return 0  # the heads' Gaussian targets and their loss are the same at every epoch

    def loss(self, output: dict[str, torch.Tensor], targets: Targets, valid: torch.Tensor, epoch: int) -> torch.Tensor:
        total = output[self.trained_heads()[0]].new_zeros((), dtype=torch.float32)
        for head in self.trained_heads():
            target = targets[head]
            err = foreground_weighted(F.mse_loss(output[head].float(), target, reduction="none"), target,
                                      self.foreground_weight, 1.0)  # targets peak at 1
            total = total + self.weights[head] * masked_mean(err, valid, self.spatial_dims)
        return total

    def decode_batch(self, outputs: dict[str, torch.Tensor], batch: Mapping[str, Any], epoch: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over the decoded heads of each head's sub-pixel peak mapped to the input grid; confidence =
        mean peak value (1 at a perfect target)."""
        coords, conf = [], []
        for head in self.decoded_heads():
            c, k = decode_maps(outputs[head], self.spatial_dims, self.decoder, **self.decoder_kwargs)
            coords.append(to_input_index(c, HEAD_STRIDES[head]))
            conf.append(k)
        return torch.stack(coords).mean(0), torch.stack(conf).mean(0)

    def spread(self, outputs: dict[str, torch.Tensor], coords: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """Spread (input-grid px, per axis) of the finest decoded head's heatmap around the decoded point."""
        head = "half" if "half" in self.decoded_heads() else "quarter"
        s = HEAD_STRIDES[head]
        return map_spread(outputs[head], self.spatial_dims, to_heatmap_index(coords, s)) * s

    def maps(self, output: dict[str, torch.Tensor]) -> torch.Tensor:
        """The finest trained head's heatmaps (``half`` when trained)."""
        return output["half"] if "half" in output else output["quarter"]

    def dice(self, output: dict[str, torch.Tensor], targets: Targets, valid: torch.Tensor) -> torch.Tensor:
        """Dice of the half-maximum disks of the finest head's heatmap and target."""
        head = "half" if "half" in output else "quarter"
        d = dice_scores(output[head] > 0.5, targets[head] > 0.5, self.spatial_dims)
        return torch.where(valid, d, torch.full_like(d, float("nan")))


METHOD = MultiresHTC
