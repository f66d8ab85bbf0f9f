"""Figures as files: PNGs small enough to commit (every run folder's figures go through here)."""
from __future__ import annotations

import io
from pathlib import Path

from matplotlib.figure import Figure

DPI = 120
MAX_BYTES = 1_000_000  # a committed figure stays below this (resolution lowered step by step)


def save_figure(fig: Figure, path: Path | str, dpi: int = DPI, max_bytes: int = MAX_BYTES) -> Path:
    """Save ``fig`` as PNG; lower the resolution step by step until the file is under ``max_bytes``.

    The figure's own ``dpi`` is lowered to the saved one where that is lower: a notebook that shows the figure
    (IPython renders a figure at its ``dpi``) embeds at most what the file holds, not a larger copy."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for scale in (1.0, 0.8, 0.64, 0.5, 0.4, 0.3):
        buf = io.BytesIO()
        saved_dpi = max(int(dpi * scale), 30)
        fig.savefig(buf, format="png", dpi=saved_dpi, bbox_inches="tight")
        if buf.tell() <= max_bytes:
            break
    path.write_bytes(buf.getvalue())
    fig.set_dpi(min(fig.dpi, saved_dpi))
    return path
