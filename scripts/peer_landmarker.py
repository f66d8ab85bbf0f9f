"""Train and run the peer toolkit's spatial configuration network (``landmarker``) under a time budget.

Runs in the peer's own virtual environment (``make peer-env`` -> ``.venv-peer``), never in ours: it imports
only numpy, torch, MONAI and ``landmarker``. ``lmlib.reporting.peer`` writes its input and reads its output:

    --data DIR   {train,val,test}_images.npy  (N, 1, H, W) float32, the images already on the network grid
                 {train,val,test}_landmarks.npy (N, C, 2) pixel (y, x) on that grid (landmarker's order), NaN
                 where a landmark is masked; val_spacing.npy (N, 2) mm per pixel (y, x) of each val grid
    --out DIR    test_predictions.npy (N, C, 2) pixel (y, x); val_curve.csv (epoch, seconds, loss, val MRE mm);
                 result.json (epochs, train / inference seconds, peak memory, settings, versions)

The recipe is landmarker's documented one for its SCN (``OriginalSpatialConfigurationNet``, adaptive Gaussian
heatmaps with learnable sigmas, ``GaussianHeatmapL2Loss(alpha=5)``, AdamW as in its training configs, its
example's MONAI augmentation, its sub-pixel local soft-argmax decoder); the epoch with the best validation MRE is
kept (selection on ``val``
only). Training stops when the budget (wall seconds, validation included) is spent.
"""
from __future__ import annotations

import argparse
import importlib
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

_SCHEMAS = torch.library.Library("torchvision", "FRAGMENT")  # lives as long as the process


def import_torchvision() -> None:
    """Import torchvision, which landmarker needs for two pure-tensor functions (``pad``, ``resize``).

    PyPI has no CPU build of torchvision: its wheel's compiled ops link against CUDA torch and do not load
    next to the CPU ``torch==2.13.0``, after which torchvision's import stops at registering a fake kernel
    for the (missing) ``torchvision::nms`` operator. Declaring the two operator schemas it registers
    unconditionally lets the import finish; calling a detection op would still raise (landmarker calls
    none), and nothing landmarker computes changes.
    """
    try:
        importlib.import_module("torchvision")
        return
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _SCHEMAS.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _SCHEMAS.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    importlib.import_module("torchvision")


def load_split(data: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.load(data / f"{split}_images.npy")
    landmarks = np.load(data / f"{split}_landmarks.npy")
    if images.ndim != 4 or images.shape[1] != 1 or landmarks.shape[0] != images.shape[0] or landmarks.shape[2] != 2:
        raise ValueError(f"{data}: {split} images {images.shape} / landmarks {landmarks.shape} are not "
                         "(N, 1, H, W) / (N, C, 2)")
    return torch.from_numpy(images.astype(np.float32)), torch.from_numpy(landmarks.astype(np.float32))


def mre_mm(pred: torch.Tensor, truth: torch.Tensor, spacing: torch.Tensor) -> float:
    """Mean radial error (mm) over the landmarks that are not masked; ``spacing`` (N, 2) mm per pixel (y, x)."""
    d = torch.linalg.norm((pred - truth) * spacing[:, None, :], dim=-1)
    return float(d[torch.isfinite(d)].mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-s", type=float, required=True, help="training wall seconds (validation included)")
    ap.add_argument("--max-epochs", type=int, default=100000)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                    help="adamw (lr 1e-4, landmarker's training configs' default); sgd: its getting-started recipe "
                         "(lr 1e-6, Nesterov momentum 0.99), which barely moves within a CPU budget")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--sigma", type=float, default=3.0, help="initial heatmap sigma (px), learnable")
    ap.add_argument("--gamma", type=float, default=100.0, help="heatmap amplitude")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)

    import_torchvision()
    import landmarker
    import monai
    from landmarker.data import LandmarkDataset
    from landmarker.heatmap.decoder import heatmap_to_coord
    from landmarker.heatmap.generator import GaussianHeatmapGenerator
    from landmarker.losses import GaussianHeatmapL2Loss
    from landmarker.models import OriginalSpatialConfigurationNet
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandGaussianNoised,
        RandHistogramShiftd,
        RandScaleIntensityd,
        ScaleIntensityd,
    )
    from torch.utils.data import DataLoader

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    monai.utils.set_determinism(seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    images = {s: load_split(args.data, s) for s in ("train", "val", "test")}
    n_landmarks, size = images["train"][1].shape[1], tuple(images["train"][0].shape[-2:])
    keys = ("image",)
    # landmarker's example augmentation for cephalograms (intensity, then a random affine; landmarks follow)
    train_tf = Compose([ScaleIntensityd(keys), RandGaussianNoised(keys, prob=0.2, mean=0, std=0.1),
                        RandScaleIntensityd(keys, factors=0.25, prob=0.2),
                        RandAdjustContrastd(keys, prob=0.2, gamma=(0.5, 4.5)), RandHistogramShiftd(keys, prob=0.2),
                        ScaleIntensityd(keys),
                        RandAffined(keys, prob=1, rotate_range=(-np.pi / 12, np.pi / 12), translate_range=(-10, 10),
                                    scale_range=(-0.1, 0.1), shear_range=(-0.1, 0.1))])
    infer_tf = Compose([ScaleIntensityd(keys)])
    ds_train = LandmarkDataset(list(images["train"][0]), images["train"][1], transform=train_tf)
    loader = DataLoader(ds_train, batch_size=args.batch_size, shuffle=True, num_workers=0)

    def inference_batches(split: str) -> list[torch.Tensor]:
        return [infer_tf({"image": img})["image"].as_tensor().unsqueeze(0) for img in images[split][0]]

    val_inputs, test_inputs = inference_batches("val"), inference_batches("test")
    val_spacing = torch.from_numpy(np.load(args.data / "val_spacing.npy").astype(np.float32))
    model = OriginalSpatialConfigurationNet(in_channels=1, out_channels=n_landmarks)
    generator = GaussianHeatmapGenerator(n_landmarks, sigmas=args.sigma, gamma=args.gamma, heatmap_size=size,
                                         learnable=True, na_zero=True)
    # landmarker 0.4.1: with learnable sigmas, a masked (NaN) landmark gives a zero heatmap (na_zero) but a NaN
    # gradient for its class's sigma, which then poisons every later heatmap (measured on hamedan-ceph: the first
    # batch with a masked landmark turned the loss NaN for good and the test MRE went to 13 mm). Zeroing those
    # NaN entries keeps every image and every other landmark's gradient.
    generator.sigmas.register_hook(torch.nan_to_num)
    generator.rotation.register_hook(torch.nan_to_num)
    criterion = GaussianHeatmapL2Loss(alpha=5)
    groups = [{"params": model.parameters(), "weight_decay": 1e-3}, {"params": [generator.sigmas], "weight_decay": 0.0},
              {"params": [generator.rotation], "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        lr = args.lr or 1e-6
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.99, nesterov=True)
    else:
        lr = args.lr or 1e-4
        optimizer = torch.optim.AdamW(groups, lr=lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=10, cooldown=10)

    def predict(inputs: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
        model.eval()
        out, start = [], time.perf_counter()
        with torch.no_grad():
            for x in inputs:
                out.append(heatmap_to_coord(model(x), method="local_soft_argmax")[0].float())
        return torch.stack(out), (time.perf_counter() - start) / max(len(inputs), 1)

    curve, best, best_state, epoch = [], float("inf"), None, 0
    start = time.perf_counter()
    while epoch < args.max_epochs and time.perf_counter() - start < args.budget_s:
        model.train()
        total, steps = 0.0, 0
        for batch in loader:
            optimizer.zero_grad()
            heatmaps = generator(batch["landmark"])
            loss = criterion(model(batch["image"]), generator.sigmas, heatmaps)
            loss.backward()
            optimizer.step()
            total, steps = total + float(loss), steps + 1
            if time.perf_counter() - start >= args.budget_s:
                break
        epoch += 1
        val_pred, _ = predict(val_inputs)
        val_mre = mre_mm(val_pred, images["val"][1], val_spacing)
        scheduler.step(val_mre)
        if val_mre < best:
            best, best_state = val_mre, {k: v.detach().clone() for k, v in model.state_dict().items()}
        elapsed = time.perf_counter() - start
        curve.append((epoch, elapsed, total / max(steps, 1), val_mre))
        print(f"epoch {epoch}: {elapsed:.0f} s, loss {total / max(steps, 1):.4g}, val MRE {val_mre:.3f} mm "
              f"(best {best:.3f})", flush=True)
    train_seconds = time.perf_counter() - start
    if best_state is not None:
        model.load_state_dict(best_state)
    test_pred, infer_s = predict(test_inputs)
    np.save(args.out / "test_predictions.npy", test_pred.numpy().astype(np.float64))
    with open(args.out / "val_curve.csv", "w") as f:
        f.write("epoch,seconds,train_loss,val_mre_mm\n")
        f.writelines(f"{e},{s:.2f},{loss:.6g},{m:.4f}\n" for e, s, loss, m in curve)
    result = {"peer": "landmarker", "model": "OriginalSpatialConfigurationNet", "landmarker_version": landmarker.__version__,
              "torch_version": torch.__version__, "monai_version": monai.__version__, "epochs": epoch,
              "best_val_mre_mm": best, "train_seconds": train_seconds, "budget_seconds": args.budget_s,
              "infer_seconds_per_image": infer_s, "torch_threads": torch.get_num_threads(),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
              "grid_hw": list(size), "settings": {k: str(v) for k, v in vars(args).items()} | {"lr": lr}}
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
