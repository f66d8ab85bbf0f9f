"""Declared datasets and one loader: files -> checked :class:`~lmlib.data.sample.Sample` s.

A :class:`~lmlib.data.dataset_spec.DatasetSpec`, read from a declaration file (YAML: the built-in ones in
``lmlib/data/declared/``, a user's by path), says where the images and each annotator's landmarks are,
which reader parses them, the landmark labels (as in the files) and display names, a spacing override,
left/right pairs, landmark groups and the splits (a split file, else a seeded split). :func:`load_dataset`
reads every annotator's files, runs the checks of
:mod:`lmlib.data.checks` on all of them (``Dataset.report``), and returns the samples of one annotator
with landmarks in world mm ``(x, y[, z])``. Bad annotations (ambiguous, missing, non-finite, not a
point, outside the image, images without or with several annotation records) are masked, never
guessed, and every masked landmark has exactly one report row saying why (counted by
``Dataset.summary()``); malformed files raise an error naming the file, the line/shape and the problem.

Real data lives outside the project: ``data_dir`` defaults to the folder a declaration file names (its
own folder), and for a built-in dataset to ``$LMLIB_SHARED_DATA/<name>`` or ``<repo>/../shared/data/<name>``.
``synthetic2d``/``synthetic3d`` come from :mod:`lmlib.data.phantoms`.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from lmlib.data.checks import (
    MASKING_ISSUES,
    Issue,
    check_inside,
    check_size,
    check_spacing,
    make_report,
    mask_image,
    masked_by,
    resolve_landmarks,
    summarize_report,
    warn_masked,
)
from lmlib.data.dataset_spec import (
    DEFAULT_SPLIT_FRACTIONS,
    SPLIT_BY,
    SPLIT_NAMES,
    SYNTHETIC,
    DatasetSpec,
    declared_files,
    is_dataset_file,
    read_dataset_file,
)
from lmlib.data.duplicates import check_split_duplicates, duplicate_groups, keep_groups_together
from lmlib.data.geometry import Geometry
from lmlib.data.readers import READERS, RawAnnotation, read_image, read_image_info, read_text, stores_no_spacing
from lmlib.data.sample import Sample, image_from_sitk

SPECS: dict[str, DatasetSpec] = {name: read_dataset_file(path, READERS) for name, path in declared_files().items()}
CEPH_ISBI_NAMES: tuple[str, ...] = SPECS["hamedan-ceph"].landmark_names
AFIDS_NAMES: tuple[str, ...] = SPECS["afids-mni"].landmark_names


@dataclass
class Dataset:
    """Loaded samples of one annotator, the spec, and the check report of all annotators."""

    spec: DatasetSpec
    samples: list[Sample]
    report: pd.DataFrame
    annotator: str | None = None
    data_dir: Path | None = None
    template: Sample | None = None  # afids-mni with deformed > 0: the real template (also the last test sample)
    duplicates: list[list[str]] | None = None  # groups of image ids holding the same pixels (all splits)

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

    def summary(self, print_it: bool = True) -> str:
        """Printed summary of the check report."""
        return summarize_report(self.report, print_it=print_it)


def shared_data_dir() -> Path:
    """``$LMLIB_SHARED_DATA``, else ``<repo>/../shared/data``."""
    env = os.environ.get("LMLIB_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def seeded_splits(ids: Sequence[str], fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
                  seed: int = 0, by: str = "shuffle") -> dict[str, str]:
    """image_id -> ``train``/``val``/``test`` (``fractions`` = train, val, test, summing to 1).

    ``by="shuffle"``: a seeded shuffle of ``ids`` in the given order, ``round(f * n)`` images for val and test, the
    rest train; adding images moves old ones between splits. ``by="hash"``: each image on its own, by where
    SHA-256 of ``"<seed>:<image_id>"`` falls in [0, 1) against the cumulative fractions (val, then test, then train):
    adding or removing images moves no other image, and the counts are near, not at, the fractions. (The loader
    then keeps groups together, copies of one image and one subject's images, on the side of the group's first id:
    an image added at the head of a group moves the group.)"""
    f = [float(v) for v in fractions]
    if len(f) != 3 or min(f) < 0 or abs(sum(f) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be three numbers >= 0 (train, val, test) summing to 1, got {f}")
    if by == "hash":
        def where(image_id: str) -> float:
            digest = hashlib.sha256(f"{int(seed)}:{image_id}".encode()).digest()
            return int.from_bytes(digest[:8], "big") / 2.0**64

        return {i: "val" if u < f[1] else "test" if u < f[1] + f[2] else "train" for i in ids for u in [where(i)]}
    if by not in SPLIT_BY:
        raise ValueError(f"seeded split: by must be one of {list(SPLIT_BY)}, got {by!r}")
    n = len(ids)
    order = np.random.default_rng(int(seed)).permutation(n)
    n_val, n_test = int(round(f[1] * n)), int(round(f[2] * n))
    names = ["val"] * n_val + ["test"] * n_test + ["train"] * (n - n_val - n_test)
    return {ids[i]: names[rank] for rank, i in enumerate(order)}


def get_spec(name: str | Path) -> DatasetSpec:
    """The spec of a file-based dataset: a built-in name, or the path of a declaration file (``.yaml``)."""
    if is_dataset_file(name):
        return read_dataset_file(name, READERS)
    if name not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join([*SYNTHETIC, *sorted(SPECS)])}, "
                         "or the path of a dataset declaration file (.yaml)")
    return SPECS[str(name)]  # a str here: no Path is a key


def dataset_name(name: str | Path) -> str:
    """The name a dataset's results are filed under (``results/<name>/``): a declaration file's ``name``."""
    return get_spec(name).name if is_dataset_file(name) else str(name)


def dataset_notes(name: str | Path) -> list[str]:
    """The caveats a dataset's declaration asks every comparison to repeat (``notes:``); none for synthetic data."""
    return [] if str(name) in SYNTHETIC else list(get_spec(name).notes)


def dataset_ndim(name: str | Path) -> int:
    """2 or 3 for a declared dataset (synthetic, built-in or a declaration file), without loading it."""
    return {"synthetic2d": 2, "synthetic3d": 3}.get(str(name)) or get_spec(name).ndim


def is_single_template(name: str | Path) -> bool:
    """Whether the dataset is one annotated template whose deformations are the train/val/test images."""
    return str(name) not in SYNTHETIC and get_spec(name).single_template


def _image_id(spec: DatasetSpec, path: Path) -> str:
    if spec.image_id_regex:
        m = re.search(spec.image_id_regex, path.name)
        if m:
            return m.group(1)
    return path.name.split(".")[0]


def _name_fields(spec: DatasetSpec, path: Path) -> dict[str, str]:
    """The named groups of ``image_id_regex`` in an image's file name (usable in annotation file names)."""
    m = re.search(spec.image_id_regex, path.name) if spec.image_id_regex else None
    return {k: v for k, v in m.groupdict().items() if v is not None} if m else {}


def _read_splits(spec: DatasetSpec, root: Path) -> dict[str, str]:
    if not spec.splits_file:
        return {}
    path = root / spec.splits_file
    if not path.exists():
        raise FileNotFoundError(f"{path}: splits file of dataset {spec.name!r} not found")
    df = pd.read_csv(io.StringIO(read_text(path)), dtype=str, keep_default_na=False)
    if not {"image_id", "split"} <= set(df.columns):
        raise ValueError(f"{path}: expected columns image_id,split, got {list(df.columns)}")
    ids, values = df["image_id"].str.strip(), df["split"].str.strip()
    bad = [(k + 2, v) for k, v in enumerate(values) if v not in SPLIT_NAMES]
    if bad:
        raise ValueError(f"{path}: line {bad[0][0]}: split {bad[0][1]!r} is not one of {list(SPLIT_NAMES)} "
                         f"(case-sensitive; {len(bad)} such line(s))")
    twice = sorted(set(ids[ids.duplicated()]))
    if twice:
        raise ValueError(f"{path}: image id(s) {twice[:10]} listed more than once: each image belongs to one split")
    return dict(zip(ids, values))


def _read_annotations(spec: DatasetSpec, root: Path, annotator: str, ids: list[str],
                      fields: Mapping[str, Mapping[str, str]] | None = None
                      ) -> tuple[dict[str, list[RawAnnotation]], dict[str, Issue], list[Issue]]:
    """Annotations per image id (several records for one image are kept: the caller masks them), the
    reason an image has none (a template ``no_annotation`` row), and the other issues (orphans).
    ``fields``: per image id, the named groups of ``image_id_regex`` a per-image file name may use."""
    reader = READERS[spec.reader]
    template = spec.annotations[annotator]
    out: dict[str, list[RawAnnotation]] = {}
    absent: dict[str, Issue] = {}
    issues: list[Issue] = []
    per_image = "{image_id}" in template or bool(re.search(r"\{(?!annotator\})\w+\}", template))
    if per_image:
        expected = set()
        for i in ids:
            try:
                path = root / template.format(**{**(fields or {}).get(i, {}), "image_id": i, "annotator": annotator})
            except KeyError as exc:
                raise ValueError(f"{spec.source or spec.name}: annotations: {template!r} names {{{exc.args[0]}}}, "
                                 f"which is neither image_id, annotator nor a named group of image_id_regex that "
                                 f"matched {i!r}") from None
            expected.add(path)
            if path.exists():
                ann = reader(path, **spec.reader_kwargs)
                if isinstance(ann, list):  # a table reader (long_csv, ...): one file per image holds one record
                    if not ann:  # a header only: as a shared table's image without rows
                        absent[i] = Issue(i, annotator, "", "no_annotation", "no annotation: the file holds no "
                                          "records", str(path))
                        continue
                    if len(ann) != 1:
                        raise ValueError(f"{path}: reader {spec.reader!r} found {len(ann)} images' records "
                                         f"({', '.join(a.image_id for a in ann[:4])}) in a file of image {i!r} only")
                    ann = ann[0]
                ann.image_id = i
                out[i] = [ann]
            else:
                absent[i] = Issue(i, annotator, "", "no_annotation", "no annotation: file not found", str(path))
        folder = (root / template).parent
        suffix = Path(template).suffix
        for extra in sorted(folder.glob(f"*{suffix}")) if folder.is_dir() else []:
            if extra not in expected:
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
    path_of = dict(zip(ids, paths))
    copies = duplicate_groups(path_of) if not spec.single_template else []
    subjects = _subject_groups(spec, ids)
    if spec.subject_splits:
        splits = {i: sp for sp, names in spec.subject_splits.items() for name in names for i in spec.subjects[name]}
        orphans = sorted(set(splits) - set(ids))
    elif spec.splits_file or spec.single_template:
        splits = _read_splits(spec, root)
        orphans = sorted(set(splits) - set(ids))
    else:
        splits = keep_groups_together(seeded_splits(ids, spec.split_fractions, spec.split_seed, spec.split_by),
                                      [*copies, *subjects])
        orphans = []
    origin_of_split = f"{spec.name} ({spec.source if spec.subject_splits else root / (spec.splits_file or '')})"
    check_split_duplicates(copies, splits, path_of, origin_of_split)
    check_split_duplicates(subjects, splits, path_of, origin_of_split, kind="images of one subject")
    unknown = sorted({i for _, i in spec.exclude} - set(ids))
    if unknown:
        raise ValueError(f"{spec.source or spec.name}: exclude names image(s) {unknown} that are not among the "
                         f"{len(ids)} images of {spec.images!r} (ids are case-sensitive)")
    infos = {}
    for i, p in zip(ids, paths):
        size, spacing, origin, direction = read_image_info(p)
        if spec.ndim == 2 and len(size) == 3 and size[2] == 1:
            size, spacing, origin, direction = size[:2], spacing[:2], origin[:2], direction[:2, :2]
        if len(size) != spec.ndim:
            raise ValueError(f"{p}: image has {len(size)} dimensions, dataset {spec.name!r} expects {spec.ndim}")
        if spec.spacing_mm and not stores_no_spacing(p) and not np.allclose(spacing, spec.spacing_mm, rtol=1e-6):
            # spacing_mm is for formats that store none: over a header it would move the image under its landmarks
            raise ValueError(f"{p}: its header's spacing {[float(v) for v in spacing]} mm differs from spacing_mm "
                             f"{list(spec.spacing_mm)} of {spec.source or spec.name} (spacing_mm is for formats that "
                             "store no spacing: PNG, JPEG, TIFF, BMP); fix the header or remove spacing_mm")
        infos[i] = (size, spacing, origin, direction)

    issues: list[Issue] = [Issue(i, "", "", "identical_image", "same pixels as " + ", ".join(
        f"{j} ({splits.get(j) or 'no split'})" for j in group if j != i), str(path_of[i]))
        for group in copies for i in group]
    issues += [Issue(i, "", "", "split_without_image", f"the split file assigns {i!r} to {splits[i]!r} but no image "
                     f"matching {spec.images!r} has this id (ids are case-sensitive)", str(root / str(spec.splits_file)))
               for i in orphans]
    issues += [Issue(i, "", "", "not_in_split", f"{origin_of_split} lists no split for {i!r}: the image is in no "
                     "split (ids are case-sensitive; a spreadsheet may have dropped leading zeros)", str(path_of[i]))
               for i in ids if i not in splits and (spec.splits_file or spec.subject_splits)]
    labels, chosen = spec.landmark_labels, {}
    fields = {i: _name_fields(spec, p) for i, p in zip(ids, paths)}
    read = {who: _read_annotations(spec, root, who, ids, fields) for who in spec.annotations}
    reference = cast(str, spec.reference)  # the first annotator; a declaration has at least one
    calibrated = calibrated_spacing(spec, read[reference][0], ids, infos) if spec.calibration else {}
    for who in spec.annotations:
        anns, absent, extra = read[who]
        issues += extra
        for i, p in zip(ids, paths):
            size, spacing, origin, direction = infos[i]
            records = anns.get(i, [])
            ann = records[0] if records else None
            format_spacing = ann.spacing if ann is not None else None
            given = calibrated[i][0] if spec.calibration else (spec.spacing_mm or format_spacing)
            sp = given or spacing
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
                chosen[i] = (geom, pts, valid, ann, given)
            issues += found

    samples = []
    for i, p in zip(ids, paths):
        geom, pts, valid, ann, given = chosen[i]
        issues += check_spacing(i, p, given is not None)
        if split is not None and splits.get(i) != split:
            continue
        if load_images:
            image, geom = image_from_sitk(read_image(p, given, ndim=spec.ndim))
        else:  # header only: a zero-stride placeholder with the right shape (no pixel memory)
            image = np.broadcast_to(np.float32(0.0), infos[i][0])
        meta = {"split": splits.get(i), "split_source": _split_source(spec), "annotator": annotator,
                "image_path": str(p), "image_loaded": load_images,
                "annotation_file": str(ann.source) if ann is not None else None,
                "landmark_labels": labels, "dataset": spec.name,
                "spacing_source": calibrated[i][1] if spec.calibration else
                ("declared spacing_mm" if spec.spacing_mm else "annotation format" if given is not None
                 else "image header")}
        samples.append(Sample(i, image, geom, pts, valid, spec.landmark_names, meta))
    return Dataset(spec, samples, make_report(issues), annotator, root, duplicates=copies)


def _subject_groups(spec: DatasetSpec, ids: Sequence[str]) -> list[list[str]]:
    """The declared subjects' image ids (groups of two or more, for the split checks); raises naming the
    declaration when a subject names an image that does not exist, or when ``subject_splits`` leaves an
    image without a split."""
    unknown = sorted({i for members in spec.subjects.values() for i in members} - set(ids))
    if unknown:
        raise ValueError(f"{spec.source or spec.name}: subjects: image id(s) {unknown} match no image of "
                         f"{spec.images!r} (ids: {list(ids)[:8]}{' ...' if len(ids) > 8 else ''})")
    if spec.subject_splits:
        placed = {i for names in spec.subject_splits.values() for name in names for i in spec.subjects[name]}
        left = sorted(set(ids) - placed)
        if left:
            raise ValueError(f"{spec.source or spec.name}: subject_splits: image(s) {left} are in no split (give "
                             "each a subject, and each subject a split)")
    return [list(members) for members in spec.subjects.values() if len(members) > 1]


def calibrated_spacing(spec: DatasetSpec, annotations: dict[str, list[RawAnnotation]], ids: Sequence[str],
                       infos: dict[str, tuple]) -> dict[str, tuple[tuple[float, ...], str]]:
    """image id -> (isotropic spacing (mm/px), how it was derived) from ``spec.calibration``: the declared distance
    (mm) between two landmarks divided by their pixel distance in the reference annotation of that image. An image
    whose annotation is missing, ambiguous or excluded, or where either landmark is masked, raises an error naming
    the file and the landmark (its spacing would otherwise be a guess)."""
    assert spec.calibration is not None
    a, b, mm = spec.calibration
    out = {}
    for i in ids:
        records = annotations.get(i, [])
        where = f"{spec.name}: image {i!r}"
        if len(records) != 1 or (spec.reference, i) in spec.exclude:
            what = ("has no annotation" if not records else f"has {len(records)} annotation records"
                    if len(records) > 1 else "is excluded")
            raise ValueError(f"{where} {what} by {spec.reference!r}, so its spacing cannot be derived from the "
                             f"distance of landmarks {a!r} and {b!r} (spacing_from_landmarks in {spec.source}); "
                             "remove the image or fix its annotation")
        ann = records[0]
        raw, valid, _ = resolve_landmarks(ann, [a, b], spec.reference or "", spec.ndim, warn=False)
        if not valid.all():
            bad = [lab for lab, v in zip((a, b), valid) if not v]
            raise ValueError(f"{ann.source} ({_where(ann)}): {where}: calibration landmark(s) {bad} missing or masked, "
                             f"so the spacing cannot be derived ({mm:g} mm between {a!r} and {b!r}, "
                             f"spacing_from_landmarks in {spec.source}); fix the annotation or remove the image")
        size, spacing, origin, direction = infos[i]
        index = raw if ann.units == "index" else Geometry(spacing, origin, direction).world_to_index(raw)
        px = float(np.linalg.norm(index[0] - index[1]))
        if not px > 0:
            raise ValueError(f"{ann.source} ({_where(ann)}): {where}: calibration landmarks {a!r} and {b!r} coincide")
        out[i] = ((mm / px,) * spec.ndim, f"{mm:g} mm between landmarks {a} and {b} ({px:.1f} px)")
    return out


def _split_source(spec: DatasetSpec) -> str:
    """Where the samples' splits come from, in words (for messages and manifests)."""
    if spec.single_template:
        return "random deformations of the template (60/20/20 % train/val/test)"
    if spec.subject_splits:
        return "by subject, declared in the dataset file (" + "; ".join(
            f"{sp}: {', '.join(names)}" for sp, names in spec.subject_splits.items()) + ")"
    if spec.splits_file:
        return f"the split file {spec.splits_file!r} (columns image_id,split)"
    return (f"a seeded split (fractions {list(spec.split_fractions)} train/val/test, seed {spec.split_seed}, by "
            f"{spec.split_by}; "
            "declare splits: or seeded_split: in the dataset file)")


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


def load_dataset(name: str | Path, data_dir: str | Path | None = None, split: str | None = None,
                 annotator: str | None = None, load_images: bool = True, **kwargs: Any) -> Dataset:
    """Load a dataset by name (``hamedan-ceph``, ``afids-mni``, ``isbi2015-ceph``, ``synthetic2d``,
    ``synthetic3d``) or by the path of its declaration file (``my_data.yaml``; see
    :mod:`lmlib.data.dataset_spec`).

    ``data_dir``: the dataset's folder, or the folder holding it (default: the folder a declaration file
    names, else ``shared_data_dir()/name``). ``split``: keep only ``train``/``val``/``test``.
    ``annotator``: whose landmarks (default: the reference); the report always covers every annotator.
    ``load_images=False`` reads headers only (fast; images become zero placeholders of the right shape).
    A dataset with ``posed_copies`` (afids-templates) takes ``posed``: True (the declared copies), False (the
    originals only, e.g. to inspect them) or a mapping overriding declared counts (``{"train": 1, "test": 1}``).
    A single-template dataset (afids-mni) takes ``deformed: int = 0`` (number of randomly deformed copies
    of the template from :func:`lmlib.data.deformations.deformed_copies`, which assigns their splits; the
    undeformed template follows them as one more ``test`` image; 0 = only the template), ``seed`` and
    further keywords for it. Synthetic datasets pass ``kwargs`` to
    :func:`lmlib.data.phantoms.make_phantom_dataset`.
    """
    if name in SYNTHETIC:
        return _load_synthetic(str(name), split, **kwargs)
    spec = get_spec(name)
    if split not in (None, "train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    deformed = int(kwargs.pop("deformed", 0)) if spec.single_template else 0
    seed = int(kwargs.pop("seed", 0)) if spec.single_template else 0
    posed_option = kwargs.pop("posed", True)
    posed = bool(posed_option) and spec.posed is not None
    posed_settings = {**(spec.posed or {}), **(posed_option if isinstance(posed_option, Mapping) else {})}
    if kwargs and not deformed:
        raise TypeError(f"load_dataset({str(name)!r}) got unexpected keyword arguments {sorted(kwargs)}")
    default = Path(spec.data_dir) if spec.data_dir else shared_data_dir() / spec.name
    root = Path(data_dir) if data_dir is not None else default
    if (root / spec.name).is_dir() and not any(root.glob(spec.images)):
        root = root / spec.name  # the shared data root was given
    if not root.is_dir():
        hint = (f"data_dir: in {spec.source}" if spec.data_dir else "Pass data_dir=... or set LMLIB_SHARED_DATA.")
        raise FileNotFoundError(f"{root}: data folder not found; expected dataset {spec.name!r} there "
                                f"({spec.description or spec.images}). {hint}")
    ds = load_from_spec(spec, root, annotator, load_images or deformed > 0 or posed,
                        None if spec.single_template else split)
    if posed:
        ds.samples = with_posed_copies(ds.samples, posed_settings)
    if spec.single_template:
        template = ds.samples[0]
        template.meta["split"] = "test"
        if deformed > 0:
            from lmlib.data.deformations import deformed_copies
            copies = deformed_copies(template, n=deformed, seed=seed, **kwargs)
            ds.samples, ds.template = [*copies, template], template
    if split is not None:
        ds.samples = ds.split(split)
    return ds


def subject_of(name: str | Path, image_ids: Sequence[str]) -> dict[str, str]:
    """image id -> subject (a declaration's ``subjects:``) for the given ids; a posed copy
    (``<id>_poseNN``) belongs to its original's subject. Empty for a data set without subjects."""
    if str(name) in SYNTHETIC:
        return {}
    members = {i: subject for subject, ids in get_spec(name).subjects.items() for i in ids}
    out = {}
    for image_id in image_ids:
        original = re.sub(r"_pose\d+$", "", str(image_id))
        if original in members:
            out[str(image_id)] = members[original]
    return out


def subjects_of_all(name: str | Path, image_ids: Sequence[str]) -> list[str] | None:
    """The subject of each of ``image_ids`` (:func:`subject_of`) where the data set declares one for every id, else
    None (the images are then the units)."""
    ids = [str(i) for i in image_ids]
    found = subject_of(name, ids) if ids else {}
    return [found[i] for i in ids] if found and all(i in found for i in ids) else None


def with_posed_copies(samples: Sequence[Sample], settings: Mapping[str, Any]) -> list[Sample]:
    """The samples a posed dataset is made of (``posed_copies:`` of its declaration): per image, as many
    random posed copies as its split asks for (:func:`lmlib.data.deformations.posed_copies`; each copy's
    seed depends only on the seed, the image id and the copy number); a training image is replaced by its
    copies, a val/test image keeps its unposed original after them (an image of the template frame, as
    published). Progress is shown per image (resampling a 1-mm brain takes seconds)."""
    from tqdm.auto import tqdm

    from lmlib.data.deformations import posed_copies
    from lmlib.runtime import bars_disabled

    ranges = {k: float(v) for k, v in settings.items() if k not in ("train", "val", "test", "seed")}
    out: list[Sample] = []
    for s in tqdm(samples, desc="posed copies", unit="image", disable=len(samples) < 2 or bars_disabled()):
        split = s.meta.get("split")
        copies = posed_copies(s, int(settings.get(split, 0)) if split else 0, int(settings.get("seed", 0)), **ranges)
        for c in copies:
            c.meta["split"] = split
        out += copies
        if split in ("val", "test"):
            s.meta["posed_from"] = None  # the unposed original
            out.append(s)
    return out


def paired_landmarks(a: Dataset, b: Dataset) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """World landmarks ``(K, N, D)`` of the images two datasets share (e.g. two annotators), in ``a``'s
    order, and their ids. Masked points are NaN in either array."""
    mine, other = {s.image_id: s for s in a.samples}, {s.image_id: s for s in b.samples}
    ids = [s.image_id for s in a.samples if s.image_id in other]
    la = np.stack([mine[i].landmarks_mm for i in ids]) if ids else np.zeros((0, len(a.landmark_names), a.spec.ndim))
    lb = np.stack([other[i].landmarks_mm for i in ids]) if ids else np.zeros_like(la)
    return la, lb, ids
