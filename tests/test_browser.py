"""Review and correct in a real browser: JupyterLab headless on a free local port, Debian's Chromium driven by
Playwright (scripts/lab_browser.py). The review notebook runs in the page; a typed slider value, a dragged slider
and a click on the image each correct one flagged landmark, and the written annotations hold those points. Skipped,
with the reason, where Chromium or Playwright is missing (`.ci/run` installs both)."""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lmlib.data.datasets import load_dataset
from lmlib.data.sample import Sample
from lmlib.reporting.review_widget import ReviewWidget
from lmlib.review import ReviewSession

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import lab_browser  # noqa: E402

pytestmark = pytest.mark.slow


def test_review_in_chromium_types_drags_and_clicks_corrections(
        prediction_folder: Callable[[int], tuple[Path, list[Sample]]]) -> None:
    pytest.importorskip("ipympl", reason="clicks need ipympl (the notebooks extra)")
    why = lab_browser.missing()
    if why:
        pytest.skip(why)
    folder, _ = prediction_folder(2)
    root = folder.parent
    queue = ReviewSession(folder).pending
    # the prediction notebook's (80) review cell, on the folder lmlib.predict would have written
    lab_browser.write_notebook(root / "review.ipynb", [
        f"from lmlib.reporting.review_widget import review_predictions\n\nreview_predictions(r'{folder}')"])
    with lab_browser.lab_page(root) as (page, url):
        lab_browser.run_notebook(page, url, "review.ipynb", shows=f"1 of {len(queue)}")
        out = page.locator(".jp-Cell-outputArea").last
        status = out.locator(".widget-html").nth(1)
        save = out.get_by_role("button", name="Save correction")

        # 1. type 0.75 into the dx slider's readout
        readout = out.locator(".widget-slider .widget-readout").first
        readout.click()
        page.keyboard.press("Control+A")
        page.keyboard.type("0.75")
        page.keyboard.press("Enter")
        page.wait_for_timeout(500)
        save.click()
        out.get_by_text(f"2 of {len(queue)}").wait_for()
        assert "by 0.75 mm" in status.inner_text()

        # 2. drag the dy slider's handle to the right
        handle = out.locator(".widget-slider .noUi-handle").nth(1)
        box = handle.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] / 2 + 40, box["y"] + box["height"] / 2, steps=8)
        page.mouse.up()
        page.wait_for_timeout(500)
        save.click()
        out.get_by_text(f"3 of {len(queue)}").wait_for()
        assert "corrected" in status.inner_text()

        # 3. click on the image 3 px right of and 2 px above the prediction: where, in the page, from the same
        # figure drawn here (its layout in figure fractions)
        local = ReviewWidget(ReviewSession(folder), clicks=False)
        third = local.item
        assert third == queue[2]
        geometry = local.session.sample(third.image_id).geometry
        target = geometry.world_to_index(np.reshape(third.predicted_mm, (1, 2)))[0] + [3.0, -2.0]
        local.fig.canvas.draw()
        ax = local.fig.axes[0]
        fx, fy = local.fig.transFigure.inverted().transform(ax.transData.transform(target))
        canvas = out.locator(".jupyter-matplotlib-canvas-div").first.bounding_box()
        page.mouse.click(canvas["x"] + fx * canvas["width"], canvas["y"] + (1 - fy) * canvas["height"])
        page.wait_for_timeout(1000)
        save.click()
        out.get_by_text("done").wait_for()
        page.locator(".jp-Notebook").screenshot(path=str(root / "review_done.png"))

    log = pd.read_csv(folder / "reviewed" / "decisions.csv", dtype={"image_id": str})
    assert list(log["decision"]) == ["corrected"] * 3
    moved = log[["x_mm", "y_mm"]].to_numpy(float) - np.array([i.predicted_mm for i in queue])
    np.testing.assert_allclose(moved[0], [0.75, 0.0], atol=1e-6)
    assert moved[1][0] == pytest.approx(0.0, abs=1e-6) and moved[1][1] > 0.5
    clicked = geometry.index_to_world(target.reshape(1, 2))[0] - np.asarray(queue[2].predicted_mm)
    np.testing.assert_allclose(moved[2], clicked, atol=0.3)  # within a few screen pixels (0.05 mm each)
    # the annotations written in the data set's own format load as the 'reviewed' annotator
    data = load_dataset(str(ReviewSession(folder).write_dataset()))
    points = {(s.image_id, n): p for s in data.samples for n, p in zip(s.landmark_names, s.landmarks_mm)}
    for item, row in zip(queue, log[["x_mm", "y_mm"]].to_numpy(float)):
        np.testing.assert_allclose(points[(item.image_id, item.landmark)], row, atol=1e-6)
