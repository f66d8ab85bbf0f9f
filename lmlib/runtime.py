"""Run-time setup shared by every notebook: device choice, seeds, CPU speed settings, memory.

- :func:`setup` resolves the ``device`` parameter ("auto", "cpu", "cuda", "cuda:1", "mps"; a device this
  machine lacks is a one-line error from :func:`check_device`), seeds
  Python/NumPy/torch, and on CPU turns on flush-to-zero for denormals (which slowed CPU training
  here by up to 30x).
- :data:`MALLOC_ENV` are glibc allocator settings that made large-tensor CPU training ~1.6x faster
  here (fewer mmap/munmap calls). glibc reads them at process start, so they must be in the
  environment of the *kernel process*: the driver (:mod:`lmlib.run`) and ``make lab`` set them.
"""
from __future__ import annotations

import os
import platform
import resource
import sys
import warnings
from importlib import metadata
from typing import Literal

import torch

MALLOC_ENV: dict[str, str] = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),   # bytes; large tensors reuse the heap instead of mmap
    "MALLOC_TRIM_THRESHOLD_": str(1 << 31),   # bytes; do not hand freed memory back every step
}

#: how training reports its progress: a live bar per epoch, or a line every few epochs (stored notebooks)
PROGRESS_MODES: tuple[str, ...] = ("bar", "lines")

REPORTED_PACKAGES: tuple[str, ...] = (
    "lmlib", "torch", "monai", "lightning", "SimpleITK", "numpy", "scipy", "pandas",
    "matplotlib", "seaborn", "papermill", "tqdm",
)


DEVICE_FORMS = "auto, cpu, cuda, cuda:N, mps"


def _available_devices() -> str:
    """The ``device`` values that work on this machine, for messages."""
    found = ["auto", "cpu"]
    if torch.cuda.is_available():
        found += ["cuda", *(f"cuda:{k}" for k in range(torch.cuda.device_count()))]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return ", ".join(found)


def check_device(device: str) -> None:
    """Raise a one-line ``ValueError`` unless ``device`` is a well-formed device that this machine has."""
    text = str(device).strip()
    dev: torch.device | Literal[False] | None  # False: not a device
    try:
        dev = None if text == "auto" else torch.device(text)
    except (RuntimeError, ValueError):
        dev = False
    if dev is False or (dev is not None and dev.type not in ("cpu", "cuda", "mps")):
        raise ValueError(f"device={device!r}: not a device; allowed: {DEVICE_FORMS} (here: {_available_devices()})")
    if dev is None or dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available (torch {torch.__version__}); "
                             f"allowed here: {_available_devices()}")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device={device!r}: this machine has {count} CUDA device(s); "
                             f"allowed here: {_available_devices()}")
    elif not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ValueError(f"device={device!r}: MPS is not available (torch {torch.__version__}); "
                         f"allowed here: {_available_devices()}")


def resolve_device(device: str = "auto") -> torch.device:
    """Map a ``device`` parameter to a torch device; 'auto' = CUDA if available, else MPS, else CPU.
    Raises a one-line ``ValueError`` (see :func:`check_device`) for a device this machine lacks."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    check_device(device)
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices), and data-loader workers, with Lightning's
    ``seed_everything(workers=True)`` (each worker then gets its own derived seed)."""
    from lightning.pytorch import seed_everything as pl_seed_everything

    pl_seed_everything(int(seed), workers=True, verbose=False)


def bars_disabled() -> bool:
    """Whether live progress bars are off: ``TQDM_DISABLE`` set to 1/true/yes (the driver sets it in a notebook's
    kernel, :data:`lmlib.run.NOTEBOOK_ENV`, so stored notebooks keep no frozen bar fragments). Passed explicitly as
    ``disable=``: tqdm's notebook bar ignores the variable."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes")


def _short_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                   line: str | None = None) -> str:
    return f"{category.__name__}: {message}\n"


def setup(seed: int = 0, device: str = "auto", deterministic: bool = True) -> torch.device:
    """Seed everything, pick the device, apply CPU speed settings; return the device.

    Also prints warnings as ``Category: message`` (our messages name the file concerned; the default
    format adds the source line of lmlib that raised it, which only adds noise in notebooks).
    """
    warnings.formatwarning = _short_warning
    seed_everything(seed)
    dev = resolve_device(device)
    if dev.type == "cpu":
        torch.set_flush_denormal(True)
    if deterministic:
        torch.backends.cudnn.benchmark = False  # cuDNN picks its kernels by timing otherwise
        torch.backends.cudnn.deterministic = True  # and its deterministic ones (some CUDA ops still are not)
    return dev


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident memory of this process so far (``children``: of its largest finished child process,
    e.g. a DDP worker), in MiB (Linux/macOS)."""
    peak = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / (1024.0 * 1024.0)


def package_versions(names: tuple[str, ...] = REPORTED_PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that shape results ('not installed' if absent)."""
    out: dict[str, str] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _cpuinfo_field(key: str, cpuinfo: str) -> str | None:
    """The value of the first ``key`` line of ``cpuinfo`` (Linux's ``/proc/cpuinfo``), or None (no such line or
    file)."""
    try:
        with open(cpuinfo, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(key):
                    return line.split(":", 1)[1]
    except OSError:
        pass
    return None


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (Linux: ``/proc/cpuinfo``; elsewhere what :func:`platform.processor` says, or
    ``unknown``): runs with the same platform string may have run on different CPUs, whose speeds differ."""
    name = _cpuinfo_field("model name", cpuinfo)
    return name.strip() if name is not None else platform.processor() or "unknown"


#: the CPU instruction sets that set the speed of this project's steps: vector width for fp32 convolutions, and
#: bf16 arithmetic (AVX-512 BF16, AMX) for bf16 autocast (Linux ``/proc/cpuinfo`` flag names)
CPU_FEATURES: tuple[str, ...] = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The :data:`CPU_FEATURES` the CPU has, space-separated (``none`` when it has none of them; ``unknown`` without
    a ``flags`` line in ``/proc/cpuinfo``, e.g. on ARM or off Linux): a virtual machine's model name
    (``Intel(R) Xeon(R) Processor``) does not name the CPU's generation, whose instruction sets set the step times."""
    field = _cpuinfo_field("flags", cpuinfo)
    if field is None:
        return "unknown"
    flags = set(field.split())
    return " ".join(f for f in CPU_FEATURES if f in flags) or "none"


def environment_summary(device: torch.device | None = None) -> dict[str, str]:
    """Python, platform, CPU model and features, package versions, threads and device, for printing and the
    manifest."""
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_model(),
            "cpu_features": cpu_features(),
            "torch_threads": str(torch.get_num_threads()),
            "malloc_env": ",".join(f"{k}={os.environ[k]}" for k in MALLOC_ENV if k in os.environ) or "unset"}
    info.update(package_versions())
    if device is not None:
        info["device"] = str(device)
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_environment(device: torch.device | None = None) -> None:
    """Print :func:`environment_summary` as aligned lines (like MONAI's print_config). Every notebook calls it
    first, so it also sets the short warning format of :func:`setup` (the reporting notebooks call no setup)."""
    warnings.formatwarning = _short_warning
    info = environment_summary(device)
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}} : {value}")
