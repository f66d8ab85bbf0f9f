"""The JupyterLab viewer without a browser: what each control changes in the drawn figure and in the landmark list
(2D and 3D), and the table reader it is fed from."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lmlib.data.phantoms import make_phantom_dataset
from lmlib.outputs.contract import predictions_frame
from lmlib.reporting.viewer import TRUTH, LandmarkViewer, ViewState, draw_view, predictions_by_image

pytest.importorskip("ipywidgets", reason="the viewer needs ipywidgets (the notebooks extra)")


def _points(ax) -> int:
    return sum(len(c.get_offsets()) for c in ax.collections)


def test_2d_toggles_errors_and_centring() -> None:
    samples = make_phantom_dataset(2, n_images=2, seed=1, size=(64, 48), n_landmarks=3)
    shift = [s.landmarks_mm + np.array([1.0, 1.0]) for s in samples]
    viewer = LandmarkViewer(samples, {"unet": shift}, regions_mm=[np.full(3, 2.0)] * 2, zoom_mm=10.0)
    ax = viewer.fig.axes[0]
    assert _points(ax) == 6 and len(ax.patches) == 3  # truth + one series, one region per predicted point
    labels = [label for label, _ in viewer.landmark.options]
    assert labels[0] == "(whole image)" and all("unet 1.41 mm" in label for label in labels[1:])  # sqrt(2) mm
    viewer.series.value = (TRUTH,)
    assert _points(viewer.fig.axes[0]) == 3 and not viewer.fig.axes[0].patches
    viewer.landmark.value = 1  # centre on landmark 1: a 2 x 10 mm window around its truth
    ax = viewer.fig.axes[0]
    centre = samples[0].geometry.world_to_index(samples[0].landmarks_mm[1:2])[0]
    assert np.mean(ax.get_xlim()) == pytest.approx(centre[0]) and np.ptp(ax.get_xlim()) == pytest.approx(20.0)
    viewer.image.value = 1  # another image: its own list, the whole image again
    assert viewer.state.landmark is None and "syn2d_001" in viewer.fig.get_suptitle()


def test_3d_choosing_a_landmark_moves_the_three_planes_to_it() -> None:
    samples = make_phantom_dataset(3, n_images=1, seed=2, size=(24, 20, 16), n_landmarks=4)
    viewer = LandmarkViewer(samples, {"pg": [samples[0].landmarks_mm + 0.5]})
    assert len(viewer.fig.axes) == 3 and len(viewer.sliders) == 3
    viewer.landmark.value = 2
    voxel = np.round(samples[0].geometry.world_to_index(samples[0].landmarks_mm[2:3])[0]).astype(int)
    assert [s.value for s in viewer.sliders] == list(voxel)
    assert [ax.get_title() for ax in viewer.fig.axes] == [f"axial z={voxel[2]}", f"coronal y={voxel[1]}",
                                                          f"sagittal x={voxel[0]}"]
    viewer.sliders[2].value = 0  # a slider moves its plane alone
    assert viewer.fig.axes[0].get_title() == "axial z=0"


def test_predictions_table_to_arrays_and_a_plain_draw() -> None:
    samples = make_phantom_dataset(2, n_images=2, seed=3, size=(32, 32), n_landmarks=3)
    pred = [s.landmarks_mm + 0.25 for s in samples]
    frame = predictions_frame(samples, pred)
    back = predictions_by_image(frame.iloc[1:], samples)  # one row missing: NaN there
    assert np.isnan(back[0][0]).all()
    np.testing.assert_allclose(back[0][1:], pred[0][1:])
    np.testing.assert_allclose(back[1], pred[1])
    fig = draw_view(samples[0], {"m": pred[0]}, ViewState(series=("m",), names=True))
    assert _points(fig.axes[0]) == 3 and len(fig.axes[0].texts) == 3
    with pytest.raises(ValueError, match="one prediction array per image"):
        LandmarkViewer(samples, {"m": pred[:1]})
    assert isinstance(frame, pd.DataFrame)
