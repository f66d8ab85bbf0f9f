"""Declarative dataset descriptions and one loader: files -> checked :class:`~lmlib.data.sample.Sample` s.

A :class:`DatasetSpec` says where the images and each annotator's landmarks are, which reader parses
them, the landmark labels (as in the files) and display names, a spacing override, left/right
pairs and the splits file. :func:`load_dataset` reads every annotator's files, runs the checks of
:mod:`lmlib.data.checks` on all of them (``Dataset.report``), and returns the samples of one annotator
with landmarks in world mm ``(x, y[, z])``. Bad annotations (ambiguous, missing, non-finite, not a
point, outside the image, images without or with several annotation records) are masked, never
guessed, and every masked landmark has exactly one report row saying why (counted by
``Dataset.summary()``); malformed files raise an error naming the file, the line/shape and the problem.

Real data lives outside the project: ``data_dir`` defaults to ``$LMLIB_SHARED_DATA/<name>`` or
``<repo>/../shared/data/<name>``. ``synthetic2d``/``synthetic3d`` come from :mod:`lmlib.data.phantoms`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from lmlib.data.checks import (MASKING_ISSUES, Issue, check_inside, check_size, check_spacing, make_report,
                               mask_image, masked_by, resolve_landmarks, summarize_report, warn_masked)
from lmlib.data.geometry import Geometry
from lmlib.data.readers import READERS, RawAnnotation, read_image, read_image_info
from lmlib.data.sample import Sample, image_from_sitk

CEPH_ISBI_NAMES: tuple[str, ...] = (
    "sella", "nasion", "orbitale", "porion", "subspinale", "supramentale", "pogonion", "menton", "gnathion",
    "gonion", "lower_incisal_incision", "upper_incisal_incision", "upper_lip", "lower_lip", "subnasale",
    "soft_tissue_pogonion", "posterior_nasal_spine", "anterior_nasal_spine", "articulare")
AFIDS_NAMES: tuple[str, ...] = (
    "AC", "PC", "infracollicular sulcus", "PMJ", "superior interpeduncular fossa", "R superior LMS",
    "L superior LMS", "R inferior LMS", "L inferior LMS", "culmen", "intermammillary sulcus", "R MB", "L MB",
    "pineal gland", "R LV at AC", "L LV at AC", "R LV at PC", "L LV at PC", "genu of CC", "splenium of CC",
    "R AL temporal horn", "L AL temporal horn", "R superior AM temporal horn", "L superior AM temporal horn",
    "R inferior AM temporal horn", "L inferior AM temporal horn", "R indusium griseum origin",
    "L indusium griseum origin", "R ventral occipital horn", "L ventral occipital horn",
    "R olfactory sulcal fundus", "L olfactory sulcal fundus")

DEFAULT_SPLIT_FRACTIONS: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train, val, test of a seeded split

# AFIDs the protocol places on the midsagittal plane (names as in the fiducial file's descriptions; in the
# MNI template all ten lie within 0.25 mm of x = 0)
AFIDS_MIDSAGITTAL: tuple[str, ...] = ("AC", "PC", "infracollicular sulcus", "PMJ", "superior interpeduncular fossa",
                                      "culmen", "intermammillary sulcus", "pineal gland", "genu of CC", "splenium of CC")


@dataclass
class DatasetSpec:
    """What a dataset is made of (paths relative to its ``data_dir``).

    ``annotations`` maps annotator -> path template: with ``{image_id}`` one file per image, else one
    file for all images (or for the only image). The first annotator is the reference.
    ``landmark_labels`` are the labels in the files, ``landmark_names`` the display names (same order).
    ``spacing_mm`` overrides the image spacing ``(x, y[, z])``; ``lr_pairs`` are (left, right) display
    names; ``exclude`` maps (annotator, image_id) -> reason (that annotation is masked entirely);
    ``landmark_groups`` maps a group name -> display names of landmarks that the annotation protocol places
    on one shared plane (refined jointly by the prior-guided 3D method).
    """

    name: str
    ndim: int
    images: str
    reader: str
    annotations: dict[str, str]
    landmark_labels: tuple[str, ...]
    landmark_names: tuple[str, ...]
    spacing_mm: tuple[float, ...] | None = None
    lr_pairs: tuple[tuple[str, str], ...] = ()
    splits_file: str | None = None
    image_id_regex: str | None = None
    exclude: dict[tuple[str, str], str] = field(default_factory=dict)
    reader_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    landmark_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.landmark_labels) != len(self.landmark_names):
            raise ValueError(f"{self.name}: {len(self.landmark_labels)} labels but {len(self.landmark_names)} names")
        repeated = sorted({x for x in self.landmark_labels if list(self.landmark_labels).count(x) > 1})
        if repeated:
            raise ValueError(f"{self.name}: landmark labels {repeated} are given more than once")
        if self.spacing_mm is not None and (len(self.spacing_mm) != self.ndim or
                                            not all(np.isfinite(v) and v > 0 for v in self.spacing_mm)):
            raise ValueError(f"{self.name}: spacing_mm {tuple(self.spacing_mm)} must be {self.ndim} positive numbers")
        unknown = {n for pair in self.lr_pairs for n in pair} - set(self.landmark_names)
        if unknown:
            raise ValueError(f"{self.name}: left/right pairs name unknown landmarks {sorted(unknown)}")
        for group, members in self.landmark_groups.items():
            unknown = sorted(set(members) - set(self.landmark_names))
            if unknown or len(set(members)) < 2:
                raise ValueError(f"{self.name}: landmark group {group!r} must name at least 2 distinct landmarks of "
                                 f"the dataset (unknown: {unknown}, members: {list(members)})")

    @property
    def reference(self) -> str | None:
        """The reference annotator (the first one)."""
        return next(iter(self.annotations), None)

    def pair_indices(self) -> list[tuple[int, int]]:
        """Left/right pairs as landmark indices."""
        pos = {n: k for k, n in enumerate(self.landmark_names)}
        return [(pos[a], pos[b]) for a, b in self.lr_pairs]

    def group_indices(self) -> dict[str, list[int]]:
        """Landmark groups as landmark indices (in the dataset's order)."""
        pos = {n: k for k, n in enumerate(self.landmark_names)}
        return {g: sorted(pos[n] for n in members) for g, members in self.landmark_groups.items()}


_AFIDS_PAIRS = tuple((AFIDS_NAMES[k + 1], AFIDS_NAMES[k]) for k, n in enumerate(AFIDS_NAMES)
                     if n.startswith("R ") and k + 1 < len(AFIDS_NAMES) and AFIDS_NAMES[k + 1] == "L " + n[2:])

SPECS: dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec(
        name="hamedan-ceph", ndim=2, images="images/*.png", reader="labelme",
        annotations={"annotator1": "annotations/annotator1/{image_id}.json",
                     "annotator2": "annotations/annotator2/{image_id}.json"},
        landmark_labels=tuple(f"l{k}" for k in range(1, 20)), landmark_names=CEPH_ISBI_NAMES,
        spacing_mm=(0.1264, 0.1264), splits_file="splits.csv",
        exclude={("annotator2", "123"): "annotator2 123.json was drawn on image 122: its points do not belong to 123"},
        description="150 lateral cephalograms (1340x1671 PNG), 19 landmarks, 2 annotators; "
                    "0.1264 mm/px measured on the ruler (approximate)"),
    DatasetSpec(
        name="afids-mni", ndim=3, images="tpl-*_T1w.nii.gz", reader="fcsv",
        annotations={"groundtruth": "tpl-MNI152NLin2009cAsym_res-01_desc-groundtruth_afids.fcsv"},
        landmark_labels=tuple(str(k) for k in range(1, 33)), landmark_names=AFIDS_NAMES,
        lr_pairs=_AFIDS_PAIRS, image_id_regex=r"tpl-([^_]+)_",
        landmark_groups={"midsagittal": AFIDS_MIDSAGITTAL},
        description="MNI152NLin2009cAsym T1w template (193x229x193, 1 mm) with the 32 AFIDs (Slicer RAS -> LPS)"),
    DatasetSpec(
        name="isbi2015-ceph", ndim=2, images="RawImage/*/*.bmp", reader="isbi_txt",
        annotations={"senior": "AnnotationsByMD/400_senior/{image_id}.txt",
                     "junior": "AnnotationsByMD/400_junior/{image_id}.txt"},
        landmark_labels=tuple(str(k) for k in range(1, 20)), landmark_names=CEPH_ISBI_NAMES,
        description="ISBI 2015 cephalometric challenge layout (BMP, 0.1 mm/px from the format); not shipped"),
)}
SYNTHETIC = ("synthetic2d", "synthetic3d")


@dataclass
class Dataset:
    """Loaded samples of one annotator, the spec, and the check report of all annotators."""

    spec: DatasetSpec
    samples: list[Sample]
    report: pd.DataFrame
    annotator: str | None = None
    data_dir: Path | None = None
    template: Sample | None = None  # afids-mni with deformed > 0: the real template (also the last test sample)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __getitem__(self, key: int | str) -> Sample:
        if isinstance(key, str):
            for s in self.samples:
                if s.image_id == key:
                    return s
            raise KeyError(f"{self.spec.name}: no image {key!r}")
        return self.samples[key]

    @property
    def landmark_names(self) -> tuple[str, ...]:
        return self.spec.landmark_names

    def split(self, name: str) -> list[Sample]:
        """Samples whose ``meta["split"]`` is ``name``."""
        return [s for s in self.samples if s.meta.get("split") == name]

    def assign_seeded_split(self, fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
                            seed: int = 0) -> dict[str, str]:
        """Give every sample a ``meta["split"]`` from a seeded shuffle: ``round(f * n)`` images for val and
        test, the rest train (``fractions`` = train, val, test; they must sum to 1). Returns image_id -> split
        (write it beside the results: the split file format, columns ``image_id,split``)."""
        f = [float(v) for v in fractions]
        if len(f) != 3 or min(f) < 0 or abs(sum(f) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must be three numbers >= 0 (train, val, test) summing to 1, got {f}")
        n = len(self.samples)
        order = np.random.default_rng(int(seed)).permutation(n)
        n_val, n_test = int(round(f[1] * n)), int(round(f[2] * n))
        names = ["val"] * n_val + ["test"] * n_test + ["train"] * (n - n_val - n_test)
        for rank, i in enumerate(order):
            self.samples[i].meta["split"] = names[rank]
        return {s.image_id: s.meta["split"] for s in self.samples}

    def summary(self, print_it: bool = True) -> str:
        """Printed summary of the check report."""
        return summarize_report(self.report, print_it=print_it)


def shared_data_dir() -> Path:
    """``$LMLIB_SHARED_DATA``, else ``<repo>/../shared/data``."""
    env = os.environ.get("LMLIB_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def get_spec(name: str) -> DatasetSpec:
    """The registered spec of a file-based dataset."""
    if name not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(SPECS) + list(SYNTHETIC)}")
    return SPECS[name]


def _image_id(spec: DatasetSpec, path: Path) -> str:
    if spec.image_id_regex:
        m = re.search(spec.image_id_regex, path.name)
        if m:
            return m.group(1)
    return path.name.split(".")[0]


def _read_splits(spec: DatasetSpec, root: Path) -> dict[str, str]:
    if not spec.splits_file:
        return {}
    path = root / spec.splits_file
    if not path.exists():
        raise FileNotFoundError(f"{path}: splits file of dataset {spec.name!r} not found")
    df = pd.read_csv(path, dtype=str)
    if not {"image_id", "split"} <= set(df.columns):
        raise ValueError(f"{path}: expected columns image_id,split, got {list(df.columns)}")
    return dict(zip(df["image_id"].str.strip(), df["split"].str.strip()))


def _read_annotations(spec: DatasetSpec, root: Path, annotator: str, ids: list[str]
                      ) -> tuple[dict[str, list[RawAnnotation]], dict[str, Issue], list[Issue]]:
    """Annotations per image id (several records for one image are kept: the caller masks them), the
    reason an image has none (a template ``no_annotation`` row), and the other issues (orphans)."""
    reader = READERS[spec.reader]
    template = spec.annotations[annotator]
    out: dict[str, list[RawAnnotation]] = {}
    absent: dict[str, Issue] = {}
    issues: list[Issue] = []
    if "{image_id}" in template:
        for i in ids:
            path = root / template.format(image_id=i, annotator=annotator)
            if path.exists():
                ann = reader(path, **spec.reader_kwargs)
                ann.image_id = i
                out[i] = [ann]
            else:
                absent[i] = Issue(i, annotator, "", "no_annotation", "no annotation: file not found", str(path))
        folder = (root / template).parent
        suffix = Path(template).suffix
        for extra in sorted(folder.glob(f"*{suffix}")) if folder.is_dir() else []:
            if extra.name.split(".")[0] not in ids:
                issues.append(Issue(extra.name.split(".")[0], annotator, "", "no_image",
                                    "annotation without image", str(extra)))
        return out, absent, issues
    path = root / template.format(annotator=annotator)
    if not path.exists():
        raise FileNotFoundError(f"{path}: annotations of {annotator!r} for dataset {spec.name!r} not found")
    records = reader(path, **spec.reader_kwargs)
    if isinstance(records, RawAnnotation):
        if len(ids) != 1 and records.image_id not in ids:
            raise ValueError(f"{path}: one annotation but {len(ids)} images; cannot tell which it belongs to")
        records.image_id = records.image_id if records.image_id in ids else ids[0]
        records = [records]
    for r in records:
        if r.image_id in ids:
            out.setdefault(r.image_id, []).append(r)
        else:
            issues.append(Issue(r.image_id, annotator, "", "no_image", "annotation without image", str(path)))
    for i in ids:
        if i not in out:
            what = "no record" if records else "no records at all (empty or header-only file)"
            absent[i] = Issue(i, annotator, "", "no_annotation", f"no annotation: {what} for this image", str(path))
    return out, absent, issues


def _where(ann: RawAnnotation) -> str:
    line = ann.meta.get("line")
    return f"line {line}" if line is not None else "a record"


def _check_accounted(spec: DatasetSpec, image_id: str, annotator: str, labels: tuple[str, ...], valid: np.ndarray,
                     issues: list[Issue]) -> None:
    """Invariant: each masked landmark has exactly one masking row, and no valid landmark has one."""
    rows = [i.landmark for i in issues if i.issue in MASKING_ISSUES]
    per_label = np.array([rows.count(label) for label in labels])
    if len(rows) != per_label.sum() or not np.array_equal(per_label, (~valid).astype(int)):
        raise RuntimeError(f"{spec.name}: image {image_id} ({annotator}): masked landmarks "
                           f"{[lab for lab, v in zip(labels, valid) if not v]} do not match the report rows {rows}")


def load_from_spec(spec: DatasetSpec, data_dir: str | Path, annotator: str | None = None,
                   load_images: bool = True, split: str | None = None) -> Dataset:
    """Load any file-based dataset described by ``spec`` (see :func:`load_dataset`). The report
    covers every image and annotator; ``split`` restricts the samples (and the pixels read)."""
    root = Path(data_dir)
    annotator = annotator or spec.reference
    if annotator not in spec.annotations:
        raise ValueError(f"{spec.name}: unknown annotator {annotator!r}; known: {list(spec.annotations)}")
    paths = sorted(root.glob(spec.images))
    if not paths:
        raise FileNotFoundError(f"{root}: no images matching {spec.images!r} (dataset {spec.name!r})")
    ids = [_image_id(spec, p) for p in paths]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{root}: image ids from {spec.images!r} are not unique")
    splits = _read_splits(spec, root)
    infos = {}
    for i, p in zip(ids, paths):
        size, spacing, origin, direction = read_image_info(p)
        if spec.ndim == 2 and len(size) == 3 and size[2] == 1:
            size, spacing, origin, direction = size[:2], spacing[:2], origin[:2], direction[:2, :2]
        if len(size) != spec.ndim:
            raise ValueError(f"{p}: image has {len(size)} dimensions, dataset {spec.name!r} expects {spec.ndim}")
        infos[i] = (size, spacing, origin, direction)

    issues: list[Issue] = []
    labels, chosen = spec.landmark_labels, {}
    for who in spec.annotations:
        anns, absent, extra = _read_annotations(spec, root, who, ids)
        issues += extra
        for i, p in zip(ids, paths):
            size, spacing, origin, direction = infos[i]
            records = anns.get(i, [])
            ann = records[0] if records else None
            format_spacing = ann.spacing if ann is not None else None
            sp = spec.spacing_mm or format_spacing or spacing
            geom = Geometry(np.asarray(sp, dtype=np.float64), origin, direction)
            pts, valid = np.full((len(labels), spec.ndim), np.nan), np.zeros(len(labels), bool)
            reason = spec.exclude.get((who, i))
            if reason is not None:
                found = mask_image(i, labels, "excluded", reason, str(ann.source if ann else p), who)
            elif ann is None:
                found = mask_image(i, labels, "no_annotation", absent[i].detail, absent[i].file, who)
            elif len(records) > 1:
                found = mask_image(i, labels, "duplicate_image",
                                   f"{len(records)} records for this image ({', '.join(map(_where, records))}): "
                                   "all its landmarks masked, not guessed", str(ann.source), who)
            else:
                raw, valid, found = resolve_landmarks(ann, labels, who, spec.ndim, warn=False)
                world = geom.index_to_world(raw) if ann.units == "index" else raw
                index = raw if ann.units == "index" else geom.world_to_index(raw)
                found += check_inside(i, index, size, labels, who, str(ann.source)) + check_size(ann, size, who)
                valid &= ~masked_by(found, labels)
                pts = np.where(valid[:, None], world, np.nan)
            _check_accounted(spec, i, who, labels, valid, found)
            if who == annotator:
                warn_masked(found)
                chosen[i] = (geom, pts, valid, ann, format_spacing)
            issues += found

    samples = []
    for i, p in zip(ids, paths):
        geom, pts, valid, ann, format_spacing = chosen[i]
        issues += check_spacing(i, p, spec.spacing_mm is not None or format_spacing is not None)
        if split is not None and splits.get(i) != split:
            continue
        if load_images:
            image, geom = image_from_sitk(read_image(p, spec.spacing_mm or format_spacing, ndim=spec.ndim))
        else:  # header only: a zero-stride placeholder with the right shape (no pixel memory)
            image = np.broadcast_to(np.float32(0.0), infos[i][0])
        meta = {"split": splits.get(i), "annotator": annotator, "image_path": str(p), "image_loaded": load_images,
                "annotation_file": str(ann.source) if ann is not None else None,
                "landmark_labels": labels, "dataset": spec.name}
        samples.append(Sample(i, image, geom, pts, valid, spec.landmark_names, meta))
    return Dataset(spec, samples, make_report(issues), annotator, root)


def _load_synthetic(name: str, split: str | None, **kwargs: Any) -> Dataset:
    try:
        from lmlib.data.phantoms import make_phantom_dataset
    except ImportError as e:
        raise ImportError(f"dataset {name!r} needs lmlib.data.phantoms.make_phantom_dataset ({e})") from e
    ndim = 2 if name == "synthetic2d" else 3
    samples = make_phantom_dataset(ndim=ndim, **kwargs)
    names = tuple(samples[0].landmark_names) if samples else ()
    # the 3D layout's landmarks 2-5 lie on one plane of the shape frame (x = 0; tilted by each pose), up to
    # the phantoms' per-landmark jitter (0.03 shape units)
    groups = {"shape_plane": names[2:6]} if ndim == 3 and len(names) >= 6 else {}
    spec = DatasetSpec(name=name, ndim=ndim, images="", reader="", annotations={}, landmark_labels=names,
                       landmark_names=names, description=f"synthetic {ndim}D phantoms (lmlib.data.phantoms)",
                       landmark_groups=groups)
    ds = Dataset(spec, samples, make_report([]))
    if split is not None:
        ds.samples = ds.split(split)
    return ds


def load_dataset(name: str, data_dir: str | Path | None = None, split: str | None = None,
                 annotator: str | None = None, load_images: bool = True, **kwargs: Any) -> Dataset:
    """Load a dataset by name: ``hamedan-ceph``, ``afids-mni``, ``isbi2015-ceph``, ``synthetic2d``,
    ``synthetic3d``.

    ``data_dir``: the dataset's folder, or the folder holding it (default ``shared_data_dir()/name``).
    ``split``: keep only
    ``train``/``val``/``test``. ``annotator``: whose landmarks (default: the reference); the report
    always covers every annotator. ``load_images=False`` reads headers only (fast; images become
    zero placeholders of the right shape). afids-mni takes ``deformed: int = 0`` (number of randomly
    deformed copies of the template from :func:`lmlib.data.deformations.deformed_copies`, which assigns their
    splits; the undeformed template follows them as one more ``test`` image; 0 = only the template),
    ``seed`` and further keywords for it.
    Synthetic datasets pass ``kwargs`` to :func:`lmlib.data.phantoms.make_phantom_dataset`.
    """
    if name in SYNTHETIC:
        return _load_synthetic(name, split, **kwargs)
    spec = get_spec(name)
    if split not in (None, "train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    deformed = int(kwargs.pop("deformed", 0)) if name == "afids-mni" else 0
    seed = int(kwargs.pop("seed", 0)) if name == "afids-mni" else 0
    if kwargs and not deformed:
        raise TypeError(f"load_dataset({name!r}) got unexpected keyword arguments {sorted(kwargs)}")
    root = Path(data_dir) if data_dir is not None else shared_data_dir() / name
    if (root / name).is_dir() and not any(root.glob(spec.images)):
        root = root / name  # the shared data root was given
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data folder not found; expected dataset {name!r} there "
                                f"({spec.description}). Pass data_dir=... or set LMLIB_SHARED_DATA.")
    ds = load_from_spec(spec, root, annotator, load_images or deformed > 0,
                        split if spec.splits_file else None)
    if name == "afids-mni":
        template = ds.samples[0]
        template.meta["split"] = "test"
        if deformed > 0:
            from lmlib.data.deformations import deformed_copies
            copies = deformed_copies(template, n=deformed, seed=seed, **kwargs)
            ds.samples, ds.template = [*copies, template], template
    if split is not None:
        ds.samples = ds.split(split)
    return ds


def paired_landmarks(a: Dataset, b: Dataset) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """World landmarks ``(K, N, D)`` of the images two datasets share (e.g. two annotators), in ``a``'s
    order, and their ids. Masked points are NaN in either array."""
    mine, other = {s.image_id: s for s in a.samples}, {s.image_id: s for s in b.samples}
    ids = [s.image_id for s in a.samples if s.image_id in other]
    la = np.stack([mine[i].landmarks_mm for i in ids]) if ids else np.zeros((0, len(a.landmark_names), a.spec.ndim))
    lb = np.stack([other[i].landmarks_mm for i in ids]) if ids else np.zeros_like(la)
    return la, lb, ids
