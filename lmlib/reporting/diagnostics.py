"""Where a trained model's error comes from: the same checkpoint scored on every split.

    python -m lmlib.reporting.diagnostics results/hamedan-ceph/htc

A train-split error far below the validation/test error says the model fits its training images but
does not generalise (more data, augmentation or regularisation help more than resolution or epochs); a
train error close to them says it underfits (capacity, epochs or the output resolution limit it).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from lmlib.engine.runner import load_run_data
from lmlib.engine.training import load_checkpoint, predict
from lmlib.evaluation.metrics import summarize


def split_errors(run_dir: str | Path, checkpoint: str = "checkpoints/best.ckpt", batch_size: int = 4) -> pd.DataFrame:
    """MRE, median and SDR 2 mm (mm, %) of ``run_dir``'s checkpoint on its dataset's train, val and test
    splits (the dataset and its options from the run's ``manifest.json``); one row per split."""
    run = Path(run_dir)
    manifest_path = run / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: missing (not a run folder)")
    params = json.loads(manifest_path.read_text(encoding="utf-8"))["parameters"]
    data = load_run_data(params)
    module = load_checkpoint(run / checkpoint)
    rows = {}
    for split in ("train", "val", "test"):
        samples = data.split(split)
        pred = predict(module, samples, batch_size=batch_size)
        errors = np.concatenate([np.linalg.norm(p - s.landmarks_mm, axis=1) for p, s in zip(pred.world_mm, samples)])
        stats = summarize(errors)
        rows[split] = {"n_images": len(samples), "mre_mm": stats["mre_mm"], "median_mm": stats["median_mm"],
                       "sdr_2mm": stats["sdr_2mm"]}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "split"
    return frame


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmlib.reporting.diagnostics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a method's run folder (holding manifest.json and checkpoints/)")
    parser.add_argument("--checkpoint", default="checkpoints/best.ckpt", help="relative to the run folder")
    args = parser.parse_args(argv)
    print(split_errors(args.run_dir, args.checkpoint).round(3).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
