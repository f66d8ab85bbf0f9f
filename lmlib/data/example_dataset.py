"""A small dataset laid out the way researchers' own data usually is, to try the "your own data" path
without downloading anything (the README walks through it; the tests train and predict on it).

    python -m lmlib.data.example_dataset /tmp/toy-hands

writes ``images/*.mha`` (2D phantoms whose spacing and origin are in the headers), one CSV of pixel
coordinates for all images (``id,x1,y1,...``: the ``points_csv`` reader, as in a public hand X-ray set),
``new/*.mha`` (images nobody annotated) and the declaration file ``toy-hands.yaml`` (no split file: a
seeded split). The new images' true landmarks go to ``new/truth.csv`` (world mm) for checking predictions.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from lmlib.data.phantoms import make_phantom_dataset
from lmlib.data.sample import Sample

NAMES: tuple[str, ...] = ("tip", "joint", "base")
ORIGIN_MM: tuple[float, float] = (12.5, -40.0)  # world = origin + index * spacing (identity direction)

DECLARATION = """\
# toy-hands: a dataset this project has never seen (written by python -m lmlib.data.example_dataset)
name: toy-hands                    # results go to results/toy-hands/<method>/
description: phantom 'hand' radiographs as .mha with spacing in the headers, one CSV of pixel coordinates
ndim: 2
images: images/*.mha               # relative to this file's folder (or to data_dir: if given)
reader: points_csv                 # rows id,x1,y1,x2,y2,... in pixels; spacing from the image headers
annotations:
  expert: landmarks.csv            # one file for all images; the first annotator is the reference
landmarks:                         # label in the file (points_csv numbers them 1..N) and display name
  - {label: "1", name: tip}
  - {label: "2", name: joint}
  - {label: "3", name: base}
seeded_split: {fractions: [0.6, 0.2, 0.2], seed: 7}   # no split file: train/val/test by this seed
"""


def _write_image(sample: Sample, path: Path) -> None:
    image = sitk.GetImageFromArray(np.asarray(sample.image, dtype=np.float32).T)  # arrays are (x, y)
    image.SetSpacing([float(v) for v in sample.geometry.spacing])
    image.SetOrigin(ORIGIN_MM)
    sitk.WriteImage(image, str(path))


def write_example_dataset(root: str | Path, n_images: int = 40, n_new: int = 4, seed: int = 3,
                          size: tuple[int, int] = (64, 64)) -> Path:
    """Write the example into ``root`` (created; must not exist or be empty); return the declaration file."""
    out = Path(root)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: folder exists and is not empty")
    samples = make_phantom_dataset(2, n_images=n_images + n_new, seed=seed, size=size, n_landmarks=len(NAMES))
    (out / "images").mkdir(parents=True)
    (out / "new").mkdir()
    rows = []
    for s in samples[:n_images]:
        _write_image(s, out / "images" / f"{s.image_id}.mha")
        rows.append([s.image_id, *np.round(s.landmarks_index.reshape(-1), 4)])
    columns = ["id", *(f"{n}_{a}" for n in NAMES for a in "xy")]
    pd.DataFrame(rows, columns=columns).to_csv(out / "landmarks.csv", index=False)
    truth = []
    for s in samples[n_images:]:
        _write_image(s, out / "new" / f"{s.image_id}.mha")
        world = np.asarray(ORIGIN_MM) + s.landmarks_index * s.geometry.spacing
        truth += [{"image_id": s.image_id, "landmark": n, "x_mm": w[0], "y_mm": w[1]} for n, w in zip(NAMES, world)]
    pd.DataFrame(truth).to_csv(out / "new" / "truth.csv", index=False)
    (out / "toy-hands.yaml").write_text(DECLARATION, encoding="utf-8")
    return out / "toy-hands.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmlib.data.example_dataset", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="where to write it (created; must be empty)")
    args = parser.parse_args(argv)
    try:
        path = write_example_dataset(args.folder)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} (train on it: python -m lmlib.run --dataset {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
