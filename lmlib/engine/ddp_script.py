"""Data-parallel training started from a notebook: the same :func:`~lmlib.engine.training.fit`, run as a script.

Lightning cannot start DDP processes from an interactive kernel safely (spawn is refused there, and forked
children of a Jupyter kernel hang on its output threads), and a script is what its launcher expects. So a
notebook's ``fit(..., devices=N)`` writes its arguments to ``<output_dir>/.ddp/arguments.pt`` and runs

    python -m lmlib.engine.ddp_script <output_dir>/.ddp/arguments.pt

whose rank 0 Lightning re-launches as ranks 1..N-1 (strategy ``ddp``); rank 0 writes ``result.json`` (the
checkpoints, epochs, best score, time and peak memory) that the notebook's process reads back. Under torchrun or
SLURM ``srun`` every rank already runs its own driver and notebook: each script joins the process group from the
launcher's environment and writes its own ``result.json`` (checkpoints are rank 0's, on the shared file system).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from lmlib.engine.training import fit

    path = Path((argv if argv is not None else sys.argv[1:])[0])
    # started by an outside launcher (torchrun, srun): every rank runs its own notebook and reads its own result
    external = "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    arguments = torch.load(str(path), map_location="cpu", weights_only=False)
    result = fit(**arguments)
    assert result.trainer is not None  # fit trained here (not in a notebook kernel), so it returns its trainer
    if result.trainer.is_global_zero or external:
        (path.parent / "result.json").write_text(json.dumps({
            "best_checkpoint": result.best_checkpoint, "last_checkpoint": result.last_checkpoint,
            "train_seconds": result.train_seconds, "epochs": result.epochs, "best_score": result.best_score,
            "peak_rss_mb": result.peak_rss_mb}), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
