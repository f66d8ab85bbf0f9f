"""Identical images in a dataset, found by pixel content (never by file name), and splits that keep them together.

Real collections hold copies: hamedan-ceph has four pairs of files that are the same picture byte for byte, and
the first version of its split put copies of training images into val and test. :func:`pixel_digest` hashes
an image's decoded pixels with its size and pixel type (so a PNG and a lossless re-encoding of it agree, and
the header's spacing or origin do not matter); :func:`duplicate_groups` groups ids with equal digests;
:func:`check_split_duplicates` refuses a split that puts one group on two sides, naming the files.
Only images of equal size can be equal, so only those are decoded (headers are read first).
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lmlib.data.readers import read_image, read_image_info


@lru_cache(maxsize=4096)
def _digest(path: str, size_bytes: int, mtime_ns: int) -> str:
    image = read_image(path)
    pixels = np.ascontiguousarray(sitk.GetArrayViewFromImage(image))
    h = hashlib.sha1(f"{pixels.dtype.str}{pixels.shape}".encode())
    h.update(pixels.tobytes())
    return h.hexdigest()


def pixel_digest(path: str | Path) -> str:
    """SHA-1 of the decoded pixels (gray), their shape and type; cached per file version in this process."""
    p = Path(path)
    st = p.stat()
    return _digest(str(p.resolve()), st.st_size, st.st_mtime_ns)


def duplicate_groups(paths: Mapping[str, str | Path]) -> list[list[str]]:
    """Groups (sorted, >= 2 ids each) of image ids whose files hold the same pixels; ``paths``: id -> file.
    Images are decoded only when another image has the same size (read from the headers)."""
    by_size: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for image_id, p in paths.items():
        by_size[read_image_info(p)[0]].append(image_id)
    groups: list[list[str]] = []
    for ids in by_size.values():
        if len(ids) < 2:
            continue
        by_digest: dict[str, list[str]] = defaultdict(list)
        for image_id in ids:
            by_digest[pixel_digest(paths[image_id])].append(image_id)
        groups += [sorted(g) for g in by_digest.values() if len(g) > 1]
    return sorted(groups)


def keep_groups_together(splits: Mapping[str, str], groups: Sequence[Sequence[str]]) -> dict[str, str]:
    """``splits`` with every member of a group moved to the split of the group's first id (for seeded splits)."""
    out = dict(splits)
    for group in groups:
        for image_id in group[1:]:
            out[image_id] = out[group[0]]
    return out


def check_split_duplicates(groups: Sequence[Sequence[str]], splits: Mapping[str, str | None],
                           paths: Mapping[str, str | Path], where: str,
                           kind: str = "identical images (same pixels)") -> None:
    """Raise ``ValueError`` naming the files when one group of images (identical images, or one subject's
    images: ``kind``) spans two splits (``where``: the dataset and the origin of its splits, for the message)."""
    bad = [g for g in groups if len({splits.get(i) for i in g}) > 1]
    if bad:
        lines = "; ".join(" = ".join(f"{Path(paths[i]).name} ({splits.get(i) or 'no split'})" for i in g)
                          for g in bad)
        raise ValueError(f"{where}: {kind} on two sides of the split: {lines}. They must be in one split "
                         "(else a test image is a training image): edit the split so that each group is in one split")
