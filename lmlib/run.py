"""Driver: execute the declared (notebook x dataset x parameters) jobs with papermill.

    python -m lmlib.run                          # every job on the synthetic datasets
    python -m lmlib.run --dataset hamedan-ceph --profile full
    python -m lmlib.run --only exploration --profile smoke
    python -m lmlib.run --only heatmap_unet --set max_epochs=20 --set image_size=[128,192]
    python -m lmlib.run --dataset my_data.yaml               # every method that fits its dimension
    python -m lmlib.run --list

``--dataset`` takes declared names and dataset declaration files (``.yaml``, see
:mod:`lmlib.data.dataset_spec`). A job runs on the datasets it lists; on a dataset it does not list it runs
when ``--only`` names it, or, for a declaration file, when it is a main job (not an ablation or GPU-only
job); a method built for the other dimension (a 3D-only method on 2D images) is refused with a message.
Each job writes ``results/<dataset>/<method>/`` holding the executed notebook beside its outputs.
It runs in ``results/<dataset>/.tmp-<method>`` and is moved into place only on success, so a
failed or interrupted run leaves nothing that looks complete (the partial notebook stays in the
``.tmp-`` folder for debugging) and the exit status is non-zero. ``--resume`` keeps that folder and
continues a notebook that declares ``resume`` from its ``checkpoints/last.ckpt``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlib.data.datasets import SPECS, SYNTHETIC, dataset_name, get_spec, is_dataset_file, shared_data_dir
from lmlib.outputs.contract import REUSABLE_FILES
from lmlib.runtime import MALLOC_ENV

KERNEL_NAME = "lmlib"
REAL = ("hamedan-ceph", "hand-xray", "afids-templates", "afids-mni")  # 2D, then 3D (unseen anatomies first)
PROFILES = ("default", "smoke", "full")


@dataclass(frozen=True)
class Job:
    """One notebook and the datasets it runs on.

    ``method`` names the job and its run folder; ``runs`` the ``lmlib.methods`` method it trains, when it trains
    one (``htc_quarter_only`` runs ``htc``). ``smoke``/``full`` are parameter overrides per profile (the declared
    jobs': ``lmlib/profiles.yaml``); ``default``
    uses the notebook's own defaults. ``per_dataset`` adds overrides for one dataset (key ``"<dataset>"``: all
    profiles) or for one dataset and profile (key ``"<dataset>:<profile>"``, applied last).
    """

    notebook: str
    method: str
    datasets: tuple[str, ...]
    smoke: dict[str, Any] = field(default_factory=dict)
    full: dict[str, Any] = field(default_factory=dict)
    per_dataset: dict[str, dict[str, Any]] = field(default_factory=dict)
    needs_gpu: bool = False  # skipped unless a CUDA device is available (or --device names one)
    main: bool = True  # runs on a user's dataset file by default (False: ablations, paper-scale GPU runs)
    runs: str | None = None  # the lmlib.methods method its notebook trains (None: exploration, reference, ...)
    variant_of: str | None = None  # a generalisation-study variant of that job (one setting changed; notebook 63)

    def parameters(self, dataset: str, profile: str) -> dict[str, Any]:
        over = {"default": {}, "smoke": self.smoke, "full": self.full}[profile]
        key = dataset_name(dataset)
        return {**over, **self.per_dataset.get(key, {}), **self.per_dataset.get(f"{key}:{profile}", {})}

    def refusal(self, dataset: str) -> str | None:
        """Why this job cannot run on ``dataset`` (its method is built for the other dimension), else None."""
        if self.runs is None:
            return None
        from lmlib.engine.runner import dimension_refusal
        from lmlib.methods.base import method_class

        reason = dimension_refusal(method_class(self.runs), dataset)
        return None if reason is None else f"{self.method} (notebooks/{self.notebook}) {reason}"


#: the profiles of the declared jobs: overrides per profile and data set (YAML, see the file's header)
PROFILES_FILE = Path(__file__).with_name("profiles.yaml")


def load_profiles(path: Path = PROFILES_FILE) -> dict[str, dict[str, Any]]:
    """Job name -> ``{"smoke": {...}, "full": {...}, "per_dataset": {...}}`` from the profiles file; an entry
    with another key, or a data-set key that names no data set or profile, is an error naming the file."""
    import yaml

    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    out: dict[str, dict[str, Any]] = {}
    known = {*SYNTHETIC, *REAL}
    for job, entry in raw.items():
        if job == "shared":  # the anchors' home
            continue
        if not isinstance(entry, dict) or set(entry) - {"smoke", "full", "datasets"}:
            raise ValueError(f"{path}: {job}: must be a mapping of smoke, full and datasets, got {entry!r}")
        per_dataset = dict(entry.get("datasets") or {})
        for key in per_dataset:
            name, _, profile = str(key).partition(":")
            if name not in known or (profile and profile not in PROFILES):
                raise ValueError(f"{path}: {job}: datasets: {key!r} is not <dataset> or <dataset>:<profile> "
                                 f"(data sets: {sorted(known)}; profiles: {list(PROFILES)})")
        out[str(job)] = {"smoke": dict(entry.get("smoke") or {}), "full": dict(entry.get("full") or {}),
                         "per_dataset": {str(k): dict(v or {}) for k, v in per_dataset.items()}}
    return out


_PROFILES = load_profiles()


def _job(notebook: str, method: str, datasets: tuple[str, ...], **flags: Any) -> Job:
    """A declared job with its profiles from :data:`PROFILES_FILE`."""
    return Job(notebook, method, datasets, **_PROFILES.get(method, {}), **flags)


# The declared list. Order matters: the comparison reads what the methods wrote.
JOBS: tuple[Job, ...] = (
    _job("00_data_exploration.ipynb", "exploration", SYNTHETIC + REAL),
    # reference rows (no training): writes <method>/mean_shape and, with a second annotator, <method>/inter-observer
    _job("05_reference_rows.ipynb", "reference", SYNTHETIC + REAL),
    # a cascade: writes <method>/global and <method>/local (two rows of the comparison)
    _job("10_global_local_fcnn.ipynb", "global_local", SYNTHETIC + REAL, runs="global_local"),
    _job("15_heatmap_unet.ipynb", "heatmap_unet", SYNTHETIC + REAL, runs="heatmap_unet"),
    # hand-xray's committed setting refit on train + val (its last epoch kept)
    _job("15_heatmap_unet.ipynb", "heatmap_unet_refit", ("hand-xray",), runs="heatmap_unet", main=False),
    # the same full setting on the CPU, whatever the machine has: the benchmark's peer is measured beside CPU runs
    _job("15_heatmap_unet.ipynb", "heatmap_unet_cpu", ("synthetic2d", "hamedan-ceph"), runs="heatmap_unet", main=False),
    # the generalisation study's variants of heatmap_unet_cpu (one setting changed each; profiles.yaml); aug_half
    # also on synthetic2d, for the study's smoke run
    _job("15_heatmap_unet.ipynb", "heatmap_unet_cpu_aug_paper", ("hamedan-ceph",), runs="heatmap_unet", main=False,
         variant_of="heatmap_unet_cpu"),
    _job("15_heatmap_unet.ipynb", "heatmap_unet_cpu_aug_half", ("synthetic2d", "hamedan-ceph"), runs="heatmap_unet",
         main=False, variant_of="heatmap_unet_cpu"),
    _job("15_heatmap_unet.ipynb", "heatmap_unet_cpu_fine_grid", ("hamedan-ceph",), runs="heatmap_unet", main=False,
         variant_of="heatmap_unet_cpu"),
    _job("15_heatmap_unet.ipynb", "heatmap_unet_cpu_long", ("hamedan-ceph",), runs="heatmap_unet", main=False,
         variant_of="heatmap_unet_cpu"),
    _job("15_heatmap_unet.ipynb", "heatmap_unet_cpu_labels_aligned", ("hamedan-ceph",), runs="heatmap_unet",
         main=False, variant_of="heatmap_unet_cpu"),
    # the same full CPU setting under bf16 autocast: does the accuracy hold at full size? (an ablation row)
    _job("15_heatmap_unet.ipynb", "heatmap_unet_cpu_bf16", ("hamedan-ceph",), runs="heatmap_unet", main=False),
    # the same full CPU setting with the network compiled by torch.compile: its speed-up, and whether the accuracy holds
    _job("15_heatmap_unet.ipynb", "heatmap_unet_cpu_compile", ("hamedan-ceph",), runs="heatmap_unet", main=False),
    # the same full CPU setting with two other seeds: the seed's own spread, and the seeds ensemble's members
    _job("15_heatmap_unet.ipynb", "heatmap_unet_cpu_seed1", ("hamedan-ceph",), runs="heatmap_unet", main=False),
    _job("15_heatmap_unet.ipynb", "heatmap_unet_cpu_seed2", ("hamedan-ceph",), runs="heatmap_unet", main=False),
    # the compiled setting with two other seeds: the members of the compiled seeds ensemble (trained within 60 minutes)
    _job("15_heatmap_unet.ipynb", "heatmap_unet_cpu_compile_seed1", ("hamedan-ceph",), runs="heatmap_unet",
         main=False),
    _job("15_heatmap_unet.ipynb", "heatmap_unet_cpu_compile_seed2", ("hamedan-ceph",), runs="heatmap_unet",
         main=False),
    # the same three with the study's two settings that validation preferred to the base's, together
    _job("15_heatmap_unet.ipynb", "heatmap_unet_cpu_compile_tuned", ("hamedan-ceph",), runs="heatmap_unet",
         main=False),
    _job("15_heatmap_unet.ipynb", "heatmap_unet_cpu_compile_tuned_seed1", ("hamedan-ceph",), runs="heatmap_unet",
         main=False),
    _job("15_heatmap_unet.ipynb", "heatmap_unet_cpu_compile_tuned_seed2", ("hamedan-ceph",), runs="heatmap_unet",
         main=False),
    # the tuned setting refit on train + val (its last epoch kept), three seeds: the members of its ensemble
    *(_job("15_heatmap_unet.ipynb", f"heatmap_unet_cpu_compile_tuned_refit{seed}", ("hamedan-ceph",), runs="heatmap_unet",
           main=False) for seed in ("", "_seed1", "_seed2")),
    # the tuned setting with a 16-channel full-resolution head (faster per step on AVX-512 CPUs), on train only: an
    # ablation row (validation rejected it for the refit)
    _job("15_heatmap_unet.ipynb", "heatmap_unet_cpu_compile_tuned_head16", ("hamedan-ceph",), runs="heatmap_unet",
         main=False),
    # the tuned setting compiled under bf16 autocast, on train only: an ablation row (its val rule, profiles.yaml,
    # rejected bf16 for the refit)
    _job("15_heatmap_unet.ipynb", "heatmap_unet_cpu_compile_tuned_bf16", ("hamedan-ceph",), runs="heatmap_unet",
         main=False),
    _job("40_unet_dilation_erosion.ipynb", "dilation_erosion", ("synthetic2d", "hamedan-ceph", "hand-xray"),
         runs="dilation_erosion"),
    # Multiresolution HTC: the two-head method and its training ablation (one head each)
    _job("20_multires_htc.ipynb", "htc", ("synthetic2d", "hamedan-ceph", "hand-xray"), runs="htc"),
    _job("20_multires_htc.ipynb", "htc_quarter_only", ("synthetic2d", "hamedan-ceph"), runs="htc", main=False),
    _job("20_multires_htc.ipynb", "htc_half_only", ("synthetic2d", "hamedan-ceph"), runs="htc", main=False),
    # the paper's sizes at ~1024 px: for a machine with a GPU (skipped without one)
    _job("20_multires_htc.ipynb", "htc_gpu", ("hamedan-ceph",), runs="htc", needs_gpu=True, main=False),
    # a cascade of three stages: writes <method>/coarse, <method>/independent, <method>/correlated
    _job("30_prior_guided_3d.ipynb", "prior_guided", ("synthetic3d", "afids-mni", "afids-templates"),
         runs="prior_guided"),
    # ablation: the paper's single shared plane position
    _job("30_prior_guided_3d.ipynb", "prior_guided_shared_plane", ("afids-mni",), runs="prior_guided", main=False),
    # the classical baseline (no training): multi-atlas registration
    _job("50_registration_baseline.ipynb", "registration", SYNTHETIC + REAL, runs="registration"),
    # local refinement after a finished run (the registration baseline's and every 2D method's but the global-to-local
    # FCNN, which ends in its own local stage): writes <job>/local1, <job>/local2
    _job("60_local_refinement.ipynb", "registration+local", SYNTHETIC + REAL, runs="refine"),
    _job("60_local_refinement.ipynb", "htc+local", ("synthetic2d", "hamedan-ceph", "hand-xray"), runs="refine",
         main=False),
    _job("60_local_refinement.ipynb", "heatmap_unet+local", ("synthetic2d", "hamedan-ceph", "hand-xray"),
         runs="refine", main=False),
    _job("60_local_refinement.ipynb", "dilation_erosion+local", ("synthetic2d", "hamedan-ceph", "hand-xray"),
         runs="refine", main=False),
    # an ensemble of finished runs (their test predictions combined per landmark; their costs summed)
    _job("61_ensemble.ipynb", "ensemble", ("synthetic2d", "hamedan-ceph", "hand-xray", "afids-templates"),
         runs="ensemble", main=False),
    # an ensemble chosen on val: the members chosen among candidate runs on their val predictions on record
    _job("61_ensemble.ipynb", "ensemble_val", ("synthetic2d", "hamedan-ceph", "hand-xray"), runs="ensemble",
         main=False),
    # the seeds ensemble: three trainings of heatmap_unet_cpu that differ only by their seed
    _job("61_ensemble.ipynb", "heatmap_unet_cpu+seeds", ("hamedan-ceph",), runs="ensemble", main=False),
    _job("61_ensemble.ipynb", "heatmap_unet_cpu_compile+seeds", ("hamedan-ceph",), runs="ensemble", main=False),
    _job("61_ensemble.ipynb", "heatmap_unet_cpu_compile_tuned+seeds", ("hamedan-ceph",), runs="ensemble",
         main=False),
    _job("61_ensemble.ipynb", "heatmap_unet_cpu_compile_tuned_refit+seeds", ("hamedan-ceph",), runs="ensemble",
         main=False),
    # multi-scale test-time augmentation of a finished run (its checkpoint kept: run its job first)
    _job("62_test_time_scales.ipynb", "heatmap_unet+tta", ("synthetic2d", "hamedan-ceph", "hand-xray"), runs="tta",
         main=False),
    _job("62_test_time_scales.ipynb", "htc+tta", ("synthetic2d", "hamedan-ceph", "hand-xray"), runs="tta", main=False),
    # the refit seeds at three scales each (their checkpoints kept: run their jobs first), then their ensemble
    *(_job("62_test_time_scales.ipynb", f"heatmap_unet_cpu_compile_tuned_refit{seed}+tta", ("hamedan-ceph",),
           runs="tta", main=False) for seed in ("", "_seed1", "_seed2")),
    _job("61_ensemble.ipynb", "heatmap_unet_cpu_compile_tuned_refit+seeds+tta", ("hamedan-ceph",), runs="ensemble",
         main=False),
    # a shape prior after a finished run (its checkpoints kept: run its job first): the training mean shape fitted
    # robustly to its predictions, the landmarks that do not fit replaced; the variant chosen on val
    # (hand-xray: its heatmap U-Net's two gross misses of tens of mm, added after that run's test numbers were read;
    # the variant is still chosen on val)
    _job("64_shape_prior.ipynb", "heatmap_unet+shape", ("synthetic3d", "afids-templates", "afids-mni", "hand-xray"),
         runs="shape_fit"),
    _job("64_shape_prior.ipynb", "global_local+shape", ("afids-templates",), runs="shape_fit", main=False),
    # the generalisation study: the variants against their base, chosen on val only (after the variants' jobs)
    _job("63_generalisation_study.ipynb", "generalisation", ("synthetic2d", "hamedan-ceph"), main=False),
    # a trained model on images with calibrated regions and a review list (needs the method's run folder first)
    _job("80_predict_new_images.ipynb", "predict", SYNTHETIC + REAL),
    # speed, memory and accuracy on this machine (the 2D methods at their full settings); the peer on hand-xray,
    # its home data set, and on hamedan-ceph
    _job("95_benchmark.ipynb", "benchmark", ("synthetic2d", "hamedan-ceph", "hand-xray")),
    # the last comparison of a full run also rewrites the README's cross-data-set block (results/summary/)
    _job("90_comparative_evaluation.ipynb", "comparison", SYNTHETIC + REAL),
)


#: the smoke settings of a discovered method that no declared job runs (its other profiles: the notebook's defaults)
GENERIC_SMOKE: dict[str, Any] = {"max_epochs": 2, "max_train_images": 8}
#: the first declared job that reads the methods' runs: jobs of discovered methods are placed before it
_AFTER_METHODS = "predict"


def method_notebooks(folder: Path) -> dict[str, str]:
    """Method name -> the notebook in ``folder`` that trains it (a code line ``run_method("<name>", ...)``)."""
    found: dict[str, str] = {}
    for path in sorted(folder.glob("*.ipynb")):
        for name in re.findall(r"run_method\(\s*\\?[\"']([A-Za-z_]\w*)\\?[\"']", path.read_text(encoding="utf-8")):
            found.setdefault(name, path.name)
    return found


def jobs(notebooks: Path | None = None) -> tuple[Job, ...]:
    """The declared :data:`JOBS`, plus one job for each discovered method (:func:`lmlib.methods.base.method_names`)
    that no declared job runs and whose notebook is in ``notebooks`` (default: the project's ``notebooks/``): on
    every synthetic and built-in dataset of its dimensions, smoke :data:`GENERIC_SMOKE`, default and full the
    notebook's own defaults. A new method is its module and its notebook: nothing here needs an edit."""
    from lmlib.data.datasets import dataset_ndim
    from lmlib.methods.base import method_class, method_names

    declared = {j.runs for j in JOBS if j.runs}
    found = method_notebooks(notebooks or repo_root() / "notebooks")
    extra = []
    for name in method_names():
        if name in declared or name not in found:
            continue
        dims = method_class(name).supported_dims
        extra.append(Job(found[name], name, tuple(d for d in (*SYNTHETIC, *REAL) if dataset_ndim(d) in dims),
                         runs=name, smoke=dict(GENERIC_SMOKE)))
    at = next(i for i, j in enumerate(JOBS) if j.method == _AFTER_METHODS)
    return (*JOBS[:at], *extra, *JOBS[at:])


def job_parameters(method: str, dataset: str, profile: str) -> dict[str, Any]:
    """The parameters the driver gives the job of ``method`` on ``dataset`` with ``profile`` (its overrides only)."""
    known = jobs()
    job = next((j for j in known if j.method == method), None)
    if job is None:
        raise ValueError(f"no job {method!r}; declared: {', '.join(j.method for j in known)}")
    return job.parameters(dataset, profile)


def declared_datasets() -> list[str]:
    """Every dataset name the driver accepts: the synthetic ones, then the built-in declared ones (and any
    dataset declaration file, ``*.yaml``, by path)."""
    return [*SYNTHETIC, *sorted(SPECS)]


def is_builtin(dataset: str) -> bool:
    """A synthetic or built-in declared dataset (not a user's declaration file)."""
    return dataset in SYNTHETIC or dataset in SPECS


def repo_root() -> Path:
    """The project folder: the working directory if it has notebooks/, else lmlib's parent."""
    cwd = Path.cwd()
    if (cwd / "notebooks").is_dir():
        return cwd
    return Path(__file__).resolve().parents[1]


def check_parameters(notebook: Path, parameters: dict[str, Any]) -> dict[str, Any]:
    """Raise if a parameter is not declared in the notebook's ``parameters`` cell; return the declared."""
    import papermill as pm

    declared = pm.inspect_notebook(str(notebook))
    if not declared:
        raise ValueError(f"{notebook}: no cell tagged 'parameters'")
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise ValueError(f"{notebook}: parameters {unknown} are not declared in its parameters cell "
                         f"(declared: {sorted(declared)})")
    return declared


#: parameters the driver sets for every job (a ``--set`` of them would file a run where the driver does not look)
DRIVER_OWNED: dict[str, str] = {"dataset": "use --dataset", "output_dir": "use --results-dir",
                                "data_dir": "use --data-dir",
                                # a checkpoint in the job's scratch folder is deleted before a run without --resume
                                "resume": "use --resume, which continues from the job's own last checkpoint"}


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["max_epochs=20", "image_size=[128, 192]", "augment=false"]`` -> parameters; each value is a Python
    literal (number, list, bool, quoted string), ``true`` / ``false`` in any case (the spelling of the parameter
    tables and of YAML), or, failing that, the plain string."""
    import ast

    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise ValueError(f"{item!r}: expected NAME=VALUE with a parameter name, e.g. max_epochs=20")
        if name in DRIVER_OWNED:
            raise ValueError(f"{item!r}: the driver sets {name} itself ({DRIVER_OWNED[name]}); it cannot be overridden")
        text = text.strip()
        if text.lower() in ("true", "false"):
            out[name] = text.lower() == "true"
            continue
        try:
            out[name] = _lists(ast.literal_eval(text))
        except (ValueError, SyntaxError):
            out[name] = text
    return out


def _lists(value: Any) -> Any:
    """Tuples as lists, nested too (``image_size=128,192`` is a tuple to Python; papermill writes a tuple into the
    notebook as its string, which the parameter check then refused as "not 2 integers")."""
    if isinstance(value, (tuple, list)):
        return [_lists(v) for v in value]
    return value


def _portable(path: Path, root: Path) -> str:
    """``path`` relative to the project (e.g. ``../shared/data/x``) when close by, so executed notebooks
    and manifests carry no machine-specific absolute paths; absolute otherwise."""
    rel = os.path.relpath(Path(path).resolve(), root.resolve())
    return rel if rel.count("..") <= 2 else str(Path(path).resolve())


def _declared_default(declared: dict[str, Any], name: str) -> Any:
    """The default a notebook's parameters cell gives ``name`` (papermill reports its source text), or None."""
    import ast

    try:
        return ast.literal_eval(str((declared.get(name) or {}).get("default")))
    except (ValueError, SyntaxError):
        return None


def run_job(job: Job, dataset: str, profile: str = "default", results_dir: Path | str = "results",
            data_dir: Path | str | None = None, device: str | None = None, seed: int | None = None,
            timeout_s: int | None = None, extra: dict[str, Any] | None = None,
            root: Path | None = None, resume: bool = False, echo: bool = False) -> Path:
    """Execute one job; return the final output folder. Raises on failure (nothing left in place).

    ``echo``: print what the notebook prints to this console as it runs (:class:`ConsoleEcho`).
    ``resume``: for a notebook that declares a ``resume`` parameter, keep the scratch folder of an
    interrupted run and pass ``resume=<scratch>/checkpoints/last.ckpt`` when that file exists (else, and
    for other notebooks, the scratch folder is cleared and the job starts afresh).
    """
    root = root or repo_root()
    results = Path(results_dir)
    final = results / dataset_name(dataset) / job.method
    rank = launcher_rank()
    tmp = results / dataset_name(dataset) / (f".tmp-{job.method}" if rank == 0 else f".rank{rank}-{job.method}")
    notebook = root / "notebooks" / job.notebook
    if not notebook.is_file():
        raise FileNotFoundError(f"{notebook}: notebook not found")
    params: dict[str, Any] = {"dataset": _portable(Path(dataset), root) if is_dataset_file(dataset) else dataset,
                              "output_dir": str(tmp), **job.parameters(dataset, profile)}
    if is_dataset_file(dataset):  # the file names its data folder; --data-dir overrides it
        if data_dir:
            params["data_dir"] = _portable(Path(data_dir), root)
    elif dataset not in SYNTHETIC:
        path = Path(data_dir) if data_dir else shared_data_dir() / dataset
        if not path.exists():
            raise FileNotFoundError(f"{path}: data for {dataset!r} not found (pass --data-dir or set LMLIB_SHARED_DATA)")
        params["data_dir"] = _portable(path, root)
    given = {**({"device": device} if device is not None else {}), **({"seed": seed} if seed is not None else {})}
    declared = check_parameters(notebook, {**params, **given, **(extra or {})})
    for name, value in {**given, **(extra or {})}.items():
        if name in params and params[name] != value:
            print(f"[lmlib.run] {dataset}/{job.method}: {name}={value!r} replaces the profile's {name}="
                  f"{params[name]!r}", flush=True)
    # --seed and --device are overrides like --set ones where they change what the job runs with: a seed other than
    # the profile's (else the notebook's default), a device other than one the profile sets (the comparison's
    # Device column says every other); recorded so, the comparison labels the run (``full + seed=3``)
    overrides = {name: value for name, value in given.items()
                 if (params[name] != value if name in params else
                     name == "seed" and value != _declared_default(declared, name))}
    overrides.update(extra or {})
    params.update({**given, **overrides})
    if "results_dir" in declared:  # notebooks that read other runs (comparison)
        params.setdefault("results_dir", str(results))
    if "profile" in declared:  # the comparison compares runs of its own profile
        params.setdefault("profile", profile)
    if "progress" in declared:  # stored notebooks get epoch lines (echoed to this console), not a live bar
        params.setdefault("progress", "lines")

    with job_lock(root / tmp):
        _execute(job, dataset, params, declared, root, tmp, final, profile, rank, resume, timeout_s, echo,
                 overrides)
    return root / final


def _execute(job: Job, dataset: str, params: dict[str, Any], declared: dict[str, Any], root: Path, tmp: Path,
             final: Path, profile: str, rank: int, resume: bool, timeout_s: int | None, echo: bool,
             overrides: dict[str, Any]) -> None:
    """Run the notebook into the scratch folder ``tmp`` and move it into place (the lock is held)."""
    import papermill as pm

    notebook = root / "notebooks" / job.notebook
    resumable = resume and "resume" in declared
    last = resume_checkpoint(root, tmp) if resumable else None
    if last is not None:
        params.setdefault("resume", str(last))
        print(f"[lmlib.run] {dataset}/{job.method}: resuming from {last}", flush=True)
    if not resumable:
        shutil.rmtree(root / tmp, ignore_errors=True)
    (root / tmp).mkdir(parents=True, exist_ok=True)
    for name in REUSABLE_FILES:  # e.g. the base run's val predictions, used only where their key still matches
        if (root / final / name).is_file() and not (root / tmp / name).exists():
            shutil.copy2(root / final / name, root / tmp / name)
    start = time.time()
    with kernel_environment({**MALLOC_ENV, **NOTEBOOK_ENV}):  # allocator settings (lmlib.runtime), no bars
        pm.execute_notebook(str(notebook), str(root / tmp / job.notebook), parameters=params,
                            kernel_name=KERNEL_NAME, cwd=str(root), execution_timeout=timeout_s,
                            progress_bar=False, report_mode=False,
                            stdout_file=ConsoleEcho(f"{dataset_name(dataset)}/{job.method}") if echo else None)
    if rank != 0:  # a launcher's other ranks trained with rank 0; only rank 0 keeps results
        shutil.rmtree(root / tmp, ignore_errors=True)
        return
    _finalise(root / tmp, root / final, params, job, profile, time.time() - start, overrides)


#: the environment of a notebook's kernel under the driver: no tqdm bars (a stored notebook would keep their frozen
#: fragments, e.g. "0%| 0/3"; long loops print lines there: epochs, registration's images)
NOTEBOOK_ENV: dict[str, str] = {"TQDM_DISABLE": "1"}


@contextlib.contextmanager
def kernel_environment(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` while the block runs (a kernel started inside inherits them), unless the user
    set them; the driver's own environment as it was afterwards."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


class ConsoleEcho:
    """What a notebook prints (epoch lines with the time per epoch and the time left, summaries), echoed to the
    driver's console line by line while it runs, each line prefixed with the job: before, a terminal run
    was silent until the notebook ended (13 minutes of nothing for an 80-epoch run)."""

    def __init__(self, label: str, stream: Any = None) -> None:
        self.label, self.stream, self.pending = label, stream, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        out = self.stream or sys.stdout
        for line in lines:
            if line.strip():
                out.write(f"  [{self.label}] {line.rstrip()}\n")
        return len(text)

    def flush(self) -> None:
        (self.stream or sys.stdout).flush()


def variants_of(base: str, dataset: str) -> list[str]:
    """The jobs declared as generalisation-study variants of job ``base`` (``variant_of``) that run on ``dataset``,
    in declaration order."""
    return [job.method for job in JOBS if job.variant_of == base and dataset_name(dataset) in job.datasets]


class JobLocked(RuntimeError):
    """Another driver process is running the same job into the same results folder."""


@contextlib.contextmanager
def job_lock(scratch: Path) -> Iterator[None]:
    """Hold an exclusive lock on the job's scratch folder ``scratch`` (a ``.lock`` file beside it, locked with
    ``flock``: released by the system when the process dies, so a killed driver leaves no stale lock).

    Two drivers running one job into one results folder cleared and rewrote each other's files (a
    ``ParserError`` on the training log, a manifest with foreign fields); the second now stops at once,
    naming the process that holds the job."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; run one driver per results folder there
        yield
        return
    path = scratch.with_name(scratch.name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise JobLocked(f"{scratch}: this job is running already ({holder}); wait for it to finish, stop it, "
                            "or give this run another --results-dir") from None
        # the holder before us removes the file as it releases it: a lock taken on a file that is no
        # longer at ``path`` locks nothing, so take it again on the file now there
        try:
            same = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {platform.node()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held: the results folder keeps no lock files
        handle.close()


def launcher_rank() -> int:
    """This process's global rank when a launcher (torchrun, SLURM srun) started several copies of the
    driver for a multi-process training (0 otherwise): only rank 0 keeps its run folder."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def resume_checkpoint(root: Path, tmp: Path) -> Path | None:
    """The checkpoint an interrupted run in ``root/tmp`` continues from: ``tmp/checkpoints/last.ckpt``, else
    (a cascade, whose stages each resume from their own) the first ``tmp/<stage>/checkpoints/last.ckpt``;
    None when there is none. Returned relative to ``root`` like ``tmp`` (the kernel runs in ``root``)."""
    candidates = [tmp / "checkpoints" / "last.ckpt",
                  *(p.relative_to(root) if not tmp.is_absolute() else p
                    for p in sorted((root / tmp).glob("*/checkpoints/last.ckpt")))]
    return next((c for c in candidates if (root / c).is_file()), None)


def _retarget(value: Any, tmp: str, final: str) -> Any:
    """``value`` with the scratch folder ``tmp`` replaced by ``final`` where it is (a prefix of) a path string."""
    if isinstance(value, str) and (value == tmp or value.startswith(tmp.rstrip("/") + "/")):
        return final + value[len(tmp):]
    if isinstance(value, dict):
        return {k: _retarget(v, tmp, final) for k, v in value.items()}
    if isinstance(value, list):
        return [_retarget(v, tmp, final) for v in value]
    return value


def _finalise(tmp: Path, final: Path, params: dict[str, Any], job: Job, profile: str, seconds: float,
              overrides: dict[str, Any] | None = None) -> None:
    """Record driver facts in the manifests, make the executed notebook name the final folder, then swap
    the finished folder into place.

    The run's ``manifest.json`` and those of its sub-runs (``<tmp>/<stage>/manifest.json``, e.g. cascade
    stages or reference rows) get the driver's notebook/profile and the final ``output_dir``; the executed
    notebook's injected-parameters cell and papermill metadata name ``results/<dataset>/<method>``
    instead of the driver's ``.tmp-<method>`` scratch folder (cell outputs are left as printed).
    """
    manifest = tmp / "manifest.json"
    if not manifest.is_file():
        raise RuntimeError(f"{tmp / job.notebook}: ran but wrote no manifest.json")
    scratch = str(params["output_dir"])
    target = str(Path(scratch).parent / job.method)
    driver = {"notebook": f"notebooks/{job.notebook}", "profile": profile, "wall_seconds": round(seconds, 1),
              **({"overrides": overrides} if overrides else {})}  # --set: the comparison names such runs
    for path in (manifest, *sorted(tmp.glob("*/manifest.json"))):
        data = json.loads(path.read_text(encoding="utf-8"))
        data["parameters"] = _retarget(data.get("parameters", {}), scratch, target)
        if path == manifest:
            data["parameters"]["output_dir"] = target
        data["driver"] = driver
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    executed = tmp / job.notebook  # papermill records absolute paths: keep the repository-relative ones
    nb = json.loads(executed.read_text(encoding="utf-8"))
    meta = nb.setdefault("metadata", {})
    papermill_meta = meta.get("papermill")
    shown = _retarget(papermill_meta.get("parameters", params) if papermill_meta else params, scratch, target)
    if papermill_meta is not None:
        papermill_meta.update(input_path=f"notebooks/{job.notebook}", output_path=f"{target}/{job.notebook}",
                              parameters=shown)
    for cell in nb.get("cells", []):
        if "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            cell["source"] = _injected_source(meta, shown).splitlines(keepends=True)
    executed.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _injected_source(metadata: dict[str, Any], parameters: dict[str, Any]) -> str:
    """The injected-parameters cell papermill writes for ``parameters`` (same translator and language)."""
    from papermill.translators import translate_parameters

    kernel = metadata.get("kernelspec", {}).get("name", KERNEL_NAME)
    language = metadata.get("kernelspec", {}).get("language") or metadata.get("language_info", {}).get("name", "python")
    return translate_parameters(kernel, language, parameters, "Parameters")


def select(jobs: Sequence[Job], datasets: Sequence[str], only: Sequence[str]) -> list[tuple[Job, str]]:
    """(job, dataset) pairs in declared order, filtered by dataset and by method/notebook names (see the module
    docstring: a job runs on the datasets it lists, on any dataset when ``only`` names it, and on a user's
    declaration file when it is a main job). Raises ``ValueError`` listing the pairs ``only`` asks for whose
    method is built for the other dimension; main jobs that do not fit a declaration file are left out."""
    chosen, refused = [], []
    for job in jobs:
        named = any(o in (job.method, job.notebook, Path(job.notebook).stem) for o in only)
        if only and not named:
            continue
        for d in datasets:
            if dataset_name(d) in job.datasets and not is_dataset_file(d):
                chosen.append((job, d))
            elif named or (job.main and not is_builtin(d)):
                reason = job.refusal(d)
                if reason is None:
                    chosen.append((job, d))
                elif named:
                    refused.append(reason)
    if refused:
        raise ValueError("; ".join(refused))
    return chosen


def gpu_requested(device: str | None) -> bool:
    """Whether GPU-only jobs should run: ``--device cuda...`` given, or (no device / auto) CUDA available."""
    if device:
        return device.startswith("cuda") or (device == "auto" and _cuda_available())
    return _cuda_available()


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def describe_failure(exc: BaseException) -> str:
    """One line for a failed job: the failing cell's exception for a notebook error (papermill's own
    message starts with a line of dashes), else the exception's type and first line."""
    import papermill as pm

    if isinstance(exc, pm.PapermillExecutionError):
        cell = f"cell [{exc.exec_count}]" if exc.exec_count is not None else f"cell #{exc.cell_index}"
        lines = str(exc.evalue or "").strip().splitlines()
        return f"in {cell}: {exc.ename}: {lines[0]}" if lines else f"in {cell}: {exc.ename}"
    lines = str(exc).strip().splitlines()
    return f"({type(exc).__name__}: {lines[0]})" if lines else f"({type(exc).__name__})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmlib.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", nargs="+", default=list(SYNTHETIC), help="datasets to run (default: synthetic)")
    parser.add_argument("--only", nargs="+", default=[], help="method or notebook names to run")
    parser.add_argument("--profile", choices=PROFILES, default="default",
                        help="parameter set: notebook defaults, smoke (seconds), full (real results)")
    parser.add_argument("--data-dir", help="folder of a real dataset (default: $LMLIB_SHARED_DATA/<dataset>, "
                                           "else ../shared/data/<dataset>)")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps or auto (default: each notebook's default)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--timeout", type=int, help="seconds per notebook cell")
    parser.add_argument("--quiet", action="store_true",
                        help="do not echo what the notebooks print (epoch lines, time left) to the console")
    parser.add_argument("--resume", action="store_true",
                        help="continue interrupted jobs from their .tmp-<method>/checkpoints/last.ckpt "
                             "(notebooks with a resume parameter)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="overrides",
                        help="override one notebook parameter for every selected job, after the profile's "
                             "(a Python literal: --set max_epochs=20 --set image_size=[128,192]; else a string); "
                             "checked against each notebook's parameters cell")
    parser.add_argument("--list", action="store_true", help="list the jobs and exit")
    args = parser.parse_args(argv)
    try:
        extra = parse_overrides(args.overrides)
    except ValueError as exc:
        print(f"[lmlib.run] --set: {exc}", file=sys.stderr)
        return 2

    unknown = [d for d in args.dataset if d not in declared_datasets() and not is_dataset_file(d)]
    if unknown and not args.list:
        print(f"[lmlib.run] unknown dataset{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
              f"declared: {', '.join(declared_datasets())}, or a dataset declaration file (.yaml)", file=sys.stderr)
        return 2
    for d in args.dataset if not args.list else ():
        if is_dataset_file(d):
            try:
                get_spec(d)
            except (OSError, ValueError) as exc:
                print(f"[lmlib.run] --dataset: {exc}", file=sys.stderr)
                return 2
    all_jobs = jobs()
    names = {n for job in all_jobs for n in (job.method, job.notebook, Path(job.notebook).stem)}
    if unknown_only := [o for o in args.only if o not in names]:
        print(f"[lmlib.run] --only: unknown {', '.join(map(repr, unknown_only))}; declared: "
              f"{', '.join(job.method for job in all_jobs)} (or a notebook name)", file=sys.stderr)
        return 2
    try:
        pairs = select(all_jobs, args.dataset, args.only)
    except ValueError as exc:
        print(f"[lmlib.run] refused: {exc}", file=sys.stderr)
        return 2
    if any(job.needs_gpu for job, _ in pairs) and not gpu_requested(args.device):
        skipped = sorted({f"{d}/{job.method}" for job, d in pairs if job.needs_gpu})
        print(f"[lmlib.run] skipping {', '.join(skipped)}: needs a GPU (none here; --device cuda to insist)", flush=True)
        pairs = [(job, d) for job, d in pairs if not job.needs_gpu]
    if not pairs and not args.list:
        print(f"[lmlib.run] no declared job runs on {', '.join(args.dataset)}"
              f"{' for ' + ', '.join(args.only) if args.only else ''}; the jobs:", file=sys.stderr)
    if args.list or not pairs:
        for job in all_jobs:
            print(f"{job.method:<14} notebooks/{job.notebook:<36} datasets: {', '.join(job.datasets)}")
        return 0 if args.list else 2
    # --set applies to the jobs whose notebook declares the name (the others say they ignored it); a name no
    # selected notebook declares is an error (a typo)
    accepts: dict[str, set[str]] = {}
    if extra:
        import papermill as pm

        accepts = {nb: set(pm.inspect_notebook(str(repo_root() / "notebooks" / nb)))
                   for nb in sorted({job.notebook for job, _ in pairs})}
        nowhere = sorted(k for k in extra if not any(k in names for names in accepts.values()))
        if nowhere:
            print(f"[lmlib.run] --set: {nowhere} not a parameter of any selected notebook "
                  f"({', '.join(sorted(accepts))})", file=sys.stderr)
            return 2
    failed: list[str] = []
    for job, dataset in pairs:
        label = f"{dataset_name(dataset)}/{job.method}"
        print(f"[lmlib.run] {label}: notebooks/{job.notebook} ({args.profile})", flush=True)
        mine = {k: v for k, v in extra.items() if k in accepts.get(job.notebook, ())}
        if ignored := sorted(set(extra) - set(mine)):
            print(f"[lmlib.run] {label}: --set {', '.join(ignored)} ignored (not a parameter of "
                  f"notebooks/{job.notebook})", flush=True)
        t0 = time.time()
        try:
            out = run_job(job, dataset, args.profile, args.results_dir, args.data_dir, args.device,
                          args.seed, args.timeout, extra=mine, resume=args.resume, echo=not args.quiet)
        except KeyboardInterrupt:
            print(f"[lmlib.run] {label}: interrupted; partial output left in "
                  f"{args.results_dir}/{dataset_name(dataset)}/.tmp-{job.method} (run again with --resume to continue it)")
            return 130
        except Exception as exc:  # noqa: BLE001 - report every failure, run the rest
            failed.append(label)
            print(f"[lmlib.run] {label}: FAILED {describe_failure(exc)}", flush=True)
            partial = Path(args.results_dir) / dataset_name(dataset) / f".tmp-{job.method}"
            if not partial.is_absolute() and Path.cwd().resolve() != repo_root().resolve():
                partial = repo_root() / partial  # run_job resolves a relative results dir against the project
            if (partial / job.notebook).is_file():
                print(f"[lmlib.run] {label}: partial notebook: {partial / job.notebook}", flush=True)
            elif partial.exists():
                print(f"[lmlib.run] {label}: partial output kept in {partial}", flush=True)
            continue
        shown = out.relative_to(repo_root()) if out.is_relative_to(repo_root()) else out
        print(f"[lmlib.run] {label}: done in {time.time() - t0:.0f} s -> {shown}", flush=True)
    if failed:
        print(f"[lmlib.run] {len(failed)} failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
