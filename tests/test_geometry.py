from __future__ import annotations

import math

from hypothesis import given, strategies as st

from diffit.geometry import GridGeometry, grid_offset, overlap_window, truncate


def test_truncate_is_toward_zero() -> None:
    assert truncate(9.9999999) == 9
    assert truncate(-40.5) == -40
    assert truncate(49.5) == 49
    assert truncate(-0.7) == 0


def test_offsets_use_truncation_not_floor() -> None:
    template = GridGeometry(100, 100, 50.5, 50.5)
    assert grid_offset(template, GridGeometry(10, 10, 60.0, 40.0)) == (-9, 10)


def test_window_clamps_exclusive_end_to_last_pixel() -> None:
    # Two images that reach the template's top-right corner: Montage drops its last column/row.
    template = GridGeometry(100, 80, 0.5, 0.5)
    a = GridGeometry(40, 30, 0.5 - 60, 0.5 - 50)  # columns 60..99, rows 50..79
    b = GridGeometry(30, 25, 0.5 - 70, 0.5 - 55)  # columns 70..99, rows 55..79
    window = overlap_window(template, a, b)
    assert window is not None
    assert (window.i0, window.i1, window.j0, window.j1) == (70, 99, 55, 79)
    assert window.shape == (24, 29)
    assert window.image_slices(1) == (slice(5, 29), slice(10, 39))
    assert window.image_slices(2) == (slice(0, 24), slice(0, 29))


def test_disjoint_images_do_not_overlap() -> None:
    template = GridGeometry(100, 100, 1.0, 1.0)
    a = GridGeometry(10, 10, 1.0, 1.0)
    b = GridGeometry(10, 10, 1.0 - 10, 1.0)  # starts right where a ends
    assert overlap_window(template, a, b) is None


@given(
    st.integers(2, 60), st.integers(2, 60), st.floats(-30, 90), st.floats(-30, 90),
    st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40), st.floats(-80, 80), st.floats(-80, 80)),
             min_size=2, max_size=2),
)
def test_window_matches_pixel_by_pixel_model(tn1, tn2, tc1, tc2, images) -> None:
    template = GridGeometry(tn1, tn2, tc1, tc2)
    geoms = [GridGeometry(n1, n2, c1, c2) for n1, n2, c1, c2 in images]
    window = overlap_window(template, *geoms)
    # Brute force: template columns covered by both images, 0 <= i < tn1 - 1.
    def covered(axis_len, tc, geom_len, c):
        start = int(math.trunc(tc - c))
        return {i for i in range(start, start + geom_len) if 0 <= i < axis_len - 1}
    cols = covered(tn1, tc1, geoms[0].naxis1, geoms[0].crpix1) & covered(tn1, tc1, geoms[1].naxis1, geoms[1].crpix1)
    rows = covered(tn2, tc2, geoms[0].naxis2, geoms[0].crpix2) & covered(tn2, tc2, geoms[1].naxis2, geoms[1].crpix2)
    if not cols or not rows:
        assert window is None
    else:
        assert window is not None
        assert (window.i0, window.i1) == (min(cols), max(cols) + 1)
        assert (window.j0, window.j1) == (min(rows), max(rows) + 1)
