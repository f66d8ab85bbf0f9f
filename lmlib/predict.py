"""Run a trained model on images nobody has annotated (toward issue 13).

    python -m lmlib.predict MODEL IMAGE [IMAGE ...] --out DIR [--device cpu] [--batch-size 4] [--spacing MM ...]

``MODEL``: a checkpoint (``.ckpt``), a run folder (``<run>/checkpoints/best.ckpt``) or a cascade's run
folder (its ``manifest.json`` lists the stages; their ``best.ckpt`` are chained). ``IMAGE``: any file the
readers take (PNG/TIFF/JPEG with ``--spacing``, MHA/MHD, NIfTI, NRRD) or a DICOM directory, 2D or 3D as
the model. ``DIR`` (created; must not hold files) receives ``predictions.csv`` (world mm, pixel/voxel
index, confidence per landmark), one labelme JSON per 2D image or one 3D Slicer ``.mrk.json`` per 3D
image (:mod:`lmlib.outputs.exports`). Everything is written into a temporary sibling folder that is
renamed to ``DIR`` at the end, so an interrupted run leaves no half-written output.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from lmlib.data.readers import read_image
from lmlib.data.sample import Sample, image_from_sitk
from lmlib.outputs.contract import read_manifest
from lmlib.outputs.exports import prediction_table, write_labelme, write_slicer_markups

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".png", ".tif", ".tiff", ".jpg", ".jpeg",
                  ".bmp", ".dcm")


@dataclass
class PredictResult:
    """What :func:`predict_images` wrote: the folder, the prediction table and the export files."""

    out_dir: Path
    table: pd.DataFrame
    exports: list[Path]


def model_checkpoints(model: str | Path) -> list[Path]:
    """The checkpoints to chain for ``model`` (see the module docstring), first stage first."""
    p = Path(model)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such checkpoint file or run folder")
    if (p / "checkpoints" / "best.ckpt").is_file():
        return [p / "checkpoints" / "best.ckpt"]
    stages = (read_manifest(p) or {}).get("stages")
    if not stages:
        raise FileNotFoundError(f"{p}: not a run folder (no checkpoints/best.ckpt, no manifest.json listing stages)")
    ckpts = [p / str(s) / "checkpoints" / "best.ckpt" for s in stages]
    missing = [str(c) for c in ckpts if not c.is_file()]
    if missing:
        raise FileNotFoundError(f"{p}: the cascade's stage checkpoints are missing: {missing}")
    return ckpts


def image_id(path: Path) -> str:
    """File name without its image suffix (``a.nii.gz`` -> ``a``); a DICOM folder's name."""
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_images(paths: Sequence[str | Path], landmark_names: Sequence[str], ndim: int,
                spacing_mm: Sequence[float] | None = None) -> list[Sample]:
    """Read images as unannotated samples (landmarks NaN, not valid) with the model's landmark names."""
    ids = [image_id(Path(p)) for p in paths]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"images with the same name {repeated}: their outputs would overwrite each other")
    samples = []
    for p, i in zip(paths, ids):
        image, geometry = image_from_sitk(read_image(p, spacing_mm, ndim=ndim))
        if image.ndim != ndim:
            raise ValueError(f"{p}: a {image.ndim}D image, but the model is {ndim}D")
        n = len(landmark_names)
        samples.append(Sample(i, image, geometry, np.full((n, image.ndim), np.nan), np.zeros(n, bool),
                              tuple(landmark_names), {"source": str(p)}))
    return samples


def predict_images(model: str | Path, images: Sequence[str | Path], out_dir: str | Path, device: str | None = None,
                   batch_size: int = 4, spacing_mm: Sequence[float] | None = None) -> PredictResult:
    """Predict every landmark of ``images`` with ``model`` and write the exports into ``out_dir``."""
    from lmlib.engine.cascade import predict_cascade
    from lmlib.engine.training import load_checkpoint

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: output folder exists and is not empty; choose another --out")
    if not images:
        raise ValueError("no images given")
    modules = [load_checkpoint(c) for c in model_checkpoints(model)]
    names, ndim = modules[0].landmark_names, modules[0].method.spatial_dims
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows, exports = [], []
    try:
        for lo in tqdm(range(0, len(images), batch_size), desc="predict", unit="batch"):
            paths = [Path(p) for p in images[lo:lo + batch_size]]
            samples = load_images(paths, names, ndim, spacing_mm)
            pred = predict_cascade(modules, samples, batch_size=batch_size, device=device)
            rows.append(prediction_table(samples, pred.world_mm, pred.confidence, paths))
            for s, w, p in zip(samples, pred.world_mm, paths):
                if ndim == 2:
                    exports.append(write_labelme(s, w, tmp / f"{s.image_id}.json", p))
                else:
                    exports.append(write_slicer_markups(s, w, tmp / f"{s.image_id}.mrk.json"))
        table = pd.concat(rows, ignore_index=True)
        table.to_csv(tmp / "predictions.csv", index=False)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PredictResult(out, table, [out / p.name for p in exports])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmlib.predict", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint (.ckpt), run folder, or cascade run folder")
    parser.add_argument("images", nargs="+", help="image files or DICOM folders")
    parser.add_argument("--out", required=True, help="output folder (created; must be empty)")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:1 | mps (default: where the model loads)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--spacing", type=float, nargs="+", default=None,
                        help="pixel spacing in mm (x y [z] or one value) for formats without one (PNG, JPEG)")
    args = parser.parse_args(argv)
    try:
        result = predict_images(args.model, args.images, args.out, args.device, args.batch_size, args.spacing)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    kind = "Slicer .mrk.json" if any(p.name.endswith(".mrk.json") for p in result.exports) else "labelme JSON"
    print(f"{result.table['image_id'].nunique()} images -> {result.out_dir / 'predictions.csv'} and "
          f"{len(result.exports)} {kind} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
