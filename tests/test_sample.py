import numpy as np
import pytest
import SimpleITK as sitk

from lmlib.data.geometry import Geometry
from lmlib.data.sample import Sample, image_from_sitk


def test_from_index_and_back() -> None:
    geo = Geometry([0.5, 2.0], origin=[10.0, 20.0])
    s = Sample.from_index("a", np.zeros((8, 4)), geo, [[1, 2], [np.nan, np.nan]], ["p", "q"])
    assert s.valid.tolist() == [True, False]
    np.testing.assert_allclose(s.landmarks_mm[0], [10.5, 24.0])
    np.testing.assert_allclose(s.landmarks_index[0], [1, 2])
    assert np.isnan(s.landmarks_mm[1]).all()


def test_invalid_landmarks_become_nan() -> None:
    s = Sample("a", np.zeros((4, 4)), Geometry([1, 1]), [[1, 1], [2, 2]], [True, False], ("p", "q"))
    assert np.isnan(s.landmarks_mm[1]).all()


def test_shape_mismatch_names_image() -> None:
    with pytest.raises(ValueError, match="img7"):
        Sample("img7", np.zeros((4, 4)), Geometry([1, 1]), [[1, 1, 1]], [True], ("p",))


def test_sitk_roundtrip_axis_order() -> None:
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)  # numpy (z, y, x)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 1.0, 2.0))
    data, geo = image_from_sitk(img)
    assert data.shape == (4, 3, 2)  # (x, y, z)
    assert data[3, 2, 1] == img.GetPixel(3, 2, 1)
    s = Sample("v", data, geo, [[1, 1, 1]], [True], ("p",))
    back = s.to_sitk()
    assert back.GetSize() == img.GetSize() and back.GetSpacing() == img.GetSpacing()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), arr)
