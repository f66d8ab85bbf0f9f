"""The peer toolkit in the benchmark: ``landmarker``'s spatial configuration network on our split and grid.

The peer runs in its own virtual environment (``make peer-env`` -> ``.venv-peer``; its CPU ``torch==2.13.0``
is ours, its packages are not) through ``scripts/peer_landmarker.py``. This module is our side of that
exchange:

1. :func:`export_for_peer` resamples each image of ``train``/``val``/``test`` onto the same network grid our
   methods see (:func:`lmlib.data.grids.preprocess`, no intensity normalisation: the peer scales its own) and
   writes arrays in the peer's convention, image ``(1, H, W)`` and landmarks pixel ``(y, x)``;
2. :func:`run_peer` trains the peer for a wall-clock budget, then maps its test predictions from grid pixels
   back to world mm through each image's grid and scores them against the same reference as our methods;
3. :func:`peer_ratios` sets our run chosen on validation beside it: MRE ratio (with a paired bootstrap CI over test images),
   training-time and inference-time ratios.

Inference time of the peer = its network + decoding per image (measured in its process) + our resampling
of that image onto the grid (measured here), as our methods' inference time includes resampling.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lmlib.data.datasets import Dataset
from lmlib.data.grids import KEEP_ASPECT, Grid, network_orientation, preprocess
from lmlib.evaluation.metrics import radial_errors
from lmlib.evaluation.statistics import resample_indices

PEER_ENV = ".venv-peer"
PEER_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "peer_landmarker.py"
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass
class ExportedSplit:
    """One split as handed to the peer: image ids, each image's network grid, seconds spent resampling."""

    image_ids: list[str]
    grids: list[Grid]
    truth_mm: np.ndarray  # (N, C, 2) world mm (x, y), NaN where masked
    resample_seconds: float


@dataclass
class PeerRun:
    """A finished peer run: per-image, per-landmark test errors (mm) and what its process reported."""

    errors: pd.DataFrame  # images x landmarks, mm (NaN where the reference is masked)
    result: dict[str, Any]
    curve: pd.DataFrame

    @property
    def mre_mm(self) -> float:
        return float(np.nanmean(self.errors.to_numpy()))


def peer_python(env: str | Path = PEER_ENV) -> Path | None:
    """The peer environment's interpreter, or None when the environment has not been made."""
    exe = Path(env) / "bin" / "python"
    return exe if exe.exists() else None


def peer_environment() -> dict[str, str]:
    """Our process environment for the peer's, less what belongs to ours: a notebook kernel's inline
    matplotlib backend (absent from the peer's packages), our venv and Python paths. The malloc settings
    and thread counts stay, so both toolkits run under the same machine settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["MPLBACKEND"] = "Agg"
    return env


def export_for_peer(data: Dataset, image_size: Sequence[int], folder: str | Path,
                    splits: Sequence[str] = SPLITS, keep_aspect: bool = KEEP_ASPECT) -> dict[str, ExportedSplit]:
    """Write ``<split>_images.npy`` (N, 1, H, W) and ``<split>_landmarks.npy`` (N, C, 2) pixel ``(y, x)``
    (NaN where masked) and ``<split>_spacing.npy`` (N, 2) mm per pixel ``(y, x)`` for a 2D dataset, each image
    on its network grid of ``image_size`` px ``(x, y)`` (the grid our methods use: ``keep_aspect`` as theirs)."""
    if data.spec.ndim != 2:
        raise ValueError(f"the landmarker peer is run on 2D data; {data.spec.name} is {data.spec.ndim}D")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    exported = {}
    for split in splits:
        samples = data.split(split)
        if not samples:
            raise ValueError(f"{data.spec.name}: split {split!r} is empty; the peer needs train, val and test")
        images, landmarks, grids, truth = [], [], [], []
        start = time.perf_counter()
        for s in samples:
            # in network orientation, as our methods see it: a file stored mirrored is not a mirror image to the peer
            p = preprocess(network_orientation(s), target_size=image_size, normalize=None, keep_aspect=keep_aspect)
            grid = Grid.of_image(p)
            images.append(p.image.T[None].astype(np.float32))  # (x, y) -> (1, H=y, W=x)
            landmarks.append(grid.world_to_index(p.landmarks_mm)[:, ::-1])  # (x, y) -> (y, x); NaN stays NaN
            grids.append(grid)
            truth.append(s.landmarks_mm)
        seconds = time.perf_counter() - start
        np.save(folder / f"{split}_images.npy", np.stack(images))
        np.save(folder / f"{split}_landmarks.npy", np.stack(landmarks).astype(np.float32))
        np.save(folder / f"{split}_spacing.npy", np.stack([g.spacing[::-1] for g in grids]))  # (y, x) mm/px
        exported[split] = ExportedSplit([s.image_id for s in samples], grids, np.stack(truth), seconds)
    return exported


def predictions_to_mm(pred_yx: np.ndarray, grids: Sequence[Grid]) -> np.ndarray:
    """(N, C, 2) grid pixels ``(y, x)`` -> (N, C, 2) world mm ``(x, y)``, image by image."""
    pred_yx = np.asarray(pred_yx, dtype=np.float64)
    if pred_yx.shape[0] != len(grids) or pred_yx.shape[-1] != 2:
        raise ValueError(f"peer predictions {pred_yx.shape} do not match {len(grids)} test images in 2D")
    return np.stack([g.index_to_world(p[:, ::-1]) for p, g in zip(pred_yx, grids)])


def run_peer(data: Dataset, output_dir: str | Path, budget_s: float, image_size: Sequence[int],
             python: str | Path | None = None, seed: int = 0, extra_args: Sequence[str] = ()) -> PeerRun:
    """Train the peer for ``budget_s`` wall seconds on ``data``'s train split (best epoch on val), predict
    test, and write ``peer_predictions.csv``, ``peer_val_curve.csv`` and ``peer_result.json`` into
    ``output_dir`` (all three or none). ``python``: the peer environment's interpreter (default
    ``.venv-peer/bin/python``)."""
    exe = Path(python) if python else peer_python()
    if exe is None or not Path(exe).exists():
        raise FileNotFoundError(f"no peer environment at {python or PEER_ENV}: make it with `make peer-env`")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="peer-", dir=out) as tmp:
        inputs, results = Path(tmp) / "data", Path(tmp) / "out"
        exported = export_for_peer(data, image_size, inputs)
        cmd = [str(exe), str(PEER_SCRIPT), "--data", str(inputs), "--out", str(results),
               "--budget-s", str(budget_s), "--seed", str(seed), *map(str, extra_args)]
        print("peer:", " ".join(cmd[1:]), flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=peer_environment())
        tail: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:  # stream the peer's epochs into the notebook
            if line.startswith("epoch "):
                sys.stdout.write(line)
            tail = (tail + [line])[-30:]
        if proc.wait() != 0:
            raise RuntimeError(f"the peer failed (exit {proc.returncode}):\n{''.join(tail)}")
        test = exported["test"]
        pred_mm = predictions_to_mm(np.load(results / "test_predictions.npy"), test.grids)
        result = json.loads((results / "result.json").read_text())
        curve = pd.read_csv(results / "val_curve.csv")
        errors = np.stack([radial_errors(p, t) for p, t in zip(pred_mm, test.truth_mm)])
        names = list(data.landmark_names)
        err = pd.DataFrame(errors, index=pd.Index(test.image_ids, name="image_id"), columns=names)
        result["network_seconds_per_image"] = result["infer_seconds_per_image"]
        result["resample_seconds_per_image"] = test.resample_seconds / len(test.image_ids)
        result["infer_seconds_per_image"] = result["network_seconds_per_image"] + result["resample_seconds_per_image"]
        result["mre_mm"] = float(np.nanmean(errors))
        result["image_size"] = [int(v) for v in image_size]
        rows = [{"image_id": i, "landmark": n, "x_mm": pred_mm[a, k, 0], "y_mm": pred_mm[a, k, 1],
                 "error_mm": errors[a, k]} for a, i in enumerate(test.image_ids) for k, n in enumerate(names)]
        staged = Path(tmp) / "staged"
        staged.mkdir()
        pd.DataFrame(rows).to_csv(staged / "peer_predictions.csv", index=False, float_format="%.4f")
        curve.to_csv(staged / "peer_val_curve.csv", index=False)
        (staged / "peer_result.json").write_text(json.dumps(result, indent=2))
        for f in staged.iterdir():
            shutil.move(str(f), out / f.name)
    return PeerRun(err, result, curve)


def load_peer(output_dir: str | Path) -> PeerRun | None:
    """A peer run written by :func:`run_peer` into ``output_dir``, or None if there is none."""
    out = Path(output_dir)
    if not (out / "peer_result.json").exists():
        return None
    pred = pd.read_csv(out / "peer_predictions.csv", dtype={"image_id": str})
    err = pred.pivot(index="image_id", columns="landmark", values="error_mm")
    err = err[list(dict.fromkeys(pred["landmark"]))]
    return PeerRun(err, json.loads((out / "peer_result.json").read_text()), pd.read_csv(out / "peer_val_curve.csv"))


def ratio_ci(ours: pd.DataFrame, peer: pd.DataFrame, n_bootstrap: int = 2000, seed: int = 0,
             confidence: float = 0.95) -> tuple[float, float, float]:
    """MRE(ours) / MRE(peer) with a paired percentile bootstrap CI: both images x landmarks (mm), aligned on
    their common images and landmarks; each resample draws the same images for both."""
    images = ours.index.intersection(peer.index)
    cols = [c for c in ours.columns if c in peer.columns]
    if len(images) == 0 or not cols:
        raise ValueError("our run and the peer share no test image or landmark")
    a, b = ours.loc[images, cols].to_numpy(float), peer.loc[images, cols].to_numpy(float)
    both = ~np.isnan(a) & ~np.isnan(b)
    sa, sb, n = np.where(both, a, 0).sum(1), np.where(both, b, 0).sum(1), both.sum(1)
    idx = resample_indices(len(images), n_bootstrap, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (sa[idx].sum(1) / n[idx].sum(1)) / (sb[idx].sum(1) / n[idx].sum(1))
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.nanquantile(boot, [alpha, 1.0 - alpha])
    return float(sa.sum() / sb.sum()), float(lo), float(hi)


def our_candidates(runs: pd.DataFrame, device: str = "cpu") -> pd.DataFrame:
    """Our runs on ``device`` that a user would run: a method's own output, not the extra rows of one of its
    heads (``htc/half_head`` when ``htc`` is a row); a cascade's stage rows stay (its last stage is its output).
    Trained runs only: the peer's budget is our training time, and the registration baseline trains nothing
    (on synthetic2d it was the best row and gave the peer a 0-second budget); rows derived from finished runs
    without training (an ensemble, test-time scales: 0 epochs) are not one training either. A refit on train+val
    (``refit``) is left out: the peer trains on train only. Sorted by the validation MRE each run was selected on
    (``val_mre_mm``), never by test: the first is "ours"; a run without one cannot be chosen."""
    if runs.empty:  # no finished run (perhaps no columns either): no candidate
        return runs
    refit = runs["refit"].astype(bool) if "refit" in runs else pd.Series(False, index=runs.index)
    runs = runs[~refit]
    mine = runs[(runs["device"] == device) & (runs["train_s"] > 0) & (runs["epochs"] > 0)
                & np.isfinite(runs["val_mre_mm"].astype(float))]
    keep = [m for m in mine.index if "/" not in str(m) or str(m).split("/")[0] not in mine.index]
    return mine.loc[keep].sort_values(["val_mre_mm", "mre_mm"], kind="stable")


def peer_ratios(runs: pd.DataFrame, errors: Mapping[str, pd.DataFrame], peer: PeerRun,
                device: str = "cpu") -> pd.DataFrame:
    """Our run on ``device`` chosen on validation (the first of :func:`our_candidates` of ``runs``,
    :func:`lmlib.reporting.benchmark.runs_summary`) against the peer: MRE ratio with its paired bootstrap CI,
    training-time and inference-time ratios (ours /
    peer; below 1 is better for us), and the issue's goals (MRE ratio <= 0.6, inference <= 0.2 s per 2D image)."""
    mine = our_candidates(runs, device)
    if mine.empty:
        raise ValueError(f"no finished run of ours on {device} to set beside the peer")
    best = str(mine.index[0])
    row = mine.loc[best]
    ratio, lo, hi = ratio_ci(errors[best], peer.errors)
    p = peer.result
    table = pd.DataFrame([
        {"quantity": "MRE (mm)", "ours": row["mre_mm"], "peer": peer.mre_mm, "ratio": ratio, "ratio_ci_low": lo,
         "ratio_ci_high": hi, "goal": "ratio <= 0.6", "met": bool(ratio <= 0.6)},
        {"quantity": "training time (s)", "ours": row["train_s"], "peer": p["train_seconds"],
         "ratio": row["train_s"] / p["train_seconds"], "goal": "equal budget", "met": None},
        {"quantity": "inference (s/image)", "ours": row["infer_s_per_image"], "peer": p["infer_seconds_per_image"],
         "ratio": row["infer_s_per_image"] / p["infer_seconds_per_image"], "goal": "ours <= 0.2 s",
         "met": bool(row["infer_s_per_image"] <= 0.2)},
    ]).set_index("quantity")
    table.attrs["ours"] = best
    return table


def fig_peer(runs: pd.DataFrame, peer: PeerRun, device: str = "cpu") -> Figure:
    """Left: test MRE against training time, our runs on ``device`` and the peer. Right: the peer's
    validation MRE over its training time (the epoch kept is the best one)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    mine = runs[runs["device"] == device]
    a.scatter(mine["train_s"] / 60, mine["mre_mm"], color="tab:blue", label="ours")
    for name, row in mine.iterrows():
        a.annotate(str(name), (row["train_s"] / 60, row["mre_mm"]), fontsize=7, xytext=(3, 3),
                   textcoords="offset points")
    a.scatter([peer.result["train_seconds"] / 60], [peer.mre_mm], color="tab:red", marker="s",
              label="landmarker SCN")
    a.set_xlabel("training time (min)")
    a.set_ylabel("test MRE (mm)")
    a.legend(fontsize=8)
    b.plot(peer.curve["seconds"] / 60, peer.curve["val_mre_mm"], color="tab:red")
    b.set_xlabel("peer training time (min)")
    b.set_ylabel("validation MRE (mm)")
    b.set_yscale("log")
    fig.tight_layout()
    plt.close(fig)
    return fig
