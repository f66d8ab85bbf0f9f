"""Run a trained model on images nobody has annotated, with calibrated prediction regions.

    python -m lmlib.predict MODEL IMAGE [IMAGE ...] --out DIR [--regions 0.9 0.95 --review-mm 3]

``MODEL``: a checkpoint (``.ckpt``), a run folder (``<run>/checkpoints/best.ckpt``) or a cascade's run
folder (its ``manifest.json`` lists the stages; their ``best.ckpt`` are chained; one stage's folder chains the
stages up to it). ``IMAGE``: any file the
readers take (PNG/TIFF/JPEG with ``--spacing``, MHA/MHD, NIfTI, NRRD) or a DICOM directory, 2D or 3D as
the model; a folder of image files or a quoted glob pattern stands for its files. ``DIR`` (created; must not
hold prediction outputs or exports already) receives ``predictions.csv`` (world mm, pixel/voxel index, the
method's confidence and spread per landmark), one labelme JSON per 2D image or one 3D Slicer
``.mrk.json`` per 3D image (:mod:`lmlib.outputs.exports`). With ``--regions`` (a run folder: its manifest
names the dataset), per-landmark prediction regions are calibrated by split conformal prediction on that
run's validation split (:mod:`lmlib.evaluation.conformal`; adaptive: ``radius = q * spread`` of each
prediction): ``predictions.csv`` gets ``region_<level>_mm`` and ``review`` (the largest level's region is
larger than ``--review-mm``), ``regions.csv`` the calibration and ``review.csv`` the landmarks to check by
hand. Always a ``manifest.json`` (the options, the model, a checksum of the images); for annotated images (the
notebook's default: the model's own test split) ``coverage.csv``, the regions' measured coverage.
Everything is written into a temporary sibling folder and moved into ``DIR`` at the end,
``predictions.csv`` last, so an interrupted run leaves no half-written file and no ``predictions.csv``.
"""
from __future__ import annotations

import argparse
import glob
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from lmlib.data.readers import no_spacing_kind, read_image, stores_no_spacing
from lmlib.data.refit import check_held_out_val
from lmlib.data.sample import Sample, image_from_sitk
from lmlib.evaluation.conformal import ConformalRegions, calibrate
from lmlib.outputs.contract import read_manifest
from lmlib.outputs.exports import prediction_table, write_labelme, write_slicer_markups

OUTPUT_FILES = ("predictions.csv", "regions.csv", "review.csv", "coverage.csv", "manifest.json")  # besides exports
EXPORT_SUFFIXES = (".json", ".png")  # labelme .json (+ a PNG for formats labelme cannot open), Slicer .mrk.json
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".png", ".tif", ".tiff", ".jpg", ".jpeg",
                  ".bmp", ".dcm")


@dataclass
class PredictResult:
    """What :func:`predict_images` wrote: the folder, the prediction table, the export files, the regions (if
    calibrated), the landmarks listed for review, and the first images (for figures)."""

    out_dir: Path
    table: pd.DataFrame
    exports: list[Path]
    regions: ConformalRegions | None = None
    review: pd.DataFrame = field(default_factory=pd.DataFrame)
    samples: list[Sample] = field(default_factory=list)
    coverage: pd.DataFrame = field(default_factory=pd.DataFrame)  # annotated images only (the test split)


def image_id(path: Path) -> str:
    """File name without its image suffix (``a.nii.gz`` -> ``a``); a DICOM folder's name."""
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def check_images(paths: Sequence[str | Path], spacing_mm: Sequence[float] | None = None) -> None:
    """What needs no model, before one loads: every image exists, no two share a name (their outputs would
    overwrite each other) and every image whose format stores no spacing gets ``spacing_mm``."""
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"{p}: image file or DICOM directory not found")
    ids = [image_id(Path(p)) for p in paths]
    taken = sorted({i for i in ids if f"{i}.json" in OUTPUT_FILES})
    if taken:  # a 2D image's labelme export is <id>.json
        raise ValueError(f"images named {taken}: their exports would overwrite the output folder's "
                         f"{', '.join(f'{i}.json' for i in taken)}; rename them")
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:  # checked over the whole list: per batch, one export overwrote another across batches
        clash = [str(p) for p, i in zip(paths, ids) if i == repeated[0]]
        raise ValueError(f"images with the same name {repeated} ({', '.join(clash)}): their outputs would "
                         "overwrite each other; rename them or predict them into separate --out folders")
    if spacing_mm is None:
        for p in paths:
            if stores_no_spacing(p):
                raise _no_spacing(p)


def _no_spacing(path: str | Path) -> ValueError:
    return ValueError(f"{path}: {no_spacing_kind(path)} stores no pixel spacing, so its millimetres cannot be known; "
                      "pass --spacing MM (x y[ z], or one value) for the images without one, or save it in a format "
                      "that stores its spacing (.mha, .nrrd, .nii.gz)")


def check_output_folder(out_dir: str | Path) -> Path:
    """``out_dir`` as an absolute path (``.`` has no name to put the partial folder beside) that holds no
    outputs of an earlier or interrupted run (prediction tables, exports, a manifest)."""
    out = Path(out_dir).resolve()
    leftovers = sorted(f.name for f in out.glob("*") if f.name in OUTPUT_FILES or f.name.endswith(EXPORT_SUFFIXES)) \
        if out.is_dir() else []
    if leftovers:  # a finished run's outputs, or an interrupted one's exports: never mix them with new ones
        raise FileExistsError(f"{out_dir}: holds prediction outputs already ({', '.join(leftovers[:5])}"
                              f"{' ...' if len(leftovers) > 5 else ''}); choose another --out or empty it")
    return out


def load_images(paths: Sequence[str | Path], landmark_names: Sequence[str], ndim: int,
                spacing_mm: Sequence[float] | None = None) -> list[Sample]:
    """Read images as unannotated samples (landmarks NaN, not valid) with the model's landmark names."""
    if spacing_mm is not None and len(np.atleast_1d(spacing_mm)) not in (1, ndim):
        raise ValueError(f"--spacing {list(np.atleast_1d(spacing_mm))}: give one value or {ndim} (x y"
                         f"{' z' if ndim == 3 else ''}) for this {ndim}D model, in mm")
    samples, filled = [], []
    for p in paths:
        i, stores_none = image_id(Path(p)), stores_no_spacing(p)
        if stores_none and spacing_mm is None:
            raise _no_spacing(p)
        # --spacing only fills in images without a stored spacing: a header's own spacing is never overridden
        image, geometry = image_from_sitk(read_image(p, spacing_mm if stores_none else None, ndim=ndim))
        if stores_none:
            filled.append(i)
        if image.ndim != ndim:
            raise ValueError(f"{p}: a {image.ndim}D image, but the model is {ndim}D")
        n = len(landmark_names)
        samples.append(Sample(i, image, geometry, np.full((n, image.ndim), np.nan), np.zeros(n, bool),
                              tuple(landmark_names), {"source": str(p)}))
    if filled:
        assert spacing_mm is not None  # an image without a stored spacing needs one (checked above)
        print(f"--spacing {list(np.atleast_1d(spacing_mm))} mm applied to {len(filled)} image(s) without a stored "
              f"spacing: {', '.join(filled[:10])}{' ...' if len(filled) > 10 else ''}")
    return samples


def image_paths(images: str | Path | Sequence[str | Path]) -> list[Path]:
    """Image files from a folder (every file with an image suffix, sorted; a folder without any, e.g. DICOM files
    named without ``.dcm``, or with ``.dcm`` files, is one DICOM series), a glob pattern, a file, or a list of
    those (each expanded in turn)."""
    if not isinstance(images, (str, Path)):
        return [q for item in images for q in image_paths(item)]
    p = Path(images)
    if p.is_dir():
        files = sorted(q for q in p.iterdir() if q.is_file() and image_id(q) != q.name)
        return [p] if not files or any(q.suffix.lower() == ".dcm" for q in files) else files
    if p.exists():  # a file (its name may hold glob characters: [ ] * ?)
        return [p]
    found = sorted(Path(q) for q in glob.glob(str(images)))
    if not found:
        raise FileNotFoundError(f"{images}: no image files (a folder, a glob pattern like 'scans/*.nii.gz', or files)")
    return found


def calibrate_run(run_dir: str | Path, levels: Sequence[float] = (0.9, 0.95), data_dir: str | None = None,
                  device: str | None = None, batch_size: int = 4) -> ConformalRegions:
    """Per-landmark regions calibrated on the validation split of the run in ``run_dir`` (its manifest names
    the dataset; ``data_dir`` overrides the data folder it names): fixed radii and spread multipliers; by subject
    where the data set declares subjects (:func:`lmlib.evaluation.conformal.calibrate`)."""
    from lmlib.engine.runner import split_predictions

    check_held_out_val((read_manifest(Path(run_dir)) or {}).get("parameters"), run_dir,
                       "calibrating prediction regions (or predict without them: levels=[], no --regions)")
    s = split_predictions(run_dir, batch_size=batch_size, splits=("val",), data_dir=data_dir, device=device)
    if not np.isfinite(s.errors["val"]).any():
        raise ValueError(f"{run_dir}: its dataset's validation split has no annotated landmark to calibrate on")
    return calibrate(s.errors["val"], s.spread_mm["val"], levels, s.landmark_names, s.confidence["val"],
                     s.subjects("val"))


def _with_regions(table: pd.DataFrame, regions: ConformalRegions | None, review_mm: float | None) -> pd.DataFrame:
    """``table`` plus ``region_<level>_mm`` per level and ``review`` (the largest level's region > ``review_mm``)."""
    if regions is None:
        return table
    names = list(regions.landmark_names)
    n = len(table) // len(names)  # the table is image-major, landmarks in the model's order
    if list(table["landmark"]) != names * n:
        raise ValueError("the prediction table is not image-major in the regions' landmark order")
    shape = (n, len(names))
    spread = table["spread_mm"].to_numpy(dtype=np.float64).reshape(shape)
    confidence = table["confidence"].to_numpy(dtype=np.float64).reshape(shape)
    table["uncertainty_mm"] = regions.uncertainty(spread, confidence).reshape(-1)
    for level in regions.levels:
        table[f"region_{100 * level:g}_mm"] = regions.radii(level, spread, confidence).reshape(-1)
    widest = table[f"region_{100 * max(regions.levels):g}_mm"]
    table["review"] = (widest > review_mm) if review_mm is not None else False
    return table


def predict_images(model: str | Path, images: Sequence[str | Path | Sample], out_dir: str | Path,
                   device: str | None = None, batch_size: int = 4, spacing_mm: Sequence[float] | None = None,
                   regions: ConformalRegions | None = None, review_mm: float | None = None,
                   keep_samples: int = 0, parameters: dict[str, Any] | None = None, seed: int | None = None,
                   started: str | None = None) -> PredictResult:
    """Predict every landmark of ``images`` (files, or already loaded samples) with ``model`` and write the
    exports into ``out_dir``; with ``regions``, each landmark's region radius per level and the review list, and
    for annotated samples (a test split) the regions' coverage (see the module docstring). Writes a
    ``manifest.json`` too (``parameters``, the model, the checksum of the images predicted). ``keep_samples``: how
    many of the first images to return for figures."""
    from lmlib.outputs.manifest import SampleChecksum, utc_now, write_manifest

    started = started or utc_now()
    out = check_output_folder(out_dir)
    if not images:
        raise ValueError("no images given")
    check_images([p for p in images if not isinstance(p, Sample)], spacing_mm)
    from lmlib.engine.cascade import model_checkpoints, predict_cascade  # torch + Lightning: not for --help
    from lmlib.engine.training import load_checkpoint
    from lmlib.runtime import bars_disabled

    modules = [load_checkpoint(c) for c in model_checkpoints(model)]
    names, ndim = modules[0].landmark_names, modules[0].method.spatial_dims
    if regions is not None and list(regions.landmark_names) != list(names):
        raise ValueError(f"the regions were calibrated for landmarks {regions.landmark_names}, the model predicts {names}")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:  # the partial folder is a sibling of --out: name --out, not the hidden folder
        raise ValueError(f"{out_dir}: cannot write the output folder here ({exc.strerror or exc})") from None
    rows, exports = [], []
    kept: list[Sample] = []
    annotated: list[Sample] = []
    checksum = SampleChecksum()
    try:
        for lo in tqdm(range(0, len(images), batch_size), desc="predict", unit="batch", disable=bars_disabled()):
            chunk = list(images[lo:lo + batch_size])
            loaded = [x for x in chunk if isinstance(x, Sample)]
            if len(loaded) == len(chunk):
                samples = loaded
                # an image made in memory (a phantom, a deformed or posed copy) has no file: image_path stays empty
                paths: list[Path | None] = [Path(str(s.meta["image_path"])) if s.meta.get("image_path") else None
                                            for s in samples]
                annotated += [s for s in samples if s.valid.any()]
            else:  # files (a chunk mixing files and samples fails here: Path() refuses a Sample)
                files = [Path(cast("str | Path", p)) for p in chunk]
                samples = load_images(files, names, ndim, spacing_mm)
                paths = list(files)
            checksum.update(samples)
            pred = predict_cascade(modules, samples, batch_size=batch_size, device=device)
            part = prediction_table(samples, pred.world_mm, pred.confidence, paths, relative_to=out)
            part["spread_mm"] = np.concatenate(pred.spread_mm) if pred.spread_mm is not None else np.nan
            rows.append(part)
            kept += samples[:max(0, keep_samples - len(kept))]
            for s, w, p in zip(samples, pred.world_mm, paths):
                if ndim == 2:
                    exports.append(write_labelme(s, w, tmp / f"{s.image_id}.json", p))
                else:
                    exports.append(write_slicer_markups(s, w, tmp / f"{s.image_id}.mrk.json"))
        table = _with_regions(pd.concat(rows, ignore_index=True), regions, review_mm)
        table.to_csv(tmp / "predictions.csv", index=False)
        review = table[table["review"]] if "review" in table else table.iloc[:0]
        coverage = region_coverage(table, regions, annotated)
        if regions is not None:
            regions.to_frame().to_csv(tmp / "regions.csv")
            review.to_csv(tmp / "review.csv", index=False)
        if not coverage.empty:
            coverage.to_csv(tmp / "coverage.csv")
        write_manifest(tmp, {**(parameters or {}), "model": str(model)}, checksum=checksum.hexdigest(), seed=seed,
                       device=str(device if device is not None else modules[0].device), started=started)
        out.mkdir(parents=True, exist_ok=True)  # files move in with predictions.csv last: it marks a complete folder
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "predictions.csv"):
            f.replace(out / f.name)
        tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PredictResult(out, table, [out / p.name for p in exports], regions, review.reset_index(drop=True), kept,
                         coverage)


def default_model(dataset: str, results_dir: str | Path = "results", method: str = "heatmap_unet") -> Path:
    """The run folder of ``method`` on ``dataset`` (a name or a declaration file): ``<results_dir>/<name>/<method>``."""
    from lmlib.data.datasets import dataset_name

    return Path(results_dir) / dataset_name(dataset) / method


def predict_new_images(model: str | Path, images: str | Path | Sequence[str | Path], output_dir: str | Path,
                       levels: Sequence[float] = (0.9, 0.95), review_mm: float | None = 3.0, data_dir: str = "",
                       spacing_mm: Sequence[float] | None = None, device: str = "auto", seed: int = 0,
                       batch_size: int = 4, keep_samples: int = 4, parameters: dict[str, Any] | None = None
                       ) -> PredictResult:
    """The predict notebook's one call: regions calibrated on the model run's validation split (``levels``;
    empty: none), then :func:`predict_images` on ``images`` -- a folder, a glob or files; empty: the test
    split of the model's own dataset (annotated, so the regions' coverage is measured: ``result.coverage``,
    ``coverage.csv``) -- into ``output_dir``, with its ``manifest.json`` (``parameters``, model, versions).
    The checks that need no model (output folder, image files, spacing) come before the calibration."""
    from lmlib.engine.runner import finished_run_data
    from lmlib.outputs.manifest import utc_now
    from lmlib.runtime import print_environment, setup

    started = utc_now()
    dev = setup(seed, device)
    print_environment(dev)
    model = Path(model)
    if not model.exists():
        raise FileNotFoundError(f"{model}: no trained model there; train one first (make results RUN_ARGS=\"--dataset "
                                f"<dataset> --only <method>\" writes results/<dataset>/<method>)")
    manifest = read_manifest(model) if model.is_dir() else None
    check_output_folder(output_dir)
    chosen: Sequence[str | Path | Sample]
    if images:
        chosen = image_paths(images)
        check_images(chosen, spacing_mm)
    elif manifest is None:
        raise ValueError(f"{model}: images is empty and the model is not a run folder whose test split to use")
    regions = None
    if levels:
        if manifest is None:
            raise ValueError(f"{model}: calibrating regions needs a run folder (with manifest.json), not a checkpoint")
        regions = calibrate_run(model, levels, data_dir or None, str(dev), batch_size)
    if not images:
        assert manifest is not None  # checked above
        chosen = finished_run_data(model, manifest, data_dir or None).split("test")
    return predict_images(model, chosen, output_dir, str(dev), batch_size, spacing_mm, regions, review_mm,
                          keep_samples, parameters, seed, started)


def region_coverage(table: pd.DataFrame, regions: ConformalRegions | None, samples: Sequence[Sample]) -> pd.DataFrame:
    """Where the images are annotated (the model's test split): per level, the share of true landmarks inside
    their regions (%; a true landmark the model gave no point for is outside, and counted in ``n_unpredicted``), the
    mean region radius (mm) and the mean error (mm); empty without regions or annotations."""
    truth = {(s.image_id, n): p for s in samples for n, p, ok in zip(s.landmark_names, s.landmarks_mm, s.valid) if ok}
    t = table
    key = list(zip(t["image_id"], t["landmark"]))
    found = np.array([k in truth for k in key])
    if regions is None or not found.any():
        return pd.DataFrame()
    cols = [c for c in ("x_mm", "y_mm", "z_mm") if t[c].notna().any()]
    err = np.array([np.linalg.norm(np.asarray(truth[k]) - row) if k in truth else np.nan
                    for k, row in zip(key, t[cols].to_numpy(dtype=np.float64))])
    ok = np.isfinite(err)
    unpredicted = found & ~ok
    rows = {}
    for level in regions.levels:
        r = t[f"region_{100 * level:g}_mm"].to_numpy(dtype=np.float64)
        inside = int((err[ok] <= r[ok]).sum())
        rows[f"{100 * level:g} %"] = {
            "coverage_pct": 100.0 * inside / (int(ok.sum()) + int(unpredicted.sum())), "n_points": int(ok.sum()),
            "n_unpredicted": int(unpredicted.sum()),
            "mean_radius_mm": float(r[ok].mean()) if ok.any() else np.nan,
            "mre_mm": float(err[ok].mean()) if ok.any() else np.nan}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "nominal"
    return frame


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmlib.predict", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint (.ckpt), run folder, or cascade run folder")
    parser.add_argument("images", nargs="+", help="image files, folders of them, glob patterns (quoted) or DICOM folders")
    parser.add_argument("--out", required=True, help="output folder (created; must not hold predictions.csv)")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one) | cpu | cuda | cuda:1 | mps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--spacing", type=float, nargs="+", default=None,
                        help="pixel spacing in mm (x y [z] or one value) for the images whose format stores none "
                             "(PNG, JPEG, TIFF, BMP); images with a stored spacing keep theirs")
    parser.add_argument("--regions", type=float, nargs="+", default=None, metavar="LEVEL",
                        help="calibrated prediction regions at these levels (e.g. 0.9 0.95) from the run's validation split")
    parser.add_argument("--review-mm", type=float, default=None,
                        help="list landmarks whose (largest-level) region is larger than this (mm) in review.csv")
    parser.add_argument("--data-dir", default=None, help="with --regions: the run's data folder, if it moved")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.regions and not all(0.0 < a < 1.0 for a in args.regions):
        parser.error(f"--regions takes coverage levels between 0 and 1 (e.g. 0.9 0.95), got {args.regions}")
    if args.review_mm is not None and not args.regions:
        parser.error("--review-mm needs --regions (the review list compares each landmark's region with it)")
    if args.review_mm is not None and not args.review_mm >= 0:
        parser.error(f"--review-mm must be >= 0 (mm; 0 lists every landmark), got {args.review_mm}")
    if args.spacing is not None and not all(np.isfinite(v) and v > 0 for v in args.spacing):
        parser.error(f"--spacing must be positive numbers (mm), got {args.spacing}")
    try:  # the checks that need no model first: a calibration takes minutes before they would run
        out = check_output_folder(args.out)
        images = image_paths(args.images)
        check_images(images, args.spacing)
        from lmlib.outputs.manifest import utc_now
        from lmlib.runtime import setup

        started, device = utc_now(), str(setup(0, args.device))
        regions = calibrate_run(args.model, args.regions, args.data_dir, device, args.batch_size) \
            if args.regions else None
        result = predict_images(args.model, images, out, device, args.batch_size, args.spacing, regions,
                                args.review_mm, parameters={"command": "python -m lmlib.predict", **vars(args)},
                                seed=0, started=started)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    kind = "Slicer .mrk.json" if any(p.name.endswith(".mrk.json") for p in result.exports) else "labelme JSON"
    print(f"{result.table['image_id'].nunique()} images -> {result.out_dir / 'predictions.csv'} and "
          f"{len(result.exports)} {kind} files" +
          (f"; {len(result.review)} landmarks to review -> review.csv" if regions is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
