"""Where training time goes, and how far it is from the machine's limit (the benchmark notebook's speed section).

For each method, a few training steps are timed in three parts: data (loading, resampling, augmentation:
the loader's next batch), forward (network + loss) and backward (gradients + optimizer step). The
floating-point work of one forward+backward is counted by PyTorch's ``FlopCounterMode`` (matmuls and
convolutions); divided by the measured forward+backward time it gives the achieved rate, compared with this
machine's peak measured in the same process: a large fp32 matmul, and a large 3x3 convolution (on some CPUs
oneDNN's convolution outruns the BLAS matmul by far: the committed benchmarks' ``table_peak.csv``), the larger of
the two being the reference. Cascades are profiled on
their first stage (global / coarse), which sees whole images. Timings are medians over the timed steps, after
one warm-up step.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from lmlib.data.datasets import Dataset
from lmlib.data.loaders import LandmarkDataModule, ViewSpec
from lmlib.data.refit import is_refit
from lmlib.engine.parameters import shared_value
from lmlib.engine.runner import DEFAULT_GRID, augmentation, engine_settings
from lmlib.engine.training import LandmarkModule, compile_for_training
from lmlib.methods.base import LandmarkMethod, UNetParameters, method_class
from lmlib.methods.stages import is_cascade
from lmlib.reporting.peer import PEER_ENV

#: timed repetitions of each peak measurement, after as many untimed ones: with five, the convolution's best rate on
#: a 2-core CPU moved widely between runs (oneDNN and the clock still warming up), and every method's share of the
#: peak with it
PEAK_REPEATS = 20


def _best_seconds(op: Callable[[], object], repeats: int) -> float:
    """The shortest of ``repeats`` timed calls of ``op``, after ``repeats`` untimed ones."""
    for _ in range(repeats):
        op()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        op()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak_gflops(n: int = 2048, repeats: int = PEAK_REPEATS, dtype: torch.dtype = torch.float32) -> float:
    """This process's best rate (GFLOP/s) on an ``n x n`` matmul: the practical peak of the CPU (or device)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2.0 * n ** 3 / _best_seconds(lambda: a @ b, repeats) / 1e9


def conv_peak_gflops(channels: int = 256, size: int = 64, repeats: int = PEAK_REPEATS) -> float:
    """This process's best rate (GFLOP/s) on a large 3x3 fp32 convolution (oneDNN's kernels, which on some CPUs
    outrun the BLAS matmul: the committed benchmarks' ``table_peak.csv``)."""
    x = torch.randn(4, channels, size, size)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    with torch.no_grad():
        best = _best_seconds(lambda: conv(x), repeats)
    return 2.0 * 4 * channels * channels * 9 * size * size / best / 1e9


def _first_stage(name: str, params: Mapping[str, Any], data: Dataset, grid: Sequence[int]) -> tuple[Any, ViewSpec, int]:
    """The method, view and batch size a training step of ``name`` uses (a cascade: its first stage)."""
    cls = method_class(name)
    shared = engine_settings(params, data)
    ndim, n = data.spec.ndim, len(data.landmark_names)
    if is_cascade(cls):
        stage = cls.build_stages(ndim, n, params, list(grid), shared)[0]
        return stage.method, stage.view, int(stage.batch_size)
    return cls.from_parameters(ndim, n, params, **shared), ViewSpec(kind="whole", size=tuple(grid)), \
        int(shared_value(params, "batch_size"))


Step = Callable[[dict[str, Any]], tuple[float, float]]


def _training_step(name: str, params: Mapping[str, Any], data: Dataset, contiguous: bool = False, bf16: bool = False,
                   seed: int = 0, pytorch_layers: bool = False
                   ) -> tuple[LandmarkModule, Step, Callable[[], dict[str, Any]], int, str]:
    """One training step of method ``name`` as :func:`profile_training` times it: the module, ``step(batch)`` (returns
    its forward and backward seconds), ``next_batch()`` (the train loader, cycled), the batch size and the grid label
    (px, ``x``-joined). ``contiguous`` (a U-Net): as it trained before channels-last networks; ``pytorch_layers`` (a
    U-Net): channels-last with PyTorch's group-norm and PReLU backward (``build_network(cpu_layers=False)``)."""
    torch.manual_seed(seed)
    grid = [int(v) for v in params.get("image_size") or DEFAULT_GRID[data.spec.ndim]]
    method, view, batch_size = _first_stage(name, params, data, grid)
    dm = LandmarkDataModule(data.samples, view=view, batch_size=batch_size, seed=seed,
                            augmentation=augmentation(params, data.spec.ndim, seed, data.spec.pair_indices()))
    dm.setup()
    if contiguous or pytorch_layers:
        if type(method).build_network is not LandmarkMethod.build_network:
            raise ValueError(f"{name} builds its own network: it has no switch of layout or layers")
        method.network = {**method.network, "cpu_layers": False, **({"channels_last": False} if contiguous else {})}
    module = LandmarkModule.from_method(method, data.landmark_names, view, view, max_epochs=100).train()
    opt = torch.optim.Adam(module.parameters(), lr=1e-4)
    loader = iter(dm.train_dataloader())
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

    def step(batch: dict[str, Any]) -> tuple[float, float]:
        t0 = time.perf_counter()
        with cast:
            loss, _ = module.training_loss(module(batch), batch, 0)
        t1 = time.perf_counter()
        loss.float().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return t1 - t0, time.perf_counter() - t1

    def next_batch() -> dict[str, Any]:
        nonlocal loader
        try:
            return next(loader)
        except StopIteration:
            loader = iter(dm.train_dataloader())
            return next(loader)

    return module, step, next_batch, batch_size, "x".join(map(str, view.size or grid))


def profile_training(name: str, params: Mapping[str, Any], data: Dataset, n_steps: int = 5,
                     contiguous: bool = False, bf16: bool = False, seed: int = 0,
                     torch_compile: bool = False, compile_loss: bool = True, pytorch_layers: bool = False
                     ) -> dict[str, Any]:
    """Time ``n_steps`` training steps of method ``name`` (notebook ``params``) on ``data``'s train split:
    seconds per step for data, forward and backward, images per second, GFLOP per step and the achieved
    GFLOP/s of forward+backward. ``contiguous``: a U-Net built in the contiguous memory format with instance norms
    (``build_network(channels_last=False)``, how it trained before; the network code of other methods has no such
    switch); ``pytorch_layers``: a U-Net with PyTorch's own group-norm and PReLU backward
    (:mod:`lmlib.methods.cpu_layers`);
    ``bf16``: under bf16 autocast;
    ``torch_compile``: with the network (and, ``compile_loss``, the loss) compiled as training compiles them (the
    GFLOP are counted on the eager step, the compilation step is not timed)."""
    from torch.utils.flop_counter import FlopCounterMode

    module, step, next_batch, batch_size, grid = _training_step(name, params, data, contiguous, bf16, seed,
                                                                pytorch_layers)
    batch = next_batch()
    with FlopCounterMode(display=False) as counter:  # eager, and the warm-up of allocators and kernels
        step(batch)
    if torch_compile:
        compile_for_training(module, loss=compile_loss)
        step(batch)  # the compilation
    times = []
    for _ in range(n_steps):
        t = time.perf_counter()
        batch = next_batch()
        data_s = time.perf_counter() - t
        times.append((data_s, *step(batch)))
    data_s, fwd, bwd = (float(np.median(v)) for v in zip(*times))
    flops = float(counter.get_total_flops())
    return {"method": name, "batch": batch_size, "grid": grid,
            "data_s": data_s, "forward_s": fwd, "backward_s": bwd, "step_s": data_s + fwd + bwd,
            "images_per_s": batch_size / (data_s + fwd + bwd), "gflop_per_step": flops / 1e9,
            "achieved_gflops": flops / 1e9 / (fwd + bwd)}


def _conv_gflop(x: Sequence[int], w: Sequence[int], transposed: bool, stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int]) -> float:
    """GFLOP of one convolution's forward (multiply and add counted apart, as ``FlopCounterMode`` counts): input
    ``x`` (B, C, *spatial), weight ``w`` in PyTorch's layout ((out, in/groups, *k); transposed (in, out/groups, *k):
    its size is the work per position whatever the groups). Not ``torch.utils.flop_counter.conv_flop_count``: it
    needs the output's shape, which the profiler records for a backward call but not for a forward one; the output
    positions follow from stride, padding and dilation instead (the sum is tested against ``FlopCounterMode``)."""
    k = w[2:]
    if transposed:  # every input pixel meets the whole kernel
        positions = int(np.prod(x[2:]))
    else:
        positions = int(np.prod([(n + 2 * p - d * (kk - 1) - 1) // s + 1
                                 for n, kk, s, p, d in zip(x[2:], k, stride, padding, dilation)]))
    return 2.0 * x[0] * positions * int(np.prod(w)) / 1e9


def profile_layers(name: str, params: Mapping[str, Any], data: Dataset, n_steps: int = 3, torch_compile: bool = False,
                   peak_gflops: float | None = None, top: int = 8, seed: int = 0) -> pd.DataFrame:
    """Where the training step of method ``name`` spends its time, per convolution: PyTorch's profiler over
    ``n_steps`` steps of full batches (compiled as training compiles them when ``torch_compile``), its convolution
    calls grouped by layer. One row per layer shape (``layer``: kernel, ``transposed`` for an up-sampling
    convolution, input -> output channels, and the grid in px, (x, y[, z]) as the network's tensors hold it,
    input -> output where they differ; ``per_step``: how many layers of that shape), the ``top`` by time: forward
    and backward milliseconds per step, GFLOP per step (forward and backward; a layer whose input needs no gradient
    computes the weight's only), the achieved GFLOP/s and its share of ``peak_gflops`` (when given), and its share
    of the step (%). Then ``other convolutions`` (when any is left) and ``rest of the step`` (norms, activations,
    loss, optimizer and the profiler's own cost; the step is forward, backward and optimizer on batches loaded
    before it: the data's share is :func:`profile_training`'s)."""
    from torch.profiler import ProfilerActivity, profile

    # kineto, the profiler's backend, prints "profiler_start/stop" lines to stderr at its default log level, which
    # would land in the executed notebook; 6 silences them (read at the first profile of a process; a level the
    # user set is kept)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    module, step, next_batch, batch_size, _ = _training_step(name, params, data, seed=seed)
    step(next_batch())
    if torch_compile:
        compile_for_training(module)
        step(next_batch())  # the compilation
    batches: list[dict[str, Any]] = []
    while len(batches) < n_steps:  # full batches only: a short last one would be another shape (and graph)
        batch = next_batch()
        if len(batch["image"]) == batch_size:
            batches.append(batch)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t = time.perf_counter()
        for batch in batches:
            step(batch)
        step_ms = (time.perf_counter() - t) * 1e3 / n_steps
    events = prof.events()
    if torch_compile and not any(e.name.startswith("Torch-Compiled Region") for e in events):
        raise RuntimeError(f"{name}: the profiled steps did not run compiled (torch.compile fell back to eager)")
    layers: dict[tuple[Any, ...], dict[str, Any]] = {}
    for event in events:
        if event.name not in ("aten::convolution", "aten::convolution_backward"):
            continue
        shapes, args = event.input_shapes, event.concrete_inputs
        if event.name == "aten::convolution":  # (x, w, bias, stride, padding, dilation, transposed, out_pad, groups)
            x, w, out = shapes[0], shapes[1], None
            transposed, stride, padding, dilation, groups = bool(args[6]), args[3], args[4], args[5], args[8]
            passes, kind = 1, "forward"
        else:  # (grad_out, x, w, bias_sizes, stride, padding, dilation, transposed, out_pad, groups, output_mask)
            out, x, w = shapes[0], shapes[1], shapes[2]
            transposed, stride, padding, dilation, groups = bool(args[7]), args[4], args[5], args[6], args[9]
            passes, kind = int(args[10][0]) + int(args[10][1]), "backward"
        key = (tuple(x), tuple(w), transposed, tuple(stride), tuple(padding), tuple(dilation), int(groups))
        row = layers.setdefault(key, {"forward": 0, "backward": 0, "forward_ms": 0.0, "backward_ms": 0.0,
                                      "gflop": 0.0, "out": None})
        row[kind] += 1
        row[f"{kind}_ms"] += event.cpu_time_total / 1e3 / n_steps
        row["gflop"] += passes * _conv_gflop(x, w, transposed, stride, padding, dilation) / n_steps
        if out is not None:
            row["out"] = tuple(out)
    if not layers:
        raise ValueError(f"{name}: no convolution in its training step (profile_layers splits a step by convolution)")
    rows: list[dict[str, Any]] = []
    for (x, w, transposed, *_, groups), row in layers.items():
        c_out = w[1] * groups if transposed else w[0]
        size_in, size_out = ("x".join(map(str, shape[2:])) if shape else "?" for shape in (x, row["out"]))
        grids = size_out if size_in == size_out else f"{size_in} -> {size_out}"
        label = f"{'x'.join(map(str, w[2:]))}{' transposed' if transposed else ''}, {x[1]} -> {c_out} ch, {grids}"
        seen = sum(r["layer"].split(" #")[0] == label for r in rows)  # same shapes, another padding or dilation
        rows.append({"layer": f"{label} #{seen + 1}" if seen else label,
                     "per_step": max(row["forward"], row["backward"]) / n_steps, "forward_ms": row["forward_ms"],
                     "backward_ms": row["backward_ms"], "gflop": row["gflop"]})
    table = pd.DataFrame(rows)
    table["ms"] = table["forward_ms"] + table["backward_ms"]
    table = table.sort_values("ms", ascending=False)
    head, tail = table.iloc[:top], table.iloc[top:]
    other = [{"layer": "other convolutions", "per_step": tail["per_step"].sum(),
              **{c: tail[c].sum() for c in ("forward_ms", "backward_ms", "gflop", "ms")}}] if len(tail) else []
    rest = {"layer": "rest of the step", "ms": step_ms - table["ms"].sum()}
    table = pd.concat([head, pd.DataFrame([*other, rest])], ignore_index=True).set_index("layer")
    table["achieved_gflops"] = table["gflop"] / table["ms"] * 1e3
    if peak_gflops:
        table["pct_of_peak"] = 100.0 * table["achieved_gflops"] / peak_gflops
    table["pct_of_step"] = 100.0 * table["ms"] / step_ms
    return table.drop(columns="ms")


def _is_unet(name: str) -> bool:
    """A U-Net method (:class:`~lmlib.methods.base.UNetParameters`): its network from ``build_network``."""
    return issubclass(method_class(name).Parameters, UNetParameters)


def _fastest(timings: Mapping[str, Callable[[], dict[str, Any]]], rounds: int) -> dict[str, dict[str, Any]]:
    """Each timing (key -> a call of :func:`profile_training`) run ``rounds`` times, interleaved (every timing once,
    then again), keeping each one's fastest step: a slow spell of a shared machine then spoils a round of a
    timing, not the timing."""
    best: dict[str, dict[str, Any]] = {}
    for _ in range(max(1, int(rounds))):
        for key, time_it in timings.items():
            row = time_it()
            if key not in best or row["step_s"] < best[key]["step_s"]:
                best[key] = row
    return best


def profile_methods(methods: Mapping[str, Mapping[str, Any]], data: Dataset, n_steps: int = 5,
                    peak_gflops: float | None = None, compiled: bool = False, rounds: int = 1) -> pd.DataFrame:
    """:func:`profile_training` for each method (name -> its parameters); ``pct_of_peak``: the achieved rate
    as a share of ``peak_gflops`` (default: the larger of the matmul and convolution peaks, measured now).
    ``compiled``: also the same step under ``torch_compile`` (before/after per method): ``compiled_step_s``,
    ``compiled_pct_of_peak`` and ``compile_speedup``. For the U-Nets also their step as it trained before
    channels-last networks and a compiled loss (``profile_training(contiguous=True)``, compiled with the loss eager):
    ``before_step_s`` (and ``before_compiled_step_s``); NaN for the other methods. ``rounds``: every step timed
    that many times, interleaved, the fastest kept (:func:`_fastest`)."""
    peak = peak_gflops or max(matmul_peak_gflops(), conv_peak_gflops())
    unets = [name for name in methods if _is_unet(name)]
    timings: dict[str, Callable[[], dict[str, Any]]] = {}
    for name, params in methods.items():
        timings[f"{name}|as is"] = partial(profile_training, name, params, data, n_steps)
        if name in unets:
            timings[f"{name}|before"] = partial(profile_training, name, params, data, n_steps, contiguous=True)
        if compiled:
            timings[f"{name}|compiled"] = partial(profile_training, name, params, data, n_steps, torch_compile=True)
            if name in unets:
                timings[f"{name}|before compiled"] = partial(profile_training, name, params, data, n_steps,
                                                             contiguous=True, torch_compile=True, compile_loss=False)
    best = _fastest(timings, rounds)

    def step_s(kind: str) -> pd.Series:
        return pd.Series({n: best[f"{n}|{kind}"]["step_s"] for n in methods if f"{n}|{kind}" in best}, dtype=float)

    table = pd.DataFrame([best[f"{name}|as is"] for name in methods]).set_index("method")
    table["pct_of_peak"] = 100.0 * table["achieved_gflops"] / peak
    table["before_step_s"] = step_s("before")
    if compiled:
        after = pd.DataFrame([best[f"{name}|compiled"] for name in methods]).set_index("method")
        table["compiled_step_s"] = after["step_s"]
        table["compiled_pct_of_peak"] = 100.0 * after["achieved_gflops"] / peak
        table["compile_speedup"] = table["step_s"] / after["step_s"]
        table["before_compiled_step_s"] = step_s("before compiled")
    return table


def time_local_inference(params: Mapping[str, Any], data: Dataset, n_images: int = 4, rounds: int = 3
                         ) -> dict[str, Any] | None:
    """One per-landmark local stage at inference, per image (the global-to-local FCNN's local stage and every
    refinement's; ``params``: the FCNN's notebook parameters): the patches (resampling, ``data_s``) and the local
    nets on them, one by one as they train (``nets_one_by_one_s``) and grouped into one network as they predict
    (``nets_grouped_s``, :meth:`~lmlib.methods.global_local.LocalFCNN.grouped`). Patches of
    ``local_max_patch_px`` px at ``local_spacing_mm`` centred on the ground truth of the first ``n_images`` val
    images (the train split's when there are none); untrained nets of the parameters' widths (the time does not
    depend on the weights). None for one shared local net (nothing to group). The nets' times: medians over the
    images of the fastest of ``rounds`` calls each (after as many untimed ones); the patches' time: one pass per
    image (its first, as a prediction makes it), of which ``prepare_s`` is the image's preparation (normalised
    source), which a cascade's later patch stages share with its first (:class:`~lmlib.data.loaders.PatchSources`)."""
    from lmlib.data.loaders import LandmarkDataset, collate_landmarks
    from lmlib.methods.global_local import GlobalLocalFCNN
    from lmlib.methods.networks import PerLandmark

    name = "global_local"
    shared = engine_settings(params, data)
    ndim, n = data.spec.ndim, len(data.landmark_names)
    local = GlobalLocalFCNN.from_parameters(ndim, n, params, "local", **shared)
    values = GlobalLocalFCNN.values(params)
    px, spacing = int(values["local_max_patch_px"]), float(values["local_spacing_mm"])
    view = ViewSpec("patch", size=(px,) * ndim, spacing=spacing, per_landmark=True)
    torch.manual_seed(0)
    grouped = local.build_network().eval()
    if not isinstance(grouped, PerLandmark):
        print(f"{name}: one shared local net (local_net={values['local_net']!r}), nothing grouped: no local-stage row")
        return None
    one_by_one = PerLandmark(list(grouped.nets)).eval()
    samples = (data.split("val") or data.split("train"))[:n_images]
    rows = []
    for sample in samples:
        t0 = time.perf_counter()
        ds = LandmarkDataset([sample], view=view, cache=True)
        prepare_s = time.perf_counter() - t0
        batch = collate_landmarks([ds[k] for k in range(len(ds))])
        data_s = time.perf_counter() - t0
        with torch.no_grad():  # the first grouped call makes the grouped copy: among the untimed ones
            nets = {key: _best_seconds(partial(net, batch["image"], batch["landmark_ids"]), rounds)
                    for key, net in (("one_by_one", one_by_one), ("grouped", grouped))}
        rows.append({"data_s": data_s, "prepare_s": prepare_s, "nets_one_by_one_s": nets["one_by_one"],
                     "nets_grouped_s": nets["grouped"]})
    med = pd.DataFrame(rows).median()
    return {"method": name, "landmarks": n, "patch_px": px, "spacing_mm": spacing, "images": len(rows),
            **med.to_dict(), "nets_speedup": float(med["nets_one_by_one_s"] / med["nets_grouped_s"]),
            "stage_s_one_by_one": float(med["data_s"] + med["nets_one_by_one_s"]),
            "stage_s_grouped": float(med["data_s"] + med["nets_grouped_s"])}


#: the variant of a U-Net's step as it trained before channels-last networks (lmlib.methods.networks)
CONTIGUOUS_VARIANT = "contiguous, instance norm (before)"
#: the variant of a U-Net's step with PyTorch's group-norm and PReLU backward kernels (lmlib.methods.cpu_layers)
PYTORCH_LAYERS_VARIANT = "PyTorch norm/PReLU backward (before)"
#: the full-resolution head width timed as a variant (lmlib.methods.networks: oneDNN's channel block on AVX-512)
HEAD_VARIANT = 16


def compare_variants(name: str, params: Mapping[str, Any], data: Dataset, n_steps: int = 5,
                     compiled: bool = False, rounds: int = 1) -> pd.DataFrame:
    """The same training step as is, under bf16 autocast and, for a U-Net method
    (:class:`~lmlib.methods.base.UNetParameters`), in the contiguous memory format with instance norms as it trained
    before (``profile_training(contiguous=True)``), with PyTorch's group-norm and PReLU backward
    (``profile_training(pytorch_layers=True)``) and, if its ``head_channels`` is 0, with a 16-channel
    full-resolution head (``compiled``: also compiled by ``torch.compile``, in fp32, under bf16, with the head, and
    before: contiguous with the loss eager): seconds per step and the speed-up over as-is. ``rounds``: every
    variant timed that many times, interleaved, the fastest kept (:func:`_fastest`)."""
    head = {**params, "head_channels": HEAD_VARIANT}
    unet = _is_unet(name)
    with_head = unet and not params.get("head_channels")
    as_is = partial(profile_training, name, params, data, n_steps)
    timings: dict[str, Callable[[], dict[str, Any]]] = {"as is (fp32)": as_is}
    if unet:
        timings[CONTIGUOUS_VARIANT] = partial(as_is, contiguous=True)
        timings[PYTORCH_LAYERS_VARIANT] = partial(as_is, pytorch_layers=True)
    timings["bf16 autocast"] = partial(as_is, bf16=True)
    if with_head:
        timings[f"head_channels {HEAD_VARIANT}"] = partial(profile_training, name, head, data, n_steps)
    if compiled:
        timings["torch.compile"] = partial(as_is, torch_compile=True)
        if unet:
            timings[f"torch.compile, {CONTIGUOUS_VARIANT}, eager loss"] = partial(
                as_is, contiguous=True, torch_compile=True, compile_loss=False)
        timings["torch.compile + bf16"] = partial(as_is, bf16=True, torch_compile=True)
        if with_head:
            timings[f"torch.compile + head_channels {HEAD_VARIANT}"] = partial(
                profile_training, name, head, data, n_steps, torch_compile=True)
    rows = _fastest(timings, rounds)
    table = pd.DataFrame(rows).T[["forward_s", "backward_s", "step_s", "achieved_gflops"]].astype(float)
    table["speedup"] = table.loc["as is (fp32)", "step_s"] / table["step_s"]
    return table


def fig_step_breakdown(table: pd.DataFrame, peak_gflops: float) -> Figure:
    """Stacked seconds per training step (data, forward, backward) per method, and the achieved GFLOP/s
    against the measured peak."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 0.5 * len(table) + 2.2))
    left = np.zeros(len(table))
    for col, color in (("data_s", "tab:gray"), ("forward_s", "tab:blue"), ("backward_s", "tab:orange")):
        a.barh(table.index, table[col], left=left, color=color, label=col.replace("_s", ""))
        left += table[col].to_numpy()
    a.set_xlabel("seconds per training step")
    a.legend(fontsize=8)
    a.invert_yaxis()
    if "compiled_pct_of_peak" in table:  # before/after torch.compile, side by side
        y = np.arange(len(table))
        b.barh(y - 0.2, table["achieved_gflops"], height=0.4, color="tab:green", label="eager")
        b.barh(y + 0.2, table["compiled_pct_of_peak"] / 100.0 * peak_gflops, height=0.4, color="tab:olive",
               label="torch.compile")
        b.set_yticks(y, table.index)
    else:
        b.barh(table.index, table["achieved_gflops"], color="tab:green")
    b.axvline(peak_gflops, color="k", linestyle="--", label=f"measured peak {peak_gflops:.0f} GFLOP/s")
    b.set_xlabel("achieved GFLOP/s (forward + backward)")
    b.legend(fontsize=8)
    b.invert_yaxis()
    fig.tight_layout()
    plt.close(fig)
    return fig


def runs_summary(results_dir: str, dataset: str, profile: str | None = None) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Per method run of ``results_dir/<dataset>`` (the comparison's runs of one profile): the device it ran on,
    the machine, its CPU model and features (its manifest's ``environment.platform``, ``.cpu`` and ``.cpu_features``,
    empty in manifests written before they were recorded: runs of different sessions may differ in speed by them),
    epochs, training seconds in total and per epoch (a cascade's stage rows: summed over its stages so far),
    inference seconds per image, peak memory (MB), the validation MRE it was selected on (``best_val_mre_mm``; NaN for
    a refit and for rows derived without training), test MRE (mm), the input grid (px, (x, y[, z])) and whether it
    is a refit on train+val; and each run's test errors (images x landmarks, mm)."""
    from lmlib.engine.base_run import run_grid
    from lmlib.reporting.comparison import load_comparison

    comp = load_comparison(results_dir, dataset, profile=profile)
    rows, errors = [], {}
    for m in comp.methods:
        metrics = comp.run_metrics[m]
        if metrics.get("kind") == "reference":
            continue
        epochs = metrics.get("epochs") or np.nan
        size = run_grid(Path(results_dir) / dataset / m)  # a refinement's: its base run's (its stages use patches)
        manifest = comp.manifests.get(m, {})
        env = manifest.get("environment") or {}
        rows.append({"method": m, "device": comp.run_device(m), "machine": env.get("platform", ""),
                     "cpu": env.get("cpu", ""), "cpu_features": env.get("cpu_features", ""), "epochs": epochs,
                     "refit": is_refit(manifest.get("parameters")),
                     "train_s": metrics.get("train_seconds"), "train_s_per_epoch": metrics.get("train_seconds", np.nan) / epochs,
                     "infer_s_per_image": metrics.get("infer_seconds_per_image"), "peak_mb": metrics.get("peak_rss_mb"),
                     "val_mre_mm": float(np.nan if metrics.get("best_val_mre_mm") is None else metrics["best_val_mre_mm"]),
                     "mre_mm": float(np.nanmean(comp.errors[m])),
                     "image_size": "x".join(map(str, size)) if size else ""})
        errors[m] = comp.errors[m].unstack("landmark")
    return pd.DataFrame(rows).set_index("method").sort_values("mre_mm"), errors


def _peer_section(runs: pd.DataFrame, errors: Mapping[str, pd.DataFrame], data: Dataset, out: Path,
                  budget_s: float, python: str, seed: int) -> dict[str, Any]:
    """Train the landmarker peer at the input size of our CPU run chosen on validation
    (:func:`lmlib.reporting.peer.our_candidates`) for its training time (or ``budget_s``), and set the two side by
    side. Returns {} with a printed reason when the peer cannot be run."""
    from lmlib.reporting.peer import our_candidates, peer_ratios, run_peer

    cpu = our_candidates(runs, "cpu")
    if data.spec.ndim != 2 or cpu.empty:
        print("peer: skipped (it is run on 2D data, beside a finished CPU run of ours)")
        return {}
    best = cpu.iloc[0]
    size = [int(v) for v in best["image_size"].split("x")] if best["image_size"] else DEFAULT_GRID[2]
    budget = float(budget_s) if budget_s > 0 else float(best["train_s"])
    if not Path(python).exists():
        print(f"peer: skipped, no peer environment at {python} (make it with `make peer-env`)")
        return {}
    print(f"peer: landmarker SCN for {budget:.0f} s on a {size[0]}x{size[1]} grid, beside {cpu.index[0]}")
    peer = run_peer(data, out, budget, size, python=python, seed=seed)
    ratios = peer_ratios(runs, errors, peer)
    ratios.to_csv(out / "table_peer.csv", float_format="%.4f")
    return {"peer": peer, "ratios": ratios}


def run_benchmark(dataset: str, methods: Mapping[str, Mapping[str, Any]], output_dir: str, results_dir: str = "results",
                  data_dir: str = "", profile: str | None = None, n_steps: int = 5, variants_method: str = "heatmap_unet",
                  seed: int = 0, parameters: Mapping[str, Any] | None = None, n_deformed: int = 30,
                  peer: bool = False, peer_budget_s: float = 0.0, peer_python: str = f"{PEER_ENV}/bin/python",
                  time_compiled: bool = False, timing_rounds: int = 1) -> dict[str, Any]:
    """The benchmark notebook's one call: the machine's matmul peak, every method's training step profiled
    (``methods``: name -> its parameters, e.g. the driver's for a profile), one method's step as is / as
    before channels-last networks / bf16 / with a 16-channel head (:func:`compare_variants`), each U-Net's step
    split by convolution (:func:`profile_layers`), a per-landmark local stage at inference when ``global_local`` is
    timed (:func:`time_local_inference`), and the finished runs of ``results_dir/<dataset>`` (time, memory,
    accuracy). Writes ``table_speed.csv``, ``table_variants.csv``, ``table_layers.csv``,
    ``table_local_inference.csv``, ``table_runs.csv``,
    ``fig_step_breakdown.png`` and ``manifest.json`` into ``output_dir``; returns them for display.
    ``n_deformed``: a single-template dataset's deformations (as the driver's jobs).

    ``peer``: also train the ``landmarker`` SCN (:mod:`lmlib.reporting.peer`, interpreter ``peer_python``) on
    the same split, at the input size of our best CPU run and for its training time (``peer_budget_s`` > 0:
    that many seconds instead), and write ``table_peer.csv`` (ratios) with the peer's predictions.
    ``time_compiled``: also time every step compiled by ``torch.compile`` (``table_speed.csv``'s compiled columns,
    the variants compiled too). ``timing_rounds``: every step timed that many times, interleaved, the fastest
    kept."""
    from lmlib.engine.runner import load_run_data
    from lmlib.outputs.figure_files import save_figure
    from lmlib.outputs.manifest import utc_now, write_manifest
    from lmlib.runtime import print_environment, setup

    started = utc_now()
    print_environment(setup(seed, "cpu"))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_run_data({"dataset": dataset, "data_dir": data_dir, "n_deformed": n_deformed})
    all_samples, data.samples = data.samples, data.split("train")
    matmul, conv = matmul_peak_gflops(), conv_peak_gflops()
    peak = max(matmul, conv)
    speed = profile_methods(methods, data, n_steps, peak, compiled=time_compiled, rounds=timing_rounds)
    variants = compare_variants(variants_method, methods.get(variants_method, {}), data, n_steps,
                                compiled=time_compiled, rounds=timing_rounds)
    unets = [m for m in methods if _is_unet(m)]
    layers = pd.concat({m: profile_layers(m, methods[m], data, torch_compile=time_compiled, peak_gflops=peak, seed=seed)
                        for m in unets}, names=["method"]) if unets else pd.DataFrame()
    local_row = time_local_inference(methods["global_local"], data) if "global_local" in methods else None
    local = pd.DataFrame([local_row]).set_index("method") if local_row else pd.DataFrame()
    try:
        runs, errors = runs_summary(results_dir, dataset, profile if profile and profile != "default" else None)
    except (FileNotFoundError, ValueError) as exc:
        print(f"no finished runs to summarise: {exc}")
        runs, errors = pd.DataFrame(), {}
    speed.to_csv(out / "table_speed.csv", float_format="%.4f")
    variants.to_csv(out / "table_variants.csv", float_format="%.4f")
    if not layers.empty:
        layers.to_csv(out / "table_layers.csv", float_format="%.4f")
    if not local.empty:
        local.to_csv(out / "table_local_inference.csv", float_format="%.4f")
    if not runs.empty:
        runs.to_csv(out / "table_runs.csv", float_format="%.4f")
    fig = fig_step_breakdown(speed, peak)
    save_figure(fig, out / "fig_step_breakdown.png")
    data.samples = all_samples
    peer_part = _peer_section(runs, errors, data, out, peer_budget_s, peer_python, seed) if peer else {}
    write_manifest(out, dict(parameters or {}), samples=data.samples, seed=seed, device="cpu", started=started,
                   extra={"matmul_peak_gflops": matmul, "conv_peak_gflops": conv, "torch_threads": torch.get_num_threads()})
    pd.Series({"matmul_peak_gflops": matmul, "conv_peak_gflops": conv}).to_csv(out / "table_peak.csv", header=["gflops"])
    return {"peak_gflops": peak, "matmul_gflops": matmul, "conv_gflops": conv, "speed": speed, "variants": variants,
            "layers": layers, "local_inference": local, "runs": runs, "figure": fig, **peer_part}


def show_benchmark(result: Mapping[str, Any]) -> None:
    """Display the benchmark (in a notebook)."""
    from IPython.display import Markdown, display

    display(Markdown(f"**Measured peaks** (fp32, {torch.get_num_threads()} threads): matmul {result['matmul_gflops']:.0f}, "
                     f"3x3 convolution {result['conv_gflops']:.0f} GFLOP/s; `pct_of_peak` is against the larger"))
    display(result["speed"].round(3))
    display(result["figure"])
    display(Markdown("**One training step as is, as it trained before channels-last networks, under bf16 autocast "
                     "and, when timed, compiled by torch.compile** (speed-up over as is)"))
    display(result["variants"].round(3))
    if not result["layers"].empty:
        display(Markdown("**Where a U-Net's step goes, per convolution** (forward, backward and optimizer under "
                         "PyTorch's profiler, the data loaded before; compiled when the steps above are; each layer "
                         "shape's forward and backward ms per step, its rate and share of the peak, and its share of "
                         "the step)"))
        display(result["layers"].round(2))
    if not result["local_inference"].empty:
        display(Markdown("**A per-landmark local stage at inference, per image** (the global-to-local FCNN's and every "
                         "refinement's): the patches, and the local nets one by one as they train against grouped "
                         "into one network as they predict (seconds)"))
        display(result["local_inference"].round(4))
    if not result["runs"].empty:
        display(Markdown("**Finished runs** (time per epoch and in total, inference per image, peak memory, test MRE)"))
        display(result["runs"].round(3))
    if "ratios" in result:
        from lmlib.reporting.peer import fig_peer

        p = result["peer"].result
        display(Markdown(f"**Peer: landmarker {p['landmarker_version']} SCN** on the same split and grid, "
                         f"{p['epochs']} epochs in {p['train_seconds']:.0f} s; ours: `{result['ratios'].attrs['ours']}` "
                         "(ratio = ours / peer, below 1 favours ours; MRE ratio with a paired bootstrap 95 % CI)"))
        display(result["ratios"].round(3))
        display(fig_peer(result["runs"], result["peer"]))
