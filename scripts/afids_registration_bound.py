"""How close this project's registration gets to the test anatomies' fiducials of afids-templates with no pose to undo.

The benchmark's test images are posed copies; here the unposed originals are used instead: the three training
templates (atlases) are registered onto each unposed test template (Colin27 at 1 and 2 mm, MNI305), affine only and
then affine + diffeomorphic demons (:class:`lmlib.methods.registration.MultiAtlasRegistration`, every training
template an atlas, median fusion), on a finer grid than the benchmark's. What remains is the anatomies' and the
raters' difference, not the pose: a reference for issue 23's target on this split. Printed per test image: the MRE
(mm), its median, the MRE without the two ventral occipital horns (AFIDs 29 and 30, where Colin27's anatomy departs
from the population templates by tens of mm), and the MNI-position baseline (the training templates' mean
fiducial, no registration). It takes minutes on a 2-core CPU at ``--size 160`` (it prints its times).

    .venv/bin/python scripts/afids_registration_bound.py [--size 160] [--demons-iterations 50] [--data-dir DIR]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from lmlib.data.datasets import load_dataset
from lmlib.methods.registration import MultiAtlasRegistration

#: 0-based indices of the ventral occipital horns (AFIDs 29, 30) in the AFIDs order
OCCIPITAL_HORNS = (28, 29)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=160, help="longest side of the registration grid (px)")
    parser.add_argument("--demons-iterations", type=int, default=50, help="demons iterations per level")
    parser.add_argument("--data-dir", default=None, help="afids-templates folder (default: the shared location)")
    args = parser.parse_args()
    data = load_dataset("afids-templates", args.data_dir, posed=False)
    atlases, targets = data.split("train"), data.split("test")
    print(f"atlases: {', '.join(s.image_id for s in atlases)}; test: {', '.join(s.image_id for s in targets)}")
    mean_position = np.nanmean([a.landmarks_mm for a in atlases], axis=0)
    print("| registration | image | MRE (mm) | median (mm) | MRE without the occipital horns (mm) | MNI position (mm) |")
    print("|---|---|---:|---:|---:|---:|")
    for deformable in ("none", "demons"):
        method = MultiAtlasRegistration(3, len(data.landmark_names), n_atlases=len(atlases), deformable=deformable,
                                        demons_iterations=args.demons_iterations)
        start = time.perf_counter()
        predictions, _ = method.predict_samples(atlases, targets, [args.size] * 3, progress=False)
        name = "affine" if deformable == "none" else "affine + demons"
        for sample, predicted in zip(targets, predictions):
            error = np.linalg.norm(predicted - sample.landmarks_mm, axis=1)
            baseline = np.nanmean(np.linalg.norm(mean_position - sample.landmarks_mm, axis=1))
            print(f"| {name} | {sample.image_id} | {np.nanmean(error):.2f} | {np.nanmedian(error):.2f} | "
                  f"{np.nanmean(np.delete(error, OCCIPITAL_HORNS)):.2f} | {baseline:.2f} |")
        print(f"({name}: {time.perf_counter() - start:.0f} s for {len(targets)} images)")


if __name__ == "__main__":
    main()
