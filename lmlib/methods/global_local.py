"""Global-to-local FCNN (Noothout et al., IEEE TMI 2020): displacement regression + presence
classification per output patch, a global stage on the whole image and a local stage per landmark.

Both stages share the same two heads, loss and decoder; only the network and the view differ:

- **Outputs.** An output cell ``j`` of a fully convolutional network with output stride ``s`` stands for
  the input *patch* of pixels ``j*s .. j*s + s - 1``, centred at index ``c_j = j*s + (s - 1)/2``
  (:func:`patch_centres`; a landmark at continuous index ``x`` lies in patch ``floor((x + 1/2) / s)``,
  :func:`patch_of`). Per cell and landmark the network gives a presence logit (sigmoid: "the landmark
  is in this patch") and the displacement ``d = x - c_j`` from the patch centre to the landmark, in
  pixels of the view grid, encoded ``sign(d) * log10(|d| + 1)`` (``displacement="log"``, the paper's) or
  as is (``"linear"``): :func:`encode_displacement` / :func:`decode_displacement`. Every patch regresses
  every landmark, also landmarks outside the crop (the views keep them valid).
- **Loss** (:func:`fcnn_loss`): L1 on the encoded displacements (all patches, valid landmarks) +
  ``alpha`` x BCE on presence, whose target is 1 only for the patch holding the landmark
  (:func:`presence_targets`).
- **Decoding** (:func:`vote`): each landmark is the presence-probability-weighted mean of all patch
  votes (patch centre + decoded displacement), a continuous index on the item's grid; confidence =
  the maximum presence probability.

Stages (:meth:`GlobalLocalFCNN.build_stages`, run by :func:`lmlib.engine.cascade.fit_cascade`):

- ``global``: :class:`GlobalFCNN`, a ResNet34-style FCNN (7x7 stride-2 stem, four stages of
  [3, 4, 6, 3] residual blocks, each stage opened by 2x average pooling + BN + ReLU while the output
  stride is not reached: stride 32 in 2D, 8 in 3D), widths a parameter (official 16/32/64/128/256),
  two heads of 1x1 convolutions. MONAI building blocks (``Convolution``, layer factories) with
  ``spatial_dims``: one code path for 2D and 3D. Trained on random crops (``ViewSpec("crop",
  keep_outside=True)``) at ``global_spacing_mm``; evaluated on the whole image in one pass (padded to
  a multiple of the stride).
- ``local``: :class:`LocalFCNN` per landmark (official: 4 conv3x3(32)-BN-ReLU, AvgPool(2), 2
  conv3x3(64)-BN-ReLU, 1x1 heads; output stride 2), all held in one
  :class:`~lmlib.methods.networks.PerLandmark` module (``local_net="per_landmark"``), or one shared
  trunk whose heads have one channel per landmark, the item's landmark id selecting its channel
  (``local_net="shared"``, :class:`~lmlib.methods.networks.SharedByLandmark`). Trained on per-landmark
  patches at ``local_spacing_mm`` with the landmark uniformly at random inside the patch, evaluated on
  patches centred on the global stage's predictions.
- **Local patch size from the global stage's measured errors**: with ``local_patch_mm = 0`` the patch
  must cover ``local_patch_factor`` (2.5) x the worst per-landmark mean validation error of the global
  stage (its selected epoch, read from ``<output_dir>/global/training_log/metrics.csv``) on each side of
  its centre; for Rayleigh-distributed radial errors 2.5 x the mean is about their 99th percentile. The
  patch has at least 16 px (the official size) at ``local_spacing_mm`` and at most
  ``local_max_patch_px`` (20) px, close to the local net's 18-px receptive field; an extent needing
  more px is covered by coarsening the spacing instead, up to the global stage's spacing
  (:class:`PatchRule`, which gives the measurements). The size is settled when the engine first asks
  for the local stage's views, i.e. after the global stage has trained (:class:`LocalStage`), printed,
  and recorded in the local method's configuration (``patch_choice``: in its checkpoint and manifest).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import StrictBool
from torch import nn

from lmlib.data.loaders import ViewSpec
from lmlib.methods.config import MethodParameters
from lmlib.methods.networks import (
    PerLandmark,
    SharedByLandmark,
    grouped_copy,
    has_forward_hooks,
    shell_of,
    to_channels_last,
)
from lmlib.methods.stages import CascadeMethod, DeferredStage, Stage, stage_validation_errors
from lmlib.typed import Int, Levels, Number, field, one_of

DISPLACEMENT_CODES: tuple[str, ...] = ("log", "linear")
LOCAL_NETS: tuple[str, ...] = ("per_landmark", "shared")
STAGES: tuple[str, ...] = ("global", "local")
GLOBAL_BLOCKS: tuple[int, ...] = (3, 4, 6, 3)
GLOBAL_CHANNELS: tuple[int, ...] = (16, 32, 64, 128, 256)
LOCAL_CHANNELS: tuple[int, ...] = (32, 64)
LOCAL_CONVS: tuple[int, ...] = (4, 2)
DEFAULT_STRIDE: dict[int, int] = {2: 32, 3: 8}
DEFAULT_ALPHA: dict[str, float] = {"global": 20.0, "local": 1.0}  # paper: 20 for 2D cephalograms; local unweighted
MIN_LOCAL_PATCH_PX = 16  # the official local patch
MAX_LOG_DISPLACEMENT = 6.0  # decoded |d| <= 1e6 px: keeps untrained outputs finite


# --------------------------------------------------------------------------------- encoding / geometry
def encode_displacement(d: torch.Tensor, code: str = "log") -> torch.Tensor:
    """Displacement in px -> network target: ``sign(d) * log10(|d| + 1)`` (``"log"``) or ``d`` (``"linear"``)."""
    if code == "log":
        return torch.sign(d) * torch.log10(d.abs() + 1.0)
    if code == "linear":
        return d
    raise ValueError(f"displacement code must be one of {DISPLACEMENT_CODES}, got {code!r}")


def decode_displacement(y: torch.Tensor, code: str = "log") -> torch.Tensor:
    """Inverse of :func:`encode_displacement`: ``sign(y) * (10^|y| - 1)`` px (``"log"``)."""
    if code == "log":
        return torch.sign(y) * (torch.pow(10.0, y.abs().clamp_max(MAX_LOG_DISPLACEMENT)) - 1.0)
    if code == "linear":
        return y
    raise ValueError(f"displacement code must be one of {DISPLACEMENT_CODES}, got {code!r}")


def patch_centres(shape: Sequence[int], stride: int, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Centres ``(D, *shape)`` (input-grid index, ``(x, y[, z])``) of the input patches of output cells
    ``shape``: cell ``j`` -> ``j * stride + (stride - 1) / 2`` on every axis."""
    axes = [torch.arange(int(n), device=device, dtype=dtype) * stride + (stride - 1) / 2.0 for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def patch_of(landmarks: torch.Tensor, stride: int) -> torch.Tensor:
    """Output cell ``(..., D)`` (int64) whose input patch holds each continuous index ``landmarks`` ``(..., D)``:
    ``floor((x + 0.5) / stride)`` (pixel ``i`` covers ``[i - 0.5, i + 0.5)``)."""
    return torch.floor((landmarks.float() + 0.5) / stride).long()


def displacement_targets(landmarks: torch.Tensor, shape: Sequence[int], stride: int, code: str = "log") -> torch.Tensor:
    """Encoded displacements ``(B, K, D, *shape)`` from every patch centre to every landmark ``(B, K, D)``."""
    dims = len(shape)
    centres = patch_centres(shape, stride, landmarks.device, torch.float32)
    d = landmarks.float().reshape(*landmarks.shape, *([1] * dims)) - centres
    return encode_displacement(d, code)


def presence_targets(landmarks: torch.Tensor, valid: torch.Tensor, shape: Sequence[int], stride: int) -> torch.Tensor:
    """One-hot presence ``(B, K, *shape)``: 1 at the output cell whose patch holds the landmark, 0
    elsewhere; all 0 for invalid landmarks and for landmarks outside the grid of output cells."""
    b, k, dims = landmarks.shape
    cell = patch_of(landmarks, stride)  # (B, K, D)
    size = torch.as_tensor(list(shape), device=landmarks.device)
    inside = valid.bool() & ((cell >= 0) & (cell < size)).all(dim=-1)
    flat = torch.zeros(b, k, int(np.prod(shape)), device=landmarks.device)
    strides = [int(np.prod(shape[a + 1:])) for a in range(dims)]
    # a tensor (not sum's start 0): D >= 1
    index = cast(torch.Tensor, sum(cell[..., a].clamp(0, int(shape[a]) - 1) * strides[a] for a in range(dims)))
    flat.scatter_(2, index[..., None], inside[..., None].float())
    return flat.reshape(b, k, *shape)


def votes(displacement: torch.Tensor, stride: int, code: str = "log") -> torch.Tensor:
    """Votes ``(B, K, D, *P)``: patch centre + decoded displacement, in input-grid indices. Each
    displacement is limited to the grid's extent along its axis (a correct vote never goes further; an
    untrained net's can, by orders of magnitude)."""
    shape = displacement.shape[3:]
    dims = len(shape)
    extent = torch.tensor([float(n * stride) for n in shape], device=displacement.device).reshape(dims, *([1] * dims))
    d = decode_displacement(displacement.float(), code)
    d = torch.maximum(torch.minimum(d, extent), -extent)
    return patch_centres(shape, stride, displacement.device, torch.float32) + d


def vote(presence_logits: torch.Tensor, displacement: torch.Tensor, stride: int, code: str = "log"
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Presence-weighted mean of all patch votes: coordinates ``(B, K, D)`` (input-grid index) and
    confidences ``(B, K)`` (the largest presence probability). Where every probability underflows to 0
    the votes count equally."""
    b, k, dims = displacement.shape[:3]
    p = torch.sigmoid(presence_logits.float()).reshape(b, k, 1, -1)
    w = p + 1e-12
    v = votes(displacement, stride, code).reshape(b, k, dims, -1)
    coords = (w * v).sum(-1) / w.sum(-1)
    return coords, p.reshape(b, k, -1).amax(-1)


def vote_spread(presence_logits: torch.Tensor, displacement: torch.Tensor, stride: int, code: str = "log"
                ) -> torch.Tensor:
    """Vote dispersion: the presence-weighted standard deviation ``(B, K, D)`` (input-grid px, per axis) of all
    patch votes about their weighted mean (:func:`vote`)."""
    b, k, dims = displacement.shape[:3]
    w = torch.sigmoid(presence_logits.float()).reshape(b, k, 1, -1) + 1e-12
    v = votes(displacement, stride, code).reshape(b, k, dims, -1)
    mean = (w * v).sum(-1, keepdim=True) / w.sum(-1, keepdim=True)
    return ((w * (v - mean) ** 2).sum(-1) / w.sum(-1)).sqrt()


def fcnn_loss(outputs: Mapping[str, torch.Tensor], landmarks: torch.Tensor, valid: torch.Tensor, stride: int,
              code: str = "log", alpha: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L1(displacement) + alpha * BCE(presence)``, each averaged over patches (and axes) and over
    the valid landmarks only; returns the loss and its two parts."""
    presence, disp = outputs["presence"].float(), outputs["displacement"].float()
    shape = presence.shape[2:]
    dims = len(shape)
    w = valid.to(presence.dtype)
    denom = w.sum().clamp_min(1.0)
    target = displacement_targets(landmarks, shape, stride, code)
    l1 = (disp - target).abs().mean(dim=tuple(range(2, 3 + dims)))  # (B, K)
    bce = F.binary_cross_entropy_with_logits(presence, presence_targets(landmarks, valid, shape, stride),
                                             reduction="none").mean(dim=tuple(range(2, 2 + dims)))
    l1, bce = (l1 * w).sum() / denom, (bce * w).sum() / denom
    return l1 + alpha * bce, {"l1_displacement": l1.detach(), "bce_presence": bce.detach()}


# ------------------------------------------------------------------------------------------ networks
def _conv(dims: int, cin: int, cout: int, kernel: int = 3, stride: int = 1, norm: bool = True,
          act: bool = True) -> nn.Module:
    from monai.networks.blocks import Convolution

    if not norm and not act:
        return Convolution(dims, cin, cout, strides=stride, kernel_size=kernel, conv_only=True)
    return Convolution(dims, cin, cout, strides=stride, kernel_size=kernel, norm="batch" if norm else None,
                       act="relu" if act else None, bias=not norm)


class ResidualBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN-ReLU added to the shortcut (1x1 conv + BN when the width changes)."""

    def __init__(self, dims: int, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv(dims, cin, cout), _conv(dims, cout, cout))
        self.shortcut = nn.Identity() if cin == cout else _conv(dims, cin, cout, kernel=1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


def _heads(dims: int, cin: int, hidden: int, n_landmarks: int, depth: int) -> nn.ModuleDict:
    """Presence (``n_landmarks`` channels) and displacement (``n_landmarks * dims``) heads of 1x1
    convolutions: ``depth`` hidden 1x1 conv + ReLU layers of ``hidden`` channels, then the output."""
    def head(out: int) -> nn.Sequential:
        layers, c = [], cin
        for _ in range(depth):
            layers.append(_conv(dims, c, hidden, kernel=1, norm=False))
            c = hidden
        return nn.Sequential(*layers, _conv(dims, c, out, kernel=1, norm=False, act=False))

    return nn.ModuleDict({"presence": head(n_landmarks), "displacement": head(n_landmarks * dims)})


def _head_outputs(heads: nn.ModuleDict, features: torch.Tensor, n_landmarks: int, dims: int) -> dict[str, torch.Tensor]:
    b, shape = features.shape[0], features.shape[2:]
    return {"presence": heads["presence"](features),
            "displacement": heads["displacement"](features).reshape(b, n_landmarks, dims, *shape)}


class GlobalFCNN(nn.Module):
    """ResNet34-style fully convolutional network with presence and displacement heads (2D/3D).

    ``channels``: stem width then the four stages' widths; ``blocks``: residual blocks per stage;
    ``output_stride``: 2 (the stem) x 2 per pooled stage, the first ``log2(stride) - 1`` stages pool.
    ``forward(x)`` -> ``{"presence": (B, N, *P), "displacement": (B, N, D, *P)}``, ``P = size / stride``.
    """

    def __init__(self, spatial_dims: int, n_landmarks: int, channels: Sequence[int] = GLOBAL_CHANNELS,
                 blocks: Sequence[int] = GLOBAL_BLOCKS, output_stride: int = 32, head_channels: int | None = None,
                 head_depth: int = 2, in_channels: int = 1) -> None:
        super().__init__()
        from monai.networks.layers.factories import Act, Norm, Pool

        chans, blocks = [int(c) for c in channels], [int(b) for b in blocks]
        if len(chans) != len(blocks) + 1:
            raise ValueError(f"channels needs one width for the stem and one per stage ({len(blocks)}), got {chans}")
        n_pool = int(round(math.log2(output_stride))) - 1
        if 2 ** (n_pool + 1) != output_stride or not 0 <= n_pool <= len(blocks):
            raise ValueError(f"output_stride must be 2^k with 1 <= k <= {len(blocks) + 1}, got {output_stride}")
        self.spatial_dims, self.n_landmarks, self.output_stride = spatial_dims, n_landmarks, int(output_stride)
        layers: list[nn.Module] = [_conv(spatial_dims, in_channels, chans[0], kernel=7, stride=2)]
        c = chans[0]
        for i, (n, width) in enumerate(zip(blocks, chans[1:])):
            if i < n_pool:
                layers += [Pool["avg", spatial_dims](kernel_size=2), Norm["batch", spatial_dims](c), Act["relu"]()]
            for _ in range(n):
                layers.append(ResidualBlock(spatial_dims, c, width))
                c = width
        self.features = nn.Sequential(*layers)
        self.heads = _heads(spatial_dims, c, int(head_channels or c), n_landmarks, head_depth)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return _head_outputs(self.heads, self.features(x), self.n_landmarks, self.spatial_dims)


class LocalFCNN(nn.Module):
    """The official local net: ``convs[0]`` conv3x3(``channels[0]``)-BN-ReLU, AvgPool(2), ``convs[1]``
    conv3x3(``channels[1]``)-BN-ReLU, 1x1 presence / displacement heads (output stride 2)."""

    output_stride = 2

    def __init__(self, spatial_dims: int, n_landmarks: int = 1, channels: Sequence[int] = LOCAL_CHANNELS,
                 convs: Sequence[int] = LOCAL_CONVS, in_channels: int = 1) -> None:
        super().__init__()
        from monai.networks.layers.factories import Pool

        c0, c1 = (int(c) for c in channels)
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(int(convs[0])):
            layers.append(_conv(spatial_dims, c, c0))
            c = c0
        layers.append(Pool["avg", spatial_dims](kernel_size=2))
        for _ in range(int(convs[1])):
            layers.append(_conv(spatial_dims, c, c1))
            c = c1
        self.spatial_dims, self.n_landmarks = spatial_dims, n_landmarks
        self.features = nn.Sequential(*layers)
        self.heads = _heads(spatial_dims, c, c, n_landmarks, depth=0)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return _head_outputs(self.heads, self.features(x), self.n_landmarks, self.spatial_dims)

    @classmethod
    def grouped(cls, nets: Sequence[nn.Module]) -> LocalFCNN | None:
        """The one-landmark nets of a :class:`~lmlib.methods.networks.PerLandmark` as one net for inference: net
        ``k`` on input channel block ``k`` (:func:`~lmlib.methods.networks.grouped_copy`), its outputs landmark
        ``k``'s channels (None where the nets cannot be grouped)."""
        local = [n for n in nets if type(n) is LocalFCNN and n.n_landmarks == 1 and not has_forward_hooks(n)]
        if not local or len(local) != len(nets):
            return None
        features = grouped_copy([n.features for n in local])
        heads = grouped_copy([n.heads for n in local])
        if features is None or heads is None:
            return None
        out = cast("LocalFCNN | None", shell_of(local[0], {"features": features, "heads": heads}))
        if out is None:
            return None
        out.n_landmarks = len(local)
        # channels-last on the CPU: oneDNN's preferred layout there, as for the project's other networks
        return cast(LocalFCNN, to_channels_last(out, out.spatial_dims)) if next(out.parameters()).device.type == "cpu" \
            else out


# -------------------------------------------------------------------------------------------- method
def _default_network(stage: str, spatial_dims: int) -> dict[str, Any]:
    if stage == "global":
        return {"channels": list(GLOBAL_CHANNELS), "blocks": list(GLOBAL_BLOCKS),
                "output_stride": DEFAULT_STRIDE[spatial_dims], "head_depth": 2}
    return {"channels": list(LOCAL_CHANNELS), "convs": list(LOCAL_CONVS), "kind": "per_landmark"}


# ------------------------------------------------------------------------------------ parameters
class GlobalStageParameters(MethodParameters):
    """The global stage's notebook parameters (its epochs and batch are the shared ``max_epochs``, ``batch_size``)."""

    global_spacing_mm: Number = field(1.0, "global stage grid spacing (mm/px)", "a number > 0 (mm/px)", gt=0)
    global_crop: Levels = field(
        [], "training crop (px, multiples of the stride); empty: the whole grid", "empty or integers >= 1")
    output_stride: Int = field(0, "global output stride; 0: the paper's (32 in 2D, 8 in 3D)", "an integer >= 0", ge=0)
    global_channels: Levels = field(list(GLOBAL_CHANNELS), "stem + four stages (official)", "5 integers >= 1",
                                    min_length=5, max_length=5)
    alpha: Number = field(DEFAULT_ALPHA["global"], "global presence BCE weight (paper: 20 cephalograms, 8 CT, 2 MR)",
                          "a number >= 0", ge=0)


class LocalPatchParameters(MethodParameters):
    """A local stage's network, batch and patch rule (:class:`PatchRule`): shared by this cascade's local stage
    and the refinement after any method (:mod:`lmlib.methods.refine`)."""

    local_batch_size: Int = field(32, "local patches per batch", "an integer >= 1", ge=1)
    local_net: Annotated[str, one_of(LOCAL_NETS)] = field(
        "per_landmark", "per_landmark (official) | shared", "per_landmark or shared")
    local_channels: Levels = field(list(LOCAL_CHANNELS), "local net widths (official)", "2 integers >= 1",
                                   min_length=2, max_length=2)
    local_alpha: Number = field(DEFAULT_ALPHA["local"], "local presence BCE weight (official: unweighted)",
                                "a number >= 0", ge=0)
    local_spacing_mm: Number = field(1.0, "finest local patch spacing (mm/px)", "a number > 0 (mm/px)", gt=0)
    local_patch_mm: Number = field(0.0, "0: patch extent from the global validation errors; > 0: fixed extent (mm)",
                                   "a number >= 0 (mm)", ge=0)
    local_patch_factor: Number = field(2.5, "patch half-width: this x the mean global validation error",
                                       "a number > 0", gt=0)
    local_patch_per_landmark: StrictBool = field(
        True, "each landmark its own patch spacing from its own error; false: all from the worst", "true or false")
    local_max_patch_px: Int = field(20, "larger extents coarsen the spacing (local receptive field 18 px)",
                                    f"an integer >= {MIN_LOCAL_PATCH_PX}", ge=MIN_LOCAL_PATCH_PX)


class LocalStageParameters(LocalPatchParameters):
    """The local stage's notebook parameters: its epochs, network, training and patch rule."""

    local_epochs: Int = field(40, "local stage epochs", "an integer >= 1", ge=1)


class GlobalLocalParameters(GlobalStageParameters, LocalStageParameters):
    """Both stages' parameters and the displacement code they share."""

    displacement: Annotated[str, one_of(DISPLACEMENT_CODES)] = field(
        "log", "log: sign(d) log10(|d| + 1) (paper) | linear", "log or linear")


class GlobalLocalFCNN(CascadeMethod[dict[str, torch.Tensor]]):
    """One stage (``stage="global"`` or ``"local"``) of the global-to-local FCNN; the class's
    :meth:`build_stages` makes the cascade (see the module docstring).

    Args:
        stage: ``"global"`` (whole-image ResNet34-style FCNN) or ``"local"`` (per-landmark patches).
        network: global: ``channels`` (5), ``blocks`` (4), ``output_stride``, ``head_depth``,
            ``head_channels``; local: ``channels`` (2), ``convs`` (2), ``kind`` (per_landmark | shared).
        displacement: ``"log"`` (paper) or ``"linear"`` encoding of the displacements.
        alpha: weight of the presence BCE (default 20 global, 1 local).
        amsgrad: Adam's AMSGrad variant (official).
        patch_choice: how the local patch size was chosen (provenance only).
    """

    name = "global_local"
    Parameters: type[MethodParameters] = GlobalLocalParameters

    def __init__(self, spatial_dims: int, n_landmarks: int, stage: str = "global",
                 network: dict[str, Any] | None = None, displacement: str = "log", alpha: float | None = None,
                 amsgrad: bool = True, patch_choice: dict[str, Any] | None = None, decoder: str = "vote",
                 decoder_kwargs: dict[str, Any] | None = None, **base: Any) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if displacement not in DISPLACEMENT_CODES:
            raise ValueError(f"displacement must be one of {DISPLACEMENT_CODES}, got {displacement!r}")
        net = {**_default_network(stage, int(spatial_dims)), **(network or {})}
        if stage == "local" and net["kind"] not in LOCAL_NETS:
            raise ValueError(f"local_net must be one of {LOCAL_NETS}, got {net['kind']!r}")
        super().__init__(spatial_dims, n_landmarks, net, decoder, decoder_kwargs, **base)
        self.stage, self.displacement = stage, displacement
        self.alpha = float(DEFAULT_ALPHA[stage] if alpha is None else alpha)
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        self.amsgrad = bool(amsgrad)
        self.patch_choice = dict(patch_choice or {})
        if stage == "local":
            self.test_time_flip = False  # items are single-landmark patches (no left/right pairs to swap)

    def config(self) -> dict[str, Any]:
        net = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in self.network.items()}
        return {**super().config(), "network": net, "stage": self.stage, "displacement": self.displacement,
                "alpha": self.alpha, "amsgrad": self.amsgrad, "patch_choice": self.patch_choice}

    @property
    def stride(self) -> int:
        """Output stride (input px per output cell)."""
        return int(self.network["output_stride"]) if self.stage == "global" else LocalFCNN.output_stride

    def size_multiple(self) -> int:
        return self.stride

    def build_network(self) -> nn.Module:
        n, d = self.n_landmarks, self.spatial_dims
        if self.stage == "global":
            keys = ("channels", "blocks", "output_stride", "head_channels", "head_depth")
            return GlobalFCNN(d, n, **{k: self.network[k] for k in keys if k in self.network})
        chans, convs = self.network["channels"], self.network["convs"]
        if self.network["kind"] == "shared":
            return SharedByLandmark(LocalFCNN(d, n, chans, convs))
        return PerLandmark([LocalFCNN(d, 1, chans, convs) for _ in range(n)], group=LocalFCNN.grouped)

    def forward(self, net: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if self.stage == "global":
            return net(batch["image"])
        return net(batch["image"], batch["landmark_ids"])

    def training_loss(self, outputs: dict[str, torch.Tensor], batch: Mapping[str, Any], epoch: int
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, parts = fcnn_loss(outputs, batch["landmarks"], batch["valid"], self.stride, self.displacement, self.alpha)
        return loss, {"log": parts}

    def decode_batch(self, outputs: dict[str, torch.Tensor], batch: Mapping[str, Any], epoch: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        return vote(outputs["presence"], outputs["displacement"], self.stride, self.displacement)

    def spread(self, outputs: dict[str, torch.Tensor], coords: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """Vote dispersion (:func:`vote_spread`)."""
        return vote_spread(outputs["presence"], outputs["displacement"], self.stride, self.displacement)

    def maps(self, output: dict[str, torch.Tensor]) -> torch.Tensor:
        """Presence probabilities ``(B, K, *P)`` on the grid of output cells."""
        return torch.sigmoid(output["presence"].float())

    def configure_optimizers(self, parameters: Any, max_epochs: int) -> Any:
        """The shared optimizer and schedule, with AMSGrad (official) when ``amsgrad``."""
        out = super().configure_optimizers(parameters, max_epochs)
        opt = out["optimizer"] if isinstance(out, dict) else out
        for group in opt.param_groups:
            group["amsgrad"] = self.amsgrad
        return out

    # ---------------------------------------------------------------------------------- the cascade
    @classmethod
    def parameter_config(cls, params: Mapping[str, Any], stage: str = "global") -> dict[str, Any]:
        """Constructor keywords of one stage from the method's parameter values (:meth:`values`)."""
        out: dict[str, Any] = {"stage": stage, "displacement": str(params["displacement"])}
        if stage == "global":
            net: dict[str, Any] = {"channels": [int(c) for c in params["global_channels"]]}
            if int(params["output_stride"]):
                net["output_stride"] = int(params["output_stride"])
            return {**out, "network": net, "alpha": float(params["alpha"])}
        net = {"channels": [int(c) for c in params["local_channels"]], "kind": str(params["local_net"])}
        return {**out, "network": net, "alpha": float(params["local_alpha"])}

    @classmethod
    def from_parameters(cls, spatial_dims: int, n_landmarks: int, params: Mapping[str, Any],
                        stage: str = "global", **shared: Any) -> GlobalLocalFCNN:
        kwargs = cls.parameter_config(cls.values(params), stage)
        base = {k: shared[k] for k in ("optimizer", "test_time_flip", "flip_pairs") if k in shared}
        return cls(spatial_dims, n_landmarks, **kwargs, **base)

    @classmethod
    def build_stages(cls, spatial_dims: int, n_landmarks: int, params: Mapping[str, Any], grid: Sequence[int],
                     shared: Mapping[str, Any]) -> list[Stage]:
        """The two stages (see the module docstring); ``grid`` is the global stage's whole-image grid in px
        at ``global_spacing_mm`` (rounded up to a multiple of the output stride)."""
        glob = cls.from_parameters(spatial_dims, n_landmarks, params, "global", **shared)
        local = cls.from_parameters(spatial_dims, n_landmarks, params, "local", **shared)
        p, s = cls.values(params), glob.stride
        spacing = float(p["global_spacing_mm"])
        whole = [int(-(-int(g) // s) * s) for g in grid]
        crop = [int(c) for c in (p["global_crop"] or whole)]
        if len(crop) != spatial_dims or any(c % s for c in crop):
            raise ValueError(f"global_crop={crop}: needs {spatial_dims} sizes, each a multiple of the output "
                             f"stride {s}")
        stages: list[Stage] = [Stage(
            "global", glob, ViewSpec("crop", size=crop, spacing=spacing, keep_outside=True),
            ViewSpec("whole", size=whole, spacing=spacing, pad_multiple=s, keep_outside=True),
            max_epochs=int(shared["max_epochs"]), batch_size=int(shared["batch_size"]))]
        rule = PatchRule(spatial_dims, float(p["local_spacing_mm"]), float(p["local_patch_mm"]),
                         float(p["local_patch_factor"]), int(p["local_max_patch_px"]),
                         max_spacing_mm=spacing, per_landmark=bool(p["local_patch_per_landmark"]))
        folder = Path(params["output_dir"]) / "global" if params.get("output_dir") else None
        stages.append(LocalStage("local", local, None, None, max_epochs=int(p["local_epochs"]),
                                 batch_size=int(p["local_batch_size"]), rule=rule, global_folder=folder,
                                 landmark_names=shared.get("landmark_names", ())))
        return stages


# -------------------------------------------------------------------------------- local patch size
class PatchRule:
    """The local patch: its extent in mm is fixed (``patch_mm`` > 0) or set from the global stage's
    validation errors (``factor`` x the worst per-landmark mean error on each side of the centre); its
    size in px is the smallest multiple of the local stride covering that extent at ``spacing_mm``,
    at least ``min_px``; where that exceeds ``max_px``, the patch keeps ``max_px`` px and the spacing
    is coarsened until they cover the extent, but never beyond ``max_spacing_mm`` (the global stage's:
    the local stage does not look coarser than the global one, and errors that large are gross misses
    no local net repairs); the local net's receptive field is 18 px: measured on
    synthetic2d, 16-20 px patches decoded to 0.7 mm, 24 px 1.1 mm, 38 px 3.1 mm at the same spacing and
    training, because cells that cannot see the landmark dilute the presence-weighted vote."""

    def __init__(self, spatial_dims: int, spacing_mm: float, patch_mm: float = 0.0, factor: float = 2.5,
                 max_px: int = 20, max_spacing_mm: float | None = None, min_px: int = MIN_LOCAL_PATCH_PX,
                 multiple: int = LocalFCNN.output_stride, per_landmark: bool = True, source: str = "global") -> None:
        self.source = source  # whose validation errors size the patch (named in the reason)
        self.spatial_dims, self.spacing_mm, self.patch_mm = spatial_dims, float(spacing_mm), float(patch_mm)
        self.per_landmark = bool(per_landmark)
        self.max_spacing_mm = max(self.spacing_mm, float(max_spacing_mm)) if max_spacing_mm else math.inf
        self.factor, self.min_px, self.multiple = float(factor), int(min_px), int(multiple)
        self.max_px = int(max_px) // self.multiple * self.multiple
        if self.spacing_mm <= 0 or self.factor <= 0:
            raise ValueError(f"local_spacing_mm and local_patch_factor must be > 0, got {spacing_mm}, {factor}")
        if self.max_px < self.min_px:
            raise ValueError(f"local_max_patch_px must be >= {self.min_px}, got {max_px}")

    def patch(self, half_width_mm: float) -> tuple[int, float]:
        """(size px, spacing mm) of a patch covering ``half_width_mm`` on each side of its centre."""
        m = self.multiple
        px = max(self.min_px, int(math.ceil((2.0 * half_width_mm / self.spacing_mm + 1.0) / m) * m))
        if px <= self.max_px:
            return px, self.spacing_mm
        return self.max_px, min(2.0 * half_width_mm / (self.max_px - 1), self.max_spacing_mm)

    def choose(self, errors_mm: Mapping[str, float] | None, names: Sequence[str] | None = None) -> dict[str, Any]:
        """The patch (``size_px``, ``spacing_mm``, ``jitter_mm``) and why, as a JSON-safe dict. With
        ``per_landmark`` and the landmark ``names`` (dataset order), each landmark's patch covers its own
        ``factor`` x error: all have the px the worst needs (at most ``max_px``) and the spacing their
        extent needs, between ``spacing_mm`` and ``max_spacing_mm`` (``landmark_spacing_mm``)."""
        if self.patch_mm > 0:
            half, why = self.patch_mm / 2.0, f"local_patch_mm = {self.patch_mm:g} mm (fixed)"
        else:
            if not errors_mm:
                raise ValueError("the local patch size is chosen from the global stage's validation errors, which "
                                 "are not available: train the global stage first or set local_patch_mm > 0")
            worst_name = max(errors_mm, key=lambda n: errors_mm[n])
            worst = errors_mm[worst_name]
            half = self.factor * worst
            why = f"{self.factor:g} x the worst per-landmark mean {self.source} validation error ({worst:.2f} mm, " \
                  f"{worst_name})"
            if self.per_landmark and names:
                why = f"per landmark: {self.factor:g} x its own mean {self.source} validation error on each side; px " \
                      f"set by the worst ({worst:.2f} mm, {worst_name})"
            else:
                why += " on each side"
        px, spacing = self.patch(half)
        if self.per_landmark and names and errors_mm and self.patch_mm <= 0:
            halves = {n: self.factor * float(errors_mm.get(n, worst)) for n in names}
            own = {n: min(max(2.0 * h / (px - 1), self.spacing_mm), self.max_spacing_mm) for n, h in halves.items()}
            spacing = max(own.values())  # the coarsest patch, for the summary fields below
            covers = all((px - 1) / 2.0 * own[n] >= halves[n] - 1e-9 for n in names)
        else:
            own, covers = None, (px - 1) / 2.0 * spacing >= half - 1e-9
        jitter = (px - 1) / 2.0 * spacing  # the landmark anywhere inside the patch (official)
        choice = {"size_px": px, "spacing_mm": spacing, "extent_mm": px * spacing, "wanted_half_width_mm": half,
                  "jitter_mm": jitter, "reason": why, "coarsened": bool(spacing > self.spacing_mm),
                  "covers_wanted": bool(covers), "global_val_errors_mm": dict(errors_mm or {})}
        if own is not None:
            choice["landmark_spacing_mm"] = own
        return choice

    def views(self, choice: Mapping[str, Any]) -> tuple[ViewSpec, ViewSpec]:
        """(training view: landmark uniformly inside the patch, evaluation view: centred patches)."""
        size, spacing = (int(choice["size_px"]),) * self.spatial_dims, float(choice["spacing_mm"])
        per = choice.get("landmark_spacing_mm")
        if per:  # each landmark's own spacing; the landmark anywhere inside its patch
            own = tuple(float(v) for v in per.values())
            train = ViewSpec("patch", size=size, spacing=spacing, per_landmark=True, jitter=("inside", 0.0),
                             landmark_spacing=own)
            return train, ViewSpec("patch", size=size, spacing=spacing, per_landmark=True, landmark_spacing=own)
        train = ViewSpec("patch", size=size, spacing=spacing, per_landmark=True,
                         jitter=("uniform", float(choice["jitter_mm"])))
        return train, ViewSpec("patch", size=size, spacing=spacing, per_landmark=True)


class LocalStage(DeferredStage):
    """A :class:`~lmlib.methods.stages.DeferredStage`: the patch of ``rule`` (:class:`PatchRule`) from
    the per-landmark validation errors of the global stage, read from ``global_folder``'s training log
    or given by ``errors()``. Pass ``view=None, eval_view=None``."""

    method: GlobalLocalFCNN  # the local stage's method

    def __init__(self, *args: Any, rule: PatchRule, global_folder: Path | None = None,
                 errors: Callable[[], Mapping[str, float]] | None = None, landmark_names: Sequence[str] = (),
                 **kwargs: Any) -> None:
        self._rule, self._folder, self._errors, self._names = rule, global_folder, errors, list(landmark_names)
        super().__init__(*args, **kwargs)

    def settle(self) -> tuple[ViewSpec, ViewSpec]:
        errors = None
        if self._rule.patch_mm <= 0:
            if self._errors is not None:
                errors = self._errors()
            elif self._folder is not None and (self._folder / "training_log" / "metrics.csv").is_file():
                errors = stage_validation_errors(self._folder / "training_log" / "metrics.csv")
        choice = self._rule.choose(errors, self._names)
        self.method.patch_choice = choice
        notes = "; spacing coarsened to keep local_max_patch_px" if choice["coarsened"] else ""
        if not choice["covers_wanted"]:
            notes += "; limited to the global spacing: does not cover the wanted half-width"
        per = choice.get("landmark_spacing_mm")
        at = (f"{min(per.values()):.3g}-{choice['spacing_mm']:.3g} mm (per landmark)" if per
              else f"{choice['spacing_mm']:.3g} mm")
        print(f"local patch: {choice['size_px']} px at {at} = up to {choice['extent_mm']:.1f} mm "
              f"({choice['reason']}{notes}); training jitter up to +-{choice['jitter_mm']:.2f} mm")
        return self._rule.views(choice)


METHOD = GlobalLocalFCNN
