"""What a landmark method is: small parts plugged into the shared engine (:mod:`lmlib.engine`).

A method is a :class:`LandmarkMethod`. The engine owns data loading, augmentation, the training loop,
checkpoints, logging, the validation error in world mm and the map back to world mm; the method owns:

- ``build_network()``: the network (``nn.Module``; several nets may live in one module, e.g.
  :class:`lmlib.methods.networks.PerLandmark`);
- ``forward(net, batch)``: outputs for a batch: a tensor or a dict of named tensors (e.g. heatmaps at
  two resolutions); default ``net(batch["image"])``;
- ``training_loss(outputs, batch, epoch)``: the scalar loss (invalid landmarks must not contribute) and
  what to log; default: ``encode_targets`` + ``loss`` below;
- ``decode_batch(outputs, batch, epoch)``: coordinates ``(B, K, D)`` as continuous indices on the
  item's grid and confidences ``(B, K)``; default ``decode(outputs, epoch)``;
- ``optimizer``: a dict (``name`` adam | adamw, ``lr``, ``weight_decay``, ``schedule`` cosine | constant,
  ``warmup_epochs``) used by :meth:`configure_optimizers`, which a method may override entirely;
- ``test_time_flip``: average the prediction with the mirrored image's (axis 0, left/right pairs
  swapped), done generically in :meth:`predict_coords`.

State that decoding depends on (e.g. the epoch of the dilation-erosion masks) travels with the weights:
the engine stores the epoch in the module's state dict and passes it to ``decode_batch``; a method never
reads it off a trainer.

Coordinates: batch ``landmarks`` are ``(B, K, D)`` continuous indices ``(x, y[, z])`` on the item's grid,
``valid`` ``(B, K)`` bool (invalid rows hold 0); map outputs are ``(B, K, *size)``.

Adding a method = one module ``lmlib/methods/<name>.py`` defining a subclass with ``name = "<name>"``
and ``METHOD = <the class>`` (or, from another package, an entry point in the group ``lmlib.methods``);
:func:`method_names` discovers it and :func:`build_method` finds it by name. ``from_parameters`` turns notebook
parameters into a method (the run path, :mod:`lmlib.engine.runner`, calls it).
"""
from __future__ import annotations

import importlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar

import numpy as np
import torch
from torch import nn

from lmlib.methods.config import MethodParameters
from lmlib.methods.decoding import DECODERS, decode_maps, map_spread
from lmlib.methods.networks import build_network, size_multiple
from lmlib.typed import Int, Widths, field, one_of

Targets = dict[str, torch.Tensor]
Outputs = torch.Tensor | dict[str, torch.Tensor]
#: the outputs of one method (a subclass says which: ``LandmarkMethod[torch.Tensor]``, ``...[dict[str, torch.Tensor]]``)
OutputsT = TypeVar("OutputsT", bound=Outputs)
#: entry-point group through which an installed package adds a method (``name = "package.module:Class"``)
ENTRY_POINT_GROUP = "lmlib.methods"


def _module_methods() -> tuple[str, ...]:
    """The modules of ``lmlib/methods`` that define a method (a top-level ``METHOD = <class>`` line), found by
    reading the files, not importing them."""
    folder = Path(__file__).resolve().parent
    return tuple(sorted(p.stem for p in folder.glob("*.py")
                        if re.search(r"^METHOD\s*=", p.read_text(encoding="utf-8"), re.MULTILINE)))


def _entry_points() -> dict[str, Any]:
    """The methods installed packages register under :data:`ENTRY_POINT_GROUP` (name -> entry point)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def method_names() -> tuple[str, ...]:
    """Every method this installation knows: ``lmlib/methods/<name>.py`` modules with ``METHOD``, then the
    entry points of :data:`ENTRY_POINT_GROUP` (a module of the same name wins)."""
    own = _module_methods()
    return own + tuple(sorted(set(_entry_points()) - set(own)))


#: the methods found when lmlib was imported (:func:`method_names` looks again)
METHOD_NAMES: tuple[str, ...] = method_names()
OPTIMIZERS: tuple[str, ...] = ("adam", "adamw")
SCHEDULES: tuple[str, ...] = ("cosine", "constant")
DEFAULT_OPTIMIZER: dict[str, Any] = {"name": "adam", "lr": 1e-3, "weight_decay": 0.0, "schedule": "cosine",
                                     "warmup_epochs": 0, "final_lr_fraction": 0.01}


@dataclass
class DerivedPredictions:
    """What a method derived from a finished run's predictions (``derived_from = "predictions"``, e.g.
    :mod:`lmlib.methods.shape_fit`) gives the run path: its test predictions ``(K, D)`` world mm per image and what
    deriving them cost beyond the base run (seconds; added to the base run's own times)."""

    test_mm: list[np.ndarray]
    train_seconds: float
    infer_seconds_per_image: float
    #: added to metrics.json and to the manifest
    metrics: dict[str, Any] = dataclass_field(default_factory=dict)
    manifest: dict[str, Any] = dataclass_field(default_factory=dict)
    #: tables written beside the outputs as ``<name>.csv`` (rows of one dict each)
    tables: dict[str, list[dict[str, Any]]] = dataclass_field(default_factory=dict)


class UNetParameters(MethodParameters):
    """The parameters of a method built on :func:`~lmlib.methods.networks.build_network` (a MONAI U-Net)."""

    channels: Widths = field([16, 32, 64, 128, 256], "U-Net features per level", "a list of integers >= 1")
    head_channels: Int = field(0, "full-resolution top level's width, then a 3x3 conv to the landmarks "
                               "(0: the U-Net outputs them)", "an integer >= 0", ge=0)
    decoder: Annotated[str, one_of(DECODERS)] = field(
        "quadratic", f"sub-pixel decoding of each map: {' | '.join(DECODERS)}", f"one of {', '.join(DECODERS)}")


class LandmarkMethod(Generic[OutputsT]):
    """Base class: network builder + target encoder + loss + decoder (see the module docstring).

    Args:
        spatial_dims: 2 or 3.
        n_landmarks: output channels (landmarks the network predicts).
        network: keyword arguments of :func:`lmlib.methods.networks.build_network` (arch, channels, ...).
        decoder / decoder_kwargs: see :func:`lmlib.methods.decoding.decode_maps`.
        optimizer: overrides of :data:`DEFAULT_OPTIMIZER`.
        test_time_flip: average with the prediction on the image mirrored along axis 0.
        flip_pairs: (left, right) landmark index pairs swapped by that mirror.
    """

    name: str = "base"
    #: image dimensions the method is built for (the driver and run_method refuse others)
    supported_dims: tuple[int, ...] = (2, 3)
    #: the typed model of this method's own notebook parameters (beyond the shared ones): the one place their
    #: types, bounds, defaults and descriptions live
    Parameters: type[MethodParameters] = UNetParameters
    #: the model's field names (set for each subclass from its ``Parameters``)
    parameters: tuple[str, ...] = tuple(UNetParameters.model_fields)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "parameters" not in cls.__dict__:  # a method written before the models may still list its names
            cls.parameters = tuple(cls.Parameters.model_fields)

    def __init__(self, spatial_dims: int, n_landmarks: int, network: dict[str, Any] | None = None,
                 decoder: str = "quadratic", decoder_kwargs: dict[str, Any] | None = None,
                 optimizer: dict[str, Any] | None = None, test_time_flip: bool = False,
                 flip_pairs: Sequence[Sequence[int]] = ()) -> None:
        self.spatial_dims, self.n_landmarks = int(spatial_dims), int(n_landmarks)
        self.network = dict(network or {})
        self.decoder, self.decoder_kwargs = decoder, dict(decoder_kwargs or {})
        self.optimizer = {**DEFAULT_OPTIMIZER, **(optimizer or {})}
        if self.optimizer["name"] not in OPTIMIZERS or self.optimizer["schedule"] not in SCHEDULES:
            raise ValueError(f"optimizer name must be one of {OPTIMIZERS} and schedule one of {SCHEDULES}, "
                             f"got {self.optimizer}")
        self.test_time_flip = bool(test_time_flip)
        self.flip_pairs = [tuple(int(i) for i in p) for p in flip_pairs]

    # ---- description (stored in checkpoints; build_method(name, **config()) rebuilds the method)
    def config(self) -> dict[str, Any]:
        return {"spatial_dims": self.spatial_dims, "n_landmarks": self.n_landmarks, "network": self.network,
                "decoder": self.decoder, "decoder_kwargs": self.decoder_kwargs, "optimizer": self.optimizer,
                "test_time_flip": self.test_time_flip, "flip_pairs": [list(p) for p in self.flip_pairs]}

    @classmethod
    def values(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """This method's parameters from notebook parameters: each field of :attr:`Parameters` validated, absent
        ones at the model's default (other names ignored); a refused value raises one ``ValueError`` line."""
        return cls.Parameters.values(params)

    @classmethod
    def parameter_config(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor keywords from notebook parameters (every field of :attr:`Parameters`, see :meth:`values`)."""
        out: dict[str, Any] = {}
        if "channels" in params:
            out["network"] = {"channels": list(params["channels"])}
        if params.get("head_channels"):  # absent or 0: MONAI's U-Net as it is (earlier checkpoints' config)
            out.setdefault("network", {})["head_channels"] = int(params["head_channels"])
        if "decoder" in params:
            out["decoder"] = params["decoder"]
        return out

    @classmethod
    def from_parameters(cls, spatial_dims: int, n_landmarks: int, params: Mapping[str, Any],
                        **shared: Any) -> LandmarkMethod:
        """Build the method from notebook parameters (absent ones: the model's defaults); ``shared`` are
        engine-level settings (``optimizer``, ``test_time_flip``, ``flip_pairs``, ``max_epochs``)."""
        kwargs = cls.parameter_config(cls.values(params))
        for key in ("optimizer", "test_time_flip", "flip_pairs"):
            if key in shared:
                kwargs[key] = shared[key]
        return cls(spatial_dims, n_landmarks, **kwargs)

    def build_network(self) -> nn.Module:
        return build_network(self.spatial_dims, self.n_landmarks, **self.network)

    def size_multiple(self) -> int:
        """Grid sizes must be divisible by this."""
        keys = ("arch", "channels", "strides")
        return size_multiple(**{k: self.network[k] for k in keys if k in self.network})

    # ---- batch-level hooks (override these for multi-output or patch methods)
    def forward(self, net: nn.Module, batch: Mapping[str, Any]) -> OutputsT:
        """Network outputs for a batch (a tensor or a dict of named tensors)."""
        return net(batch["image"])

    def training_loss(self, outputs: OutputsT, batch: Mapping[str, Any], epoch: int
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Scalar loss and extras (``targets`` for Dice, scalars to log)."""
        size = tuple(batch["image"].shape[2:])
        targets = self.encode_targets(batch["landmarks"], batch["valid"], size, epoch)
        return self.loss(outputs, targets, batch["valid"], epoch), {"targets": targets}

    def decode_batch(self, outputs: OutputsT, batch: Mapping[str, Any], epoch: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Coordinates ``(B, K, D)`` (continuous index on each item's grid) and confidences ``(B, K)``."""
        return self.decode(outputs, epoch)

    @torch.no_grad()
    def predict_coords(self, net: nn.Module, batch: Mapping[str, Any], epoch: int
                       ) -> tuple[torch.Tensor, torch.Tensor, OutputsT]:
        """Decoded coordinates, confidences and raw outputs; with ``test_time_flip`` the mean of the
        image's and its mirror's coordinates (mirror along axis 0: ``x -> size_x - 1 - x``, left/right
        pairs swapped back). Only for methods whose items hold all landmarks of a whole image."""
        outputs = self.forward(net, batch)
        coords, conf = self.decode_batch(outputs, batch, epoch)
        if not self.test_time_flip:
            return coords, conf, outputs
        flipped = {**batch, "image": torch.flip(batch["image"], dims=(2,))}
        c2, k2 = self.decode_batch(self.forward(net, flipped), flipped, epoch)
        c2 = c2.clone()
        c2[..., 0] = batch["image"].shape[2] - 1 - c2[..., 0]
        k2 = k2.clone()
        for a, b in self.flip_pairs:
            c2[:, [a, b]] = c2[:, [b, a]]
            k2[:, [a, b]] = k2[:, [b, a]]
        return 0.5 * (coords + c2), 0.5 * (conf + k2), outputs

    def configure_optimizers(self, parameters: Any, max_epochs: int) -> Any:
        """Optimizer and per-epoch schedule from :attr:`optimizer` (Lightning's return format):
        Adam or AdamW; optional linear warm-up over ``warmup_epochs``; then cosine decay to
        ``final_lr_fraction`` of the rate at ``max_epochs``, or constant."""
        o = self.optimizer
        cls = torch.optim.AdamW if o["name"] == "adamw" else torch.optim.Adam
        opt = cls(parameters, lr=float(o["lr"]), weight_decay=float(o["weight_decay"]))
        warm, horizon, floor = int(o["warmup_epochs"]), max(1, int(max_epochs)), float(o["final_lr_fraction"])
        if o["schedule"] == "constant" and warm == 0:
            return opt

        def factor(epoch: int) -> float:
            if epoch < warm:
                return (epoch + 1) / (warm + 1)
            if o["schedule"] == "constant":
                return 1.0
            t = min(1.0, (epoch - warm) / max(1, horizon - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # ---- the per-map parts most heatmap/mask methods define
    def encode_targets(self, landmarks: torch.Tensor, valid: torch.Tensor, size: Sequence[int], epoch: int) -> Targets:
        """Targets for a batch (on the landmarks' device)."""
        raise NotImplementedError

    def loss(self, output: OutputsT, targets: Targets, valid: torch.Tensor, epoch: int) -> torch.Tensor:
        """Scalar training loss; invalid landmarks must not contribute."""
        raise NotImplementedError

    def maps(self, output: OutputsT) -> torch.Tensor:
        """Per-landmark maps to decode and show (probabilities, heatmaps): ``(B, N, *size)``."""
        if isinstance(output, dict):
            raise NotImplementedError(f"{type(self).__name__} returns several outputs: define maps()")
        return output

    def decode(self, output: OutputsT, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Coordinates ``(B, N, D)`` (network-grid index) and confidences ``(B, N)``."""
        return decode_maps(self.maps(output), self.spatial_dims, self.decoder, **self.decoder_kwargs)

    def spread(self, outputs: OutputsT, coords: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """The output's own uncertainty around the decoded ``coords`` ``(B, K, D)``: a per-axis spread
        ``(B, K, D)`` in px of each item's grid (default: :func:`~lmlib.methods.decoding.map_spread` of
        :meth:`maps` when they are on the item's grid), NaN where the output gives none."""
        nan = torch.full(coords.shape, float("nan"), device=coords.device)
        try:
            maps = self.maps(outputs)
        except NotImplementedError:
            return nan
        if tuple(maps.shape[2:]) != tuple(batch["image"].shape[2:]):
            return nan
        return map_spread(maps, self.spatial_dims, coords)

    def dice(self, output: OutputsT, targets: Targets, valid: torch.Tensor) -> torch.Tensor | None:
        """Dice per landmark ``(B, N)`` of the thresholded output vs. target region (NaN = not defined)."""
        return None

    def decoding_variants(self) -> dict[str, dict[str, Any]]:
        """Other ways to decode the same trained weights, scored as extra rows ``<method>/<name>``:
        name -> overrides of :meth:`config` (e.g. one head of a multi-head net). Default: none."""
        return {}

    def loss_epoch(self, epoch: int) -> int | None:
        """The epoch as :meth:`training_loss` depends on it: training epochs with the same value may share one
        compiled loss (``torch_compile``: the engine compiles the loss once per value and batch shape, see
        :meth:`lmlib.engine.training.LandmarkModule.training_loss`). ``None`` (the default): the loss stays eager,
        e.g. one that logs extras or changes with every epoch; a loss that ignores the epoch returns 0."""
        return None

    def epoch_info(self, epoch: int, size: Sequence[int]) -> dict[str, float]:
        """Scalars to log at each epoch (e.g. the mask radius)."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def loss_key(method: LandmarkMethod, epoch: int) -> int | None:
    """``method.loss_epoch(epoch)``, or None when a class below the one that defines ``loss_epoch`` redefines the
    loss (``training_loss``, ``loss`` or ``encode_targets``): a subclass whose loss may depend on the epoch (or log
    extras) is not compiled under its parent's key."""
    mro = type(method).__mro__
    owner = next(c for c in mro if "loss_epoch" in c.__dict__)
    for name in ("training_loss", "loss", "encode_targets"):
        if not issubclass(owner, next(c for c in mro if name in c.__dict__)):
            return None
    return method.loss_epoch(epoch)


def method_class(name: str) -> type[LandmarkMethod]:
    """The class of method ``name``: module ``lmlib.methods.<name>``'s ``METHOD``, else the entry point ``name`` of
    :data:`ENTRY_POINT_GROUP` (an installed package's method)."""
    if name in _module_methods():
        return importlib.import_module(f"lmlib.methods.{name}").METHOD
    external = _entry_points().get(name)
    if external is None:
        raise ValueError(f"unknown method {name!r} (no module lmlib.methods.{name} defining METHOD, no entry point "
                         f"in group {ENTRY_POINT_GROUP!r}); known: {method_names()}")
    cls = external.load()
    if not (isinstance(cls, type) and issubclass(cls, LandmarkMethod)):
        raise ValueError(f"entry point {name!r} ({external.value}) is not a LandmarkMethod subclass")
    return cls


def build_method(name: str, **config: Any) -> LandmarkMethod:
    """Instantiate the method ``name`` with its configuration (as stored by ``config()``)."""
    return method_class(name)(**config)


def foreground_weighted(err: torch.Tensor, target: torch.Tensor, foreground_weight: float, peak: float) -> torch.Tensor:
    """``err * (1 + (foreground_weight - 1) * target / peak)``: per-pixel errors weighted up to ``foreground_weight``
    at a target's ``peak`` (1: ``err`` as it is). The weight is one pass over the maps and needs no gradient (an
    eager loss pays for each elementwise pass over ``(B, N, *size)`` and its backward about as much as for a small
    convolution: the benchmark notebook's step times; a compiled loss fuses them)."""
    if foreground_weight == 1:
        return err
    one = torch.ones((), dtype=target.dtype, device=target.device)
    return err * torch.add(one, target, alpha=(float(foreground_weight) - 1.0) / float(peak))


def masked_mean(values: torch.Tensor, valid: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Mean of per-pixel ``values`` ``(B, N, *size)`` over valid channels only (0 if none)."""
    per_channel = values.mean(dim=tuple(range(-spatial_dims, 0)))
    w = valid.to(per_channel.dtype)
    return (per_channel * w).sum() / w.sum().clamp_min(1.0)
