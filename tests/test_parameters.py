"""Notebook parameters are checked before any work: one clear line naming the parameter, value and what is allowed."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lmlib.engine import runner
from lmlib.engine.runner import run_method, validate_parameters
from lmlib.runtime import check_device

GOOD: dict[str, Any] = {"dataset": "synthetic2d", "output_dir": "out", "seed": 0, "device": "cpu", "max_epochs": 2,
                        "batch_size": 4, "image_size": [64, 96], "learning_rate": 3e-3, "num_workers": 0,
                        "max_train_images": 0, "overlay_every": 10, "gif_fps": 10.0, "lr_schedule": "cosine"}

BAD: list[tuple[dict[str, Any], str]] = [
    ({"max_epochs": 0}, r"max_epochs=0: .*integer >= 1"),
    ({"max_epochs": -1}, r"max_epochs=-1: .*integer >= 1"),
    ({"max_epochs": None}, r"max_epochs=None: .*integer >= 1"),
    ({"max_epochs": 2.5}, r"max_epochs=2.5: .*integer >= 1"),
    ({"max_epochs": True}, r"max_epochs=True: .*integer >= 1"),
    ({"batch_size": 0}, r"batch_size=0: .*integer >= 1"),
    ({"batch_size": -4}, r"batch_size=-4: .*integer >= 1"),
    ({"learning_rate": 0.0}, r"learning_rate=0.0: .*number > 0"),
    ({"learning_rate": -1e-3}, r"learning_rate=-0.001: .*number > 0"),
    ({"learning_rate": float("nan")}, r"learning_rate=nan: .*number > 0"),
    ({"learning_rate": "fast"}, r"learning_rate='fast': .*number > 0"),
    ({"image_size": [64, 0]}, r"image_size=\[64, 0\]: .*integers >= 1"),
    ({"image_size": [64, -8]}, r"image_size=\[64, -8\]: .*integers >= 1"),
    ({"image_size": 64}, r"image_size=64: .*integers >= 1"),
    ({"image_size": [64, 64, 64]}, r"image_size=\[64, 64, 64\]: .*2 integers >= 1 .*synthetic2d is 2D"),
    ({"dataset": "synthetic3d", "image_size": [64, 64]}, r"image_size=\[64, 64\]: .*3 integers >= 1 .*synthetic3d is 3D"),
    ({"num_workers": -1}, r"num_workers=-1: .*integer >= 0"),
    ({"max_train_images": -2}, r"max_train_images=-2: .*integer >= 0"),
    ({"n_deformed": -1}, r"n_deformed=-1: .*integer >= 0"),
    ({"overlay_every": 0}, r"overlay_every=0: .*integer >= 1"),
    ({"gif_fps": 0}, r"gif_fps=0: .*number > 0"),
    ({"weight_decay": -0.1}, r"weight_decay=-0.1: .*number >= 0"),
    ({"warmup_epochs": -1}, r"warmup_epochs=-1: .*integer >= 0"),
    ({"lr_schedule": "step"}, r"lr_schedule='step': .*'cosine', 'constant'"),
    ({"optimizer": "sgd"}, r"optimizer='sgd': .*'adam', 'adamw'"),
    ({"dataset": "nosuch"}, r"dataset='nosuch': .*synthetic2d.*hamedan-ceph"),
    ({"device": "gpu"}, r"device='gpu': .*auto, cpu, cuda, cuda:N, mps"),
    ({"rotation_deg": -1000}, r"rotation_deg=-1000: .*degrees in \[0, 180\]"),
    ({"rotation_deg": 400}, r"rotation_deg=400: .*degrees in \[0, 180\]"),
    ({"scale_range": 1.5}, r"scale_range=1.5: .*\[0, 1\)"),
    ({"scale_range": -0.1}, r"scale_range=-0.1: .*\[0, 1\)"),
    ({"augment": "no"}, r"augment='no': .*true or false"),
]


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend this machine has neither CUDA nor MPS (whatever it has)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize(("change", "message"), BAD, ids=[f"{next(iter(c))}={c[next(iter(c))]!r}" for c, _ in BAD])
def test_bad_parameter_is_one_clear_line(change: dict[str, Any], message: str, no_gpu: None) -> None:
    with pytest.raises(ValueError, match=message) as info:
        validate_parameters({**GOOD, **change})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("change", [{}, {"image_size": []}, {"image_size": None}, {"max_epochs": 1, "batch_size": 1},
                                    {"learning_rate": "3e-3"}, {"max_epochs": 3.0}, {"device": "auto"},
                                    {"dataset": "hamedan-ceph", "image_size": [256, 320]}])
def test_good_parameters_pass(change: dict[str, Any], no_gpu: None) -> None:
    validate_parameters({**GOOD, **change})


@pytest.mark.parametrize(("device", "message"), [
    ("cuda", r"device='cuda': CUDA is not available .*allowed here: auto, cpu"),
    ("cuda:1", r"device='cuda:1': CUDA is not available"),
    ("mps", r"device='mps': MPS is not available"),
    ("tpu", r"device='tpu': .*auto, cpu, cuda, cuda:N, mps"),
])
def test_unavailable_device(device: str, message: str, no_gpu: None) -> None:
    with pytest.raises(ValueError, match=message):
        check_device(device)


def test_cuda_index_beyond_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device='cuda:1': .*1 CUDA device.*cuda:0"):
        check_device("cuda:1")
    check_device("cuda:0")
    check_device("cuda")


@pytest.fixture
def no_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading data means the checks came too late."""
    def load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("data loaded before the parameters were checked")

    monkeypatch.setattr(runner, "load_dataset", load)


def test_run_method_checks_before_loading_data(tmp_path: Path, no_data: None, no_gpu: None) -> None:
    base = {"dataset": "synthetic2d", "output_dir": str(tmp_path / "run"), "device": "cpu"}
    with pytest.raises(ValueError, match=r"max_epochs=0"):
        run_method("heatmap_unet", {**base, "max_epochs": 0})
    with pytest.raises(ValueError, match=r"device='cuda': CUDA is not available"):
        run_method("dilation_erosion", {**base, "device": "cuda"})


def test_unwritable_output_dir_is_reported_before_training(tmp_path: Path, no_data: None,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    folder = blocker / "run"
    with pytest.raises(OSError, match=rf"output_dir='{folder}': cannot create the folder"):
        run_method("heatmap_unet", {"dataset": "synthetic2d", "output_dir": str(folder), "device": "cpu"})
    # a folder that exists but refuses files (chmod does not stop root, so the probe write is refused here)
    real_write = Path.write_bytes

    def refuse(self: Path, data: bytes) -> int:
        if self.parent == tmp_path / "ro":
            raise PermissionError(13, "Permission denied", str(self))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(OSError, match=rf"output_dir='{tmp_path / 'ro'}': cannot write into the folder"):
        run_method("heatmap_unet", {"dataset": "synthetic2d", "output_dir": str(tmp_path / "ro"), "device": "cpu"})


def test_afids_needs_its_deformation_set(tmp_path: Path, no_data: None, no_gpu: None) -> None:
    """afids-mni is one template: a run without deformations of it is refused before any loading."""
    base = {"dataset": "afids-mni", "output_dir": str(tmp_path / "run"), "device": "cpu"}
    with pytest.raises(ValueError, match=r"afids-mni.*single template: set n_deformed >= 5 \(got 0\)"):
        run_method("heatmap_unet", base)
    with pytest.raises(ValueError, match=r"n_deformed >= 5 \(got 3\)"):
        run_method("global_local", {**base, "n_deformed": 3})


def test_an_empty_split_is_named_with_its_cause(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Before: such a run failed only when training started, naming neither the dataset nor where its splits come from."""
    from lmlib.data.datasets import load_dataset

    data = load_dataset("synthetic2d", n_images=10)
    for s in data.samples:
        s.meta["split"] = "train" if s.meta["split"] != "test" else "test"
    monkeypatch.setattr(runner, "load_run_data", lambda params: data)
    with pytest.raises(ValueError, match=r"synthetic2d: the val split is empty \(train \d+, val 0, test \d+ of 10 "
                                         r"images\).*phantom generator"):
        run_method("heatmap_unet", {"dataset": "synthetic2d", "output_dir": str(tmp_path / "run"), "device": "cpu"})
    assert not any((tmp_path / "run").glob("checkpoints/*"))


METHOD_BAD: list[tuple[str, dict[str, Any], str]] = [
    ("heatmap_unet", {"sigma": 0}, r"sigma=0: must be a number > 0 \(px\)"),
    ("heatmap_unet", {"foreground_weight": 0.5}, r"foreground_weight=0.5: must be a number >= 1"),
    ("heatmap_unet", {"channels": []}, r"channels=\[\]: must be a list of integers >= 1"),
    ("heatmap_unet", {"decoder": "peak"}, r"decoder='peak': must be one of argmax, centroid"),
    ("dilation_erosion", {"mask_centre": "middle"}, r"mask_centre='middle': must be exact or round"),
    ("htc", {"heads": "all"}, r"heads='all': must be both, quarter or half"),
    ("global_local", {"local_patch_per_landmark": "yes"}, r"local_patch_per_landmark='yes': must be true or false"),
    ("global_local", {"global_channels": [8, 16]}, r"global_channels=\[8, 16\]: must be 5 integers >= 1"),
    ("prior_guided", {"plane": "tilted"}, r"plane='tilted': must be shared or per_landmark"),
    ("prior_guided", {"stages": ["coarse", "fine"]}, r"stages=\['coarse', 'fine'\]: must be a list from"),
    ("registration", {"demons_sigma_mm": -1.0}, r"demons_sigma_mm=-1.0: must be a number > 0 \(mm\)"),
]


@pytest.mark.parametrize(("method", "change", "message"), METHOD_BAD, ids=[f"{m}-{next(iter(c))}" for m, c, _ in METHOD_BAD])
def test_a_bad_method_parameter_is_one_clear_line_before_any_work(method: str, change: dict[str, Any], message: str,
                                                                  tmp_path: Path, no_data: None, no_gpu: None) -> None:
    """A method's own parameters are checked by its typed model (``Parameters``) before data are loaded."""
    with pytest.raises(ValueError, match=message) as info:
        run_method(method, {**GOOD, "dataset": "synthetic3d" if method == "prior_guided" else "synthetic2d",
                            "image_size": [], "output_dir": str(tmp_path / "run"), **change})
    assert "\n" not in str(info.value)


def test_a_methods_constructor_defaults_are_its_models() -> None:
    """A constructor argument named like a model field takes the model's default (one source of truth; None: the
    constructor derives it, e.g. global_local's alpha per stage from the constant the model reads too)."""
    import inspect

    from lmlib.methods.base import method_class, method_names
    from lmlib.methods.config import defaults

    for name in method_names():
        cls = method_class(name)
        model = defaults(cls.Parameters)
        signature = inspect.signature(cls.__init__).parameters
        differ = {k: (p.default, model[k]) for k, p in signature.items()
                  if k in model and p.default is not None and p.default != model[k]}
        assert not differ, f"{cls.__name__}.__init__ vs {cls.__name__}.Parameters (constructor, model): {differ}"
