"""What a dataset is made of, and its declaration file (YAML) -> :class:`DatasetSpec`.

A dataset is declared by a small YAML file: the built-in ones (``hamedan-ceph``, ``afids-mni``,
``isbi2015-ceph``) by the files in ``lmlib/data/declared/``, a user's by its path, accepted wherever a
dataset name is (``load_dataset``, the notebooks' ``dataset`` parameter, ``python -m lmlib.run --dataset``).
Paths inside the file are relative to the data folder, which is ``data_dir`` (relative to the file;
default: the file's own folder) for a user file and the shared data folder for a built-in one.

Keys (``name``, ``ndim``, ``images``, ``reader``, ``annotations`` and ``landmarks`` are required)::

    name: hand-xray                  # folder name of the results: results/<name>/<method>
    description: 37 landmarks on hand radiographs
    ndim: 2                          # 2 or 3
    data_dir: .                      # the data folder, relative to this file (default: its folder)
    images: images/*.mha             # glob, relative to the data folder
    image_id_regex: null             # regex whose group 1 is the image id (default: the name before the first '.');
                                     # its named groups, e.g. (?P<template>...), may appear in annotation file names
    reader: points_csv               # landmark reader (lmlib.data.readers.READERS)
    reader_options: {}               # keyword arguments of that reader
    annotations:                     # annotator -> file; {image_id} = one file per image; the first is the reference
      expert: annotations.csv
    spacing_mm: null                 # override (x, y[, z]) mm/px for images whose headers carry none
    spacing_from_landmarks: null     # {landmarks: [label a, label b], distance_mm: 50}: isotropic spacing per image
                                     # = distance_mm / the reference annotator's pixel distance a-b (calibration)
    landmarks:                       # label in the files + display name (a plain string: both)
      - {label: "1", name: thumb tip}  # or a count: `landmarks: 37` = labels and names "1".."37"
    left_right_pairs: []             # [left name, right name] pairs (swapped by mirror augmentation)
    landmark_groups: {}              # group -> names on one shared plane (the prior-guided 3D method)
    splits: splits.csv               # CSV image_id,split (train/val/test); absent: a seeded split
    subjects: {}                     # subject -> [image ids]: images of one subject (anatomy) stay on one side
    subject_splits: {}               # {train: [subjects], val: [...], test: [...]}: the split, by subject
    landmarks_from: null             # another declaration file (relative to this one) whose landmarks,
                                     # left_right_pairs and landmark_groups this data set shares
    posed_copies: null               # {train: n, val: n, test: n, seed, rotation_deg, translation_mm, scale,
                                     #  elastic_mm}: each image is replaced by n random posed copies (val/test
                                     #  keep the unposed original too); see lmlib.data.deformations.posed_copies
    seeded_split: {fractions: [0.6, 0.2, 0.2], seed: 0, by: shuffle}   # used only when there is no splits file;
                                     # by: hash keeps every image in its split when images are added
    exclude: []                      # [{annotator, image_id, reason}]: that annotation masked entirely
    single_template: false           # one annotated template; training images are random deformations of it
    notes: []                        # sentences every comparison of this dataset repeats (known caveats)

An unknown key, a missing required key, or a value of the wrong kind raises an error naming the file
and the key. The keys' types and meanings are one typed model, :class:`DatasetDeclaration` (its JSON schema:
:func:`declaration_schema`, published in the documentation).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from lmlib.data.readers import read_text
from lmlib.typed import field as _key
from lmlib.typed import model_table

DEFAULT_SPLIT_FRACTIONS: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train, val, test of a seeded split
SYNTHETIC: tuple[str, ...] = ("synthetic2d", "synthetic3d")  # generated data sets (lmlib.data.phantoms)
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")  # the values of a split file's split column
SPLIT_BY: tuple[str, ...] = ("shuffle", "hash")  # how a seeded split assigns images (lmlib.data.datasets.seeded_splits)
PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a dataset name: one plain folder name under results/
DECLARED_DIR = Path(__file__).with_name("declared")  # the built-in declaration files
FILE_SUFFIXES = (".yaml", ".yml")


@dataclass
class DatasetSpec:
    """What a dataset is made of (paths relative to its data folder).

    ``annotations`` maps annotator -> path template: with ``{image_id}`` one file per image, else one
    file for all images (or for the only image). The first annotator is the reference.
    ``landmark_labels`` are the labels in the files, ``landmark_names`` the display names (same order).
    ``spacing_mm`` overrides the image spacing ``(x, y[, z])``; ``lr_pairs`` are (left, right) display
    names; ``exclude`` maps (annotator, image_id) -> reason (that annotation is masked entirely);
    ``landmark_groups`` maps a group name -> display names of landmarks that the annotation protocol places
    on one shared plane (refined jointly by the prior-guided 3D method). Without ``splits_file`` the loader
    makes a seeded split (``split_fractions`` train/val/test, ``split_seed``, ``split_by``), the same for every
    notebook.
    ``single_template``: one annotated image whose random deformations are the train/val/test images.
    ``notes``: caveats every comparison of the dataset repeats. ``calibration``: ``(label a, label b,
    distance_mm)``: each image's spacing is isotropic, ``distance_mm``
    divided by the pixel distance between landmarks a and b of the reference annotator in that image (the hand
    X-ray protocol of Payer et al.: landmarks 2 and 6 are 50 mm apart); an image where either is masked fails.
    ``source``: the declaration file; ``data_dir``: the data folder it names (absolute), if any.
    ``subjects``: subject -> image ids (images of one subject are never on two sides of a split);
    ``subject_splits``: split -> subjects (the split, declared by subject); ``posed``: the posed-copy
    settings (:data:`POSED_KEYS`; counts per split, seed, pose and deformation ranges).
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
    split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS
    split_seed: int = 0
    split_by: str = "shuffle"
    single_template: bool = False
    source: str | None = None
    data_dir: str | None = None
    calibration: tuple[str, str, float] | None = None
    notes: tuple[str, ...] = ()
    subjects: dict[str, tuple[str, ...]] = field(default_factory=dict)
    subject_splits: dict[str, tuple[str, ...]] = field(default_factory=dict)
    posed: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        where = self.source or self.name
        if self.ndim not in (2, 3):
            raise ValueError(f"{where}: ndim must be 2 or 3, got {self.ndim!r}")
        if len(self.landmark_labels) != len(self.landmark_names):
            raise ValueError(f"{where}: {len(self.landmark_labels)} labels but {len(self.landmark_names)} names")
        repeated = sorted({x for x in self.landmark_labels if list(self.landmark_labels).count(x) > 1})
        if repeated:
            raise ValueError(f"{where}: landmark labels {repeated} are given more than once")
        repeated = sorted({x for x in self.landmark_names if list(self.landmark_names).count(x) > 1})
        if repeated:
            raise ValueError(f"{where}: landmark names {repeated} are given to more than one landmark (each name "
                             "heads a column of the per-landmark tables: make them distinct)")
        unknown = sorted({a for a, _ in self.exclude} - set(self.annotations)) if self.annotations else []
        if unknown:
            raise ValueError(f"{where}: exclude names annotator(s) {unknown}, not among the annotators "
                             f"{list(self.annotations)} (names are case-sensitive)")
        if self.spacing_mm is not None and (len(self.spacing_mm) != self.ndim or
                                            not all(np.isfinite(v) and v > 0 for v in self.spacing_mm)):
            raise ValueError(f"{where}: spacing_mm {tuple(self.spacing_mm)} must be {self.ndim} positive numbers")
        unpaired = {n for pair in self.lr_pairs for n in pair} - set(self.landmark_names)
        if unpaired:
            raise ValueError(f"{where}: left/right pairs name unknown landmarks {sorted(unpaired)}")
        for group, members in self.landmark_groups.items():
            unknown = sorted(set(members) - set(self.landmark_names))
            if unknown or len(set(members)) < 2:
                raise ValueError(f"{where}: landmark group {group!r} must name at least 2 distinct landmarks of "
                                 f"the dataset (unknown: {unknown}, members: {list(members)})")
        if self.calibration is not None:
            a, b, mm = self.calibration
            unknown = sorted({a, b} - set(self.landmark_labels))
            if unknown or a == b or not (np.isfinite(mm) and mm > 0):
                raise ValueError(f"{where}: spacing_from_landmarks must name two different landmark labels of the "
                                 f"dataset and a distance_mm > 0 (unknown labels: {unknown}, distance_mm: {mm})")
            if self.spacing_mm is not None:
                raise ValueError(f"{where}: spacing_mm and spacing_from_landmarks both give the spacing: keep one")
        listed = [i for ids in self.subjects.values() for i in ids]
        twice = sorted({i for i in listed if listed.count(i) > 1})
        if twice:
            raise ValueError(f"{where}: subjects: image id(s) {twice} belong to more than one subject")
        if self.subject_splits:
            if set(self.subject_splits) - set(SPLIT_NAMES):
                raise ValueError(f"{where}: subject_splits: keys must be among {list(SPLIT_NAMES)}, got "
                                 f"{sorted(self.subject_splits)}")
            named = [x for xs in self.subject_splits.values() for x in xs]
            unknown = sorted(set(named) - set(self.subjects))
            twice = sorted({x for x in named if named.count(x) > 1})
            if unknown or twice:
                raise ValueError(f"{where}: subject_splits: " + "; ".join(
                    ([f"unknown subject(s) {unknown} (declared: {sorted(self.subjects)})"] if unknown else []) +
                    ([f"subject(s) {twice} on more than one side"] if twice else [])))
            if self.splits_file:
                raise ValueError(f"{where}: splits and subject_splits both give the split: keep one")
        if self.posed is not None:
            bad = {k: v for k, v in self.posed.items() if k not in POSED_KEYS or not _number(v) or v < 0}
            if bad or not any(self.posed.get(k, 0) for k in SPLIT_NAMES):
                raise ValueError(f"{where}: posed_copies: {bad or self.posed} must be numbers >= 0 among "
                                 f"{list(POSED_KEYS)}, with copies for at least one split")
            if self.single_template:
                raise ValueError(f"{where}: single_template and posed_copies both make the images: keep one")
        if self.split_by not in SPLIT_BY:
            raise ValueError(f"{where}: seeded_split: by must be one of {list(SPLIT_BY)}, got {self.split_by!r}")
        f = [float(v) for v in self.split_fractions]
        if len(f) != 3 or min(f) < 0 or abs(sum(f) - 1.0) > 1e-6:
            raise ValueError(f"{where}: seeded split fractions must be three numbers >= 0 (train, val, test) "
                             f"summing to 1, got {f}")

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


#: posed_copies keys: copies per image of each split, the seed, and the pose/deformation ranges (see
#: :func:`lmlib.data.deformations.posed_copies` for their defaults and units)
POSED_KEYS = ("train", "val", "test", "seed", "rotation_deg", "translation_mm", "scale", "elastic_mm",
              "elastic_spacing_mm")

def _empty_if_null(empty: Any) -> BeforeValidator:
    """YAML ``key:`` with no value (null), or an empty value of another kind (``[]`` for a mapping), reads as the
    empty value; a mapping's keys are taken by their text (YAML reads ``1:`` as a number)."""
    def convert(v: Any) -> Any:
        if v is None or (not v and isinstance(v, (list, dict, str))):
            return type(empty)()
        return {str(k): x for k, x in v.items()} if isinstance(v, dict) else v
    return BeforeValidator(convert)


def _text_keys(v: Any) -> Any:
    return {str(k): x for k, x in v.items()} if isinstance(v, dict) else v


def _integral(v: Any) -> Any:
    """``2.0`` is 2 (an integral float); other values as given."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


_Text = Annotated[str, Field(strict=True)]
_Label = _Text | Annotated[int, Field(strict=True)]
_Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class LandmarkEntry(BaseModel):
    """One ``landmarks:`` entry: the label in the annotation files and the display name (default: the label)."""

    model_config = ConfigDict(extra="forbid")
    label: _Label
    name: _Label | None = None


class Calibration(BaseModel):
    """``spacing_from_landmarks``: two landmark labels and their true distance."""

    model_config = ConfigDict(extra="forbid")
    landmarks: Annotated[list[_Label], Field(min_length=2, max_length=2)]
    distance_mm: _Number


class SeededSplit(BaseModel):
    """``seeded_split``: the fractions and seed of the split made when there is no split file."""

    model_config = ConfigDict(extra="forbid")
    fractions: list[_Number] = list(DEFAULT_SPLIT_FRACTIONS)
    seed: Annotated[int, Field(strict=True, ge=0)] = 0
    #: shuffle: exactly round(fraction x n) images per split, drawn over all images (adding images moves old ones);
    #: hash: each image by a hash of the seed and its id (adding images moves none; the counts are near the fractions)
    by: Literal["shuffle", "hash"] = "shuffle"


class Exclusion(BaseModel):
    """One ``exclude`` entry: an annotator's annotation of one image masked entirely, with the reason."""

    model_config = ConfigDict(extra="forbid")
    annotator: _Label
    image_id: _Label
    reason: _Label


class DatasetDeclaration(BaseModel):
    """A dataset declaration file's keys (YAML): their types and meanings, the shape every file is checked against
    before the checks that need the data set's context (landmark names, readers, the built-in names). Its JSON
    schema is published in the documentation (``reference/datasets``)."""

    model_config = ConfigDict(extra="forbid", title="lmlib dataset declaration")

    name: _Text = _key(..., "folder name of the results: results/<name>/<method>", "a plain folder name")
    description: Annotated[_Text, _empty_if_null("")] = _key("", "one line shown in tables", "a string")
    ndim: Annotated[int, Field(strict=True, ge=2, le=3), BeforeValidator(_integral)] = _key(..., "image dimension",
                                                                                            "2 or 3")
    data_dir: _Text | None = _key(None, "the data folder, relative to this file (default: its folder)", "a string")
    images: Annotated[_Text, Field(min_length=1)] = _key(
        ..., "glob of the images, relative to the data folder", "a glob relative to the data folder (set data_dir: "
        "for another folder)")
    image_id_regex: _Text | None = _key(
        None, "regex whose group 1 is the image id (default: the name before the first '.'); its named groups may "
        "appear in annotation file names", "a string")
    reader: _Text = _key(..., "landmark reader (lmlib.data.readers.READERS)", "a reader name")
    reader_options: Annotated[dict[str, Any], _empty_if_null({})] = _key(
        {}, "keyword arguments of that reader", "a mapping of the reader's keyword arguments")
    annotations: Annotated[dict[str, _Text], Field(min_length=1), BeforeValidator(_text_keys)] = _key(
        ..., "annotator -> file; {image_id} = one file per image; the first annotator is the reference",
        "a mapping annotator -> file (with {image_id} for one file per image)")
    spacing_mm: list[_Number] | None = _key(
        None, "(x, y[, z]) mm/px for images whose headers carry none", "null or a list of numbers (mm)")
    spacing_from_landmarks: Calibration | None = _key(
        None, "isotropic spacing per image = distance_mm / the reference annotator's pixel distance between the two "
        "landmarks (calibration)", "null or {landmarks: [label a, label b], distance_mm: number}")
    landmarks: Annotated[int, Field(strict=True, ge=1)] | Annotated[
        list[_Label | LandmarkEntry], Field(min_length=1)] = _key(
        ..., "the landmarks: a count (37: labels and names '1'..'37') or a list of labels or {label, name}",
        "a count (e.g. 37: labels '1'..'37') or a non-empty list of {label, name} entries or strings")
    left_right_pairs: Annotated[list[Annotated[list[_Label], Field(min_length=2, max_length=2)]],
                                _empty_if_null([])] = _key(
        [], "[left name, right name] pairs (swapped by mirror augmentation)", "a list of [left name, right name] pairs")
    landmark_groups: Annotated[dict[str, list[_Label]], _empty_if_null({})] = _key(
        {}, "group -> names of landmarks on one shared plane (the prior-guided 3D method)",
        "a mapping group -> list of landmark names")
    splits: _Text | None = _key(None, "CSV image_id,split (train/val/test); absent: a seeded split", "a string")
    seeded_split: Annotated[SeededSplit, _empty_if_null({})] = _key(
        SeededSplit(), "used only when there is no splits file",
        "a mapping with fractions: [train, val, test] (three numbers), seed: an integer >= 0 and by: shuffle or hash")
    exclude: Annotated[list[Exclusion], _empty_if_null([])] = _key(
        [], "annotations masked entirely, each with its reason", "a list of {annotator, image_id, reason}")
    single_template: Annotated[bool, Field(strict=True)] = _key(
        False, "one annotated template; training images are random deformations of it", "true or false")
    notes: Annotated[list[_Text], _empty_if_null([])] = _key(
        [], "sentences every comparison of this dataset repeats (known caveats)", "a list of sentences")
    subjects: Annotated[dict[str, Annotated[list[_Label], Field(min_length=1)]], _empty_if_null({})] = _key(
        {}, "subject -> image ids: images of one subject (anatomy) stay on one side of a split",
        "a mapping subject -> list of image ids")
    subject_splits: Annotated[dict[str, list[_Label]], _empty_if_null({})] = _key(
        {}, "the split by subject: {train: [subjects], val: [...], test: [...]}",
        "a mapping split (train/val/test) -> list of subjects")
    landmarks_from: _Text | None = _key(
        None, "another declaration file (relative to this one) whose landmarks, left_right_pairs and "
        "landmark_groups this data set shares", "a string")
    posed_copies: dict[str, Any] | None = _key(
        None, "each image replaced by random posed copies: {train: n, val: n, test: n, seed, rotation_deg, "
        "translation_mm, scale, elastic_mm} (val/test keep the unposed original too)",
        "null or a mapping of " + ", ".join(POSED_KEYS))


REQUIRED = tuple(k for k, f in DatasetDeclaration.model_fields.items() if f.is_required())
OPTIONAL = tuple(k for k, f in DatasetDeclaration.model_fields.items() if not f.is_required())
SHARED_BY_LANDMARKS_FROM = ("landmarks", "left_right_pairs", "landmark_groups")


def declaration_schema() -> dict[str, Any]:
    """The JSON schema of a dataset declaration file (for editors and the documentation)."""
    return DatasetDeclaration.model_json_schema()


def declaration_table() -> str:
    """The declaration keys as a Markdown table (key, required or default, accepts, meaning)."""
    return model_table(DatasetDeclaration, header="key")


def is_dataset_file(name: str | Path) -> bool:
    """Whether ``name`` names a declaration file (``.yaml``/``.yml``) rather than a built-in dataset."""
    return str(name).lower().endswith(FILE_SUFFIXES)


def declared_files() -> dict[str, Path]:
    """Built-in dataset name -> its declaration file (``lmlib/data/declared/*.yaml``)."""
    return {p.stem: p for p in sorted(DECLARED_DIR.glob("*.yaml"))}


def read_dataset_file(path: str | Path, readers: Mapping[str, Any] | None = None) -> DatasetSpec:
    """Parse and check a dataset declaration file; errors name the file and the key. ``readers``: the
    known reader names (checked when given)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: dataset declaration file not found")
    try:
        raw = yaml.safe_load(read_text(p))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ValueError(f"{p}: {where}not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    return spec_from_mapping(raw, p, readers)


def spec_from_mapping(raw: Any, path: Path, readers: Mapping[str, Any] | None = None) -> DatasetSpec:
    """The :class:`DatasetSpec` a parsed declaration describes (see the module docstring for the keys)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of keys (name, ndim, images, ...), got {type(raw).__name__}")
    if raw.get("landmarks_from") is not None:
        raw = _with_shared_landmarks(raw, path)
    missing = [k for k in REQUIRED if k not in raw]
    unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
    if missing or unknown:
        raise ValueError(f"{path}: " + "; ".join(
            ([f"missing key(s) {missing}"] if missing else []) + ([f"unknown key(s) {unknown}"] if unknown else [])) +
            f" (keys: {list(REQUIRED)} required, {list(OPTIONAL)} optional)")

    def need(key: str, ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"{path}: {key}: must be {what}, got {raw.get(key)!r}")

    try:  # the shape of every key (the model); then the checks that need the context
        decl = DatasetDeclaration.model_validate(raw)
    except ValidationError as exc:
        errors = [e for e in exc.errors() if e["loc"]]
        key = str(errors[0]["loc"][0]) if errors else "name"
        extra = DatasetDeclaration.model_fields[key].json_schema_extra if key in DatasetDeclaration.model_fields else {}
        need(key, False, str((extra.get("allowed") if isinstance(extra, dict) else None) or "valid"))
        raise  # unreachable: need raised
    builtin = {*SYNTHETIC, *declared_files()} if not path.resolve().is_relative_to(DECLARED_DIR.resolve()) else set()
    need("name", PLAIN_NAME.match(decl.name.strip()) is not None and decl.name.strip() not in builtin,
         "a plain folder name (letters, digits, '.', '_', '-'; results go to results/<name>/) that is not a "
         f"built-in data set's ({', '.join(sorted(builtin))})")
    need("images", not Path(decl.images).is_absolute() and not Path(decl.images).drive,
         "a glob relative to the data folder (set data_dir: for another folder)")
    need("reader", readers is None or decl.reader in readers,
         f"one of {sorted(readers)}" if readers is not None else "a reader name")
    labels, names = _landmarks(raw["landmarks"], path)
    if readers is not None:
        accepted = _keyword_names(readers[decl.reader])
        unknown = sorted(set(map(str, decl.reader_options)) - set(accepted))
        if unknown:
            raise ValueError(f"{path}: reader_options: {unknown} not accepted by reader {decl.reader!r} "
                             f"(its options: {accepted or 'none'})")
    if decl.image_id_regex is not None:
        try:
            n_groups = re.compile(decl.image_id_regex).groups
        except re.error as exc:
            raise ValueError(f"{path}: image_id_regex: {decl.image_id_regex!r} is not a valid regular "
                             f"expression ({exc})") from None
        need("image_id_regex", n_groups >= 1, "a regular expression whose group 1 is the image id, e.g. "
             "'^(\\d+)_' (it has no group)")
    spacing, calib, seeded = decl.spacing_mm, decl.spacing_from_landmarks, decl.seeded_split
    data_dir = None
    if decl.data_dir is not None or not path.resolve().is_relative_to(DECLARED_DIR.resolve()):
        data_dir = str((path.parent / (decl.data_dir or ".")).resolve())
    try:
        return DatasetSpec(
            name=decl.name.strip(), ndim=decl.ndim, images=decl.images, reader=decl.reader,
            annotations={str(k): v for k, v in decl.annotations.items()}, landmark_labels=labels, landmark_names=names,
            spacing_mm=tuple(float(v) for v in spacing) if spacing is not None else None,
            lr_pairs=tuple((str(a), str(b)) for a, b in decl.left_right_pairs), splits_file=decl.splits,
            image_id_regex=decl.image_id_regex,
            exclude={(str(e.annotator), str(e.image_id)): str(e.reason) for e in decl.exclude},
            reader_kwargs=dict(decl.reader_options), description=decl.description,
            landmark_groups={str(g): tuple(str(n) for n in v) for g, v in decl.landmark_groups.items()},
            # three values: DatasetSpec checks the count (and raises the message below otherwise)
            split_fractions=cast("tuple[float, float, float]", tuple(float(v) for v in seeded.fractions)),
            split_seed=seeded.seed, split_by=seeded.by, single_template=decl.single_template,
            source=str(path), data_dir=data_dir,
            calibration=(str(calib.landmarks[0]), str(calib.landmarks[1]), float(calib.distance_mm))
            if calib is not None else None, notes=tuple(decl.notes),
            subjects={str(k): tuple(str(i) for i in v) for k, v in decl.subjects.items()},
            subject_splits={str(k): tuple(str(x) for x in v) for k, v in decl.subject_splits.items()},
            posed=dict(decl.posed_copies) if decl.posed_copies is not None else None)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        raise ValueError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def _with_shared_landmarks(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """``raw`` with the landmark keys (:data:`SHARED_BY_LANDMARKS_FROM`) of the declaration ``landmarks_from``
    names (one list of names for data sets of the same protocol); keys ``raw`` gives itself are an error."""
    import yaml

    other = path.parent / str(raw["landmarks_from"])
    if not other.is_file():
        raise ValueError(f"{path}: landmarks_from: {other} not found (a declaration file, relative to this one)")
    given = sorted(k for k in SHARED_BY_LANDMARKS_FROM if k in raw)
    if given:
        raise ValueError(f"{path}: landmarks_from gives {list(SHARED_BY_LANDMARKS_FROM)}: remove {given} here")
    source = yaml.safe_load(read_text(other)) or {}
    return {**{k: source[k] for k in SHARED_BY_LANDMARKS_FROM if k in source}, **raw}


def _keyword_names(reader: Any) -> list[str]:
    """The options a reader takes besides the file path (its keyword parameters after the first)."""
    import inspect

    params = list(inspect.signature(reader).parameters.values())[1:]
    return [q.name for q in params if q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _landmarks(items: Any, path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``landmarks:`` entries -> (labels, names): each a ``{label, name}`` mapping or one string for both."""
    if isinstance(items, int) and not isinstance(items, bool) and items >= 1:
        return tuple(str(k) for k in range(1, items + 1)), tuple(str(k) for k in range(1, items + 1))
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: landmarks: must be a count (e.g. 37: labels '1'..'37') or a non-empty list of "
                         "{label, name} entries or strings")
    labels, names = [], []
    for k, item in enumerate(items, start=1):
        if isinstance(item, (str, int)) and not isinstance(item, bool):
            labels.append(str(item))
            names.append(str(item))
        elif isinstance(item, dict) and set(item) <= {"label", "name"} and "label" in item:
            labels.append(str(item["label"]))
            names.append(str(item["label"] if item.get("name") is None else item["name"]))
        else:
            raise ValueError(f"{path}: landmarks: entry {k} ({item!r}) must be a string or {{label: ..., name: ...}}")
    return tuple(labels), tuple(names)
