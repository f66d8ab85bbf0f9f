"""Prior-guided coarse-to-fine landmark localisation (Cheng et al., MIDL 2023), 3D (and 2D).

The authors published no code; every part below is designed from the paper's description
(``../shared/METHODS.md`` section 3) and each is switchable so its effect can be measured. Three stages,
run by :func:`lmlib.engine.cascade.fit_cascade` (:meth:`PriorGuided.build_stages`); each stage after
the first looks at patches centred on the previous stage's predictions and is trained on patches whose
centres are jittered like that stage's measured validation errors:

- ``coarse`` (:class:`CoarseRegressor`): a 3D CNN (MONAI ``Regressor``: residual strided convolutions,
  then one linear layer) regresses the coordinates of all landmarks at once from the whole, downsampled
  volume (``coarse_spacing_mm``), so the landmarks' joint layout is learnt together (the "prior").
  Outputs are normalised grid coordinates ``u = 2 idx / (size - 1) - 1``; the last layer starts at
  zero (every landmark at the grid centre). Loss: L1 in px of the coarse grid over valid landmarks.
- ``independent`` (:class:`PerLandmark` MONAI U-Nets, or one shared U-Net whose output channel is
  selected by the item's landmark: ``fine_net``): a Gaussian heatmap (``sigma`` px, amplitude 100,
  foreground-weighted MSE as the heatmap U-Net) in a full-resolution patch (``fine_patch_px`` at
  ``fine_spacing_mm``) around each landmark's coarse estimate; decoded by the log-parabola peak.
- ``correlated`` (:class:`CorrelatedNet`): the landmarks an annotation protocol places on a shared
  plane (a dataset's ``landmark_groups``; for AFIDs the ten midsagittal ones) are refined jointly. One
  item holds the group's patches as channels (:class:`~lmlib.data.loaders.ViewSpec` ``stacked``). A
  shared encoder reads every patch; the group's bottleneck features are concatenated and fused by a
  1x1 convolution; **axis attention** weights them (:class:`AxisAttention`: channel [avg, max] pooling
  through a shared MLP -> sigmoid map ``M_c``, then channel-wise [avg, max] pooling through a 7^D
  convolution -> sigmoid map ``M_s``; ``F_w = F * M_c * M_s``); ``F_w`` is given back to every patch's
  decoder. Two heads: the **plane position** along the plane's normal axis (``plane_axis``, grid axis
  0 = x for the midsagittal plane), a 1D map over that axis, and each landmark's **in-plane map**, a
  2D map over the other two axes (the decoded 3D map averaged along the normal). Both are logits of
  distributions (softmax over their axes), trained by cross-entropy against normalised Gaussians
  (sigma px) and decoded by the log-parabola peak of the softmax (:func:`soft_cross_entropy`: a
  weighted MSE on averaged maps did not train, its peak needing the whole averaged slab at the
  target's amplitude: on afids-mni the loss fell by 1.5 % in 6 epochs while the validation error
  rose from 8 to 16 mm). The landmark is (plane position, in-plane peak). ``plane="shared"`` (the paper's slice detection) has
  all patches of the group centred on one common normal coordinate and predicts one position for all;
  ``plane="per_landmark"`` predicts where the plane crosses each landmark's patch (for planes that
  bend: on the afids-mni deformation set the ten midsagittal AFIDs lie 1.4 mm (mean |residual|) off
  their common x and 0.7 mm off a fitted tilted plane).

Stage rows: ``prior_guided/coarse``, ``prior_guided/independent`` (coarse + independent),
``prior_guided/correlated`` (coarse + independent, then the group's landmarks from the correlated model).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn

from lmlib.data.loaders import ViewSpec
from lmlib.methods.base import OutputsT, foreground_weighted, masked_mean
from lmlib.methods.config import MethodParameters, defaults
from lmlib.methods.decoding import decode_maps
from lmlib.methods.networks import PerLandmark, SharedByLandmark, build_network
from lmlib.methods.stages import CascadeMethod, DeferredStage, Stage, stage_validation_errors
from lmlib.methods.targets import gaussian_heatmaps
from lmlib.typed import Int, Number, Text, Widths, field, one_of

STAGES: tuple[str, ...] = ("coarse", "independent", "correlated")
FINE_NETS: tuple[str, ...] = ("per_landmark", "shared")
PLANE_MODES: tuple[str, ...] = ("shared", "per_landmark")
COARSE_CHANNELS: tuple[int, ...] = (16, 32, 64, 128, 128)
FINE_CHANNELS: tuple[int, ...] = (16, 32, 64)
CORRELATED_CHANNELS: tuple[int, ...] = (16, 32, 64)
DEFAULT_COARSE_SIZE = 64  # coarse grid px per axis when none is given (the run path passes image_size)
AMPLITUDE = 100.0  # heatmap peak (the heatmap U-Net's)
#: mean radial error of an isotropic normal error N(0, s^2 I_D) is this times s (Rayleigh / Maxwell)
RADIAL_MEAN_FACTOR: dict[int, float] = {2: math.sqrt(math.pi / 2), 3: 2 * math.sqrt(2 / math.pi)}


class CoarseStageParameters(MethodParameters):
    """The coarse stage's notebook parameters (its grid is the shared ``image_size``, its epochs and batch the
    shared ``max_epochs`` and ``batch_size``)."""

    coarse_spacing_mm: Number = field(2.0, "coarse grid spacing (mm/px); 0: the field of view resized to image_size",
                                      "a number >= 0 (mm/px)", ge=0)
    coarse_channels: Widths = field(list(COARSE_CHANNELS), "Regressor widths (each a stride-2 level)",
                                    "a list of integers >= 1")
    coarse_dropout: Number = field(0.0, "dropout in the Regressor", "a number in [0, 1)", ge=0, lt=1)


class PatchStageParameters(MethodParameters):
    """What both fine stages share: their patches and the training jitter."""

    fine_patch_px: Int = field(32, "fine patch size (px per axis), both fine stages", "an integer >= 4", ge=4)
    fine_spacing_mm: Number = field(1.0, "fine patch spacing (mm/px)", "a number > 0 (mm/px)", gt=0)
    jitter_factor: Number = field(1.0, "training jitter sigma: this x the previous stage's error (as sigma of a "
                                       "normal)", "a number >= 0", ge=0)
    sigma: Number = field(2.0, "fine heatmap Gaussian sigma (px)", "a number > 0 (px)", gt=0)


class IndependentStageParameters(PatchStageParameters):
    """The independent stage's notebook parameters."""

    fine_net: Annotated[str, one_of(FINE_NETS)] = field(
        "per_landmark", "per_landmark (paper) | shared (one U-Net, output channel per landmark)",
        "per_landmark or shared")
    fine_channels: Widths = field(list(FINE_CHANNELS), "fine U-Net widths", "a list of integers >= 1")
    fine_epochs: Int = field(40, "independent stage epochs", "an integer >= 1", ge=1)
    fine_batch_size: Int = field(16, "independent patches per batch", "an integer >= 1", ge=1)
    foreground_weight: Number = field(30.0, "fine heatmap MSE weighting of the foreground", "a number >= 1", ge=1)


class CorrelatedStageParameters(PatchStageParameters):
    """The correlated stage's notebook parameters."""

    correlated_group: Text = field("", "the dataset's landmark group refined jointly; empty: its first (none: stage "
                                       "skipped)")
    correlated_channels: Widths = field(list(CORRELATED_CHANNELS), "correlated encoder-decoder widths",
                                        "a list of integers >= 1")
    correlated_epochs: Int = field(40, "correlated stage epochs", "an integer >= 1", ge=1)
    correlated_batch_size: Int = field(2, "groups (of stacked patches) per batch", "an integer >= 1", ge=1)
    plane: Annotated[str, one_of(PLANE_MODES)] = field(
        "per_landmark", "shared (paper: one plane position for the group) | per_landmark", "shared or per_landmark")
    plane_axis: Int = field(0, "patch-grid axis normal to the plane (0 is x, normal to the midsagittal plane)",
                            "0, 1 or 2", ge=0, le=2)


class PriorGuidedParameters(CoarseStageParameters, IndependentStageParameters, CorrelatedStageParameters):
    """The three stages' parameters and which stages run."""

    stages: list[Annotated[str, one_of(STAGES)]] = field(
        list(STAGES), "which stages to run (from coarse on)", f"a list from {list(STAGES)} starting with coarse")


_D = defaults(PriorGuidedParameters)


# -------------------------------------------------------------------------------------------- networks
class CoarseRegressor(nn.Module):
    """MONAI ``Regressor`` from the whole downsampled volume ``(B, 1, *size)`` to normalised coordinates
    ``(B, K, D)`` (``u = 2 idx / (size - 1) - 1``); the final linear layer starts at zero."""

    def __init__(self, spatial_dims: int, n_landmarks: int, size: Sequence[int],
                 channels: Sequence[int] = COARSE_CHANNELS, num_res_units: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        from monai.networks.nets import Regressor

        chans = tuple(int(c) for c in channels)
        self.net = Regressor((1, *(int(s) for s in size)), (int(n_landmarks), int(spatial_dims)), chans,
                             (2,) * len(chans), num_res_units=int(num_res_units), dropout=float(dropout) or None)
        linear = self.net.final[-1]
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
        self.size = tuple(int(s) for s in size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.size:
            raise ValueError(f"the coarse regressor was built for a {list(self.size)}-px grid, got {list(x.shape[2:])}")
        return self.net(x)


def _block(dims: int, cin: int, cout: int, stride: int = 1) -> nn.Module:
    from monai.networks.blocks import Convolution

    return nn.Sequential(Convolution(dims, cin, cout, strides=stride, kernel_size=3, norm="instance", act="prelu"),
                         Convolution(dims, cout, cout, kernel_size=3, norm="instance", act="prelu"))


class AxisAttention(nn.Module):
    """Channel then spatial attention from [avg, max] poolings (the paper's "axis attention"; the same
    construction as CBAM, Woo et al. 2018, which none of our libraries ships: MONAI has only the
    average-pooled channel squeeze-excitation). ``forward(F)`` -> ``(F * M_c * M_s, M_c, M_s)`` with
    ``M_c`` ``(B, C, 1, ...)`` and ``M_s`` ``(B, 1, *size)`` in (0, 1)."""

    def __init__(self, spatial_dims: int, channels: int, reduction: int = 4, kernel: int = 7) -> None:
        super().__init__()
        from monai.networks.layers.factories import Conv

        hidden = max(1, channels // reduction)
        self.dims = spatial_dims
        self.mlp = nn.Sequential(Conv["conv", spatial_dims](channels, hidden, 1), nn.ReLU(),
                                 Conv["conv", spatial_dims](hidden, channels, 1))
        self.spatial = Conv["conv", spatial_dims](2, 1, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        axes = tuple(range(2, 2 + self.dims))
        m_c = torch.sigmoid(self.mlp(x.mean(dim=axes, keepdim=True)) + self.mlp(x.amax(dim=axes, keepdim=True)))
        x = x * m_c
        m_s = torch.sigmoid(self.spatial(torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], 1)))
        return x * m_s, m_c, m_s


class CorrelatedNet(nn.Module):
    """Joint refinement of a group of ``m`` landmarks on one plane (see the module docstring).

    ``forward(x)`` with ``x`` ``(B, m, *size)`` (one patch per landmark) ->
    ``{"inplane": (B, m, *in-plane size), "plane": (B, P, size[plane_axis]), "attention": (B, 1, *size/4)}``
    with ``P = 1`` (``plane="shared"``) or ``m`` (``"per_landmark"``); maps are logits (softmax over their axes).
    """

    def __init__(self, spatial_dims: int, group_size: int, channels: Sequence[int] = CORRELATED_CHANNELS,
                 plane_axis: int = 0, plane: str = "per_landmark") -> None:
        super().__init__()
        from monai.networks.layers.factories import Conv

        if plane not in PLANE_MODES:
            raise ValueError(f"plane must be one of {PLANE_MODES}, got {plane!r}")
        c1, c2, c3 = (int(c) for c in channels)
        d, m = int(spatial_dims), int(group_size)
        if not 0 <= plane_axis < d:
            raise ValueError(f"plane_axis must be a grid axis (0..{d - 1}), got {plane_axis}")
        self.dims, self.m, self.plane_axis, self.plane = d, m, int(plane_axis), plane
        self.enc1, self.enc2, self.enc3 = _block(d, 1, c1), _block(d, c1, c2, 2), _block(d, c2, c3, 2)
        self.fuse = Conv["conv", d](m * c3, c3, 1)
        self.attention = AxisAttention(d, c3)
        self.up2 = Conv["convtrans", d](2 * c3, c2, 2, stride=2)
        self.dec2 = _block(d, 2 * c2, c2)
        self.up1 = Conv["convtrans", d](c2, c1, 2, stride=2)
        self.dec1 = _block(d, 2 * c1, c1)
        self.heat = Conv["conv", d](c1, m, 1)  # channel k = landmark k's map (read on patch k)
        self.plane_head = Conv["conv", d](c1, m, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, m = x.shape[:2]
        if m != self.m:
            raise ValueError(f"CorrelatedNet was built for {self.m} patches, got {m}")
        size = x.shape[2:]
        p = x.reshape(b * m, 1, *size)
        e1 = self.enc1(p)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        fused = self.fuse(e3.reshape(b, m * e3.shape[1], *e3.shape[2:]))
        f_w, _, m_s = self.attention(fused)
        f_w = f_w.repeat_interleave(m, dim=0)  # the group's weighted features, to every patch's decoder
        h = self.dec2(torch.cat([self.up2(torch.cat([e3, f_w], 1)), e2], 1))
        h = self.dec1(torch.cat([self.up1(h), e1], 1))
        own = torch.arange(m, device=x.device).repeat(b)
        rows = torch.arange(b * m, device=x.device)
        maps = self.heat(h)[rows, own].reshape(b, m, *size)  # patch k -> landmark k's channel
        prof = self.plane_head(h)[rows, own].reshape(b, m, *size)
        a = 2 + self.plane_axis
        others = tuple(i for i in range(2, 2 + self.dims) if i != a)
        profile = prof.mean(dim=others)  # (B, m, size[plane_axis])
        if self.plane == "shared":
            profile = profile.mean(dim=1, keepdim=True)
        return {"inplane": maps.mean(dim=a), "plane": profile, "attention": m_s}


# --------------------------------------------------------------------------------------------- method
def normalised(idx: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Grid index ``(..., D)`` px -> ``2 idx / (size - 1) - 1`` (the coarse regressor's output)."""
    s = torch.as_tensor([float(n) for n in size], dtype=idx.dtype, device=idx.device)
    return 2.0 * idx / (s - 1).clamp_min(1.0) - 1.0


def from_normalised(u: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`normalised`."""
    s = torch.as_tensor([float(n) for n in size], dtype=u.dtype, device=u.device)
    return (u + 1.0) / 2.0 * (s - 1).clamp_min(1.0)


def weighted_mse(output: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, dims: int,
                 foreground_weight: float) -> torch.Tensor:
    """Squared error weighted ``1 + (w - 1) * target / amplitude`` per pixel, over valid maps only."""
    err = F.mse_loss(output.float(), target, reduction="none")
    return masked_mean(foreground_weighted(err, target, foreground_weight, AMPLITUDE), valid, dims)


def distribution(logits: torch.Tensor, dims: int) -> torch.Tensor:
    """Softmax over the last ``dims`` axes: ``(B, K, *size)`` logits -> probability maps."""
    flat = logits.float().flatten(start_dim=logits.ndim - dims)
    return torch.softmax(flat, dim=-1).reshape(logits.shape)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, dims: int) -> torch.Tensor:
    """Cross-entropy of the softmax over the last ``dims`` axes against the target maps normalised to
    sum 1 (Gaussians), averaged over valid maps: scale-free, unlike an MSE on averaged maps, whose
    peak would need the whole averaged slab at the target's amplitude."""
    flat = logits.float().flatten(start_dim=logits.ndim - dims)
    t = target.float().flatten(start_dim=target.ndim - dims)
    t = t / t.sum(-1, keepdim=True).clamp_min(1e-12)
    ce = -(t * torch.log_softmax(flat, dim=-1)).sum(-1)  # (B, K)
    w = valid.to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp_min(1.0)


class PriorGuided(CascadeMethod[OutputsT]):
    """One stage (``coarse`` | ``independent`` | ``correlated``) of the prior-guided method; the
    class's :meth:`build_stages` makes the cascade (see the module docstring). ``PriorGuided(stage=...)`` is an
    instance of that stage's class (:class:`CoarseStage`, :class:`IndependentStage`, :class:`CorrelatedStage`),
    each holding its own network, loss and decoding; a checkpoint's configuration (``stage`` in it) rebuilds it.

    Args:
        stage: which stage.
        network: coarse: ``size`` (the coarse grid, px), ``channels``, ``num_res_units``, ``dropout``;
            independent: ``channels``, ``kind`` (per_landmark | shared); correlated: ``channels``.
        sigma: Gaussian sigma (px) of the fine stages' targets (heatmaps; correlated: distributions).
        foreground_weight: the independent stage's MSE weighting (see :func:`weighted_mse`).
        group: correlated: the dataset indices of the group's landmarks (the items' order).
        plane_axis / plane: correlated: the plane's normal grid axis and ``shared`` | ``per_landmark``.
        jitter_choice: how the training jitter was chosen (provenance only).
    """

    name = "prior_guided"
    Parameters = PriorGuidedParameters
    stage: str = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> PriorGuided:
        if cls is PriorGuided:  # stage: the third argument (after spatial_dims, n_landmarks) or the keyword
            stage = kwargs.get("stage", args[2] if len(args) > 2 else "coarse")
            if stage not in STAGE_CLASSES:
                raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
            cls = STAGE_CLASSES[stage]
        return super().__new__(cls)

    def __init__(self, spatial_dims: int, n_landmarks: int, stage: str = "coarse",
                 network: dict[str, Any] | None = None, sigma: float = _D["sigma"],
                 foreground_weight: float = _D["foreground_weight"], group: Sequence[int] = (),
                 plane_axis: int = _D["plane_axis"], plane: str = _D["plane"],
                 jitter_choice: dict[str, Any] | None = None, decoder: str = "quadratic",
                 decoder_kwargs: dict[str, Any] | None = None, **base: Any) -> None:
        if stage != self.stage:
            raise ValueError(f"{type(self).__name__} is the {self.stage!r} stage, not {stage!r}")
        net = self.network_config(int(spatial_dims), dict(network or {}), group, plane)
        super().__init__(spatial_dims, n_landmarks, net, decoder, decoder_kwargs, **base)
        if sigma <= 0 or foreground_weight < 1:
            raise ValueError(f"need sigma > 0 and foreground_weight >= 1, got {sigma}, {foreground_weight}")
        self.sigma, self.foreground_weight = float(sigma), float(foreground_weight)
        self.group, self.plane_axis, self.plane = [int(k) for k in group], int(plane_axis), plane
        self.jitter_choice = dict(jitter_choice or {})
        self.test_time_flip = False  # patches / a regressor without left-right handling

    def network_config(self, spatial_dims: int, network: dict[str, Any], group: Sequence[int],
                       plane: str) -> dict[str, Any]:
        """The stage's network settings with its defaults filled in (checked)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        net = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in self.network.items()}
        return {**super().config(), "network": net, "stage": self.stage, "sigma": self.sigma,
                "foreground_weight": self.foreground_weight, "group": self.group, "plane_axis": self.plane_axis,
                "plane": self.plane, "jitter_choice": self.jitter_choice}

    def size_multiple(self) -> int:
        return 2 ** (len(self.network["channels"]) - 1)

    # ---------------------------------------------------------------------------------- the cascade
    @classmethod
    def from_parameters(cls, spatial_dims: int, n_landmarks: int, params: Mapping[str, Any],
                        stage: str = "coarse", **shared: Any) -> PriorGuided:
        p = cls.values(params)
        kw: dict[str, Any] = {"stage": stage, "sigma": float(p["sigma"]),
                              "foreground_weight": float(p["foreground_weight"])}
        if stage == "coarse":
            kw["network"] = {"size": [int(v) for v in shared["coarse_grid"]],
                             "channels": [int(c) for c in p["coarse_channels"]], "dropout": float(p["coarse_dropout"])}
        elif stage == "independent":
            kw["network"] = {"kind": str(p["fine_net"]), "channels": [int(c) for c in p["fine_channels"]]}
        else:
            kw["network"] = {"channels": [int(c) for c in p["correlated_channels"]]}
            kw.update(group=list(shared["group"]), plane_axis=int(p["plane_axis"]), plane=str(p["plane"]))
        base = {k: shared[k] for k in ("optimizer",) if k in shared}
        return cls(spatial_dims, n_landmarks, **kw, **base)

    @classmethod
    def build_stages(cls, spatial_dims: int, n_landmarks: int, params: Mapping[str, Any], grid: Sequence[int],
                     shared: Mapping[str, Any]) -> list[Stage]:
        """The stages named by ``params["stages"]`` (default all three; ``correlated`` only when the
        dataset declares the group ``correlated_group``, else skipped with a message). ``grid``: the
        coarse stage's whole-volume grid in px at ``coarse_spacing_mm`` (0: the field of view resized)."""
        p = cls.values(params)
        wanted = [str(s) for s in (p["stages"] or STAGES)]
        if wanted[0] != "coarse" or len(set(wanted)) != len(wanted):
            raise ValueError(f"stages must start with 'coarse' and name each of {STAGES} at most once, got {wanted}")
        spacing = float(p["coarse_spacing_mm"])
        coarse = cls.from_parameters(spatial_dims, n_landmarks, params, "coarse", **shared, coarse_grid=grid)
        stages: list[Stage] = [Stage("coarse", coarse, ViewSpec("whole", size=grid, spacing=spacing or None),
                                     max_epochs=int(shared["max_epochs"]), batch_size=int(shared["batch_size"]))]
        out = Path(params["output_dir"]) if params.get("output_dir") else None
        size = (int(p["fine_patch_px"]),) * spatial_dims
        fine_spacing, factor = float(p["fine_spacing_mm"]), float(p["jitter_factor"])
        previous = "coarse"
        if "independent" in wanted:
            method = cls.from_parameters(spatial_dims, n_landmarks, params, "independent", **shared)
            stages.append(JitteredStage(
                "independent", method, None, None, max_epochs=int(p["fine_epochs"]),
                batch_size=int(p["fine_batch_size"]), previous=out / previous if out else None,
                patch=ViewSpec("patch", size=size, spacing=fine_spacing, per_landmark=True), factor=factor,
                landmark_names=shared.get("landmark_names", ())))
            previous = "independent"
        if "correlated" in wanted:
            groups = dict(shared.get("landmark_groups") or {})
            name = str(p["correlated_group"] or next(iter(groups), ""))
            if name not in groups:
                print(f"correlated stage skipped: the dataset declares no landmark group {name!r} "
                      f"(groups: {sorted(groups) or 'none'})")
                return stages
            group = groups[name]
            method = cls.from_parameters(spatial_dims, n_landmarks, params, "correlated", **shared, group=group)
            axis = method.plane_axis if method.plane == "shared" else None
            stages.append(JitteredStage(
                "correlated", method, None, None, max_epochs=int(p["correlated_epochs"]),
                batch_size=int(p["correlated_batch_size"]), previous=out / previous if out else None,
                patch=ViewSpec("patch", size=size, spacing=fine_spacing, landmarks=group, stacked=True,
                               shared_axis=axis), factor=factor, landmark_names=shared.get("landmark_names", ())))
        return stages


class CoarseStage(PriorGuided[torch.Tensor]):
    """The coarse stage: all landmarks' coordinates regressed at once from the whole downsampled volume."""

    stage = "coarse"

    def network_config(self, spatial_dims: int, network: dict[str, Any], group: Sequence[int],
                       plane: str) -> dict[str, Any]:
        net = {"channels": list(COARSE_CHANNELS), "num_res_units": 2, "dropout": 0.0, **network}
        net["size"] = [int(v) for v in net.get("size") or [DEFAULT_COARSE_SIZE] * spatial_dims]
        if len(net["size"]) != spatial_dims:
            raise ValueError(f"the coarse grid needs {spatial_dims} sizes (px), got {net['size']}")
        return net

    def size_multiple(self) -> int:
        return 1

    def build_network(self) -> nn.Module:
        net = self.network
        return CoarseRegressor(self.spatial_dims, self.n_landmarks, net["size"], net["channels"],
                               net["num_res_units"], net["dropout"])

    def training_loss(self, outputs: torch.Tensor, batch: Mapping[str, Any], epoch: int
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
        """L1 in px of the coarse grid over valid landmarks."""
        lm, valid = batch["landmarks"].float(), batch["valid"]
        err = (from_normalised(outputs.float(), tuple(batch["image"].shape[2:])) - lm).abs().mean(-1)  # (B, K) px
        w = valid.to(err.dtype)
        return (err * w).sum() / w.sum().clamp_min(1.0), {}

    def decode_batch(self, outputs: torch.Tensor, batch: Mapping[str, Any], epoch: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        coords = from_normalised(outputs.float(), tuple(batch["image"].shape[2:]))
        return coords, torch.ones(coords.shape[:2], device=coords.device)

    def maps(self, output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("the coarse stage regresses coordinates: it has no maps")


class IndependentStage(PriorGuided[torch.Tensor]):
    """The independent stage: a heatmap per landmark in a full-resolution patch around its coarse estimate."""

    stage = "independent"

    def network_config(self, spatial_dims: int, network: dict[str, Any], group: Sequence[int],
                       plane: str) -> dict[str, Any]:
        net = {"channels": list(FINE_CHANNELS), "kind": "per_landmark", **network}
        if net["kind"] not in FINE_NETS:
            raise ValueError(f"fine_net must be one of {FINE_NETS}, got {net['kind']!r}")
        return net

    def build_network(self) -> nn.Module:
        n, d, net = self.n_landmarks, self.spatial_dims, self.network
        if net["kind"] == "shared":
            return SharedByLandmark(build_network(d, n, channels=net["channels"], num_res_units=1))
        return PerLandmark([build_network(d, 1, channels=net["channels"], num_res_units=1) for _ in range(n)])

    def forward(self, net: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        return net(batch["image"], batch["landmark_ids"])

    def training_loss(self, outputs: torch.Tensor, batch: Mapping[str, Any], epoch: int
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Foreground-weighted MSE to Gaussian heatmaps (amplitude :data:`AMPLITUDE`)."""
        lm, valid = batch["landmarks"].float(), batch["valid"]
        target = gaussian_heatmaps(lm, tuple(batch["image"].shape[2:]), self.sigma, valid, AMPLITUDE)
        return weighted_mse(outputs, target, valid, self.spatial_dims, self.foreground_weight), {}

    def decode_batch(self, outputs: torch.Tensor, batch: Mapping[str, Any], epoch: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        return decode_maps(outputs, self.spatial_dims, self.decoder, **self.decoder_kwargs)

    def maps(self, output: torch.Tensor) -> torch.Tensor:
        """The heatmaps."""
        return output


class CorrelatedStage(PriorGuided[dict[str, torch.Tensor]]):
    """The correlated stage: a landmark group on one plane refined jointly (plane position + in-plane maps)."""

    stage = "correlated"

    def network_config(self, spatial_dims: int, network: dict[str, Any], group: Sequence[int],
                       plane: str) -> dict[str, Any]:
        if len(group) < 2:
            raise ValueError(f"the correlated stage needs a group of >= 2 landmarks, got {list(group)}")
        if plane not in PLANE_MODES:
            raise ValueError(f"plane must be one of {PLANE_MODES}, got {plane!r}")
        return {"channels": list(CORRELATED_CHANNELS), **network}

    def build_network(self) -> nn.Module:
        return CorrelatedNet(self.spatial_dims, len(self.group), self.network["channels"], self.plane_axis,
                             self.plane)

    def _inplane(self, coords: torch.Tensor) -> torch.Tensor:
        keep = [a for a in range(self.spatial_dims) if a != self.plane_axis]
        return coords[..., keep]

    def training_loss(self, outputs: dict[str, torch.Tensor], batch: Mapping[str, Any], epoch: int
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Soft cross-entropy of the in-plane maps and of the plane position (see the module docstring)."""
        lm, valid, a = batch["landmarks"].float(), batch["valid"], self.plane_axis
        inplane = gaussian_heatmaps(self._inplane(lm), outputs["inplane"].shape[2:], self.sigma, valid)
        l_in = soft_cross_entropy(outputs["inplane"], inplane, valid, self.spatial_dims - 1)
        normal, ok = lm[..., a:a + 1], valid
        if self.plane == "shared":  # one position: the mean of the valid landmarks' normal coordinates
            w = valid.to(lm.dtype)
            normal = ((lm[..., a] * w).sum(1) / w.sum(1).clamp_min(1.0))[:, None, None]
            ok = valid.any(dim=1, keepdim=True)
        profile = gaussian_heatmaps(normal, outputs["plane"].shape[2:], self.sigma, ok)
        l_plane = soft_cross_entropy(outputs["plane"], profile, ok, 1)
        return l_in + l_plane, {"log": {"loss_inplane": l_in.detach(), "loss_plane": l_plane.detach()}}

    def decode_batch(self, outputs: dict[str, torch.Tensor], batch: Mapping[str, Any], epoch: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        xy, conf = decode_maps(distribution(outputs["inplane"], self.spatial_dims - 1), self.spatial_dims - 1,
                               self.decoder, **self.decoder_kwargs)
        pos, _ = decode_maps(distribution(outputs["plane"], 1), 1, self.decoder, **self.decoder_kwargs)  # (B, P, 1)
        pos = pos.expand(-1, xy.shape[1], -1)
        a = self.plane_axis
        return torch.cat([xy[..., :a], pos, xy[..., a:]], dim=-1), conf

    def maps(self, output: dict[str, torch.Tensor]) -> torch.Tensor:
        """The in-plane probability maps."""
        return distribution(output["inplane"], self.spatial_dims - 1)


#: stage name -> its class (``PriorGuided(stage=...)`` builds one of these)
STAGE_CLASSES: dict[str, type[PriorGuided]] = {c.stage: c for c in (CoarseStage, IndependentStage, CorrelatedStage)}


class JitteredStage(DeferredStage):
    """A patch stage trained with centres jittered like the previous stage's errors: its measured
    per-landmark mean validation errors (``<previous>/training_log/metrics.csv``, selected epoch) of the
    landmarks this stage serves, averaged, give ``sigma = factor * mean / c_D`` per axis (``c_D``: mean
    radial error of a unit isotropic normal error, :data:`RADIAL_MEAN_FACTOR`); training patches are
    centred on ground truth + N(0, sigma^2 I), val/test patches on the previous stage's predictions."""

    method: PriorGuided  # a fine stage of the prior-guided method

    def __init__(self, *args: Any, previous: Path | None, patch: ViewSpec, factor: float = 1.0,
                 errors: Mapping[str, float] | None = None, landmark_names: Sequence[str] = (), **kwargs: Any) -> None:
        self._previous, self._patch, self._factor = previous, patch, float(factor)
        self._given = dict(errors) if errors is not None else None
        self._names = list(landmark_names)
        super().__init__(*args, **kwargs)

    def settle(self) -> tuple[ViewSpec, ViewSpec]:
        errors = self._given
        if errors is None and self._previous is not None and (self._previous / "training_log" / "metrics.csv").is_file():
            errors = stage_validation_errors(self._previous / "training_log" / "metrics.csv")
        if not errors:
            raise ValueError(f"stage {self.name!r}: the training jitter comes from the previous stage's validation "
                             f"errors, which are not available ({self._previous}); train that stage first")
        served = [self._names[k] for k in self.method.group if k < len(self._names)]
        values = [errors[n] for n in served if n in errors] or list(errors.values())
        mean = float(sum(values) / len(values))
        d = self.method.spatial_dims
        sigma = self._factor * mean / RADIAL_MEAN_FACTOR[d]
        assert self._patch.size is not None and self._patch.spacing is not None  # a patch view at fine_spacing_mm
        half = (self._patch.size[0] - 1) / 2.0 * float(self._patch.spacing[0])
        self.method.jitter_choice = {"previous_mean_val_error_mm": mean, "sigma_mm": sigma, "factor": self._factor,
                                     "patch_half_width_mm": half}
        warn = "" if 3 * sigma <= half else f"; WARNING: 3 sigma exceeds the patch half-width {half:.1f} mm"
        print(f"{self.name} stage: patches of {self._patch.size[0]} px at {self._patch.spacing[0]:g} mm "
              f"(+-{half:.1f} mm); training centres jittered by N(0, {sigma:.2f}^2) mm per axis "
              f"({self._factor:g} x the previous stage's {mean:.2f}-mm mean validation error){warn}")
        return ViewSpec.from_dict({**self._patch.to_dict(), "jitter": ["normal", sigma]}), self._patch


METHOD = PriorGuided
