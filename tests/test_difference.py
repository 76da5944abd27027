from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from diffit.difference import difference, fits_rounded


def test_equal_areas_give_plain_difference() -> None:
    rng = np.random.default_rng(0)
    f1 = rng.normal(size=(6, 7))
    f2 = rng.normal(size=(6, 7))
    result = difference(f1, f2)
    assert result is not None and (result.imin, result.jmin) == (0, 0)
    np.testing.assert_allclose(result.data, f1 - f2, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(result.area, np.full((6, 7), 2.0))


def test_area_weighting_formula() -> None:
    f1 = np.array([[3.0, 5.0]])
    f2 = np.array([[1.0, 2.0]])
    a1 = np.array([[1.0, 1.1]])
    a2 = np.array([[0.9, 1.0]])
    result = difference(f1, f2, a1, a2)
    expected = 2.0 * (f1 * a1 - f2 * a2) / (a1 + a2)
    np.testing.assert_array_equal(result.data, expected)
    np.testing.assert_array_equal(result.area, a1 + a2)


def test_low_coverage_pixels_are_dropped_and_result_trimmed() -> None:
    f = np.ones((5, 6))
    a1 = np.ones((5, 6))
    a1[:, 0] = 0.2  # total area 1.2 vs reference 1.84: more than 33.3 % off
    a1[:, 5] = 0.0  # invalid in image 1
    f2 = 2 * f
    f2[0, :] = np.nan  # invalid in image 2
    result = difference(f, f2, a1, np.ones((5, 6)))
    assert result is not None
    assert (result.imin, result.jmin) == (1, 1)
    assert result.data.shape == (4, 4)
    assert np.all(result.data == -1.0)


def test_nan_area_disables_coverage_rule_as_in_montage() -> None:
    # Montage quirk: a NaN area makes the mean area NaN, so no pixel fails the 0.333 test.
    f = np.ones((4, 4))
    a1 = np.ones((4, 4))
    a1[:, 0] = 0.4
    a1[0, 3] = np.nan
    result = difference(f, 2 * f, a1, np.ones((4, 4)))
    assert result.imin == 0 and np.isnan(result.data[0, 3 - result.imin])
    assert np.all(np.isfinite(result.data[:, 0]))


def test_nan_and_inf_pixels_blank() -> None:
    f1 = np.array([[1.0, np.nan, 3.0], [np.inf, 5.0, 6.0]])
    f2 = np.array([[0.0, 0.0, -np.inf], [0.0, 1.0, 1.0]])
    result = difference(f1, f2)
    assert np.isnan(result.data[0, 1]) and np.isnan(result.data[0, 2]) and np.isnan(result.data[1, 0])
    assert result.area[0, 1] == 0.0
    assert result.data[1, 1] == 4.0


def test_all_blank_is_none() -> None:
    f = np.full((3, 3), np.nan)
    assert difference(f, np.ones((3, 3))) is None
    assert difference(np.ones((3, 3)), np.ones((3, 3)), np.zeros((3, 3)), np.ones((3, 3))) is None


def test_crpix_rounding_matches_cfitsio_14_digits() -> None:
    assert fits_rounded(-31.189999999999998) == -31.19
    assert fits_rounded(100.25) == 100.25
    assert fits_rounded(1.0 / 3.0) == 0.33333333333333


arrays = hnp.arrays(np.float64, st.tuples(st.integers(1, 8), st.integers(1, 8)),
                    elements=st.floats(allow_nan=True, allow_infinity=True, width=32))


@settings(max_examples=80, deadline=None)
@given(arrays, st.data())
def test_difference_never_crashes_and_keeps_consistent_masks(f1, data) -> None:
    f2 = data.draw(hnp.arrays(np.float64, f1.shape, elements=st.floats(width=32)))
    areas = data.draw(st.booleans())
    a1 = a2 = None
    if areas:
        a1 = data.draw(hnp.arrays(np.float64, f1.shape, elements=st.floats(-1, 3, width=32)))
        a2 = data.draw(hnp.arrays(np.float64, f1.shape, elements=st.floats(-1, 3, width=32)))
    result = difference(f1, f2, a1, a2)
    if result is None:
        return
    kept = result.area > 0
    assert kept[0, :].any() and kept[-1, :].any() and kept[:, 0].any() and kept[:, -1].any()
    assert np.all(np.isnan(result.data[~kept]))
    assert np.all(result.area[~kept] == 0)
