"""A matplotlib figure shown in a widget as a PNG (``ipywidgets.Image``), redrawn in place by the viewer and the
review widget.

Why not an ``ipywidgets.Output`` with ``display(fig)`` inside it: under papermill, nbclient emulates the Output
widget's capture and sends its state back to the kernel on the shell socket while it awaits the cell's reply; now
and then the reply's wake-up is lost and the run waits forever with the kernel idle (seen with cells building a 3D
viewer with predictions on a loaded 2-core machine; nbclient issue 312). An Image widget's updates travel from the
kernel to the client only.
"""
from __future__ import annotations

import io
from typing import Any

from matplotlib.figure import Figure


def figure_png(fig: Figure, dpi: float = 100.0) -> bytes:
    """The figure as PNG bytes (its own size in inches x ``dpi`` pixels)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def figure_image() -> Any:
    """An empty ``ipywidgets.Image`` for :func:`show_figure`."""
    import ipywidgets as w

    return w.Image(format="png")


def show_figure(image: Any, fig: Figure) -> None:
    """Draw ``fig`` into ``image`` (an ``ipywidgets.Image`` from :func:`figure_image`)."""
    image.value = figure_png(fig)
