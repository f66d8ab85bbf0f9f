"""Run manifests: what produced a results folder, so a run can be checked and repeated.

``manifest.json`` holds all parameters, the git commit (and whether the tree had local changes),
package versions, a data checksum, seed, device, and start/end times (UTC, ISO 8601).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmlib.data.sample import Sample
from lmlib.outputs.contract import write_json
from lmlib.runtime import environment_summary, peak_rss_mb


def utc_now() -> str:
    """Current UTC time, ISO 8601 with seconds."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


#: seconds ``git status`` may take: in a fresh worktree whose results/ files were just copied in, git re-reads
#: every tracked file once (18 s on a 2-core machine), which a 10-s limit turned into "git_dirty: null"
GIT_TIMEOUT_S = 300


def git_state(repo: Path | str = ".") -> dict[str, Any]:
    """Commit hash and dirty flag of the repository containing ``repo``; outside git, the commit named
    by ``$LMLIB_GIT_COMMIT`` (a copied working tree), else None."""
    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    # results/ (and a --results-dir beside it, results-refit/) holds the runs' own outputs, and the comparison rewrites
    # the README's generated results block (README.md): rewriting them does not make the code "dirty" (every
    # comparison of a full run said it was). A new file that is not committed does (a method module being written):
    # HEAD alone would not reproduce the run.
    status = git("status", "--porcelain", "--untracked-files=normal", "--", ":(top)", ":(top,exclude)results*",
                 ":(top,exclude)README.md")
    if commit is None and os.environ.get("LMLIB_GIT_COMMIT"):  # a copied tree (cluster node, container)
        return {"git_commit": os.environ["LMLIB_GIT_COMMIT"], "git_dirty": None}
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None}


class SampleChecksum:
    """SHA-256 over every sample's id, image bytes, geometry and landmarks, fed in order (``update`` per batch),
    so that samples read one batch at a time need not be held together."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, samples: Iterable[Sample]) -> None:
        for s in samples:
            self._h.update(s.image_id.encode())
            self._h.update(np.ascontiguousarray(s.image, dtype=np.float32).tobytes())
            for arr in (s.geometry.spacing, s.geometry.origin, s.geometry.direction,
                        np.nan_to_num(s.landmarks_mm, nan=-1e9), s.valid.astype(np.uint8)):
                self._h.update(np.ascontiguousarray(arr).tobytes())
            self._h.update("|".join(s.landmark_names).encode())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def checksum_samples(samples: Iterable[Sample]) -> str:
    """:class:`SampleChecksum` of ``samples``: the same data (real or synthetic, after reading and masking) gives
    the same checksum."""
    h = SampleChecksum()
    h.update(samples)
    return h.hexdigest()


def checksum_files(root: Path | str) -> str:
    """SHA-256 over the relative paths and contents of every file below ``root`` (sorted)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: data directory not found")
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


@dataclass
class RunRecord:
    """Collects a run's manifest: create at the start of a notebook, :meth:`write` at the end."""

    parameters: dict[str, Any]
    started: str = field(default_factory=utc_now)

    def write(self, output_dir: Path | str, data_checksum: str | None, seed: int | None = None,
              device: Any = None, extra: dict[str, Any] | None = None) -> Path:
        """Write ``manifest.json`` into ``output_dir`` and return its path."""
        record: dict[str, Any] = {
            "parameters": self.parameters,
            **git_state(Path(__file__).resolve().parent),
            "data_checksum": data_checksum,
            "seed": seed if seed is not None else self.parameters.get("seed"),
            "device": str(device if device is not None else self.parameters.get("device")),
            "started": self.started,
            "finished": utc_now(),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "environment": environment_summary(),
        }
        record.update(extra or {})
        return write_json(Path(output_dir) / "manifest.json", record)


def write_manifest(output_dir: Path | str, parameters: dict[str, Any], samples: Iterable[Sample] | None = None,
                   data_dir: Path | str | None = None, seed: int | None = None, device: Any = None,
                   started: str | None = None, extra: dict[str, Any] | None = None, checksum: str | None = None
                   ) -> Path:
    """One-call manifest: the data checksum is ``checksum`` if given, else from ``samples``, else ``data_dir``'s
    files. With ``samples``, also the split each image was in (:func:`split_record`)."""
    samples = list(samples) if samples is not None else None
    if checksum is None and samples is not None:
        checksum = checksum_samples(samples)
    elif checksum is None and data_dir:
        checksum = checksum_files(data_dir)
    record = RunRecord(parameters, started or utc_now())
    splits = split_record(samples) if samples is not None else {}
    return record.write(output_dir, checksum, seed=seed, device=device, extra={**splits, **(extra or {})})


#: every method run's split, one row per image (``image_id,split``: the split file format), in its run folder
SPLITS_FILE = "splits.csv"


def image_splits(samples: Iterable[Sample]) -> dict[str, str]:
    """image_id -> split of ``samples`` (a refit's copies of its val images left out: they are the val images)."""
    return {s.image_id: str(s.meta.get("split") or "") for s in samples if not s.meta.get("refit")}


def write_split_file(samples: Iterable[Sample], output_dir: Path | str) -> Path:
    """``<output_dir>/splits.csv``: the split of every image of the data set as this run saw it (a refit's copies of
    its val images left out: they are the val images), so that the run can later be checked against the data's
    split of the day (:func:`check_same_split`) and a seeded split declared as a split file."""
    import pandas as pd

    splits = image_splits(samples)
    path = Path(output_dir) / SPLITS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"image_id": list(splits), "split": list(splits.values())}).to_csv(path, index=False)
    return path


def check_same_split(run_dir: Path | str, samples: Iterable[Sample]) -> None:
    """Raise when an image the finished run in ``run_dir`` had in one split is in another today (``samples``: the
    data set as loaded now): scoring or calibrating the run there could use images it trained on or chose its
    checkpoint with. Images added since are allowed (said); the record is the run's ``splits.csv`` (a cascade
    stage's: its run folder's). A run made before runs recorded one: said, not checked."""
    import pandas as pd

    folder = Path(run_dir)
    path = next((f / SPLITS_FILE for f in (folder, folder.parent) if (f / SPLITS_FILE).is_file()), None)
    if path is None:
        print(f"{folder}: no {SPLITS_FILE} (a run made before runs recorded their split): its split is not checked "
              "against today's")
        return
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    was = dict(zip(table["image_id"], table["split"]))
    now = image_splits(samples)
    moved = [f"{i} {was[i]} -> {sp}" for i, sp in sorted(now.items()) if i in was and was[i] != sp]
    if moved:
        shown = ", ".join(moved[:8]) + (f" and {len(moved) - 8} more" if len(moved) > 8 else "")
        raise ValueError(f"{path}: {len(moved)} image(s) are in another split than when this run was trained "
                         f"({shown}): scoring or calibrating it on today's split could use images it trained on or "
                         "chose its checkpoint with. Give the data the run's split (declare this file as the data "
                         "set's `splits:`) or train again")
    new = sorted(set(now) - set(was))
    if new:
        print(f"{path}: {len(new)} image(s) added since this run (e.g. {', '.join(new[:3])}): scored in today's split")


def split_record(samples: Iterable[Sample]) -> dict[str, Any]:
    """``split_counts`` (images per split) and ``splits_sha256`` (over the sorted ``image_id<TAB>split`` lines) of
    ``samples`` as the run used them (a refit's copies of its val images counted in train), so that two runs can be
    told to have used the same split, or not."""
    pairs = sorted((s.image_id, str(s.meta.get("split") or "")) for s in samples)
    counts: dict[str, int] = {}
    for _, split in pairs:
        counts[split] = counts.get(split, 0) + 1
    digest = hashlib.sha256("\n".join(f"{i}\t{sp}" for i, sp in pairs).encode()).hexdigest()
    return {"split_counts": counts, "splits_sha256": digest}
